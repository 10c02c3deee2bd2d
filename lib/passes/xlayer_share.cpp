#include "passes/xlayer_share.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <tuple>

#include "core/error.h"
#include "passes/expert_merge.h"
#include "passes/experts.h"
#include "passes/hungarian.h"
#include "passes/options.h"
#include "passes/passes.h"
#include "quant/pooled.h"

namespace moe::passes {

using core::Error;
using nlohmann::json;

namespace {

struct PoolCandidate {
  int l, l2, e, e2;
  double cosine;
};

double out_mean_cosine(const calib::MatrixF& a, int i, const calib::MatrixF& b, int j) {
  const double na = a.row(i).cast<double>().norm(), nb = b.row(j).cast<double>().norm();
  if (na == 0 || nb == 0) return 0;
  return a.row(i).cast<double>().dot(b.row(j).cast<double>()) / (na * nb);
}

// The one stored tensor of a pooled matrix, as the weight both layers' experts hold.
core::Tensor pooled_tensor(const MatrixRM& w, core::DType dtype) {
  auto part = std::make_shared<const core::Tensor>(to_tensor(w, dtype));
  return core::Tensor::encoded(std::make_shared<quant::Pooled>(part), dtype);
}

// A share for messages: the shortest decimal that reads back as the value (0.375, 0.34).
std::string number_text(double x) { return std::isfinite(x) ? json(x).dump() : std::to_string(x); }

void check_poolable(const model::Mlp& x, int l, int e) {
  const std::string where = "layer " + std::to_string(l) + " expert " + std::to_string(e);
  if (x.novice) throw Error::invalid(where + ": a novice expert (MoNE) cannot be pooled across layers");
  if (x.gate.encoding() || x.up.encoding() || x.down.encoding())
    throw Error::invalid(where + ": encoded weights (" + (x.gate.encoding() ? x.gate.encoding()->name() : x.down.encoding() ? x.down.encoding()->name() : x.up.encoding()->name()) +
                         ") cannot be pooled; share a dense checkpoint (convert --materialize first)");
  if (x.gate_bias || x.up_bias || x.down_bias) throw Error::invalid(where + ": experts with biases cannot be pooled");
}

}  // namespace

SharePlan check_share(const model::Model& m, double share, const std::string& key) {
  if (!(share >= 0 && share <= 0.5))
    throw Error::invalid(key + ": expected a share of expert parameters in [0, 0.5] (each pool saves one of its two experts), found " +
                         number_text(share));
  if (m.family().fused())
    throw Error::invalid(m.family().model_type + ": experts stored fused (one tensor per layer) cannot refer to a pool; "
                         "cross-layer sharing needs one tensor per expert");
  SharePlan plan;
  std::vector<int>& moe = plan.moe_layers;
  for (const auto& layer : m.layers())
    if (layer.moe) moe.push_back(layer.index);
  if (moe.size() < 2)
    throw Error::invalid("model: cross-layer expert sharing needs at least two MoE layers, found " + std::to_string(moe.size()));
  const auto& layers = m.layers();
  const int64_t width = layers[moe[0]].moe->expert_width();
  for (int l : moe) {
    const model::MoeBlock& b = *layers[l].moe;
    if (b.expert_width() != width)
      throw Error::invalid("layer " + std::to_string(l) + ": expert width " + std::to_string(b.expert_width()) + " differs from layer " +
                           std::to_string(moe[0]) + "'s " + std::to_string(width) + "; a pool holds experts of one width");
    for (int e = 0; e < b.num_experts(); ++e) check_poolable(b.experts[e], l, e);
    plan.experts_total += b.num_experts();
    const model::Mlp& x = b.experts.at(0);
    plan.params_per_expert = x.gate.numel() + x.up.numel() + x.down.numel();
  }
  plan.pools = std::llround(share * static_cast<double>(plan.experts_total));
  int64_t possible = 0;
  for (size_t p = 0; p + 1 < moe.size(); p += 2)
    possible += std::min(layers[moe[p]].moe->num_experts(), layers[moe[p + 1]].moe->num_experts());
  // The bound as the check computes it: round(share x experts) <= possible, i.e. (rounding half
  // away from zero) share < (possible + 0.5) / experts.
  if (plan.pools > possible)
    throw Error::invalid(key + ": " + number_text(share) + " asks for round(" + number_text(share) + " x " +
                         std::to_string(plan.experts_total) + " experts) = " + std::to_string(plan.pools) + " pooled experts but the " +
                         std::to_string(moe.size() / 2) + " pair(s) of adjacent MoE layers hold at most " + std::to_string(possible) +
                         " (share < " + number_text((static_cast<double>(possible) + 0.5) / static_cast<double>(plan.experts_total)) +
                         ")");
  return plan;
}

json share_experts_across_layers(model::Model& m, const calib::Stats& stats, double share, const std::string& key) {
  const SharePlan plan = check_share(m, share, key);
  const std::vector<int>& moe = plan.moe_layers;
  const int64_t pools = plan.pools;
  auto& layers = m.layers();
  std::vector<PoolCandidate> cands;
  for (size_t p = 0; pools > 0 && p + 1 < moe.size(); p += 2) {
    const int l = moe[p], l2 = moe[p + 1];
    const calib::LayerStats& s = stats.layer(l, "out_mean");
    const calib::LayerStats& s2 = stats.layer(l2, "out_mean");
    const int64_t E = layers[l].moe->num_experts(), E2 = layers[l2].moe->num_experts();
    check_stat_size(s.out_mean.rows(), E, "out_mean", l);
    check_stat_size(s2.out_mean.rows(), E2, "out_mean", l2);
    check_stat_size(static_cast<int64_t>(s.count.size()), E, "count", l);
    check_stat_size(static_cast<int64_t>(s2.count.size()), E2, "count", l2);
    MatrixXdRM sim(E, E2);
    for (int e = 0; e < E; ++e)
      for (int e2 = 0; e2 < E2; ++e2) sim(e, e2) = out_mean_cosine(s.out_mean, e, s2.out_mean, e2);
    const std::vector<int> match = E <= E2 ? assign_max(sim) : std::vector<int>{};
    if (E <= E2) {
      for (int e = 0; e < E; ++e) cands.push_back({l, l2, e, match[e], sim(e, match[e])});
    } else {
      const std::vector<int> back = assign_max(sim.transpose());
      for (int e2 = 0; e2 < E2; ++e2) cands.push_back({l, l2, back[e2], e2, sim(back[e2], e2)});
    }
  }
  std::stable_sort(cands.begin(), cands.end(), [](const PoolCandidate& a, const PoolCandidate& b) {
    return std::tie(b.cosine, a.l, a.e) < std::tie(a.cosine, b.l, b.e);
  });
  cands.resize(static_cast<size_t>(pools));
  std::sort(cands.begin(), cands.end(), [](const PoolCandidate& a, const PoolCandidate& b) { return std::tie(a.l, a.e) < std::tie(b.l, b.e); });

  json report = {{"share", share}, {"pools", json::array()}};
  for (const PoolCandidate& c : cands) {
    model::Mlp& x = layers[c.l].moe->experts[c.e];
    model::Mlp& y = layers[c.l2].moe->experts[c.e2];
    const runtime::MlpWeights a = runtime::convert_mlp(x), b = runtime::convert_mlp(y);
    const runtime::MlpWeights bp = permute_neurons(b, align_neurons(a, b));
    const std::vector<double> w =
        importance_weights({stats.layer(c.l, "count").count[c.e], stats.layer(c.l2, "count").count[c.e2]}, {0, 1});
    const bool same = a.gate == bp.gate && a.up == bp.up && a.down == bp.down;
    const runtime::MlpWeights merged = same ? a : weighted_average({&a, &bp}, w);
    model::Mlp pool = x;
    pool.gate = pooled_tensor(merged.gate, x.gate.dtype());
    pool.up = pooled_tensor(merged.up, x.up.dtype());
    pool.down = pooled_tensor(merged.down, x.down.dtype());
    x = pool;
    y = pool;
    report["pools"].push_back({{"layers", {c.l, c.l2}}, {"experts", {c.e, c.e2}}, {"cosine", c.cosine}, {"weights", w}});
  }
  report["expert_params_logical"] = plan.experts_total * plan.params_per_expert;
  report["expert_params_stored"] = (plan.experts_total - pools) * plan.params_per_expert;
  return report;
}

namespace {

// The recipe pass {"pass": "share", "method": "pairs", "share": R}: the pools are made before the
// layer loop (model_scope), the layers are then written as they are.
class SharePass final : public pipeline::Pass {
 public:
  SharePass(const json& spec, const std::string& path) {
    Options o(spec, path, "share/pairs");
    o.allow({"pass", "method"});
    key_ = o.key_path("share");
    const std::optional<double> share = o.opt_number("share", 0, 0.5);
    o.finish();  // unknown keys first
    if (!share) throw Error::invalid(key_ + ": missing (required): the share of expert parameters pooled away, in [0, 0.5]");
    share_ = *share;
  }
  std::string name() const override { return "share"; }
  std::string method() const override { return "pairs"; }
  json params() const override { return {{"pass", "share"}, {"method", "pairs"}, {"share", share_}}; }
  pipeline::Requirements requirements() const override {
    pipeline::Requirements r;
    r.stats_fields = {"out_mean", "count"};
    r.plan_stats = true;  // every layer's statistics before any layer changes
    return r;
  }
  int64_t experts_after(int, int64_t before, int64_t) const override { return before; }
  bool shapes_at_run() const override { return true; }  // a pool is written once, under its first user's name
  void check_model(const model::Model& m) const override { (void)check_share(m, share_, key_); }
  bool model_scope() const override { return true; }
  void run_model(model::Model& m, const calib::Stats& stats, json& report) override {
    report = share_experts_across_layers(m, stats, share_, key_);
  }
  void run_layer(pipeline::LayerContext& ctx) override {
    ctx.report["pooled"] = "before the layer loop (see plans)";
  }

 private:
  double share_ = 0;
  std::string key_;
};

}  // namespace

std::unique_ptr<pipeline::Pass> make_share(const json& spec, const std::string& /*method*/, const std::string& path) {
  return std::make_unique<SharePass>(spec, path);
}

}  // namespace moe::passes
