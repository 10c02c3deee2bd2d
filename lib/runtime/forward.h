// Faithful fp32 CPU forward of a decoder-only (MoE or dense) model, layer-sequential:
// the hidden states of a batch of windows [windows*T, H] are kept; each layer's weights are
// dequantised to f32 once, applied to every window of the batch, then released. Memory is one
// layer in f32 plus the hidden states (plus, for logits, [N, V]).
//
// Families with a forward: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3 and
// kimi_k2 (Multi-head Latent Attention, runtime/mla.h), glm4_moe (partial rotary, DeepSeek-V3
// routing), gpt_oss (attention sinks, per-layer sliding windows, yarn, biased experts with the
// clamped SwiGLU), granitemoe (embedding, attention, residual and logits multipliers), phimoe
// (LayerNorm with bias, sparsemixer routing, lm_head bias), qwen3_next (Gated DeltaNet and gated
// attention layers, zero-centred RMSNorm), llama4_text (runtime/llama4.h; router
// scores scaling the experts' inputs), llama, mistral, qwen2, qwen3.
// Every family in the table has one (model::FamilyDesc::forward).
//
// Step-by-step use (what calibration and compression pipelines do):
//   Forward f(model);
//   MatrixRM X = f.embed(tokens);                       // tokens window-major, windows*T ids
//   for l: LayerWeights w = f.load_layer(l); f.apply_layer(w, X, T, observers); (release w)
//   MatrixRM logits = f.logits(X);                      // final norm + lm_head
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "model/model.h"
#include "runtime/attention.h"
#include "runtime/gated_delta_net.h"
#include "runtime/mla.h"
#include "runtime/moe_block.h"
#include "runtime/observer.h"
#include "runtime/ops.h"
#include "runtime/routing.h"
#include "runtime/weights.h"

namespace moe::runtime {

struct ForwardSpec {
  std::string family;
  int64_t layers = 0, hidden = 0, vocab = 0, max_positions = 0;
  double eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  AttnSpec attn;              // standard attention (MLA: attn.head_dim is qk_rope_head_dim, the RoPE width)
  std::optional<MlaSpec> mla; // set for Multi-head Latent Attention families
  RoutingRule routing;
  // Per-layer sliding windows (gpt_oss layer_types; 0: full attention); empty: attn.sliding_window
  // for every layer.
  std::vector<int64_t> layer_window;
  // granitemoe (modeling_granitemoe.py; 1 for the other families): the embedding rows times
  // embedding_multiplier (embed()), each residual branch's output (attention, MoE block or MLP)
  // times residual_multiplier before it is added (apply_layer()), the logits divided by
  // logits_scaling (lm_head()). attention_multiplier is attn.scale.
  double embedding_multiplier = 1.0, residual_multiplier = 1.0, logits_scaling = 1.0;
  // phimoe: nn.LayerNorm with bias (eps) for the layer norms and the final norm instead of RMSNorm.
  bool layer_norm = false;
  // qwen3_next: zero-centred RMSNorm (weights read as 1 + weight: layer norms, final norm, q/k
  // norms); the Gated DeltaNet of each "linear_attention" layer (linear_layers[l]).
  bool zero_centred_norm = false;
  std::vector<bool> linear_layers;
  std::optional<DeltaNetSpec> delta_net;
  // llama4_text: each layer's attention (runtime/llama4.h: RoPE or NoPE, q/k L2 norm, temperature
  // tuning, chunked attention); empty: attn for every layer.
  std::vector<AttnSpec> layer_specs;
  AttnSpec layer_attn(int l) const {
    AttnSpec a = layer_specs.empty() ? attn : layer_specs.at(static_cast<size_t>(l));
    if (!layer_window.empty()) a.sliding_window = layer_window.at(static_cast<size_t>(l));
    return a;
  }
  // Reads every hyper-parameter from the model's config; throws Error::unsupported for families
  // or settings the forward does not implement (hidden_act other than silu, yarn RoPE, ...).
  static ForwardSpec from_model(const model::Model& m);
};

class Forward {
 public:
  explicit Forward(const model::Model& m);

  const ForwardSpec& spec() const { return spec_; }
  const model::Model& model() const { return model_; }

