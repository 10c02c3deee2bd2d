#include "passes/prune.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <random>

#include "core/error.h"
#include "runtime/finite.h"
#include "passes/experts.h"
#include "passes/naee.h"
#include "passes/novices.h"
#include "passes/options.h"
#include "passes/passes.h"
#include "passes/search.h"
#include "runtime/forward.h"
#include "runtime/weights.h"

namespace moe::passes {

using core::Error;
using nlohmann::json;

std::vector<int> select_top(const std::vector<double>& score, int64_t keep, const std::vector<bool>* protect,
                            int layer) {
  const int E = static_cast<int>(score.size());
  if (keep < 0 || keep > E)
    throw Error::internal("select_top: keep " + std::to_string(keep) + " of " + std::to_string(E) + " experts");
  for (int e = 0; e < E; ++e)  // a NaN compares false both ways and breaks the sort's ordering
    if (!std::isfinite(score[e]))
      throw Error::internal("layer " + std::to_string(layer) + ": non-finite score of expert " + std::to_string(e));
  if (protect && !protect->empty() && static_cast<int>(protect->size()) != E)
    throw Error::internal("select_top: " + std::to_string(protect->size()) + " protect flags for " + std::to_string(E) + " experts");
  auto prot = [&](int e) { return protect && !protect->empty() && (*protect)[e]; };
  std::vector<int> order(E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    if (prot(a) != prot(b)) return prot(a);
    return score[a] > score[b];
  });
  int64_t n_prot = 0;
  for (int e = 0; e < E; ++e) n_prot += prot(e);
  if (n_prot > keep)
    throw Error::invalid("layer " + std::to_string(layer) + ": " + std::to_string(n_prot) +
                         " super experts are protected but only " + std::to_string(keep) +
                         " experts are kept; raise keep or set protect_super_experts to false");
  std::vector<int> kept(order.begin(), order.begin() + keep);
  std::sort(kept.begin(), kept.end());
  return kept;
}

std::map<int, int64_t> plan_keep_ratio(const std::vector<LayerScores>& layers, double ratio, int64_t top_k,
                                       bool uniform) {
  struct Entry {
    double score;
    bool prot;
    int layer;
    int expert;
  };
  std::vector<Entry> ranked;
  std::map<int, int64_t> count, minimum;
  int64_t ranked_total = 0;
  for (const auto& l : layers) {
    int64_t n_prot = 0;
    for (int64_t e = 0; e < l.experts; ++e) n_prot += !l.protect.empty() && l.protect[e];
    minimum[l.layer] = std::min(l.experts, std::max(top_k, n_prot));
    if (l.score.empty()) {  // no cross-layer information: the ratio within the layer
      count[l.layer] = std::llround(ratio * static_cast<double>(l.experts));
      continue;
    }
    count[l.layer] = 0;
    ranked_total += l.experts;
    double sum = 0;
    for (double s : l.score) {
      if (!std::isfinite(s)) throw Error::internal("layer " + std::to_string(l.layer) + ": non-finite expert score");
      sum += s;
    }
    for (int64_t e = 0; e < l.experts; ++e)
      ranked.push_back({sum > 0 ? l.score[e] / sum : 1.0 / static_cast<double>(l.experts),
                        !l.protect.empty() && l.protect[e], l.layer, static_cast<int>(e)});
  }
  std::stable_sort(ranked.begin(), ranked.end(), [](const Entry& a, const Entry& b) {
    if (a.prot != b.prot) return a.prot;
    return a.score > b.score;
  });
  if (uniform) {
    // The same count in every layer (what loaders need): the count whose total is nearest the asked
    // share of all experts (ties: the larger), within every layer's minimum and size. The ranking
    // decides nothing here; the achieved share is reported (KeepRatioPlan::achieved).
    int64_t total = 0, lo = 0, hi = std::numeric_limits<int64_t>::max();
    for (const auto& l : layers) {
      total += l.experts;
      lo = std::max(lo, minimum[l.layer]);
      hi = std::min(hi, l.experts);
    }
    const double want = ratio * static_cast<double>(total);
    int64_t best = lo;
    double best_err = std::numeric_limits<double>::infinity();
    for (int64_t n = lo; n <= std::max(lo, hi); ++n) {
      double got = 0;
      for (const auto& l : layers) got += static_cast<double>(std::min(n, l.experts));
      const double err = std::abs(got - want);
      if (err <= best_err + 1e-9) {
        best_err = err;
        best = n;
      }
    }
    for (const auto& l : layers) count[l.layer] = std::min(best, l.experts);
    return count;
  }
  // Ragged: every ranked layer first gets its minimum (its own top-ranked experts, protected
  // first); what is left of the budget goes down the global ranking. Only when the minimums alone
  // exceed the budget is it overshot (the minimums are kept; the achieved share is reported).
  // Within a layer the global order is the layer's own order, so a layer's first `minimum` entries
  // in `ranked` are exactly its reserved experts.
  const int64_t budget = std::llround(ratio * static_cast<double>(ranked_total));
  int64_t left = budget;
  std::map<int, int64_t> seen;
  for (const auto& l : layers) {
    if (l.score.empty()) {
      count[l.layer] = std::clamp(count[l.layer], minimum[l.layer], l.experts);
      continue;
    }
    count[l.layer] = minimum[l.layer];
    left -= minimum[l.layer];
    seen[l.layer] = 0;
  }
  for (const Entry& r : ranked) {
    if (left <= 0) break;
    if (seen[r.layer]++ < minimum[r.layer]) continue;  // reserved above
    ++count[r.layer];
    --left;
  }
  return count;
}

