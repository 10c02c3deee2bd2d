// MoNE novices (passes/novices.h): n_e and the forward with novices against a reference computed
// here with plain loops (softmax top-k routing with renormalisation, SiLU-GLU experts).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "passes/novices.h"
#include "passes/pass_test_util.h"
#include "runtime/moe_block.h"

namespace moe::passes {
namespace {

using testing::random_matrix;
using testing::random_mlp;

constexpr int kE = 4, kH = 8, kI = 6, kN = 40, kK = 2;

runtime::RoutingRule mixtral_rule() {
  runtime::RoutingRule r;
  r.family = "mixtral";
  r.kind = model::Routing::SoftmaxTopK;
  r.top_k = kK;
  r.num_experts = kE;
  r.renormalize = true;
  return r;
}

runtime::MoeWeights random_block(uint64_t seed) {
  std::mt19937_64 rng(seed);
  runtime::MoeWeights w;
  w.router = random_matrix(kE, kH, rng);
  for (int e = 0; e < kE; ++e) w.experts.push_back(random_mlp(kH, kI, rng));
  return w;
}

// down(silu(gate x) * up x) for one row, in double.
std::vector<double> expert_out(const runtime::MlpWeights& m, const float* x) {
  std::vector<double> h(kI), y(kH, 0.0);
  for (int i = 0; i < kI; ++i) {
    double g = 0, u = 0;
    for (int c = 0; c < kH; ++c) {
      g += double(m.gate(i, c)) * x[c];
      u += double(m.up(i, c)) * x[c];
    }
    h[i] = g / (1.0 + std::exp(-g)) * u;
  }
  for (int o = 0; o < kH; ++o)
    for (int i = 0; i < kI; ++i) y[o] += double(m.down(o, i)) * h[i];
  return y;
}

// Mixtral routing of one row: the top-k experts by logit and their renormalised softmax weights.
std::vector<std::pair<int, double>> route_row(const runtime::MatrixRM& router, const float* x) {
  std::vector<double> logit(kE, 0.0);
  for (int e = 0; e < kE; ++e)
    for (int c = 0; c < kH; ++c) logit[e] += double(router(e, c)) * x[c];
  std::vector<int> order(kE);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logit[a] > logit[b]; });
  double sum = 0;
  std::vector<std::pair<int, double>> top;
  for (int j = 0; j < kK; ++j) {
    top.push_back({order[j], std::exp(logit[order[j]] - logit[order[0]])});
    sum += top.back().second;
  }
  for (auto& [e, w] : top) w /= sum;
  return top;
}

TEST(Novices, ValueIsTheMeanOutputOverTheRoutedTokens) {
  const runtime::MoeWeights w = random_block(7);
  std::mt19937_64 rng(11);
  const runtime::MatrixRM x = random_matrix(kN, kH, rng);
  const auto got = novice_values(w, mixtral_rule(), x, {1, 3});
  ASSERT_EQ(got.size(), 2u);
  for (const auto& v : got) {
    std::vector<double> sum(kH, 0.0);
    int64_t n = 0;
    for (int t = 0; t < kN; ++t) {
      const auto top = route_row(w.router, x.row(t).data());
      if (std::none_of(top.begin(), top.end(), [&](const auto& p) { return p.first == v.expert; })) continue;
      const auto y = expert_out(w.experts[v.expert], x.row(t).data());
      for (int i = 0; i < kH; ++i) sum[i] += y[i];
      ++n;
    }
    ASSERT_GT(n, 0);
    EXPECT_EQ(v.routed_tokens, n) << "expert " << v.expert;
    for (int i = 0; i < kH; ++i) EXPECT_NEAR(v.value[i], sum[i] / double(n), 1e-5) << "expert " << v.expert << " i " << i;
  }
}

TEST(Novices, AnExpertNoTokenIsRoutedToAveragesOverAllTokens) {
  runtime::MoeWeights w = random_block(3);
  std::mt19937_64 rng(5);
  const runtime::MatrixRM x = random_matrix(kN, kH, rng).cwiseAbs();  // positive inputs
  w.router.row(2).setConstant(-10.0f);  // expert 2's logit is always the lowest
  const auto got = novice_values(w, mixtral_rule(), x, {2});
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].routed_tokens, 0);
  std::vector<double> sum(kH, 0.0);
  for (int t = 0; t < kN; ++t) {
    const auto y = expert_out(w.experts[2], x.row(t).data());
    for (int i = 0; i < kH; ++i) sum[i] += y[i];
  }
  for (int i = 0; i < kH; ++i) EXPECT_NEAR(got[0].value[i], sum[i] / kN, 1e-5);
}

TEST(Novices, ForwardAddsTheGateTimesTheNovice) {
  const runtime::MoeWeights orig = random_block(9);
  std::mt19937_64 rng(13);
  const runtime::MatrixRM x = random_matrix(kN, kH, rng);
  // Experts 0 and 2 become novices with arbitrary constants.
  runtime::MoeWeights w = orig;
  std::vector<std::vector<float>> n(kE);
  for (int e : {0, 2}) {
    const runtime::MatrixRM v = random_matrix(1, kH, rng);
    n[e].assign(v.data(), v.data() + kH);
    w.experts[e] = runtime::MlpWeights{};
    w.experts[e].novice = v;
  }
  const runtime::MatrixRM out = runtime::moe_forward(w, mixtral_rule(), x);
  ASSERT_EQ(out.rows(), kN);
  for (int t = 0; t < kN; ++t) {
    std::vector<double> ref(kH, 0.0);
    for (const auto& [e, g] : route_row(orig.router, x.row(t).data())) {
      const std::vector<double> y =
          n[e].empty() ? expert_out(orig.experts[e], x.row(t).data()) : std::vector<double>(n[e].begin(), n[e].end());
      for (int i = 0; i < kH; ++i) ref[i] += g * y[i];
    }
    for (int i = 0; i < kH; ++i) EXPECT_NEAR(out(t, i), ref[i], 1e-5) << "token " << t << " i " << i;
  }
}

TEST(Novices, MakeNovicesKeepsTheRouterAndTheOtherExperts) {
  testing::LayerSpec spec;
  model::Layer layer = testing::make_layer(spec);
  model::MoeBlock& b = *layer.moe;
  const auto router = b.router.to_f32();
  const auto gate0 = b.experts[0].gate.to_f32();
  NoviceValue v;
  v.expert = 3;
  v.value.assign(static_cast<size_t>(spec.H), 0.25f);
  make_novices(b, {v});
  EXPECT_EQ(b.num_experts(), spec.E);
  EXPECT_EQ(b.num_novices(), 1);
  EXPECT_EQ(b.router.to_f32(), router);
  EXPECT_EQ(b.experts[0].gate.to_f32(), gate0);
  ASSERT_TRUE(b.experts[3].is_novice());
  EXPECT_EQ(b.experts[3].novice->shape(), core::Shape{spec.H});
  EXPECT_EQ(b.experts[3].params(), spec.H);
  EXPECT_EQ(b.expert_width(), spec.I);
}

}  // namespace
}  // namespace moe::passes
