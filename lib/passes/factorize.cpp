#include "passes/factorize.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <map>
#include <optional>

#include "core/error.h"
#include "passes/encoding_exchange.h"
#include "passes/experts.h"
#include "passes/lowrank.h"
#include "passes/options.h"
#include "passes/passes.h"
#include "quant/lowrank.h"
#include "runtime/mpi.h"
#include "runtime/weights.h"

namespace moe::passes {

using core::Error;
using nlohmann::json;
using runtime::MatrixRM;

namespace {

enum class FactorizeMethod { Svd, Asvd, Svdllm, Delta, Latent };
enum class Rule { Ratio, Rank, Energy, Budget };
enum class Scope { Model, Layer };

const std::vector<std::string> kTargets = {"experts", "shared", "attention", "dense"};

// One matrix to factorize: where it lives in the layer, its f32 value and calibration inputs.
struct FactorSlot {
  core::Tensor* tensor;      // replaced by the low-rank encoding
  std::string what;          // "expert 3 gate", "attention q_proj" (report, messages)
  const calib::MatrixD* gram = nullptr;  // Σ x xᵀ of its inputs (null: none)
  int64_t tokens = 0;        // tokens behind the Gram
  int type = 0;              // 0 gate, 1 up, 2 down (experts; groups of delta/latent by type)
  int expert = -1;           // a routed expert factorized on its own: its Gram is bound when it runs
};

core::DType factor_dtype(const core::Tensor& t) {
  const core::DType d = t.dtype();
  return (d == core::DType::F32 || d == core::DType::BF16 || d == core::DType::F16) ? d : core::DType::BF16;
}

std::shared_ptr<const core::Tensor> part(const MatrixRM& m, core::DType d) {
  return std::make_shared<const core::Tensor>(to_tensor(m, d));
}

// The largest rank k >= 0 with fixed + k·cost <= ratio·dense, and the largest that stores less
// than dense at all.
int64_t rank_within(double ratio, int64_t dense, int64_t fixed, int64_t cost) {
  const double room = ratio * static_cast<double>(dense) - static_cast<double>(fixed);
  return room <= 0 ? 0 : static_cast<int64_t>(std::floor(room / static_cast<double>(cost) + 1e-9));
}
int64_t max_saving(int64_t dense, int64_t fixed, int64_t cost) {
  return dense - fixed <= 0 ? 0 : (dense - fixed - 1) / cost;
}

class Factorize final : public pipeline::Pass {
 public:
  Factorize(const json& spec, const std::string& method, const std::string& path) : method_name_(method) {
    Options o(spec, path, "factorize/" + method);
    o.allow({"pass", "method"});
    method_ = method == "svd" ? FactorizeMethod::Svd : method == "asvd" ? FactorizeMethod::Asvd : method == "svdllm" ? FactorizeMethod::Svdllm
              : method == "delta" ? FactorizeMethod::Delta : FactorizeMethod::Latent;
    const auto ratio = o.opt_number("ratio", 0, 1, true);
    const auto rank = o.opt_int("rank", 1, int64_t{1} << 40);
    const auto energy = o.opt_number("energy", 0, 1, true);
    const auto budget = o.opt_number("budget", 0, 1, true);
    budget_key_ = o.key_path("budget");
    targets_key_ = o.key_path("targets");
    // Method-specific keys are read (and so allowed) only for their methods: elsewhere they are
    // unknown keys, with the method's allowed list.
    if (method_ == FactorizeMethod::Asvd) alpha_ = o.get_number("alpha", 0.5, 0, 10);
    if (method_ != FactorizeMethod::Svd) damp_ = o.get_number("damp", 0.01, 0, 10);
    if (method_ == FactorizeMethod::Delta) shared_v_ = o.get_bool("shared_v", false);
    const bool scope_given = o.has("budget_scope");
    scope_ = o.get_enum("budget_scope", "model", {"model", "layer"}) == "layer" ? Scope::Layer : Scope::Model;
    targets_ = {"experts"};
    o.allow({"targets"});
    if (o.has("targets")) {
      const json& t = spec.at("targets");
      std::vector<std::string> list;
      auto add_csv = [&](const std::string& x) {  // "experts,attention" as the --targets flag gives it
        for (size_t i = 0; i <= x.size();) {
          size_t j = x.find(',', i);
          if (j == std::string::npos) j = x.size();
          list.push_back(x.substr(i, j - i));
          i = j + 1;
        }
      };
      if (t.is_string()) add_csv(t.get<std::string>());
      else if (t.is_array() && !t.empty() && std::all_of(t.begin(), t.end(), [](const json& x) { return x.is_string(); }))
        for (const auto& x : t) list.push_back(x.get<std::string>());
      else
        throw Error::invalid(o.key_path("targets") + ": expected \"experts\", \"all\" or a list of experts, shared, "
                             "attention, dense; found " + json_found(t));
      targets_.clear();
      for (const auto& x : list) {
        if (x == "all") {
          targets_ = kTargets;
          continue;
        }
        if (std::find(kTargets.begin(), kTargets.end(), x) == kTargets.end())
          throw Error::invalid(o.key_path("targets") + ": unknown target \"" + x + "\"" +
                               allowed_suffix(x, {"experts", "shared", "attention", "dense", "all"}));
        if (std::find(targets_.begin(), targets_.end(), x) == targets_.end()) targets_.push_back(x);
      }
    }
    o.finish();
    const int given = ratio.has_value() + rank.has_value() + energy.has_value() + budget.has_value();
    if (given != 1)
      throw Error::invalid(path + ": give exactly one of ratio, rank, energy, budget (found " + std::to_string(given) + ")");
    if (ratio) rule_ = Rule::Ratio, value_ = *ratio;
    if (rank) rule_ = Rule::Rank, value_ = static_cast<double>(*rank);
    if (energy) rule_ = Rule::Energy, value_ = *energy;
    if (budget) rule_ = Rule::Budget, value_ = *budget;
    rule_key_ = o.key_path(ratio ? "ratio" : rank ? "rank" : energy ? "energy" : "budget");
    if (scope_given && !budget)
      throw Error::invalid(o.key_path("budget_scope") + ": applies to budget only (the other rank rules are per matrix)");
  }