namespace {

enum class PruneMethod { Frequency, Soft, Reap, Random, Enumerate, Search };

PruneMethod parse_prune_method(const std::string& m) {
  if (m == "frequency") return PruneMethod::Frequency;
  if (m == "soft") return PruneMethod::Soft;
  if (m == "reap") return PruneMethod::Reap;
  if (m == "random") return PruneMethod::Random;
  if (m == "enumerate") return PruneMethod::Enumerate;
  if (m == "search") return PruneMethod::Search;
  throw Error::internal("prune: method " + m + " not handled");
}

// The statistics field a method ranks by ("" for none).
const char* score_field(PruneMethod m) {
  switch (m) {
    case PruneMethod::Frequency: return "count";
    case PruneMethod::Soft: return "weight_sum";
    case PruneMethod::Reap: return "reap";
    default: return "";
  }
}

const std::vector<double>& stat_scores(const calib::LayerStats& s, PruneMethod m) {
  switch (m) {
    case PruneMethod::Frequency: return s.count;
    case PruneMethod::Soft: return s.weight_sum;
    default: return s.reap;
  }
}

class PrunePass final : public pipeline::Pass {
 public:
  PrunePass(const json& spec, const std::string& method, const std::string& path)
      : method_name_(method), method_(parse_prune_method(method)) {
    Options o(spec, path, "prune/" + method);
    o.allow({"pass", "method"});
    seed_ = o.opt_uint64("seed");
    keep_ = o.opt_int("keep", 1, 1 << 20);
    keep_ratio_ = o.opt_number("keep_ratio", 0.0, 1.0, /*min_open=*/true);
    const std::optional<bool> uniform = o.opt_bool("uniform");
    protect_ = o.get_bool("protect_super_experts", false);
    novices_ = o.get_bool("novices", false);
    if (method_ == PruneMethod::Enumerate || method_ == PruneMethod::Search)
      max_subsets_ = static_cast<uint64_t>(o.get_int("max_subsets", 5000, 1, int64_t{1} << 40));
    if (method_ == PruneMethod::Search) {
      time_budget_ = o.get_number("time_budget", 300.0, 0.0, 1e9);
      search_windows_ = o.get_int("search_windows", 16, 1, 1 << 16);
      heldout_windows_ = o.get_int("heldout_windows", 8, 1, 1 << 16);
    }
    o.finish();  // unknown keys first: a misspelt "keep" reads better as such than as a missing budget

    if (keep_.has_value() == keep_ratio_.has_value())
      throw Error::invalid(path + ": give exactly one of \"keep\" (experts per layer) or \"keep_ratio\" (global share)" +
                           std::string(keep_ ? ", not both" : ""));
    if (uniform) {
      if (keep_) throw Error::invalid(o.key_path("uniform") + ": applies only with \"keep_ratio\" (\"keep\" is uniform)");
      uniform_ = *uniform;
    }
    if (method_ == PruneMethod::Search && keep_ratio_)
      throw Error::invalid(o.key_path("keep_ratio") +
                           ": search chooses experts layer by layer by the final output's KL and cannot rank them "
                           "across layers; use \"keep\"");
    if (method_ == PruneMethod::Enumerate && keep_ratio_)
      throw Error::invalid(o.key_path("keep_ratio") +
                           ": enumerate cannot rank experts across layers (its losses need each layer's block "
                           "inputs); use \"keep\", or method \"reap\" with keep_ratio");
  }

