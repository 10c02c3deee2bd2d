// Cross-layer expert sharing (passes/xlayer_share.h) on a synthetic two-layer mixtral with
// hand-made statistics (the out_mean rows fix which experts are most similar): identical experts
// pooled give the same logits exactly, both layers hold the very same stored tensors, neurons are
// aligned and members weighted by their routed-token counts, budget 0 changes nothing, refusals.
#include <gtest/gtest.h>

#include "core/error.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "passes/expert_merge.h"
#include "passes/experts.h"
#include "passes/xlayer_share.h"
#include "quant/pooled.h"
#include "runtime/forward.h"
#include "runtime/weights.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using runtime::MatrixRM;

model::Model load_synth_mixtral(const TempDir& tmp, int layers = 2) {
  const fs::path dir = synth_to(tmp / ("in" + std::to_string(layers)), "mixtral", {.layers = layers});
  return model::Model::load(io::Checkpoint::open(io::Env::posix(), dir));
}

// Statistics of layers 0 and 1: expert e of layer 0 most similar to expert partner[e] of layer 1
// (out_mean rows: unit vectors; row of layer-1 expert partner[e] = row of layer-0 expert e).
calib::Stats hand_stats(int64_t E, int64_t H, const std::vector<int>& partner, std::vector<double> count0,
                        std::vector<double> count1) {
  calib::Stats s;
  for (int l = 0; l < 2; ++l) {
    calib::LayerStats& ls = s.layers[l];
    ls.count = l == 0 ? count0 : count1;
    ls.out_mean = calib::MatrixF::Zero(E, H);
  }
  for (int e = 0; e < E; ++e) {
    s.layers[0].out_mean(e, e) = 1.0f;
    s.layers[1].out_mean(partner[e], e) = 1.0f;
    s.layers[1].out_mean(partner[e], E + e) = 0.1f * static_cast<float>(e);  // cosine falls with e
  }
  return s;
}

MatrixRM logits(const model::Model& m) {
  runtime::Forward f(m);
  std::vector<int32_t> ids;
  for (int i = 0; i < 48; ++i) ids.push_back(static_cast<int32_t>((i * 37 + 11) % m.dims().vocab));
  return f.run(ids, 24);
}

const quant::Pooled* pooled(const core::Tensor& t) { return dynamic_cast<const quant::Pooled*>(t.encoding()); }

TEST(XlayerShare, IdenticalExpertsPooledGiveTheSameLogitsAndOneStoredTensor) {
  TempDir tmp("xlayer");
  model::Model m = load_synth_mixtral(tmp);
  auto& L = m.layers();
  L[1].moe->experts = L[0].moe->experts;  // layer 1's experts = layer 0's
  const MatrixRM before = logits(m);
  const int64_t E = L[0].moe->num_experts(), H = m.dims().hidden;
  const auto stats = hand_stats(E, H, {0, 1, 2, 3}, {5, 1, 2, 0}, {1, 7, 0, 0});
  const auto rep = passes::share_experts_across_layers(m, stats, 0.5);  // every expert pooled
  ASSERT_EQ(rep["pools"].size(), 4u);
  for (int e = 0; e < E; ++e) {
    const model::Mlp &x = L[0].moe->experts[e], &y = L[1].moe->experts[e];
    for (auto [a, b] : {std::pair{&x.gate, &y.gate}, {&x.up, &y.up}, {&x.down, &y.down}}) {
      ASSERT_NE(pooled(*a), nullptr);
      ASSERT_NE(pooled(*b), nullptr);
      EXPECT_EQ(pooled(*a)->weight().get(), pooled(*b)->weight().get()) << "expert " << e;
    }
  }
  EXPECT_EQ(rep["expert_params_stored"].get<int64_t>() * 2, rep["expert_params_logical"].get<int64_t>());
  const MatrixRM after = logits(m);
  EXPECT_TRUE(before == after) << "max |diff| " << (before - after).cwiseAbs().maxCoeff();
}