  std::string name() const override { return "factorize"; }
  std::string method() const override { return method_name_; }
  json params() const override {
    std::string targets;
    for (const auto& t : targets_) targets += (targets.empty() ? "" : ",") + t;
    json p = {{"pass", "factorize"}, {"method", method_name_}, {"targets", targets}};
    const char* rule = rule_ == Rule::Ratio ? "ratio" : rule_ == Rule::Rank ? "rank" : rule_ == Rule::Energy ? "energy" : "budget";
    if (rule_ == Rule::Rank) p[rule] = static_cast<int64_t>(value_);
    else p[rule] = value_;
    if (method_ == FactorizeMethod::Asvd) p["alpha"] = alpha_;
    if (method_ != FactorizeMethod::Svd) p["damp"] = damp_;
    if (method_ == FactorizeMethod::Delta) p["shared_v"] = shared_v_;
    if (rule_ == Rule::Budget) p["budget_scope"] = scope_ == Scope::Model ? "model" : "layer";
    return p;
  }
  pipeline::Requirements requirements() const override {
    pipeline::Requirements r;
    r.input_grams = method_ != FactorizeMethod::Svd;
    r.plan_sweep = rule_ == Rule::Budget && scope_ == Scope::Model;
    return r;
  }
  int64_t experts_after(int, int64_t before, int64_t) const override { return before; }
  bool moe_layers_only() const override { return !targets("attention") && !targets("dense"); }
  bool shapes_at_run() const override { return true; }

  // What the options ask for must exist and change something: a target the model lacks, or a
  // rule that keeps every matrix dense whatever the weights (ratio 1; a rank no targeted matrix
  // can use), is refused before any work. A rule that keeps everything dense only once the
  // spectra are known (energy, budget) is a warning of the run (run_warnings).
  void check_model(const model::Model& m) const override {
    bool shared = false, dense = false;
    int64_t best = 0;  // the largest useful rank over the targeted matrices
    auto mlp = [&](const model::Mlp& x) {
      for (const core::Tensor* t : {&x.gate, &x.up, &x.down})
        if (t->rank() == 2) best = std::max(best, lowrank::max_useful_rank(t->dim(0), t->dim(1)));
    };
    for (const auto& l : m.layers()) {
      shared = shared || (l.moe && l.moe->shared);
      dense = dense || l.mlp.has_value();
      if (l.moe && targets("experts"))
        for (const auto& e : l.moe->experts) mlp(e);
      if (l.moe && l.moe->shared && targets("shared")) mlp(*l.moe->shared);
      if (l.mlp && targets("dense")) mlp(*l.mlp);
      if (targets("attention"))
        for (const auto& [role, t] : l.tensors)
          if (t.rank() == 2 && role.find("norm") == std::string::npos)
            best = std::max(best, lowrank::max_useful_rank(t.dim(0), t.dim(1)));
    }
    if (targets("shared") && !shared)
      throw Error::invalid(targets_key_ + ": shared: the model has no shared experts (" + m.family().model_type +
                           "); nothing to factorize there");
    if (targets("dense") && !dense)
      throw Error::invalid(targets_key_ + ": dense: the model has no dense (non-MoE) layers; nothing to factorize there");
    const bool single = method_ == FactorizeMethod::Svd || method_ == FactorizeMethod::Asvd || method_ == FactorizeMethod::Svdllm;
    if (single && rule_ == Rule::Ratio && value_ >= 1.0)
      throw Error::invalid(rule_key_ + ": 1 keeps every parameter, and a rank-k factorization of an [m, n] matrix stores "
                           "k(m + n), less than m·n only for k < m·n/(m + n), which ratio 1 never allows: every matrix "
                           "would stay dense (the output a copy). Give a ratio below 1");
    if (rule_ == Rule::Rank && static_cast<int64_t>(value_) > best)
      throw Error::invalid(rule_key_ + ": " + std::to_string(static_cast<int64_t>(value_)) +
                           " saves memory on no targeted matrix (the largest useful rank among them is " +
                           std::to_string(best) + ": rank k of [m, n] must be below m·n/(m + n)); every matrix would stay dense");
  }

