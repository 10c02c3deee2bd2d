// Per-item bit-width choice (quant/mixed_precision.h): GLPK's answer against brute force over
// every assignment on small random cases, the two ends of the budget, MC-MoE's importance, errors.
#include "quant/mixed_precision.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "support/expect_error.h"

namespace moe::quant {
namespace {

using core::ErrorKind;
using test::expect_error;

struct Eval {
  double objective = 0, avg_bits = 0;
};

Eval evaluate(const std::vector<MixedItem>& items, const std::vector<WidthOption>& options, const std::vector<int>& choice) {
  Eval e;
  double bits = 0, params = 0;
  for (size_t j = 0; j < items.size(); ++j) {
    e.objective += items[j].importance * items[j].loss[size_t(choice[j])];
    bits += items[j].params * options[size_t(choice[j])].bits_per_param;
    params += items[j].params;
  }
  e.avg_bits = bits / params;
  return e;
}

// The best objective over all K^N assignments within the budget (+inf if none fits).
double brute_force(const std::vector<MixedItem>& items, const std::vector<WidthOption>& options, double avg_bits) {
  const size_t n = items.size(), k = options.size();
  std::vector<int> choice(n, 0);
  double best = std::numeric_limits<double>::infinity();
  for (;;) {
    const Eval e = evaluate(items, options, choice);
    if (e.avg_bits <= avg_bits && e.objective < best) best = e.objective;
    size_t j = 0;
    while (j < n && ++choice[j] == int(k)) choice[j++] = 0;
    if (j == n) break;
  }
  return best;
}

std::vector<WidthOption> random_options(std::mt19937_64& g, size_t k) {
  std::uniform_real_distribution<double> u(1.5, 8.5);
  std::vector<WidthOption> options;
  for (size_t o = 0; o < k; ++o) options.push_back({"w" + std::to_string(o), u(g)});
  return options;
}

// Losses in any order (not only falling with the width), so no structure helps the solver.
std::vector<MixedItem> random_items(std::mt19937_64& g, size_t n, size_t k) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<MixedItem> items;
  for (size_t j = 0; j < n; ++j) {
    MixedItem it{"layers.0.experts." + std::to_string(j), 1 + 9 * u(g), 2 * u(g), {}};
    for (size_t o = 0; o < k; ++o) it.loss.push_back(u(g));
    items.push_back(std::move(it));
  }
  return items;
}

void expect_consistent_status(const MixedResult& r, const std::vector<MixedItem>& items,
                              const std::vector<WidthOption>& options, double avg_bits) {
  ASSERT_EQ(r.choice.size(), items.size());
  for (int c : r.choice) {
    ASSERT_GE(c, 0);
    ASSERT_LT(c, int(options.size()));
  }
  const Eval e = evaluate(items, options, r.choice);
  EXPECT_NEAR(r.objective, e.objective, 1e-12 * (1 + e.objective));
  EXPECT_NEAR(r.avg_bits, e.avg_bits, 1e-12 * e.avg_bits);
  EXPECT_LE(e.avg_bits, avg_bits * (1 + 1e-12)) << "over the budget";
}

void expect_consistent(const MixedResult& r, const std::vector<MixedItem>& items, const std::vector<WidthOption>& options,
                       double avg_bits) {
  expect_consistent_status(r, items, options, avg_bits);
  EXPECT_EQ(r.status, "optimal");
  EXPECT_EQ(r.gap, 0.0);
}

TEST(MixedPrecision, MatchesBruteForceOnRandomCases) {
  int cases = 0;
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    std::mt19937_64 g(seed);
    const size_t n = seed % 2 ? 5 : 6, k = seed % 2 ? 4 : 3;  // 4^5 = 1024 and 3^6 = 729 assignments
    const auto options = random_options(g, k);
    const auto items = random_items(g, n, k);
    double lo = options[0].bits_per_param, hi = lo;
    for (const auto& o : options) lo = std::min(lo, o.bits_per_param), hi = std::max(hi, o.bits_per_param);
    for (double t : {0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0}) {
      const double budget = lo + t * (hi - lo);
      SCOPED_TRACE("seed " + std::to_string(seed) + ", budget " + std::to_string(budget));
      const MixedResult r = choose_widths(items, options, budget);
      expect_consistent(r, items, options, budget);
      const double best = brute_force(items, options, budget);
      EXPECT_NEAR(r.objective, best, 1e-9 * (1 + best));
      ++cases;
    }
  }
  EXPECT_EQ(cases, 140);
}

