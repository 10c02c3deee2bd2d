#include "support/synth.h"

#include <stdlib.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "io/checkpoint_writer.h"
#include "io/env.h"

namespace moe::test {

using core::DType;
using core::Shape;
using nlohmann::json;

namespace {

// ---------------------------------------------------------------- deterministic values

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

bool is_norm_name(const std::string& name) {
  return name.find("norm.weight") != std::string::npos;
}

void put_le(std::vector<uint8_t>& out, uint64_t v, size_t n) {
  for (size_t i = 0; i < n; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

// ---------------------------------------------------------------- configs

struct Dims {
  int64_t H = 32, heads = 4, kv = 2, hd = 8, V = 64, E = 4, topk = 2, I = 16, dense = 64;
};

json common_config(const std::string& type, const std::string& arch, int layers) {
  const Dims d;
  return json{
      {"architectures", {arch}},
      {"model_type", type},
      {"attention_dropout", 0.0},
      {"bos_token_id", 1},
      {"eos_token_id", 2},
      {"hidden_act", "silu"},
      {"hidden_size", d.H},
      {"initializer_range", 0.02},
      {"intermediate_size", d.dense},
      {"max_position_embeddings", 256},
      {"num_attention_heads", d.heads},
      {"num_hidden_layers", layers},
      {"num_key_value_heads", d.kv},
      {"rms_norm_eps", 1e-6},
      {"rope_scaling", nullptr},
      {"rope_theta", 10000.0},
      {"tie_word_embeddings", false},
      {"torch_dtype", "bfloat16"},
      {"transformers_version", "4.46.0"},
      {"use_cache", true},
      {"vocab_size", d.V},
  };
}

json base_config(const std::string& f, int layers_override) {
  const Dims d;
  auto L = [&](int def) { return layers_override > 0 ? layers_override : def; };
  if (f == "llama") {
    json c = common_config(f, "LlamaForCausalLM", L(2));
    c.update({{"attention_bias", false}, {"mlp_bias", false}, {"head_dim", d.hd}, {"pretraining_tp", 1},
              {"rms_norm_eps", 1e-5}, {"rope_theta", 500000.0}});
    return c;
  }
  if (f == "mistral") {
    json c = common_config(f, "MistralForCausalLM", L(2));
    c.update({{"head_dim", d.hd}, {"sliding_window", nullptr}, {"rms_norm_eps", 1e-5}, {"rope_theta", 1e6}});
    return c;
  }
  if (f == "qwen2") {
    json c = common_config(f, "Qwen2ForCausalLM", L(2));
    c.update({{"max_window_layers", 2}, {"sliding_window", nullptr}, {"use_sliding_window", false},
              {"tie_word_embeddings", true}, {"rope_theta", 1e6}});
    return c;
  }
  if (f == "qwen3") {
    json c = common_config(f, "Qwen3ForCausalLM", L(2));
    c.update({{"attention_bias", false}, {"head_dim", d.hd}, {"max_window_layers", 2}, {"sliding_window", nullptr},
              {"use_sliding_window", false}, {"tie_word_embeddings", true}, {"rope_theta", 1e6}});
    return c;
  }
  if (f == "mixtral") {
    json c = common_config(f, "MixtralForCausalLM", L(2));
    c.update({{"intermediate_size", d.I}, {"num_local_experts", d.E}, {"num_experts_per_tok", d.topk},
              {"output_router_logits", false}, {"router_aux_loss_coef", 0.02}, {"router_jitter_noise", 0.0},
              {"sliding_window", nullptr}, {"rms_norm_eps", 1e-5}, {"rope_theta", 1e6}});
    return c;
  }
  if (f == "qwen2_moe") {
    json c = common_config(f, "Qwen2MoeForCausalLM", L(3));
    c.update({{"decoder_sparse_step", 1}, {"mlp_only_layers", {0}}, {"moe_intermediate_size", d.I},
              {"num_experts", d.E}, {"num_experts_per_tok", d.topk}, {"norm_topk_prob", false},
              {"shared_expert_intermediate_size", 32}, {"output_router_logits", false},
              {"router_aux_loss_coef", 0.001}, {"max_window_layers", 3}, {"sliding_window", nullptr},
              {"use_sliding_window", false}, {"rope_theta", 1e6}});
    return c;
  }
  if (f == "qwen3_moe") {
    json c = common_config(f, "Qwen3MoeForCausalLM", L(2));
    c.update({{"attention_bias", false}, {"head_dim", d.hd}, {"decoder_sparse_step", 1},
              {"mlp_only_layers", json::array()}, {"moe_intermediate_size", d.I}, {"num_experts", d.E},
              {"num_experts_per_tok", d.topk}, {"norm_topk_prob", true}, {"output_router_logits", false},
              {"router_aux_loss_coef", 0.001}, {"max_window_layers", 2}, {"sliding_window", nullptr},
              {"use_sliding_window", false}, {"rope_theta", 1e6}});
    return c;
  }
  if (f == "olmoe") {
    json c = common_config(f, "OlmoeForCausalLM", L(2));
    c.update({{"attention_bias", false}, {"clip_qkv", nullptr}, {"intermediate_size", d.I}, {"num_experts", d.E},
              {"num_experts_per_tok", d.topk}, {"norm_topk_prob", false}, {"output_router_logits", false},
              {"router_aux_loss_coef", 0.01}, {"pad_token_id", 1}, {"rms_norm_eps", 1e-5}});
    return c;
  }
  if (f == "deepseek_v2" || f == "deepseek_v3") {
    const bool v3 = f == "deepseek_v3";
    json c = common_config(f, v3 ? "DeepseekV3ForCausalLM" : "DeepseekV2ForCausalLM", L(3));
    c.update({{"num_key_value_heads", d.heads}, {"first_k_dense_replace", 1}, {"moe_layer_freq", 1},
              {"n_routed_experts", d.E}, {"n_shared_experts", 1}, {"moe_intermediate_size", d.I},
              {"num_experts_per_tok", d.topk}, {"kv_lora_rank", 16}, {"qk_nope_head_dim", 8},
              {"qk_rope_head_dim", 4}, {"v_head_dim", 8}, {"attention_bias", false}, {"ep_size", 1},
              {"aux_loss_alpha", 0.001}, {"seq_aux", true}});
    if (v3) {
      c.update({{"q_lora_rank", 24}, {"topk_method", "noaux_tc"}, {"scoring_func", "sigmoid"}, {"n_group", 2},
                {"topk_group", 1}, {"norm_topk_prob", true}, {"routed_scaling_factor", 2.5},
                {"num_nextn_predict_layers", 1}});
      c["auto_map"] = {{"AutoConfig", "configuration_deepseek.DeepseekV3Config"},
                       {"AutoModelForCausalLM", "modeling_deepseek.DeepseekV3ForCausalLM"}};
    } else {
      c.update({{"q_lora_rank", nullptr}, {"topk_method", "greedy"}, {"scoring_func", "softmax"}, {"n_group", 1},
                {"topk_group", 1}, {"norm_topk_prob", false}, {"routed_scaling_factor", 1.0}});
      c["auto_map"] = {{"AutoConfig", "configuration_deepseek.DeepseekV2Config"},
                       {"AutoModelForCausalLM", "modeling_deepseek.DeepseekV2ForCausalLM"}};
    }
    return c;
  }
  if (f == "phimoe") {
    json c = common_config(f, "PhiMoEForCausalLM", L(2));
    c.update({{"attention_bias", true}, {"lm_head_bias", true}, {"intermediate_size", d.I},
              {"num_local_experts", d.E}, {"num_experts_per_tok", d.topk}, {"router_jitter_noise", 0.01},
              {"input_jitter_noise", 0.0}, {"output_router_logits", false}, {"router_aux_loss_coef", 0.0},
              {"sliding_window", 128}, {"rms_norm_eps", 1e-5}});
    return c;
  }
  if (f == "granitemoe") {
    json c = common_config(f, "GraniteMoeForCausalLM", L(2));
    c.update({{"attention_bias", false}, {"intermediate_size", d.I}, {"num_local_experts", d.E},
              {"num_experts_per_tok", d.topk}, {"embedding_multiplier", 12.0}, {"logits_scaling", 6.0},
              {"residual_multiplier", 0.22}, {"attention_multiplier", 0.125}, {"tie_word_embeddings", true},
              {"output_router_logits", false}, {"router_aux_loss_coef", 0.001}});
    return c;
  }
  throw std::invalid_argument("make_synth: unknown family '" + f + "'");
}

// ---------------------------------------------------------------- layout from config

int64_t ival(const json& c, const char* key, int64_t def) {
  auto it = c.find(key);
  if (it == c.end() || it->is_null()) return def;
  return it->get<int64_t>();
}
bool bval(const json& c, const char* key, bool def) {
  auto it = c.find(key);
  if (it == c.end() || it->is_null()) return def;
  return it->get<bool>();
}

struct Entry {
  std::string name;
  Shape shape;
  DType dtype;
};

bool moe_layer(const std::string& f, const json& c, int64_t l) {
  if (f == "mixtral" || f == "phimoe" || f == "granitemoe" || f == "olmoe") return true;
  if (f == "qwen2_moe" || f == "qwen3_moe") {
    for (const auto& x : c.value("mlp_only_layers", json::array()))
      if (x.get<int64_t>() == l) return false;
    return ival(c, "num_experts", 0) > 0 && (l + 1) % ival(c, "decoder_sparse_step", 1) == 0;
  }
  if (f == "deepseek_v2" || f == "deepseek_v3")
    return l >= ival(c, "first_k_dense_replace", 0) && l % ival(c, "moe_layer_freq", 1) == 0;
  return false;
}

std::vector<Entry> layout(const std::string& f, const json& c, DType fd) {
  std::vector<Entry> out;
  auto add = [&](const std::string& n, Shape s, DType t) { out.push_back({n, std::move(s), t}); };
  const int64_t H = ival(c, "hidden_size", 0), V = ival(c, "vocab_size", 0), L = ival(c, "num_hidden_layers", 0);
  const int64_t heads = ival(c, "num_attention_heads", 0), kv = ival(c, "num_key_value_heads", heads);
  const int64_t hd = ival(c, "head_dim", H / heads);
  const bool deepseek = f == "deepseek_v2" || f == "deepseek_v3";
  const bool mixtral_names = f == "mixtral" || f == "phimoe";
  const std::string ecount = mixtral_names || f == "granitemoe" ? "num_local_experts"
                             : deepseek                         ? "n_routed_experts"
                                                                : "num_experts";
  const std::string ewidth = (f == "qwen2_moe" || f == "qwen3_moe" || deepseek) ? "moe_intermediate_size"
                                                                                 : "intermediate_size";
  const int64_t E = ival(c, ecount.c_str(), 0), I = ival(c, ewidth.c_str(), 0);
  const int64_t dense = ival(c, "intermediate_size", 0);

  add("model.embed_tokens.weight", {V, H}, fd);
  // deepseek_v3: the multi-token-prediction layers follow the decoder layers (model.layers.{L+m}.):
  // their own tensors (enorm, hnorm, eh_proj [H, 2H], shared_head.norm) and a full decoder block.
  const int64_t mtp = f == "deepseek_v3" ? ival(c, "num_nextn_predict_layers", 0) : 0;
  for (int64_t l = 0; l < L + mtp; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    if (l >= L) {
      add(p + "enorm.weight", {H}, fd);
      add(p + "hnorm.weight", {H}, fd);
      add(p + "eh_proj.weight", {H, 2 * H}, fd);
      add(p + "shared_head.norm.weight", {H}, fd);
    }
    if (deepseek) {
      const int64_t nope = ival(c, "qk_nope_head_dim", 0), rope = ival(c, "qk_rope_head_dim", 0);
      const int64_t vd = ival(c, "v_head_dim", 0), kvr = ival(c, "kv_lora_rank", 0);
      const int64_t qr = ival(c, "q_lora_rank", 0);
      if (qr == 0) {
        add(p + "self_attn.q_proj.weight", {heads * (nope + rope), H}, fd);
      } else {
        add(p + "self_attn.q_a_proj.weight", {qr, H}, fd);
        add(p + "self_attn.q_a_layernorm.weight", {qr}, fd);
        add(p + "self_attn.q_b_proj.weight", {heads * (nope + rope), qr}, fd);
      }
      add(p + "self_attn.kv_a_proj_with_mqa.weight", {kvr + rope, H}, fd);
      add(p + "self_attn.kv_a_layernorm.weight", {kvr}, fd);
      add(p + "self_attn.kv_b_proj.weight", {heads * (nope + vd), kvr}, fd);
      add(p + "self_attn.o_proj.weight", {H, heads * vd}, fd);
    } else {
      const bool qkv_bias = f == "qwen2" || f == "qwen2_moe";
      const bool all_bias = !qkv_bias && bval(c, "attention_bias", false);
      add(p + "self_attn.q_proj.weight", {heads * hd, H}, fd);
      if (qkv_bias || all_bias) add(p + "self_attn.q_proj.bias", {heads * hd}, fd);
      add(p + "self_attn.k_proj.weight", {kv * hd, H}, fd);
      if (qkv_bias || all_bias) add(p + "self_attn.k_proj.bias", {kv * hd}, fd);
      add(p + "self_attn.v_proj.weight", {kv * hd, H}, fd);
      if (qkv_bias || all_bias) add(p + "self_attn.v_proj.bias", {kv * hd}, fd);
      add(p + "self_attn.o_proj.weight", {H, heads * hd}, fd);
      if (all_bias) add(p + "self_attn.o_proj.bias", {H}, fd);
      if (f == "qwen3" || f == "qwen3_moe") {
        add(p + "self_attn.q_norm.weight", {hd}, fd);
        add(p + "self_attn.k_norm.weight", {hd}, fd);
      } else if (f == "olmoe") {
        add(p + "self_attn.q_norm.weight", {heads * hd}, fd);
        add(p + "self_attn.k_norm.weight", {kv * hd}, fd);
      }
    }
    add(p + "input_layernorm.weight", {H}, fd);
    if (f == "phimoe") add(p + "input_layernorm.bias", {H}, fd);
    add(p + "post_attention_layernorm.weight", {H}, fd);
    if (f == "phimoe") add(p + "post_attention_layernorm.bias", {H}, fd);

    if (moe_layer(f, c, l)) {
      if (f == "granitemoe") {
        add(p + "block_sparse_moe.router.layer.weight", {E, H}, fd);
        add(p + "block_sparse_moe.input_linear.weight", {E, 2 * I, H}, fd);
        add(p + "block_sparse_moe.output_linear.weight", {E, H, I}, fd);
      } else if (mixtral_names) {
        add(p + "block_sparse_moe.gate.weight", {E, H}, fd);
        for (int64_t e = 0; e < E; ++e) {
          const std::string q = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
          add(q + "w1.weight", {I, H}, fd);
          add(q + "w2.weight", {H, I}, fd);
          add(q + "w3.weight", {I, H}, fd);
        }
      } else {
        add(p + "mlp.gate.weight", {E, H}, fd);
        if (f == "deepseek_v3") add(p + "mlp.gate.e_score_correction_bias", {E}, DType::F32);
        for (int64_t e = 0; e < E; ++e) {
          const std::string q = p + "mlp.experts." + std::to_string(e) + ".";
          add(q + "gate_proj.weight", {I, H}, fd);
          add(q + "up_proj.weight", {I, H}, fd);
          add(q + "down_proj.weight", {H, I}, fd);
        }
        int64_t sw = 0;
        std::string sp;
        if (f == "qwen2_moe") {
          sw = ival(c, "shared_expert_intermediate_size", 0);
          sp = "mlp.shared_expert.";
        } else if (deepseek) {
          sw = ival(c, "n_shared_experts", 0) * I;
          sp = "mlp.shared_experts.";
        }
        if (sw > 0) {
          add(p + sp + "gate_proj.weight", {sw, H}, fd);
          add(p + sp + "up_proj.weight", {sw, H}, fd);
          add(p + sp + "down_proj.weight", {H, sw}, fd);
          if (f == "qwen2_moe") add(p + "mlp.shared_expert_gate.weight", {1, H}, fd);
        }
      }
    } else {
      add(p + "mlp.gate_proj.weight", {dense, H}, fd);
      add(p + "mlp.up_proj.weight", {dense, H}, fd);
      add(p + "mlp.down_proj.weight", {H, dense}, fd);
    }
  }
  add("model.norm.weight", {H}, fd);
  if (f == "phimoe") add("model.norm.bias", {H}, fd);
  if (!bval(c, "tie_word_embeddings", false)) {
    add("lm_head.weight", {V, H}, fd);
    if (f == "phimoe" && bval(c, "lm_head_bias", false)) add("lm_head.bias", {V}, fd);
  }
  return out;
}

void split_shards(const std::vector<SynthTensor>& ts, uint64_t max_bytes, std::vector<std::vector<size_t>>& groups) {
  uint64_t cur = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    const uint64_t n = ts[i].data.size();
    if (groups.empty() || (cur > 0 && cur + n > max_bytes)) {
      groups.emplace_back();
      cur = 0;
    }
    groups.back().push_back(i);
    cur += n;
  }
  if (groups.empty()) groups.emplace_back();
}

std::string shard_name(size_t i, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return buf;
}

void write_side_files(const fs::path& dir) {
  json tok = {{"version", "1.0"},
              {"truncation", nullptr},
              {"padding", nullptr},
              {"added_tokens", json::array({{{"id", 0}, {"content", "<unk>"}, {"special", true}},
                                            {{"id", 1}, {"content", "<s>"}, {"special", true}},
                                            {{"id", 2}, {"content", "</s>"}, {"special", true}}})},
              {"normalizer", nullptr},
              {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}}},
              {"model", {{"type", "BPE"}, {"vocab", {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {"a", 3}, {"b", 4}}},
                         {"merges", json::array()}}}};
  write_file(dir / "tokenizer.json", tok.dump(2) + "\n");
  write_file(dir / "tokenizer_config.json",
             json{{"bos_token", "<s>"}, {"eos_token", "</s>"}, {"model_max_length", 256}}.dump(2) + "\n");
  write_file(dir / "generation_config.json", json{{"bos_token_id", 1}, {"eos_token_id", 2}}.dump(2) + "\n");
}

}  // namespace