  // Encoded targets are dequantized and factorized: the factors are floats.
  std::vector<std::string> dequantizes(const EncodedClasses& encoded) const override {
    std::vector<std::string> out;
    const std::pair<const char*, const char*> cls[] = {
        {"experts", "experts"}, {"shared", "shared_experts"}, {"attention", "attention"}, {"dense", "dense_mlp"}};
    for (const auto& [target, c] : cls) {
      auto it = encoded.find(c);
      if (!targets(target) || it == encoded.end()) continue;
      std::string names;
      for (const auto& n : it->second) names += (names.empty() ? "" : ", ") + n;
      out.push_back(std::string(c) + " stored as " + names + " are dequantized and factorized: the factors are written as "
                    "floats (bf16 unless the input's dtype is a float), the earlier encoding is not kept; "
                    "matrices kept dense keep it (factorize before quantize, docs/encodings.md)");
    }
    return out;
  }
  EncodedClasses encodes() const override {
    EncodedClasses out;
    const std::pair<const char*, const char*> cls[] = {
        {"experts", "experts"}, {"shared", "shared_experts"}, {"attention", "attention"}, {"dense", "dense_mlp"}};
    for (const auto& [target, c] : cls)
      if (targets(target)) out[c].insert("lowrank");
    return out;
  }
  std::vector<std::string> run_warnings() const override {
    if (factorized_ > 0) return {};
    return {"factorize changed no matrix: every targeted matrix was kept dense (its rank would not have saved memory; "
            "the report's \"matrices\" say why per matrix), so the output holds the input's weights"};
  }

  void run_layer(pipeline::LayerContext& ctx) override {
    json& rep = ctx.report;
    rep["matrices"] = json::array();
    notes_.clear();
    model_ = &ctx.model;
    std::vector<FactorSlot> singles;  // factorized one by one
    std::vector<FactorSlot> grouped;  // delta / latent: routed experts, by type
    collect(ctx.target, ctx.grams, singles, grouped);
    if (rule_ == Rule::Budget && scope_ == Scope::Model) {
      auto it = planned_.find(ctx.layer);
      if (it == planned_.end()) throw Error::internal("factorize: no planned ranks for layer " + std::to_string(ctx.layer));
      rep["budget"] = {{"scope", "model"}, {"ranks", "planned over the whole model (\"plans\" in the report)"}};
      apply_planned(singles, grouped, it->second, rep);
    } else if (rule_ == Rule::Budget) {
      run_budget(singles, grouped, rep);
    } else {
      // One matrix (or one group) decomposed and truncated at a time: memory one matrix. Over MPI
      // ranks, the routed experts' by their owners, exchanged (split_singles).
      std::vector<EncodedSlot> split(singles.size());
      const bool routed = std::any_of(singles.begin(), singles.end(), [](const FactorSlot& s) { return s.expert >= 0; });
      if (runtime::mpi::World::get().split() && routed) split_singles(singles, split, rep);
      for (size_t i = 0; i < singles.size(); ++i) {
        if (split[i].report.is_null()) factor_single(singles[i], decompose(singles[i]), std::nullopt, rep);
        else apply_split(singles[i], split[i], rep);
      }
      for (int type = 0; type < 3 && !grouped.empty(); ++type) {
        GroupDec gd = decompose_group(grouped, type);
        if (!gd.slots.empty()) factor_group(gd, std::nullopt, rep);
      }
    }
    end_layer();
    if (!notes_.empty()) rep["notes"] = notes_;
  }

  // Model-scope budget, planning sweep: the layer's budget items from the input model's
  // calibration Grams; only the σ arrays are kept (lowrank::BudgetItem), the decompositions are
  // dropped one by one.
  void plan_layer(const model::Layer& layer, pipeline::InputGrams* grams, const runtime::MatrixRM*, double) override {
    model::Layer L = layer;  // the slots point into this copy; nothing is written back
    std::vector<FactorSlot> singles, grouped;
    notes_.clear();
    collect(L, grams, singles, grouped);
    LayerItems li = layer_items(singles, grouped, nullptr, nullptr);
    end_layer();
    plan_layers_.push_back({layer.index, plan_items_.size(), li.items.size()});
    for (auto& it : li.items) plan_items_.push_back(std::move(it));
    for (auto& nm : li.names) plan_names_.push_back(std::move(nm));
    plan_dense_ += li.dense;
    plan_fixed_ += li.fixed;
  }

  void finish_plan(json& rep) override {
    const int64_t budget = static_cast<int64_t>(std::floor(value_ * static_cast<double>(plan_dense_))) - plan_fixed_;
    const std::vector<int> ranks =
        core::with_context(budget_key_, [&] { return lowrank::allocate_ranks(plan_items_, budget); });
    json list = json::array();
    for (const auto& pl : plan_layers_) {
      std::vector<int>& r = planned_[pl.layer];
      for (size_t j = pl.first; j < pl.first + pl.count; ++j) {
        r.push_back(ranks[j]);
        list.push_back({{"layer", pl.layer}, {"matrix", plan_names_[j]},
                        {"rank", ranks[j] == lowrank::kKeepDense ? json("dense") : json(ranks[j])}});
      }
    }
    rep["scope"] = "model";
    rep["budget"] = {{"params", budget + plan_fixed_}, {"dense_params", plan_dense_},
                     {"allocated_params", lowrank::allocation_params(plan_items_, ranks) + plan_fixed_},
                     {"weighted_loss", lowrank::allocation_loss(plan_items_, ranks)}};
    rep["ranks"] = list;
    rep["note"] = "model-scope budget: every matrix is decomposed twice, once in this planning sweep on the input "
                  "model's calibration inputs (ranks allocated over all layers by truncation loss per parameter "
                  "saved), once in the layer loop on its inputs there (through the layers already factorized "
                  "when calibration.propagate), truncated at the planned rank";
    plan_items_ = {};
    plan_names_ = {};
  }

 private:
  const model::Model* model_ = nullptr;  // the model run_layer works on (its mapped pages handed back)
  bool targets(const char* t) const { return std::find(targets_.begin(), targets_.end(), t) != targets_.end(); }

