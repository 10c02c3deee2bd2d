// Model::load: a checkpoint's tensors, by family, into the logical model (lib/model/model.h).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <set>
#include <tuple>

#include "core/error.h"
#include "core/mxfp4.h"
#include "core/tensor_arena.h"
#include "core/warn.h"
#include "io/gguf_model.h"
#include "io/packed_input.h"
#include "model/detail.h"
#include "model/hybrid_layers.h"
#include "model/model.h"
#include "model/wrapped_config.h"
#include "quant/registry.h"

namespace moe::model {

using core::DType;
using core::Error;
using core::Shape;
using detail::fp8_block_size;
using detail::gather;
using detail::InterleavedLayout;
using detail::is_float;
using detail::kExpertCountKeys;
using detail::kTopKKeys;
using detail::native_expert_counts;
using detail::native_weights;

namespace {

// Collects tensors from the checkpoint, remembering which names were used.
class Picker {
 public:
  Picker(const io::Checkpoint& c, std::optional<std::pair<int64_t, int64_t>> fp8, const nlohmann::json* native)
      : ckpt_(c), fp8_(fp8), native_(native) {
    if (!native_) return;
    for (const auto& [name, e] : native_->items())
      for (const auto& [role, t] : e.at("parts").items()) ++part_users_[t.get<std::string>()];
  }
  // The tensor `name`; a weight with a companion `name`_scale_inv comes with its block scale; a
  // weight listed in a native checkpoint's quantization_config comes decoded from its parts.
  std::optional<Tensor> get(const std::string& name, bool required, const std::string& why) {
    if (native_ && native_->contains(name)) return encoded(name);
    if (packed_)
      if (auto t = packed_->weight(name, used_)) return t;
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
      throw Error::corruption(where(name) + ": tensor " + name + ": shape " +
                              core::shape_str(t.shape()) + " but " + why + " implies " + core::shape_str(shape));
  }
  bool used(const std::string& name) const { return used_.count(name) != 0; }
  // A stored tensor read elsewhere (a KV-cache scale): not a parameter of the model, not unexpected.
  void consume(const std::string& name) { used_.insert(name); }
  // A tensor the model does not have by its config.json (a bias under "attention_bias": false, a
  // norm under "use_qk_norm": false) but the files store: transformers does not load it (an
  // unexpected key), and neither does this loader. Warns once per key, and returns true; then it is
  // not read, used nor written (convert and every pass drop it).
  // `shown`: the name in the warning (one warning for every layer's copy).
  bool ignored_by_config(const Presence& p, const Config& c, const std::string& name, const std::string& shown) {
    // (A tensor required unless a key is true, the lm_head under tie_word_embeddings, has its own
    // rule below.)
    if (p.kind != Presence::IfConfig || p.negate || p.required(c) || !ckpt_.has(name)) return false;
    used_.insert(name);
    core::warn_once(ckpt_.dir().string() + ": tensor " + shown + " is stored, but config.json's " + p.key +
                    " is false" + (c.has(p.key) ? "" : " (absent: the default)") +
                    "; as transformers does, it is ignored (not used by the forward, not written to outputs)");
    return true;
  }
  // The novice (MoNE constant, docs/FORMAT.md "novice") stored for the expert whose down
  // projection is `down`, or nullopt when the expert is stored as an MLP. Checks the entry: one
  // part "value", a float tensor of shape [H] with finite values.
  std::optional<Tensor> novice(const std::string& down, int64_t H) {
    if (!native_ || !native_->contains(down) || native_->at(down).value("encoding", "") != kNoviceEncoding) return std::nullopt;
    const nlohmann::json& e = native_->at(down);
    used_weights_.insert(down);
    const std::string where = "config.json quantization_config.weights[\"" + down + "\"]";
    if (e.at("parts").size() != 1 || !e.at("parts").contains("value"))
      throw Error::corruption(ckpt_.dir().string() + ": " + where + ".parts: expected exactly one part \"value\", found " +
                              e.at("parts").dump());
    const std::string tname = e.at("parts").at("value").get<std::string>();
    if (!ckpt_.has(tname))
      throw Error::corruption(ckpt_.dir().string() + ": tensor " + tname + ": missing (part \"value\" of novice " + down +
                              ", " + where + ")");
    used_.insert(tname);
    Tensor t = ckpt_.tensor(tname);
    const std::string file = ckpt_.shard_path(tname).string();
    if (t.shape() != Shape{H} || !is_float(t.dtype()))
      throw Error::corruption(file + ": tensor " + tname + ": novice value must be a float tensor of shape [" +
                              std::to_string(H) + "] (hidden_size), found " + core::dtype_name(t.dtype()) + " " +
                              core::shape_str(t.shape()));
    const int64_t bad = core::first_non_finite(t.dtype(), t.data(), static_cast<size_t>(t.numel()));
    if (bad >= 0)
      throw Error::corruption(file + ": tensor " + tname + ": novice value has a non-finite element at index " +
                              std::to_string(bad));
    return t;
  }
  // The file that stores `name` (for an encoded weight: its first part), for messages.
  std::string where(const std::string& name) const {
    if (ckpt_.has(name)) return ckpt_.shard_path(name).string();
    if (native_ && native_->contains(name)) {
      const std::string first = native_->at(name).at("parts").begin()->get<std::string>();
      if (ckpt_.has(first)) return ckpt_.shard_path(first).string();
    }
    return ckpt_.dir().string();
  }
  // A native entry no weight of the model took: an error (a weight name the family does not
  // have, or a model that does not match its config).
  void check_native_used(const std::string& config_path) const {
    if (!native_) return;
    for (const auto& [name, e] : native_->items())
      if (!used_weights_.count(name))
        throw Error::corruption(config_path + ": quantization_config.weights: \"" + name +
                                "\" is not a weight of this model");
  }

