// Upcycling: a dense decoder (llama, mistral, qwen2, qwen3) becomes a Mixture-of-Experts
// checkpoint in the mixtral, qwen2_moe or qwen3_moe layout, every MoE expert initialised from the
// dense MLP. Upcycled models are a starting point for continued training, not finished models.
//
// Why not a per-layer Pass (passes/pass.h): a pass rewrites the layers of a model whose family
// and layer structure it keeps; upcycling changes the family, the config keys and every MLP into
// an MoE block. So it is a model-building step of its own (Upcycler below) that hands its output
// out layer by layer: the output plan (names, dtypes, shapes) is known first, then each layer's
// tensors are made, experts of `copy` being zero-copy views of the mapped dense MLP. The writing
// sits above, in the pipeline (pipeline/upcycle_run.cpp writes through the output sink,
// pipeline/hf_sink.h). Memory: one layer's computed tensors (drop, split) plus the mapped pages
// the OS keeps, released layer by layer — not the model's size.
//
// The implementation, by concern, in passes/upcycle/: plan (sources opened, every check),
// routers (from prompts), experts (methods' expert initialisation), layers (dense -> MoE layer
// mapping), config (the target's config.json), section (the recipe section), upcycler (this
// interface, the byte count and the report).
//
// Shapes are HF's [out, in]: gate/up [I, H], down [H, I], router [E, H]; I the dense MLP width,
// H the hidden size, E experts, k experts per token, G split segments.
//
// Methods (one per `method`):
// - copy (Sparse Upcycling, Komatsuzaki et al., ICLR 2023): every expert = the dense MLP.
//   With equal experts and renormalised top-k weights (mixtral always; qwen*_moe with
//   norm_topk_prob true, our default) the MoE equals the dense model for any router.
// - drop (Drop-Upcycling, Nakamura et al., ICLR 2025): per expert, a seeded random fraction r of
//   the I intermediate neurons (rows of gate and up, columns of down) is re-drawn from
//   N(μ, σ²), μ and σ the mean and standard deviation of the whole original matrix (the paper's
//   per-matrix statistics); the other neurons are the dense ones.
// - split (fine-grained / granular upcycling): the I neurons are cut into G segments of I/G
//   (random permutation; balanced k-means on L2-normalised gate rows; or "coact": balanced
//   k-means on each neuron's |silu(gate x) * up x| over the first 512 tokens of a calibration
//   text, L2-normalised, so neurons that fire together share an expert), expert e = segment
//   e mod G of copy e / G (E = copies x G). Output-preserving scale s = G: "down" multiplies
//   down_proj by s (the MLP is linear in down; with G a power of two exact in bf16 too), "cube"
//   multiplies gate, up and down by s^(1/3) as the cube rule states — silu is not homogeneous, so
//   "cube" is NOT output preserving; it is kept to measure. The split MoE equals the dense MLP
//   only when the G segments of one copy are selected with weight 1/G each: renormalised top-k,
//   router logits equal for every expert (router_std 0) and k = G (ties go to the lower expert
//   index, i.e. copy 0) or k = E. A random router (std 0.02) weights segments unequally: close
//   to dense, not equal (docs/benchmarks.md measures both).
//
// Routers (`router`):
// - random: N(0, router_std²), seeded (per layer).
// - hidden (mergekit-moe): per expert e and layer l, mean of the MoE block input (the
//   post-attention RMSNorm output of the dense model) over the tokens of e's positive prompts
//   minus the mean over its negative prompts, L2-normalised, as router row e.
// - ridge (DUME, "Dense-to-MoE upcycling" closed form): W = (A + λI)⁻¹ B with A = Σ x̃ x̃ᵀ,
//   B = Σ x̃ onehot(domain)ᵀ over the tokens of each expert's texts (x̃ the block input, fp64),
//   router = Wᵀ [E, H].
//   prompts file: {"<expert index>": {"positive": ["text", ...], "negative": ["text", ...]}, ...}
//   (a bare list is the positive prompts); hidden/ridge need one entry per expert 0..E-1.
//
// Shared expert (`shared_expert`, qwen2_moe only): the dense MLP becomes the shared expert, its
// sigmoid gate row is zero (gate 0.5 for every token) and the routed experts' down_proj is
// multiplied by 0.5, so output = 0.5 routed + 0.5 dense = dense for copy. Without it a qwen2_moe
// output still carries the shared-expert tensors (stock loaders build them): all zero, so it
// adds exactly 0.
//
// Several sources (BTX / BAM style): `sources` are dense fine-tunes of the same base (same
// family, config dimensions, tensor shapes and tokenizer.json); expert e comes from source
// e mod S; attention, norms and embeddings from the first source ("first") or their mean
// ("mean").
//
// Errors (core::Error::invalid, exit 2, one line naming the flag/file): a source that is
// already MoE, k > E or k < 1, an unknown target ("did you mean"), a target that cannot express
// the source's attention (qkv bias into mixtral, q/k norm other than into qwen3_moe, output
// bias), mismatched sources, prompts missing for an expert, empty prompt lists, prompts that
// tokenize to nothing, E not a multiple of G, I not divisible by G. Nothing is written then.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/checkpoint.h"
#include "io/checkpoint_writer.h"
#include "io/env.h"
#include "model/model.h"

