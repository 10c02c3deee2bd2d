#include "model/model.h"

#include <algorithm>
#include <set>

#include "core/error.h"

namespace moe::model {

using core::DType;
using core::Error;
using core::Shape;

bool is_moe_layer(const FamilyDesc& f, const Config& c, int layer) {
  if (!f.moe) return false;
  switch (f.moe_layers) {
    case MoeLayerRule::All: return true;
    case MoeLayerRule::SparseStep: {
      const auto only = c.get_int_list_or("mlp_only_layers", {});
      if (std::find(only.begin(), only.end(), layer) != only.end()) return false;
      const int64_t step = c.get_int_or("decoder_sparse_step", 1, false);
      return (layer + 1) % step == 0;
    }
    case MoeLayerRule::FirstKDense: {
      const int64_t first = c.get_int_or("first_k_dense_replace", 0);
      const int64_t freq = c.get_int_or("moe_layer_freq", 1, false);
      return layer >= first && layer % freq == 0;
    }
  }
  return true;
}

namespace {

// Collects tensors from the checkpoint, remembering which names were used.
// quantization_config {"quant_method": "fp8", "weight_block_size": [br, bc]}: the block size of
// the checkpoint's block-scaled FP8 weights, or nullopt when the config has no fp8 quantization.
std::optional<std::pair<int64_t, int64_t>> fp8_block_size(const Config& c) {
  const nlohmann::json& j = c.json();
  if (!j.contains("quantization_config") || !j.at("quantization_config").is_object()) return std::nullopt;
  const nlohmann::json& q = j.at("quantization_config");
  if (q.value("quant_method", "") != "fp8") return std::nullopt;
  const std::string where = c.source() + ": quantization_config";
  if (!q.contains("weight_block_size"))
    throw Error::unsupported(where + ": fp8 without weight_block_size (per-tensor FP8 scales) is not supported; only "
                             "block-scaled FP8 (weight_scale_inv) is");
  const nlohmann::json& b = q.at("weight_block_size");
  if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || !b[1].is_number_integer() ||
      b[0].get<int64_t>() < 1 || b[1].get<int64_t>() < 1)
    throw Error::corruption(where + ".weight_block_size: expected two positive integers, found " + b.dump());
  if (q.contains("fmt") && q.at("fmt") != "e4m3")
    throw Error::unsupported(where + ".fmt: " + q.at("fmt").dump() + " (only e4m3 block-scaled FP8 is read)");
  return std::make_pair(b[0].get<int64_t>(), b[1].get<int64_t>());
}

class Picker {
 public:
  Picker(const io::Checkpoint& c, std::optional<std::pair<int64_t, int64_t>> fp8) : ckpt_(c), fp8_(fp8) {}
  // The tensor `name`; a weight with a companion `name`_scale_inv comes with its block scale.
  std::optional<Tensor> get(const std::string& name, bool required, const std::string& why) {
    if (!ckpt_.has(name)) {
      if (required) throw Error::corruption(ckpt_.dir().string() + ": tensor " + name + ": missing (" + why + ")");
      return std::nullopt;
    }
    used_.insert(name);
    Tensor t = ckpt_.tensor(name);
    const std::string sname = name + "_scale_inv";
    if (ckpt_.has(sname)) {
      if (!fp8_)
        throw Error::corruption(ckpt_.shard_path(sname).string() + ": tensor " + sname +
                                ": a block scale, but config.json has no quantization_config with quant_method \"fp8\"");
      used_.insert(sname);
      try {
        t = t.with_block_scale(ckpt_.tensor(sname), fp8_->first, fp8_->second);
      } catch (const Error& e) {
        throw Error::corruption(ckpt_.shard_path(sname).string() + ": tensor " + sname + ": " + e.message() +
                                " (weight " + name + ")");
      }
    } else if (fp8_ && t.dtype() == DType::F8_E4M3) {
      throw Error::corruption(ckpt_.shard_path(name).string() + ": tensor " + name + ": F8_E4M3 weight without " +
                              sname + " (config.json quantization_config is block-scaled fp8)");
    }
    return t;
  }
  Tensor need(const std::string& name, const std::string& why) { return *get(name, true, why); }
  void expect(const std::string& name, const Tensor& t, const Shape& shape, const std::string& why) {
    if (t.shape() != shape)
      throw Error::corruption(ckpt_.shard_path(name).string() + ": tensor " + name + ": shape " +
                              core::shape_str(t.shape()) + " but " + why + " implies " + core::shape_str(shape));
  }
  bool used(const std::string& name) const { return used_.count(name) != 0; }