TEST(XlayerShare, AlignsNeuronsAndWeightsByRoutedTokens) {
  TempDir tmp("xlayer");
  model::Model m = load_synth_mixtral(tmp);
  auto& L = m.layers();
  // Layer 1's expert 3 = 2 x layer 0's expert 2 with its neurons reversed; pool only that pair.
  const runtime::MlpWeights a = runtime::convert_mlp(L[0].moe->experts[2]);
  std::vector<int> rev(a.gate.rows());
  for (size_t i = 0; i < rev.size(); ++i) rev[i] = static_cast<int>(rev.size() - 1 - i);
  runtime::MlpWeights b = passes::permute_neurons(a, rev);
  b.gate *= 2;
  b.up *= 2;
  b.down *= 2;
  L[1].moe->experts[3] = {passes::to_tensor(b.gate, core::DType::BF16), passes::to_tensor(b.up, core::DType::BF16),
                          passes::to_tensor(b.down, core::DType::BF16)};
  const int64_t E = L[0].moe->num_experts(), H = m.dims().hidden;
  // out_mean: layer-0 expert 2 pairs with layer-1 expert 3 at cosine 1, the best candidate.
  auto stats = hand_stats(E, H, {1, 0, 3, 2}, {0, 0, 30, 0}, {0, 0, 0, 10});
  stats.layers[1].out_mean.row(3) = stats.layers[0].out_mean.row(2);
  stats.layers[1].out_mean(1, E + 3) = 0.5f;  // (0, 1) no longer at cosine 1
  const auto rep = passes::share_experts_across_layers(m, stats, 0.125);  // 1 of 8 experts
  ASSERT_EQ(rep["pools"].size(), 1u) << rep.dump();
  EXPECT_EQ(rep["pools"][0]["experts"], nlohmann::json({2, 3}));
  EXPECT_NEAR(rep["pools"][0]["weights"][0].get<double>(), 0.75, 1e-12);
  // (0.75 · A + 0.25 · 2A) = 1.25 A, stored in bf16.
  const runtime::MlpWeights got = runtime::convert_mlp(L[1].moe->experts[3]);
  EXPECT_LT((got.gate - 1.25f * a.gate).cwiseAbs().maxCoeff(), 1e-2f);
  EXPECT_LT((got.down - 1.25f * a.down).cwiseAbs().maxCoeff(), 1e-2f);
  EXPECT_GT((a.gate).cwiseAbs().maxCoeff(), 0.1f);
  // Only that pair is pooled.
  EXPECT_EQ(pooled(L[0].moe->experts[0].gate), nullptr);
  EXPECT_NE(pooled(L[0].moe->experts[2].gate), nullptr);
}

TEST(XlayerShare, BudgetZeroChangesNothing) {
  TempDir tmp("xlayer");
  model::Model m = load_synth_mixtral(tmp);
  const MatrixRM before = logits(m);
  const auto stats = hand_stats(4, m.dims().hidden, {0, 1, 2, 3}, {1, 1, 1, 1}, {1, 1, 1, 1});
  const auto rep = passes::share_experts_across_layers(m, stats, 0.0);
  EXPECT_EQ(rep["pools"].size(), 0u);
  for (const auto& l : m.layers())
    for (const auto& x : l.moe->experts) EXPECT_EQ(x.gate.encoding(), nullptr);
  EXPECT_TRUE(before == logits(m));
}

void expect_invalid(model::Model& m, const calib::Stats& s, double share, const std::string& needle) {
  try {
    passes::share_experts_across_layers(m, s, share);
    ADD_FAILURE() << "no error for share " << share << ", expected: " << needle;
  } catch (const core::Error& e) {
    EXPECT_EQ(e.exit_code(), 2);
    EXPECT_NE(e.message().find(needle), std::string::npos) << e.message();
    EXPECT_EQ(e.message().find('\n'), std::string::npos) << e.message();
  }
}

TEST(XlayerShare, Refusals) {
  TempDir tmp("xlayer");
  model::Model m = load_synth_mixtral(tmp);
  const auto stats = hand_stats(4, m.dims().hidden, {0, 1, 2, 3}, {1, 1, 1, 1}, {1, 1, 1, 1});
  expect_invalid(m, stats, 0.6, "--share: expected a share of expert parameters in [0, 0.5]");
  expect_invalid(m, stats, -0.1, "--share: expected");
  expect_invalid(m, stats, std::nan(""), "--share: expected");
  model::Model one = load_synth_mixtral(tmp, 1);
  expect_invalid(one, stats, 0.25, "needs at least two MoE layers, found 1");
  // Layer 1 narrower (its experts cut to 8 neurons).
  model::Model narrow = m;
  for (auto& x : narrow.layers()[1].moe->experts) {
    const runtime::MlpWeights w = runtime::convert_mlp(x);
    x = {passes::to_tensor(w.gate.topRows(8), core::DType::BF16), passes::to_tensor(w.up.topRows(8), core::DType::BF16),
         passes::to_tensor(w.down.leftCols(8), core::DType::BF16)};
  }
  expect_invalid(narrow, stats, 0.25, "layer 1: expert width 8 differs from layer 0's 16");
  // Three MoE layers of 4 experts: one pair, at most 4 of the 12 experts pooled. The bound stated
  // is the one checked: round(share x 12) <= 4, so 0.37 (4.44) passes and 0.375 (4.5) does not.
  model::Model three = load_synth_mixtral(tmp, 3);
  expect_invalid(three, stats, 0.375,
                 "--share: 0.375 asks for round(0.375 x 12 experts) = 5 pooled experts but the 1 pair(s) of adjacent MoE "
                 "layers hold at most 4 (share < 0.375)");
  const nlohmann::json pools = passes::share_experts_across_layers(three, stats, 0.37);
  EXPECT_EQ(pools.at("pools").size(), 4u);
  // Nothing pooled after a refusal.
  for (const auto& l : m.layers())
    for (const auto& x : l.moe->experts) EXPECT_EQ(x.gate.encoding(), nullptr);
}

}  // namespace
}  // namespace moe::test
