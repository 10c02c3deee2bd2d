#include "runtime/llama4.h"

#include <cmath>

#include "core/error.h"

namespace moe::runtime {

using core::Error;

namespace {

// A key that is true or false, or a number taken for its truth value (older llama4 configs give
// attn_temperature_tuning as an integer).
bool truth(const model::Config& c, const char* key, bool fallback) {
  if (!c.has(key)) return fallback;
  const auto& v = c.json().at(key);
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_number()) return v.get<double>() != 0;
  throw Error::corruption(c.where(key) + ": expected a boolean or a number, found " + v.dump());
}

void l2_norm_heads(MatrixRM& x, int64_t d, double eps) {
  const int64_t heads = x.cols() / d;
  for (int64_t n = 0; n < x.rows(); ++n)
    for (int64_t h = 0; h < heads; ++h) {
      float* p = x.data() + n * x.cols() + h * d;
      double ss = 0;
      for (int64_t i = 0; i < d; ++i) ss += double(p[i]) * double(p[i]);
      const float r = static_cast<float>(1.0 / std::sqrt(ss / double(d) + eps));
      for (int64_t i = 0; i < d; ++i) p[i] *= r;
    }
}

}  // namespace

std::vector<AttnSpec> llama4_layer_attention(const model::Config& c, const AttnSpec& base, int64_t layers) {
  std::vector<int64_t> rope = c.get_int_list_or("no_rope_layers", {});
  if (rope.empty()) {  // `self.no_rope_layers if self.no_rope_layers else default_no_rope_layers`
    const int64_t every = c.get_int_or("no_rope_layer_interval", 4, false);
    for (int64_t l = 0; l < layers; ++l) rope.push_back((l + 1) % every != 0);
  }
  if (static_cast<int64_t>(rope.size()) < layers)
    throw Error::corruption(c.where("no_rope_layers") + ": " + std::to_string(rope.size()) + " entries for " +
                            std::to_string(layers) + " layers (num_hidden_layers)");
  const nlohmann::json* types = c.has("layer_types") ? &c.json().at("layer_types") : nullptr;
  if (types && (!types->is_array() || static_cast<int64_t>(types->size()) < layers))
    throw Error::corruption(c.where("layer_types") + ": expected a list of " + std::to_string(layers) +
                            " entries (num_hidden_layers), found " + types->dump().substr(0, 80));
  const bool qk_norm = truth(c, "use_qk_norm", true), tuning = truth(c, "attn_temperature_tuning", true);
  const double floor_scale = c.get_double_or("floor_scale", 8192), attn_scale = c.get_double_or("attn_scale", 0.1);
  if (tuning && !(floor_scale > 0))
    throw Error::corruption(c.where("floor_scale") + ": expected a positive number, found " + c.json().at("floor_scale").dump());
  std::vector<AttnSpec> out;
  for (int64_t l = 0; l < layers; ++l) {
    AttnSpec a = base;
    a.rope_interleaved = true;
    a.use_rope = rope[static_cast<size_t>(l)] != 0;
    a.l2_qk_norm = qk_norm && a.use_rope;
    if (tuning && !a.use_rope) a.floor_scale = floor_scale, a.attn_scale = attn_scale;
    std::string t = a.use_rope ? "chunked_attention" : "full_attention";
    if (types) {
      const auto& v = (*types)[static_cast<size_t>(l)];
      if (!v.is_string() || (v != "chunked_attention" && v != "full_attention"))
        throw Error::corruption(c.where("layer_types") + "[" + std::to_string(l) +
                                "]: expected \"chunked_attention\" or \"full_attention\", found " + v.dump());
      t = v.get<std::string>();
    }
    if (t == "chunked_attention") {
      if (c.json().contains("attention_chunk_size") && c.json().at("attention_chunk_size").is_null())
        throw Error::unsupported(c.where("attention_chunk_size") + ": null with chunked_attention layers (layer " +
                                 std::to_string(l) + "): llama4_text chunked attention needs a chunk size");
      a.chunk = c.get_int_or("attention_chunk_size", 8192, false);
    }
    out.push_back(a);
  }
  return out;
}

void llama4_qk_after_rope(const AttnSpec& spec, MatrixRM& q, MatrixRM& k, int64_t T) {
  if (spec.l2_qk_norm && spec.use_rope) {
    l2_norm_heads(q, spec.head_dim, spec.eps);
    l2_norm_heads(k, spec.head_dim, spec.eps);
  }
  if (spec.floor_scale > 0 && !spec.use_rope)
    for (int64_t n = 0; n < q.rows(); ++n) {
      const double pos = double(n % T);
      q.row(n) *= static_cast<float>(std::log1p(std::floor((pos + 1.0) / spec.floor_scale)) * spec.attn_scale + 1.0);
    }
}

}  // namespace moe::runtime
