// The target family's config.json (passes/upcycle/config.h).
#include "passes/upcycle/config.h"

namespace moe::passes::upcycling {

using nlohmann::json;

namespace {

const char* torch_dtype_name(core::DType t) {
  switch (t) {
    case core::DType::BF16: return "bfloat16";
    case core::DType::F16: return "float16";
    case core::DType::F32: return "float32";
    default: return nullptr;
  }
}

}  // namespace

json target_config(const Plan& p) {
  const auto& m = first(p);
  const json& s = m.config().json();
  const auto& sf = m.family();
  const std::string& to = p.o.to;
  json c = json::object();
  c["architectures"] = p.target->architectures;
  c["model_type"] = to;
  for (const char* k : {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                        "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                        "use_cache", "rope_theta", "rope_scaling", "attention_dropout", "tie_word_embeddings",
                        "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "sliding_window",
                        "use_sliding_window", "max_window_layers", "attention_bias", "transformers_version"})
    if (s.contains(k)) c[k] = s.at(k);
  // The target family's defaults differ (mixtral: rope_theta 1e6, eps 1e-5): write the source's.
  if (!c.contains("rope_theta") || c["rope_theta"].is_null()) c["rope_theta"] = sf.default_rope_theta;
  if (!c.contains("rms_norm_eps") || c["rms_norm_eps"].is_null()) c["rms_norm_eps"] = sf.default_rms_norm_eps;
  c["head_dim"] = m.dims().head_dim;
  if (!c.contains("num_key_value_heads")) c["num_key_value_heads"] = m.dims().kv_heads;
  c["tie_word_embeddings"] = m.tied_embeddings();
  if (p.o.dtype) c["torch_dtype"] = torch_dtype_name(*p.o.dtype);
  c["num_experts_per_tok"] = p.o.top_k;
  c["output_router_logits"] = false;
  c["router_aux_loss_coef"] = 0.001;  // transformers' default for all three families
  // The target's expert count and width keys (its family table entry).
  c[p.target->expert_count_key] = p.o.experts;
  c[p.target->expert_width_key] = p.width;
  if (to == "mixtral") {
    c["router_jitter_noise"] = 0.0;
    if (!c.contains("sliding_window")) c["sliding_window"] = nullptr;
    c.erase("use_sliding_window");
    c.erase("max_window_layers");
    c.erase("attention_bias");
  } else {
    c["intermediate_size"] = p.I;  // dense layers (none: decoder_sparse_step 1, mlp_only_layers [])
    c["decoder_sparse_step"] = 1;
    c["mlp_only_layers"] = json::array();
    c["norm_topk_prob"] = p.o.norm_topk_prob;
    if (!c.contains("use_sliding_window")) c["use_sliding_window"] = false;
    if (!c.contains("sliding_window")) c["sliding_window"] = nullptr;
    if (!c.contains("max_window_layers")) c["max_window_layers"] = p.L;
    if (to == "qwen2_moe") {
      c[p.target->shared_width_key] = p.o.shared_expert ? p.I : p.width;
      c.erase("attention_bias");
      c.erase("head_dim");
    } else {
      c["attention_bias"] = has_role(m, "q_bias");
    }
  }
  return c;
}

}  // namespace moe::passes::upcycling