const std::vector<std::string>& synth_families() {
  static const std::vector<std::string> v = {"mixtral",     "qwen2_moe",   "qwen3_moe", "olmoe",
                                             "deepseek_v2", "deepseek_v3", "phimoe",    "granitemoe",
                                             "llama",       "mistral",     "qwen2",     "qwen3"};
  return v;
}

bool synth_is_moe(const std::string& f) {
  return f != "llama" && f != "mistral" && f != "qwen2" && f != "qwen3";
}

const SynthTensor* SynthCheckpoint::find(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

const SynthTensor& SynthCheckpoint::at(const std::string& name) const {
  const SynthTensor* t = find(name);
  if (!t) throw std::out_of_range("synthetic " + family + " has no tensor " + name);
  return *t;
}

std::vector<std::string> SynthCheckpoint::names() const {
  std::vector<std::string> v;
  for (const auto& t : tensors) v.push_back(t.name);
  return v;
}

SynthTensor synth_tensor(const std::string& name, DType dtype, const Shape& shape, uint64_t seed) {
  SynthTensor t;
  t.name = name;
  t.dtype = dtype;
  t.shape = shape;
  int64_t n = 1;
  for (auto d : shape) n *= d;
  uint64_t st = seed * 0x2545f4914f6cdd1dull ^ fnv1a(name);
  const bool norm = is_norm_name(name);
  t.data.reserve(static_cast<size_t>(n) * core::dtype_size(dtype));
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t r = splitmix64(st);
    const uint64_t sign = norm ? 0 : (r >> 63);
    switch (dtype) {
      case DType::BF16: {  // |x| in [2^-9, 2^-1) (norms: [1, 2))
        const uint64_t e = norm ? 127 : 118 + (r >> 40) % 8;
        put_le(t.data, (sign << 15) | (e << 7) | (r & 0x7f), 2);
        break;
      }
      case DType::F16: {
        const uint64_t e = norm ? 15 : 6 + (r >> 40) % 8;
        put_le(t.data, (sign << 15) | (e << 10) | (r & 0x3ff), 2);
        break;
      }
      case DType::F32: {
        const uint64_t e = norm ? 127 : 118 + (r >> 40) % 8;
        put_le(t.data, (sign << 31) | (e << 23) | (r & 0x7fffff), 4);
        break;
      }
      case DType::F64: {
        const uint64_t e = norm ? 1023 : 1014 + (r >> 56) % 8;
        put_le(t.data, (sign << 63) | (e << 52) | (r & 0xfffffffffffffull), 8);
        break;
      }
      case DType::F8_E4M3: {
        uint8_t b = static_cast<uint8_t>(r);
        if ((b & 0x7f) == 0x7f) b ^= 1;  // avoid NaN
        t.data.push_back(b);
        break;
      }
      case DType::F8_E5M2: {
        uint8_t b = static_cast<uint8_t>(r);
        if (((b >> 2) & 0x1f) == 0x1f) b ^= 0x04;  // avoid inf/NaN
        t.data.push_back(b);
        break;
      }
      case DType::BOOL: t.data.push_back(static_cast<uint8_t>(r & 1)); break;
      default: put_le(t.data, r, core::dtype_size(dtype)); break;
    }
  }
  return t;
}