 private:
  const io::Checkpoint& ckpt_;
  std::optional<std::pair<int64_t, int64_t>> fp8_;
  std::set<std::string> used_;
};

std::string dims_text(const Dims& d) {
  return "config (hidden_size=" + std::to_string(d.hidden) + ", num_attention_heads=" + std::to_string(d.heads) +
         ", num_key_value_heads=" + std::to_string(d.kv_heads) + ", head_dim=" + std::to_string(d.head_dim) + ")";
}

bool is_float(DType t) { return core::dtype_info(t).is_float && t != DType::F8_E4M3 && t != DType::F8_E5M2; }

// The output of tensor `name`: in `dtype` when given and t is a float weight (a block-scaled FP8
// weight counts: it is dequantized), else as stored; a block-scaled weight kept as FP8 is
// followed by its `name`_scale_inv.
void push_out(std::vector<OutTensor>& out, const std::string& name, const Tensor& t, std::optional<DType> dtype) {
  OutTensor o;
  o.name = name;
  o.dtype = (dtype && (is_float(t.dtype()) || t.block_scale())) ? *dtype : t.dtype();
  o.shape = t.shape();
  o.make = [t] { return t; };
  o.sources = {name};
  const bool keep_scale = t.block_scale() && o.dtype == t.dtype();
  out.push_back(std::move(o));
  if (keep_scale) {
    const std::shared_ptr<const Tensor> sc = t.block_scale()->scale;
    out.push_back({name + "_scale_inv", sc->dtype(), sc->shape(), [sc] { return *sc; }, {name + "_scale_inv"}});
  }
}

}  // namespace