  std::string name() const override { return "prune"; }
  std::string method() const override { return method_name_; }

  json params() const override {
    json p = {{"pass", "prune"}, {"method", method_name_}};
    if (keep_) p["keep"] = *keep_;
    if (keep_ratio_) {
      p["keep_ratio"] = *keep_ratio_;
      p["uniform"] = uniform_;
      if (planned_total_ > 0) {
        p["keep_ratio_achieved"] = static_cast<double>(planned_kept_) / static_cast<double>(planned_total_);
        p["experts_kept"] = planned_kept_;
        p["experts_total"] = planned_total_;
      }
    }
    p["protect_super_experts"] = protect_;
    p["novices"] = novices_;
    if (method_ == PruneMethod::Enumerate || method_ == PruneMethod::Search) p["max_subsets"] = max_subsets_;
    if (method_ == PruneMethod::Search) {
      p["time_budget"] = time_budget_;
      p["search_windows"] = search_windows_;
      p["heldout_windows"] = heldout_windows_;
    }
    if (seed_) p["seed"] = *seed_;
    return p;
  }

  pipeline::Requirements requirements() const override {
    pipeline::Requirements r;
    if (*score_field(method_)) r.stats_fields.push_back(score_field(method_));
    if (method_ == PruneMethod::Search) r.stats_fields = {"count", "weight_sum", "reap"};  // the starts
    if (protect_) r.stats_fields.push_back("out_absmax");  // super-expert flags derive from it
    r.plan_stats = keep_ratio_.has_value() && (*score_field(method_) || protect_);
    r.block_inputs = method_ == PruneMethod::Enumerate || method_ == PruneMethod::Search || novices_;
    r.layer_inputs = method_ == PruneMethod::Search;
    if (method_ == PruneMethod::Enumerate || method_ == PruneMethod::Search) r.unscaled_expert_inputs = "prune " + method();
    else if (novices_) r.unscaled_expert_inputs = "prune " + method() + " with novices";
    if (method_ == PruneMethod::Search) {
      r.min_windows = search_windows_ + heldout_windows_;
      r.min_windows_keys = "search_windows + heldout_windows";
    }
    return r;
  }

  void plan(const model::Model& model, const calib::Stats* stats) override {
    if (!keep_ratio_ || !tasks_written_.empty()) return;  // task subsets: planned per task in plan_tasks
    const std::vector<LayerScores> layers = layer_scores(model, stats);
    planned_ = plan_keep_ratio(layers, *keep_ratio_, model.dims().top_k, uniform_);
    planned_kept_ = planned_total_ = 0;
    for (const auto& l : layers) {
      planned_total_ += l.experts;
      planned_kept_ += planned_.at(l.layer);
    }
  }

