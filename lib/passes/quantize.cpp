#include "passes/quantize.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <Eigen/Cholesky>
#include <map>
#include <optional>
#include <regex>
#include <set>

#include "core/error.h"
#include "passes/delta_ternary.h"
#include "passes/encoding_exchange.h"
#include "passes/experts.h"
#include "passes/options.h"
#include "passes/passes.h"
#include "passes/smooth.h"
#include "passes/sub1bit.h"
#include "quant/codec.h"
#include "quant/gptq.h"
#include "quant/mixed_precision.h"
#include "runtime/moe_block.h"
#include "runtime/mpi.h"
#include "runtime/weights.h"

namespace moe::passes {

using core::Error;
using nlohmann::json;
using runtime::MatrixRM;

namespace {

enum class QuantizeMethod { Rtn, Gptq };

// Tensor classes a user can quantize, their option keys and defaults ("codec" = the pass codec).
struct ClassKey {
  const char* key;
  const char* dflt;
};
const ClassKey kClasses[] = {{"experts", "codec"}, {"shared", "codec"},  {"dense", "codec"},  {"attention", "keep"},
                             {"router", "keep"},   {"embeddings", "keep"}, {"lm_head", "keep"}};

// One matrix to quantize.
struct QuantSlot {
  core::Tensor* tensor = nullptr;
  std::string name;   // on-disk name (tensor_type patterns match it)
  std::string what;   // "expert 3 gate" (report)
  std::string cls;    // key of kClasses
  const calib::MatrixD* gram = nullptr;  // Σ x xᵀ of its inputs (gptq)
  int64_t tokens = 0;                    // tokens behind gram
  int expert = -1;                       // routed expert index, else -1
  int type = 0;                          // 0 gate, 1 up, 2 down (routed experts)
  int64_t topped_to = 0;                 // > 0: gram topped up with the all-token Hessian to this many tokens
  std::string role{};                    // attention: q_proj, k_proj, v_proj, o_proj
};

// The matrices of a layer the pass can quantize, in order (routed experts, shared expert, its
// gate, router, dense MLP, attention q/k/v/o), without Hessians. The shared-expert gate ([1, H],
// class "shared_gate") has no option of its own: only a tensor_type rule quantizes it.
// The embeddings' and lm_head's slots, for the globals `g` holds (the model's own, or a copy of
// its views): RTN only (run_globals).
std::vector<QuantSlot> global_slots(const model::FamilyDesc& fam, std::map<std::string, core::Tensor>& g) {
  std::vector<QuantSlot> out;
  for (const char* key : {"embeddings", "lm_head"}) {
    const char* global = std::string(key) == "embeddings" ? "embed" : "lm_head";
    auto it = g.find(global);
    if (it == g.end()) continue;
    std::string name;
    for (const auto& rn : fam.globals)
      if (rn.role == global) name = rn.name;
    out.push_back(QuantSlot{&it->second, name, global, key, nullptr, 0, -1, 0});
  }
  return out;
}

std::vector<QuantSlot> layer_slots(const model::FamilyDesc& fam, model::Layer& L) {
  const std::string prefix = model::expand(fam.layer_prefix, L.index);
  std::vector<QuantSlot> slots;
  auto add_mlp = [&](model::Mlp& m, const std::string& who, const std::string& cls, const std::string& gate,
                     const std::string& up, const std::string& down, int expert) {
    if (m.is_novice()) return;
    slots.push_back({&m.gate, prefix + model::expand(gate, L.index, expert), who + " gate", cls, nullptr, 0, expert, 0});
    slots.push_back({&m.up, prefix + model::expand(up, L.index, expert), who + " up", cls, nullptr, 0, expert, 1});
    slots.push_back({&m.down, prefix + model::expand(down, L.index, expert), who + " down", cls, nullptr, 0, expert, 2});
  };
  if (L.moe) {
    // A fused layout (every expert in one tensor per projection on disk) names each expert's
    // matrices by the tensor that holds them, so a rule matches on-disk names there too.
    const bool fused = fam.fused();
    for (size_t e = 0; e < L.moe->experts.size(); ++e)
      add_mlp(L.moe->experts[e], "expert " + std::to_string(e), "experts", fused ? fam.fused_gate_up : fam.expert_gate,
              fused ? fam.fused_gate_up : fam.expert_up, fused ? fam.fused_down : fam.expert_down, static_cast<int>(e));
    if (L.moe->shared)
      add_mlp(*L.moe->shared, "shared expert", "shared", fam.shared_gate, fam.shared_up, fam.shared_down, -1);
    if (L.moe->shared_gate)
      slots.push_back({&*L.moe->shared_gate, prefix + fam.shared_expert_gate, "shared expert gate", "shared_gate"});
    slots.push_back({&L.moe->router, prefix + fam.router, "router", "router"});
  }
  if (L.mlp) add_mlp(*L.mlp, "dense mlp", "dense", fam.dense_gate, fam.dense_up, fam.dense_down, -1);
  for (const auto& rn : fam.layer_roles) {
    if (rn.role != "q_proj" && rn.role != "k_proj" && rn.role != "v_proj" && rn.role != "o_proj") continue;
    auto it = L.tensors.find(rn.role);
    if (it == L.tensors.end()) continue;
    QuantSlot s{&it->second, prefix + rn.name, "attention " + rn.role, "attention"};
    s.role = rn.role;
    slots.push_back(std::move(s));
  }
  return slots;
}

// The rules of one tensor_type value: "R1=C1,R2=C2" is split at the commas that end a rule (the
// text after the rule's last '=' is a codec or keep), so a comma inside a regex ("a{1,3}=int8")
// stays in it.
std::vector<std::string> split_rules(const std::string& text) {
  auto is_rule = [](const std::string& r) {
    const auto eq = r.rfind('=');
    if (eq == std::string::npos || eq == 0) return false;
    const std::string c = r.substr(eq + 1);
    if (c == "keep") return true;
    try {
      quant::parse_codec(c);
      return true;
    } catch (const Error&) {
      return false;
    }
  };
  std::vector<std::string> out;
  std::string cur;
  for (size_t i = 0;;) {
    const size_t j = std::min(text.find(',', i), text.size());
    cur += text.substr(i, j - i);
    if (j == text.size()) break;
    if (is_rule(cur)) {
      out.push_back(cur);
      cur.clear();
    } else {
      cur += ',';
    }
    i = j + 1;
  }
  out.push_back(cur);
  return out;
}

class Quantize final : public pipeline::Pass {
 public:
  Quantize(const json& spec, const std::string& method, const std::string& path) : method_name_(method) {
    Options o(spec, path, "quantize/" + method);
    o.allow({"pass", "method"});
    method_ = method == "gptq" ? QuantizeMethod::Gptq : QuantizeMethod::Rtn;
    group_ = o.get_int("group", 128, 0, int64_t{1} << 30);
    sym_ = o.get_bool("sym", false);
    codec_text_ = o.opt_string("codec").value_or("int4");
    codec_ = spec_of(codec_text_, o.key_path("codec"));
    for (const auto& c : kClasses) {
      const std::string v = o.opt_string(c.key).value_or(c.dflt);
      class_codec_[c.key] = v == "keep" ? std::nullopt : v == "codec" ? std::optional(codec_) : std::optional(spec_of(v, o.key_path(c.key)));
      class_text_[c.key] = v;
    }
    o.allow({"tensor_type"});
    if (o.has("tensor_type")) {
      const json& t = spec.at("tensor_type");
      std::vector<std::pair<std::string, std::string>> list;  // (path, "REGEX=CODEC")
      if (t.is_string()) list.push_back({o.key_path("tensor_type"), t.get<std::string>()});
      else if (t.is_array()) {
        for (size_t i = 0; i < t.size(); ++i) {
          const std::string p = o.key_path("tensor_type") + "[" + std::to_string(i) + "]";
          if (!t[i].is_string()) throw Error::invalid(p + ": expected \"REGEX=CODEC\", found " + json_found(t[i]));
          list.push_back({p, t[i].get<std::string>()});
        }
      } else
        throw Error::invalid(o.key_path("tensor_type") + ": expected \"REGEX=CODEC\" or a list of them, found " + json_found(t));
      std::vector<std::pair<std::string, std::string>> rules;
      for (const auto& [p, text] : list)
        for (const auto& rule : split_rules(text)) rules.push_back({p, rule});
      for (const auto& [p, text] : rules) {
        const auto eq = text.rfind('=');
        if (eq == std::string::npos || eq == 0 || eq + 1 == text.size())
          throw Error::invalid(p + ": expected \"REGEX=CODEC\" (e.g. \"self_attn\\\\.o_proj=int8\"), found \"" + text + "\"");
        Override ov;
        ov.pattern = text.substr(0, eq);
        ov.text = text.substr(eq + 1);
        try {
          ov.re = std::regex(ov.pattern, std::regex::ECMAScript);
        } catch (const std::regex_error& e) {
          throw Error::invalid(p + ": \"" + ov.pattern + "\" is not a valid regular expression (" + e.what() + ")");
        }
        if (ov.text != "keep") ov.codec = spec_of(ov.text, p);
        ov.path = p;
        overrides_.push_back(std::move(ov));
      }
    }
    if (method_ == QuantizeMethod::Gptq) {
      damp_ = o.opt_number("damp", 0, 10);
      act_order_ = o.opt_bool_or_auto("act_order");
      block_ = o.get_int("block", 128, 1, int64_t{1} << 20);
      min_tokens_ = o.get_int("min_tokens", 0, 0, int64_t{1} << 40);
    }
    avg_bits_ = o.opt_number("avg_bits", 0, 64, true);
    avg_path_ = o.key_path("avg_bits");
    const std::string w = o.opt_string("widths").value_or("ternary,int2,int3,int4,int8");
    widths_text_ = w;
    widths_path_ = o.key_path("widths");
    const bool group_applied = group_applied_, sym_applied = sym_applied_;
    for (size_t i = 0; i <= w.size();) {
      size_t j = w.find(',', i);
      if (j == std::string::npos) j = w.size();
      widths_.push_back(spec_of(w.substr(i, j - i), o.key_path("widths")));
      i = j + 1;
    }
    if (!avg_bits_) group_applied_ = group_applied, sym_applied_ = sym_applied;  // widths unused
    alpha_ = o.get_number("alpha", 1.0, 0, 10);
    beta_ = o.get_number("beta", 1.5, 0, 10);
    model_scope_ = o.get_enum("budget_scope", "layer", {"layer", "model"}) == "model";
    if (!avg_bits_)
      for (const char* k : {"widths", "alpha", "beta", "budget_scope"})
        if (o.has(k)) throw Error::invalid(o.key_path(k) + ": applies to mixed precision, give avg_bits too");
    sub1bit_ = o.get_bool("sub1bit", false);
    if (sub1bit_) check_sub1bit(o);
    if (o.has("dict_scope") && !sub1bit_) throw Error::invalid(o.key_path("dict_scope") + ": applies to sub1bit, give it too");
    dict_scope_ = o.get_enum("dict_scope", "model", {"model", "layer"});
    threshold_scale_ = o.get_enum("threshold_scale", "none", {"none", "importance"}) == "importance";
    if (o.has("threshold_gamma") && !threshold_scale_)
      throw Error::invalid(o.key_path("threshold_gamma") + ": applies to threshold_scale importance, give it too");
    gamma_ = o.get_number("threshold_gamma", 0.5, 0, 4);
    if (threshold_scale_) {
      const auto& c = class_codec_.at("experts");
      if (!c || c->kind != quant::CodecSpec::Kind::Ternary || c->grid == quant::TernaryGrid::TQ)
        throw Error::invalid(o.key_path("threshold_scale") + ": scales the ternary zero threshold of the routed experts, "
                             "whose codec is " + (c ? quant::to_string(*c) : std::string("keep")) +
                             " (give a ternary or ternary-absmean codec)");
    }
    smooth_ = o.get_bool("smooth", false);
    if (model_scope_)  // the planning sweep measures the experts as the input model has them
      for (const char* k : {"smooth", "threshold_scale"})
        if (o.has(k) && (std::string(k) == "smooth" ? smooth_ : threshold_scale_))
          throw Error::invalid(o.key_path("budget_scope") + ": model plans the widths on the input model's experts, "
                               "which " + o.key_path(k) + " changes first; give budget_scope layer with it");
    if (o.has("smooth_alpha") && !smooth_) throw Error::invalid(o.key_path("smooth_alpha") + ": applies to smooth, give it too");
    smooth_alpha_ = o.get_number("smooth_alpha", kDefaultSmoothAlpha, 0, 1);
    smooth_path_ = o.key_path("smooth");
    align_router_ = o.get_bool("align_router", false);
    align_path_ = o.key_path("align_router");
    if (align_router_ && class_codec_.at("router"))
      throw Error::invalid(align_path_ + ": re-fits the router in its dtype, but " + o.key_path("router") + " quantizes it (" +
                           quant::to_string(*class_codec_.at("router")) + "); give router keep");
    // --group and --sym only complete integer codecs that name no group or symmetry: given, they
    // must complete one (else the report would echo a group no weight has).
    if (o.has("group") && !group_applied_)
      throw Error::invalid(o.key_path("group") + ": " + std::to_string(group_) +
                           " applies to integer codecs that name no group, and no codec of this pass is one (" +
                           used_codecs() + "); give the group in the codec (int4:g" + std::to_string(group_) + ") or drop it");
    if (o.has("sym") && !sym_applied_)
      throw Error::invalid(o.key_path("sym") + ": applies to integer codecs that name no symmetry, and no codec of this pass "
                           "is one (" + used_codecs() + ")");
    o.finish();
  }

