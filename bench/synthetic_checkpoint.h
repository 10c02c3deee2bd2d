// Synthetic checkpoints at real shapes for the benchmarks: random small weights (seeded xorshift,
// the same bytes on every run), norms 1.0, written through the project's writer into a folder the
// caller owns (never committed at size). Layouts (transformers' tensor and config names):
//   mixtral      block_sparse_moe.experts.N.{w1,w3,w2}, router block_sparse_moe.gate
//   qwen3_moe    mlp.experts.N.{gate,up,down}_proj, router mlp.gate, per-head q_norm/k_norm,
//                moe_intermediate_size, decoder_sparse_step 1 (every layer MoE)
//   deepseek_v3  Multi-head Latent Attention (q_a/q_b, kv_a_proj_with_mqa/kv_b, their norms), one
//                shared expert, sigmoid routing with e_score_correction_bias, first_k_dense_replace 0
// Dtypes: bf16, or fp8 as DeepSeek-V3 ships it: every 2-D projection of a decoder layer (attention,
// routed and shared experts; not the router) stored as F8_E4M3 codes [out, in] with
// `<name>_scale_inv` F32 [ceil(out/128), ceil(in/128)] (one scale per 128x128 block) and
// config.json quantization_config {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size":
// [128, 128], "activation_scheme": "dynamic"}; embeddings, norms, routers and lm_head stay bf16.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint_writer.h"
#include "io/env.h"