  std::string tasks_refusal() const override {
    if (method_ == PruneMethod::Random) return "method random ignores statistics: every task would keep the same experts";
    if (method_ == PruneMethod::Enumerate || method_ == PruneMethod::Search)
      return "method " + method_name_ + " chooses experts on each layer's calibration inputs, not on statistics; use "
             "frequency, soft or reap";
    if (novices_) return "novices: a task subset drops the experts it does not keep";
    if (keep_ratio_ && !uniform_)
      return "uniform false: the task subsets are written with the same expert count in every layer";
    return "";
  }

  json plan_tasks(const model::Model& model, const std::vector<pipeline::TaskStats>& tasks) override {
    const int64_t top_k = model.dims().top_k;
    // Per task: the experts each layer keeps, as a single prune on that task's statistics would.
    std::map<int, std::vector<std::vector<int>>> kept;  // layer -> per task
    std::map<int, std::vector<std::vector<double>>> scores;
    for (const auto& t : tasks) {
      std::map<int, int64_t> count;
      if (keep_ratio_) count = plan_keep_ratio(layer_scores(model, t.stats), *keep_ratio_, top_k, uniform_);
      for (const auto& layer : model.layers()) {
        if (!layer.moe) continue;
        const int L = layer.index;
        const int64_t E = layer.moe->num_experts();
        const int64_t keep = keep_ ? *keep_ : count.at(L);
        check_keep(keep, E, top_k, L);
        const calib::LayerStats& s = t.stats->layer(L, score_field(method_));
        const std::vector<double>& sc = stat_scores(s, method_);
        check_stat_size(static_cast<int64_t>(sc.size()), E, score_field(method_), L);
        const std::vector<bool>* protect =
            protect_ ? &super_flags(t.stats->layer(L, "out_absmax"), E, L) : nullptr;
        kept[L].push_back(select_top(sc, keep, protect, L));
        scores[L].push_back(sc);
      }
    }
    // The union per layer, then equal counts (stock loaders need them): each layer below the
    // largest union adds the experts of largest summed per-task share of the score.
    size_t widest = 0;
    std::map<int, std::vector<int>> unions;
    for (const auto& [L, per_task] : kept) {
      std::vector<int> u;
      for (const auto& k : per_task) u.insert(u.end(), k.begin(), k.end());
      std::sort(u.begin(), u.end());
      u.erase(std::unique(u.begin(), u.end()), u.end());
      widest = std::max(widest, u.size());
      unions[L] = std::move(u);
    }
    json layers = json::array();
    tasks_written_.clear();
    for (const auto& [L, u] : unions) {
      const int E = static_cast<int>(scores[L].front().size());
      std::vector<double> share(E, 0.0);
      for (const auto& sc : scores[L]) {
        double sum = 0;
        for (double v : sc) sum += v;
        for (int e = 0; e < E; ++e) share[e] += sum > 0 ? sc[e] / sum : 1.0 / E;
      }
      std::vector<int> padding;
      std::vector<int> written = u;
      if (u.size() < widest) {  // the union first (as protected), then by share
        std::vector<bool> in_union(static_cast<size_t>(E), false);
        for (int e : u) in_union[static_cast<size_t>(e)] = true;
        written = select_top(share, static_cast<int64_t>(widest), &in_union, L);
        for (int e : written)
          if (!in_union[static_cast<size_t>(e)]) padding.push_back(e);
      }
      json keep = json::object(), keep_source = json::object();
      for (size_t t = 0; t < tasks.size(); ++t) {
        std::vector<int> idx;
        for (int e : kept[L][t])
          idx.push_back(static_cast<int>(std::lower_bound(written.begin(), written.end(), e) - written.begin()));
        keep[tasks[t].name] = ids_json(idx);
        keep_source[tasks[t].name] = ids_json(kept[L][t]);
      }
      layers.push_back({{"layer", L}, {"experts", ids_json(written)}, {"union", u.size()}, {"padding", ids_json(padding)},
                        {"keep", keep}, {"keep_source", keep_source}});
      tasks_written_[L] = std::move(written);
    }
    json names = json::array();
    for (const auto& t : tasks) names.push_back(t.name);
    return {{"names", names}, {"method", method_name_}, {"params", params()}, {"experts_per_layer", widest},
            {"layers", layers}};
  }