  // The delta / latent decomposition of the routed experts' matrices of one type (0 gate, 1 up,
  // 2 down), computed once and truncated at any rank.
  struct GroupDec {
    int type = 0;
    std::vector<FactorSlot*> slots;
    int64_t m = 0, n = 0;
    MatrixRM base;                                  // delta: W_b
    std::vector<lowrank::Spectrum> each;            // delta: each expert's delta (not shared_v)
    std::optional<lowrank::SharedSpectrum> shared;  // delta with shared_v, latent
  };
  // A layer's budget items in allocation order: each single matrix, then per type either the
  // delta experts (one item each) or the shared group (one item); `fixed` is what is stored
  // whatever the ranks (delta bases).
  struct LayerItems {
    std::vector<lowrank::BudgetItem> items;
    std::vector<std::string> names;
    int64_t dense = 0, fixed = 0;
  };
  struct PlanLayer {
    int layer;
    size_t first, count;  // its items in plan_items_
  };

  // The slots of one layer, with their (damped) Grams; starts a layer (whitening cache reset).
  void collect(model::Layer& L, pipeline::InputGrams* g, std::vector<FactorSlot>& singles, std::vector<FactorSlot>& grouped) {
    end_layer();
    grams_ = method_ == FactorizeMethod::Svd ? nullptr : g;
    auto add_mlp = [&](model::Mlp& m, const std::string& who, const calib::MatrixD* gin, const calib::MatrixD* gmid,
                       int64_t tokens, std::vector<FactorSlot>& into) {
      into.push_back({&m.gate, who + " gate", gin, tokens, 0});
      into.push_back({&m.up, who + " up", gin, tokens, 1});
      into.push_back({&m.down, who + " down", gmid, tokens, 2});
    };
    // Each Gram damped as GPTQ damps its Hessian: G + damp · mean(diag G) · I (experts that saw few
    // calibration tokens have noisy, near-singular Grams; damp 0 is SVD-LLM's plain rule).
    auto have = [&](const calib::MatrixD& m) { return damped(m, damped_); };
    if (L.moe && grams_ && grams_->num_experts() != static_cast<int64_t>(L.moe->experts.size()))
      throw Error::internal("factorize: Grams for " + std::to_string(grams_->num_experts()) + " experts, the layer has " +
                            std::to_string(L.moe->experts.size()));
    if (L.moe && targets("experts")) {
      // A group (delta, latent) decomposes every expert's matrices of a type together: all their
      // Grams at once. One by one, an expert's Grams are computed when its first matrix runs
      // (gram_of) and dropped when the next expert's are.
      const bool group = method_ == FactorizeMethod::Delta || method_ == FactorizeMethod::Latent;
      for (size_t e = 0; e < L.moe->experts.size(); ++e) {
        const int64_t tokens = grams_ ? grams_->expert_tokens(static_cast<int64_t>(e)) : 0;
        const std::string who = "expert " + std::to_string(e);
        if (group) {
          add_mlp(L.moe->experts[e], who, grams_ ? have(grams_->expert_in(static_cast<int64_t>(e))) : nullptr,
                  grams_ ? have(grams_->expert_mid(static_cast<int64_t>(e))) : nullptr, tokens, grouped);
          if (grams_ && damp_ != 0) grams_->release(static_cast<int64_t>(e));  // the damped copies are kept
        } else {
          add_mlp(L.moe->experts[e], who, nullptr, nullptr, tokens, singles);
          for (size_t j = singles.size() - 3; j < singles.size(); ++j) singles[j].expert = static_cast<int>(e);
        }
      }
    }
    if (L.moe && L.moe->shared && targets("shared"))
      add_mlp(*L.moe->shared, "shared expert", g ? have(g->shared_in) : nullptr, g ? have(g->shared_mid) : nullptr,
              g ? g->tokens : 0, singles);
    if (L.mlp && targets("dense"))
      add_mlp(*L.mlp, "dense mlp", g ? have(g->mlp_in) : nullptr, g ? have(g->mlp_mid) : nullptr, g ? g->tokens : 0, singles);
    if (targets("attention"))
      for (const char* role : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
        auto it = L.tensors.find(role);
        if (it == L.tensors.end()) continue;
        const calib::MatrixD* gram = g ? have(std::string(role) == "o_proj" ? g->attn_o : g->attn_qkv) : nullptr;
        singles.push_back({&it->second, std::string("attention ") + role, gram, g ? g->tokens : 0, 0});
      }
    if ((method_ == FactorizeMethod::Delta || method_ == FactorizeMethod::Latent) && singles.size())
      notes_.push_back(std::string(method_ == FactorizeMethod::Delta ? "delta" : "latent") +
                       " applies to routed experts; the other targets use svdllm");
  }
  // Drops the layer's damped Grams, the bound expert's and the cached whitening.
  void end_layer() {
    white_.reset();
    white_gram_ = nullptr;
    damped_.clear();
    unbind_expert();
    grams_ = nullptr;
  }
  // `m` damped as GPTQ damps its Hessian (a copy appended to `into`), or `m` itself with damp 0;
  // null for an empty Gram.
  const calib::MatrixD* damped(const calib::MatrixD& m, std::deque<calib::MatrixD>& into) const {
    if (!m.size()) return nullptr;
    if (damp_ == 0) return &m;
    into.push_back(m);
    const double mean = m.diagonal().mean();
    if (mean > 0) into.back().diagonal().array() += damp_ * mean;
    return &into.back();
  }
  // The Gram of a slot: a routed expert's own is computed now when another expert's is bound.
  const calib::MatrixD* gram_of(const FactorSlot& s) {
    if (s.expert < 0 || !grams_) return s.gram;
    if (bound_ != s.expert) {
      unbind_expert();
      bound_ = s.expert;
      bound_in_ = damped(grams_->expert_in(bound_), bound_damped_);
      bound_mid_ = damped(grams_->expert_mid(bound_), bound_damped_);
    }
    return s.type < 2 ? bound_in_ : bound_mid_;
  }
  void unbind_expert() {
    if (bound_ < 0) return;
    if (grams_) grams_->release(bound_);
    bound_damped_.clear();
    bound_ = -1;
    bound_in_ = bound_mid_ = nullptr;
    white_.reset();  // keyed by address: the next expert's Grams may reuse this one's storage
    white_gram_ = nullptr;
  }