namespace moe::bench {

namespace fs = std::filesystem;
using core::DType;

// Shapes: H hidden, E routed experts, k experts per token, I expert intermediate width, L decoder
// layers, heads / kv heads, V vocabulary; head_dim 0 = H / heads.
struct Dims {
  int64_t H = 1024, E = 8, k = 2, I = 2816, L = 4, heads = 16, kv = 4, V = 32000, head_dim = 0;
  int64_t d() const { return head_dim > 0 ? head_dim : H / heads; }
  // Bytes of one mixtral-layout decoder layer in bf16.
  uint64_t layer_bytes() const {
    return 2 * static_cast<uint64_t>(E * 3 * H * I + 2 * H * heads * d() + 2 * H * kv * d() + E * H + 2 * H);
  }
};

// xorshift64 step.
inline uint64_t next_random(uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

// Random small bf16 values: sign and mantissa random, exponent around 2^-6 .. 2^-5.
inline void fill_bf16(std::vector<uint8_t>& buf, uint64_t& s) {
  auto* p = reinterpret_cast<uint16_t*>(buf.data());
  for (size_t i = 0; i < buf.size() / 2; ++i) {
    next_random(s);
    const uint16_t sign = (s >> 63) ? 0x8000 : 0;
    const uint16_t exp = static_cast<uint16_t>(121 + ((s >> 40) & 1));
    p[i] = static_cast<uint16_t>(sign | (exp << 7) | ((s >> 20) & 0x7f));
  }
}

// The block scale of every synthetic FP8 weight: with codes of magnitude 1 .. 4 (fill_fp8) the
// values are 2^-7 .. 2^-5, the bf16 weights' range.
inline constexpr float kFp8Scale = 1.0f / 128.0f;
inline constexpr int64_t kFp8Block = 128;

// Random F8_E4M3 codes: sign and mantissa random, biased exponent 7 or 8 (magnitude 1 .. 3.75);
// never the e4m3fn NaN codes 0x7f / 0xff.
inline void fill_fp8(std::vector<uint8_t>& buf, uint64_t& s) {
  for (auto& b : buf) {
    next_random(s);
    const uint8_t sign = (s >> 63) ? 0x80 : 0;
    const uint8_t exp = static_cast<uint8_t>(7 + ((s >> 40) & 1));
    b = static_cast<uint8_t>(sign | (exp << 3) | ((s >> 20) & 0x7));
  }
}

// Writes the tensors of `plan` into `dir` (shards of 2 GiB, whole tensors in buffers of at most
// 64 MB): norms (1-D tensors whose name has "norm") 1.0; `*_scale_inv` F32 tensors kFp8Scale;
// F8_E4M3 tensors fill_fp8 codes; BF16 tensors fill_bf16 values; other F32 tensors the same bf16
// values widened. Throws std::runtime_error for any other dtype. Returns the tensor bytes.
inline uint64_t write_weights(const fs::path& dir, const std::vector<moe::io::TensorSpec>& plan) {
  moe::io::CheckpointWriter w(moe::io::Env::posix(), dir, plan, uint64_t(2) << 30);
  uint64_t state = 0x9e3779b97f4a7c15ull, total = 0;
  std::vector<uint8_t> buf, wide;
  for (const auto& t : plan) {
    if (t.dtype != DType::BF16 && t.dtype != DType::F32 && t.dtype != DType::F8_E4M3)
      throw std::runtime_error("write_weights: " + t.name + ": BF16, F32 or F8_E4M3 only");
    const bool f32 = t.dtype == DType::F32, fp8 = t.dtype == DType::F8_E4M3;
    const uint64_t n = t.nbytes();
    const bool norm = t.shape.size() == 1 && t.name.find("norm") != std::string::npos;
    const bool scale = f32 && t.name.ends_with("_scale_inv");
    // Source bytes for `m` bytes of the tensor: bf16 values (half as many bytes when the tensor is
    // F32, widened below), or the bytes themselves (FP8 codes, block scales).
    const bool widen = f32 && !scale;
    buf.resize(std::min<uint64_t>(n, uint64_t(64) << 20) / (widen ? 2 : 1));
    for (uint64_t off = 0; off < n;) {
      const uint64_t m = std::min<uint64_t>(buf.size() * (widen ? 2 : 1), n - off);
      if (scale) {
        auto* p = reinterpret_cast<float*>(buf.data());
        for (size_t i = 0; i < buf.size() / 4; ++i) p[i] = kFp8Scale;
      } else if (norm) {  // 1.0
        auto* p = reinterpret_cast<uint16_t*>(buf.data());
        for (size_t i = 0; i < buf.size() / 2; ++i) p[i] = 0x3f80;
      } else if (fp8) {
        fill_fp8(buf, state);
      } else {
        fill_bf16(buf, state);
      }
      const uint8_t* src = buf.data();
      if (widen) {
        wide.resize(buf.size() * 2);
        const auto* h = reinterpret_cast<const uint16_t*>(buf.data());
        auto* o = reinterpret_cast<uint32_t*>(wide.data());
        for (size_t i = 0; i < buf.size() / 2; ++i) o[i] = uint32_t(h[i]) << 16;
        src = wide.data();
      }
      w.write(t.name, off, src, m);
      off += m;
    }
    total += n;
  }
  w.finish();
  return total;
}

// Appends a decoder layer's two norms and attention projections (q/k/v biases when `qkv_bias`),
// names prefixed by `p` ("model.layers.<l>.").
inline void add_norms_attention(std::vector<moe::io::TensorSpec>& plan, const Dims& D, const std::string& p, DType dt,
                                bool qkv_bias) {
  auto add = [&](const std::string& n, moe::core::Shape s) { plan.push_back({p + n, dt, s}); };
  add("input_layernorm.weight", {D.H});
  add("post_attention_layernorm.weight", {D.H});
  const std::pair<const char*, int64_t> qkv[] = {{"q", D.heads * D.d()}, {"k", D.kv * D.d()}, {"v", D.kv * D.d()}};
  for (const auto& [name, rows] : qkv) {
    add(std::string("self_attn.") + name + "_proj.weight", {rows, D.H});
    if (qkv_bias) add(std::string("self_attn.") + name + "_proj.bias", {rows});
  }
  add("self_attn.o_proj.weight", {D.H, D.heads * D.d()});
}

// A synthetic checkpoint: layout, shapes and the dtype of the decoder layers' projections.
struct SynthSpec {
  std::string family = "mixtral";  // mixtral, qwen3_moe or deepseek_v3
  Dims D;
  std::string dtype = "bf16";      // bf16 or fp8
};

inline const std::vector<std::string>& synth_families() {
  static const std::vector<std::string> v = {"mixtral", "qwen3_moe", "deepseek_v3"};
  return v;
}

// DeepSeek-V3's attention ranks at this hidden size: q_lora_rank and kv_lora_rank H/4,
// qk_nope_head_dim and v_head_dim d(), qk_rope_head_dim d()/2 (DeepSeek-V3 itself: 1536, 512,
// 128, 128, 64 at hidden 7168 with 128 heads).
struct MlaDims {
  int64_t q_lora, kv_lora, nope, rope, v;
};
inline MlaDims mla_dims(const Dims& D) { return {D.H / 4, D.H / 4, D.d(), D.d() / 2, D.d()}; }

// Throws std::invalid_argument naming the first field out of range (the message starts with the
// field's command-line flag of bench_synth).
inline void check_spec(const SynthSpec& s) {
  const auto& fams = synth_families();
  if (std::find(fams.begin(), fams.end(), s.family) == fams.end())
    throw std::invalid_argument("--family: '" + s.family + "' is not one of mixtral, qwen3_moe, deepseek_v3");
  if (s.dtype != "bf16" && s.dtype != "fp8")
    throw std::invalid_argument("--dtype: '" + s.dtype + "' is not bf16 or fp8");
  const Dims& D = s.D;
  const std::pair<const char*, int64_t> positive[] = {{"--hidden", D.H}, {"--experts", D.E}, {"--top-k", D.k},
                                                       {"--width", D.I}, {"--layers", D.L}, {"--heads", D.heads},
                                                       {"--kv-heads", D.kv}};
  for (const auto& [flag, v] : positive)
    if (v < 1) throw std::invalid_argument(std::string(flag) + ": must be at least 1, got " + std::to_string(v));
  if (D.k > D.E)
    throw std::invalid_argument("--top-k: " + std::to_string(D.k) + " is more than --experts " + std::to_string(D.E));
  if (D.heads % D.kv != 0)
    throw std::invalid_argument("--kv-heads: " + std::to_string(D.kv) + " does not divide --heads " +
                                std::to_string(D.heads));
  if (D.head_dim < 0) throw std::invalid_argument("--head-dim: must not be negative");
  if (D.head_dim == 0 && D.H % D.heads != 0)
    throw std::invalid_argument("--heads: " + std::to_string(D.heads) + " does not divide --hidden " +
                                std::to_string(D.H) + " (give --head-dim)");
  if (D.d() % 2 != 0) throw std::invalid_argument("--head-dim: " + std::to_string(D.d()) + " is odd (rotary needs pairs)");
  if (s.family == "deepseek_v3" && (D.H % 4 != 0 || D.d() % 4 != 0))
    throw std::invalid_argument("--hidden: deepseek_v3 needs hidden and head_dim multiples of 4 (MLA ranks H/4, rope d/2)");
}

// config.json of `s` (the keys transformers' configuration_<model_type>.py and moe-tool's loader
// read).
inline nlohmann::json synth_config(const SynthSpec& s) {
  const Dims& D = s.D;
  nlohmann::json c;
  if (s.family == "mixtral") {
    c = {{"architectures", {"MixtralForCausalLM"}}, {"model_type", "mixtral"},
         {"hidden_size", D.H}, {"intermediate_size", D.I}, {"num_hidden_layers", D.L},
         {"num_attention_heads", D.heads}, {"num_key_value_heads", D.kv}, {"num_local_experts", D.E},
         {"num_experts_per_tok", D.k}, {"vocab_size", D.V}, {"max_position_embeddings", 4096},
         {"rms_norm_eps", 1e-5}, {"rope_theta", 1e6}, {"sliding_window", nullptr}, {"hidden_act", "silu"},
         {"tie_word_embeddings", false}, {"torch_dtype", "bfloat16"}};
    if (D.head_dim > 0) c["head_dim"] = D.head_dim;
  } else if (s.family == "qwen3_moe") {
    c = {{"architectures", {"Qwen3MoeForCausalLM"}}, {"model_type", "qwen3_moe"}, {"attention_bias", false},
         {"decoder_sparse_step", 1}, {"head_dim", D.d()}, {"hidden_act", "silu"}, {"hidden_size", D.H},
         {"intermediate_size", 4 * D.I}, {"max_position_embeddings", 4096}, {"max_window_layers", D.L},
         {"mlp_only_layers", nlohmann::json::array()}, {"moe_intermediate_size", D.I}, {"norm_topk_prob", true},
         {"num_attention_heads", D.heads}, {"num_experts", D.E}, {"num_experts_per_tok", D.k},
         {"num_hidden_layers", D.L}, {"num_key_value_heads", D.kv}, {"rms_norm_eps", 1e-6},
         {"rope_scaling", nullptr}, {"rope_theta", 1e6}, {"sliding_window", nullptr}, {"tie_word_embeddings", false},
         {"torch_dtype", "bfloat16"}, {"use_sliding_window", false}, {"vocab_size", D.V}};
  } else {  // deepseek_v3
    const MlaDims m = mla_dims(D);
    c = {{"architectures", {"DeepseekV3ForCausalLM"}}, {"model_type", "deepseek_v3"}, {"attention_bias", false},
         {"hidden_act", "silu"}, {"hidden_size", D.H}, {"intermediate_size", 4 * D.I},
         {"max_position_embeddings", 4096}, {"num_attention_heads", D.heads}, {"num_key_value_heads", D.heads},
         {"num_hidden_layers", D.L}, {"first_k_dense_replace", 0}, {"moe_layer_freq", 1},
         {"n_routed_experts", D.E}, {"n_shared_experts", 1}, {"moe_intermediate_size", D.I},
         {"num_experts_per_tok", D.k}, {"n_group", 1}, {"topk_group", 1}, {"kv_lora_rank", m.kv_lora},
         {"q_lora_rank", m.q_lora}, {"qk_nope_head_dim", m.nope}, {"qk_rope_head_dim", m.rope},
         {"v_head_dim", m.v}, {"rms_norm_eps", 1e-6}, {"rope_theta", 10000.0}, {"rope_scaling", nullptr},
         {"tie_word_embeddings", false}, {"torch_dtype", "bfloat16"}, {"vocab_size", D.V},
         {"topk_method", "noaux_tc"}, {"scoring_func", "sigmoid"}, {"norm_topk_prob", true},
         {"routed_scaling_factor", 2.5}, {"num_nextn_predict_layers", 0}};
  }
  if (s.dtype == "fp8")
    c["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                                {"weight_block_size", {kFp8Block, kFp8Block}}};
  return c;
}

// The tensors of `s` in bf16 (F32 for deepseek_v3's e_score_correction_bias), in file order.
inline std::vector<moe::io::TensorSpec> synth_plan_bf16(const SynthSpec& s) {
  const Dims& D = s.D;
  std::vector<moe::io::TensorSpec> plan;
  auto add = [&](const std::string& n, moe::core::Shape sh, DType dt = DType::BF16) { plan.push_back({n, dt, sh}); };
  auto mlp = [&](const std::string& q, int64_t width, const char* g, const char* u, const char* dn) {
    add(q + g + ".weight", {width, D.H});
    add(q + u + ".weight", {width, D.H});
    add(q + dn + ".weight", {D.H, width});
  };
  add("model.embed_tokens.weight", {D.V, D.H});
  for (int64_t l = 0; l < D.L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    if (s.family == "deepseek_v3") {
      const MlaDims m = mla_dims(D);
      add(p + "input_layernorm.weight", {D.H});
      add(p + "post_attention_layernorm.weight", {D.H});
      add(p + "self_attn.q_a_proj.weight", {m.q_lora, D.H});
      add(p + "self_attn.q_a_layernorm.weight", {m.q_lora});
      add(p + "self_attn.q_b_proj.weight", {D.heads * (m.nope + m.rope), m.q_lora});
      add(p + "self_attn.kv_a_proj_with_mqa.weight", {m.kv_lora + m.rope, D.H});
      add(p + "self_attn.kv_a_layernorm.weight", {m.kv_lora});
      add(p + "self_attn.kv_b_proj.weight", {D.heads * (m.nope + m.v), m.kv_lora});
      add(p + "self_attn.o_proj.weight", {D.H, D.heads * m.v});
    } else {
      add_norms_attention(plan, D, p, DType::BF16, false);
      if (s.family == "qwen3_moe") {
        add(p + "self_attn.q_norm.weight", {D.d()});
        add(p + "self_attn.k_norm.weight", {D.d()});
      }
    }
    if (s.family == "mixtral") {
      add(p + "block_sparse_moe.gate.weight", {D.E, D.H});
      for (int64_t e = 0; e < D.E; ++e) mlp(p + "block_sparse_moe.experts." + std::to_string(e) + ".", D.I, "w1", "w3", "w2");
      continue;
    }
    add(p + "mlp.gate.weight", {D.E, D.H});
    if (s.family == "deepseek_v3") add(p + "mlp.gate.e_score_correction_bias", {D.E}, DType::F32);
    for (int64_t e = 0; e < D.E; ++e)
      mlp(p + "mlp.experts." + std::to_string(e) + ".", D.I, "gate_proj", "up_proj", "down_proj");
    if (s.family == "deepseek_v3") mlp(p + "mlp.shared_experts.", D.I, "gate_proj", "up_proj", "down_proj");
  }
  add("model.norm.weight", {D.H});
  add("lm_head.weight", {D.V, D.H});
  return plan;
}

// True for the tensors the fp8 dtype stores as block-scaled F8_E4M3: the 2-D projections of the
// decoder layers except the routers.
inline bool fp8_stored(const moe::io::TensorSpec& t) {
  return t.shape.size() == 2 && t.name.starts_with("model.layers.") && !t.name.ends_with(".gate.weight");
}

// The tensors of `s` in file order (fp8: each stored weight followed by its `_scale_inv`).
inline std::vector<moe::io::TensorSpec> synth_plan(const SynthSpec& s) {
  std::vector<moe::io::TensorSpec> plan = synth_plan_bf16(s);
  if (s.dtype != "fp8") return plan;
  std::vector<moe::io::TensorSpec> out;
  auto blocks = [](int64_t n) { return (n + kFp8Block - 1) / kFp8Block; };
  for (auto t : plan) {
    if (!fp8_stored(t)) {
      out.push_back(t);
      continue;
    }
    t.dtype = DType::F8_E4M3;
    out.push_back(t);
    out.push_back({t.name + "_scale_inv", DType::F32, {blocks(t.shape[0]), blocks(t.shape[1])}});
  }
  return out;
}

// Bytes of decoder layer 0 of `s` in bf16 (every tensor of the layer at 2 bytes a parameter).
inline uint64_t layer_bf16_bytes(const SynthSpec& s) {
  uint64_t n = 0;
  for (const auto& t : synth_plan_bf16(s))
    if (t.name.starts_with("model.layers.0.")) n += 2 * static_cast<uint64_t>(moe::core::shape_numel(t.shape));
  return n;
}

// What one layer's per-expert fp64 Hessians / Grams take when every expert's are held at once:
// E * (H^2 + I^2) * 8 bytes (gate/up input [H, H] and down input [I, I] per expert).
inline uint64_t per_layer_gram_bytes(const Dims& D) {
  return static_cast<uint64_t>(D.E) * static_cast<uint64_t>(D.H * D.H + D.I * D.I) * 8;
}

// Writes config.json, the weights and the tokenizer files of `tokenizer_dir` (tokenizer.json,
// tokenizer_config.json, special_tokens_map.json: those present) into `dir` (created); returns
// the tensor bytes. `tokenizer_dir` empty: no tokenizer. Throws std::invalid_argument
// (check_spec) or the writer's errors.
inline uint64_t write_synthetic(const fs::path& dir, const SynthSpec& s, const fs::path& tokenizer_dir = {}) {
  check_spec(s);
  fs::create_directories(dir);
  moe::io::Env::posix().write_text(dir / "config.json", synth_config(s).dump(2));
  if (!tokenizer_dir.empty())
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})
      if (fs::exists(tokenizer_dir / f)) fs::copy_file(tokenizer_dir / f, dir / f, fs::copy_options::overwrite_existing);
  return write_weights(dir, synth_plan(s));
}

}  // namespace moe::bench
