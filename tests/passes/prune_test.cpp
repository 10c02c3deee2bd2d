// Prune pass on tiny synthetic layers: ids kept for given statistics, router rows removed in
// order, NAEE's choice against brute force, budgets, determinism.
#include <gtest/gtest.h>

#include <limits>

#include "core/error.h"
#include "pass_test_util.h"
#include "passes/combinations.h"
#include "passes/naee.h"
#include "passes/prune.h"
#include "runtime/moe_block.h"

namespace moe::passes {
namespace {

using namespace testing;
using nlohmann::json;

std::unique_ptr<pipeline::Pass> prune(json opts) {
  opts["pass"] = "prune";
  return pipeline::make_pass(opts, "passes[0]");
}

TEST(Prune, FrequencyKeepsMostUsedAndSlicesRouter) {
  Ctx c;
  c.layer = make_layer({.E = 6, .router_bias = true});
  const model::MoeBlock before = *c.layer.moe;
  c.stats = make_stats(6);
  c.stats.count = {5, 1, 9, 3, 7, 2};
  auto p = prune({{"method", "frequency"}, {"keep", 3}});
  auto ctx = c.make(softmax_rule(6, 2));
  p->run_layer(ctx);

  const model::MoeBlock& b = *c.layer.moe;
  ASSERT_EQ(b.num_experts(), 3);
  const std::vector<int> kept = {0, 2, 4};
  EXPECT_EQ(c.report["kept"], json(kept));
  EXPECT_EQ(c.report["dropped"], json({1, 3, 5}));
  EXPECT_EQ(c.report["scores"], json({5.0, 1.0, 9.0, 3.0, 7.0, 2.0}));
  EXPECT_EQ(c.report["score"], "count");
  const MatrixRM r0 = matrix_of(before.router), r1 = matrix_of(b.router);
  const auto bias0 = before.router_bias->to_f32(), bias1 = b.router_bias->to_f32();
  ASSERT_EQ(r1.rows(), 3);
  ASSERT_EQ(bias1.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(r1.row(i), r0.row(kept[i])) << "router row " << i;
    EXPECT_EQ(bias1[i], bias0[kept[i]]);
    // Kept experts are the same tensors (no copy, no conversion).
    EXPECT_EQ(b.experts[i].gate.data(), before.experts[kept[i]].gate.data());
    EXPECT_EQ(b.experts[i].down.data(), before.experts[kept[i]].down.data());
  }
}

TEST(Prune, SoftAndReapUseTheirFields) {
  for (const char* method : {"soft", "reap"}) {
    Ctx c;
    c.layer = make_layer({.E = 5});
    c.stats = make_stats(5);
    c.stats.count = {9, 9, 9, 0, 0};  // ignored by these methods
    c.stats.weight_sum = {0.1, 0.5, 0.2, 0.9, 0.3};
    c.stats.reap = {3, 1, 4, 1.5, 9};
    auto p = prune({{"method", method}, {"keep", 2}});
    auto ctx = c.make(softmax_rule(5, 2));
    p->run_layer(ctx);
    EXPECT_EQ(c.report["kept"], std::string(method) == "soft" ? json({1, 3}) : json({2, 4})) << method;
  }
}

TEST(Prune, TiesKeepLowerIds) {
  Ctx c;
  c.layer = make_layer({.E = 4});
  c.stats = make_stats(4);
  c.stats.count = {2, 5, 5, 5};
  auto p = prune({{"method", "frequency"}, {"keep", 2}});
  auto ctx = c.make(softmax_rule(4, 1));
  p->run_layer(ctx);
  EXPECT_EQ(c.report["kept"], json({1, 2}));
}

TEST(Prune, ProtectsSuperExperts) {
  Ctx c;
  c.layer = make_layer({.E = 6});
  c.stats = make_stats(6);
  c.stats.count = {5, 1, 9, 3, 7, 2};
  c.stats.super_expert = {false, true, false, false, false, false};
  auto p = prune({{"method", "frequency"}, {"keep", 3}, {"protect_super_experts", true}});
  auto ctx = c.make(softmax_rule(6, 2));
  p->run_layer(ctx);
  EXPECT_EQ(c.report["kept"], json({1, 2, 4}));

  // More protected experts than kept: refused, naming the layer.
  Ctx d;
  d.layer = make_layer({.E = 6}, 3);
  d.stats = make_stats(6);
  d.stats.super_expert = {true, true, true, false, false, false};
  auto q = prune({{"method", "frequency"}, {"keep", 2}, {"protect_super_experts", true}});
  auto dctx = d.make(softmax_rule(6, 2));
  try {
    q->run_layer(dctx);
    FAIL() << "no error";
  } catch (const core::Error& e) {
    EXPECT_NE(e.message().find("layer 3: 3 super experts are protected but only 2"), std::string::npos) << e.message();
  }
}

TEST(Prune, RejectsImpossibleKeep) {
  Ctx c;
  c.layer = make_layer({.E = 4});
  c.stats = make_stats(4);
  auto too_many = prune({{"method", "frequency"}, {"keep", 5}});
  auto ctx = c.make(softmax_rule(4, 2));
  EXPECT_THROW(too_many->run_layer(ctx), core::Error);
  auto below_k = prune({{"method", "frequency"}, {"keep", 1}});
  EXPECT_THROW(below_k->run_layer(ctx), core::Error);
  EXPECT_EQ(c.layer.moe->num_experts(), 4);  // untouched
  // Missing statistics: a user error, not a crash.
  auto ctx2 = c.make(softmax_rule(4, 2), 7, /*with_stats=*/false);
  EXPECT_THROW(prune({{"method", "reap"}, {"keep", 2}})->run_layer(ctx2), core::Error);
  // Statistics of another shape.
  c.stats = make_stats(5);
  EXPECT_THROW(prune({{"method", "reap"}, {"keep", 2}})->run_layer(ctx), core::Error);
}

TEST(Prune, RandomIsSeededAndDeterministic) {
  auto kept_with = [](uint64_t ctx_seed, json opts) {
    Ctx c;
    c.layer = make_layer({.E = 16});
    opts["method"] = "random";
    opts["keep"] = 5;
    auto p = prune(opts);
    auto ctx = c.make(softmax_rule(16, 2), ctx_seed, /*with_stats=*/false);
    p->run_layer(ctx);
    return c.report["kept"];
  };
  EXPECT_EQ(kept_with(1, json::object()), kept_with(1, json::object()));
  EXPECT_NE(kept_with(1, json::object()), kept_with(2, json::object()));
  // A pass-level seed overrides the runner's.
  EXPECT_EQ(kept_with(1, {{"seed", 9}}), kept_with(2, {{"seed", 9}}));
  EXPECT_EQ(kept_with(1, json::object()).size(), 5u);
}

TEST(Prune, KeepRatioPlan) {
  // Layer 0: flat scores (0.25 each after normalising); layer 1: one dominant expert (0.97).
  std::vector<LayerScores> layers = {{0, 4, {10, 10, 10, 10}, {}}, {1, 4, {97, 1, 1, 1}, {}}};
  // Budget 0.5 * 8 = 4: each layer's minimum (top_k 2) is reserved first and uses the whole budget.
  EXPECT_EQ(plan_keep_ratio(layers, 0.5, 2, /*uniform=*/false), (std::map<int, int64_t>{{0, 2}, {1, 2}}));
  // Budget 0.75 * 8 = 6: minimums {2, 2}, then the global ranking past them: l0e2, l0e3 (0.25 each)
  // before l1e2 (0.01).
  EXPECT_EQ(plan_keep_ratio(layers, 0.75, 2, false), (std::map<int, int64_t>{{0, 4}, {1, 2}}));
  // Uniform: the same count in every layer, the one nearest the asked share (0.5 of 8 = 4 -> 2 each),
  // not the largest ragged count (which would keep 6 of 8).
  EXPECT_EQ(plan_keep_ratio(layers, 0.5, 2, /*uniform=*/true), (std::map<int, int64_t>{{0, 2}, {1, 2}}));
  // The per-layer minimum (top_k) still holds: 0.1 of 8 would be 1 per layer, top_k is 2.
  EXPECT_EQ(plan_keep_ratio(layers, 0.1, 2, true), (std::map<int, int64_t>{{0, 2}, {1, 2}}));
  // 8 experts per layer: 0.75 -> 6 (75%, not 7), 0.25 -> 2 (25%, not 3), 0.3 -> 2 (25% is nearer than 37.5%),
  // 0.45 -> 4 (3.6 per layer).
  {
    std::vector<LayerScores> eight = {{0, 8, {1, 2, 3, 4, 5, 6, 7, 8}, {}}, {1, 8, {8, 7, 6, 5, 4, 3, 2, 1}, {}}};
    EXPECT_EQ(plan_keep_ratio(eight, 0.75, 2, true).at(0), 6);
    EXPECT_EQ(plan_keep_ratio(eight, 0.25, 2, true).at(1), 2);
    EXPECT_EQ(plan_keep_ratio(eight, 0.30, 2, true).at(0), 2);
    EXPECT_EQ(plan_keep_ratio(eight, 0.45, 2, true).at(0), 4);
    EXPECT_EQ(plan_keep_ratio(eight, 1.0, 2, true).at(1), 8);
  }
  // Protected experts count toward the minimum and rank first.
  layers[1].protect = {false, true, true, true};
  // Layer 1's minimum is its 3 protected experts; minimums {2, 3} exceed the budget 4: kept as they are.
  EXPECT_EQ(plan_keep_ratio(layers, 0.5, 2, false), (std::map<int, int64_t>{{0, 2}, {1, 3}}));
  // Budget 6: minimums {2, 3}, then l1e0 (0.97) before layer 0's 0.25s.
  EXPECT_EQ(plan_keep_ratio(layers, 0.75, 2, false), (std::map<int, int64_t>{{0, 2}, {1, 4}}));
  // No scores (random): the ratio within each layer.
  std::vector<LayerScores> flat = {{0, 8, {}, {}}, {2, 8, {}, {}}};
  EXPECT_EQ(plan_keep_ratio(flat, 0.25, 1, true), (std::map<int, int64_t>{{0, 2}, {2, 2}}));
  EXPECT_EQ(plan_keep_ratio(flat, 0.01, 1, true), (std::map<int, int64_t>{{0, 1}, {2, 1}}));
}

// A layer at its minimum no longer overshoots the budget: the minimums are reserved first and
// only the rest follows the global ranking.
TEST(Prune, KeepRatioRaggedMeetsTheBudgetWhenALayerHitsItsMinimum) {
  auto total = [](const std::map<int, int64_t>& m) {
    int64_t t = 0;
    for (const auto& [l, c] : m) t += c;
    return t;
  };
  // 4 layers of 8, top_k 2, ratio 0.28: budget round(8.96) = 9. Layer 3 holds the dominant scores;
  // layers 1 and 2 would get nothing from the global ranking and used to be clamped up after it.
  std::vector<LayerScores> four = {{0, 8, {30, 20, 10, 1, 1, 1, 1, 1}, {}},
                                   {1, 8, {1, 1, 1, 1, 1, 1, 1, 1}, {}},
                                   {2, 8, {1, 1, 1, 1, 1, 1, 1, 1}, {}},
                                   {3, 8, {50, 40, 30, 1, 1, 1, 1, 1}, {}}};
  const auto p = plan_keep_ratio(four, 0.28, 2, false);
  EXPECT_EQ(total(p), 9);
  for (const auto& [l, c] : p) EXPECT_GE(c, 2) << "layer " << l;
  // Ragged input [4, 3, 2, 7] (16 experts), ratio 0.5: budget 8 = the minimums [2, 2, 2, 2].
  std::vector<LayerScores> ragged = {{0, 4, {9, 1, 1, 1}, {}},
                                     {1, 3, {1, 1, 1}, {}},
                                     {2, 2, {5, 5}, {}},
                                     {3, 7, {9, 8, 7, 1, 1, 1, 1}, {}}};
  EXPECT_EQ(plan_keep_ratio(ragged, 0.5, 2, false), (std::map<int, int64_t>{{0, 2}, {1, 2}, {2, 2}, {3, 2}}));
  // 0.75: budget 12, minimums 8; normalised, past the reserved ones: l1e2 0.33, l3e2 0.25,
  // l0e2 and l0e3 0.083, l3e3.. 0.036 -> 4 more = l1e2, l3e2, l0e2, l0e3.
  const auto q = plan_keep_ratio(ragged, 0.75, 2, false);
  EXPECT_EQ(total(q), 12);
  EXPECT_EQ(q, (std::map<int, int64_t>{{0, 4}, {1, 3}, {2, 2}, {3, 3}}));
  // Minimums above the budget: kept (the only case the budget is exceeded).
  EXPECT_EQ(total(plan_keep_ratio(ragged, 0.2, 2, false)), 8);
}

TEST(Prune, NonFiniteScoresAreRefusedWithAMessage) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  try {
    select_top({1, nan, 3, 4}, 2, nullptr, 5);
    ADD_FAILURE() << "no error";
  } catch (const core::Error& e) {
    EXPECT_NE(e.message().find("layer 5: non-finite score of expert 1"), std::string::npos) << e.message();
  }
  std::vector<LayerScores> layers = {{0, 4, {1, nan, 1, 1}, {}}};
  EXPECT_THROW(plan_keep_ratio(layers, 0.5, 1, false), core::Error);
}

TEST(Prune, KeepRatioThroughThePass) {
  Ctx c0, c1;
  c0.layer = make_layer({.E = 4, .seed = 1}, 0);
  c1.layer = make_layer({.E = 4, .seed = 2}, 1);
  calib::Stats stats;
  stats.layers[0] = make_stats(4);
  stats.layers[0].count = {10, 10, 10, 10};
  stats.layers[1] = make_stats(4);
  stats.layers[1].count = {97, 1, 1, 1};
  model::Model m;
  m.layers().push_back(c0.layer);
  m.layers().push_back(c1.layer);
  for (bool uniform : {false, true}) {
    auto p = prune({{"method", "frequency"}, {"keep_ratio", 0.5}, {"uniform", uniform}});
    p->plan(m, &stats);  // a default Model has top_k 0: no per-layer minimum here
    // Budget 4: l1e0, l0e0..e2 -> {3, 1}; uniform -> {2, 2} (4 of 8, what was asked).
    EXPECT_EQ(p->experts_after(0, 4, 1), uniform ? 2 : 3);
    EXPECT_EQ(p->experts_after(1, 4, 1), uniform ? 2 : 1);
    EXPECT_DOUBLE_EQ(p->params()["keep_ratio_achieved"].get<double>(), 0.5);
    Ctx a = c1;
    a.stats = stats.layers[1];
    auto ctx = a.make(softmax_rule(4, 1));
    p->run_layer(ctx);
    EXPECT_EQ(a.report["kept"], uniform ? json({0, 1}) : json::array({0}));
  }
  // Without statistics: a user error.
  auto p = prune({{"method", "frequency"}, {"keep_ratio", 0.5}});
  EXPECT_THROW(p->plan(m, nullptr), core::Error);
}

// ---- NAEE enumerate -------------------------------------------------------------------------

double block_loss(const runtime::MoeWeights& w, const runtime::RoutingRule& rule, const MatrixRM& x,
                  const std::vector<int>& dropped) {
  std::vector<bool> active(w.num_experts(), true);
  for (int e : dropped) active[e] = false;
  const MatrixRM z = runtime::moe_forward(w, rule, x);
  const MatrixRM zs = runtime::moe_forward(w, rule, x, nullptr, false, &active);
  return (z - zs).cast<double>().norm();
}

// Brute force with the runtime's own block: every subset, the least loss.
std::pair<std::vector<int>, double> brute_force(const runtime::MoeWeights& w, const runtime::RoutingRule& rule,
                                                const MatrixRM& x, int keep) {
  const int E = static_cast<int>(w.num_experts());
  std::vector<int> best;
  double best_loss = std::numeric_limits<double>::infinity();
  std::vector<int> c = first_combination(E - keep);
  do {
    const double l = block_loss(w, rule, x, c);
    if (l < best_loss) {
      best_loss = l;
      best = c;
    }
  } while (next_combination(c, E));
  return {best, best_loss};
}

struct NaeeCase {
  const char* name;
  LayerSpec spec;
  runtime::RoutingRule rule;
  int keep;
};

TEST(PruneEnumerate, PicksTheLeastLossSubset) {
  runtime::RoutingRule v3;
  v3.family = "deepseek_v3";
  v3.kind = model::Routing::DeepSeekV3;
  v3.top_k = 2;
  v3.num_experts = 6;
  v3.renormalize = true;
  v3.routed_scaling_factor = 2.5;
  v3.n_group = 2;
  v3.topk_group = 1;
  v3.group_limited = true;
  const std::vector<NaeeCase> cases = {
      {"mixtral", {.E = 6, .H = 8, .I = 4, .seed = 3}, softmax_rule(6, 2, true), 4},
      {"olmoe (no renorm)", {.E = 6, .H = 8, .I = 4, .seed = 4}, softmax_rule(6, 2, false), 3},
      {"qwen2_moe (shared)", {.E = 7, .H = 8, .I = 4, .seed = 5, .shared = true, .shared_gate = true},
       softmax_rule(7, 2, false), 4},
      {"deepseek_v3 (bias)", {.E = 6, .H = 8, .I = 4, .seed = 6, .shared = true, .router_bias = true}, v3, 4},
  };
  for (const auto& tc : cases) {
    SCOPED_TRACE(tc.name);
    std::mt19937_64 rng(tc.spec.seed + 100);
    Ctx c;
    c.layer = make_layer(tc.spec);
    c.x = random_matrix(64, tc.spec.H, rng);
    const runtime::MoeWeights w = runtime::convert_moe(*c.layer.moe);
    const auto [want, want_loss] = brute_force(w, tc.rule, c.x, tc.keep);

    const EnumerateResult r = naee_enumerate(w, tc.rule, c.x, tc.keep, 5000);
    EXPECT_EQ(r.dropped, want);
    EXPECT_NEAR(r.loss, want_loss, 1e-4 * (1 + want_loss));
    EXPECT_EQ(r.subsets, n_choose_k(tc.spec.E, tc.spec.E - tc.keep));
    EXPECT_GT(want_loss, 0.0);
    // Every expert's least loss when dropped is at least the best loss.
    for (double l : r.min_loss_dropping) EXPECT_GE(l, r.loss);

    // Through the pass: the same experts are dropped and the router rows follow.
    auto p = prune({{"method", "enumerate"}, {"keep", tc.keep}});
    auto ctx = c.make(tc.rule, 7, /*with_stats=*/false, /*with_x=*/true);
    p->run_layer(ctx);
    EXPECT_EQ(c.report["dropped"], json(want));
    EXPECT_EQ(c.layer.moe->num_experts(), tc.keep);
    EXPECT_EQ(c.report["subsets"], r.subsets);
  }
}

TEST(PruneEnumerate, ChunkedTokensGiveTheSameLoss) {
  // More tokens than one chunk: a chunk budget of 34 tokens' E expert outputs (34·E·H floats)
  // holds 34 of the 50 tokens.
  LayerSpec spec{.E = 4, .H = 64, .I = 2, .seed = 8};
  std::mt19937_64 rng(1);
  model::Layer l = make_layer(spec);
  const runtime::MoeWeights w = runtime::convert_moe(*l.moe);
  const MatrixRM x = random_matrix(50, spec.H, rng, 0.05f);
  const auto rule = softmax_rule(4, 2);
  const EnumerateResult r = naee_enumerate(w, rule, x, 3, 100, nullptr, 34 * 4 * spec.H);
  EXPECT_NEAR(r.loss, block_loss(w, rule, x, r.dropped), 1e-4 * (1 + r.loss));
  EXPECT_EQ(r.dropped, brute_force(w, rule, x, 3).first);
  for (int e = 0; e < 4; ++e) EXPECT_NEAR(r.min_loss_dropping[e], block_loss(w, rule, x, {e}), 1e-4 * (1 + r.loss));
}

TEST(PruneEnumerate, ProtectedExpertsAreNeverDropped) {
  LayerSpec spec{.E = 6, .seed = 3};
  std::mt19937_64 rng(103);
  model::Layer l = make_layer(spec);
  const runtime::MoeWeights w = runtime::convert_moe(*l.moe);
  const MatrixRM x = random_matrix(64, spec.H, rng);
  const auto rule = softmax_rule(6, 2);
  const auto best = brute_force(w, rule, x, 4).first;
  std::vector<bool> protect(6, false);
  protect[best[0]] = true;  // forbid the unconstrained optimum
  const EnumerateResult r = naee_enumerate(w, rule, x, 4, 5000, &protect);
  EXPECT_EQ(r.subsets, n_choose_k(5, 2));
  for (int e : r.dropped) EXPECT_NE(e, best[0]);
}

TEST(PruneEnumerate, RefusesTooManySubsets) {
  Ctx c;
  c.layer = make_layer({.E = 16, .H = 4, .I = 2});
  std::mt19937_64 rng(1);
  c.x = random_matrix(8, 4, rng);
  auto p = prune({{"method", "enumerate"}, {"keep", 8}});  // C(16, 8) = 12870 > 5000
  auto ctx = c.make(softmax_rule(16, 2), 7, false, true);
  try {
    p->run_layer(ctx);
    FAIL() << "no error";
  } catch (const core::Error& e) {
    EXPECT_EQ(e.kind(), core::ErrorKind::InvalidArgument);
    EXPECT_NE(e.message().find("12870 subsets, above max_subsets 5000"), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("\"reap\""), std::string::npos) << e.message();
  }
  EXPECT_EQ(c.layer.moe->num_experts(), 16);
  // Raising the limit allows it.
  auto q = prune({{"method", "enumerate"}, {"keep", 14}, {"max_subsets", 200}});  // C(16, 2) = 120
  q->run_layer(ctx);
  EXPECT_EQ(c.layer.moe->num_experts(), 14);
}

}  // namespace
}  // namespace moe::passes