Model Model::load(const io::Checkpoint& ckpt) {
  Model m;
  m.config_ = Config(ckpt.config(), (ckpt.dir() / "config.json").string());
  const Config& c = m.config_;
  m.family_ = &family_for(c);
  const FamilyDesc& f = *m.family_;

  Dims& d = m.dims_;
  d.layers = c.get_int("num_hidden_layers");
  d.hidden = c.get_int("hidden_size");
  d.vocab = c.get_int("vocab_size");
  d.heads = c.get_int("num_attention_heads");
  d.kv_heads = c.get_int_or("num_key_value_heads", d.heads, false);
  if (d.heads % d.kv_heads != 0)
    throw Error::corruption(c.source() + ": num_key_value_heads: " + std::to_string(d.kv_heads) +
                            " does not divide num_attention_heads " + std::to_string(d.heads));
  d.head_dim = c.get_int_or("head_dim", f.default_head_dim);
  if (d.head_dim == 0) {
    if (d.hidden % d.heads != 0)
      throw Error::corruption(c.source() + ": hidden_size " + std::to_string(d.hidden) +
                              " is not a multiple of num_attention_heads " + std::to_string(d.heads));
    d.head_dim = d.hidden / d.heads;
  }
  if (f.moe) d.top_k = c.get_int(f.topk_key);
  int64_t n_experts = 0, width = 0;
  if (f.moe) {
    n_experts = c.get_int(f.expert_count_key);
    width = c.get_int(f.expert_width_key);
    if (d.top_k > n_experts)
      throw Error::corruption(c.source() + ": " + f.topk_key + ": " + std::to_string(d.top_k) + " exceeds " +
                              f.expert_count_key + " " + std::to_string(n_experts));
  }

  // The shards (shared with the tensors' views) outlive the Checkpoint object if need be.
  m.release_ = [shards = ckpt.shards()](const uint8_t* p, uint64_t n) {
    for (const auto& s : shards)
      if (s->release_range(p, n)) return;
  };
  const auto fp8 = fp8_block_size(c);
  m.fp8_block_ = fp8.has_value();
  Picker pick(ckpt, fp8);
  const int64_t H = d.hidden;
  const std::string dt = dims_text(d);

  // Globals.
  for (const auto& g : f.globals) {
    auto t = pick.get(g.name, g.presence.required(c), "required by " + f.model_type);
    if (!t) continue;
    m.globals_[g.role] = *t;
    m.global_names_[g.role] = g.name;
  }
  pick.expect(f.globals[0].name, m.globals_.at("embed"), {d.vocab, H}, "config (vocab_size, hidden_size)");
  if (m.globals_.count("lm_head"))
    pick.expect("lm_head.weight", m.globals_.at("lm_head"), {d.vocab, H}, "config (vocab_size, hidden_size)");
  pick.expect("model.norm.weight", m.globals_.at("final_norm"), {H}, "hidden_size");

  for (int l = 0; l < d.layers; ++l) {
    Layer layer;
    layer.index = l;
    const std::string prefix = expand(f.layer_prefix, l);
    for (const auto& r : f.layer_roles) {
      auto t = pick.get(prefix + r.name, r.presence.required(c), "required by " + f.model_type);
      if (t) layer.tensors[r.role] = *t;
    }
    if (f.attention == AttentionKind::Standard) {
      const int64_t qd = d.heads * d.head_dim, kvd = d.kv_heads * d.head_dim;
      const std::map<std::string, Shape> shapes = {
          {"q_proj", {qd, H}}, {"k_proj", {kvd, H}}, {"v_proj", {kvd, H}}, {"o_proj", {H, qd}},
          {"q_bias", {qd}}, {"k_bias", {kvd}}, {"v_bias", {kvd}}, {"o_bias", {H}},
          {"input_norm", {H}}, {"post_attn_norm", {H}}, {"input_norm_bias", {H}}, {"post_attn_norm_bias", {H}},
          {"q_norm", {f.qk_norm == QKNorm::Full ? qd : d.head_dim}},
          {"k_norm", {f.qk_norm == QKNorm::Full ? kvd : d.head_dim}},
      };
      for (const auto& r : f.layer_roles) {
        auto it = layer.tensors.find(r.role);
        auto s = shapes.find(r.role);
        if (it != layer.tensors.end() && s != shapes.end()) pick.expect(prefix + r.name, it->second, s->second, dt);
      }
    } else {
      // MLA: q either direct or low-rank; shapes checked for the hidden dimension only.
      const bool direct = layer.tensors.count("q_proj");
      const bool lowrank = layer.tensors.count("q_a_proj") && layer.tensors.count("q_b_proj") &&
                           layer.tensors.count("q_a_norm");
      if (!direct && !lowrank)
        throw Error::corruption(ckpt.dir().string() + ": tensor " + prefix +
                                "self_attn.q_proj.weight: missing (neither q_proj nor q_a_proj/q_a_layernorm/q_b_proj)");
      for (const char* role : {"q_proj", "q_a_proj", "kv_a_proj"}) {
        auto it = layer.tensors.find(role);
        if (it != layer.tensors.end() && (it->second.rank() != 2 || it->second.dim(1) != H))
          throw Error::corruption(ckpt.shard_path(prefix + "self_attn.o_proj.weight").string() + ": layer " +
                                  std::to_string(l) + " " + role + ": shape " + core::shape_str(it->second.shape()) +
                                  " does not take hidden_size " + std::to_string(H) + " inputs");
      }
    }

    auto read_mlp = [&](const std::string& g, const std::string& u, const std::string& dn, int64_t w,
                        const std::string& what) {
      Mlp mlp{pick.need(g, what), pick.need(u, what), pick.need(dn, what)};
      const std::string why = "config (hidden_size=" + std::to_string(H) + ", " + what + " width " + std::to_string(w) + ")";
      pick.expect(g, mlp.gate, {w, H}, why);
      pick.expect(u, mlp.up, {w, H}, why);
      pick.expect(dn, mlp.down, {H, w}, why);
      return mlp;
    };

    if (is_moe_layer(f, c, l)) {
      MoeBlock b;
      b.router = pick.need(prefix + f.router, "router of MoE layer " + std::to_string(l));
      pick.expect(prefix + f.router, b.router, {n_experts, H},
                  "config (" + f.expert_count_key + "=" + std::to_string(n_experts) + ", hidden_size)");
      if (!f.router_bias.empty()) {
        b.router_bias = pick.need(prefix + f.router_bias, "deepseek_v3 router bias");
        pick.expect(prefix + f.router_bias, *b.router_bias, {n_experts}, f.expert_count_key);
      }
      if (f.fused()) {
        const std::string gu = prefix + f.fused_gate_up, dn = prefix + f.fused_down;
        Tensor fgu = pick.need(gu, "fused experts"), fdn = pick.need(dn, "fused experts");
        pick.expect(gu, fgu, {n_experts, 2 * width, H}, "config (" + f.expert_count_key + ", " + f.expert_width_key + ", hidden_size)");
        pick.expect(dn, fdn, {n_experts, H, width}, "config (" + f.expert_count_key + ", " + f.expert_width_key + ", hidden_size)");
        Tensor gu2 = fgu.reshaped({n_experts * 2 * width, H});
        Tensor dn2 = fdn.reshaped({n_experts * H, width});
        for (int64_t e = 0; e < n_experts; ++e) {
          b.experts.push_back(Mlp{gu2.slice0(2 * e * width, 2 * e * width + width),
                                  gu2.slice0(2 * e * width + width, 2 * (e + 1) * width),
                                  dn2.slice0(e * H, (e + 1) * H)});
        }
      } else {
        for (int64_t e = 0; e < n_experts; ++e) {
          const int ei = static_cast<int>(e);
          b.experts.push_back(read_mlp(prefix + expand(f.expert_gate, l, ei), prefix + expand(f.expert_up, l, ei),
                                       prefix + expand(f.expert_down, l, ei), width, "expert " + std::to_string(e)));
        }
      }
      if (f.has_shared()) {
        int64_t sw = 0;
        if (!f.shared_width_key.empty()) sw = c.get_int_or(f.shared_width_key, 0);
        if (!f.shared_count_key.empty()) sw = c.get_int_or(f.shared_count_key, 0) * width;
        if (sw > 0) {
          b.shared = read_mlp(prefix + f.shared_gate, prefix + f.shared_up, prefix + f.shared_down, sw, "shared expert");
          if (!f.shared_expert_gate.empty()) {
            b.shared_gate = pick.need(prefix + f.shared_expert_gate, "shared expert gate");
            pick.expect(prefix + f.shared_expert_gate, *b.shared_gate, {1, H}, "hidden_size");
          }
        }
      }
      layer.moe = std::move(b);
    } else {
      const int64_t w = c.get_int(f.dense_width_key);
      layer.mlp = read_mlp(prefix + f.dense_gate, prefix + f.dense_up, prefix + f.dense_down, w, "dense MLP");
    }
    m.layers_.push_back(std::move(layer));
  }

  // Every other tensor: unexpected inside a decoder layer, passed through elsewhere.
  const std::string layers_prefix = "model.layers.";
  for (const auto& name : ckpt.names()) {
    if (pick.used(name)) continue;
    if (name.rfind(layers_prefix, 0) == 0) {
      const std::string rest = name.substr(layers_prefix.size());
      int64_t idx = -1;
      try {
        idx = std::stoll(rest);
      } catch (...) {
      }
      // Rotary-embedding buffers (rotary_emb.inv_freq, .cos_cached, .sin_cached) that older
      // checkpoints saved with the weights: not parameters, passed through as they are.
      const bool rotary = name.find(".rotary_emb.") != std::string::npos;
      if (idx >= 0 && idx < d.layers && name.ends_with("_scale_inv"))
        throw Error::corruption(ckpt.shard_path(name).string() + ": tensor " + name + ": a block scale without the weight " +
                                name.substr(0, name.size() - 10) + " it scales");
      if (idx >= 0 && idx < d.layers && !rotary)
        throw Error::corruption(ckpt.shard_path(name).string() + ": tensor " + name + ": not expected for " +
                                f.model_type + " with this config.json (" + (f.moe ? f.expert_count_key + "=" + std::to_string(n_experts) : std::string("dense")) + ")");
      if (idx >= d.layers && !f.extra_layers_allowed)
        throw Error::corruption(ckpt.shard_path(name).string() + ": tensor " + name + ": layer " + std::to_string(idx) +
                                " but num_hidden_layers is " + std::to_string(d.layers));
    }
    // A block-scaled FP8 weight among the extras (e.g. the experts of a DeepSeek-V3 MTP layer)
    // carries its scale as the decoder layers' weights do, so --dtype dequantizes it and the
    // passes keep codes and scales together; the scale is not an extra of its own.
    if (name.ends_with("_scale_inv") && ckpt.has(name.substr(0, name.size() - 10))) continue;
    m.extras_.emplace_back(name, *pick.get(name, true, "extra tensor"));
  }
  check_mtp_layers(m, ckpt, n_experts, width);
  return m;
}