  std::string name() const override { return "quantize"; }
  std::string method() const override { return method_name_; }
  json params() const override {
    json p = {{"pass", "quantize"}, {"method", method_name_}, {"codec", codec_text_}, {"group", group_}, {"sym", sym_}};
    // "applied": each class's codec as the pass applies it (group and symmetry resolved), beside
    // the options as given.
    json applied = json::object();
    for (const auto& c : kClasses) {
      p[c.key] = class_text_.at(c.key);
      const auto& cc = class_codec_.at(c.key);
      applied[c.key] = cc ? quant::to_string(*cc) : "keep";
    }
    p["applied"] = applied;
    if (!overrides_.empty()) {
      json t = json::array();
      for (const auto& ov : overrides_) t.push_back(ov.pattern + "=" + (ov.codec ? quant::to_string(*ov.codec) : "keep"));
      p["tensor_type"] = t;
    }
    if (method_ == QuantizeMethod::Gptq) {
      if (damp_) p["damp"] = *damp_;
      p["act_order"] = act_order_ ? json(*act_order_) : json("auto");
      p["block"] = block_;
      p["min_tokens"] = min_tokens_;
    }
    if (threshold_scale_) {
      p["threshold_scale"] = "importance";
      p["threshold_gamma"] = gamma_;
    }
    if (sub1bit_) {
      p["sub1bit"] = true;
      p["dict_scope"] = dict_scope_;
    }
    if (smooth_) {
      p["smooth"] = true;
      p["smooth_alpha"] = smooth_alpha_;
    }
    if (align_router_) p["align_router"] = true;
    if (avg_bits_) {
      p["avg_bits"] = *avg_bits_;
      p["budget_scope"] = model_scope_ ? "model" : "layer";
      p["widths"] = widths_text_;
      p["alpha"] = alpha_;
      p["beta"] = beta_;
    }
    return p;
  }
  pipeline::Requirements requirements() const override {
    pipeline::Requirements r;
    r.input_grams = method_ == QuantizeMethod::Gptq;
    r.block_inputs = method_ == QuantizeMethod::Gptq || avg_bits_.has_value() || smooth_ || align_router_;
    // Smoothing measures and rescales the block inputs (and their Grams) of the calibration tokens.
    r.input_grams = r.input_grams || smooth_ || align_router_;
    r.reference_inputs = align_router_;
    // GPTQ alone reads the block inputs for its top-up through the family's routing (bind_expert).
    for (const auto& [on, what] : {std::pair{avg_bits_.has_value(), "avg_bits"}, {smooth_, "smooth"}, {align_router_, "align_router"}})
      if (on && r.unscaled_expert_inputs.empty()) r.unscaled_expert_inputs = "quantize " + method() + " with " + what;
    if (threshold_scale_) r.stats_fields = {"count"};
    r.plan_sweep = model_scope_budget();
    return r;
  }
  int64_t experts_after(int, int64_t before, int64_t) const override { return before; }
  bool moe_layers_only() const override {
    if (!overrides_.empty()) return false;
    return !class_codec_.at("attention") && !class_codec_.at("dense");
  }
  bool shapes_at_run() const override { return true; }

  // The budget must leave room for the narrowest width (checked before any work).
  void plan(const model::Model& model, const calib::Stats*) override {
    if (!avg_bits_) return;
    family_ = &model.family();
    routing_ = runtime::RoutingRule::from_model(model);
    for (const auto& layer : model.layers()) {
      if (!layer.moe || layer.moe->experts.empty()) continue;
      const auto& e = layer.moe->experts[0];
      double lo = 1e300, hi = 0;
      std::string narrowest, widest;
      for (const auto& w : widths_) {
        const double b = expert_bits(w, e);
        if (b < lo) lo = b, narrowest = quant::to_string(w);
        if (b > hi) hi = b, widest = quant::to_string(w);
      }
      // A budget above the widest width buys nothing more: said, not silently spent short.
      if (*avg_bits_ > hi)
        budget_note_ = "avg_bits " + fmt(*avg_bits_) + " is above the widest width, " + widest + " at " + fmt(hi) +
                       " bits per parameter (scales included): every expert takes " + widest;
      if (*avg_bits_ < lo)
        throw Error::invalid("quantize: avg_bits " + fmt(*avg_bits_) + " is below the narrowest width, " + narrowest +
                             " at " + fmt(lo) + " bits per parameter (scales included) for layer " +
                             std::to_string(layer.index) + "'s experts");
      return;  // experts have one shape per model
    }
    throw Error::invalid("quantize: avg_bits applies to routed experts, and the model has no MoE layer");
  }

  // The layer's slots with their codecs (nullopt: kept) and, for gptq, their Hessians' tokens
  // and Hessians (a routed expert's are bound when it runs); the all-token MoE Hessian when a slot
  // needs it.
  std::vector<QuantSlot> prepare_slots(const model::FamilyDesc& fam, model::Layer& L, pipeline::InputGrams* g,
                                  std::vector<std::optional<quant::CodecSpec>>& codec) {
    const bool gptq = method_ == QuantizeMethod::Gptq;
    if (L.moe && gptq && g->num_experts() != static_cast<int64_t>(L.moe->experts.size()))
      throw Error::internal("quantize: Grams for " + std::to_string(g->num_experts()) + " experts, the layer has " +
                            std::to_string(L.moe->experts.size()));
    moe_all_ = calib::MatrixD();
    moe_all_n_ = 0;
    if (L.moe && gptq)
      for (int64_t e = 0; e < g->num_experts(); ++e) moe_all_n_ += g->expert_tokens(e);
    std::vector<QuantSlot> slots = layer_slots(fam, L);
    if (gptq)
      for (QuantSlot& s : slots) {  // each matrix's Hessian: the Gram of its inputs (a routed expert's: bound when it runs)
        if (s.cls == "experts") {
          s.tokens = g->expert_tokens(s.expert);
        } else if (s.cls == "shared" || s.cls == "dense") {
          const bool shared = s.cls == "shared";
          s.gram = s.type < 2 ? (shared ? &g->shared_in : &g->mlp_in) : (shared ? &g->shared_mid : &g->mlp_mid);
          s.tokens = g->tokens;
        } else if (s.cls == "router" || s.cls == "shared_gate") {
          s.gram = &moe_all_;  // both read the MoE block input
          s.tokens = moe_all_n_;
        } else {
          s.gram = s.role == "o_proj" ? &g->attn_o : &g->attn_qkv;
          s.tokens = g->tokens;
        }
      }

    // Which codec each slot gets (nullopt: kept).
    codec.assign(slots.size(), std::nullopt);
    for (size_t i = 0; i < slots.size(); ++i) codec[i] = codec_for(slots[i]);

    // The MoE input over all tokens (Σ_e Gram_e counts every token top-k times), for the router and
    // the shared-expert gate and to top up few-token experts' gate/up Hessians: computed expert by
    // expert, only when one of them needs it.
    if (L.moe && gptq && !scaled_inputs_) {  // llama4: prepare_scaled_inputs
      bool need = false;
      for (size_t i = 0; i < slots.size(); ++i) {
        const QuantSlot& s = slots[i];
        if (!codec[i]) continue;
        need = need || s.cls == "router" || s.cls == "shared_gate" ||
               (s.cls == "experts" && s.type < 2 && s.tokens < threshold(s.tensor->dim(1)));
      }
      if (need) moe_all_ = g->expert_in_sum();
    }

    return slots;
  }