SynthCheckpoint make_synth(const std::string& family, const SynthSpec& spec) {
  SynthCheckpoint ck;
  ck.family = family;
  ck.config = base_config(family, spec.layers);
  if (!spec.config_patch.is_null()) ck.config.merge_patch(spec.config_patch);
  for (const auto& e : layout(family, ck.config, spec.dtype)) {
    if (spec.drop.count(e.name)) continue;
    DType dt = e.dtype;
    if (auto it = spec.dtypes.find(e.name); it != spec.dtypes.end()) dt = it->second;
    Shape shape = e.shape;
    if (auto it = spec.reshape.find(e.name); it != spec.reshape.end()) shape = it->second;
    SynthTensor t = synth_tensor(e.name, dt, shape, spec.seed);
    if (auto it = spec.rename.find(e.name); it != spec.rename.end()) t.name = it->second;
    ck.tensors.push_back(std::move(t));
  }
  for (const auto& x : spec.extra) ck.tensors.push_back(x);
  if (!spec.config_edit.is_null()) ck.config.merge_patch(spec.config_edit);
  return ck;
}

void write_synth(const SynthCheckpoint& ck, const fs::path& dir, const WriteOptions& opts) {
  fs::create_directories(dir);
  write_file(dir / "config.json", ck.config.dump(2) + "\n");
  if (opts.tokenizer) write_side_files(dir);
  const uint64_t max_bytes = opts.max_shard_bytes ? opts.max_shard_bytes : std::numeric_limits<uint64_t>::max();
  if (opts.writer == Writer::Project) {
    std::vector<io::TensorSpec> plan;
    for (const auto& t : ck.tensors) plan.push_back({t.name, t.dtype, t.shape});
    io::CheckpointWriter w(io::Env::posix(), dir, std::move(plan), max_bytes);
    for (const auto& t : ck.tensors) w.write(t.name, 0, t.data.data(), t.data.size());
    w.finish();
    return;
  }
  std::vector<std::vector<size_t>> groups;
  split_shards(ck.tensors, max_bytes, groups);
  if (groups.size() == 1) {
    write_file(dir / "model.safetensors", safetensors_bytes(ck.tensors));
    return;
  }
  json wm = json::object();
  uint64_t total = 0;
  for (size_t s = 0; s < groups.size(); ++s) {
    std::vector<SynthTensor> part;
    for (size_t i : groups[s]) {
      part.push_back(ck.tensors[i]);
      wm[ck.tensors[i].name] = shard_name(s, groups.size());
      total += ck.tensors[i].data.size();
    }
    write_file(dir / shard_name(s, groups.size()), safetensors_bytes(part));
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", wm}};
  write_file(dir / "model.safetensors.index.json", index.dump(2) + "\n");
}

fs::path synth_to(const fs::path& dir, const std::string& family, const SynthSpec& spec, const WriteOptions& opts) {
  write_synth(make_synth(family, spec), dir, opts);
  return dir;
}

std::string raw_safetensors(const std::string& header, const std::string& data, bool pad) {
  std::string h = header;
  if (pad) h.append((8 - h.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + h + data;
}

json safetensors_header_json(const std::vector<SynthTensor>& tensors, const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const auto& t : tensors) {
    h[t.name] = {{"dtype", core::dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {off, off + t.data.size()}}};
    off += t.data.size();
  }
  return h;
}

std::string safetensors_bytes(const std::vector<SynthTensor>& tensors, const std::map<std::string, std::string>& metadata) {
  std::string data;
  for (const auto& t : tensors) data.append(reinterpret_cast<const char*>(t.data.data()), t.data.size());
  return raw_safetensors(safetensors_header_json(tensors, metadata).dump(), data);
}

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error("cannot write " + path.string());
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("write failed: " + path.string());
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TempDir::TempDir(const std::string& tag) {
  std::string tmpl = (fs::temp_directory_path() / (tag + "-XXXXXX")).string();
  if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed for " + tmpl);
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

std::vector<std::string> list_dir(const fs::path& dir) {
  std::vector<std::string> v;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) v.push_back(e.path().filename().string());
  std::sort(v.begin(), v.end());
  return v;
}

std::vector<std::string> temp_leftovers(const fs::path& dir) {
  std::vector<std::string> v;
  for (const auto& n : list_dir(dir))
    if (n.find("moe-tool-tmp") != std::string::npos) v.push_back(n);
  return v;
}

}  // namespace moe::test
