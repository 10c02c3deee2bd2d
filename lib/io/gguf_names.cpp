#include "io/gguf_names.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <iterator>

#include "core/error.h"
#include "family/family.h"

namespace moe::io {

namespace {

// Layer roles (family/family.h) <-> llama.cpp tensor names under "blk.N.".
constexpr GgufNamePair kGgufLayerNames[] = {
    {"q_proj", "attn_q.weight"},       {"k_proj", "attn_k.weight"},       {"v_proj", "attn_v.weight"},
    {"o_proj", "attn_output.weight"},  {"q_bias", "attn_q.bias"},         {"k_bias", "attn_k.bias"},
    {"v_bias", "attn_v.bias"},         {"o_bias", "attn_output.bias"},    {"q_norm", "attn_q_norm.weight"},
    {"k_norm", "attn_k_norm.weight"},  {"input_norm", "attn_norm.weight"}, {"post_attn_norm", "ffn_norm.weight"},
    // qwen3_next's Gated DeltaNet (llama.cpp's qwen3next: LLM_TENSOR_SSM_*; dt_bias is ssm_dt.bias,
    // A_log is stored as ssm_a = -exp(A_log): gguf_value_map).
    {"in_proj_qkvz", "ssm_in.weight"}, {"in_proj_ba", "ssm_ba.weight"},   {"conv1d", "ssm_conv1d.weight"},
    {"dt_bias", "ssm_dt.bias"},        {"A_log", "ssm_a"},                {"linear_norm", "ssm_norm.weight"},
    {"out_proj", "ssm_out.weight"},
    // Multi-head Latent Attention (deepseek2); kv_b_proj is stored split (kGgufMlaKB / kGgufMlaVB).
    {"q_a_proj", "attn_q_a.weight"},   {"q_a_norm", "attn_q_a_norm.weight"}, {"q_b_proj", "attn_q_b.weight"},
    {"kv_a_proj", "attn_kv_a_mqa.weight"}, {"kv_a_norm", "attn_kv_a_norm.weight"},
    {"sinks", "attn_sinks.weight"},
    // phimoe's LayerNorm biases (llama.cpp's attn_norm_b / ffn_norm_b).
    {"input_norm_bias", "attn_norm.bias"}, {"post_attn_norm_bias", "ffn_norm.bias"},
};
constexpr GgufNamePair kGgufGlobalNames[] = {
    {"embed", "token_embd.weight"}, {"final_norm", "output_norm.weight"}, {"lm_head", "output.weight"},
    // phimoe: the final LayerNorm's bias and the lm_head bias (llama.cpp's output_norm_b, output_b).
    {"final_norm_bias", "output_norm.bias"}, {"lm_head_bias", "output.bias"}};

// MoE block fields (family/family.h FamilyDesc) <-> llama.cpp tensor names under "blk.N.".
constexpr GgufNamePair kGgufMoeNames[] = {
    {"router", "ffn_gate_inp.weight"},           {"expert_gate", "ffn_gate_exps.weight"},
    {"expert_up", "ffn_up_exps.weight"},         {"expert_down", "ffn_down_exps.weight"},
    {"shared_gate", "ffn_gate_shexp.weight"},    {"shared_up", "ffn_up_shexp.weight"},
    {"shared_down", "ffn_down_shexp.weight"},    {"shared_expert_gate", "ffn_gate_inp_shexp.weight"},
    {"router_bias", "exp_probs_b.bias"},         {"dense_gate", "ffn_gate.weight"},
    {"dense_up", "ffn_up.weight"},               {"dense_down", "ffn_down.weight"},
    // Expert biases (GgufArch::expert_biases), stacked as the weights: ne = [out, E].
    {"expert_gate_bias", "ffn_gate_exps.bias"},  {"expert_up_bias", "ffn_up_exps.bias"},
    {"expert_down_bias", "ffn_down_exps.bias"},
};
// The router bias added to the logits (GgufArch::gate_inp_bias: llama.cpp's ffn_gate_inp_b).
constexpr const char* kGgufGateInpBias = "ffn_gate_inp.bias";
// The post-attention norm's name where GgufArch::post_attention_norm (llama.cpp's LLM_TENSOR_ATTN_POST_NORM).
constexpr const char* kGgufPostAttentionNorm = "post_attention_norm.weight";

template <size_t N>
const char* find_second(const GgufNamePair (&table)[N], const std::string& key) {
  for (const auto& p : table)
    if (key == p.first) return p.second;
  return nullptr;
}
template <size_t N>
const char* find_first(const GgufNamePair (&table)[N], const std::string& key) {
  for (const auto& p : table)
    if (key == p.second) return p.first;
  return nullptr;
}

}  // namespace

constexpr const char kO200kRegex[] =
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

constexpr const char kGpt2Regex[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

const std::vector<GgufPreTokenizer>& gguf_pre_tokenizers() {
  static const std::vector<GgufPreTokenizer> table = {
      {"qwen2",
       {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}},
      {"llama-bpe",
       {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}},
      // o200k (gpt-oss, Llama 4): LLAMA_VOCAB_PRE_TYPE_GPT4O, whose "original regex from
      // tokenizer.json" this is. llama.cpp reads "llama4" (what its converter writes for Llama 4)
      // as the same pre-tokenizer: the export writes the first name, the reader takes both.
      // GPT-2's (a ByteLevel with use_regex true, OLMoE's GPT-NeoX tokenizer; the same string as
      // tokenizer/pretokenize.h's kGpt2Pattern): LLAMA_VOCAB_PRE_TYPE_GPT2, also read as "olmo".
      {"gpt-2", {kGpt2Regex}},
      {"olmo", {kGpt2Regex}},
      {"gpt-4o", {kO200kRegex}},
      {"llama4", {kO200kRegex}},
      // DeepSeek-V3 / R1: LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM's three regexes (digit runs, the CJK
      // ranges, then the words), as tokenizer.json spells them (JSON-decoded: the CJK ranges as
      // characters, CR and LF as the characters themselves in the third).
      {"deepseek-v3",
       {"\\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|"
        "\\s*[\r\n]+|\\s+(?!\\S)|\\s+"}},
  };
  return table;
}

// ARCH.<key> <-> config.json, as llama.cpp's converter writes them (convert_hf_to_gguf.py's
// set_gguf_parameters) for our families.
const GgufHparam kGgufHparams[] = {  // in the order the export writes them
    {"context_length", "max_position_embeddings", false, GgufHparam::When::Always},
    {"embedding_length", "hidden_size", false, GgufHparam::When::Always},
    {"block_count", "num_hidden_layers", false, GgufHparam::When::Always},
    {"feed_forward_length", "intermediate_size", false, GgufHparam::When::DenseWidth},
    {"feed_forward_length", "{expert_width}", false, GgufHparam::When::NoExpertWidthKey},
    {"attention.head_count", "num_attention_heads", false, GgufHparam::When::Always},
    {"attention.head_count_kv", "num_key_value_heads", false, GgufHparam::When::Always},
    {"rope.freq_base", "rope_theta", true, GgufHparam::When::Always},
    {"attention.layer_norm_rms_epsilon", "rms_norm_eps", true, GgufHparam::When::Always},
    {"expert_count", "{expert_count}", false, GgufHparam::When::Experts},
    {"expert_used_count", "{topk}", false, GgufHparam::When::Experts},
    {"expert_feed_forward_length", "{expert_width}", false, GgufHparam::When::ExpertWidthKey},
    {"expert_shared_feed_forward_length", "{shared_width}", false, GgufHparam::When::Optional},
    {"attention.key_length", "head_dim", false, GgufHparam::When::Optional},
    {"attention.value_length", "head_dim", false, GgufHparam::When::Optional},
    {"rope.dimension_count", "{rope_dim}", false, GgufHparam::When::Optional},
    // granitemoe's scalar multipliers (GraniteModel's set_gguf_parameters; llama.cpp's loader
    // requires all four for granitemoe, so the export writes each, 1 where config.json has none).
    {"embedding_scale", "embedding_multiplier", true, GgufHparam::When::Optional},
    {"residual_scale", "residual_multiplier", true, GgufHparam::When::Optional},
    {"attention.scale", "attention_multiplier", true, GgufHparam::When::Optional},
    {"logit_scale", "logits_scaling", true, GgufHparam::When::Optional},
    {"attention.clamp_kqv", "clip_qkv", true, GgufHparam::When::Optional},
    // gpt-oss's sliding window (GgufArch::swa_pattern: the sliding layers' window).
    {"attention.sliding_window", "sliding_window", false, GgufHparam::When::Optional},
    // DeepSeek-style MoE (GgufArch::routing_keys, leading_dense, shared_count).
    {"leading_dense_block_count", "{dense_lead}", false, GgufHparam::When::Optional},
    {"interleave_moe_layer_step", "moe_layer_interval", false, GgufHparam::When::Optional},
    {"expert_shared_count", "{shared_count}", false, GgufHparam::When::Optional},
    {"expert_weights_scale", "routed_scaling_factor", true, GgufHparam::When::Optional},
    {"expert_weights_norm", "norm_topk_prob", false, GgufHparam::When::Optional, true},
    {"expert_group_count", "n_group", false, GgufHparam::When::Optional},
    {"expert_group_used_count", "topk_group", false, GgufHparam::When::Optional},
    // qwen3next's Gated DeltaNet (Qwen3NextModel's set_gguf_parameters).
    {"ssm.conv_kernel", "linear_conv_kernel_dim", false, GgufHparam::When::Optional},
    {"ssm.state_size", "linear_key_head_dim", false, GgufHparam::When::Optional},
    {"ssm.group_count", "linear_num_key_heads", false, GgufHparam::When::Optional},
    {"ssm.time_step_rank", "linear_num_value_heads", false, GgufHparam::When::Optional},
    {"ssm.inner_size", "{ssm_inner}", false, GgufHparam::When::Optional},
};
const size_t kGgufHparamCount = std::size(kGgufHparams);

const GgufArch* gguf_arch_for_model_type(const std::string& model_type) {
  for (const auto& f : model::all_families())
    if (f.gguf && model_type == f.gguf->model_type) return &*f.gguf;
  return nullptr;
}

const GgufArch* gguf_arch_for_arch(const std::string& arch, bool experts) {
  for (const auto& f : model::all_families())
    if (f.gguf && arch == f.gguf->arch && f.gguf->dense != experts) return &*f.gguf;
  return nullptr;
}

double gguf_rope_wavelength(double theta, int64_t head_dim, int64_t i) {
  const float f = static_cast<float>(1.0 / std::pow(theta, double(2 * i) / double(head_dim)));
  return 2 * M_PI / f;
}

std::vector<float> gguf_llama3_rope_divisors(double theta, int64_t head_dim, double factor, double low, double high, double orig) {
  const double low_wl = orig / low, high_wl = orig / high;
  std::vector<float> div;
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    const double wl = gguf_rope_wavelength(theta, head_dim, i);
    double v = 1.0;
    if (wl > low_wl) {
      v = factor;
    } else if (wl >= high_wl) {
      const double smooth = (orig / wl - low) / (high - low);
      v = 1.0 / ((1 - smooth) / factor + smooth);
    }
    div.push_back(static_cast<float>(v));
  }
  return div;
}

bool gguf_hparam_applies(const GgufHparam& h, const GgufArch& arch) {
  using W = GgufHparam::When;
  switch (h.when) {
    case W::DenseWidth: return arch.expert_width_key || arch.dense;
    case W::ExpertWidthKey: return arch.expert_width_key;
    case W::NoExpertWidthKey: return !arch.expert_width_key && !arch.dense;
    case W::Experts: return !arch.dense;
    default: return true;
  }
}

std::string gguf_exported_model_types() {
  std::string s;
  for (const auto& f : model::all_families())  // llama4 (the multimodal wrapper): its text model, read as llama4_text
    if (f.gguf) s += (s.empty() ? "" : ", ") + f.model_type;
  return s;
}

const char* gguf_layer_name(const GgufArch& arch, const std::string& role) {
  if (arch.post_attention_norm && role == "post_attn_norm") return kGgufPostAttentionNorm;
  return find_second(kGgufLayerNames, role);
}
const char* gguf_layer_role(const GgufArch& arch, const std::string& gguf_name) {
  if (arch.post_attention_norm && gguf_name == kGgufPostAttentionNorm) return "post_attn_norm";
  if (arch.post_attention_norm && gguf_name == "ffn_norm.weight") return nullptr;
  return find_first(kGgufLayerNames, gguf_name);
}
bool gguf_byte_piece(const std::string& piece) {
  return piece.size() == 6 && piece.rfind("<0x", 0) == 0 && piece[5] == '>' && std::isxdigit(static_cast<unsigned char>(piece[3])) &&
         std::isxdigit(static_cast<unsigned char>(piece[4]));
}

bool gguf_rope_tensor(const GgufArch& arch, const std::string& name) {
  return (arch.rope_freqs && name == kGgufRopeFreqs) ||
         (arch.longrope && (name == kGgufRopeFactorsLong || name == kGgufRopeFactorsShort));
}

const char* gguf_global_name(const std::string& role) { return find_second(kGgufGlobalNames, role); }
const char* gguf_global_role(const std::string& gguf_name) { return find_first(kGgufGlobalNames, gguf_name); }

const char* gguf_moe_name(const std::string& field) { return find_second(kGgufMoeNames, field); }
const char* gguf_moe_field(const std::string& gguf_name) { return find_first(kGgufMoeNames, gguf_name); }
const char* gguf_moe_name(const GgufArch& arch, const std::string& field) {
  if (field == "router_bias" && arch.gate_inp_bias) return kGgufGateInpBias;
  if (field.rfind("expert_", 0) == 0 && field.size() > 5 && field.compare(field.size() - 5, 5, "_bias") == 0 && !arch.expert_biases)
    return nullptr;
  return gguf_moe_name(field);
}
const char* gguf_moe_field(const GgufArch& arch, const std::string& gguf_name) {
  if (arch.gate_inp_bias) {
    if (gguf_name == kGgufGateInpBias) return "router_bias";
    if (gguf_name == gguf_moe_name("router_bias")) return nullptr;
  }
  const char* f = gguf_moe_field(gguf_name);
  return f && !gguf_moe_name(arch, f) ? nullptr : f;
}

GgufValueMap gguf_value_map(const model::FamilyDesc& fam, const std::string& role) {
  if (role == "A_log") return GgufValueMap::NegExp;
  if (fam.zero_centred_norm && (role == "input_norm" || role == "post_attn_norm" || role == "q_norm" || role == "k_norm" ||
                                role == "final_norm"))
    return GgufValueMap::PlusOne;
  return GgufValueMap::None;
}

void gguf_map_to_file(GgufValueMap map, float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (map == GgufValueMap::PlusOne) x[i] = x[i] + 1.0f;
    if (map == GgufValueMap::NegExp) x[i] = static_cast<float>(-std::exp(static_cast<double>(x[i])));
  }
}