  bool makes_novices() const override { return novices_; }
  // Which experts become novices is known only when the layer runs: written through spill files.
  bool shapes_at_run() const override { return novices_; }
  // Ragged counts come from the plan over all layers' statistics; novices from the run.
  bool counts_at_run() const override { return novices_ || (keep_ratio_ && !uniform_); }
  std::string native_only() const override {
    if (novices_) return "novices: stock loaders cannot express a constant expert";
    if (keep_ratio_ && !uniform_)
      return "uniform false (ragged per-layer expert counts): stock loaders need the same expert count in every MoE layer";
    return "";
  }

  int64_t experts_after(int layer, int64_t before, int64_t top_k) const override {
    if (auto it = tasks_written_.find(layer); it != tasks_written_.end()) return static_cast<int64_t>(it->second.size());
    if (keep_) {
      check_keep(*keep_, before, top_k, layer);
      return novices_ ? before : *keep_;  // novices keep every router row and expert slot
    }
    auto it = planned_.find(layer);
    if (it != planned_.end()) return novices_ ? before : it->second;
    if (novices_) return before;
    // Before planning: the ratio within the layer (an estimate; the plan ranks across layers).
    return std::clamp<int64_t>(std::llround(*keep_ratio_ * static_cast<double>(before)), std::min(top_k, before), before);
  }