namespace moe::passes {

struct UpcycleOptions {
  std::string to;                     // mixtral | qwen2_moe | qwen3_moe
  int64_t experts = 0;                // E
  int64_t top_k = 0;                  // k
  std::string method = "copy";        // copy | drop | split
  double drop_ratio = 0.5;            // drop: r in (0, 1]
  int64_t segments = 2;               // split: G
  std::string segmenting = "random";  // split: random | kmeans | coact
  std::filesystem::path text;         // split coact: calibration text
  std::string split_scale = "down";   // split: down | cube | none
  std::string router = "random";      // random | hidden | ridge
  double router_std = 0.02;
  std::filesystem::path prompts;      // hidden / ridge
  double ridge_lambda = 1e-2;
  bool shared_expert = false;         // qwen2_moe
  bool norm_topk_prob = true;         // qwen2_moe / qwen3_moe (mixtral always renormalises)
  std::vector<std::filesystem::path> sources;  // more dense fine-tunes (after the model)
  std::string attention = "first";    // several sources: first | mean
  uint64_t seed = 0;
  std::optional<core::DType> dtype;   // output dtype of float tensors (default: as stored)
  uint64_t max_shard_bytes = 5'000'000'000ull;
};

// The "upcycle" section of a recipe ({"to": ..., "experts": ..., ...}); relative paths resolve
// against `base`. Throws Error::invalid naming the key (unknown keys with "did you mean").
UpcycleOptions parse_upcycle_section(const nlohmann::json& section, const std::filesystem::path& base);
// The recipe keys of the section (what parse_upcycle_section accepts).
const std::vector<std::string>& upcycle_section_keys();

namespace upcycling {
struct Plan;
}

// A checked upcycle whose output is made layer by layer for a writer. The output, in write order:
// head() (the embedding), layer(0) .. layer(layers() - 1), tail() (final norm, lm_head); plan()
// lists the same tensors' names, dtypes and shapes ([out, in]) before any is made.
class Upcycler {
 public:
  // Opens `model_dir` (and opts.sources) and runs every check of check_upcycle(), then the forward
  // passes the routers (hidden, ridge: over the prompts) and the segments (split coact: over the
  // text) need. Error::invalid naming the flag or file as listed above.
  Upcycler(io::Env& env, const std::filesystem::path& model_dir, const UpcycleOptions& opts);
  ~Upcycler();
  Upcycler(const Upcycler&) = delete;
  Upcycler& operator=(const Upcycler&) = delete;

  // The first source (its side files go with the output; its pages are handed back as written).
  const io::Checkpoint& source() const;
  int64_t layers() const;
  std::vector<io::TensorSpec> plan() const;
  std::vector<model::OutTensor> head() const;
  // Layer l's tensors, computed now (OutTensor::make hands each back).
  std::vector<model::OutTensor> layer(int l) const;
  std::vector<model::OutTensor> tail() const;
  // Hands every source's mapped pages of layer l back to the OS (after it is written).
  void release_layer(int l) const;
  // config.json for the target family.
  nlohmann::json config() const;
  // moe_tool_report.json without "command", "recipe" and "timings": the "upcycle" block (method,
  // sources, router, where the output equals the dense model), input, params and bytes before and
  // after; `tensor_bytes` and `shards` as written.
  nlohmann::json report(uint64_t tensor_bytes, size_t shards) const;

 private:
  std::unique_ptr<upcycling::Plan> p_;
};

// The checks of Upcycler that need only the configs (what the CLI runs before creating the
// output folder): family, target, experts, top-k, split divisibility, sources' shapes. Returns the
// output's tensor bytes, computed from the shapes (UINT64_MAX when beyond 2^64), so the caller
// can compare them with the free space before anything is built.
uint64_t check_upcycle(io::Env& env, const std::filesystem::path& model_dir, const UpcycleOptions& opts);

}  // namespace moe::passes