// DeepSeek-V3 multi-token-prediction layers (num_nextn_predict_layers of them after the decoder
// layers) carry a full MoE block, stored as extras: it must agree with the config as the decoder
// layers' blocks do (router [E,H], bias [E], experts 0..E-1 of the expert width).
void Model::check_mtp_layers(Model& m, const io::Checkpoint& ckpt, int64_t n_experts, int64_t width) {
  const FamilyDesc& f = *m.family_;
  const Config& c = m.config_;
  if (!f.extra_layers_allowed || !f.moe) return;
  const int64_t H = m.dims_.hidden, L = m.dims_.layers;
  const int64_t nextn = c.get_int_or("num_nextn_predict_layers", 0);
  const std::string experts_prefix = f.expert_gate.substr(0, f.expert_gate.find("{e}"));  // "mlp.experts."
  for (int64_t idx = L; idx < L + nextn; ++idx) {
    const int l = static_cast<int>(idx);
    const std::string prefix = expand(f.layer_prefix, l);
    const std::string where = " (multi-token-prediction layer " + std::to_string(idx) + ")";
    auto expect = [&](const std::string& name, const Shape& shape, const std::string& why) {
      const Shape got = ckpt.info(name).shape;
      if (got != shape)
        throw Error::corruption(ckpt.shard_path(name).string() + ": tensor " + name + ": shape " + core::shape_str(got) +
                                " but " + why + " implies " + core::shape_str(shape) + where);
    };
    const std::string router = prefix + f.router;
    if (!ckpt.has(router)) continue;  // no MoE block stored for this layer
    const std::string count = "config (" + f.expert_count_key + "=" + std::to_string(n_experts);
    expect(router, {n_experts, H}, count + ", hidden_size)");
    if (!f.router_bias.empty() && ckpt.has(prefix + f.router_bias)) expect(prefix + f.router_bias, {n_experts}, count + ")");
    std::set<int64_t> seen;
    for (const auto& [name, t] : m.extras_) {
      if (name.rfind(prefix + experts_prefix, 0) != 0) continue;
      const std::string rest = name.substr(prefix.size() + experts_prefix.size());
      int64_t e = -1;
      try {
        e = std::stoll(rest);
      } catch (...) {
      }
      if (e < 0)
        throw Error::corruption(ckpt.shard_path(name).string() + ": tensor " + name + ": not an expert tensor name" + where);
      if (e >= n_experts)
        throw Error::corruption(ckpt.shard_path(name).string() + ": tensor " + name + ": expert " + std::to_string(e) +
                                " but " + f.expert_count_key + " is " + std::to_string(n_experts) + where);
      seen.insert(e);
      const int ei = static_cast<int>(e);
      const std::string why = "config (hidden_size=" + std::to_string(H) + ", expert width " + std::to_string(width) + ")";
      if (name == prefix + expand(f.expert_gate, l, ei) || name == prefix + expand(f.expert_up, l, ei)) expect(name, {width, H}, why);
      if (name == prefix + expand(f.expert_down, l, ei)) expect(name, {H, width}, why);
    }
    if (!seen.empty())
      for (int64_t e = 0; e < n_experts; ++e)
        for (const std::string* tmpl : {&f.expert_gate, &f.expert_up, &f.expert_down}) {
          const std::string name = prefix + expand(*tmpl, l, static_cast<int>(e));
          if (!ckpt.has(name))
            throw Error::corruption(ckpt.dir().string() + ": tensor " + name + ": missing (" + f.expert_count_key + " is " +
                                    std::to_string(n_experts) + ")" + where);
        }
    m.mtp_moe_.push_back(l);
  }
}