  // llama4 (RoutingRule::scales_input): the router (and a shared-expert gate) read the block
  // inputs x themselves, an expert x times its score; Σ_e Gram_e is of the scaled inputs. So the
  // router's Hessian is xᵀx over the N tokens, and a few-token expert is topped up from what it
  // would receive if routed (bind_expert, through every_expert_), computed from the router as it
  // is before any slot of the layer is quantized.
  void prepare_scaled_inputs(const pipeline::LayerContext& ctx, std::vector<QuantSlot>& slots,
                             const std::vector<std::optional<quant::CodecSpec>>& codec) {
    every_expert_.reset();
    all_rows_.clear();
    if (!ctx.block_inputs) throw Error::internal("quantize: the runner gave no block inputs");
    const MatrixRM& X = *ctx.block_inputs;
    bool reads = false, top_up = false;
    for (size_t i = 0; i < slots.size(); ++i) {
      const QuantSlot& s = slots[i];
      if (!codec[i]) continue;
      reads = reads || s.cls == "router" || s.cls == "shared_gate";
      top_up = top_up || (s.cls == "experts" && s.tokens < threshold(s.tensor->dim(1)));
    }
    if (reads) {
      const Eigen::MatrixXd xd = X.cast<double>();
      moe_all_ = xd.transpose() * xd;
      moe_all_n_ = X.rows();
      for (QuantSlot& s : slots)
        if (s.cls == "router" || s.cls == "shared_gate") s.tokens = moe_all_n_;
    }
    if (!top_up || X.rows() == 0) return;
    const model::MoeBlock& moe = *ctx.target.moe;
    runtime::MoeWeights router;
    router.router = runtime::to_matrix(moe.router);
    if (moe.router_bias) router.router_bias = runtime::to_row(*moe.router_bias);
    every_expert_ = runtime::route_to_every_expert(router, ctx.routing, X);
    all_rows_.resize(static_cast<size_t>(X.rows()));
    for (size_t t = 0; t < all_rows_.size(); ++t) all_rows_[t] = static_cast<int32_t>(t);
  }

  // Model-scope mixed precision, the planning sweep: each MoE layer's experts measured at every
  // width on the input model's calibration inputs (only their losses are kept, the encodings are
  // dropped); finish_plan() then gives every expert of the model its width in one integer program.
  void plan_layer(const model::Layer& layer, pipeline::InputGrams* grams, const MatrixRM* block_inputs,
                  double residual_energy) override {
    if (!layer.moe || layer.moe->experts.empty()) return;
    if (!family_) throw Error::internal("quantize: plan_layer before plan");
    model::Layer L = layer;  // the slots point into this copy; nothing is written back
    std::vector<std::optional<quant::CodecSpec>> codec;
    std::vector<QuantSlot> slots = prepare_slots(*family_, L, grams, codec);
    ExpertItems ei = expert_items(*L.moe, routing_, block_inputs, grams, slots, codec, nullptr);
    if (plan_options_.empty()) plan_options_ = width_options(*L.moe);
    // Layers weighed against each other: an expert's relative output error, times its importance
    // within the layer (MC-MoE), perturbs the residual stream the next layer reads (and
    // normalizes) in proportion to the MoE block's share of it, ||block output||² / ||residual
    // leaving the layer||² over the calibration tokens (docs/commands/quantize.md).
    const double weight = residual_energy > 0 ? ei.output_energy / residual_energy : 1.0;
    plan_layers_.push_back({layer.index, plan_items_.size(), ei.items.size(), weight});
    for (auto& it : ei.items) {
      for (double& l : it.loss) l *= weight;
      it.name = "layer " + std::to_string(layer.index) + " " + it.name;
      plan_items_.push_back(std::move(it));
    }
  }

  void finish_plan(json& rep) override {
    quant::MixedSolve solve;
    solve.mip_gap = kModelGap;
    solve.time_limit_s = kModelTimeLimit;
    const quant::MixedResult res = core::with_context(
        "quantize avg_bits over the whole model", [&] { return quant::choose_widths(plan_items_, plan_options_, *avg_bits_, solve); });
    json layers = json::array();
    for (const auto& pl : plan_layers_) {
      std::vector<int>& w = planned_widths_[pl.layer];
      double bits = 0, params = 0;
      json counts = json::object();
      for (size_t j = pl.first; j < pl.first + pl.count; ++j) {
        const int o = res.choice[j];
        w.push_back(o);
        bits += plan_items_[j].params * plan_options_[static_cast<size_t>(o)].bits_per_param;
        params += plan_items_[j].params;
        counts[plan_options_[static_cast<size_t>(o)].codec] = counts.value(plan_options_[static_cast<size_t>(o)].codec, 0) + 1;
      }
      layers.push_back({{"layer", pl.layer}, {"avg_bits", params > 0 ? bits / params : 0.0}, {"experts_per_codec", counts},
                        {"weight", pl.weight}});
    }
    rep["scope"] = "model";
    rep["avg_bits"] = *avg_bits_;
    rep["achieved_avg_bits"] = res.avg_bits;
    rep["objective"] = res.objective;
    rep["status"] = res.status;
    rep["gap"] = res.gap;
    rep["solver"] = {{"mip_gap", kModelGap}, {"time_limit_s", kModelTimeLimit}, {"items", plan_items_.size()}};
    rep["layers"] = layers;
    rep["note"] = "model-scope mixed precision: every routed expert is quantized at every width twice over, once in "
                  "this planning sweep on the input model's calibration inputs (its loss per width), once in the layer "
                  "loop at the width the integer program chose (on the inputs there, through the layers already "
                  "quantized when calibration.propagate)";
    plan_items_ = {};
  }

  void run_layer(pipeline::LayerContext& ctx) override {
    pipeline::InputGrams* g = ctx.grams;
    if (method_ == QuantizeMethod::Gptq && !g) throw Error::internal("quantize: the runner gave no Gram matrices");
    model::Layer& L = ctx.target;
    const model::FamilyDesc& fam = ctx.model.family();
    json& rep = ctx.report;
    rep["matrices"] = json::array();

    // Router alignment fits against the router as this pass receives it (before smoothing).
    const MatrixRM router_in = align_router_ && L.moe ? runtime::to_matrix(L.moe->router) : MatrixRM();
    if (smooth_ && L.moe) smooth_layer(ctx, rep);

    const bool gptq = method_ == QuantizeMethod::Gptq;
    std::vector<std::optional<quant::CodecSpec>> codec;
    scaled_inputs_ = ctx.routing.scales_input;
    std::vector<QuantSlot> slots = prepare_slots(fam, L, g, codec);
    if (gptq && L.moe && scaled_inputs_) prepare_scaled_inputs(ctx, slots, codec);

    if (threshold_scale_ && L.moe) scale_thresholds(ctx, slots, codec, rep);

    // Mixed precision: the experts' widths by the integer program.
    std::vector<std::shared_ptr<const core::Encoding>> chosen(slots.size());
    if (avg_bits_ && L.moe) mixed_precision(ctx, slots, codec, chosen, rep);

    // Over MPI ranks (runtime/mpi.h): the routed experts' encodings, each by its owner, exchanged.
    std::vector<EncodedSlot> split(slots.size());
    if (runtime::mpi::World::get().split() && L.moe) split_experts(ctx, slots, codec, chosen, split, rep);

    // Slot by slot; a routed expert's Grams are computed (and topped up) before its first slot and
    // dropped after its last, so memory holds one expert's Grams (calib/input_grams.h).
    int bound = -1;
    for (size_t i = 0; i < slots.size(); ++i) {
      if (!codec[i]) continue;
      json m;
      if (split[i].encoding) {  // encoded by its owner rank (quantize encodes every routed slot it has a codec for)
        finish_slot(ctx.model, slots[i], std::move(split[i].encoding), *codec[i], split[i].report);
        rep["matrices"].push_back(split[i].report);
        continue;
      }
      if (gptq && !chosen[i] && slots[i].cls == "experts" && slots[i].expert != bound) {
        if (bound >= 0) unbind_expert(*g, slots, bound);
        bound = slots[i].expert;
        bind_expert(*g, ctx.block_inputs, *L.moe, slots, codec, bound);
      }
      std::shared_ptr<const core::Encoding> enc = chosen[i] ? chosen[i] : encode(slots[i], *codec[i], m);
      finish_slot(ctx.model, slots[i], std::move(enc), *codec[i], m);
      rep["matrices"].push_back(m);
    }
    if (bound >= 0) unbind_expert(*g, slots, bound);
    if (align_router_ && L.moe) align_router(ctx, router_in, rep);
    if (threshold_scale_ && L.moe) {  // the zero fraction each expert's threshold gave
      std::map<int, std::pair<double, double>> z;  // expert -> (zeros, trits)
      for (const auto& sl : slots)
        if (const auto* t = dynamic_cast<const quant::Ternary*>(sl.tensor->encoding()); t && sl.expert >= 0) {
          std::vector<uint8_t> row(static_cast<size_t>(t->cols()));
          for (int64_t r = 0; r < t->rows(); ++r) {
            t->trits_row(r, row.data());
            z[sl.expert].first += static_cast<double>(std::count(row.begin(), row.end(), uint8_t{0}));
          }
          z[sl.expert].second += static_cast<double>(t->rows() * t->cols());
        }
      for (json& e : rep["threshold_scale"]["experts"]) {
        const auto& [zeros, trits] = z[e.at("expert").get<int>()];
        e["zero_fraction"] = trits > 0 ? zeros / trits : 0.0;
      }
    }
    if (sub1bit_) {  // dictionary-code the layer's ternary weights (passes/sub1bit.h)
      std::vector<Sub1bitSlot> s1;
      for (size_t i = 0; i < slots.size(); ++i)
        if (codec[i]) s1.push_back({slots[i].tensor, slots[i].cls});
      rep["sub1bit"] = dict_scope_ == "layer" ? sub1bit_layer(s1) : sub1bit_defer(s1);
    }
  }