  // Residual stream after the embedding (times the embedding multiplier), [tokens.size(), H].
  // Throws Error::invalid for ids outside the embedding.
  MatrixRM embed(std::span<const int32_t> tokens) const;
  // The layer's weights as f32; then the mapped pages of its source tensors are handed back
  // (model::Model::page_releaser), so memory stays one layer, not the whole mapped checkpoint.
  LayerWeights load_layer(int l) const;
  // The same into `w`, reusing its buffers (see convert_layer_into).
  void load_layer_into(int l, LayerWeights& w) const;
  // Applies one decoder layer to X in place (N = windows*T rows, T = window length).
  void apply_layer(const LayerWeights& w, MatrixRM& X, int64_t T, std::span<Observer* const> observers = {}) const;
  // Every layer in turn: convert, apply, release. The routed experts are streamed (one conversion
  // per layer either way) unless an observer wants the MoE trace and set_stream_experts is off.
  void run_layers(MatrixRM& X, int64_t T, std::span<Observer* const> observers = {}) const;
  // Final norm (RMSNorm, or LayerNorm with its bias).
  MatrixRM final_norm(const MatrixRM& X) const;
  // lm_head (tied: the embedding) on final-normed rows, plus its bias (phimoe), divided by the
  // logits scaling: [N, V].
  // The head is dequantised in slices of vocabulary rows, never whole.
  MatrixRM lm_head(const MatrixRM& Xn) const;
  MatrixRM logits(const MatrixRM& X) const { return lm_head(final_norm(X)); }

  // Everything: tokens window-major (size divisible by T) -> logits [N, V].
  MatrixRM run(std::span<const int32_t> tokens, int64_t T, std::span<Observer* const> observers = {}) const;
  // The same logits, bit for bit, in a matrix this Forward keeps (valid until its next call of
  // run_kept): the [N, V] logits and the head's dequantised slice are allocated, and their pages
  // faulted in, once per shape instead of every call (for eval's batches: 32 MiB of logits per
  // 2,048 tokens at a vocabulary of 4,096).
  const MatrixRM& run_kept(std::span<const int32_t> tokens, int64_t T, std::span<Observer* const> observers = {}) const;

  // The RoPE table for windows of T tokens (cached for the last T).
  const RopeTable& rope(int64_t T) const;

  // Experts the router may choose, per layer: active[l][e] == false masks expert e of layer l
  // (its router logit counts as -inf before the softmax and the top-k, route()). An empty list, or
  // an empty entry for a layer, leaves every expert of it routable. A task subset's forward
  // (eval --task, docs/tasks.md). Error::internal when an entry's size is not the layer's experts.
  void set_active_experts(std::vector<std::vector<bool>> active) { active_ = std::move(active); }

  // Streams the routed experts (MoeWeights::source): load_layer converts the layer without them and
  // the MoE block decodes each expert when it runs it, so a layer holds a few experts in f32, not
  // E (and hands back each expert's mapped pages once decoded). Same results (bit for bit where each
  // weight fits one of project_in_tiles' tiles, else up to OpenBLAS's summation order); each
  // apply_layer converts the experts again, so a caller that applies one LayerWeights many times
  // (search) should not stream. The LayerWeights then refers to the model's tensors: it must not
  // outlive them, and a layer changed in the model must be loaded again. Default: off.
  void set_stream_experts(bool on) { stream_experts_ = on; }

  // In a run over several MPI ranks (runtime/mpi.h): each MoE block runs only the routed experts
  // this rank owns and the ranks exchange their outputs (moe_forward's split_experts), so every
  // rank computes the single process's numbers; apply_layer is then a collective (every rank calls
  // it for the same layer and batch). An observer of the MoE trace sees h only for the experts
  // this rank owns. No effect with one rank. Default: off.
  void set_split_experts(bool on) { split_experts_ = on; }

 private:
  const model::Model& model_;
  ForwardSpec spec_;
  RowVector final_norm_w_;
  std::optional<RowVector> final_norm_b_, lm_head_b_;  // [H], [V] phimoe
  mutable RopeTable rope_;
  void load_layer_into(int l, LayerWeights& w, bool stream_experts) const;
  // lm_head() into `out` (resized to [N, V], its storage reused when the shape matches).
  void lm_head_into(const MatrixRM& Xn, MatrixRM& out) const;
  // A "linear_attention" layer's token mixer (qwen3_next): o_input is out_proj's input [N, V].
  AttnOutput linear_attention(const LayerWeights& w, const MatrixRM& xn, int64_t T) const;
  std::vector<std::vector<bool>> active_;  // per layer; empty: every expert routable
  bool stream_experts_ = false;
  bool split_experts_ = false;
  // apply_layer's working matrices (norm outputs, attention, MoE block or MLP), kept across layers
  // and calls so their storage is allocated, and its pages faulted in by the kernel, once per
  // shape instead of every layer: one layer's working set. A Forward is not for two threads at once.
  struct Workspace {
    MatrixRM xn, x2, mlp_out, moe_out;
    MatrixRM final_xn, logits;   // run_kept
    std::vector<float> head_w;   // lm_head's dequantised slice of vocabulary rows
    AttnOutput attn;
    AttnWorkspace attn_ws;
    MoeWorkspace moe;
  };
  mutable Workspace ws_;
};

}  // namespace moe::runtime
