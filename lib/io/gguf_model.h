// A GGUF file (io/gguf.h) read as a model checkpoint: what io::Checkpoint::open does with a path
// to a .gguf file (or any file starting with the GGUF magic), so every command that takes a model
// folder takes a GGUF file too (docs/gguf.md, "GGUF as an input").
//
// The mapping is the export's tables (io/gguf_names.h) read backwards:
//   - general.architecture -> our model_type (GgufArch); ARCH.* hyper-parameters -> config.json
//     keys (GgufHparam; f32 values given back as the shortest decimal that rounds to the same f32,
//     so 1e-05 stored as f32 reads back as 1e-05), tokenizer.ggml.bos/eos_token_id -> config ids;
//   - tensor names -> the family's names (family/family.h): "blk.3.attn_q.weight" ->
//     "model.layers.3.self_attn.q_proj.weight"; a stacked "blk.3.ffn_gate_exps.weight"
//     (ne = [in, out, E]) -> E weights [out, in], each a view of its slice of the file (no copy);
//   - values the converter transformed given back (io::gguf_value_map: qwen3next's zero-centred
//     norms stored - 1, A_log = log(-ssm_a)) as owned F32 tensors; ssm_conv1d {K, conv_dim} as
//     conv1d [conv_dim, 1, K];
//   - q/k rows of arch `llama` un-permuted (the converter permutes them for llama.cpp's
//     interleaved RoPE): a row copy of those small tensors, exact for every type;
//   - F32 / F16 / BF16 tensors -> plain tensors viewing the file; every block type with a decoder
//     (quant/gguf_blocks.h) -> an encoded weight (GgufBlocks) whose rows dequantize on demand.
// Errors (core::Error, exit 2) name the file and the key or tensor: an unknown architecture, a
// missing hyper-parameter, a tensor with no name in our tables, a block type without a decoder.
#pragma once

#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "family/family.h"
#include "io/gguf.h"
#include "io/gguf_names.h"
#include "io/safetensors.h"

namespace moe::io {

// Whether `path` is a GGUF file: a regular file whose name ends in .gguf or whose first four bytes
// are the GGUF magic. A folder is never one.
bool is_gguf_path(const fs::path& path);
// Whether `path`'s name ends in .gguf, in any case (a name for a GGUF file, not a folder).
bool has_gguf_name(const fs::path& path);

// The dtype of a GGUF plain (unquantized) tensor type: F32, F16, BF16; nullopt for block types.
std::optional<core::DType> gguf_plain_dtype(quant::GgmlType t);

// The llama3 rope_scaling (config.json's object, low_freq_factor 1) whose divisors
// (gguf_llama3_rope_divisors) are `div`, or null when every divisor is 1: what the reader makes
// of rope_freqs.weight (docs/gguf.md). Error::corruption / Error::unsupported prefixed by `where`
// when the divisors are not a llama3 scaling this reading determines (a divisor below 1 or
// falling, a smoothed band of one divisor, keys that do not give the divisors back to 1e-5).
nlohmann::json gguf_llama3_scaling(const std::vector<float>& div, double theta, int64_t head_dim, const std::string& where);

// The GGUF file seen as a checkpoint.
class GgufModel {
 public:
  // Parses the file (GgufFile::open's checks) and maps it as above.
  static std::shared_ptr<const GgufModel> open(Env& env, const fs::path& path);