  void run_globals(model::Model& model, json& report) override {
    json list = json::array();
    for (QuantSlot& s : global_slots(model.family(), model.globals())) {
      const auto c = codec_for(s);
      if (!c) continue;
      json m;
      const MatrixRM w = runtime::to_matrix(*s.tensor);
      auto enc = quant::rtn(w.data(), w.rows(), w.cols(), *c);
      m["method"] = "rtn";
      if (method_ == QuantizeMethod::Gptq) m["note"] = "rtn: no Hessian is collected for " + s.cls;
      finish_slot(model, s, std::move(enc), *c, m);
      list.push_back(m);
    }
    if (!list.empty()) report["matrices"] = list;
  }

 private:
  struct Override {
    std::string path;  // JSON path of the value it came from
    std::string pattern, text;
    std::regex re;
    std::optional<quant::CodecSpec> codec;
  };

  // The codecs the pass applies, for messages ("int4:g64:asym for experts, keep for router").
  std::string used_codecs() const {
    std::string out;
    for (const auto& c : kClasses) {
      const auto& cc = class_codec_.at(c.key);
      if (cc) out += (out.empty() ? "" : ", ") + quant::to_string(*cc) + " for " + c.key;
    }
    for (const auto& ov : overrides_)
      if (ov.codec) out += (out.empty() ? "" : ", ") + quant::to_string(*ov.codec) + " for " + ov.pattern;
    return out.empty() ? "every class kept" : out;
  }

  // The tensor class (model::OutTensor::cls) of a slot class.
  static std::string out_class(const std::string& cls) {
    if (cls == "shared") return "shared_experts";
    if (cls == "shared_gate") return "shared_expert_gate";
    if (cls == "dense") return "dense_mlp";
    return cls;
  }

  // Every tensor the pass can quantize: (on-disk name, slot class).
  static std::vector<std::pair<std::string, std::string>> quantizable(const model::Model& m) {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto& layer : m.layers()) {
      model::Layer L = layer;  // views: the slots point into this copy
      for (const auto& sl : layer_slots(m.family(), L)) out.push_back({sl.name, sl.cls});
    }
    for (const auto& rn : m.family().globals)
      if ((rn.role == "embed" || rn.role == "lm_head") && m.globals().count(rn.role))
        out.push_back({rn.name, rn.role == "embed" ? "embeddings" : "lm_head"});
    return out;
  }

 public:
  // Every tensor_type rule must be the first to match at least one tensor the pass can quantize.
  // Records the classes each rule's codec applies to (encodes()).
  void check_model(const model::Model& m) const override {
    check_smooth_align(m);
    check_block_rows(m);
    const auto q = quantizable(m);
    // Mixed precision sets the width of every routed expert matrix: a keep or a rule for them
    // would be overridden silently.
    if (avg_bits_) {
      if (!class_codec_.at("experts"))
        throw Error::invalid(avg_path_ + ": mixed precision plans the routed experts' widths, but they are kept (experts "
                             "keep): quantize them, or drop avg_bits");
      for (const auto& [name, cls] : q)
        for (const auto& ov : overrides_)
          if (cls == "experts" && std::regex_search(name, ov.re))
            throw Error::invalid(ov.path + ": rule \"" + ov.pattern + "=" + ov.text + "\" matches " + name +
                                 ", a routed expert tensor whose width avg_bits plans; the two do not combine (narrow the "
                                 "rule to other tensors, or drop avg_bits)");
    }
    std::vector<std::string> taken(overrides_.size());  // per rule: a tensor it matches that an earlier rule takes
    std::vector<bool> applies(overrides_.size(), false);
    override_classes_.clear();
    for (const auto& [name, cls] : q) {
      bool first = true;
      for (size_t k = 0; k < overrides_.size(); ++k) {
        if (!std::regex_search(name, overrides_[k].re)) continue;
        if (first) {
          applies[k] = true;
          if (overrides_[k].codec) override_classes_.insert(out_class(cls));
          first = false;
        } else if (taken[k].empty()) {
          taken[k] = name;
        }
      }
    }
    for (size_t k = 0; k < overrides_.size(); ++k) {
      if (applies[k]) continue;
      const Override& ov = overrides_[k];
      const std::string rule = ov.path + ": rule \"" + ov.pattern + "=" + ov.text + "\"";
      if (!taken[k].empty())
        throw Error::invalid(rule + " matches only tensors an earlier rule takes (the first match wins), e.g. " + taken[k]);
      for (const auto& o : m.outputs(model::OutputOptions{})) {
        const std::string& name = o.weight.empty() ? o.name : o.weight;
        if (std::regex_search(name, ov.re))
          throw Error::invalid(rule + " matches only tensors quantize never encodes, e.g. " + name + " (" + o.cls +
                               "; norms, biases and buffers stay as stored)");
      }
      throw Error::invalid(rule + " matches no tensor of the model (a rule is a regular expression searched in on-disk "
                           "names such as " + (q.empty() ? std::string("?") : q.front().first) + ")");
    }
  }

  // A ggml block codec (q4_k, ...) needs rows of whole blocks: refused before any work, naming the
  // tensor, not when the layer is reached.
  void check_block_rows(const model::Model& m) const {
    auto check = [](const QuantSlot& s, const std::optional<quant::CodecSpec>& c) {
      if (!c || c->kind != quant::CodecSpec::Kind::Ggml || s.tensor->rank() != 2 || s.tensor->dim(1) % c->group == 0) return;
      throw Error::invalid(s.name + ": rows of " + std::to_string(s.tensor->dim(1)) + " values are not whole " +
                           quant::to_string(*c) + " blocks of " + std::to_string(c->group) +
                           ": give it another codec with a tensor_type rule (the blocks of 32 of q8_0, q4_0, q4_1, q5_0, q5_1, or an int "
                           "codec) or keep " +
                           s.cls);
    };
    for (const auto& layer : m.layers()) {
      model::Layer L = layer;  // views: the slots point into this copy
      for (const auto& sl : layer_slots(m.family(), L)) check(sl, codec_for(sl));
    }
    // Mixed precision gives every width to every routed expert matrix.
    if (avg_bits_)
      for (const auto& w : widths_)
        for (const auto& layer : m.layers())
          if (w.kind == quant::CodecSpec::Kind::Ggml && layer.moe && !layer.moe->experts.empty())
            for (const core::Tensor* t : {&layer.moe->experts[0].gate, &layer.moe->experts[0].up, &layer.moe->experts[0].down})
              if (t->rank() == 2 && t->dim(1) % w.group != 0)
                throw Error::invalid(widths_path_ + ": " + quant::to_string(w) + " needs rows of whole blocks of " +
                                     std::to_string(w.group) + ", but the routed experts of layer " +
                                     std::to_string(layer.index) + " have rows of " + std::to_string(t->dim(1)) +
                                     " values (mixed precision may give any width to any expert matrix)");
    auto globals = m.globals();  // views: the slots point into this copy
    for (const QuantSlot& s : global_slots(m.family(), globals)) check(s, codec_for(s));
  }

  // Smoothing folds into the post-attention norm and rescales every reader of its output: each
  // MoE layer needs the norm weight, and a reader stored encoded must be quantized by this pass
  // (kept, it would be written dense). Router alignment refits routers kept in their dtype.
  void check_smooth_align(const model::Model& m) const {
    if (!smooth_ && !align_router_) return;
    // A zero-centred norm (qwen3_next: x (1 + w)) takes the scales as (1 + w) / s - 1, which its
    // bf16 weight does not hold exactly, unlike w / s with power-of-two scales.
    if (smooth_ && m.family().zero_centred_norm)
      throw Error::unsupported(smooth_path_ + ": smoothing into " + m.family().model_type +
                               "'s zero-centred post-attention norm is not implemented (give smooth false)");
    for (const auto& layer : m.layers()) {
      if (!layer.moe) continue;
      model::Layer L = layer;  // views: the slots point into this copy
      if (smooth_ && !L.find("post_attn_norm"))
        throw Error::invalid(smooth_path_ + ": layer " + std::to_string(L.index) +
                             " has no post-attention norm weight to fold the scales into (give smooth false)");
      for (const auto& sl : layer_slots(m.family(), L)) {
        const bool reads = (sl.cls == "experts" || sl.cls == "shared") ? sl.type < 2 : sl.cls == "shared_gate" || sl.cls == "router";
        if (!reads) continue;
        const auto c = codec_for(sl);
        if (smooth_ && !c && sl.tensor->encoding())
          throw Error::invalid(smooth_path_ + ": " + sl.name + " is stored encoded (" + sl.tensor->encoding()->name() +
                               ") and kept by this pass, so scaling its columns would write it dense: quantize its class "
                               "too, or convert --materialize the input first");
        if (align_router_ && sl.cls == "router" && c)
          throw Error::invalid(align_path_ + ": re-fits the router in its dtype, but a tensor_type rule quantizes " + sl.name +
                               " (" + quant::to_string(*c) + "); keep the router");
      }
    }
  }

  std::vector<std::string> run_warnings() const override {
    std::vector<std::string> w;
    if (!budget_note_.empty()) w.push_back(budget_note_);
    if (align_router_ && align_layers_ > 0 && aligned_layers_ == 0)
      w.push_back("align_router: no MoE layer's top-k agreement with the input model rose on the calibration tokens, so "
                  "every router was kept as it was");
    return w;
  }