 private:
  Tensor encoded(const std::string& name) {
    const nlohmann::json& e = native_->at(name);
    used_weights_.insert(name);
    // An encoding name this reader does not know is config.json's problem, not a shard's.
    if (e.contains("encoding") && e.at("encoding").is_string()) {
      const std::string enc = e.at("encoding").get<std::string>();
      const auto& known = quant::known_encodings();
      if (std::none_of(known.begin(), known.end(), [&](const quant::EncodingInfo& k) { return enc == k.name; })) {
        std::string list;
        for (const auto& k : known) list += (list.empty() ? "" : ", ") + std::string(k.name);
        throw Error::corruption((ckpt_.dir() / "config.json").string() + ": quantization_config.weights[\"" + name +
                                "\"].encoding: unknown encoding \"" + enc + "\" (known: " + list +
                                "; written by a newer moe-tool?)");
      }
    }
    std::map<std::string, quant::StoredPart> parts;
    std::string first;
    for (const auto& [role, t] : e.at("parts").items()) {
      const std::string tname = t.get<std::string>();
      if (!ckpt_.has(tname))
        throw Error::corruption(ckpt_.dir().string() + ": tensor " + tname + ": missing (part \"" + role + "\" of " + name +
                                ", config.json quantization_config)");
      used_.insert(tname);
      auto it = cache_.find(tname);
      if (it == cache_.end()) it = cache_.emplace(tname, std::make_shared<const Tensor>(ckpt_.tensor(tname))).first;
      parts[role] = {it->second, part_users_[tname] > 1};
      if (first.empty()) first = tname;
    }
    const std::string origin = ckpt_.shard_path(first).string() + ": weight " + name;
    try {
      auto enc = quant::decode(e, parts, origin);
      return Tensor::encoded(enc, enc->parts().front().tensor->dtype());
    } catch (const Error& err) {
      throw Error::corruption(origin + ": " + err.message());
    }
  }

  const io::Checkpoint& ckpt_;
  std::optional<std::pair<int64_t, int64_t>> fp8_;
  const nlohmann::json* native_;

 public:
  const io::PackedInput* packed_ = nullptr;  // a compressed-tensors / GPTQ / AWQ input (io/packed_input.h)