  // SVD-LLM's whitening of `gram`, computed once for consecutive matrices that read the same
  // Gram (an expert's gate and up share gram_in): one Cholesky per Gram, not per matrix. Keyed by
  // address within a layer (collect() resets it).
  const lowrank::Whitening& whitening(const calib::MatrixD* gram) {
    if (!white_ || white_gram_ != gram) {
      white_ = std::make_shared<const lowrank::Whitening>(lowrank::whiten(*gram));
      white_gram_ = gram;
    }
    return *white_;
  }
  lowrank::Spectrum svdllm(const MatrixRM& w, const calib::MatrixD* gram, const std::string& what) {
    if (gram->rows() != w.cols() || gram->cols() != w.cols())
      throw Error::internal("factorize: Gram of " + what + " is " + std::to_string(gram->rows()) + "x" +
                            std::to_string(gram->cols()) + ", the weight has " + std::to_string(w.cols()) + " inputs");
    return lowrank::svdllm(w, whitening(gram));
  }

  // The decomposition of a single matrix by the method (delta/latent fall back to svdllm
  // outside routed experts).
  lowrank::Spectrum decompose(const FactorSlot& s) {
    const MatrixRM w = runtime::to_matrix(*s.tensor);
    if (method_ == FactorizeMethod::Svd) return lowrank::svd(w);
    const calib::MatrixD* gram = gram_of(s);
    if (!gram) throw Error::internal("factorize: no Gram for " + s.what);
    if (method_ == FactorizeMethod::Asvd) {
      std::vector<double> act(static_cast<size_t>(w.cols()), 0.0);
      if (s.tokens > 0)
        for (int64_t j = 0; j < w.cols(); ++j) act[j] = std::sqrt(std::max(0.0, (*gram)(j, j)) / static_cast<double>(s.tokens));
      return lowrank::asvd(w, act, alpha_);
    }
    return svdllm(w, gram, s.what);
  }

  // The delta / latent decomposition of the grouped slots of one type (no slots: empty result).
  GroupDec decompose_group(std::vector<FactorSlot>& all, int type) {
    GroupDec gd;
    gd.type = type;
    for (auto& s : all)
      if (s.type == type) gd.slots.push_back(&s);
    if (gd.slots.empty()) return gd;
    std::vector<MatrixRM> ws;
    for (auto* s : gd.slots) ws.push_back(runtime::to_matrix(*s->tensor));
    std::vector<const MatrixRM*> wp;
    for (const auto& w : ws) wp.push_back(&w);
    std::vector<const calib::MatrixD*> grams;
    for (auto* s : gd.slots) grams.push_back(s->gram);
    gd.m = ws[0].rows();
    gd.n = ws[0].cols();
    if (method_ == FactorizeMethod::Latent) {
      gd.shared = lowrank::shared_spectrum(wp, type == 2 ? lowrank::Side::Left : lowrank::Side::Right, &grams);
      return gd;
    }
    std::vector<double> freq;
    for (auto* s : gd.slots) freq.push_back(static_cast<double>(s->tokens));
    double total = 0;
    for (double f : freq) total += f;
    if (total <= 0) std::fill(freq.begin(), freq.end(), 1.0);  // no tokens at all: plain average
    gd.base = lowrank::delta_base(wp, freq);
    const std::vector<MatrixRM> dl = lowrank::deltas(wp, gd.base);
    if (shared_v_) {
      std::vector<const MatrixRM*> dp;
      for (const auto& x : dl) dp.push_back(&x);
      gd.shared = lowrank::shared_spectrum(dp, lowrank::Side::Right, &grams);
      return gd;
    }
    for (size_t e = 0; e < dl.size(); ++e)
      gd.each.push_back(grams[e] ? svdllm(dl[e], grams[e], gd.slots[e]->what + " (delta)") : lowrank::svd(dl[e]));
    return gd;
  }
  static const char* type_name(int type) { return type == 0 ? "gate" : type == 1 ? "up" : "down"; }
  // Budget items a group contributes: one per expert (delta without shared V) or one.
  size_t group_item_count(size_t experts) const {
    return method_ == FactorizeMethod::Delta && !shared_v_ ? experts : 1;
  }

  // The rank the rule gives a single matrix [m, n] (not budget).
  int single_rank(const lowrank::Spectrum& sp, int64_t m, int64_t n, const std::string& what) {
    const int64_t kmax = lowrank::max_useful_rank(m, n);
    int64_t k = 0;
    if (rule_ == Rule::Ratio) k = rank_within(value_, m * n, 0, m + n);
    else if (rule_ == Rule::Rank) k = static_cast<int64_t>(value_);
    else k = lowrank::rank_for_energy(sp, value_);
    if (k > kmax) {
      notes_.push_back(what + ": rank " + std::to_string(k) + " would not save memory ([" + std::to_string(m) + ", " +
                       std::to_string(n) + "] needs rank < " + std::to_string(kmax + 1) + "); kept dense");
      return lowrank::kKeepDense;
    }
    return static_cast<int>(std::max<int64_t>(k, 1));
  }

