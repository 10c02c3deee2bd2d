// The output tensors of a model (Model::layer_outputs, outputs, global_outputs): plain tensors,
// encoded weights as their stored parts or materialized, and the manifest of encoded weights.
#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <set>
#include <utility>

#include "core/error.h"
#include "core/mxfp4.h"
#include "core/warn.h"
#include "io/gguf_model.h"
#include "model/detail.h"
#include "model/model.h"

namespace moe::model {

using core::DType;
using core::Error;
using core::Shape;
using detail::InterleavedLayout;
using detail::is_float;
using detail::scatter;

namespace {

// Builds the output list of (part of) a model: plain tensors in `dtype` when given and float,
// encoded weights materialized or as their stored parts (a part shared by several weights once,
// under its first user's name), with the manifest of encoded weights (docs/FORMAT.md).
class OutputBuilder {
 public:
  OutputBuilder(const OutputOptions& opts, DType materialize, nlohmann::json* manifest, Model::PageReleaser release)
      : opts_(opts), materialize_(materialize), manifest_(manifest), release_(std::move(release)) {}
  std::vector<OutTensor> out;

  // `convertible`: a float tensor that follows the output dtype (false keeps DeepSeek-V3's F32
  // router bias as it is).
  const OutputOptions& options() const { return opts_; }
  void add(const std::string& name, const Tensor& t, bool convertible = true) {
    const core::Encoding* enc = t.encoding();
    if (!enc) {
      out.push_back({name, (convertible && opts_.dtype && is_float(t.dtype())) ? *opts_.dtype : t.dtype(), t.shape(),
                     [t] { return t; }, {name}, "", cls, t.numel()});
      return;
    }
    const auto rule = enc->dtype_rule();
    if (rule == core::Encoding::DtypeRule::Dequantize && opts_.keep_codes && !opts_.materialize && !opts_.as_stored)
      if (auto form = enc->native_form()) return add_native_form(name, t, std::move(*form));
    if (opts_.materialize || (rule == core::Encoding::DtypeRule::Dequantize && !opts_.as_stored) ||
        (opts_.dtype && rule == core::Encoding::DtypeRule::Materialize)) {
      const DType d = opts_.dtype ? *opts_.dtype : materialize_;
      out.push_back({name, d, t.shape(), [t, d, rel = release_] { return converted(t, d, rel); }, {name}, "", cls, t.numel()});
      return;
    }
    nlohmann::json entry = enc->params();
    entry["encoding"] = enc->name();
    nlohmann::json parts = nlohmann::json::object();
    bool counted = false;
    for (const auto& p : enc->parts()) {
      std::string pname = name + p.suffix;
      if (p.shared) {
        auto [it, fresh] = shared().emplace(p.tensor, pname);
        pname = it->second;
        if (!fresh) {
          parts[p.role] = pname;
          continue;
        }
      }
      parts[p.role] = pname;
      const bool convert = opts_.dtype && rule == core::Encoding::DtypeRule::ConvertParts && is_float(p.tensor->dtype());
      const DType d = convert ? *opts_.dtype : p.tensor->dtype();
      auto part = p.tensor;
      out.push_back({pname, d, part->shape(), [part, d, rel = release_] { return converted(*part, d, rel); }, {pname}, name,
                     cls, counted ? 0 : weight_params(t)});
      counted = true;
    }
    entry["parts"] = parts;
    if (manifest_) (*manifest_)[name] = entry;
    // Every part shared and already written (by an earlier weight, of this builder or an earlier
    // layer's for a pooled expert): the weight's parameters still count, on the last output of
    // its class, else on the last output.
    if (!counted) {
      auto same = std::find_if(out.rbegin(), out.rend(), [&](const OutTensor& o) { return o.cls == cls; });
      if (same != out.rend()) same->params += t.numel();
      else pending_[cls] += t.numel();
    }
  }
  // An encoded weight written as its native form: the manifest entry from the form's description,
  // the parts computed when written (the form made once for all its parts, dropped after the last).
  void add_native_form(const std::string& name, const Tensor& t, core::NativeForm form) {
    nlohmann::json entry = form.params;
    entry["encoding"] = form.name;
    nlohmann::json parts = nlohmann::json::object();
    struct Made {
      std::function<std::shared_ptr<const core::Encoding>()> make;
      std::shared_ptr<const core::Encoding> enc;
      size_t count = 0, left = 0;
    };
    auto made = std::make_shared<Made>(Made{std::move(form.make), nullptr, form.parts.size(), 0});
    bool first = true;
    for (const auto& p : form.parts) {
      const std::string pname = name + p.suffix;
      parts[p.role] = pname;
      out.push_back({pname, p.dtype, p.shape,
                     [t, made, role = p.role] {
                       if (!made->enc) made->enc = made->make(), made->left = made->count;
                       std::shared_ptr<const Tensor> part;
                       for (const auto& q : made->enc->parts())
                         if (q.role == role) part = q.tensor;
                       if (--made->left == 0) made->enc.reset();
                       if (!part) throw Error::internal(role + ": no such part of the native form");
                       return *part;
                     },
                     {name}, name, cls, first ? weight_params(t) : 0});
      first = false;
    }
    entry["parts"] = parts;
    if (manifest_) (*manifest_)[name] = entry;
  }
  // A novice expert (docs/FORMAT.md "novice"): its constant [H] stored as `<down><suffix>` in
  // F32, listed under the expert's down projection `down`. Stock outputs cannot hold it.
  void add_novice(const std::string& down, const Tensor& value) {
    if (opts_.materialize)
      throw Error::unsupported(down + ": a novice expert (MoNE constant): stock loaders cannot express a constant expert; "
                               "write the native format (without --materialize)");
    const std::string pname = down + kNoviceSuffix;
    out.push_back({pname, DType::F32, value.shape(), [value] { return value.converted(DType::F32); }, {pname}, down,
                   "experts", value.numel()});
    if (manifest_) (*manifest_)[down] = {{"encoding", kNoviceEncoding}, {"parts", {{"value", pname}}}};
  }
  // A manifest entry written by the caller (the gpt_oss MXFP4 experts, add_layer).
  void record(const std::string& name, nlohmann::json entry) {
    if (manifest_) (*manifest_)[name] = std::move(entry);
  }
  std::string cls = "other";  // class of the tensors added next
  // Parameters of weights whose parts were all written by an earlier builder (a pooled expert of
  // the previous layer) and that found no output of their class here: by class, for the caller to
  // put on an earlier output of that class. Cleared.
  std::map<std::string, int64_t> take_pending() { return std::exchange(pending_, {}); }