  const GgufFile& file() const { return *file_; }
  const fs::path& path() const { return file_->path(); }
  const nlohmann::json& config() const { return config_; }
  const std::string& config_text() const { return config_text_; }
  // The family table's GGUF row the file was read as (general.architecture, with or without
  // experts; deepseek2 by its gating).
  const GgufArch& arch() const { return *arch_; }
  // Our tensor names, in the file's order (a stacked tensor's experts in expert order); each
  // TensorInfo holds our name, the stored dtype (U8 for block types), the logical shape and the
  // byte range in the file's data section.
  const std::vector<TensorInfo>& infos() const { return infos_; }
  const TensorInfo* find(std::string_view name) const;
  core::Tensor tensor(std::string_view name) const;
  // Where our tensor `name` is stored: the GGUF tensor and, for a stacked tensor, the expert
  // (-1 otherwise); permute_heads > 0 when its rows were un-permuted (that many heads).
  struct Source {
    const GgufTensorInfo* tensor = nullptr;
    int64_t expert = -1;
    int64_t permute_heads = 0;
    GgufValueMap map = GgufValueMap::None;  // the converter's value transform, undone by tensor()
    // Multi-head Latent Attention (GgufArch::mla): kv_b_proj rebuilt from `tensor` (attn_k_b) and
    // this attn_v_b, decoded to F32 (io/gguf_names.h kGgufMlaKB).
    const GgufTensorInfo* mla_v = nullptr;
  };
  const Source& source(std::string_view name) const;
  uint64_t total_tensor_bytes() const;

 private:
  std::vector<float> decoded(const GgufTensorInfo& t) const;
  core::Tensor mla_kv_b(const GgufTensorInfo& kb, const GgufTensorInfo& vb, const core::Shape& shape) const;
  std::shared_ptr<const GgufFile> file_;
  const GgufArch* arch_ = nullptr;
  nlohmann::json config_;
  std::string config_text_;
  std::vector<TensorInfo> infos_;
  std::vector<Source> sources_;
  std::map<std::string, size_t, std::less<>> index_;
};

// tokenizer.json and tokenizer_config.json texts rebuilt from tokenizer.ggml.* (the inverse of the
// export's `gpt2` tokenizer). tokenizer.json: a byte-level BPE with the tokens (types 1 normal, 2 unknown, 6 byte) as its vocabulary,
// the merges, the Split regex of tokenizer.ggml.pre (io/gguf_names.h), control (3) and
// user-defined (4) tokens as added tokens (special / not), unused (5) tokens left out, and
// a ByteLevel post-processor and decoder. tokenizer_config.json: bos_token / eos_token (the tokens
// of tokenizer.ggml.bos/eos_token_id) and add_bos_token / add_eos_token, which decide what the
// tokenizer adds. Error::corruption / unsupported naming the file and the key (a missing key, a
// tokenizer.ggml.model other than gpt2, a pre-tokenizer name without a known regex).
struct GgufTokenizerText {
  std::string tokenizer_json, config_json;
};
GgufTokenizerText gguf_tokenizer_json(const GgufFile& file);

// The per-expert name, under the layer prefix, that a GGUF input gives expert {e}'s weight of MoE
// field `field` ("expert_gate", "expert_up", "expert_down") of a family whose experts are stored
// fused (granitemoe: input_linear [E,2I,H], output_linear [E,H,I]): GGUF stacks the three
// projections apart, as llama.cpp's converter splits input_linear, so each expert is a view of its
// slices, named after the fused tensor ("block_sparse_moe.input_linear.{e}.gate.weight",
// ".up.weight"; "block_sparse_moe.output_linear.{e}.weight"). model/load.cpp reads them.
std::string gguf_fused_expert_name(const model::FamilyDesc& fam, const std::string& field);
// `fam` with its experts spelled per expert by gguf_fused_expert_name and no fused tensors: the
// layout a GGUF input's experts are listed in as stored (inspect, summaries). One copy per family.
const model::FamilyDesc& gguf_split_layout(const model::FamilyDesc& fam);

// The permutation the converter applies to the rows of a [heads * d, cols] q/k projection for
// llama.cpp's interleaved RoPE: stored row r holds source row permuted_source_row(r, ...).
int64_t gguf_permuted_source_row(int64_t r, int64_t heads, int64_t rows);
// How many heads the rows of layer role `role` ("q_proj", "k_bias", ...) are permuted in for `arch`
// (0: not permuted).
int64_t gguf_permute_heads(const model::GgufArch& arch, const std::string& role, int64_t heads, int64_t kv_heads);

}  // namespace moe::io

namespace moe::io {


}  // namespace moe::io