void gguf_map_from_file(GgufValueMap map, float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (map == GgufValueMap::PlusOne) x[i] = x[i] - 1.0f;
    if (map == GgufValueMap::NegExp) x[i] = static_cast<float>(std::log(-static_cast<double>(x[i])));
  }
}

const char* gguf_pre_tokenizer_name(const std::vector<std::string>& splits) {
  for (const auto& p : gguf_pre_tokenizers())
    if (std::equal(splits.begin(), splits.end(), p.splits.begin(), p.splits.end())) return p.name;
  return nullptr;
}
const std::vector<const char*>* gguf_pre_tokenizer_splits(const std::string& name) {
  for (const auto& p : gguf_pre_tokenizers())
    if (name == p.name) return &p.splits;
  return nullptr;
}

uint32_t gguf_file_type_of(quant::GgmlType t) {
  using quant::GgmlType;
  switch (t) {
    case GgmlType::F32: return 0;
    case GgmlType::F16: return 1;
    case GgmlType::Q4_0: return 2;
    case GgmlType::Q4_1: return 3;
    case GgmlType::Q8_0: return 7;
    case GgmlType::Q5_0: return 8;
    case GgmlType::Q5_1: return 9;
    case GgmlType::Q2_K: return 10;
    case GgmlType::Q3_K: return 11;  // Q3_K_S: Q3_K everywhere (the _M/_L mixes raise some tensors)
    case GgmlType::Q4_K: return 14;  // Q4_K_S
    case GgmlType::Q5_K: return 16;  // Q5_K_S
    case GgmlType::Q6_K: return 18;
    case GgmlType::BF16: return 32;
    case GgmlType::TQ1_0: return 36;
    case GgmlType::TQ2_0: return 37;
    case GgmlType::MXFP4: return 38;  // LLAMA_FTYPE_MOSTLY_MXFP4_MOE
    default: throw core::Error::internal(std::string("no llama_ftype for ") + quant::ggml_type_info(t).name);
  }
}

}  // namespace moe::io
