#include "model/hybrid_layers.h"

#include "core/error.h"
#include "io/checkpoint.h"
#include "model/model.h"

namespace moe::model {

using core::Error;

std::vector<bool> linear_attention_layers(const Config& c, int64_t layers) {
  std::vector<bool> out(static_cast<size_t>(layers));
  if (c.has("layer_types")) {
    const nlohmann::json& types = c.json().at("layer_types");
    if (!types.is_array() || static_cast<int64_t>(types.size()) != layers)
      throw Error::corruption(c.where("layer_types") + ": expected a list of " + std::to_string(layers) +
                              " entries (num_hidden_layers), found " + types.dump().substr(0, 80));
    for (int64_t l = 0; l < layers; ++l) {
      const auto& v = types[static_cast<size_t>(l)];
      if (!v.is_string() || (v != "linear_attention" && v != "full_attention"))
        throw Error::corruption(c.where("layer_types") + "[" + std::to_string(l) +
                                "]: expected \"linear_attention\" or \"full_attention\", found " + v.dump());
      out[static_cast<size_t>(l)] = v == "linear_attention";
    }
    return out;
  }
  const int64_t interval = c.get_int_or("full_attention_interval", 4);
  if (interval < 1)
    throw Error::corruption(c.where("full_attention_interval") + ": expected a positive integer, found " +
                            std::to_string(interval));
  for (int64_t l = 0; l < layers; ++l) out[static_cast<size_t>(l)] = (l + 1) % interval != 0;
  return out;
}

DeltaNetDims delta_net_dims(const Config& c) {
  DeltaNetDims d;
  d.k_heads = c.get_int_or("linear_num_key_heads", d.k_heads);
  d.v_heads = c.get_int_or("linear_num_value_heads", d.v_heads);
  d.k_dim = c.get_int_or("linear_key_head_dim", d.k_dim);
  d.v_dim = c.get_int_or("linear_value_head_dim", d.v_dim);
  d.conv_kernel = c.get_int_or("linear_conv_kernel_dim", d.conv_kernel);
  for (const auto& [key, v] : {std::pair{"linear_num_key_heads", d.k_heads}, {"linear_num_value_heads", d.v_heads},
                               {"linear_key_head_dim", d.k_dim}, {"linear_value_head_dim", d.v_dim},
                               {"linear_conv_kernel_dim", d.conv_kernel}})
    if (v < 1) throw Error::corruption(c.where(key) + ": expected a positive integer, found " + std::to_string(v));
  if (d.v_heads % d.k_heads != 0)
    throw Error::corruption(c.where("linear_num_value_heads") + " " + std::to_string(d.v_heads) +
                            " is not a multiple of linear_num_key_heads " + std::to_string(d.k_heads));
  return d;
}

const std::vector<std::string>& linear_attention_roles() {
  static const std::vector<std::string> r = {"in_proj_qkvz", "in_proj_ba", "conv1d",  "dt_bias",
                                             "A_log",        "linear_norm", "out_proj"};
  return r;
}

const std::vector<std::string>& full_attention_roles() {
  static const std::vector<std::string> r = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"};
  return r;
}

void check_hybrid_layer(const io::Checkpoint& ckpt, const FamilyDesc& f, const Config& c, const Dims& d,
                        const Layer& layer, bool linear) {
  const std::string prefix = expand(f.layer_prefix, layer.index);
  auto name_of = [&](const std::string& role) {
    for (const auto& r : f.layer_roles)
      if (r.role == role) return prefix + r.name;
    return prefix + role;
  };
  const std::string kind = linear ? "linear_attention" : "full_attention";
  std::vector<std::string> own = linear ? linear_attention_roles() : full_attention_roles();
  std::vector<std::string> other = linear ? full_attention_roles() : linear_attention_roles();
  // q/k/v/o biases (q_bias [heads * 2 * head_dim]) on full-attention layers iff attention_bias.
  for (const char* b : {"q_bias", "k_bias", "v_bias", "o_bias"})
    (!linear && c.get_bool_or("attention_bias", false) ? own : other).push_back(b);
  for (const auto& role : own)
    if (!layer.find(role))
      throw Error::corruption(ckpt.dir().string() + ": tensor " + name_of(role) + ": missing (layer " +
                              std::to_string(layer.index) + " is " + kind + ")");
  for (const auto& role : other)
    if (layer.find(role))
      throw Error::corruption(ckpt.shard_path(name_of(role)).string() + ": tensor " + name_of(role) +
                              ": not expected (layer " + std::to_string(layer.index) + " is " + kind + ")");
  if (!linear) return;  // attention shapes: the loader's standard checks
  const DeltaNetDims n = delta_net_dims(c);
  const int64_t H = d.hidden;
  const std::pair<const char*, core::Shape> shapes[] = {
      {"in_proj_qkvz", {2 * n.key_dim() + 2 * n.value_dim(), H}},
      {"in_proj_ba", {2 * n.v_heads, H}},
      {"conv1d", {n.conv_dim(), 1, n.conv_kernel}},
      {"dt_bias", {n.v_heads}},
      {"A_log", {n.v_heads}},
      {"linear_norm", {n.v_dim}},
      {"out_proj", {H, n.value_dim()}},
  };
  for (const auto& [role, shape] : shapes) {
    const core::Tensor& t = *layer.find(role);
    if (t.shape() != shape)
      throw Error::corruption(ckpt.shard_path(name_of(role)).string() + ": tensor " + name_of(role) + ": shape " +
                              core::shape_str(t.shape()) + " but config (hidden_size, linear_* keys) implies " +
                              core::shape_str(shape));
  }
}

}  // namespace moe::model
