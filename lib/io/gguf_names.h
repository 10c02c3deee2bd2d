// The names llama.cpp gives our tensors and hyper-parameters in a GGUF file, as tables read both
// ways: the export maps our names to llama.cpp's, the GGUF reader maps them back. Sources:
// llama.cpp's architecture table (src/llama-arch.cpp: LLM_ARCH_* names, LLM_TENSOR_* names) and its
// converter (convert_hf_to_gguf.py: which models permute q/k rows, which keys each writes).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "family/family.h"
#include "quant/gguf_blocks.h"

namespace moe::io {

// A family's GGUF architecture is a field of its family table entry (model::GgufArch).
using model::GgufArch;

// The row for our model_type, or for llama.cpp's general.architecture; nullptr when there is none.
const GgufArch* gguf_arch_for_model_type(const std::string& model_type);
// `experts`: whether the file has experts (ARCH.expert_count): llama.cpp's "llama" is llama's and
// mistral's (dense, read as llama) and mixtral's.
const GgufArch* gguf_arch_for_arch(const std::string& arch, bool experts);
// "mixtral, qwen2_moe, ..." (for error messages).
std::string gguf_exported_model_types();

// A layer role (family/family.h: q_proj, input_norm, ...) <-> its llama.cpp name under "blk.N."
// ("attn_q.weight") in `arch` (post_attn_norm: ffn_norm, or post_attention_norm where
// GgufArch::post_attention_norm); a global role (embed, final_norm, lm_head) <-> "token_embd.weight"
// etc. nullptr when the name has no counterpart.
const char* gguf_layer_name(const GgufArch& arch, const std::string& role);
const char* gguf_layer_role(const GgufArch& arch, const std::string& gguf_name);
const char* gguf_global_name(const std::string& role);
const char* gguf_global_role(const std::string& gguf_name);

// The MoE block's and dense MLP's tensors under "blk.N.": a model::FamilyDesc field name ("router",
// "router_bias", "expert_gate", "shared_expert_gate", "dense_gate", ...) <-> llama.cpp's name
// ("ffn_gate_inp.weight", "exp_probs_b.bias", "ffn_gate_exps.weight", "ffn_gate_inp_shexp.weight",
// "ffn_gate.weight"). The *_exps tensors stack the experts: ne = [in, out, E].
const char* gguf_moe_name(const std::string& field);
const char* gguf_moe_field(const std::string& gguf_name);
// As above within `arch`: the router bias is ffn_gate_inp.bias where GgufArch::gate_inp_bias (and
// exp_probs_b.bias is then nothing), the expert biases (expert_gate_bias, expert_up_bias,
// expert_down_bias <-> ffn_{gate,up,down}_exps.bias) exist only where GgufArch::expert_biases.
const char* gguf_moe_name(const GgufArch& arch, const std::string& field);
const char* gguf_moe_field(const GgufArch& arch, const std::string& gguf_name);

// Hyper-parameters: "ARCH.<key>" <-> a config.json key. `config_key` is a config.json key, or one
// of the family's own key fields (model::FamilyDesc) in braces: {expert_count}, {topk},
// {expert_width}, {shared_width}, {shared_count}, {rope_dim} (the RoPE width: head_dim, or for a
// partial-rotary family head_dim x partial_rotary_factor), {dense_lead} (the leading dense layers:
// first_k_dense_replace, or moe_layer_start_index where MoeLayerRule::StartEndInterval), {ssm_inner}
// (the Gated DeltaNet's value width linear_num_value_heads x linear_value_head_dim). `when` says
// for which architectures the pair applies.
struct GgufHparam {
  enum class When { Always, DenseWidth, ExpertWidthKey, NoExpertWidthKey, Experts, Optional };
  const char* key;         // after "ARCH."
  const char* config_key;
  bool real;               // stored as f32 (else u32, or bool where `boolean`)
  When when;               // gguf_hparam_applies; Optional rows only when present, the others required
  bool boolean = false;    // stored as bool (config.json true/false)
};
// Whether row h belongs to `arch`'s files: Always and Optional rows always; DenseWidth (the dense
// MLP's feed_forward_length) where GgufArch::expert_width_key or GgufArch::dense; ExpertWidthKey
// where expert_width_key; NoExpertWidthKey (feed_forward_length as the expert width) where neither
// expert_width_key nor dense; Experts (expert_count, expert_used_count) unless dense.
bool gguf_hparam_applies(const GgufHparam& h, const GgufArch& arch);
// The llama3 RoPE divisors (GgufArch::rope_freqs), one global tensor [head_dim / 2] of f32:
// gguf_llama3_rope_divisors, as LlamaModel.generate_extra_tensors computes them from rope_theta,
// head_dim and rope_scaling's factor, low_freq_factor, high_freq_factor and
// original_max_position_embeddings: 1 for wavelengths under orig / high, the factor over
// orig / low, smoothed between (1 / ((1 - s) / factor + s), s = (orig / wavelength - low) / (high - low)).
std::vector<float> gguf_llama3_rope_divisors(double theta, int64_t head_dim, double factor, double low_freq_factor,
                                             double high_freq_factor, double original_max_positions);
// The wavelength (2 pi / frequency, in positions) of RoPE frequency i of a head of head_dim, the
// frequency rounded to f32 as the forward's table holds it.
double gguf_rope_wavelength(double theta, int64_t head_dim, int64_t i);
inline constexpr const char* kGgufRopeFreqs = "rope_freqs.weight";
// The longrope divisors (GgufArch::longrope): the long and the short window's, [head_dim / 2] of f32.
inline constexpr const char* kGgufRopeFactorsLong = "rope_factors_long.weight";
inline constexpr const char* kGgufRopeFactorsShort = "rope_factors_short.weight";
// phimoe's router_jitter_noise (sparsemixer's mask threshold / 2), which llama.cpp's graph does not
// use and has no key for: written by the export so that our reader routes the file as its source
// (absent, as in a converter's file: transformers' default 0.01, the released models' value).
inline constexpr const char* kGgufRouterJitterKey = "moe_tool.router_jitter_noise";
// Whether a SentencePiece vocabulary piece is a byte piece, "<0xXX>" (llama.cpp's token type 6).
bool gguf_byte_piece(const std::string& piece);
// Whether `name` is one of the RoPE tensors above that `arch` writes: not a tensor of the model
// (the reader makes them the config's rope_scaling; a GGUF-to-GGUF write copies them as stored).
bool gguf_rope_tensor(const GgufArch& arch, const std::string& name);
// Multi-head Latent Attention (GgufArch::mla): the layer role kv_b_proj ([heads * (nope + v),
// kv_lora_rank], per head the nope rows then the v rows) is stored as two tensors, as llama.cpp's
// converter splits it: attn_k_b = the nope rows transposed (ne [nope, kv_lora_rank, heads]) and
// attn_v_b = the v rows (ne [kv_lora_rank, v, heads]).
inline constexpr const char* kGgufMlaRole = "kv_b_proj";
inline constexpr const char* kGgufMlaKB = "attn_k_b.weight";
inline constexpr const char* kGgufMlaVB = "attn_v_b.weight";
// ARCH.expert_gating_func of a softmax router (LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX).
inline constexpr uint32_t kGgufGatingSoftmax = 1;
// ARCH.expert_gating_func of a sigmoid router (llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID).
inline constexpr uint32_t kGgufGatingSigmoid = 2;
// Calls f(const GgufHparam&) for each row.
template <class F>
void for_each_gguf_hparam(F&& f);

// A byte-level BPE pre-tokenizer llama.cpp knows by name (tokenizer.ggml.pre; llama-vocab.cpp's
// LLAMA_VOCAB_PRE_TYPE_*): the Split regexes of tokenizer.json's pre_tokenizer Sequence, in order
// (each Isolated, not inverted), then ByteLevel without its own regex.
struct GgufPreTokenizer {
  const char* name;
  std::vector<const char*> splits;
};
const std::vector<GgufPreTokenizer>& gguf_pre_tokenizers();
// The name of a pre-tokenizer by its splits (the first entry that has them), nullptr when unknown.
const char* gguf_pre_tokenizer_name(const std::vector<std::string>& splits);
// The splits of a name, nullptr when unknown.
const std::vector<const char*>* gguf_pre_tokenizer_splits(const std::string& name);

// A value transform the converter applies to a tensor (convert_hf_to_gguf.py's Qwen3NextModel):
// PlusOne stores a zero-centred RMSNorm's weight w as 1 + w (llama.cpp's norm multiplies by the
// stored weight); NegExp stores A_log as A = -exp(A_log) (blk.N.ssm_a). The export applies
// gguf_map_to_file, the GGUF reader gguf_map_from_file (w = stored - 1, A_log = log(-A)).
enum class GgufValueMap { None, PlusOne, NegExp };
// The transform of layer or global role `role` ("input_norm", "final_norm", "A_log", ...) of `fam`:
// PlusOne for the zero-centred norms (FamilyDesc::zero_centred_norm: input_norm, post_attn_norm,
// q_norm, k_norm, final_norm; not the DeltaNet's gated linear_norm), NegExp for A_log.
GgufValueMap gguf_value_map(const model::FamilyDesc& fam, const std::string& role);
void gguf_map_to_file(GgufValueMap map, float* x, size_t n);
void gguf_map_from_file(GgufValueMap map, float* x, size_t n);

// llama_ftype (general.file_type) of a file whose main type is t. Throws core::Error::internal for
// a type with no llama_ftype.
uint32_t gguf_file_type_of(quant::GgmlType t);

// ---- implementation detail of for_each_gguf_pre_tokenizer ----
struct GgufNamePair {
  const char* first;
  const char* second;
};
extern const GgufHparam kGgufHparams[];
extern const size_t kGgufHparamCount;
template <class F>
void for_each_gguf_hparam(F&& f) {
  for (size_t i = 0; i < kGgufHparamCount; ++i) f(kGgufHparams[i]);
}

}  // namespace moe::io