  void record(json& rep, const std::string& what, int rank, double loss, const std::string& note) {
    if (rank != lowrank::kKeepDense) ++factorized_;
    json m = {{"matrix", what}, {"rank", rank == lowrank::kKeepDense ? json("dense") : json(rank)}, {"loss", loss}};
    if (!note.empty()) m["note"] = note;
    rep["matrices"].push_back(m);
  }

  // Truncates and stores one matrix; returns its encoding (null: kept dense).
  std::shared_ptr<const core::Encoding> factor_single(FactorSlot& s, const lowrank::Spectrum& sp, std::optional<int> forced,
                                                      json& rep) {
    const int k = forced ? *forced : single_rank(sp, sp.rows, sp.cols, s.what);
    if (k == lowrank::kKeepDense) {
      record(rep, s.what, k, 0, sp.note);
      return nullptr;
    }
    const lowrank::Factors f = lowrank::truncate(sp, k);
    const core::DType d = factor_dtype(*s.tensor);
    if (model_) model_->release_pages(*s.tensor);  // read; replaced below
    auto enc = std::make_shared<quant::LowRank>(part(f.a, d), part(f.b, d));
    *s.tensor = core::Tensor::encoded(enc, d);
    std::string note = sp.note;
    if (sp.shift > 0) note += (note.empty() ? "" : "; ") + std::string("Gram not positive definite: added ") +
                              std::to_string(sp.shift) + "·I";
    record(rep, s.what, k, sp.loss(k), note);
    return enc;
  }

  // The routed experts' single matrices over MPI ranks (runtime/mpi.h): each rank factorizes the
  // experts it owns (binding only their Grams), then every rank receives every result
  // (passes/encoding_exchange.h) into `split`, indexed by slot: the encoding (null: kept dense)
  // and what the owner recorded ({"matrices": its report entry, "notes": the notes it added}).
  // The owner's own records are undone here; apply_split() redoes them in slot order on every rank.
  void split_singles(std::vector<FactorSlot>& singles, std::vector<EncodedSlot>& split, json& rep) {
    const runtime::mpi::World& world = runtime::mpi::World::get();
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<EncodedSlot> mine;
    const int factorized = factorized_;
    for (size_t i = 0; i < singles.size(); ++i) {
      if (singles[i].expert < 0 || !world.owns(singles[i].expert)) continue;
      json r = {{"matrices", json::array()}};
      const size_t notes = notes_.size();
      auto enc = factor_single(singles[i], decompose(singles[i]), std::nullopt, r);
      r["notes"] = json(std::vector<std::string>(notes_.begin() + static_cast<std::ptrdiff_t>(notes), notes_.end()));
      notes_.resize(notes);
      mine.push_back({i, std::move(enc), std::move(r)});
    }
    factorized_ = factorized;
    unbind_expert();
    const double encode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    json mpi;
    for (EncodedSlot& e : exchange_encodings(mine, mpi)) {
      if (e.slot >= singles.size() || singles[e.slot].expert < 0 || !split[e.slot].report.is_null())
        throw Error::internal("factorize: mpi: slot " + std::to_string(e.slot) + " received twice or not a routed expert's");
      split[e.slot] = std::move(e);
    }
    for (size_t i = 0; i < singles.size(); ++i)
      if (singles[i].expert >= 0 && split[i].report.is_null())
        throw Error::internal("factorize: mpi: no rank factorized " + singles[i].what);
    mpi["encode_seconds"] = encode_seconds;  // this rank's share of the work, before the exchange
    rep["mpi"] = mpi;
  }
  // A result split_singles received: stored, recorded and noted as factor_single would have.
  void apply_split(FactorSlot& s, EncodedSlot& e, json& rep) {
    if (e.encoding) {
      if (model_) model_->release_pages(*s.tensor);
      *s.tensor = core::Tensor::encoded(e.encoding, e.encoding->parts().front().tensor->dtype());
    }
    for (const json& m : e.report.at("matrices")) {
      factorized_ += m.at("rank") != "dense";
      rep["matrices"].push_back(m);
    }
    for (const json& n : e.report.at("notes")) notes_.push_back(n.get<std::string>());
  }