TEST(MixedPrecision, BudgetAtTheSmallestWidthPutsEveryItemThere) {
  std::mt19937_64 g(7);
  // The smallest width is not the first option, and it has the largest losses.
  const std::vector<WidthOption> options = {{"int4-g128", 4.125}, {"ternary", 1.6}, {"int2-g128", 2.125}, {"int3-g128", 3.125}};
  auto items = random_items(g, 12, options.size());
  for (auto& it : items) it.loss[1] = 10 + it.loss[1];
  const MixedResult r = choose_widths(items, options, 1.6);
  expect_consistent(r, items, options, 1.6);
  for (int c : r.choice) EXPECT_EQ(c, 1);
  EXPECT_DOUBLE_EQ(r.avg_bits, 1.6);
}

TEST(MixedPrecision, GenerousBudgetGivesEveryItemItsSmallestLoss) {
  std::mt19937_64 g(11);
  const auto options = random_options(g, 5);
  const auto items = random_items(g, 40, options.size());
  for (double budget : {8.5, 100.0}) {
    const MixedResult r = choose_widths(items, options, budget);
    expect_consistent(r, items, options, budget);
    for (size_t j = 0; j < items.size(); ++j) {
      if (items[j].importance == 0) continue;  // every width is as good
      const auto& l = items[j].loss;
      EXPECT_EQ(r.choice[j], int(std::min_element(l.begin(), l.end()) - l.begin())) << items[j].name;
    }
  }
}

TEST(MixedPrecision, ImportanceDecidesWhoGetsTheBits) {
  // Room for one of two equal items at 4 bits: the one that matters more gets it.
  const std::vector<WidthOption> options = {{"int2", 2}, {"int4", 4}};
  const std::vector<MixedItem> items = {{"a", 100, 0.5, {1.0, 0.1}}, {"b", 100, 2.0, {1.0, 0.1}}};
  const MixedResult r = choose_widths(items, options, 3.0);
  EXPECT_EQ(r.choice, (std::vector<int>{0, 1}));
  EXPECT_DOUBLE_EQ(r.avg_bits, 3.0);
  EXPECT_DOUBLE_EQ(r.objective, 0.5 * 1.0 + 2.0 * 0.1);
}

TEST(MixedPrecision, SmallLossesAreNotLostToTolerances) {
  // Block-output errors can be 1e-9 and below; the choice must not depend on their scale.
  std::mt19937_64 g(3);
  const auto options = random_options(g, 4);
  auto items = random_items(g, 5, options.size());
  const double budget = 0.5 * (options[0].bits_per_param + options[1].bits_per_param);
  const MixedResult unit = choose_widths(items, options, budget);
  for (auto& it : items)
    for (auto& l : it.loss) l *= 1e-12;
  const MixedResult tiny = choose_widths(items, options, budget);
  EXPECT_EQ(tiny.choice, unit.choice);
  EXPECT_NEAR(tiny.objective, brute_force(items, options, budget), 1e-21);
}

TEST(MixedPrecision, StopsAtAGap) {
  std::mt19937_64 g(5);
  const std::vector<WidthOption> options = {{"ternary", 1.6875}, {"int2-g128", 2.125}, {"int3-g128", 3.125}, {"int4-g128", 4.125}};
  auto items = random_items(g, 300, options.size());
  for (auto& it : items) it.params = 1000;  // equal sizes, as experts are: the hard case
  const MixedResult r = choose_widths(items, options, 2.6, MixedSolve{1e-3, 60});
  expect_consistent_status(r, items, options, 2.6);
  EXPECT_TRUE(r.status == "optimal" || r.status == "within gap") << r.status;
  EXPECT_LE(r.gap, 1e-3);
  EXPECT_GE(r.gap, 0.0);
  expect_error([&] { choose_widths(items, options, 2.6, MixedSolve{-1, 0}); }, ErrorKind::InvalidArgument, {"mip_gap -1"});
  expect_error([&] { choose_widths(items, options, 2.6, MixedSolve{0, std::nan("")}); }, ErrorKind::InvalidArgument,
               {"time limit nan"});
}