  // Classes this pass quantizes that the input already encodes: dequantized, then coded anew.
  std::vector<std::string> dequantizes(const EncodedClasses& encoded) const override {
    std::vector<std::string> out;
    for (const auto& [cls, names] : encodes()) {
      auto it = encoded.find(cls);
      if (it == encoded.end()) continue;
      std::string enc;
      for (const auto& n : it->second) enc += (enc.empty() ? "" : ", ") + n;
      out.push_back(cls + " stored as " + enc + " are dequantized and quantized again (" + used_codecs() +
                    "): the earlier encoding is replaced, not kept");
    }
    return out;
  }
  EncodedClasses encodes() const override {
    EncodedClasses out;
    auto add = [&](const std::string& cls, const quant::CodecSpec& c) {
      out[out_class(cls)].insert(sub1bit_                                  ? std::string("ternary-dict")
                                 : c.kind == quant::CodecSpec::Kind::Int  ? std::string("intN")
                                 : c.kind == quant::CodecSpec::Kind::Ggml ? "gguf-" + quant::to_string(c)
                                                                          : std::string("ternary"));
    };
    for (const auto& [cls, c] : class_codec_)
      if (c) add(cls, *c);
    for (const auto& cls : override_classes_) out[cls].insert("intN or ternary (tensor_type)");
    return out;
  }

 private:
  static std::string fmt(double v) {
    char b[32];
    std::snprintf(b, sizeof b, "%.4g", v);
    return b;
  }

  // sub1bit codes QMoE's ternary grid: every codec the pass applies must be ternary-minmax, one
  // group per row. A refusal names the key (flag) that set the codec, then the classes it covers.
  void check_sub1bit(const Options& o) const {
    const std::string path = o.key_path("sub1bit");
    auto bad = [&](const quant::CodecSpec& c, const std::string& source, const std::string& what) {
      if (c.kind == quant::CodecSpec::Kind::Ternary && c.grid == quant::TernaryGrid::MinMax && c.group == 0) return;
      throw Error::invalid(path + ": sub-1-bit coding needs ternary-minmax row codecs (e.g. ternary, ternary:t0.7), found " +
                           quant::to_string(c) + " from " + source + " (" + what + ")");
    };
    if (avg_bits_) throw Error::invalid(path + ": sub-1-bit coding and mixed precision (avg_bits) do not combine");
    std::string from_codec;  // the classes --codec covers, in table order
    for (const auto& c : kClasses)
      if (class_text_.at(c.key) == "codec") from_codec += (from_codec.empty() ? "" : ", ") + std::string(c.key);
    if (!from_codec.empty()) bad(codec_, o.key_path("codec"), from_codec);
    for (const auto& c : kClasses) {
      const auto& cc = class_codec_.at(c.key);
      if (cc && class_text_.at(c.key) != "codec") bad(*cc, o.key_path(c.key), c.key);
    }
    for (const auto& ov : overrides_)
      if (ov.codec) bad(*ov.codec, ov.path, "tensor_type " + ov.pattern);
  }

  // A codec spelling with the pass's group and symmetry applied where it names none.
  quant::CodecSpec spec_of(const std::string& text, const std::string& path) {
    std::string t = text;
    try {
      quant::CodecSpec probe = quant::parse_codec(t);
      if (probe.kind == quant::CodecSpec::Kind::Int) {
        if (t.find(":g") == std::string::npos && t.find(":row") == std::string::npos) {
          t += group_ == 0 ? ":row" : ":g" + std::to_string(group_);
          group_applied_ = true;
        }
        if (t.find(":sym") == std::string::npos && t.find(":asym") == std::string::npos) {
          t += sym_ ? ":sym" : ":asym";
          sym_applied_ = true;
        }
      }
      return quant::parse_codec(t);
    } catch (const Error& e) {
      throw Error::invalid(path + ": " + e.message());
    }
  }

  std::optional<quant::CodecSpec> codec_for(const QuantSlot& s) const {
    for (const auto& ov : overrides_)
      if (std::regex_search(s.name, ov.re)) return ov.codec;
    const auto it = class_codec_.find(s.cls);
    return it == class_codec_.end() ? std::nullopt : it->second;
  }

  static double expert_bits(const quant::CodecSpec& c, const model::Mlp& m) {
    double bits = 0, params = 0;
    for (const core::Tensor* t : {&m.gate, &m.up, &m.down}) {
      const double p = static_cast<double>(t->dim(0) * t->dim(1));
      bits += quant::bits_per_param(c, t->dim(0), t->dim(1)) * p;
      params += p;
    }
    return bits / params;
  }

  int64_t threshold(int64_t cols) const { return min_tokens_ > 0 ? min_tokens_ : cols; }

  // Binds routed expert e's Grams to its slots (computed now; gate and up share the input Gram)
  // and tops up those below the token threshold: their Hessian + (threshold − n) tokens' worth of
  // the all-token one (gate/up: the MoE input over all tokens; down: the expert's intermediate
  // activations over all tokens, the expert run on every token, with its weights as they are
  // before any of its matrices is quantized). Topped up in place (the Grams are scratch of this
  // layer; a later pass recomputes them), each Gram once. llama4 (scaled_inputs_): the expert's
  // all-token input is what it would receive if routed, x_t times sigmoid(router_e · x_t) for
  // every token t; gate/up get that input's Gram over the N tokens, down its intermediate's.
  void bind_expert(pipeline::InputGrams& g, const MatrixRM* X, const model::MoeBlock& moe, std::vector<QuantSlot>& slots,
                   const std::vector<std::optional<quant::CodecSpec>>& codec, int e) const {
    std::map<const calib::MatrixD*, int64_t> done;  // Gram -> the count it was topped up to
    MatrixRM xs;  // llama4: expert e's input on every token (computed on first use)
    auto all_token_inputs = [&]() -> const MatrixRM& {
      if (!X || X->rows() == 0) throw Error::internal("quantize: no block inputs for the all-token Hessian");
      if (!scaled_inputs_) return *X;
      if (!every_expert_) throw Error::internal("quantize: no routing of every token for the scaled top-up");
      if (xs.size() == 0) {
        xs = *X;
        runtime::scale_expert_inputs(xs, *every_expert_, all_rows_, e);
      }
      return xs;
    };
    for (size_t i = 0; i < slots.size(); ++i) {
      QuantSlot& s = slots[i];
      if (s.expert != e || s.cls != "experts") continue;
      calib::MatrixD& gram = s.type < 2 ? g.expert_in(e) : g.expert_mid(e);
      s.gram = &gram;
      s.topped_to = 0;
      const int64_t cols = s.tensor->dim(1), need = threshold(cols);
      if (!codec[i] || s.tokens >= need) continue;
      if (auto it = done.find(s.gram); it != done.end()) {
        s.topped_to = it->second;
        continue;
      }
      auto top_up = [&](const MatrixRM& a) {  // + (need − n) tokens' worth of the Gram of a's rows
        const Eigen::MatrixXd ad = a.cast<double>();
        if (!gram.size()) gram = calib::MatrixD::Zero(ad.cols(), ad.cols());
        gram.noalias() += (static_cast<double>(need - s.tokens) / static_cast<double>(ad.rows())) * (ad.transpose() * ad);
      };
      if (s.type < 2 && !scaled_inputs_) {
        if (moe_all_n_ <= 0) continue;  // no calibration token at all: nothing to top up from
        if (!gram.size()) gram = calib::MatrixD::Zero(moe_all_.rows(), moe_all_.cols());
        gram += moe_all_ * (static_cast<double>(need - s.tokens) / static_cast<double>(moe_all_n_));
      } else if (s.type < 2) {
        if (!X || X->rows() == 0) continue;  // no calibration token at all: nothing to top up from
        top_up(all_token_inputs());
      } else {
        MatrixRM h;
        runtime::mlp_forward(runtime::convert_mlp(moe.experts[static_cast<size_t>(e)]), all_token_inputs(), &h);
        top_up(h);
      }
      s.topped_to = need;
      done[s.gram] = need;
    }
  }
  // The routed experts' slots over MPI ranks: each rank encodes the experts it owns (binding only
  // their Grams), then every rank receives every encoding (passes/encoding_exchange.h) into
  // `split`, indexed by slot, with the report entry its owner measured. Experts whose encodings
  // mixed precision already chose (chosen[i]) are not encoded again.
  void split_experts(pipeline::LayerContext& ctx, std::vector<QuantSlot>& slots,
                     const std::vector<std::optional<quant::CodecSpec>>& codec,
                     const std::vector<std::shared_ptr<const core::Encoding>>& chosen, std::vector<EncodedSlot>& split,
                     json& rep) const {
    const runtime::mpi::World& world = runtime::mpi::World::get();
    const bool gptq = method_ == QuantizeMethod::Gptq;
    auto routed = [&](size_t i) { return codec[i] && !chosen[i] && slots[i].cls == "experts"; };
    bool any = false;  // the same on every rank: nothing to split (layer-scope mixed precision chose every encoding)
    for (size_t i = 0; i < slots.size(); ++i) any = any || routed(i);
    if (!any) return;
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<EncodedSlot> mine;
    int bound = -1;
    for (size_t i = 0; i < slots.size(); ++i) {
      if (!routed(i) || !world.owns(slots[i].expert)) continue;
      if (gptq && slots[i].expert != bound) {
        if (bound >= 0) unbind_expert(*ctx.grams, slots, bound);
        bound = slots[i].expert;
        bind_expert(*ctx.grams, ctx.block_inputs, *ctx.target.moe, slots, codec, bound);
      }
      EncodedSlot e{i, nullptr, json::object()};
      e.encoding = encode(slots[i], *codec[i], e.report);
      mine.push_back(std::move(e));
    }
    if (bound >= 0) unbind_expert(*ctx.grams, slots, bound);
    const double encode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    json mpi;
    for (EncodedSlot& e : exchange_encodings(mine, mpi)) {
      if (e.slot >= slots.size() || !routed(e.slot) || split[e.slot].encoding)
        throw Error::internal("quantize: mpi: slot " + std::to_string(e.slot) + " received twice or not a routed expert's");
      split[e.slot] = std::move(e);
    }
    for (size_t i = 0; i < slots.size(); ++i)
      if (routed(i) && !split[i].encoding) throw Error::internal("quantize: mpi: no rank encoded " + slots[i].what);
    mpi["encode_seconds"] = encode_seconds;  // this rank's share of the work, before the exchange
    rep["mpi"] = mpi;
  }