std::vector<OutTensor> Model::layer_outputs(int l, std::optional<DType> dtype) const {
  const FamilyDesc& f = *family_;
  const Layer& layer = layers_.at(static_cast<size_t>(l));
  const std::string prefix = expand(f.layer_prefix, l);
  std::vector<OutTensor> out;
  for (const auto& r : f.layer_roles) {
    auto it = layer.tensors.find(r.role);
    if (it != layer.tensors.end()) push_out(out, prefix + r.name, it->second, dtype);
  }
  auto add_mlp = [&](const Mlp& m, const std::string& g, const std::string& u, const std::string& dn) {
    push_out(out, g, m.gate, dtype);
    push_out(out, u, m.up, dtype);
    push_out(out, dn, m.down, dtype);
  };
  if (layer.moe) {
    const MoeBlock& b = *layer.moe;
    push_out(out, prefix + f.router, b.router, dtype);
    if (b.router_bias) {
      // The correction bias stays in its own dtype (F32 in DeepSeek-V3 checkpoints).
      push_out(out, prefix + f.router_bias, *b.router_bias, std::nullopt);
    }
    if (f.fused()) {
      // Re-stack the experts into [E,2I,H] and [E,H,I].
      const int64_t E = b.num_experts(), I = b.experts.at(0).width(), H = dims_.hidden;
      const DType src = b.experts[0].gate.dtype();
      const DType dst = (dtype && is_float(src)) ? *dtype : src;
      auto experts = b.experts;
      OutTensor gu{prefix + f.fused_gate_up, dst, {E, 2 * I, H}, nullptr, {prefix + f.fused_gate_up}};
      gu.make = [experts, dst, E, I, H] {
        Tensor t = Tensor::zeros(dst, {E, 2 * I, H});
        const size_t half = static_cast<size_t>(I * H) * core::dtype_size(dst);
        for (int64_t e = 0; e < E; ++e) {
          Tensor g = experts[e].gate.converted(dst), u = experts[e].up.converted(dst);
          std::copy_n(g.data(), half, t.mutable_data() + 2 * e * half);
          std::copy_n(u.data(), half, t.mutable_data() + (2 * e + 1) * half);
        }
        return t;
      };
      OutTensor dn{prefix + f.fused_down, dst, {E, H, I}, nullptr, {prefix + f.fused_down}};
      dn.make = [experts, dst, E, I, H] {
        Tensor t = Tensor::zeros(dst, {E, H, I});
        const size_t one = static_cast<size_t>(I * H) * core::dtype_size(dst);
        for (int64_t e = 0; e < E; ++e) {
          Tensor x = experts[e].down.converted(dst);
          std::copy_n(x.data(), one, t.mutable_data() + e * one);
        }
        return t;
      };
      out.push_back(std::move(gu));
      out.push_back(std::move(dn));
    } else {
      for (int e = 0; e < static_cast<int>(b.experts.size()); ++e)
        add_mlp(b.experts[e], prefix + expand(f.expert_gate, l, e), prefix + expand(f.expert_up, l, e),
                prefix + expand(f.expert_down, l, e));
    }
    if (b.shared) add_mlp(*b.shared, prefix + f.shared_gate, prefix + f.shared_up, prefix + f.shared_down);
    if (b.shared_gate) push_out(out, prefix + f.shared_expert_gate, *b.shared_gate, dtype);
  }
  if (layer.mlp) add_mlp(*layer.mlp, prefix + f.dense_gate, prefix + f.dense_up, prefix + f.dense_down);
  return out;
}