  void run_layer(pipeline::LayerContext& ctx) override {
    model::MoeBlock& block = *ctx.target.moe;
    const int64_t E = block.num_experts();
    const int L = ctx.layer;
    if (!tasks_written_.empty()) {  // task subsets: planned in plan_tasks
      const std::vector<int>& written = tasks_written_.at(L);
      std::vector<int> dropped;
      for (int e = 0; e < E; ++e)
        if (!std::binary_search(written.begin(), written.end(), e)) dropped.push_back(e);
      keep_experts(block, written);
      ctx.report["kept"] = ids_json(written);
      ctx.report["dropped"] = ids_json(dropped);
      ctx.report["score"] = std::string(score_field(method_)) + " per task (the report's tasks section)";
      return;
    }
    int64_t keep;
    if (keep_) {
      keep = *keep_;
    } else {
      auto it = planned_.find(L);
      if (it == planned_.end()) throw Error::internal("prune keep_ratio: plan() did not cover layer " + std::to_string(L));
      keep = it->second;
    }
    check_keep(keep, E, ctx.routing.top_k, L);

    const std::vector<bool>* protect = nullptr;
    if (protect_) {
      check_stats(ctx.stats, L, "protect_super_experts");
      protect = &super_flags(*ctx.stats, E, L);
    }

    std::vector<double> scores;
    std::vector<int> kept;
    json extra = json::object();
    std::string score_kind;
    if (method_ == PruneMethod::Search) {
      kept = search_layer(ctx, static_cast<int>(keep), protect, extra);
      check_stats(ctx.stats, L, "prune/search");
      scores = ctx.stats->weight_sum;
      score_kind = "weight_sum (the order swaps are tried in; the choice is by the final output's KL)";
    } else if (method_ == PruneMethod::Enumerate) {
      if (!ctx.block_inputs) throw Error::internal("prune/enumerate: the runner gave no block inputs");
      const runtime::MoeWeights w =
        runtime::naming_non_finite(ctx.model, ctx.layer, [&] { return runtime::convert_moe(block); });
      const EnumerateResult r = naee_enumerate(w, ctx.routing, *ctx.block_inputs, static_cast<int>(keep), max_subsets_, protect);
      for (int e = 0; e < E; ++e)
        if (std::find(r.dropped.begin(), r.dropped.end(), e) == r.dropped.end()) kept.push_back(e);
      scores = r.min_loss_dropping;
      score_kind = "least block-output loss of a subset dropping the expert (null: never dropped)";
      extra = {{"loss", r.loss}, {"subsets", r.subsets}};
    } else {
      if (method_ == PruneMethod::Random) {
        std::mt19937_64 rng(layer_seed(seed_, ctx.seed, L));
        scores.resize(E);
        for (auto& s : scores) s = unit_double(rng());
        score_kind = "random";
      } else {
        check_stats(ctx.stats, L, "prune/" + method_name_);
        scores = stat_scores(*ctx.stats, method_);
        check_stat_size(static_cast<int64_t>(scores.size()), E, score_field(method_), L);
        score_kind = score_field(method_);
      }
      kept = select_top(scores, keep, protect, L);
    }

    std::vector<int> dropped;
    for (int e = 0; e < E; ++e)
      if (!std::binary_search(kept.begin(), kept.end(), e)) dropped.push_back(e);
    if (novices_) {
      // Every slot stays (no "kept": the expert ids do not move); the dropped experts become
      // constants computed on the calibration tokens routed to them.
      if (!ctx.block_inputs) throw Error::internal("prune --novices: the runner gave no block inputs");
      const runtime::MoeWeights w =
          runtime::naming_non_finite(ctx.model, ctx.layer, [&] { return runtime::convert_moe(block); });
      const std::vector<NoviceValue> nv = novice_values(w, ctx.routing, *ctx.block_inputs, dropped);
      make_novices(block, nv);
      json tokens = json::array(), fallback = json::array();
      for (const auto& v : nv) {
        tokens.push_back(v.routed_tokens);
        if (v.routed_tokens == 0) fallback.push_back(v.expert);
      }
      ctx.report["experts"] = ids_json(kept);
      ctx.report["novices"] = ids_json(dropped);
      ctx.report["novice_routed_tokens"] = std::move(tokens);
      // Novices no calibration token was routed to: n_e is their mean output over all tokens.
      ctx.report["novices_from_all_tokens"] = std::move(fallback);
    } else {
      keep_experts(block, kept);
      ctx.report["kept"] = ids_json(kept);
      ctx.report["dropped"] = ids_json(dropped);
    }

    json sc = json::array();
    for (double s : scores) sc.push_back(std::isfinite(s) ? json(s) : json(nullptr));
    ctx.report["scores"] = std::move(sc);
    ctx.report["score"] = score_kind;
    for (auto& [k, v] : extra.items()) ctx.report[k] = v;
  }

