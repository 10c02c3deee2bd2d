// Merge pass on tiny synthetic layers: grouping with known answers, M-SMoE alignment recovers a
// permutation, Sub-MoE without truncation equals the weighted average, router refit beats the
// mean, determinism.
#include <gtest/gtest.h>

#include <Eigen/SVD>
#include <numeric>

#include "core/error.h"
#include "pass_test_util.h"
#include "passes/expert_merge.h"
#include "passes/experts.h"
#include "passes/merge.h"
#include "passes/router_merge.h"
#include "support/expect_error.h"

namespace moe::passes {
namespace {

using namespace testing;
using nlohmann::json;

std::unique_ptr<pipeline::Pass> merge(json opts) {
  opts["pass"] = "merge";
  return pipeline::make_pass(opts, "passes[0]");
}

runtime::MlpWeights f32_expert(const model::MoeBlock& b, int e) { return runtime::convert_mlp(b.experts[e]); }

double max_abs_diff(const MatrixRM& a, const MatrixRM& b) {
  EXPECT_EQ(a.rows(), b.rows());
  EXPECT_EQ(a.cols(), b.cols());
  return (a - b).cwiseAbs().maxCoeff();
}

// Expert e with gate/up rows and down columns reordered: new neuron i = old neuron perm[i].
runtime::MlpWeights permuted(const runtime::MlpWeights& w, const std::vector<int>& perm) {
  return permute_neurons(w, perm);
}

TEST(MergeGroups, MsmoeHandExample) {
  // Dominant: the two most used experts, 0 (10) and 2 (8). Expert 1 is closest to 2, expert 3 to 0.
  calib::MatrixF sim(4, 4);
  sim << 1.0f, 0.2f, 0.3f, 0.9f,  //
      0.2f, 1.0f, 0.8f, 0.1f,     //
      0.3f, 0.8f, 1.0f, 0.4f,     //
      0.9f, 0.1f, 0.4f, 1.0f;
  std::vector<int> dominant;
  const Groups g = msmoe_groups({10, 1, 8, 2}, sim, 2, dominant);
  EXPECT_EQ(g, (Groups{{0, 3}, {1, 2}}));
  EXPECT_EQ(dominant, (std::vector<int>{0, 2}));
  EXPECT_EQ(most_important(g, {10, 1, 8, 2}), dominant);
}

TEST(MergeAlign, RecoversAKnownPermutation) {
  std::mt19937_64 rng(11);
  const runtime::MlpWeights e0 = random_mlp(16, 12, rng);
  const std::vector<int> perm = {5, 2, 11, 0, 7, 9, 1, 3, 10, 4, 8, 6};
  const runtime::MlpWeights e1 = permuted(e0, perm);
  const std::vector<int> pi = align_neurons(e0, e1);
  const runtime::MlpWeights back = permute_neurons(e1, pi);
  EXPECT_EQ(back.gate, e0.gate);
  EXPECT_EQ(back.up, e0.up);
  EXPECT_EQ(back.down, e0.down);
}

TEST(MergeMsmoe, AlignedMergeOfAPermutedCopyIsTheOriginal) {
  Ctx c;
  c.layer = make_layer({.E = 3, .H = 16, .I = 12, .seed = 2});
  std::mt19937_64 rng(3);
  const runtime::MlpWeights e0 = f32_expert(*c.layer.moe, 0);
  const std::vector<int> perm = {5, 2, 11, 0, 7, 9, 1, 3, 10, 4, 8, 6};
  c.layer.moe->experts[1] = mlp_of(permuted(e0, perm));
  c.stats = make_stats(3, 16);
  c.stats.count = {30, 10, 25};
  c.stats.logit_sim << 1.0f, 0.9f, 0.1f, 0.9f, 1.0f, 0.2f, 0.1f, 0.2f, 1.0f;  // 1 joins 0
  const MatrixRM router0 = matrix_of(c.layer.moe->router);
  const runtime::MlpWeights e2 = f32_expert(*c.layer.moe, 2);

  auto p = merge({{"method", "msmoe"}, {"experts", 2}, {"router", "dominant"}});
  auto ctx = c.make(softmax_rule(3, 1));
  p->run_layer(ctx);

  EXPECT_EQ(c.report["groups"], json({{0, 1}, {2}}));
  EXPECT_EQ(c.report["dominant"], json({0, 2}));
  EXPECT_EQ(c.report["weights"], json({{0.75, 0.25}, {1.0}}));
  EXPECT_EQ(c.report["router"], "dominant");
  const model::MoeBlock& b = *c.layer.moe;
  ASSERT_EQ(b.num_experts(), 2);
  const runtime::MlpWeights m0 = f32_expert(b, 0);
  EXPECT_LE(max_abs_diff(m0.gate, e0.gate), 1e-6);
  EXPECT_LE(max_abs_diff(m0.up, e0.up), 1e-6);
  EXPECT_LE(max_abs_diff(m0.down, e0.down), 1e-6);
  EXPECT_EQ(f32_expert(b, 1).gate, e2.gate);  // a group of one is unchanged
  const MatrixRM router1 = matrix_of(b.router);
  EXPECT_EQ(router1.row(0), router0.row(0));
  EXPECT_EQ(router1.row(1), router0.row(2));

  // Without alignment (HC-SMoE averaging of the same group) the merge is not the original:
  // the test above really depends on the alignment.
  const runtime::MlpWeights e1 = permuted(e0, perm);
  const runtime::MlpWeights plain = weighted_average({&e0, &e1}, {0.75, 0.25});
  EXPECT_GT(max_abs_diff(plain.gate, e0.gate), 1e-2);
}

TEST(MergeHcsmoe, GroupsByMeanOutputAndAveragesByFrequency) {
  Ctx c;
  c.layer = make_layer({.E = 4, .H = 8, .I = 4, .seed = 5, .dtype = core::DType::BF16, .shared = true,
                        .shared_gate = true, .router_bias = true});
  const model::MoeBlock before = *c.layer.moe;
  c.stats = make_stats(4, 8);
  c.stats.count = {1, 3, 3, 1};
  // out_mean: 0 and 2 close, 1 and 3 close.
  c.stats.out_mean.row(0).setConstant(1.0f);
  c.stats.out_mean.row(2).setConstant(1.1f);
  c.stats.out_mean.row(1).setConstant(-2.0f);
  c.stats.out_mean.row(3).setConstant(-2.2f);
  for (const char* bias_mode : {"max", "mean"}) {
    c.layer.moe = before;
    auto p = merge({{"method", "hcsmoe"}, {"experts", 2}, {"router", "mean"}, {"router_bias", bias_mode}, {"align", false}});
    auto ctx = c.make(softmax_rule(4, 2));
    p->run_layer(ctx);
    EXPECT_EQ(c.report["groups"], json({{0, 2}, {1, 3}}));
    EXPECT_EQ(c.report["weights"], json({{0.25, 0.75}, {0.75, 0.25}}));
    EXPECT_EQ(c.report["dominant"], json({2, 1}));
    EXPECT_EQ(c.report["router_bias"], bias_mode);
    const model::MoeBlock& b = *c.layer.moe;
    ASSERT_EQ(b.num_experts(), 2);
    // Stored in the checkpoint's dtype; the shared expert untouched.
    EXPECT_EQ(b.experts[0].gate.dtype(), core::DType::BF16);
    EXPECT_EQ(b.router.dtype(), core::DType::BF16);
    EXPECT_EQ(b.shared->gate.data(), before.shared->gate.data());
    EXPECT_EQ(b.shared_gate->data(), before.shared_gate->data());
    // Merged expert 0 = 0.25 e0 + 0.75 e2 (to bf16 precision).
    const runtime::MlpWeights m0 = f32_expert(before, 0), m2 = f32_expert(before, 2);
    const runtime::MlpWeights want = weighted_average({&m0, &m2}, {0.25, 0.75});
    const runtime::MlpWeights got = f32_expert(b, 0);
    EXPECT_LE(max_abs_diff(got.gate, want.gate), 4e-3 * (1 + want.gate.cwiseAbs().maxCoeff()));
    EXPECT_LE(max_abs_diff(got.down, want.down), 4e-3 * (1 + want.down.cwiseAbs().maxCoeff()));
    // Router: frequency-weighted mean rows.
    const MatrixRM r0 = matrix_of(before.router), r1 = matrix_of(b.router);
    EXPECT_LE(max_abs_diff(r1.row(1), 0.75f * r0.row(1) + 0.25f * r0.row(3)), 2e-2);
    // Bias: max or weighted mean of the members.
    const auto b0 = before.router_bias->to_f32(), b1 = b.router_bias->to_f32();
    ASSERT_EQ(b1.size(), 2u);
    if (std::string(bias_mode) == "max") {
      EXPECT_FLOAT_EQ(b1[0], std::max(b0[0], b0[2]));
      EXPECT_FLOAT_EQ(b1[1], std::max(b0[1], b0[3]));
    } else {
      EXPECT_FLOAT_EQ(b1[0], 0.25f * b0[0] + 0.75f * b0[2]);
    }
  }
}

TEST(MergeHcsmoe, ZeroCountsUseEqualWeights) {
  EXPECT_EQ(importance_weights({0, 0, 0}, {0, 2}), (std::vector<double>{0.5, 0.5}));
  EXPECT_EQ(importance_weights({1, 0, 3}, {0, 2}), (std::vector<double>{0.25, 0.75}));
}

TEST(MergeImportance, SaliencyPicksDominantsAndWeights) {
  // count favours 0 and 2; reap makes 1 the most salient (count * reap = 30, 60, 25).
  Ctx c;
  c.layer = make_layer({.E = 3, .H = 8, .I = 4, .seed = 4});
  const model::MoeBlock before = *c.layer.moe;
  c.stats = make_stats(3, 8);
  c.stats.count = {30, 10, 25};
  c.stats.reap = {1, 6, 1};
  c.stats.logit_sim << 1.0f, 0.9f, 0.1f, 0.9f, 1.0f, 0.2f, 0.1f, 0.2f, 1.0f;
  struct Case {
    const char* importance;
    json groups, dominant, weights;
  };
  for (const Case& k : {Case{"frequency", {{0, 1}, {2}}, {0, 2}, {{0.75, 0.25}, {1.0}}},
                        Case{"saliency", {{0}, {1, 2}}, {0, 1}, {{1.0}, {60.0 / 85, 25.0 / 85}}}}) {
    SCOPED_TRACE(k.importance);
    c.layer.moe = before;
    auto p = merge({{"method", "msmoe"}, {"experts", 2}, {"importance", k.importance}});
    EXPECT_EQ(p->params()["importance"], k.importance);
    auto ctx = c.make(softmax_rule(3, 1));
    p->run_layer(ctx);
    EXPECT_EQ(c.report["groups"], k.groups);
    EXPECT_EQ(c.report["dominant"], k.dominant);
    ASSERT_EQ(c.report["weights"].size(), 2u);
    for (size_t g = 0; g < 2; ++g)
      for (size_t i = 0; i < k.weights[g].size(); ++i)
        EXPECT_NEAR(c.report["weights"][g][i].get<double>(), k.weights[g][i].get<double>(), 1e-12);
  }
  // The default is saliency, and it needs the reap statistic.
  auto p = merge({{"method", "msmoe"}, {"experts", 2}});
  EXPECT_EQ(p->params()["importance"], "saliency");
  const auto fields = p->requirements().stats_fields;
  EXPECT_NE(std::find(fields.begin(), fields.end(), "reap"), fields.end());
}

TEST(MergeImportance, HcsmoeWeightsByEachImportance) {
  Ctx c;
  c.layer = make_layer({.E = 4, .H = 8, .I = 4, .seed = 6});
  const model::MoeBlock before = *c.layer.moe;
  c.stats = make_stats(4, 8);
  c.stats.out_mean.row(0).setConstant(1.0f);  // groups {0, 2} and {1, 3}
  c.stats.out_mean.row(2).setConstant(1.1f);
  c.stats.out_mean.row(1).setConstant(-2.0f);
  c.stats.out_mean.row(3).setConstant(-2.2f);
  c.stats.count = {1, 3, 3, 1};
  c.stats.weight_sum = {2, 1, 1, 2};
  c.stats.reap = {9, 1, 1, 1};  // saliency 9, 3, 3, 1
  struct Case {
    const char* importance;
    std::vector<double> w0;  // weights of group {0, 2}
    json dominant;
  };
  for (const Case& k : {Case{"frequency", {0.25, 0.75}, {2, 1}}, Case{"soft", {2.0 / 3, 1.0 / 3}, {0, 3}},
                        Case{"saliency", {0.75, 0.25}, {0, 1}}}) {
    SCOPED_TRACE(k.importance);
    c.layer.moe = before;
    auto p = merge({{"method", "hcsmoe"}, {"experts", 2}, {"importance", k.importance}, {"align", false}});
    auto ctx = c.make(softmax_rule(4, 2));
    p->run_layer(ctx);
    EXPECT_EQ(c.report["groups"], json({{0, 2}, {1, 3}}));
    EXPECT_EQ(c.report["dominant"], k.dominant);
    EXPECT_NEAR(c.report["weights"][0][0].get<double>(), k.w0[0], 1e-12);
    EXPECT_NEAR(c.report["weights"][0][1].get<double>(), k.w0[1], 1e-12);
    const runtime::MlpWeights m0 = f32_expert(before, 0), m2 = f32_expert(before, 2);
    const runtime::MlpWeights want = weighted_average({&m0, &m2}, k.w0);
    EXPECT_LE(max_abs_diff(f32_expert(*c.layer.moe, 0).up, want.up), 1e-6);
  }
}

// out_cos with two clear clusters {0, 2, 4} and {1, 3, 5}.
calib::MatrixF clustered_cos(int E) {
  calib::MatrixF m(E, E);
  for (int i = 0; i < E; ++i)
    for (int j = 0; j < E; ++j) m(i, j) = i == j ? 1.0f : (i % 2 == j % 2 ? 0.8f : 0.05f);
  return m;
}

TEST(MergeSubmoe, WithoutTruncationEqualsWeightedAverage) {
  for (bool whiten : {false, true}) {
    SCOPED_TRACE(whiten ? "whitened" : "plain");
    Ctx c;
    c.layer = make_layer({.E = 6, .H = 12, .I = 8, .seed = 9});
    const model::MoeBlock before = *c.layer.moe;
    c.stats = make_stats(6, 12);
    c.stats.count = {4, 1, 2, 3, 2, 0};
    c.stats.out_cos = clustered_cos(6);
    std::mt19937_64 rng(4);
    for (int e = 0; e < 6; ++e) {  // anisotropic Gram matrices
      const MatrixRM xin = random_matrix(40, 12, rng) * random_matrix(12, 12, rng);
      const MatrixRM xmid = random_matrix(40, 8, rng);
      c.stats.gram_in.push_back(xin.cast<double>().transpose() * xin.cast<double>());
      c.stats.gram_mid.push_back(xmid.cast<double>().transpose() * xmid.cast<double>());
    }
    auto p = merge({{"method", "submoe"}, {"experts", 2}, {"router", "mean"}, {"whiten", whiten}, {"align", false}});
    auto ctx = c.make(softmax_rule(6, 2));
    p->run_layer(ctx);
    EXPECT_EQ(c.report["groups"], json({{0, 2, 4}, {1, 3, 5}}));
    EXPECT_EQ(c.report["dominant"], json({0, 3}));
    const model::MoeBlock& b = *c.layer.moe;
    const std::vector<std::vector<int>> groups = {{0, 2, 4}, {1, 3, 5}};
    for (int g = 0; g < 2; ++g) {
      std::vector<runtime::MlpWeights> ms;
      for (int e : groups[g]) ms.push_back(f32_expert(before, e));
      const std::vector<double> w = importance_weights(c.stats.count, groups[g]);
      const runtime::MlpWeights want = weighted_average({&ms[0], &ms[1], &ms[2]}, w);
      const runtime::MlpWeights got = f32_expert(b, g);
      EXPECT_LE(max_abs_diff(got.gate, want.gate), 1e-4);
      EXPECT_LE(max_abs_diff(got.up, want.up), 1e-4);
      EXPECT_LE(max_abs_diff(got.down, want.down), 1e-4);
    }
  }
}

// The default for hcsmoe and submoe aligns members to the dominant (most used) member first: a
// neuron-permuted copy merges back into the original exactly, and "align": false averages the
// permuted rows as they are (the papers' rule).
TEST(MergeAlign, HcsmoeAndSubmoeAlignByDefault) {
  for (const char* method : {"hcsmoe", "submoe"}) {
    for (bool align : {true, false}) {
      SCOPED_TRACE(std::string(method) + (align ? " aligned" : " plain"));
      Ctx c;
      c.layer = make_layer({.E = 3, .H = 16, .I = 12, .seed = 2});
      const runtime::MlpWeights e0 = f32_expert(*c.layer.moe, 0);
      const std::vector<int> perm = {5, 2, 11, 0, 7, 9, 1, 3, 10, 4, 8, 6};
      c.layer.moe->experts[1] = mlp_of(permuted(e0, perm));
      c.stats = make_stats(3, 16);
      c.stats.count = {30, 10, 25};
      // out_mean / out_cos put 0 and 1 together.
      c.stats.out_mean.row(0).setConstant(1.0f);
      c.stats.out_mean.row(1).setConstant(1.05f);
      c.stats.out_mean.row(2).setConstant(-3.0f);
      c.stats.out_cos << 1.0f, 0.9f, 0.0f, 0.9f, 1.0f, 0.0f, 0.0f, 0.0f, 1.0f;
      json opts = {{"method", method}, {"experts", 2}, {"router", "mean"}};
      if (!align) opts["align"] = false;
      auto p = merge(opts);
      EXPECT_EQ(p->params()["align"], align);
      auto ctx = c.make(softmax_rule(3, 1));
      p->run_layer(ctx);
      ASSERT_EQ(c.report["groups"], json({{0, 1}, {2}}));
      EXPECT_EQ(c.report["dominant"], json({0, 2}));
      const runtime::MlpWeights m0 = f32_expert(*c.layer.moe, 0);
      if (align) {
        EXPECT_LE(max_abs_diff(m0.gate, e0.gate), 1e-5);
        EXPECT_LE(max_abs_diff(m0.up, e0.up), 1e-5);
        EXPECT_LE(max_abs_diff(m0.down, e0.down), 1e-5);
      } else {
        const runtime::MlpWeights e1 = permuted(e0, perm);
        const runtime::MlpWeights want = weighted_average({&e0, &e1}, {0.75, 0.25});
        EXPECT_LE(max_abs_diff(m0.gate, want.gate), 1e-5);
        EXPECT_GT(max_abs_diff(m0.gate, e0.gate), 1e-2);
      }
    }
  }
  // M-SMoE always aligns: the option is not one of its keys.
  EXPECT_THROW(merge({{"method", "msmoe"}, {"experts", 2}, {"align", false}}), core::Error);
}

// protect_super_experts: a super expert stays a group of its own (its weights and router row
// unchanged); the method groups the others into the remaining groups; too many supers → error.
TEST(MergeProtect, SuperExpertsStayAlone) {
  for (const char* method : {"msmoe", "hcsmoe", "submoe"}) {
    SCOPED_TRACE(method);
    Ctx c;
    c.layer = make_layer({.E = 4, .H = 8, .I = 4, .seed = 11});
    const model::MoeBlock before = *c.layer.moe;
    c.stats = make_stats(4, 8);
    c.stats.count = {40, 10, 30, 20};
    c.stats.super_expert = {false, true, false, false};
    // Unprotected, M-SMoE and HC-SMoE put 1 with 0 (most similar); Sub-MoE's k-means (k = 3 on
    // out_cos rows) pairs 2 with 3 instead.
    c.stats.logit_sim << 1.0f, 0.9f, 0.1f, 0.2f, 0.9f, 1.0f, 0.1f, 0.2f, 0.1f, 0.1f, 1.0f, 0.8f, 0.2f, 0.2f, 0.8f, 1.0f;
    c.stats.out_cos = c.stats.logit_sim;
    c.stats.out_mean.row(0).setConstant(1.0f);
    c.stats.out_mean.row(1).setConstant(1.02f);
    c.stats.out_mean.row(2).setConstant(-2.0f);
    c.stats.out_mean.row(3).setConstant(-2.1f);
    for (bool protect : {false, true}) {
      c.layer.moe = before;
      auto p = merge({{"method", method}, {"experts", 3}, {"protect_super_experts", protect}});
      EXPECT_EQ(p->params()["protect_super_experts"], protect);
      auto ctx = c.make(softmax_rule(4, 2));
      p->run_layer(ctx);
      if (!protect) {
        EXPECT_EQ(c.report["groups"], std::string(method) == "submoe" ? json({{0}, {1}, {2, 3}})
                                                                       : json({{0, 1}, {2}, {3}}));
        continue;
      }
      EXPECT_EQ(c.report["groups"], json({{0}, {1}, {2, 3}}));
      const model::MoeBlock& b = *c.layer.moe;
      ASSERT_EQ(b.num_experts(), 3);
      EXPECT_EQ(f32_expert(b, 1).gate, f32_expert(before, 1).gate);
      EXPECT_EQ(f32_expert(b, 1).down, f32_expert(before, 1).down);
      EXPECT_EQ(matrix_of(b.router).row(1), matrix_of(before.router).row(1));
    }
    // Three supers and two groups: impossible, said with the layer and the way out.
    c.layer.moe = before;
    c.stats.super_expert = {true, true, true, false};
    auto q = merge({{"method", method}, {"experts", 2}, {"protect_super_experts", true}});
    auto ctx = c.make(softmax_rule(4, 2));
    moe::test::expect_error([&] { q->run_layer(ctx); }, core::ErrorKind::InvalidArgument,
                            {"3 super experts are protected but only 2", "protect_super_experts to false"});
  }
}

TEST(MergeSubmoe, TruncationLowersRank) {
  std::mt19937_64 rng(21);
  const MatrixRM a = random_matrix(10, 6, rng), b = random_matrix(10, 6, rng);
  const MatrixRM avg = weighted_sum({&a, &b}, {0.5, 0.5});
  const MatrixRM m = joint_svd_merge({&a, &b}, {0.5, 0.5}, 0.3);  // r = round(0.3 * 10) = 3
  Eigen::JacobiSVD<MatrixRM> svd(m);
  const auto s = svd.singularValues();
  EXPECT_GT(s(2), 1e-3);
  EXPECT_LT(s(3), 1e-4 * s(0));
  EXPECT_GT(max_abs_diff(m, avg), 1e-3);
}

TEST(MergeSubmoe, WhiteningMinimisesActivationWeightedError) {
  // One member: W' = U_r U_rᵀ W with U from SVD(W S) is the best rank-r approximation in the
  // ‖(W − W') X‖ metric (G = XᵀX = S Sᵀ), so it beats the plain SVD there.
  std::mt19937_64 rng(8);
  const MatrixRM W = random_matrix(8, 10, rng);
  MatrixRM X = random_matrix(200, 10, rng);
  for (int j = 0; j < 10; ++j) X.col(j) *= static_cast<float>(std::pow(3.0, j % 4));  // anisotropic inputs
  const calib::MatrixD G = X.cast<double>().transpose() * X.cast<double>();
  const MatrixRM plain = joint_svd_merge({&W}, {1.0}, 0.5);
  std::vector<const calib::MatrixD*> grams = {&G};
  const MatrixRM white = joint_svd_merge({&W}, {1.0}, 0.5, &grams, 1e-9);
  const double err_plain = ((W - plain) * X.transpose()).cast<double>().norm();
  const double err_white = ((W - white) * X.transpose()).cast<double>().norm();
  EXPECT_LT(err_white, 0.9 * err_plain);
}

TEST(MergeSubmoe, SameSeedSameTensors) {
  auto run = [](uint64_t seed) {
    Ctx c;
    c.layer = make_layer({.E = 8, .H = 8, .I = 4, .seed = 12, .dtype = core::DType::BF16});
    c.stats = make_stats(8, 8);
    std::mt19937_64 rng(1);
    c.stats.out_cos = random_matrix(8, 8, rng);  // no clear clusters: the seed matters
    for (int e = 0; e < 8; ++e) c.stats.count[e] = e + 1;
    auto p = merge({{"method", "submoe"}, {"experts", 3}, {"router", "mean"}, {"rank_ratio", 0.5}});
    auto ctx = c.make(softmax_rule(8, 2), seed);
    p->run_layer(ctx);
    return std::make_pair(c.layer, c.report);
  };
  const auto [a, ra] = run(5);
  const auto [b, rb] = run(5);
  EXPECT_EQ(ra, rb);
  ASSERT_EQ(a.moe->num_experts(), 3);
  for (int e = 0; e < 3; ++e) {
    EXPECT_TRUE(same_bytes(a.moe->experts[e].gate, b.moe->experts[e].gate));
    EXPECT_TRUE(same_bytes(a.moe->experts[e].up, b.moe->experts[e].up));
    EXPECT_TRUE(same_bytes(a.moe->experts[e].down, b.moe->experts[e].down));
  }
  EXPECT_TRUE(same_bytes(a.moe->router, b.moe->router));
}

// Σ over tokens and groups of (new logit − log Σ exp member logits)².
double refit_residual(const MatrixRM& new_router, const MatrixRM& router, const MatrixRM& x, const Groups& groups) {
  const MatrixXdRM target = group_logsumexp(router, x, groups);
  const MatrixXdRM got = x.cast<double>() * new_router.cast<double>().transpose();
  return (got - target).squaredNorm();
}

TEST(MergeRouter, RefitBeatsMeanOnTheCalibrationInputs) {
  std::mt19937_64 rng(13);
  const MatrixRM router = random_matrix(6, 10, rng);
  const MatrixRM x = random_matrix(300, 10, rng);
  const Groups groups = {{0, 1, 4}, {2}, {3, 5}};
  const std::vector<std::vector<double>> w = {{0.2, 0.5, 0.3}, {1.0}, {0.5, 0.5}};
  const MatrixRM mean = router_mean(router, groups, w);
  const MatrixRM refit = router_refit(router, x, groups);
  ASSERT_EQ(refit.rows(), 3);
  const double r_mean = refit_residual(mean, router, x, groups), r_refit = refit_residual(refit, router, x, groups);
  // logsumexp is not linear in x and there is no intercept, so even the best fit leaves a residual;
  // the refit must still clearly beat the mean rows.
  EXPECT_LT(r_refit, 0.95 * r_mean) << "refit " << r_refit << " mean " << r_mean;
  EXPECT_EQ(refit.row(1), router.row(2));  // a group of one keeps its row
  // Normal equations of the ridge problem hold for the fitted groups.
  const MatrixXdRM X = x.cast<double>(), Y = group_logsumexp(router, x, groups);
  MatrixXdRM A = X.transpose() * X;
  const double lambda = 1e-2 * A.trace() / 10.0;
  A.diagonal().array() += lambda;
  for (int g : {0, 2}) {
    const Eigen::VectorXd lhs = A * refit.row(g).transpose().cast<double>();
    const Eigen::VectorXd rhs = X.transpose() * Y.col(g);
    EXPECT_LE((lhs - rhs).norm(), 1e-4 * rhs.norm()) << "group " << g;
  }
  // Dominant picks the given member's row.
  EXPECT_EQ(router_dominant(router, groups, {1, 2, 5}).row(2), router.row(5));
  EXPECT_THROW(router_refit(router, MatrixRM(0, 10), groups), core::Error);
}

TEST(MergeRouter, RefitThroughThePass) {
  Ctx c;
  c.layer = make_layer({.E = 6, .H = 10, .I = 4, .seed = 17});
  const MatrixRM router0 = matrix_of(c.layer.moe->router);
  c.stats = make_stats(6, 10);
  c.stats.count = {5, 4, 3, 2, 1, 6};
  c.stats.out_mean.row(0).setConstant(1.0f);
  c.stats.out_mean.row(1).setConstant(1.05f);
  c.stats.out_mean.row(2).setConstant(-1.0f);
  c.stats.out_mean.row(3).setConstant(-1.1f);
  c.stats.out_mean.row(4).setConstant(5.0f);
  c.stats.out_mean.row(5).setConstant(5.05f);
  std::mt19937_64 rng(2);
  c.x = random_matrix(200, 10, rng);
  auto p = merge({{"method", "hcsmoe"}, {"experts", 3}, {"router", "refit"}});
  EXPECT_TRUE(p->requirements().block_inputs);
  auto no_x = c.make(softmax_rule(6, 2));
  EXPECT_THROW(p->run_layer(no_x), core::Error);  // the runner must provide block inputs
  auto ctx = c.make(softmax_rule(6, 2), 7, true, true);
  p->run_layer(ctx);
  const Groups groups = {{0, 1}, {2, 3}, {4, 5}};
  EXPECT_EQ(c.report["groups"], json(groups));
  EXPECT_EQ(c.report["router"], "refit");
  const MatrixRM got = matrix_of(c.layer.moe->router);
  const MatrixRM mean = router_mean(router0, groups, {{5. / 9, 4. / 9}, {0.6, 0.4}, {1. / 7, 6. / 7}});
  EXPECT_LT(refit_residual(got, router0, c.x, groups), refit_residual(mean, router0, c.x, groups));
}

TEST(MergePass, RejectsImpossibleTargets) {
  Ctx c;
  c.layer = make_layer({.E = 4});
  c.stats = make_stats(4);
  auto ctx = c.make(softmax_rule(4, 2));
  EXPECT_THROW(merge({{"method", "hcsmoe"}, {"experts", 5}, {"router", "mean"}})->run_layer(ctx), core::Error);
  EXPECT_THROW(merge({{"method", "hcsmoe"}, {"experts", 1}, {"router", "mean"}})->run_layer(ctx), core::Error);
  auto no_stats = c.make(softmax_rule(4, 2), 7, false);
  EXPECT_THROW(merge({{"method", "msmoe"}, {"experts", 2}, {"router", "mean"}})->run_layer(no_stats), core::Error);
  // Whitening without Gram matrices: a user error naming the field.
  try {
    merge({{"method", "submoe"}, {"experts", 2}, {"router", "mean"}, {"whiten", true}})->run_layer(ctx);
    FAIL() << "no error";
  } catch (const core::Error& e) {
    EXPECT_NE(e.message().find("gram_in"), std::string::npos) << e.message();
  }
  EXPECT_EQ(c.layer.moe->num_experts(), 4);
}

TEST(MergeDern, SegmentsAverageIntoTheMostSimilarNeuron) {
  // One retained expert, one dropped: the dropped expert is the retained one with neuron 4's gate
  // row doubled (cosine of [gate | up] still high) and its other neurons equal. Weights 3 : 1.
  std::mt19937_64 rng(21);
  const runtime::MlpWeights e0 = random_mlp(8, 6, rng);
  runtime::MlpWeights e1 = e0;
  e1.gate.row(4) *= 2.0f;
  const DernResult r = dern_recombine({e0, e1}, {0}, {1}, {3.0, 1.0}, 0.4);
  ASSERT_EQ(r.experts.size(), 1u);
  ASSERT_EQ(r.target.size(), 1u);
  EXPECT_EQ(r.target[0], std::vector<int>(6, 0));
  EXPECT_EQ(r.neurons_merged, std::vector<int>{6});
  const runtime::MlpWeights& m = r.experts[0];
  EXPECT_EQ(m.width(), 6);
  // Neuron 4: (3 g + 2 g) / 4; up and down unchanged; every other neuron unchanged.
  EXPECT_LE((m.gate.row(4) - 1.25f * e0.gate.row(4)).cwiseAbs().maxCoeff(), 1e-5);
  EXPECT_LE((m.up - e0.up).cwiseAbs().maxCoeff(), 1e-5);
  EXPECT_LE((m.down - e0.down).cwiseAbs().maxCoeff(), 1e-5);
  for (int i : {0, 1, 2, 3, 5}) EXPECT_LE((m.gate.row(i) - e0.gate.row(i)).cwiseAbs().maxCoeff(), 1e-5);
  // Above the threshold nothing merges: the expert is unchanged.
  const DernResult none = dern_recombine({e0, e1}, {0}, {1}, {3.0, 1.0}, 1.0 + 1e-6);
  EXPECT_EQ(none.target[0], std::vector<int>(6, -1));
  EXPECT_EQ(none.experts[0].gate, e0.gate);
  EXPECT_EQ(none.neurons_merged, std::vector<int>{0});
}

TEST(MergeDern, ADroppedDuplicateGoesToItsTwinAndLeavesItUnchanged) {
  // Expert 3 is a permuted copy of expert 1. Kept by saliency (count x reap): 0 and 1. Every
  // segment of 3 finds its own neuron in 1 (cosine 1) and averages into an equal neuron; expert 2's
  // random segments stay below the threshold 0.99 and are discarded.
  Ctx c;
  c.layer = make_layer({.E = 4, .H = 16, .I = 12, .seed = 9, .router_bias = true});
  const runtime::MlpWeights e0 = f32_expert(*c.layer.moe, 0), e1 = f32_expert(*c.layer.moe, 1);
  const std::vector<int> perm = {5, 2, 11, 0, 7, 9, 1, 3, 10, 4, 8, 6};
  c.layer.moe->experts[3] = mlp_of(permuted(e1, perm));
  c.stats = make_stats(4, 16);
  c.stats.count = {10, 8, 1, 2};
  const MatrixRM router0 = matrix_of(c.layer.moe->router);
  const runtime::MoeWeights before = runtime::convert_moe(*c.layer.moe);

  auto p = merge({{"method", "dern"}, {"experts", 2}, {"threshold", 0.99}});
  EXPECT_EQ(p->params()["threshold"], 0.99);
  auto ctx = c.make(softmax_rule(4, 2));
  p->run_layer(ctx);

  EXPECT_EQ(c.report["kept"], json({0, 1}));
  EXPECT_EQ(c.report["dropped"], json({2, 3}));
  EXPECT_EQ(c.report["segments"][0], json({{"expert", 2}, {"to", json::object()}, {"discarded", 12}}));
  EXPECT_EQ(c.report["segments"][1], json({{"expert", 3}, {"to", {{"1", 12}}}, {"discarded", 0}}));
  EXPECT_EQ(c.report["neurons_merged"], json({0, 12}));
  const model::MoeBlock& b = *c.layer.moe;
  ASSERT_EQ(b.num_experts(), 2);
  for (int k = 0; k < 2; ++k) EXPECT_EQ(f32_expert(b, k).width(), 12);  // uniform width
  const runtime::MlpWeights m0 = f32_expert(b, 0), m1 = f32_expert(b, 1);
  EXPECT_EQ(m0.gate, e0.gate);
  EXPECT_LE(max_abs_diff(m1.gate, e1.gate), 1e-6);
  EXPECT_LE(max_abs_diff(m1.up, e1.up), 1e-6);
  EXPECT_LE(max_abs_diff(m1.down, e1.down), 1e-6);
  // Retained experts keep their own router rows and biases.
  const MatrixRM router1 = matrix_of(b.router);
  EXPECT_EQ(router1.row(0), router0.row(0));
  EXPECT_EQ(router1.row(1), router0.row(1));
  const runtime::MoeWeights after = runtime::convert_moe(b);
  ASSERT_TRUE(after.router_bias && before.router_bias);
  EXPECT_EQ((*after.router_bias)(0), (*before.router_bias)(0));
  EXPECT_EQ((*after.router_bias)(1), (*before.router_bias)(1));
}

TEST(MergeDern, EveryDroppedSegmentLandsOrIsCountedAndWidthStaysUniform) {
  Ctx c;
  c.layer = make_layer({.E = 8, .H = 16, .I = 10, .seed = 4});
  c.stats = make_stats(8, 16);
  c.stats.count = {5, 1, 7, 2, 9, 3, 4, 6};
  auto p = merge({{"method", "dern"}, {"experts", 4}, {"threshold", 0.0}});
  auto ctx = c.make(softmax_rule(8, 2));
  p->run_layer(ctx);
  EXPECT_EQ(c.report["kept"], json({0, 2, 4, 7}));
  EXPECT_EQ(c.report["dropped"], json({1, 3, 5, 6}));
  ASSERT_EQ(c.layer.moe->num_experts(), 4);
  for (int k = 0; k < 4; ++k) EXPECT_EQ(f32_expert(*c.layer.moe, k).width(), 10);
  int total = 0;
  for (const auto& s : c.report["segments"]) {
    int n = s["discarded"].get<int>();
    for (const auto& [id, cnt] : s["to"].items()) n += cnt.get<int>();
    EXPECT_EQ(n, 10);
    total += s["discarded"].get<int>();
  }
  EXPECT_EQ(c.report["segments_discarded"], total);
}

}  // namespace
}  // namespace moe::passes