  // delta / latent over the routed experts' matrices of one type, truncated from its decomposition.
  void factor_group(const GroupDec& gd, std::optional<std::vector<int>> forced, json& rep) {
    const auto& slots = gd.slots;
    const int64_t m = gd.m, n = gd.n, E = static_cast<int64_t>(slots.size());
    const core::DType d = factor_dtype(*slots[0]->tensor);
    const char* tname = type_name(gd.type);

    if (method_ == FactorizeMethod::Delta) {
      auto base_part = part(gd.base, d);
      if (shared_v_) {
        const lowrank::SharedSpectrum& sp = *gd.shared;
        const int64_t cost = n + E * m, kmax = max_saving(E * m * n, m * n, cost);
        if (forced && (*forced)[0] == lowrank::kKeepDense) {
          record(rep, std::string("experts ") + tname + " (delta, shared V)", lowrank::kKeepDense, 0, "");
          return;
        }
        int64_t k = forced ? (*forced)[0] : group_rank(sp.joint, E * m * n, m * n, cost, kmax, std::string("experts ") + tname);
        k = std::min<int64_t>({k, sp.rank_limit(), std::min(m, n)});  // each expert's A·B has rank <= min(m, n)
        const lowrank::SharedFactors f = lowrank::truncate_shared(sp, static_cast<int>(k));
        auto b = part(f.shared, d);
        for (size_t e = 0; e < slots.size(); ++e)
          *slots[e]->tensor = core::Tensor::encoded(std::make_shared<quant::LowRank>(part(f.own[e], d), b, base_part, false, true, true), d);
        record(rep, std::string("experts ") + tname + " (delta, shared V)", static_cast<int>(k), sp.loss(static_cast<int>(k)), join(sp.notes));
        return;
      }
      for (size_t e = 0; e < slots.size(); ++e) {
        const lowrank::Spectrum& sp = gd.each[e];
        int64_t k;
        if (forced && (*forced)[e] == lowrank::kKeepDense) {
          record(rep, slots[e]->what + " (delta)", lowrank::kKeepDense, 0, "");
          continue;  // this expert stays dense
        }
        if (forced) k = (*forced)[e];
        else if (rule_ == Rule::Ratio) k = rank_within(value_, E * m * n, m * n, E * (m + n));
        else if (rule_ == Rule::Rank) k = static_cast<int64_t>(value_);
        else k = lowrank::rank_for_energy(sp, value_);
        k = std::clamp<int64_t>(k, 0, std::min<int64_t>(sp.rank_limit(), lowrank::max_useful_rank(m, n)));
        const lowrank::Factors f = lowrank::truncate(sp, static_cast<int>(k));
        *slots[e]->tensor = core::Tensor::encoded(std::make_shared<quant::LowRank>(part(f.a, d), part(f.b, d), base_part, false, false, true), d);
        record(rep, slots[e]->what + " (delta)", static_cast<int>(k), sp.loss(static_cast<int>(k)), sp.note);
      }
      return;
    }
    // latent: shared input basis for gate/up (B shared), shared output basis for down (A shared).
    const lowrank::SharedSpectrum& sp = *gd.shared;
    const lowrank::Side side = gd.type == 2 ? lowrank::Side::Left : lowrank::Side::Right;
    const int64_t cost = side == lowrank::Side::Right ? n + E * m : m + E * n;
    const int64_t kmax = max_saving(E * m * n, 0, cost);
    if (forced && (*forced)[0] == lowrank::kKeepDense) {
      record(rep, std::string("experts ") + tname + " (latent)", lowrank::kKeepDense, 0, "");
      return;
    }
    int64_t k = forced ? (*forced)[0] : group_rank(sp.joint, E * m * n, 0, cost, kmax, std::string("experts ") + tname);
    k = std::clamp<int64_t>(k, 1, std::min<int64_t>(sp.rank_limit(), std::min(m, n)));
    const lowrank::SharedFactors f = lowrank::truncate_shared(sp, static_cast<int>(k), lowrank::SigmaSplit::OnExperts);
    auto shared = part(f.shared, d);
    for (size_t e = 0; e < slots.size(); ++e) {
      auto own = part(f.own[e], d);
      auto enc = side == lowrank::Side::Right ? std::make_shared<quant::LowRank>(own, shared, nullptr, false, true)
                                              : std::make_shared<quant::LowRank>(shared, own, nullptr, true, false);
      *slots[e]->tensor = core::Tensor::encoded(enc, d);
    }
    record(rep, std::string("experts ") + tname + " (latent, shared " + (side == lowrank::Side::Right ? "B" : "A") + ")",
           static_cast<int>(k), sp.loss(static_cast<int>(k)), join(sp.notes));
  }

  int64_t group_rank(const lowrank::Spectrum& joint, int64_t dense, int64_t fixed, int64_t cost, int64_t kmax,
                     const std::string& what) {
    int64_t k;
    if (rule_ == Rule::Ratio) k = rank_within(value_, dense, fixed, cost);
    else if (rule_ == Rule::Rank) k = static_cast<int64_t>(value_);
    else k = lowrank::rank_for_energy(joint, value_);
    if (k > kmax) {
      notes_.push_back(what + ": rank " + std::to_string(k) + " stores as much as the dense matrices; clamped to " +
                       std::to_string(kmax));
      k = kmax;
    }
    if (k < 1 && rule_ == Rule::Ratio)
      throw Error::invalid("ratio " + std::to_string(value_) + " leaves no room for a rank-1 factor of " + what +
                           " (the shared part alone is " + std::to_string(fixed) + " of " + std::to_string(dense) + " parameters)");
    return std::max<int64_t>(k, 1);
  }

  // Every unit of the layer decomposed once, in the budget's item order, its items appended.
  // The decompositions are kept in *singles_dec / *groups_dec when given (to be truncated at the
  // allocated ranks), dropped otherwise (planning keeps the σ arrays only).
  LayerItems layer_items(std::vector<FactorSlot>& singles, std::vector<FactorSlot>& grouped,
                         std::vector<lowrank::Spectrum>* singles_dec, std::vector<GroupDec>* groups_dec) {
    LayerItems li;
    for (auto& s : singles) {
      lowrank::Spectrum sp = decompose(s);
      li.items.push_back(lowrank::budget_item(sp));
      li.names.push_back(s.what);
      li.dense += sp.rows * sp.cols;
      if (singles_dec) singles_dec->push_back(std::move(sp));
    }
    for (int type = 0; type < 3 && !grouped.empty(); ++type) {
      GroupDec gd = decompose_group(grouped, type);
      if (gd.slots.empty()) continue;
      const int64_t E = static_cast<int64_t>(gd.slots.size());
      li.dense += E * gd.m * gd.n;
      if (method_ == FactorizeMethod::Delta) li.fixed += gd.m * gd.n;  // the base
      if (gd.shared) {
        li.items.push_back(lowrank::budget_item(*gd.shared));
        li.names.push_back(std::string("experts ") + type_name(type) +
                           (method_ == FactorizeMethod::Delta ? " (delta, shared V)" : " (latent)"));
      } else {
        for (size_t e = 0; e < gd.each.size(); ++e) {
          li.items.push_back(lowrank::budget_item(gd.each[e]));
          li.names.push_back(gd.slots[e]->what + " (delta)");
        }
      }
      if (groups_dec) groups_dec->push_back(std::move(gd));
    }
    return li;
  }