 private:
  // prune/search at one layer (passes/search.h): the best start by KL, first-improvement swaps,
  // the path point with the least held-out KL. Fills `report` with what was done.
  std::vector<int> search_layer(pipeline::LayerContext& ctx, int keep, const std::vector<bool>* protect, json& report) {
    using clock = std::chrono::steady_clock;
    const auto t_layer = clock::now();
    const int L = ctx.layer;
    const int E = static_cast<int>(ctx.target.moe->num_experts());
    if (!ctx.layer_inputs || !ctx.block_inputs || ctx.window_tokens <= 0)
      throw Error::internal("prune/search: the runner gave no layer inputs");
    check_stats(ctx.stats, L, "prune/search");
    const runtime::MatrixRM& x = *ctx.layer_inputs;
    const int64_t T = ctx.window_tokens, windows = x.rows() / T;
    const int64_t ws = search_windows_, wh = heldout_windows_;
    if (windows < ws + wh)
      throw Error::invalid("prune/search needs search_windows + heldout_windows = " + std::to_string(ws + wh) +
                           " calibration windows; the run has " + std::to_string(windows) +
                           " (preflight checks this first)");
    const runtime::Forward fwd(ctx.model);
    EndToEndScorer scorer(fwd, ctx.model, L, T);
    if (!started_) {  // the model as this pass finds it at its first layer: the original's outputs
      started_ = true;
      t_start_ = clock::now();
      ref_logp_ = scorer.logp_full(x, 0, ws + wh);
      report["reference"] = "log-probabilities of the model before this pass on " + std::to_string(ws + wh) + " windows";
    }
    // The layer's share of what is left of the time budget.
    int moe_left = 0;
    for (const auto& layer : ctx.model.layers()) moe_left += layer.moe && layer.index >= L;
    const double spent = std::chrono::duration<double>(clock::now() - t_start_).count();
    const double allowance = std::max(0.0, time_budget_ - spent) / std::max(1, moe_left);
    auto elapsed = [&] { return std::chrono::duration<double>(clock::now() - t_layer).count(); };
    auto is_prot = [&](int e) { return protect && !protect->empty() && (*protect)[e]; };

    // Starts: the keep-sets of the existing scores, each judged by the KL on the search windows.
    std::vector<std::pair<std::string, std::vector<int>>> starts = {
      {"frequency", select_top(ctx.stats->count, keep, protect, L)},
      {"soft", select_top(ctx.stats->weight_sum, keep, protect, L)},
      {"reap", select_top(ctx.stats->reap, keep, protect, L)}};
    json starts_json = json::object();
    try {
      const runtime::MoeWeights w =
        runtime::naming_non_finite(ctx.model, L, [&] { return runtime::convert_moe(*ctx.target.moe); });
      const EnumerateResult r = naee_enumerate(w, ctx.routing, *ctx.block_inputs, keep, max_subsets_, protect);
      std::vector<int> k;
      for (int e = 0; e < E; ++e)
        if (std::find(r.dropped.begin(), r.dropped.end(), e) == r.dropped.end()) k.push_back(e);
      starts.push_back({"enumerate", k});
    } catch (const Error& e) {
      starts_json["enumerate"] = {{"skipped", e.what()}};
    }
    std::string start_name;
    std::vector<int> cur;
    double cur_kl = std::numeric_limits<double>::infinity();
    std::map<std::vector<int>, double> seen;
    for (const auto& [name, k] : starts) {
      auto it = seen.find(k);
      const double v = it != seen.end() ? it->second : (seen[k] = scorer.kl(k, x, ref_logp_, 0, ws));
      starts_json[name] = {{"kept", ids_json(k)}, {"kl_search", v}};
      if (v < cur_kl) {
        cur_kl = v;
        cur = k;
        start_name = name;
      }
    }
    const double start_kl = cur_kl;
    std::vector<std::vector<int>> path = {cur};
    std::vector<double> path_kl = {cur_kl};
    // Swaps in the order: kept experts of least routing weight first, dropped ones of most first.
    const std::vector<double>& ws_score = ctx.stats->weight_sum;
    json swaps = json::array();
    std::string stopped = "no swap lowers the search KL (a local optimum)";
    bool out_of_time = false, improved = true;
    while (improved && !out_of_time) {
      improved = false;
      std::vector<int> in_set = cur, out_set;
      for (int e = 0; e < E; ++e)
        if (!std::binary_search(cur.begin(), cur.end(), e)) out_set.push_back(e);
      std::stable_sort(in_set.begin(), in_set.end(), [&](int a, int b) { return ws_score[a] < ws_score[b]; });
      std::stable_sort(out_set.begin(), out_set.end(), [&](int a, int b) { return ws_score[a] > ws_score[b]; });
      for (int d : out_set) {
        for (int k : in_set) {
          if (is_prot(k)) continue;
          if (elapsed() >= allowance) {
            out_of_time = true;
            stopped = "time budget (" + std::to_string(allowance) + " s for this layer) spent";
            break;
          }
          std::vector<int> cand = cur;
          *std::find(cand.begin(), cand.end(), k) = d;
          std::sort(cand.begin(), cand.end());
          if (seen.count(cand)) continue;
          const double v = seen[cand] = scorer.kl(cand, x, ref_logp_, 0, ws);
          if (v < cur_kl) {
            swaps.push_back({{"out", k}, {"in", d}, {"kl_search", v}});
            cur = cand;
            cur_kl = v;
            path.push_back(cur);
            path_kl.push_back(v);
            improved = true;
            break;
          }
        }
        if (improved || out_of_time) break;
      }
    }
    // Stopping rule: the path point with the least KL on the held-out windows (ties: the earlier).
    size_t best = 0;
    std::vector<double> held;
    for (size_t i = 0; i < path.size(); ++i) {
      held.push_back(scorer.kl(path[i], x, ref_logp_, ws, ws + wh));
      if (held[i] < held[best]) best = i;
    }
    report["starts"] = starts_json;
    report["start"] = start_name;
    report["start_kl_search"] = start_kl;
    report["start_kl_heldout"] = held[0];
    report["swaps"] = swaps;
    report["swaps_kept"] = best;  // the first `best` accepted swaps make the result
    report["kl_search"] = path_kl[best];
    report["kl_heldout"] = held[best];
    report["stopped"] = stopped;
    report["budget_seconds"] = allowance;
    report["candidates"] = scorer.candidates;
    report["layer_forwards"] = scorer.layer_forwards;
    report["window_layer_forwards"] = scorer.window_layer_forwards;
    report["seconds"] = elapsed();
    return path[best];
  }