std::vector<OutTensor> Model::outputs(std::optional<DType> dtype) const {
  std::vector<OutTensor> out;
  push_out(out, global_names_.at("embed"), globals_.at("embed"), dtype);
  for (int l = 0; l < static_cast<int>(layers_.size()); ++l) {
    auto lo = layer_outputs(l, dtype);
    std::move(lo.begin(), lo.end(), std::back_inserter(out));
  }
  for (const auto& [role, t] : globals_)
    if (role != "embed") push_out(out, global_names_.at(role), t, dtype);
  // Extras keep DeepSeek-V3's F32 e_score_correction_bias (MTP layers) as the decoder layers do.
  for (const auto& [name, t] : extras_)
    push_out(out, name, t, name.ends_with("e_score_correction_bias") ? std::nullopt : dtype);
  return out;
}

nlohmann::json Model::rewritten_config(std::optional<DType> dtype) const {
  nlohmann::json j = config_.json();
  const FamilyDesc& f = *family_;
  if (f.moe) {
    int64_t E = -1, I = -1;
    for (const auto& layer : layers_) {
      if (!layer.moe) continue;
      const int64_t e = layer.moe->num_experts();
      const int64_t w = layer.moe->experts.empty() ? 0 : layer.moe->experts[0].width();
      for (const auto& x : layer.moe->experts)
        if (x.width() != w)
          throw Error::unsupported("layer " + std::to_string(layer.index) +
                                   ": experts of different widths cannot be written in the " + f.model_type + " layout");
      if (E >= 0 && (e != E || w != I))
        throw Error::unsupported("layer " + std::to_string(layer.index) + " has " + std::to_string(e) + " experts of width " +
                                 std::to_string(w) + " but an earlier layer has " + std::to_string(E) + " of width " +
                                 std::to_string(I) + ": stock loaders need the same in every MoE layer");
      E = e;
      I = w;
    }
    if (E >= 0) {
      const bool changed = !j.contains(f.expert_count_key) || j[f.expert_count_key] != E;
      j[f.expert_count_key] = E;
      j[f.expert_width_key] = I;
      if (j.contains(f.topk_key) && j[f.topk_key].get<int64_t>() > E) j[f.topk_key] = E;
      // DeepSeek group-limited routing: groups are contiguous blocks of E / n_group experts. Once
      // experts are dropped or merged those blocks no longer are the trained groups (and E may
      // not divide), so the written model routes plain top-k: one group, chosen always.
      if (changed && j.contains("n_group") && j["n_group"].is_number_integer() && j["n_group"].get<int64_t>() > 1) {
        j["n_group"] = 1;
        if (j.contains("topk_group")) j["topk_group"] = 1;
      }
    }
  }
  // Written dequantized: the checkpoint is no longer FP8.
  if (dtype && fp8_block_) j.erase("quantization_config");
  // transformers >= 4.56 writes "dtype" (and prefers it), older versions "torch_dtype": update
  // whichever the input has, both when it has both, "torch_dtype" (read by every version) when none.
  if (dtype) {
    const char* name = *dtype == DType::BF16 ? "bfloat16" : *dtype == DType::F16 ? "float16" : "float32";
    const bool has_new = j.contains("dtype"), has_old = j.contains("torch_dtype");
    if (has_new) j["dtype"] = name;
    if (has_old || !has_new) j["torch_dtype"] = name;
  }
  return j;
}

int64_t Model::total_params() const {
  int64_t n = 0;
  for (const auto& o : outputs()) n += core::shape_numel(o.shape);
  return n;
}

int64_t Model::active_params() const {
  int64_t n = total_params();
  for (const auto& layer : layers_) {
    if (!layer.moe || layer.moe->experts.empty()) continue;
    const int64_t per = layer.moe->experts[0].params();
    n -= (layer.moe->num_experts() - std::min(dims_.top_k, layer.moe->num_experts())) * per;
  }
  return n;
}

}  // namespace moe::model