  // Layer-scope budget: the layer's targeted dense parameters × R, allocated across its matrices
  // by loss; each matrix decomposed once (the layer's decompositions are kept, then truncated).
  void run_budget(std::vector<FactorSlot>& singles, std::vector<FactorSlot>& grouped, json& rep) {
    std::vector<lowrank::Spectrum> sdec;
    std::vector<GroupDec> gdec;
    const LayerItems li = layer_items(singles, grouped, &sdec, &gdec);
    const int64_t budget = static_cast<int64_t>(std::floor(value_ * static_cast<double>(li.dense))) - li.fixed;
    const std::vector<int> ranks =
        core::with_context(budget_key_, [&] { return lowrank::allocate_ranks(li.items, budget); });
    rep["budget"] = {{"scope", "layer"}, {"params", budget + li.fixed}, {"dense_params", li.dense},
                     {"allocated_params", lowrank::allocation_params(li.items, ranks) + li.fixed},
                     {"weighted_loss", lowrank::allocation_loss(li.items, ranks)}};
    size_t i = 0;
    for (size_t j = 0; j < singles.size(); ++j) factor_single(singles[j], sdec[j], ranks[i++], rep);
    for (auto& gd : gdec) {
      const size_t c = group_item_count(gd.slots.size());
      factor_group(gd, std::vector<int>(ranks.begin() + static_cast<std::ptrdiff_t>(i),
                                        ranks.begin() + static_cast<std::ptrdiff_t>(i + c)), rep);
      i += c;
    }
  }

  // Model-scope budget, layer loop: each unit decomposed on this layer's inputs and truncated at
  // its planned rank, one at a time (a matrix planned dense is not decomposed again).
  void apply_planned(std::vector<FactorSlot>& singles, std::vector<FactorSlot>& grouped, const std::vector<int>& ranks, json& rep) {
    size_t i = 0;
    auto take = [&](size_t c) {
      if (i + c > ranks.size())
        throw Error::internal("factorize: the layer has more budget items than were planned (" + std::to_string(ranks.size()) + ")");
      std::vector<int> r(ranks.begin() + static_cast<std::ptrdiff_t>(i), ranks.begin() + static_cast<std::ptrdiff_t>(i + c));
      i += c;
      return r;
    };
    for (auto& s : singles) {
      const int k = take(1)[0];
      if (k == lowrank::kKeepDense) record(rep, s.what, k, 0, "");
      else factor_single(s, decompose(s), k, rep);
    }
    for (int type = 0; type < 3 && !grouped.empty(); ++type) {
      size_t count = 0;
      for (const auto& s : grouped) count += s.type == type;
      if (!count) continue;
      const std::vector<int> r = take(group_item_count(count));
      factor_group(decompose_group(grouped, type), r, rep);
    }
    if (i != ranks.size())
      throw Error::internal("factorize: planned " + std::to_string(ranks.size()) + " budget items, the layer has " + std::to_string(i));
  }

  static std::string join(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : "; ") + x;
    return s;
  }
  std::string method_name_;
  std::string budget_key_;  // "budget" as the user wrote it (JSON path; the CLI shows --budget)
  std::string targets_key_, rule_key_;  // JSON paths of targets and of the rank rule given
  int64_t factorized_ = 0;  // matrices (or shared groups) stored low-rank so far
  FactorizeMethod method_;
  Rule rule_ = Rule::Ratio;
  double value_ = 0;
  double alpha_ = 0.5;
  double damp_ = 0.01;
  std::deque<calib::MatrixD> damped_;  // the damped Grams of the layer being run (stable addresses)
  pipeline::InputGrams* grams_ = nullptr;  // the layer's Grams (collect() to end_layer())
  int bound_ = -1;                         // the routed expert whose Grams gram_of() holds
  const calib::MatrixD *bound_in_ = nullptr, *bound_mid_ = nullptr;
  std::deque<calib::MatrixD> bound_damped_;
  std::shared_ptr<const lowrank::Whitening> white_;  // the last Gram's whitening (whitening())
  const calib::MatrixD* white_gram_ = nullptr;
  Scope scope_ = Scope::Model;
  // Model-scope budget: the planning sweep's items (σ arrays) and names, per layer, then the
  // planned ranks per layer in item order.
  std::vector<lowrank::BudgetItem> plan_items_;
  std::vector<std::string> plan_names_;
  std::vector<PlanLayer> plan_layers_;
  int64_t plan_dense_ = 0, plan_fixed_ = 0;
  std::map<int, std::vector<int>> planned_;
  bool shared_v_ = false;
  std::vector<std::string> targets_;
  std::vector<std::string> notes_;
};

}  // namespace

std::unique_ptr<pipeline::Pass> make_factorize(const json& spec, const std::string& method, const std::string& path) {
  return std::make_unique<Factorize>(spec, method, path);
}

}  // namespace moe::passes