  // Each MoE layer's scores (and super-expert flags) for a keep_ratio plan.
  std::vector<LayerScores> layer_scores(const model::Model& model, const calib::Stats* stats) const {
    const bool need_stats = *score_field(method_) || protect_;
    if (need_stats && !stats)
      throw Error::invalid("prune/" + method_name_ + " keep_ratio needs routing statistics (run moe-tool calibrate)");
    std::vector<LayerScores> layers;
    for (const auto& layer : model.layers()) {
      if (!layer.moe) continue;
      LayerScores ls;
      ls.layer = layer.index;
      ls.experts = layer.moe->num_experts();
      if (need_stats) {
        const calib::LayerStats& s = stats->layer(layer.index, *score_field(method_) ? score_field(method_) : "out_absmax");
        if (*score_field(method_)) {
          ls.score = stat_scores(s, method_);
          check_stat_size(static_cast<int64_t>(ls.score.size()), ls.experts, score_field(method_), layer.index);
        }
        if (protect_) ls.protect = super_flags(s, ls.experts, layer.index);
      }
      layers.push_back(std::move(ls));
    }
    return layers;
  }

  static void check_keep(int64_t keep, int64_t experts, int64_t top_k, int layer) {
    if (keep > experts)
      throw Error::invalid("layer " + std::to_string(layer) + ": keep " + std::to_string(keep) + " exceeds the layer's " +
                           std::to_string(experts) + " experts");
    if (keep < top_k)
      throw Error::invalid("layer " + std::to_string(layer) + ": keep " + std::to_string(keep) +
                           " is below num_experts_per_tok " + std::to_string(top_k) +
                           " (every token routes to that many experts)");
  }

  std::string method_name_;
  PruneMethod method_;
  std::optional<uint64_t> seed_;
  std::optional<int64_t> keep_;
  std::optional<double> keep_ratio_;
  bool uniform_ = true;
  bool protect_ = false;
  bool novices_ = false;
  uint64_t max_subsets_ = 5000;
  double time_budget_ = 300.0;
  int64_t search_windows_ = 16, heldout_windows_ = 8;
  bool started_ = false;
  std::chrono::steady_clock::time_point t_start_;
  runtime::MatrixRM ref_logp_;  // the original model's log-probs on the search and held-out windows
  std::map<int, int64_t> planned_;
  std::map<int, std::vector<int>> tasks_written_;  // task subsets: the experts written per layer (plan_tasks)
  int64_t planned_kept_ = 0, planned_total_ = 0;
};

}  // namespace

std::unique_ptr<pipeline::Pass> make_prune(const json& spec, const std::string& method, const std::string& path) {
  return std::make_unique<PrunePass>(spec, method, path);
}

}  // namespace moe::passes