TEST(MixedPrecision, McMoeImportance) {
  EXPECT_DOUBLE_EQ(mc_moe_importance(0.25, 0.04), 0.25 * 0.008);  // φ · w^1.5
  EXPECT_DOUBLE_EQ(mc_moe_importance(0.5, 0.09, 2.0, 0.5), 0.25 * 0.3);
  EXPECT_EQ(mc_moe_importance(0.0, 0.3), 0.0);  // never routed
  expect_error([] { mc_moe_importance(-0.1, 0.2); }, ErrorKind::InvalidArgument, {"frequency -0.1"});
  expect_error([] { mc_moe_importance(0.1, std::nan("")); }, ErrorKind::InvalidArgument, {"routing weight nan"});
}

TEST(MixedPrecision, Errors) {
  const std::vector<WidthOption> options = {{"int4-g128", 4.125}, {"ternary", 1.6}};
  const std::vector<MixedItem> items = {{"layers.3.experts.5", 10, 1, {0.1, 0.5}}, {"layers.3.experts.6", 10, 1, {0.2, 0.4}}};
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();

  EXPECT_EQ(expect_error([&] { choose_widths(items, options, 1.2); }, ErrorKind::InvalidArgument, {}),
            "--avg-bits 1.2 is below the smallest width 1.6 (ternary)");
  expect_error([&] { choose_widths(items, options, nan); }, ErrorKind::InvalidArgument, {"--avg-bits nan"});
  expect_error([&] { choose_widths({}, options, 3); }, ErrorKind::InvalidArgument, {"no items"});
  expect_error([&] { choose_widths(items, {}, 3); }, ErrorKind::InvalidArgument, {"no width options"});
  expect_error([&] { choose_widths(items, {{"int4", 4}, {"broken", nan}}, 4); }, ErrorKind::InvalidArgument,
               {"'broken'", "bits per param nan"});
  expect_error([&] { choose_widths(items, {{"int4", 4}, {"zero", 0}}, 4); }, ErrorKind::InvalidArgument, {"'zero'"});

  auto bad = items;
  bad[1].loss = {0.1, 0.2, 0.3};
  expect_error([&] { choose_widths(bad, options, 3); }, ErrorKind::InvalidArgument,
               {"item 'layers.3.experts.6' has 3 losses for 2 width options"});
  bad = items;
  bad[1].loss[0] = nan;
  expect_error([&] { choose_widths(bad, options, 3); }, ErrorKind::InvalidArgument,
               {"item 'layers.3.experts.6'", "loss nan", "(int4-g128)"});
  bad = items;
  bad[0].loss[1] = -inf;
  expect_error([&] { choose_widths(bad, options, 3); }, ErrorKind::InvalidArgument, {"item 'layers.3.experts.5'", "loss -inf"});
  bad = items;
  bad[0].importance = inf;
  expect_error([&] { choose_widths(bad, options, 3); }, ErrorKind::InvalidArgument, {"item 'layers.3.experts.5'", "importance inf"});
  bad = items;
  bad[1].importance = nan;
  expect_error([&] { choose_widths(bad, options, 3); }, ErrorKind::InvalidArgument, {"item 'layers.3.experts.6'", "importance nan"});
  bad = items;
  bad[0].importance = -1;
  expect_error([&] { choose_widths(bad, options, 3); }, ErrorKind::InvalidArgument, {"importance -1"});
  bad = items;
  bad[1].params = 0;
  expect_error([&] { choose_widths(bad, options, 3); }, ErrorKind::InvalidArgument, {"item 'layers.3.experts.6'", "params 0"});
}

}  // namespace
}  // namespace moe::quant