  // Drops routed expert e's Grams once its slots are done.
  static void unbind_expert(pipeline::InputGrams& g, std::vector<QuantSlot>& slots, int e) {
    for (QuantSlot& s : slots)
      if (s.expert == e && s.cls == "experts") s.gram = nullptr;
    g.release(e);
  }

  // GPTQ or RTN of one slot; fills the report entry. Errors (a NaN in the weight) name the tensor.
  std::shared_ptr<const core::Encoding> encode(const QuantSlot& s, const quant::CodecSpec& c, json& m) const {
    return core::with_context(s.name, [&] { return encode_named(s, c, m); });
  }
  std::shared_ptr<const core::Encoding> encode_named(const QuantSlot& s, const quant::CodecSpec& c, json& m) const {
    const MatrixRM w = runtime::to_matrix(*s.tensor);
    if (method_ == QuantizeMethod::Rtn) {
      m["method"] = "rtn";
      return quant::rtn(w.data(), w.rows(), w.cols(), c);
    }
    if (!s.gram) throw Error::internal("quantize: no Hessian for " + s.what);
    quant::GptqOptions go;
    go.damp = damp_ ? *damp_ : (c.kind == quant::CodecSpec::Kind::Ternary ? 0.1 : 0.01);
    go.block = block_;
    go.act_order = act_order_.value_or(k_quant(c));
    quant::GptqInfo info;
    const calib::MatrixD& H = *s.gram;  // symmetric: storage order does not matter
    auto enc = quant::gptq(w.data(), w.rows(), w.cols(), H.data(), c, go, &info);
    m["method"] = info.rtn_fallback ? "rtn" : "gptq";
    m["act_order"] = go.act_order;
    m["tokens"] = s.tokens;
    if (s.topped_to > 0)
      m["hessian"] = (s.tokens == 0 ? "all tokens (no routed token), as " + std::to_string(s.topped_to) + " tokens"
                                    : "routed tokens topped up with the all-token Hessian to " + std::to_string(s.topped_to) + " tokens") +
                     (scaled_inputs_ ? std::string(", each token's input x scaled by the expert's score sigmoid(router_e · x) "
                                                   "as if routed to it")
                                     : std::string());
    else
      m["hessian"] = s.expert >= 0 ? "routed tokens" : "all tokens";
    m["damp"] = info.damp_used;
    if (info.dead_columns) m["dead_columns"] = info.dead_columns;
    m["proxy_loss"] = info.proxy_loss_gptq;
    m["rtn_proxy_loss"] = info.proxy_loss_rtn;
    if (info.cholesky_retries) m["cholesky_retries"] = info.cholesky_retries;
    if (info.rtn_fallback)
      m["note"] = "Cholesky of the damped Hessian failed after " + std::to_string(info.cholesky_retries) +
                  " damping increases: round to nearest";
    return enc;
  }

  // Replaces the slot's tensor by its encoding, handing back the source's mapped pages first (read,
  // no longer needed: memory holds the experts being worked on, not the layer's source).
  static void finish_slot(const model::Model& model, const QuantSlot& s, std::shared_ptr<const core::Encoding> enc,
                          const quant::CodecSpec& c, json& m) {
    model.release_pages(*s.tensor);
    const core::DType d = s.tensor->dtype();
    const core::DType logical = (d == core::DType::F32 || d == core::DType::BF16 || d == core::DType::F16) ? d : core::DType::BF16;
    m["matrix"] = s.what;
    m["codec"] = quant::to_string(c);
    json written = enc->params();  // what is stored, from the encoding itself
    written["encoding"] = enc->name();
    m["written"] = written;
    m["bits_per_param"] = quant::bits_per_param(c, s.tensor->dim(0), s.tensor->dim(1));
    *s.tensor = core::Tensor::encoded(std::move(enc), logical);
  }

  // Sparsity scaled by importance: routed expert e's ternary zero threshold becomes
  //   τ_e = min(1, τ · clamp((mean_f / f_e)^γ, 1/2, 2))
  // with f_e the calibration tokens routed to e (count) and mean_f their mean over the layer's
  // experts: a rarely used expert gets a larger threshold (more zeros, fewer sub-1-bit bits), a
  // busy one a smaller one; an expert no token reached gets 2τ. Reported per expert.
  void scale_thresholds(const pipeline::LayerContext& ctx, const std::vector<QuantSlot>& slots,
                        std::vector<std::optional<quant::CodecSpec>>& codec, json& rep) const {
    if (!ctx.stats) throw Error::internal("quantize: threshold_scale without statistics");
    const std::vector<double>& f = ctx.stats->count;
    double mean = 0;
    for (double v : f) mean += v;
    mean /= f.empty() ? 1.0 : static_cast<double>(f.size());
    json experts = json::array();
    std::vector<double> tau_e(f.size(), 0.0);
    for (size_t i = 0; i < slots.size(); ++i) {
      const int e = slots[i].expert;
      if (e < 0 || !codec[i] || codec[i]->kind != quant::CodecSpec::Kind::Ternary) continue;
      if (static_cast<size_t>(e) >= f.size())
        throw Error::internal("quantize: statistics for " + std::to_string(f.size()) + " experts, expert " + std::to_string(e));
      const double fe = f[static_cast<size_t>(e)];
      const double scale = fe > 0 ? std::clamp(std::pow(mean / fe, gamma_), 0.5, 2.0) : 2.0;
      codec[i]->threshold = std::min(1.0, codec[i]->threshold * scale);
      tau_e[static_cast<size_t>(e)] = codec[i]->threshold;
    }
    for (size_t e = 0; e < f.size(); ++e)
      experts.push_back({{"expert", static_cast<int>(e)}, {"tokens", f[e]}, {"threshold", tau_e[e]}});
    rep["threshold_scale"] = {{"rule", "tau_e = min(1, tau * clamp((mean_f / f_e)^gamma, 1/2, 2)), f = routed tokens"},
                              {"gamma", gamma_}, {"experts", experts}};
  }

  // MC-MoE's items of one MoE layer: per routed expert, its importance (routed-token and
  // routing-weight shares) and the relative output error on its routed tokens with its three
  // matrices quantized at each width; with `encs`, those encodings too (encs[e][o][type]).
  using ExpertEncodings = std::vector<std::vector<std::array<std::shared_ptr<const core::Encoding>, 3>>>;
  struct ExpertItems {
    std::vector<quant::MixedItem> items;
    std::vector<double> count;  // routed tokens per expert
    double output_energy = 0;   // Σ_t ||MoE block output_t||² on the calibration tokens
  };
  ExpertItems expert_items(const model::MoeBlock& moe, const runtime::RoutingRule& routing, const MatrixRM* X,
                           pipeline::InputGrams* grams, std::vector<QuantSlot>& slots,
                           const std::vector<std::optional<quant::CodecSpec>>& codec, ExpertEncodings* encs) const {
    if (!X || X->rows() == 0)
      throw Error::invalid("quantize: avg_bits needs calibration text (the experts' output error is measured on it)");
    const int64_t E = static_cast<int64_t>(moe.experts.size());
    const runtime::MoeWeights mw = runtime::convert_moe(moe);
    runtime::MoeDetail detail;
    const MatrixRM block_out = runtime::moe_forward(mw, routing, *X, &detail);
    ExpertItems out;
    out.output_energy = static_cast<double>(block_out.cast<double>().squaredNorm());
    // Importance: routed-token share and routing-weight share.
    std::vector<double>& count = out.count;
    count.assign(static_cast<size_t>(E), 0.0);
    std::vector<double> wsum(static_cast<size_t>(E), 0.0);
    const auto& ids = detail.routing.ids;
    const auto& wts = detail.routing.weights;
    for (int64_t t = 0; t < ids.rows(); ++t)
      for (int64_t k = 0; k < ids.cols(); ++k) {
        const int e = ids(t, k);
        count[static_cast<size_t>(e)] += 1;
        wsum[static_cast<size_t>(e)] += wts(t, k);
      }
    double ctot = 0, wtot = 0;
    for (int64_t e = 0; e < E; ++e) ctot += count[static_cast<size_t>(e)], wtot += wsum[static_cast<size_t>(e)];
    if (encs) encs->assign(static_cast<size_t>(E), {});
    const bool gptq = method_ == QuantizeMethod::Gptq;
    for (int64_t e = 0; e < E; ++e) {
      const size_t ue = static_cast<size_t>(e);
      const auto& toks = detail.tokens[ue];
      MatrixRM xe;
      if (toks.empty()) xe = *X;
      else {
        xe.resize(static_cast<int64_t>(toks.size()), X->cols());
        for (size_t i = 0; i < toks.size(); ++i) xe.row(static_cast<int64_t>(i)) = X->row(toks[i]);
      }
      const runtime::MlpWeights orig = runtime::convert_mlp(moe.experts[ue]);
      const MatrixRM y = runtime::mlp_forward(orig, xe);
      const double ynorm = std::max(1e-30, static_cast<double>(y.squaredNorm()));
      quant::MixedItem it;
      it.name = "expert " + std::to_string(e);
      it.params = 0;
      for (const core::Tensor* t : {&moe.experts[ue].gate, &moe.experts[ue].up, &moe.experts[ue].down})
        it.params += static_cast<double>(t->dim(0) * t->dim(1));
      it.importance = quant::mc_moe_importance(ctot > 0 ? count[ue] / ctot : 0.0, wtot > 0 ? wsum[ue] / wtot : 0.0,
                                               alpha_, beta_);
      if (encs) (*encs)[ue].resize(widths_.size());
      if (gptq) bind_expert(*grams, X, moe, slots, codec, static_cast<int>(e));
      for (size_t o = 0; o < widths_.size(); ++o) {
        runtime::MlpWeights q = orig;
        MatrixRM* dst[3] = {&q.gate, &q.up, &q.down};
        for (size_t i = 0; i < slots.size(); ++i) {
          if (slots[i].expert != e || slots[i].cls != "experts") continue;
          json m;
          auto enc = encode(slots[i], widths_[o], m);
          MatrixRM deq(enc->rows(), enc->cols());
          enc->dequantize_rows(0, enc->rows(), deq.data());
          *dst[slots[i].type] = std::move(deq);
          if (encs) (*encs)[ue][o][static_cast<size_t>(slots[i].type)] = std::move(enc);
        }
        const MatrixRM yq = runtime::mlp_forward(q, xe);
        it.loss.push_back(static_cast<double>((yq - y).squaredNorm()) / ynorm);
      }
      if (gptq) unbind_expert(*grams, slots, static_cast<int>(e));
      out.items.push_back(std::move(it));
    }
    return out;
  }