 private:
  std::set<std::string> used_, used_weights_;
  std::map<std::string, int> part_users_;
  std::map<std::string, std::shared_ptr<const Tensor>> cache_;
};

std::string dims_text(const Dims& d) {
  return "config (hidden_size=" + std::to_string(d.hidden) + ", num_attention_heads=" + std::to_string(d.heads) +
         ", num_key_value_heads=" + std::to_string(d.kv_heads) + ", head_dim=" + std::to_string(d.head_dim) + ")";
}

template <size_t N>
void check_aliases(const Config& c, const std::string& key, int64_t value, const char* const (&aliases)[N],
                   const std::string& model_type) {
  for (const char* a : aliases) {
    if (key == a || !c.has(a)) continue;
    const auto& v = c.json().at(a);
    if (v.is_number_integer() && v.get<int64_t>() == value) continue;
    throw Error::corruption(c.where(a) + " " + v.dump() + " disagrees with " + key + " " +
                            std::to_string(value) + " (" + model_type + " reads " + key +
                            "; transformers and other loaders may read " + a +
                            " for it): give one value, or remove " + a);
  }
}

// tie_word_embeddings true with a stored lm_head.weight: transformers ties the output projection
// to the input embeddings (PreTrainedModel.tie_weights after loading), so the stored head is not
// used. Whether the stored head differs from the embeddings (then it is dropped with a warning).
bool stored_head_differs(const Tensor& head, const Tensor& embed) {
  if (head.shape() != embed.shape()) return true;
  if (head.data() && embed.data() && head.dtype() == embed.dtype())
    return !std::equal(head.data(), head.data() + head.nbytes(), embed.data());
  return head.to_f32() != embed.to_f32();
}

}  // namespace

Model Model::load(const io::Checkpoint& ckpt) {
  Model m;
  m.config_ = Config(ckpt.config(), ckpt.config_path());
  const Config& c = m.config_;
  m.family_ = &family_for(c);
  if (!m.family_->text_model_type.empty()) {  // llama4: the text model of a wrapper
    m.wrapper_ = ckpt.config();
    m.config_ = wrapped_text_config(m.config_, m.family_->text_model_type);
  }
  // transformers v5's fused experts: a decoder layer holds <v5 experts>gate_up_proj.
  if (const FamilyDesc* v5 = v5_fused_variant(*m.family_)) {
    const std::string layers = v5->layer_prefix.substr(0, v5->layer_prefix.find("{l}")), fused = "." + v5->fused_gate_up;
    for (const auto& name : ckpt.names())
      if (name.starts_with(layers) && name.ends_with(fused)) {
        m.family_ = v5;
        break;
      }
  }
  const FamilyDesc& f = *m.family_;
  // A checkpoint quantized by another tool (gptq, awq, bitsandbytes, ...) stores packed weights
  // under other names: say so, not that a weight is missing.
  if (c.json().contains("quantization_config") && c.json().at("quantization_config").is_object()) {
    const nlohmann::json& qm = c.json().at("quantization_config").value("quant_method", nlohmann::json());
    if (qm.is_string() && qm != "fp8" && qm != "moe_tool" && !(qm == "mxfp4" && f.fused_in_out_interleaved) &&
        !io::PackedInput::reads(qm.get<std::string>()))
      throw Error::unsupported(c.source() + ": quantization_config.quant_method " + qm.dump() +
                               ": weights quantized by another tool are not read (moe-tool reads unquantized, "
                               "block-scaled fp8, compressed-tensors, gptq, awq and its own moe_tool encodings); "
                               "give the unquantized checkpoint");
  }

  if (!f.refused_true_key.empty() && c.get_bool_or(f.refused_true_key, false))
    throw Error::unsupported(c.where(f.refused_true_key) + " true with " + f.model_type + " (" +
                             f.refused_true_what + ") is not implemented");

  Dims& d = m.dims_;
  d.layers = c.get_int("num_hidden_layers");
  d.hidden = c.get_int("hidden_size");
  d.vocab = c.get_int("vocab_size");
  d.heads = c.get_int("num_attention_heads");
  d.kv_heads = c.get_int_or("num_key_value_heads", d.heads, false);
  if (d.heads % d.kv_heads != 0)
    throw Error::corruption(c.where("num_key_value_heads") + ": " + std::to_string(d.kv_heads) +
                            " does not divide num_attention_heads " + std::to_string(d.heads));
  d.head_dim = c.get_int_or("head_dim", f.default_head_dim);
  if (d.head_dim == 0) {
    if (d.hidden % d.heads != 0)
      throw Error::corruption(c.where("hidden_size") + " " + std::to_string(d.hidden) +
                              " is not a multiple of num_attention_heads " + std::to_string(d.heads));
    d.head_dim = d.hidden / d.heads;
  }
  if (f.moe) d.top_k = c.get_int(f.topk_key);
  int64_t n_experts_cfg = 0;
  int64_t n_experts = 0, width = 0;
  if (f.moe) {
    n_experts = c.get_int(f.expert_count_key);
    n_experts_cfg = n_experts;
    width = c.get_int(f.expert_width_key);
    if (d.top_k > n_experts)
      throw Error::corruption(c.where(f.topk_key) + ": " + std::to_string(d.top_k) + " exceeds " +
                              f.expert_count_key + " " + std::to_string(n_experts));
    check_aliases(c, f.expert_count_key, n_experts, kExpertCountKeys, f.model_type);
    check_aliases(c, f.topk_key, d.top_k, kTopKKeys, f.model_type);
  }

  // The shards (shared with the tensors' views) outlive the Checkpoint object if need be.
  m.release_ = [shards = ckpt.shards(), gguf = ckpt.gguf_ptr()](const uint8_t* p, uint64_t n) {
    if (gguf && gguf->file().release_range(p, n)) return;
    for (const auto& s : shards)
      if (s->release_range(p, n)) return;
    core::release_arena_range(p, n);  // a tensor a pass made (core/tensor_arena.h)
  };
  const auto fp8 = fp8_block_size(c);
  m.fp8_block_ = fp8.has_value();
  Picker pick(ckpt, fp8, native_weights(c));
  const auto packed = io::PackedInput::open(ckpt);
  pick.packed_ = packed.get();
  const std::vector<int64_t> ragged = f.moe ? native_expert_counts(c, f, d.layers, n_experts, d.top_k) : std::vector<int64_t>{};
  const int64_t H = d.hidden;
  const std::string dt = dims_text(d);

  // Globals.
  for (const auto& g : f.globals) {
    if (pick.ignored_by_config(g.presence, c, g.name, g.name)) continue;
    auto t = pick.get(g.name, g.presence.required(c), "required by " + f.model_type);
    if (!t) continue;
    m.globals_[g.role] = *t;
    m.global_names_[g.role] = g.name;
  }
  pick.expect(f.globals[0].name, m.globals_.at("embed"), {d.vocab, H}, "config (vocab_size, hidden_size)");
  if (m.globals_.count("lm_head"))
    pick.expect(m.global_names_.at("lm_head"), m.globals_.at("lm_head"), {d.vocab, H}, "config (vocab_size, hidden_size)");
  if (m.globals_.count("lm_head") && c.get_bool_or("tie_word_embeddings", f.default_tie_word_embeddings) &&
      stored_head_differs(m.globals_.at("lm_head"), m.globals_.at("embed"))) {
    core::warn_once(c.where("tie_word_embeddings") + " is true but lm_head.weight is stored and differs from " +
                    f.globals[0].name + "; following transformers (tie_weights), the embeddings are the output "
                    "projection and the stored lm_head.weight is ignored (not written to outputs)");
    m.globals_.erase("lm_head");
    m.global_names_.erase("lm_head");
  }
  pick.expect(m.global_names_.at("final_norm"), m.globals_.at("final_norm"), {H}, "hidden_size");
  // phimoe's final LayerNorm bias and lm_head bias.
  if (m.globals_.count("final_norm_bias"))
    pick.expect(m.global_names_.at("final_norm_bias"), m.globals_.at("final_norm_bias"), {H}, "hidden_size");
  if (m.globals_.count("lm_head_bias"))
    pick.expect(m.global_names_.at("lm_head_bias"), m.globals_.at("lm_head_bias"), {d.vocab}, "vocab_size");

  const std::string layers_prefix = f.layer_prefix.substr(0, f.layer_prefix.find("{l}"));  // "model.layers."
  const std::vector<bool> linear_layers =
      f.hybrid_linear_attention ? linear_attention_layers(c, d.layers) : std::vector<bool>{};
  for (int l = 0; l < d.layers; ++l) {
    Layer layer;
    layer.index = l;
    const std::string prefix = expand(f.layer_prefix, l);
    for (const auto& r : f.layer_roles) {
      if (pick.ignored_by_config(r.presence, c, prefix + r.name, layers_prefix + "N." + r.name)) continue;
      auto t = pick.get(prefix + r.name, r.presence.required(c), "required by " + f.model_type);
      if (t) layer.tensors[r.role] = *t;
      // A kv_cache_scheme: the attention module (the one holding o_proj) stores k_scale and v_scale,
      // read (checked by io::PackedInput) and not applied. Anywhere else they are unexpected.
      if (t && r.role == "o_proj" && packed && !packed->kv_cache_scales().empty()) {
        const std::string module = prefix + r.name.substr(0, r.name.rfind(".o_proj"));
        for (const char* kv : {".k_scale", ".v_scale"}) {
          if (!ckpt.has(module + kv))
            throw Error::corruption(ckpt.dir().string() + ": tensor " + module + kv + ": missing (quantization_config."
                                    "kv_cache_scheme is set: every attention module stores k_scale and v_scale)");
          pick.consume(module + kv);
        }
      }
    }
    if (f.attention == AttentionKind::Standard) {
      const int64_t qd = d.heads * d.head_dim, kvd = d.kv_heads * d.head_dim;
      const std::map<std::string, Shape> shapes = {
          {"q_proj", {f.hybrid_linear_attention ? 2 * qd : qd, H}}, {"k_proj", {kvd, H}}, {"v_proj", {kvd, H}}, {"o_proj", {H, qd}},
          {"q_bias", {f.hybrid_linear_attention ? 2 * qd : qd}}, {"k_bias", {kvd}}, {"v_bias", {kvd}}, {"o_bias", {H}},
          {"input_norm", {H}}, {"post_attn_norm", {H}}, {"input_norm_bias", {H}}, {"post_attn_norm_bias", {H}},
          {"sinks", {d.heads}},
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

    if (f.hybrid_linear_attention) check_hybrid_layer(ckpt, f, c, d, layer, linear_layers.at(static_cast<size_t>(l)));

    auto read_mlp = [&](const std::string& g, const std::string& u, const std::string& dn, int64_t w,
                        const std::string& what) {
      Mlp mlp{pick.need(g, what), pick.need(u, what), pick.need(dn, what)};
      const std::string why = "config (hidden_size=" + std::to_string(H) + ", " + what + " width " + std::to_string(w) + ")";
      pick.expect(g, mlp.gate, {w, H}, why);
      pick.expect(u, mlp.up, {w, H}, why);
      pick.expect(dn, mlp.down, {H, w}, why);
      return mlp;
    };

    // The fused layouts hold dense experts only.
    auto refuse_encoded_fused = [&](const std::string& name, const Tensor& t) {
      if (t.valid() && t.encoding())
        throw Error::unsupported(ckpt.shard_path(name).string() + ": tensor " + name +
                                 ": an encoded fused expert tensor is not read (give the experts dense)");
    };
    if (is_moe_layer(f, c, l)) {
      // The layer's expert count: the config's, or its entry in a ragged native checkpoint.
      const int64_t n_experts = ragged.empty() ? n_experts_cfg : ragged[static_cast<size_t>(l)];
      MoeBlock b;
      b.router = pick.need(prefix + f.router, "router of MoE layer " + std::to_string(l));
      pick.expect(prefix + f.router, b.router, {n_experts, H},
                  "config (" + f.expert_count_key + "=" + std::to_string(n_experts) + ", hidden_size)");
      if (!f.router_bias.empty()) {
        b.router_bias = pick.need(prefix + f.router_bias, "router bias");
        if (f.router_bias_row && b.router_bias->shape() == Shape{1, n_experts}) b.router_bias = b.router_bias->reshaped({n_experts});
        pick.expect(prefix + f.router_bias, *b.router_bias, {n_experts}, f.expert_count_key);
      }
      // A GGUF input of a fused family: gate, up and down stacked apart (io::gguf_fused_expert_name).
      const bool gguf_split = f.fused() && ckpt.gguf() && !ckpt.has(prefix + f.fused_gate_up) &&
                              !ckpt.has(prefix + f.fused_gate_up + "_blocks");
      if (f.fused_in_out_interleaved && !gguf_split) {
        const std::string gu = prefix + f.fused_gate_up, dn = prefix + f.fused_down;
        const std::string gub = prefix + f.fused_gate_up_bias, dnb = prefix + f.fused_down_bias;
        const std::string why = "config (" + f.expert_count_key + ", " + f.expert_width_key + ", hidden_size)";
        Tensor fgub = pick.need(gub, "fused expert biases"), fdnb = pick.need(dnb, "fused expert biases");
        // MXFP4 experts (gate_up_proj_blocks / _scales, down_proj_blocks / _scales) when the dense
        // tensors are absent: decoded here, once.
        const bool mxfp4 = !ckpt.has(gu) && ckpt.has(gu + "_blocks");
        Tensor fgu, fdn, gu_b, gu_s, dn_b, dn_s;
        if (mxfp4) {
          if (H % 32 != 0 || width % 32 != 0)
            throw Error::corruption(c.source() + ": MXFP4 experts need hidden_size and " + f.expert_width_key +
                                    " multiples of 32 (" + std::to_string(H) + ", " + std::to_string(width) + ")");
          gu_b = pick.need(gu + "_blocks", "MXFP4 fused experts");
          gu_s = pick.need(gu + "_scales", "MXFP4 fused experts");
          dn_b = pick.need(dn + "_blocks", "MXFP4 fused experts");
          dn_s = pick.need(dn + "_scales", "MXFP4 fused experts");
          for (const auto& [name, t] : {std::pair{gu + "_blocks", &gu_b}, {gu + "_scales", &gu_s}, {dn + "_blocks", &dn_b},
                                       {dn + "_scales", &dn_s}})
            if (t->dtype() != DType::U8)
              throw Error::corruption(ckpt.shard_path(name).string() + ": tensor " + name + ": dtype " +
                                      core::dtype_name(t->dtype()) + " (MXFP4 blocks and scales are U8)");
          pick.expect(gu + "_blocks", gu_b, {n_experts, 2 * width, H / 32, 16}, why);
          pick.expect(gu + "_scales", gu_s, {n_experts, 2 * width, H / 32}, why);
          pick.expect(dn + "_blocks", dn_b, {n_experts, H, width / 32, 16}, why);
          pick.expect(dn + "_scales", dn_s, {n_experts, H, width / 32}, why);
          core::Mxfp4::check_scales(gu_s, gu);
          core::Mxfp4::check_scales(dn_s, dn);
        } else {
          fgu = pick.need(gu, "fused experts");
          fdn = pick.need(dn, "fused experts");
          pick.expect(gu, fgu, {n_experts, H, 2 * width}, why);
          pick.expect(dn, fdn, {n_experts, width, H}, why);
        }
        pick.expect(gub, fgub, {n_experts, 2 * width}, why);
        pick.expect(dnb, fdnb, {n_experts, H}, why);
        for (const auto& [name, t] : {std::pair{&gu, &fgu}, {&dn, &fdn}, {&gub, &fgub}, {&dnb, &fdnb}})
          refuse_encoded_fused(*name, *t);
        // Copied out into per-expert [out, in] tensors (the layout every pass works on).
        const InterleavedLayout lay{H, width};
        GluActivation act{GluActivation::ClampedSwiGlu, static_cast<float>(c.get_double_or("swiglu_alpha", 1.702)),
                          static_cast<float>(c.get_double_or("swiglu_limit", 7.0))};
        for (int64_t e = 0; e < n_experts; ++e) {
          Mlp x;
          if (mxfp4) {
            // Views of expert e's blocks and scales, gate and up sharing theirs (core/mxfp4.h).
            auto view = [e](const Tensor& t, int64_t rows) {
              return std::make_shared<const Tensor>(t.slice0(e, e + 1).reshaped({rows, t.numel() / t.dim(0) / rows}));
            };
            auto gub = view(gu_b, 2 * width), gus = view(gu_s, 2 * width), dnb = view(dn_b, H), dns = view(dn_s, H);
            auto enc = [](std::shared_ptr<const core::Encoding> m) { return Tensor::encoded(std::move(m), DType::U8); };
            x = Mlp{enc(std::make_shared<core::Mxfp4>(gub, gus, 0, 2, width)), enc(std::make_shared<core::Mxfp4>(gub, gus, 1, 2, width)),
                    enc(std::make_shared<core::Mxfp4>(dnb, dns, 0, 1, H))};
          } else {
            x = Mlp{gather(fgu, {width, H}, lay.gate(e)), gather(fgu, {width, H}, lay.up(e)), gather(fdn, {H, width}, lay.down(e))};
          }
          x.gate_bias = gather(fgub, {width}, lay.gate_bias(e));
          x.up_bias = gather(fgub, {width}, lay.up_bias(e));
          x.down_bias = gather(fdnb, {H}, lay.down_bias(e));
          x.act = act;
          b.experts.push_back(std::move(x));
        }
        // The mapped pages copied from are handed back (the copies are what the model holds; the
        // MXFP4 experts are views, read when used).
        for (const Tensor* t : {&fgu, &fdn})
          if (t->data()) m.release_(t->data(), t->nbytes());
      } else if (f.fused_in_out_chunked && !(ckpt.gguf() && !ckpt.has(prefix + f.fused_gate_up))) {
        // llama4: gate_up_proj [E,H,2I] (gate the first half), down_proj [E,I,H], copied out into
        // per-expert [out, in] tensors.
        const std::string gu = prefix + f.fused_gate_up, dn = prefix + f.fused_down;
        const std::string why = "config (" + f.expert_count_key + ", " + f.expert_width_key + ", hidden_size)";
        Tensor fgu = pick.need(gu, "fused experts"), fdn = pick.need(dn, "fused experts");
        pick.expect(gu, fgu, {n_experts, H, 2 * width}, why);
        pick.expect(dn, fdn, {n_experts, width, H}, why);
        refuse_encoded_fused(gu, fgu);
        refuse_encoded_fused(dn, fdn);
        const InterleavedLayout lay{H, width, true};
        for (int64_t e = 0; e < n_experts; ++e)
          b.experts.push_back(Mlp{gather(fgu, {width, H}, lay.gate(e)), gather(fgu, {width, H}, lay.up(e)),
                                  gather(fdn, {H, width}, lay.down(e))});
        for (const Tensor* t : {&fgu, &fdn})
          if (t->data()) m.release_(t->data(), t->nbytes());
      } else if (gguf_split) {
        // A GGUF input (granitemoe, gpt_oss): gate, up and down stacked apart, each expert a view of
        // its slices under io::gguf_fused_expert_name's names; gpt_oss's expert biases likewise.
        for (int64_t e = 0; e < n_experts; ++e) {
          auto name = [&](const char* field) { return prefix + expand(io::gguf_fused_expert_name(f, field), l, static_cast<int>(e)); };
          Mlp x = read_mlp(name("expert_gate"), name("expert_up"), name("expert_down"), width, "expert " + std::to_string(e));
          if (f.fused_in_out_interleaved) {
            for (const auto& [field, bias, n] : {std::tuple{"expert_gate_bias", &x.gate_bias, width},
                                                 {"expert_up_bias", &x.up_bias, width}, {"expert_down_bias", &x.down_bias, H}}) {
              *bias = pick.need(name(field), "expert biases");
              pick.expect(name(field), **bias, {n}, "config (" + f.expert_width_key + ", hidden_size)");
            }
            x.act = GluActivation{GluActivation::ClampedSwiGlu, static_cast<float>(c.get_double_or("swiglu_alpha", 1.702)),
                                  static_cast<float>(c.get_double_or("swiglu_limit", 7.0))};
          }
          b.experts.push_back(std::move(x));
        }
      } else if (f.fused()) {
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
          if (auto nv = pick.novice(prefix + expand(f.expert_down, l, ei), H)) {
            Mlp novice;
            novice.novice = std::move(*nv);
            b.experts.push_back(std::move(novice));
            continue;
          }
          b.experts.push_back(read_mlp(prefix + expand(f.expert_gate, l, ei), prefix + expand(f.expert_up, l, ei),
                                       prefix + expand(f.expert_down, l, ei), width, "expert " + std::to_string(e)));
        }
      }
      if (f.has_shared()) {
        int64_t sw = 0;
        if (!f.shared_width_key.empty()) sw = c.get_int_or(f.shared_width_key, 0);
        if (!f.shared_count_key.empty()) sw = c.get_int_or(f.shared_count_key, f.default_shared_count) * width;
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

  // Encoded weights of the layers after the decoder layers (a multi-token-prediction layer's experts
  // that a pass re-encoded) are read from their parts like the decoder layers', and passed through.
  if (const nlohmann::json* native = native_weights(c); native && f.extra_layers_allowed)
    for (const auto& [name, e] : native->items())
      if (name.rfind(layers_prefix, 0) == 0 && std::atoll(name.c_str() + layers_prefix.size()) >= d.layers)
        m.extras_.emplace_back(name, *pick.get(name, true, "extra tensor"));
  // Every other tensor: unexpected inside a decoder layer, passed through elsewhere.
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
      // After the decoder layers only the num_nextn_predict_layers multi-token-prediction layers
      // (families that have them): a layer past those would be passed through unchecked and
      // contradict a config a pass rewrites (its expert count).
      const int64_t nextn = f.extra_layers_allowed ? c.get_int_or("num_nextn_predict_layers", 0) : 0;
      if (idx >= d.layers + nextn)
        throw Error::corruption(ckpt.shard_path(name).string() + ": tensor " + name + ": layer " + std::to_string(idx) +
                                " but num_hidden_layers is " + std::to_string(d.layers) +
                                (f.extra_layers_allowed ? " and num_nextn_predict_layers " + std::to_string(nextn) : ""));
    }
    // A block-scaled FP8 weight among the extras (e.g. the experts of a DeepSeek-V3 MTP layer)
    // carries its scale as the decoder layers' weights do, so --dtype dequantizes it and the
    // passes keep codes and scales together; the scale is not an extra of its own.
    if (name.ends_with("_scale_inv") && ckpt.has(name.substr(0, name.size() - 10))) continue;
    m.extras_.emplace_back(name, *pick.get(name, true, "extra tensor"));
  }
  pick.check_native_used(c.source());
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
  // The extras by name (an encoded weight is one, whatever parts it is stored as).
  std::map<std::string, const Tensor*> extras;
  for (const auto& [name, t] : m.extras_) extras[name] = &t;
  auto file_of = [&](const std::string& name) { return ckpt.has(name) ? ckpt.shard_path(name) : ckpt.dir(); };
  for (int64_t idx = L; idx < L + nextn; ++idx) {
    const int l = static_cast<int>(idx);
    const std::string prefix = expand(f.layer_prefix, l);
    const std::string where = " (multi-token-prediction layer " + std::to_string(idx) + ")";
    auto expect = [&](const std::string& name, const Shape& shape, const std::string& why) {
      const Shape got = extras.at(name)->shape();
      if (got != shape)
        throw Error::corruption(file_of(name).string() + ": tensor " + name + ": shape " + core::shape_str(got) +
                                " but " + why + " implies " + core::shape_str(shape) + where);
    };
    const std::string router = prefix + f.router;
    if (!extras.count(router)) continue;  // no MoE block stored for this layer
    const std::string count = "config (" + f.expert_count_key + "=" + std::to_string(n_experts);
    expect(router, {n_experts, H}, count + ", hidden_size)");
    if (!f.router_bias.empty() && extras.count(prefix + f.router_bias)) expect(prefix + f.router_bias, {n_experts}, count + ")");
    if (f.v5_layout && ckpt.has(prefix + f.fused_gate_up))
      throw Error::unsupported(ckpt.shard_path(prefix + f.fused_gate_up).string() + ": tensor " + prefix + f.fused_gate_up +
                               ": a multi-token-prediction layer's experts in the transformers v5 fused layout are not "
                               "read (give them per expert, as the released checkpoints store them)" + where);
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
        throw Error::corruption(file_of(name).string() + ": tensor " + name + ": not an expert tensor name" + where);
      if (e >= n_experts)
        throw Error::corruption(file_of(name).string() + ": tensor " + name + ": expert " + std::to_string(e) +
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
          if (!extras.count(name))
            throw Error::corruption(ckpt.dir().string() + ": tensor " + name + ": missing (" + f.expert_count_key + " is " +
                                    std::to_string(n_experts) + ")" + where);
        }
    m.mtp_moe_.push_back(l);
  }
}

}  // namespace moe::model
