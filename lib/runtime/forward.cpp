#include "runtime/forward.h"

#include "runtime/finite.h"
#include "runtime/llama4.h"

#include <algorithm>
#include <cmath>
#include <optional>

#include "core/error.h"
#include "model/hybrid_layers.h"
#include "runtime/moe_block.h"
#include "runtime/mpi.h"
#include "runtime/parallel.h"
#include "runtime/profile.h"

namespace moe::runtime {

using core::Error;

namespace {

// The families whose forward applies yarn RoPE.
std::string yarn_families() {
  std::string s;
  for (const auto& f : model::all_families())
    if (f.forward && (f.attention == model::AttentionKind::MLA || f.yarn_rope)) s += (s.empty() ? "" : ", ") + f.model_type;
  return s;
}

// One RoPE description: the v4 `rope_scaling` object, or the v5 `rope_parameters` object (the
// same fields plus rope_theta). Both spellings are read with the same rules.
// yarn is applied for the families that use it (`yarn`: the Multi-head Latent Attention families
// and gpt_oss). `j` is the object (the config's, or the family's default when the config has none).
RopeScaling parse_rope_object(const model::Config& c, const std::string& key, const nlohmann::json& j, bool yarn,
                              bool longrope) {
  RopeScaling s;
  if (!j.is_object()) throw Error::corruption(c.where(key) + ": expected an object or null, found " + j.dump());
  for (const char* per_layer : {"full_attention", "sliding_attention"})
    if (j.contains(per_layer))
      throw Error::unsupported(c.where(key) + "." + per_layer +
                               ": RoPE parameters per attention type are not implemented by the forward");
  auto str = [&](const char* k) -> std::optional<std::string> {
    if (!j.contains(k) || j.at(k).is_null()) return std::nullopt;
    if (!j.at(k).is_string()) throw Error::corruption(c.where(key) + "." + k + ": expected a string, found " + j.at(k).dump());
    return j.at(k).get<std::string>();
  };
  const std::string type = str("rope_type").value_or(str("type").value_or("default"));
  s.type = type;
  auto num = [&](const char* k, double fallback) {
    if (!j.contains(k) || j.at(k).is_null()) return fallback;
    if (!j.at(k).is_number()) throw Error::corruption(c.where(key) + "." + k + ": expected a number, found " + j.at(k).dump());
    return j.at(k).get<double>();
  };
  s.factor = num("factor", 1.0);
  if (type == "default") return s;
  if (type == "linear" || type == "dynamic") {
    s.original_max_positions = static_cast<int64_t>(num("original_max_position_embeddings", 0));
    return s;
  }
  if (type == "yarn" && !yarn)
    throw Error::unsupported(c.where(key) + ".rope_type 'yarn' not implemented by the forward for " +
                             c.get_string_or("model_type", "?") + " (yarn: " + yarn_families() + ")");
  if (type == "yarn") {
    s.original_max_positions = static_cast<int64_t>(num("original_max_position_embeddings", 0));
    // `or 32` / `or 1` in transformers: a null or 0 takes the default.
    if (num("beta_fast", 0) != 0) s.beta_fast = num("beta_fast", 0);
    if (num("beta_slow", 0) != 0) s.beta_slow = num("beta_slow", 0);
    s.mscale = num("mscale", 0);
    s.mscale_all_dim = num("mscale_all_dim", 0);
    if (j.contains("attention_factor") && !j.at("attention_factor").is_null()) s.attention_factor = num("attention_factor", 1.0);
    if (j.contains("truncate") && !j.at("truncate").is_null()) {
      if (!j.at("truncate").is_boolean())
        throw Error::corruption(c.where(key) + ".truncate: expected a boolean, found " + j.at("truncate").dump());
      s.truncate = j.at("truncate").get<bool>();
    }
    return s;
  }
  if (type == "longrope" && longrope) {
    // v5 standardisation: original_max_position_embeddings from the object, else the top level,
    // else max_position_embeddings (0 here: the forward's max_positions).
    s.original_max_positions = static_cast<int64_t>(num("original_max_position_embeddings", 0));
    if (s.original_max_positions == 0) s.original_max_positions = c.get_int_or("original_max_position_embeddings", 0);
    auto factors = [&](const char* k) {
      if (!j.contains(k) || !j.at(k).is_array() || j.at(k).empty())
        throw Error::corruption(c.where(key) + "." + k + ": expected a list of numbers (longrope), found " +
                                (j.contains(k) ? j.at(k).dump() : std::string("nothing")));
      std::vector<double> v;
      for (const auto& x : j.at(k)) {
        if (!x.is_number() || !std::isfinite(x.get<double>()) || x.get<double>() <= 0)
          throw Error::corruption(c.where(key) + "." + k + ": expected positive numbers, found " + x.dump());
        v.push_back(x.get<double>());
      }
      return v;
    };
    s.short_factor = factors("short_factor");
    s.long_factor = factors("long_factor");
    for (auto [k, dst] : {std::pair{"short_mscale", &s.short_mscale}, {"long_mscale", &s.long_mscale}})
      if (j.contains(k) && !j.at(k).is_null()) *dst = num(k, 1.0);
    if (j.contains("attention_factor") && !j.at("attention_factor").is_null()) s.attention_factor = num("attention_factor", 1.0);
    return s;
  }
  if (type == "llama3") {
    s.low_freq_factor = num("low_freq_factor", 1.0);
    s.high_freq_factor = num("high_freq_factor", 4.0);
    s.original_max_positions = static_cast<int64_t>(num("original_max_position_embeddings", 8192));
    return s;
  }
  throw Error::unsupported(c.where(key) + ".rope_type '" + type +
                           "' not implemented by the forward (implemented: default, linear, dynamic, llama3; yarn for " +
                           yarn_families() + "; longrope for phimoe)");
}

// rope_theta: rope_parameters.rope_theta (transformers v5), else the top-level rope_theta (v4),
// else the family's default; both given and different is refused.
double read_rope_theta(const model::Config& c, const model::FamilyDesc& f) {
  std::optional<double> v5, v4;
  if (c.has("rope_parameters") && c.json().at("rope_parameters").is_object()) {
    const auto& j = c.json().at("rope_parameters");
    if (j.contains("rope_theta") && !j.at("rope_theta").is_null()) {
      if (!j.at("rope_theta").is_number() || j.at("rope_theta").get<double>() <= 0)
        throw Error::corruption(c.where("rope_parameters.rope_theta") + ": expected a positive number, found " +
                                j.at("rope_theta").dump());
      v5 = j.at("rope_theta").get<double>();
    }
  }
  if (c.has("rope_theta")) {
    v4 = c.get_double_or("rope_theta", f.default_rope_theta);
    if (*v4 <= 0) throw Error::corruption(c.where("rope_theta") + ": expected a positive number, found " + c.json().at("rope_theta").dump());
  }
  if (v5 && v4 && *v5 != *v4)
    throw Error::corruption(c.where("rope_parameters.rope_theta") + " " + c.json().at("rope_parameters").at("rope_theta").dump() +
                            " disagrees with rope_theta " + c.json().at("rope_theta").dump());
  return v5 ? *v5 : v4 ? *v4 : f.default_rope_theta;
}

// RoPE scaling from rope_scaling (v4) or rope_parameters (v5); both given with different
// scalings is refused.
// Neither given: the family's default (gpt_oss: yarn, as configuration_gpt_oss.py fills it in).
RopeScaling read_rope_scaling(const model::Config& c, const model::FamilyDesc& f) {
  const bool yarn = f.attention == model::AttentionKind::MLA || f.yarn_rope, longrope = f.longrope_rope;
  std::optional<RopeScaling> v4, v5;
  if (c.has("rope_scaling")) v4 = parse_rope_object(c, "rope_scaling", c.json().at("rope_scaling"), yarn, longrope);
  if (c.has("rope_parameters")) v5 = parse_rope_object(c, "rope_parameters", c.json().at("rope_parameters"), yarn, longrope);
  if (!v4 && !v5 && f.default_rope_parameters.is_object())
    return parse_rope_object(c, "rope_parameters (" + f.model_type + " default)", f.default_rope_parameters, yarn, longrope);
  if (v4 && v5 && (v4->type != v5->type || v4->factor != v5->factor))
    throw Error::corruption(c.where("rope_parameters") + " (rope_type '" + v5->type + "') disagrees with rope_scaling (type '" +
                            v4->type + "')");
  return v5 ? *v5 : v4 ? *v4 : RopeScaling{};
}

// partial_rotary_factor: rope_parameters.partial_rotary_factor (transformers v5), else the
// top-level key (v4), else the family's default (glm4_moe: 0.5, configuration_glm4_moe.py); both
// given and different is refused. A value outside (0, 1] is an error.
double read_partial_rotary_factor(const model::Config& c, const model::FamilyDesc& f) {
  auto number = [&](const nlohmann::json& j, const std::string& where) {
    if (!j.is_number() || j.get<double>() <= 0 || j.get<double>() > 1)
      throw Error::corruption(c.where(where) + ": expected a number in (0, 1], found " + j.dump());
    return j.get<double>();
  };
  std::optional<double> v5, v4;
  if (c.has("rope_parameters") && c.json().at("rope_parameters").is_object()) {
    const auto& j = c.json().at("rope_parameters");
    if (j.contains("partial_rotary_factor") && !j.at("partial_rotary_factor").is_null())
      v5 = number(j.at("partial_rotary_factor"), "rope_parameters.partial_rotary_factor");
  }
  if (c.has("partial_rotary_factor") && !c.json().at("partial_rotary_factor").is_null())
    v4 = number(c.json().at("partial_rotary_factor"), "partial_rotary_factor");
  if (v5 && v4 && *v5 != *v4)
    throw Error::corruption(c.where("rope_parameters.partial_rotary_factor") + " " +
                            c.json().at("rope_parameters").at("partial_rotary_factor").dump() +
                            " disagrees with partial_rotary_factor " + c.json().at("partial_rotary_factor").dump());
  return v5 ? *v5 : v4 ? *v4 : f.default_partial_rotary_factor;
}

// The rotated width of each head: int(head_dim * partial_rotary_factor) as transformers'
// compute_default_rope_parameters truncates it; it must be even and positive.
int64_t rotary_width(const model::Config& c, int64_t head_dim, double factor) {
  const auto w = static_cast<int64_t>(double(head_dim) * factor);
  if (w <= 0 || w % 2 != 0)
    throw Error::corruption(c.where("partial_rotary_factor") + " " + nlohmann::json(factor).dump() + " x head_dim " +
                            std::to_string(head_dim) + " gives a rotary width of " + std::to_string(w) +
                            " (expected a positive even number)");
  return w;
}

// Multi-head Latent Attention hyper-parameters (transformers' configuration_deepseek_v3.py /
// configuration_deepseek_v2.py keys). Sets s.attn.head_dim to qk_rope_head_dim (the RoPE width).
MlaSpec read_mla(const model::Model& m, ForwardSpec& s) {
  const auto& c = m.config();
  const auto& f = m.family();
  MlaSpec a;
  a.heads = m.dims().heads;
  auto positive = [&](const char* key) {
    const int64_t v = c.get_int(key);
    if (v <= 0) throw Error::corruption(c.where(key) + ": expected a positive integer, found " + std::to_string(v));
    return v;
  };
  a.q_lora_rank = c.has("q_lora_rank") && !c.json().at("q_lora_rank").is_null() ? positive("q_lora_rank") : 0;
  a.kv_lora_rank = positive("kv_lora_rank");
  a.qk_nope_head_dim = positive("qk_nope_head_dim");
  a.qk_rope_head_dim = positive("qk_rope_head_dim");
  a.v_head_dim = positive("v_head_dim");
  if (a.qk_rope_head_dim % 2 != 0)
    throw Error::corruption(c.where("qk_rope_head_dim") + ": expected an even number, found " + std::to_string(a.qk_rope_head_dim));
  if (m.dims().kv_heads != a.heads)
    throw Error::unsupported(c.where("num_key_value_heads") + " " + std::to_string(m.dims().kv_heads) +
                             " != num_attention_heads " + std::to_string(a.heads) + ": grouped keys are not part of " +
                             "Multi-head Latent Attention as transformers defines it");
  if (c.get_bool_or("attention_bias", false))
    throw Error::unsupported(c.where("attention_bias") + " with " + f.model_type + " not implemented by the forward");
  // v2 rotates pairs (2i, 2i+1) as complex numbers; v3 does the same when rope_interleave (its
  // default) and rotate-half otherwise.
  a.interleaved = f.routing == model::Routing::DeepSeekV2 || c.get_bool_or("rope_interleave", true);
  a.scale = 1.0 / std::sqrt(double(a.qk_head_dim()));
  // DeepseekV3Attention: scaling *= get_mscale(factor, mscale_all_dim)^2 when rope_scaling sets
  // mscale_all_dim (DeepSeek's own V2 code does the same).
  if (s.rope_scaling.type == "yarn" && s.rope_scaling.mscale_all_dim != 0) {
    const double ms = yarn_mscale(s.rope_scaling.factor, s.rope_scaling.mscale_all_dim);
    a.scale *= ms * ms;
  }
  s.attn.head_dim = a.qk_rope_head_dim;
  return a;
}

// gpt_oss: each layer's sliding window from layer_types (configuration_gpt_oss.py: absent or null,
// sliding_attention for even layers and full_attention for odd ones) and sliding_window (absent:
// the family's default; null: none). 0 for a full-attention layer.
std::vector<int64_t> read_layer_windows(const model::Config& c, const model::FamilyDesc& f, int64_t layers) {
  const int64_t window = c.json().contains("sliding_window") ? c.get_int_or("sliding_window", 0) : f.default_sliding_window;
  std::vector<int64_t> out(static_cast<size_t>(layers));
  const nlohmann::json* types = c.has("layer_types") ? &c.json().at("layer_types") : nullptr;
  if (types && (!types->is_array() || static_cast<int64_t>(types->size()) != layers))
    throw Error::corruption(c.where("layer_types") + ": expected a list of " + std::to_string(layers) +
                            " entries (num_hidden_layers), found " + types->dump().substr(0, 80));
  for (int64_t l = 0; l < layers; ++l) {
    std::string t = (l + 1) % 2 ? "sliding_attention" : "full_attention";
    if (types) {
      const auto& v = (*types)[static_cast<size_t>(l)];
      if (!v.is_string() || (v != "sliding_attention" && v != "full_attention"))
        throw Error::corruption(c.where("layer_types") + "[" + std::to_string(l) +
                                "]: expected \"sliding_attention\" or \"full_attention\", found " + v.dump());
      t = v.get<std::string>();
    }
    out[static_cast<size_t>(l)] = t == "sliding_attention" ? window : 0;
  }
  return out;
}

// granitemoe's scalar multipliers (configuration_granitemoe.py: a key left out or null is 1.0):
// finite and non-zero. GraniteMoeAttention ropes every layer (a position_embedding_type other than
// "rope" is refused).
void read_scalar_multipliers(const model::Model& m, ForwardSpec& s) {
  const auto& c = m.config();
  auto multiplier = [&](const char* key) {
    const double v = c.get_double_or(key, 1.0);
    if (!std::isfinite(v) || v == 0)
      throw Error::corruption(c.where(key) + ": expected a finite non-zero number, found " + c.json().at(key).dump());
    return v;
  };
  s.embedding_multiplier = multiplier("embedding_multiplier");
  s.attn.scale = multiplier("attention_multiplier");
  s.residual_multiplier = multiplier("residual_multiplier");
  s.logits_scaling = multiplier("logits_scaling");
  const std::string pe = c.get_string_or("position_embedding_type", "rope");
  if (pe != "rope")
    throw Error::unsupported(c.where("position_embedding_type") + " '" + pe + "' not implemented by the forward (rope only)");
}

// RMSNorm, or (phimoe) LayerNorm with bias `b`, into Y.
void timed_norm(const ForwardSpec& s, const MatrixRM& X, const RowVector& w, const std::optional<RowVector>& b,
                MatrixRM& Y) {
  const PhaseScope timed(Phase::Norms);
  if (!s.layer_norm) return rms_norm_into(X.data(), X.rows(), X.cols(), X.cols(), w, s.eps, Y);
  if (!b) throw Error::internal("LayerNorm without its bias");
  layer_norm_into(X, w, *b, s.eps, Y);
}

// X += m * out (granitemoe's residual_multiplier; m == 1 for the other families).
void add_residual(MatrixRM& X, const MatrixRM& out, double m) {
  const PhaseScope timed(Phase::Residual);
  parallel_rows(X.rows(), 64, [&](int64_t r0, int64_t r1) {
    if (m == 1.0)
      X.middleRows(r0, r1 - r0) += out.middleRows(r0, r1 - r0);
    else
      X.middleRows(r0, r1 - r0) += static_cast<float>(m) * out.middleRows(r0, r1 - r0);
  });
}

}  // namespace

ForwardSpec ForwardSpec::from_model(const model::Model& m) {
  const auto& f = m.family();
  const auto& c = m.config();
  if (!f.forward)
    throw Error::unsupported("forward not implemented for " + f.model_type + " (implemented: " +
                             model::family_list(&model::FamilyDesc::forward) + ")");
  ForwardSpec s;
  s.family = f.model_type;
  const auto& d = m.dims();
  s.layers = d.layers;  // the decoder layers (an adopted multi-token-prediction layer follows them: runtime/mtp.h)
  s.hidden = d.hidden;
  s.vocab = m.globals().at("embed").dim(0);
  s.max_positions = c.get_int_or("max_position_embeddings", 0);
  s.eps = c.get_double_or("rms_norm_eps", f.default_rms_norm_eps);
  if (!(s.eps > 0) || !std::isfinite(s.eps))
    throw Error::corruption(c.where("rms_norm_eps") + ": expected a finite number > 0, found " + c.json().at("rms_norm_eps").dump());
  s.rope_theta = read_rope_theta(c, f);
  const std::string act = c.get_string_or("hidden_act", "silu");
  if (act != "silu" && act != "swish")
    throw Error::unsupported(c.where("hidden_act") + " '" + act + "' not implemented by the forward (silu only)");
  if (c.get_bool_or("mlp_bias", false))
    throw Error::unsupported(c.where("mlp_bias") + " not implemented by the forward");
  const double prf = read_partial_rotary_factor(c, f);
  if (prf != 1.0 && !f.partial_rotary)
    throw Error::unsupported(c.where("partial_rotary_factor") + " != 1 not implemented by the forward for " + f.model_type +
                             " (implemented: " + model::family_list(&model::FamilyDesc::partial_rotary) + ")");
  s.rope_scaling = read_rope_scaling(c, f);
  s.attn.heads = d.heads;
  s.attn.kv_heads = d.kv_heads;
  s.attn.head_dim = d.head_dim;
  s.attn.eps = s.eps;
  s.attn.qk_norm = f.qk_norm;
  // glm4_moe: q_norm/k_norm exist only when use_qk_norm is true (Glm4MoeAttention.__init__).
  if (!f.qk_norm_key.empty() && !c.get_bool_or(f.qk_norm_key, false)) s.attn.qk_norm = model::QKNorm::None;
  if (prf != 1.0) s.attn.rotary_dim = rotary_width(c, d.head_dim, prf);
  if (f.model_type == "olmoe" && c.has("clip_qkv")) s.attn.clip_qkv = static_cast<float>(c.get_double_or("clip_qkv", 0));
  if (f.model_type == "mistral" || f.model_type == "mixtral" || f.model_type == "phimoe") {
    // Absent: the family's default (mistral 4096); null: no window. phimoe's mask
    // (_prepare_4d_causal_attention_mask_with_cache_position) is mistral's.
    s.attn.sliding_window = c.json().contains("sliding_window") ? c.get_int_or("sliding_window", 0) : f.default_sliding_window;
  } else if (f.per_layer_types) {
    s.layer_window = read_layer_windows(c, f, s.layers);
    s.attn.sinks = f.attention_sinks;
  } else if (c.get_bool_or("use_sliding_window", false) && c.has("sliding_window")) {
    throw Error::unsupported(c.where("use_sliding_window") + " with " + f.model_type +
                             " (per-layer sliding windows) not implemented by the forward");
  }
  if (d.heads <= 0 || d.kv_heads <= 0 || d.heads % d.kv_heads != 0)
    throw Error::corruption(c.where("num_attention_heads") + " must be a multiple of num_key_value_heads");
  if (f.attention == model::AttentionKind::MLA) s.mla = read_mla(m, s);
  if (f.scalar_multipliers) read_scalar_multipliers(m, s);
  if (f.head_dim_from_hidden && d.head_dim * d.heads != d.hidden)
    throw Error::corruption(c.where("head_dim") + " " + std::to_string(d.head_dim) + ": " + f.model_type +
                            " uses hidden_size / num_attention_heads (" + std::to_string(d.hidden) + " / " +
                            std::to_string(d.heads) + ")");
  s.layer_norm = f.layer_norm;
  s.attn.rope_interleaved = f.rope_interleaved;
  // PhimoeRotaryEmbedding multiplies cos/sin by the config's short_mscale / long_mscale whenever
  // rope_scaling is set: implemented with longrope (Phi-3.5-MoE's), refused with the other scalings.
  if (f.model_type == "phimoe" && s.rope_scaling.type != "default" && s.rope_scaling.type != "longrope")
    throw Error::unsupported(c.where("rope_scaling") + " '" + s.rope_scaling.type + "' with phimoe not implemented by " +
                             "the forward (its short_mscale / long_mscale scaling of cos and sin; longrope is)");
  if (s.rope_scaling.type == "longrope")
    for (const auto* v : {&s.rope_scaling.short_factor, &s.rope_scaling.long_factor})
      if (static_cast<int64_t>(v->size()) != s.attn.rope_dim() / 2)
        throw Error::corruption(c.where(std::string("rope_scaling.") + (v == &s.rope_scaling.short_factor ? "short" : "long") +
                                        "_factor") + ": " + std::to_string(v->size()) + " values, but the rotary dimension " +
                                std::to_string(s.attn.rope_dim()) + " has " + std::to_string(s.attn.rope_dim() / 2) + " frequencies");
  if (f.hybrid_linear_attention) {
    s.zero_centred_norm = f.zero_centred_norm;
    s.linear_layers = model::linear_attention_layers(c, s.layers);
    s.delta_net = DeltaNetSpec{model::delta_net_dims(c), s.eps};
    s.attn.output_gate = true;
  }
  s.routing = RoutingRule::from_model(m);
  if (f.llama4_attention) s.layer_specs = llama4_layer_attention(c, s.attn, s.layers);
  return s;
}

Forward::Forward(const model::Model& m) : model_(m), spec_(ForwardSpec::from_model(m)) {
  // A global vector, a non-finite value named by the tensor (its family name).
  auto global_row = [&m](const std::string& role) {
    std::string name = role;
    for (const auto& g : m.family().globals)
      if (g.role == role) name = g.name;
    return core::with_context(name, [&] { return to_row(m.globals().at(role)); });
  };
  final_norm_w_ = global_row("final_norm");
  if (m.globals().count("final_norm_bias")) final_norm_b_ = global_row("final_norm_bias");
  if (m.globals().count("lm_head_bias")) lm_head_b_ = global_row("lm_head_bias");
  if (spec_.zero_centred_norm) final_norm_w_.array() += 1.0f;
}

const RopeTable& Forward::rope(int64_t T) const {
  if (rope_.T != T)
    rope_ = RopeTable::make(T, spec_.attn.rope_dim(), spec_.rope_theta, spec_.rope_scaling, spec_.max_positions);
  return rope_;
}

MatrixRM Forward::embed(std::span<const int32_t> tokens) const {
  const PhaseScope timed(Phase::Embed);
  const core::Tensor& E = model_.globals().at("embed");
  const int64_t V = E.dim(0), H = E.dim(1);
  MatrixRM X(static_cast<int64_t>(tokens.size()), H);
  for (size_t n = 0; n < tokens.size(); ++n) {
    const int32_t id = tokens[n];
    if (id < 0 || id >= V)
      throw Error::invalid("token id " + std::to_string(id) + " outside the embedding (vocab " + std::to_string(V) + ")");
    E.slice0(id, id + 1).to_f32(X.data() + n * H);
    core::with_context("embedding row " + std::to_string(id), [&] { check_finite(X.data() + n * H, H, 0, E); });
  }
  if (spec_.embedding_multiplier != 1.0) X *= static_cast<float>(spec_.embedding_multiplier);
  return X;
}

LayerWeights Forward::load_layer(int l) const {
  LayerWeights w;
  load_layer_into(l, w);
  return w;
}

void Forward::load_layer_into(int l, LayerWeights& w) const { load_layer_into(l, w, stream_experts_); }

void Forward::load_layer_into(int l, LayerWeights& w, bool stream_experts) const {
  const PhaseScope timed(Phase::Dequantize);
  const model::Layer& layer = model_.layers().at(l);
  const auto& release = model_.page_releaser();
  // Split over MPI ranks, each rank converts (and checks) only the experts it owns: a bad weight
  // is met by its owner alone, and every rank stops with the owner's message (mpi::World::agree).
  mpi::World::get().run_agreed(split_experts_, [&] {
    naming_non_finite(model_, l, [&] { convert_layer_into(layer, w, /*factored=*/true, stream_experts, release, split_experts_); });
  });
  if (spec_.zero_centred_norm)  // x_normed * (1 + weight)
    for (RowVector* v : {&w.input_norm, &w.post_attn_norm}) v->array() += 1.0f;
  if (spec_.zero_centred_norm)
    for (auto* v : {&w.attn.q_norm, &w.attn.k_norm})
      if (*v) (*v)->array() += 1.0f;
  if (!release) return;
  auto hand_back = [&](const core::Tensor& t) { model_.release_pages(t); };
  if (!stream_experts || !layer.moe) {
    layer.for_each_tensor(hand_back);
    return;
  }
  // Streamed: the routed experts' pages are handed back as each is converted (MoeWeights::expert).
  for (const auto& [role, t] : layer.tensors) hand_back(t);
  hand_back(layer.moe->router);
  if (layer.moe->router_bias) hand_back(*layer.moe->router_bias);
  if (layer.moe->shared) layer.moe->shared->for_each_tensor(hand_back);
  if (layer.moe->shared_gate) hand_back(*layer.moe->shared_gate);
}

void Forward::apply_layer(const LayerWeights& w, MatrixRM& X, int64_t T, std::span<Observer* const> observers) const {
  const int l = w.index;
  bool want_attn = false, want_moe = false, want_mlp = false, want_routing = false;
  for (Observer* o : observers) {
    want_attn |= o->wants_attention_trace();
    want_moe |= o->wants_moe_trace();
    want_routing |= o->wants_routing();
    want_mlp |= o->wants_dense_mlp_trace();
  }
  for (Observer* o : observers) o->on_layer_input(l, X);

  {
    MatrixRM& xn = ws_.xn;
    timed_norm(spec_, X, w.input_norm, w.input_norm_bias, xn);
    AttnOutput& a = ws_.attn;
    if (w.delta_net)
      a = linear_attention(w, xn, T);
    else if (spec_.mla)
      core::with_context("layer " + std::to_string(l), [&] {
        const PhaseScope timed(Phase::AttnCore);
        mla_attention(*spec_.mla, w.attn, rope(T), xn, T, a, ws_.attn_ws);
      });
    else
      attention(spec_.layer_attn(l), w.attn, rope(T), xn, T, a, ws_.attn_ws);
    if (want_attn) {
      const AttnTrace t{xn, a.o_input, a.out, w.attn};
      for (Observer* o : observers)
        if (o->wants_attention_trace()) o->on_attention(l, t);
    }
    add_residual(X, a.out, spec_.residual_multiplier);
  }
  MatrixRM& x2 = ws_.x2;
  timed_norm(spec_, X, w.post_attn_norm, w.post_attn_norm_bias, x2);
  if (w.moe) {
    MoeDetail det;
    const std::vector<bool>* active =
        static_cast<size_t>(l) < active_.size() && !active_[static_cast<size_t>(l)].empty() ? &active_[static_cast<size_t>(l)] : nullptr;
    // Streamed experts are converted inside the block: a non-finite weight is named there.
    MatrixRM& out = ws_.moe_out;
    naming_non_finite(model_, l, [&] { moe_forward(*w.moe, spec_.routing, x2, out, ws_.moe, &det, want_moe, active, split_experts_); });
    if (want_routing)
      for (Observer* o : observers)
        if (o->wants_routing()) o->on_routing(l, det.logits, det.routing);
    if (want_moe) {
      const MoeTrace t{x2, det.logits, det.routing, det.tokens, det.h, det.y, det.shared_out, det.shared_gate, out,
                       *w.moe, spec_.routing.scales_input};
      for (Observer* o : observers)
        if (o->wants_moe_trace()) o->on_moe(l, t);
    }
    add_residual(X, out, spec_.residual_multiplier);
  } else if (w.mlp) {
    MatrixRM h;
    MatrixRM& out = ws_.mlp_out;
    {
      const PhaseScope timed(Phase::ExpertGemms);
      if (want_mlp)
        out = mlp_forward(*w.mlp, x2, &h);
      else
        mlp_forward_into(*w.mlp, x2, out);
    }
    if (want_mlp) {
      const DenseMlpTrace t{x2, h, out, *w.mlp};
      for (Observer* o : observers)
        if (o->wants_dense_mlp_trace()) o->on_dense_mlp(l, t);
    }
    add_residual(X, out, spec_.residual_multiplier);
  } else {
    throw Error::internal("layer " + std::to_string(l) + ": neither MoE block nor MLP");
  }
  for (Observer* o : observers) o->on_layer_output(l, X);
}

AttnOutput Forward::linear_attention(const LayerWeights& w, const MatrixRM& xn, int64_t T) const {
  if (!spec_.delta_net || spec_.linear_layers.empty() || !spec_.linear_layers.at(static_cast<size_t>(w.index)))
    throw Error::internal("layer " + std::to_string(w.index) + ": Gated DeltaNet weights on a layer that is not linear_attention");
  const PhaseScope timed(Phase::AttnCore);
  DeltaNetOutput d = gated_delta_net(*spec_.delta_net, *w.delta_net, xn, T);
  return AttnOutput{std::move(d.o_input), std::move(d.out)};
}

void Forward::run_layers(MatrixRM& X, int64_t T, std::span<Observer* const> observers) const {
  LayerWeights w;  // one layer resident; its buffers are reused by the next layer
  // Each layer is converted once and applied once: streaming its experts costs no extra conversion,
  // unless an observer reads the experts' weights from the MoE trace (the statistics do).
  bool trace = false;
  for (Observer* o : observers) trace |= o->wants_moe_trace();
  const bool stream = stream_experts_ || !trace;
  for (int l = 0; l < static_cast<int>(spec_.layers); ++l) {
    load_layer_into(l, w, stream);
    apply_layer(w, X, T, observers);
  }
}

MatrixRM Forward::final_norm(const MatrixRM& X) const {
  MatrixRM Y;
  timed_norm(spec_, X, final_norm_w_, final_norm_b_, Y);
  return Y;
}

MatrixRM Forward::lm_head(const MatrixRM& Xn) const {
  MatrixRM out;
  lm_head_into(Xn, out);
  return out;
}

void Forward::lm_head_into(const MatrixRM& Xn, MatrixRM& out) const {
  const auto& g = model_.globals();
  const core::Tensor& W = g.count("lm_head") ? g.at("lm_head") : g.at("embed");
  const int64_t V = W.dim(0), H = W.dim(1), N = Xn.rows();
  if (Xn.cols() != H) throw Error::internal("lm_head: width mismatch");
  const PhaseScope timed(Phase::LmHead);
  out.resize(N, V);
  const int64_t chunk = std::min<int64_t>(V, 4096);
  // logits / logits_scaling (granitemoe) as the GEMM's alpha; 1 for the other families.
  const float alpha = spec_.logits_scaling == 1.0 ? 1.0f : static_cast<float>(1.0 / spec_.logits_scaling);
  std::vector<float>& w = ws_.head_w;
  if (w.size() < static_cast<size_t>(chunk * H)) w.resize(static_cast<size_t>(chunk * H));
  for (int64_t r0 = 0; r0 < V; r0 += chunk) {
    const int64_t r1 = std::min(V, r0 + chunk);
    W.slice0(r0, r1).to_f32(w.data());
    core::with_context(std::string(g.count("lm_head") ? "lm_head" : "embedding (tied lm_head)") + " rows " +
                           std::to_string(r0) + ".." + std::to_string(r1 - 1),
                       [&] { check_finite(w.data(), (r1 - r0) * H, H, W); });
    gemm_nt(N, r1 - r0, H, alpha, Xn.data(), H, w.data(), H, 0.0f, out.data() + r0, V);
    if (lm_head_b_) out.middleCols(r0, r1 - r0).rowwise() += lm_head_b_->segment(r0, r1 - r0);
  }
}

MatrixRM Forward::run(std::span<const int32_t> tokens, int64_t T, std::span<Observer* const> observers) const {
  if (T <= 0 || tokens.size() % static_cast<size_t>(T) != 0)
    throw Error::internal("Forward::run: token count not a multiple of the window length");
  MatrixRM X = embed(tokens);
  run_layers(X, T, observers);
  return logits(X);
}

const MatrixRM& Forward::run_kept(std::span<const int32_t> tokens, int64_t T, std::span<Observer* const> observers) const {
  if (T <= 0 || tokens.size() % static_cast<size_t>(T) != 0)
    throw Error::internal("Forward::run_kept: token count not a multiple of the window length");
  MatrixRM X = embed(tokens);
  run_layers(X, T, observers);
  timed_norm(spec_, X, final_norm_w_, final_norm_b_, ws_.final_xn);
  lm_head_into(ws_.final_xn, ws_.logits);
  return ws_.logits;
}

}  // namespace moe::runtime