  std::vector<quant::WidthOption> width_options(const model::MoeBlock& moe) const {
    std::vector<quant::WidthOption> options;
    for (const auto& w : widths_) options.push_back({quant::to_string(w), expert_bits(w, moe.experts[0])});
    return options;
  }

  // MC-MoE: per routed expert and width, quantize its three matrices and measure the relative
  // output error on its routed tokens; choose widths by the integer program over this layer's
  // experts (budget_scope layer), or take the widths the planning sweep chose over the whole model
  // (budget_scope model); set the experts' codecs in `codec` and, for a layer budget, keep the
  // chosen encodings in `chosen`.
  void mixed_precision(pipeline::LayerContext& ctx, std::vector<QuantSlot>& slots,
                       std::vector<std::optional<quant::CodecSpec>>& codec,
                       std::vector<std::shared_ptr<const core::Encoding>>& chosen, json& rep) {
    const model::MoeBlock& moe = *ctx.target.moe;
    const int64_t E = static_cast<int64_t>(moe.experts.size());
    const std::vector<quant::WidthOption> options = width_options(moe);
    if (model_scope_budget()) {
      auto it = planned_widths_.find(ctx.layer);
      if (it == planned_widths_.end() || static_cast<int64_t>(it->second.size()) != E)
        throw Error::internal("quantize: no planned widths for layer " + std::to_string(ctx.layer));
      json experts = json::array();
      double bits = 0, params = 0;
      for (int64_t e = 0; e < E; ++e) {
        const int o = it->second[static_cast<size_t>(e)];
        double p = 0;
        for (size_t i = 0; i < slots.size(); ++i) {
          if (slots[i].expert != e || slots[i].cls != "experts") continue;
          codec[i] = widths_[static_cast<size_t>(o)];
          p += static_cast<double>(slots[i].tensor->dim(0) * slots[i].tensor->dim(1));
        }
        bits += p * options[static_cast<size_t>(o)].bits_per_param, params += p;
        experts.push_back({{"expert", e}, {"codec", options[static_cast<size_t>(o)].codec},
                           {"bits_per_param", options[static_cast<size_t>(o)].bits_per_param}});
      }
      rep["mixed_precision"] = {{"scope", "model"}, {"avg_bits", *avg_bits_},
                                {"layer_avg_bits", params > 0 ? bits / params : 0.0},
                                {"widths", "planned over the whole model (\"plans\" in the report)"},
                                {"experts", experts}};
      return;
    }
    ExpertEncodings encs;
    const ExpertItems ei = expert_items(moe, ctx.routing, ctx.block_inputs, ctx.grams, slots, codec, &encs);
    const quant::MixedResult res = quant::choose_widths(ei.items, options, *avg_bits_);
    json experts = json::array();
    for (int64_t e = 0; e < E; ++e) {
      const size_t ue = static_cast<size_t>(e);
      const int o = res.choice[ue];
      experts.push_back({{"expert", e}, {"codec", options[static_cast<size_t>(o)].codec},
                         {"bits_per_param", options[static_cast<size_t>(o)].bits_per_param},
                         {"importance", ei.items[ue].importance},
                         {"loss", ei.items[ue].loss[static_cast<size_t>(o)]},
                         {"routed_tokens", static_cast<int64_t>(ei.count[ue])}});
      for (size_t i = 0; i < slots.size(); ++i) {
        if (slots[i].expert != e || slots[i].cls != "experts") continue;
        codec[i] = widths_[static_cast<size_t>(o)];
        chosen[i] = encs[ue][static_cast<size_t>(o)][static_cast<size_t>(slots[i].type)];
      }
    }
    rep["mixed_precision"] = {{"scope", "layer"}, {"avg_bits", *avg_bits_}, {"achieved_avg_bits", res.avg_bits},
                              {"objective", res.objective}, {"status", res.status}, {"experts", experts}};
  }

  // Expert-aware smoothing of one MoE layer (passes/smooth.h): the scales from the block inputs
  // of the calibration tokens, folded into the post-attention norm and every reader's columns;
  // the block inputs and the readers' input Grams are rescaled to match (x/s, S⁻¹ G S⁻¹), so GPTQ
  // and the rest of the layer see the smoothed model.
  void smooth_layer(pipeline::LayerContext& ctx, json& rep) {
    const MatrixRM* X = ctx.block_inputs;
    if (!X || X->rows() == 0)
      throw Error::invalid(smooth_path_ + ": needs calibration text (the per-channel maxima of the block inputs are measured on it)");
    model::Layer& L = ctx.target;
    model::MoeBlock& b = *L.moe;
    const core::DType dense = ctx.model.materialize_dtype();
    runtime::MoeWeights rw;
    rw.router = runtime::to_matrix(b.router);
    if (b.router_bias) rw.router_bias = runtime::to_row(*b.router_bias);
    const runtime::RoutingResult routing =
        runtime::route(ctx.routing, runtime::router_logits(rw, ctx.routing, *X), runtime::choice_bias(rw, ctx.routing));
    const auto tokens = runtime::tokens_per_expert(routing, b.num_experts());
    auto stacked = [](std::initializer_list<const core::Tensor*> ts) {
      int64_t rows = 0;
      std::vector<MatrixRM> parts;
      for (const core::Tensor* t : ts) parts.push_back(runtime::to_matrix(*t)), rows += parts.back().rows();
      MatrixRM m(rows, parts.front().cols());
      int64_t r = 0;
      for (const auto& p : parts) m.middleRows(r, p.rows()) = p, r += p.rows();
      return m;
    };
    std::vector<MatrixRM> weights;
    weights.reserve(b.experts.size() + 2);
    std::vector<SmoothReader> readers;
    for (size_t e = 0; e < b.experts.size(); ++e) {
      if (b.experts[e].is_novice()) continue;
      weights.push_back(stacked({&b.experts[e].gate, &b.experts[e].up}));
      readers.push_back({&weights.back(), &tokens[e]});
    }
    if (b.shared) {
      weights.push_back(b.shared_gate ? stacked({&b.shared->gate, &b.shared->up, &*b.shared_gate})
                                      : stacked({&b.shared->gate, &b.shared->up}));
      readers.push_back({&weights.back(), nullptr});
    }
    readers.push_back({&rw.router, nullptr});
    const std::vector<double> s = smoothing_scales(*X, readers, smooth_alpha_);
    const int64_t H = X->cols();
    Eigen::VectorXd inv(H);
    for (int64_t j = 0; j < H; ++j) inv(j) = 1.0 / s[static_cast<size_t>(j)];

    // The fold: norm weight (and bias) / s, readers' columns * s, each in its own dtype.
    for (const char* role : {"post_attn_norm", "post_attn_norm_bias"}) {
      auto it = L.tensors.find(role);
      if (it == L.tensors.end()) continue;
      runtime::RowVector v = runtime::to_row(it->second);
      std::vector<float> out(static_cast<size_t>(H));
      for (int64_t j = 0; j < H; ++j) out[static_cast<size_t>(j)] = static_cast<float>(v(j) * inv(j));
      it->second = to_tensor(out, it->second.dtype());
    }
    auto scale_columns = [&](core::Tensor& t) {
      MatrixRM m = runtime::to_matrix(t);
      for (int64_t j = 0; j < H; ++j) m.col(j) *= static_cast<float>(s[static_cast<size_t>(j)]);
      t = to_tensor_like(m, t, dense);
    };
    for (auto& e : b.experts)
      if (!e.is_novice()) scale_columns(e.gate), scale_columns(e.up);
    if (b.shared) scale_columns(b.shared->gate), scale_columns(b.shared->up);
    if (b.shared_gate) scale_columns(*b.shared_gate);
    scale_columns(b.router);

    // What the rest of the layer reads: x / s and S⁻¹ G S⁻¹.
    if (ctx.grams) ctx.grams->scale_inputs(inv);
    smoothed_x_ = *X * inv.cast<float>().asDiagonal();
    ctx.block_inputs = &smoothed_x_;

    int scaled = 0, lo = 1 << 20, hi = -(1 << 20);
    for (double v : s) {
      const int ex = static_cast<int>(std::lround(std::log2(v)));
      scaled += ex != 0, lo = std::min(lo, ex), hi = std::max(hi, ex);
    }
    rep["smooth"] = {{"alpha", smooth_alpha_}, {"channels", H}, {"scaled_channels", scaled},
                     {"min_log2_scale", lo}, {"max_log2_scale", hi}, {"readers", readers.size()},
                     {"rule", "s_j = 2^round(log2 max_r max|x_r,j|^alpha / max|W_r,:,j|^(1-alpha)), r = routed experts "
                              "(their routed tokens), shared expert and router (every token)"}};
  }