 private:
  // The parameters an encoded weight's first written part carries: its own and those of earlier
  // weights of its class left with nothing written (pending_).
  int64_t weight_params(const Tensor& t) { return t.numel() + std::exchange(pending_[cls], 0); }
  std::map<std::string, int64_t> pending_;
  OutputOptions opts_;
  DType materialize_;
  nlohmann::json* manifest_;
  Model::PageReleaser release_;
  SharedPartNames own_shared_;
  SharedPartNames& shared() { return opts_.shared_parts ? *opts_.shared_parts : own_shared_; }

  // t in dtype d; the mapped pages it was computed from are handed back (memory stays bounded
  // while a whole checkpoint is dequantized).
  static Tensor converted(const Tensor& t, DType d, const Model::PageReleaser& rel) {
    Tensor x = t.converted(d);
    if (rel && x.data() != t.data())
      for (const Tensor* p : t.stored_tensors()) rel(p->data(), p->nbytes());
    return x;
  }
};

void add_mlp(OutputBuilder& ob, const Mlp& x, const std::string& g, const std::string& u, const std::string& dn) {
  if (x.novice) return ob.add_novice(dn, *x.novice);
  ob.add(g, x.gate);
  ob.add(u, x.up);
  ob.add(dn, x.down);
}

// The shared expert and gate of an MoE layer, the MLP of a dense one.
void add_tail(OutputBuilder& ob, const FamilyDesc& f, const std::string& prefix, const Layer& layer) {
  if (layer.moe) {
    const MoeBlock& b = *layer.moe;
    ob.cls = "shared_experts";
    if (b.shared) add_mlp(ob, *b.shared, prefix + f.shared_gate, prefix + f.shared_up, prefix + f.shared_down);
    if (b.shared_gate) ob.add(prefix + f.shared_expert_gate, *b.shared_gate);
  }
  ob.cls = "dense_mlp";
  if (layer.mlp) add_mlp(ob, *layer.mlp, prefix + f.dense_gate, prefix + f.dense_up, prefix + f.dense_down);
}

// gpt_oss: the experts back into gate_up_proj [E,H,2I] (gate/up interleaved; llama4: the two halves, no biases), gate_up_proj_bias
// [E,2I], down_proj [E,I,H], down_proj_bias [E,H] (InterleavedLayout), weights in `dst`, biases
// in their stored dtype (converted to `dst` when it is given as the output dtype).
// With `mxfp4` (every expert weight a core::Mxfp4, add_layer) the weights are written as the
// released checkpoints store them instead: gate_up_proj_blocks [E,2I,H/32,16] and _scales
// [E,2I,H/32] (gate row k at 2k, up at 2k + 1), down_proj_blocks [E,H,I/32,16] and _scales
// [E,H,I/32], each row's bytes copied as they are.
void add_interleaved_experts(OutputBuilder& ob, const FamilyDesc& f, const std::string& prefix,
                             const std::vector<Mlp>& experts, DType dst, int64_t H, bool mxfp4 = false) {
  const int64_t E = static_cast<int64_t>(experts.size()), I = experts.at(0).width();
  const bool biases = !f.fused_gate_up_bias.empty();  // llama4 (fused_in_out_chunked): none
  for (const auto& x : experts)
    if (biases && (!x.gate_bias || !x.up_bias || !x.down_bias))
      throw Error::internal(f.model_type + ": an expert without its biases");
  const OutputOptions& opts = ob.options();
  const DType bsrc = biases ? experts[0].gate_bias->dtype() : dst;
  const DType bdst = opts.dtype && is_float(bsrc) ? *opts.dtype : bsrc;
  const InterleavedLayout lay{H, I, f.fused_in_out_chunked};
  using Part = std::function<void(const Mlp&, int64_t, Tensor&)>;
  auto out = [&](const std::string& name, DType d, const Shape& shape, Part put) {
    const std::string full = prefix + name;
    OutTensor o{full, d, shape, nullptr, {full}, "", "experts", core::shape_numel(shape)};
    o.make = [experts, d, shape, put, E] {
      Tensor t = Tensor::zeros(d, shape);
      for (int64_t e = 0; e < E; ++e) put(experts[static_cast<size_t>(e)], e, t);
      return t;
    };
    ob.out.push_back(std::move(o));
  };
  // MXFP4: row k of a weight's blocks (part 0) or scales (part 1) into row `r` of expert e's.
  auto mx_rows = [&](const std::string& name, const std::vector<std::pair<const Tensor Mlp::*, int64_t>>& weights, int64_t R,
                     int64_t in) {
    const std::string full = prefix + name;
    for (int part = 0; part < 2; ++part) {
      const int64_t row = part == 0 ? in / 2 : in / 32;
      const Shape shape = part == 0 ? Shape{E, R, in / 32, 16} : Shape{E, R, in / 32};
      const std::string pname = full + (part == 0 ? "_blocks" : "_scales");
      OutTensor o{pname, DType::U8, shape, nullptr, {pname}, full, "experts", part == 0 ? E * R * in : 0};
      o.make = [experts, weights, shape, part, row, R] {
        Tensor t = Tensor::zeros(DType::U8, shape);
        uint8_t* p = t.mutable_data();
        const int64_t step = static_cast<int64_t>(weights.size());
        for (size_t e = 0; e < experts.size(); ++e)
          for (const auto& [w, first] : weights) {
            const auto& m = dynamic_cast<const core::Mxfp4&>(*(experts[e].*w).encoding());
            for (int64_t k = 0; k < m.rows(); ++k)
              std::copy_n(part == 0 ? m.row_blocks(k) : m.row_scales(k), row,
                          p + (static_cast<int64_t>(e) * R + first + k * step) * row);
          }
        return t;
      };
      ob.out.push_back(std::move(o));
    }
    ob.record(full, {{"encoding", "mxfp4"}, {"parts", {{"blocks", full + "_blocks"}, {"scales", full + "_scales"}}}});
  };
  if (mxfp4)
    mx_rows(f.fused_gate_up, {{&Mlp::gate, 0}, {&Mlp::up, 1}}, 2 * I, H);
  else
    out(f.fused_gate_up, dst, {E, H, 2 * I}, [dst, lay](const Mlp& x, int64_t e, Tensor& t) {
      scatter(x.gate.converted(dst), t, lay.gate(e));
      scatter(x.up.converted(dst), t, lay.up(e));
    });
  if (biases)
    out(f.fused_gate_up_bias, bdst, {E, 2 * I}, [bdst, lay](const Mlp& x, int64_t e, Tensor& t) {
      scatter(x.gate_bias->converted(bdst), t, lay.gate_bias(e));
      scatter(x.up_bias->converted(bdst), t, lay.up_bias(e));
    });
  if (mxfp4)
    mx_rows(f.fused_down, {{&Mlp::down, 0}}, H, I);
  else
    out(f.fused_down, dst, {E, I, H}, [dst, lay](const Mlp& x, int64_t e, Tensor& t) {
      scatter(x.down.converted(dst), t, lay.down(e));
    });
  if (!biases) return;
  out(f.fused_down_bias, bdst, {E, H}, [bdst, lay](const Mlp& x, int64_t e, Tensor& t) {
    scatter(x.down_bias->converted(bdst), t, lay.down_bias(e));
  });
}

// Whether a gpt_oss layer's experts are written as MXFP4 blocks and scales (their bytes as read):
// every expert weight is a core::Mxfp4 of the layer's shapes and the output asks for neither
// decoded weights (materialize, an output dtype) nor another format's codes (keep_codes).
bool keeps_mxfp4(const MoeBlock& b, const FamilyDesc& f, const OutputOptions& opts, int64_t H) {
  if (!f.fused_in_out_interleaved || opts.materialize || opts.dtype || opts.keep_codes || b.experts.empty()) return false;
  const int64_t I = b.experts[0].width();
  auto is = [](const Tensor& t, int64_t rows, int64_t cols) {
    return dynamic_cast<const core::Mxfp4*>(t.encoding()) && t.dim(0) == rows && t.dim(1) == cols;
  };
  return std::all_of(b.experts.begin(), b.experts.end(), [&](const Mlp& x) {
    return !x.is_novice() && is(x.gate, I, H) && is(x.up, I, H) && is(x.down, H, I);
  });
}

void add_layer(OutputBuilder& ob, const Model& m, int l) {
  const FamilyDesc& f = m.family();
  const Layer& layer = m.layers().at(static_cast<size_t>(l));
  const std::string prefix = expand(f.layer_prefix, l);
  for (const auto& r : f.layer_roles) {
    auto it = layer.tensors.find(r.role);
    ob.cls = r.role.find("norm") != std::string::npos ? "norms" : "attention";
    if (it != layer.tensors.end()) ob.add(prefix + r.name, it->second);
  }
  if (layer.moe) {
    const MoeBlock& b = *layer.moe;
    const OutputOptions& opts = ob.options();
    // Encoded experts, but for those every writer decodes (DtypeRule::Dequantize: MXFP4, GGUF
    // blocks) when neither their parts (as_stored) nor their codes (keep_codes, where they have a
    // native form) are asked for.
    auto kept_encoded = [&](const Tensor& t) {
      const core::Encoding* enc = t.encoding();
      return enc && (enc->dtype_rule() != core::Encoding::DtypeRule::Dequantize || opts.as_stored ||
                     (opts.keep_codes && !opts.materialize && enc->native_form()));
    };
    bool encoded = false;
    for (const auto& e : b.experts)
      encoded = encoded || kept_encoded(e.gate) || kept_encoded(e.up) || kept_encoded(e.down);
    const bool written_dense = !encoded || opts.materialize ||
                               (opts.dtype && b.experts[0].gate.encoding() &&
                                b.experts[0].gate.encoding()->dtype_rule() == core::Encoding::DtypeRule::Materialize);
    // A v5 fused layout (FamilyDesc::v5_layout) takes experts written dense; encoded experts and
    // novices go per expert, in the family's per-expert spelling (router included), which
    // transformers v4 reads and v5 converts on load.
    // A GGUF input's experts of a fused family (granitemoe), listed as stored: per expert, as the
    // GGUF reader names their blocks (io::gguf_split_layout).
    const bool gguf_split = m.family().fused_only() && opts.as_stored && encoded && b.experts[0].gate.encoding() &&
                            b.experts[0].gate.encoding()->name().rfind("gguf-", 0) == 0;
    const FamilyDesc& f = gguf_split ? io::gguf_split_layout(m.family())
                          : m.family().v5_layout && (!written_dense || b.num_novices() > 0) ? per_expert_layout(m.family())
                                                                                               : m.family();
    ob.cls = "router";
    ob.add(prefix + f.router, b.router);
    // The correction bias stays in its own dtype (F32 in DeepSeek-V3 checkpoints).
    // gpt_oss's router bias (a logit bias, stored like the weights) follows the output dtype.
    // ernie4_5_moe's is stored as [1, E].
    if (b.router_bias)
      ob.add(prefix + f.router_bias, f.router_bias_row ? b.router_bias->reshaped({1, b.router_bias->numel()}) : *b.router_bias,
             f.router_bias_in_logits);
    if (f.fused()) {
      if (b.num_novices() > 0)
        throw Error::unsupported("layer " + std::to_string(l) + ": novice experts (MoNE) cannot be stored in the fused " +
                                 f.model_type + " layout");
      // Re-stack the experts into [E,2I,H] and [E,H,I]. Encoded experts are written dense here
      // (the fused layout has no place for parts) only when materializing.
      const int64_t E = b.num_experts(), I = b.experts.at(0).width(), H = m.dims().hidden;
      const bool mxfp4 = keeps_mxfp4(b, f, opts, H);
      if (!written_dense && !mxfp4)
        throw Error::unsupported("layer " + std::to_string(l) + ": encoded experts cannot be stored in the fused " +
                                 f.model_type + " layout; write them dense: --materialize on this command (a stock " +
                                 "checkpoint of the decoded values), \"materialize\": true in a recipe's output");
      const DType src = b.experts[0].gate.dtype();
      const bool decoded = b.experts[0].gate.encoding() != nullptr;  // MXFP4 / GGUF blocks
      const DType dst = encoded || decoded ? (opts.dtype ? *opts.dtype : m.materialize_dtype())
                                           : (opts.dtype && is_float(src)) ? *opts.dtype : src;
      auto experts = b.experts;
      if (f.fused_in_out_interleaved || f.fused_in_out_chunked) {
        add_interleaved_experts(ob, f, prefix, experts, dst, H, mxfp4);
        return add_tail(ob, f, prefix, layer);
      }
      OutTensor gu{prefix + f.fused_gate_up, dst, {E, 2 * I, H}, nullptr, {prefix + f.fused_gate_up}, "", "experts", E * 2 * I * H};
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
      OutTensor dn{prefix + f.fused_down, dst, {E, H, I}, nullptr, {prefix + f.fused_down}, "", "experts", E * H * I};
      dn.make = [experts, dst, E, I, H] {
        Tensor t = Tensor::zeros(dst, {E, H, I});
        const size_t one = static_cast<size_t>(I * H) * core::dtype_size(dst);
        for (int64_t e = 0; e < E; ++e) {
          Tensor x = experts[e].down.converted(dst);
          std::copy_n(x.data(), one, t.mutable_data() + e * one);
        }
        return t;
      };
      ob.out.push_back(std::move(gu));
      ob.out.push_back(std::move(dn));
    } else {
      ob.cls = "experts";
      for (int e = 0; e < static_cast<int>(b.experts.size()); ++e)
        add_mlp(ob, b.experts[e], prefix + expand(f.expert_gate, l, e), prefix + expand(f.expert_up, l, e),
                prefix + expand(f.expert_down, l, e));
    }
  }
  add_tail(ob, f, prefix, layer);
}

}  // namespace

std::vector<OutTensor> Model::layer_outputs(int l, const OutputOptions& opts, nlohmann::json* manifest) const {
  OutputBuilder b(opts, materialize_dtype(), manifest, release_);
  add_layer(b, *this, l);
  for (const auto& [cls, n] : b.take_pending()) b.out.back().params += n;
  return std::move(b.out);
}

std::vector<OutTensor> Model::outputs(const OutputOptions& options, nlohmann::json* manifest) const {
  OutputOptions opts = options;  // one set of shared-part names for the whole model
  if (!opts.shared_parts) opts.shared_parts = std::make_shared<SharedPartNames>();
  std::vector<OutTensor> out;
  auto take = [&](OutputBuilder& b) {
    std::move(b.out.begin(), b.out.end(), std::back_inserter(out));
    for (const auto& pending : b.take_pending()) {  // (class, params); no structured binding: clang 14 cannot capture one
      auto same = std::find_if(out.rbegin(), out.rend(), [&](const OutTensor& o) { return o.cls == pending.first; });
      (same != out.rend() ? *same : out.back()).params += pending.second;
    }
  };
  {
    OutputBuilder b(opts, materialize_dtype(), manifest, release_);
    b.cls = "embeddings";
    b.add(global_names_.at("embed"), globals_.at("embed"));
    take(b);
  }
  // One builder per layer, as the runner writes them; a part shared across layers is written once.
  for (int l = 0; l < static_cast<int>(layers_.size()); ++l) {
    OutputBuilder b(opts, materialize_dtype(), manifest, release_);
    add_layer(b, *this, l);
    take(b);
  }
  auto rest = global_outputs(opts, manifest, false);
  std::move(rest.begin(), rest.end(), std::back_inserter(out));
  return out;
}

std::vector<OutTensor> Model::global_outputs(const OutputOptions& opts, nlohmann::json* manifest, bool with_embed) const {
  OutputBuilder b(opts, materialize_dtype(), manifest, release_);
  if (with_embed) {
    b.cls = "embeddings";
    b.add(global_names_.at("embed"), globals_.at("embed"));
  }
  for (const auto& [role, t] : globals_)
    if (role != "embed") {
      b.cls = role == "lm_head" ? "lm_head" : role.find("norm") != std::string::npos ? "norms" : "other";
      b.add(global_names_.at(role), t);
    }
  // Extras keep DeepSeek-V3's F32 e_score_correction_bias (MTP layers) as the decoder layers do.
  b.cls = "other";
  for (const auto& [name, t] : extras_) b.add(name, t, !name.ends_with("e_score_correction_bias"));
  return std::move(b.out);
}

}  // namespace moe::model