  // Router alignment of one MoE layer (passes/smooth.h fit_router): kept only when the top-k
  // agreement with the input model on the calibration tokens rises.
  void align_router(pipeline::LayerContext& ctx, const MatrixRM& router_in, json& rep) {
    if (!ctx.block_inputs || !ctx.reference_inputs) throw Error::internal("quantize: align_router without block inputs");
    model::MoeBlock& b = *ctx.target.moe;
    const core::DType dense = ctx.model.materialize_dtype();
    std::optional<runtime::RowVector> bias;
    if (b.router_bias) bias = runtime::to_row(*b.router_bias);
    const core::Tensor like = b.router;
    const RouterFit f = fit_router(runtime::to_matrix(b.router), router_in, bias ? &*bias : nullptr, ctx.routing,
                                   *ctx.block_inputs, *ctx.reference_inputs, kAlignRidge,
                                   [&](const MatrixRM& m) { return runtime::to_matrix(to_tensor_like(m, like, dense)); });
    const bool accepted = f.after > f.before;
    if (accepted) b.router = to_tensor_like(f.router, like, dense);
    aligned_layers_ += accepted;
    ++align_layers_;
    rep["align_router"] = {{"tokens", f.tokens}, {"topk_agreement_before", f.before}, {"topk_agreement_after", f.after},
                           {"accepted", accepted}, {"lambda", f.lambda},
                           {"fit", "ridge least squares of the input model's router logits toward the current router"}};
  }

  static constexpr double kDefaultSmoothAlpha = 0.5;
  static constexpr double kAlignRidge = 1e-3;  // λ relative to the mean diagonal of XqᵀXq
  bool smooth_ = false, align_router_ = false;
  double smooth_alpha_ = kDefaultSmoothAlpha;
  std::string smooth_path_, align_path_;
  MatrixRM smoothed_x_;  // x / s of the layer being run
  int align_layers_ = 0, aligned_layers_ = 0;
  std::string budget_note_;  // avg_bits above the widest width (plan)
  std::string method_name_;
  QuantizeMethod method_;
  int64_t group_ = 128;
  bool sym_ = false;
  bool group_applied_ = false, sym_applied_ = false;  // whether spec_of completed a codec with them
  mutable std::set<std::string> override_classes_;     // classes the tensor_type rules encode (check_model)
  std::string codec_text_;
  quant::CodecSpec codec_;
  std::map<std::string, std::optional<quant::CodecSpec>> class_codec_;
  std::map<std::string, std::string> class_text_;
  std::vector<Override> overrides_;
  std::optional<double> damp_;
  // Unset: on for the K-quants, off for the other codecs (quantize.h).
  std::optional<bool> act_order_;
  static bool k_quant(const quant::CodecSpec& c) {
    using T = quant::GgmlType;
    return c.kind == quant::CodecSpec::Kind::Ggml &&
           (c.ggml == T::Q2_K || c.ggml == T::Q3_K || c.ggml == T::Q4_K || c.ggml == T::Q5_K || c.ggml == T::Q6_K);
  }
  int64_t block_ = 128;
  int64_t min_tokens_ = 0;
  std::optional<double> avg_bits_;
  bool model_scope_ = false;  // budget_scope model: avg_bits over every routed expert of the model
  bool model_scope_budget() const { return avg_bits_.has_value() && model_scope_; }
  // The model-wide integer program stops within this relative gap or after this time, and says
  // which (quant/mixed_precision.h: proving optimality for thousands of experts can take hours).
  static constexpr double kModelGap = 1e-4, kModelTimeLimit = 120;
  const model::FamilyDesc* family_ = nullptr;  // plan(): for the planning sweep
  runtime::RoutingRule routing_;
  struct PlanLayer {
    int layer;
    size_t first, count;  // its experts in plan_items_
    double weight;        // its losses' factor: ||MoE block output||² / ||residual leaving the layer||²
  };
  std::vector<quant::MixedItem> plan_items_;
  std::vector<quant::WidthOption> plan_options_;
  std::vector<PlanLayer> plan_layers_;
  std::map<int, std::vector<int>> planned_widths_;  // layer -> width index per expert
  bool sub1bit_ = false;
  std::string dict_scope_;  // "model" or "layer" (passes/sub1bit.h)
  bool threshold_scale_ = false;  // ternary thresholds scaled per expert by routed tokens
  double gamma_ = 0.5;
  std::string widths_text_, widths_path_, avg_path_;
  std::vector<quant::CodecSpec> widths_;
  double alpha_ = 1.0, beta_ = 1.5;
  calib::MatrixD moe_all_;             // Σ_e expert input Grams of the layer being run
  int64_t moe_all_n_ = 0;
  // llama4 (RoutingRule::scales_input): the layer's router scales each expert's input, so
  // moe_all_ is the block inputs' own Gram (the router's Hessian), and the experts' all-token
  // top-ups are of the inputs each would receive: every token routed to every expert (set when an
  // expert's top-up needs it), over the rows all_rows_ (0..N-1).
  bool scaled_inputs_ = false;
  std::optional<runtime::RoutingResult> every_expert_;
  std::vector<int32_t> all_rows_;
};

}  // namespace

// Smoothing and router alignment (passes/smooth.h), defined here beside their only user.
std::vector<double> smoothing_scales(const MatrixRM& x, const std::vector<SmoothReader>& readers, double alpha) {
  const int64_t H = x.cols();
  std::vector<double> best(static_cast<size_t>(H), 0.0);
  std::vector<double> xmax(static_cast<size_t>(H)), wmax(static_cast<size_t>(H));
  for (const SmoothReader& r : readers) {
    if (!r.weight || r.weight->cols() != H)
      throw Error::internal("smoothing: a reader's weight does not have the block input's " + std::to_string(H) + " columns");
    std::fill(xmax.begin(), xmax.end(), 0.0);
    auto take = [&](int64_t t) {
      for (int64_t j = 0; j < H; ++j) xmax[static_cast<size_t>(j)] = std::max(xmax[static_cast<size_t>(j)], std::fabs(double(x(t, j))));
    };
    if (r.tokens) {
      for (int32_t t : *r.tokens) take(t);
    } else {
      for (int64_t t = 0; t < x.rows(); ++t) take(t);
    }
    const auto col_max = r.weight->cwiseAbs().colwise().maxCoeff();
    for (int64_t j = 0; j < H; ++j) {
      const double a = xmax[static_cast<size_t>(j)], w = col_max.size() ? double(col_max(j)) : 0.0;
      if (a <= 0 || w <= 0) continue;
      best[static_cast<size_t>(j)] = std::max(best[static_cast<size_t>(j)], std::pow(a, alpha) / std::pow(w, 1.0 - alpha));
    }
  }
  for (double& s : best) s = s > 0 ? std::ldexp(1.0, static_cast<int>(std::clamp(std::round(std::log2(s)), -30.0, 30.0))) : 1.0;
  return best;
}

double topk_set_agreement(const runtime::IndexMatrix& a, const runtime::IndexMatrix& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) throw Error::internal("top-k agreement of routings of different shapes");
  if (a.rows() == 0) return 0.0;
  int64_t same = 0;
  std::vector<int32_t> ra(static_cast<size_t>(a.cols())), rb(ra.size());
  for (int64_t t = 0; t < a.rows(); ++t) {
    for (int64_t k = 0; k < a.cols(); ++k) ra[static_cast<size_t>(k)] = a(t, k), rb[static_cast<size_t>(k)] = b(t, k);
    std::sort(ra.begin(), ra.end());
    std::sort(rb.begin(), rb.end());
    same += ra == rb;
  }
  return static_cast<double>(same) / static_cast<double>(a.rows());
}

namespace {

runtime::IndexMatrix smoothing_route_ids(const MatrixRM& router, const RowVector* bias, const runtime::RoutingRule& rule, const MatrixRM& x) {
  MatrixRM logits = x * router.transpose();
  if (bias && rule.logit_bias) logits.rowwise() += *bias;
  return runtime::route(rule, logits, bias && !rule.logit_bias ? bias : nullptr).ids;
}

}  // namespace

RouterFit fit_router(const MatrixRM& current, const MatrixRM& reference, const RowVector* bias,
                     const runtime::RoutingRule& rule, const MatrixRM& xq, const MatrixRM& xr, double ridge,
                     const std::function<MatrixRM(const MatrixRM&)>& round) {
  const int64_t H = current.cols();
  if (reference.rows() != current.rows() || reference.cols() != H || xq.cols() != H || xr.cols() != H ||
      xq.rows() != xr.rows())
    throw Error::internal("router alignment: shapes do not agree");
  RouterFit fit;
  fit.tokens = xq.rows();
  const runtime::IndexMatrix want = smoothing_route_ids(reference, bias, rule, xr);
  fit.before = topk_set_agreement(smoothing_route_ids(current, bias, rule, xq), want);
  // Normal equations in f64: (XqᵀXq + λI) R'ᵀ = Xqᵀ (Xr R0ᵀ) + λ Rcᵀ. A logit bias is the same on
  // both sides and cancels.
  const Eigen::MatrixXd q = xq.cast<double>();
  Eigen::MatrixXd A = q.transpose() * q;
  fit.lambda = ridge * std::max(A.trace() / static_cast<double>(H), 1e-30);
  A.diagonal().array() += fit.lambda;
  const Eigen::MatrixXd target = xr.cast<double>() * reference.cast<double>().transpose();  // [N, E]
  const Eigen::MatrixXd B = q.transpose() * target + fit.lambda * current.cast<double>().transpose();  // [H, E]
  const Eigen::LDLT<Eigen::MatrixXd> ldlt(A);
  if (ldlt.info() != Eigen::Success) throw Error::internal("router alignment: the ridge system is not positive definite");
  const Eigen::MatrixXd Rt = ldlt.solve(B);
  fit.router = round(Rt.transpose().cast<float>());
  fit.after = topk_set_agreement(smoothing_route_ids(fit.router, bias, rule, xq), want);
  return fit;
}

std::unique_ptr<pipeline::Pass> make_quantize(const json& spec, const std::string& method, const std::string& path) {
  if (method == "delta-ternary") return make_delta_ternary(spec, path);  // passes/delta_ternary.h
  return std::make_unique<Quantize>(spec, method, path);
}

}  // namespace moe::passes
