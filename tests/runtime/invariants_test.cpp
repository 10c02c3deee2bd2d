// Invariants of the forward pieces: routing rules per family, the MoE block (identical experts
// reduce to the dense MLP), observers (traces consistent, none built when unwanted), windows
// independent of their batch, unsupported families and settings.
#include <gtest/gtest.h>

#include <random>

#include "core/error.h"
#include "runtime/forward.h"
#include "runtime/moe_block.h"
#include "runtime/routing.h"
#include "runtime_test_util.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using runtime::MatrixRM;
using runtime::MlpWeights;
using runtime::MoeWeights;
using runtime::RoutingRule;

MlpWeights random_mlp(int64_t H, int64_t I, std::mt19937& g) {
  return {random_matrix(I, H, g), random_matrix(I, H, g), random_matrix(H, I, g)};
}

RoutingRule softmax_rule(int E, int k, bool renorm) {
  RoutingRule r;
  r.family = "test";
  r.kind = model::Routing::SoftmaxTopK;
  r.num_experts = E;
  r.top_k = k;
  r.renormalize = renorm;
  return r;
}

TEST(Routing, SoftmaxTopKRenormalisesOnlyWhenAsked) {
  MatrixRM logits(1, 4);
  logits << 1.0f, 3.0f, 2.0f, 0.0f;
  const auto plain = runtime::route(softmax_rule(4, 2, false), logits);
  const auto renorm = runtime::route(softmax_rule(4, 2, true), logits);
  EXPECT_EQ(plain.ids(0, 0), 1);
  EXPECT_EQ(plain.ids(0, 1), 2);
  const double z = std::exp(1.0) + std::exp(3.0) + std::exp(2.0) + 1.0;
  EXPECT_NEAR(plain.weights(0, 0), std::exp(3.0) / z, 1e-6);
  EXPECT_NEAR(plain.weights(0, 1), std::exp(2.0) / z, 1e-6);
  EXPECT_NEAR(renorm.weights(0, 0) + renorm.weights(0, 1), 1.0, 1e-6);
  EXPECT_NEAR(renorm.weights(0, 0), std::exp(3.0) / (std::exp(3.0) + std::exp(2.0)), 1e-6);
  ASSERT_EQ(plain.probs.cols(), 4);
  EXPECT_NEAR(plain.probs.sum(), 1.0, 1e-6);
}

TEST(Routing, TiesPickTheLowerExpertFirst) {
  MatrixRM logits(1, 5);
  logits << 0.5f, 2.0f, 0.5f, 2.0f, 2.0f;
  const auto r = runtime::route(softmax_rule(5, 3, true), logits);
  EXPECT_EQ(r.ids(0, 0), 1);
  EXPECT_EQ(r.ids(0, 1), 3);
  EXPECT_EQ(r.ids(0, 2), 4);
}

TEST(Routing, InactiveExpertsAreNeverChosen) {
  MatrixRM logits(1, 4);
  logits << 1.0f, 3.0f, 2.0f, 0.0f;
  std::vector<bool> active{true, false, true, true};
  const auto r = runtime::route(softmax_rule(4, 2, false), logits, nullptr, &active);
  EXPECT_EQ(r.ids(0, 0), 2);
  EXPECT_EQ(r.ids(0, 1), 0);
  EXPECT_EQ(r.probs(0, 1), 0.0f);
  const double z = std::exp(1.0) + std::exp(2.0) + 1.0;  // softmax over the active experts
  EXPECT_NEAR(r.weights(0, 0), std::exp(2.0) / z, 1e-6);
}

TEST(Routing, FamilyRulesFromConfig) {
  auto mix = make_synth("mixtral");
  mix.config["norm_topk_prob"] = false;  // mixtral renormalises regardless
  model::Config c(mix.config, "config.json");
  auto r = RoutingRule::from_config(model::family_for(c), c);
  EXPECT_TRUE(r.renormalize);
  EXPECT_EQ(r.top_k, 2);
  for (const char* fam : {"qwen2_moe", "qwen3_moe", "olmoe"}) {
    auto s = make_synth(fam);
    s.config.erase("norm_topk_prob");  // default false
    model::Config cc(s.config, "config.json");
    EXPECT_FALSE(RoutingRule::from_config(model::family_for(cc), cc).renormalize) << fam;
    s.config["norm_topk_prob"] = true;
    model::Config cc2(s.config, "config.json");
    EXPECT_TRUE(RoutingRule::from_config(model::family_for(cc2), cc2).renormalize) << fam;
  }
}

TEST(Routing, DeepSeekV3GroupLimitedSigmoid) {
  RoutingRule r;
  r.family = "deepseek_v3";
  r.kind = model::Routing::DeepSeekV3;
  r.num_experts = 8;
  r.top_k = 2;
  r.n_group = 4;
  r.topk_group = 1;
  r.renormalize = true;
  r.routed_scaling_factor = 2.5;
  r.group_limited = true;
  MatrixRM logits(1, 8);
  // Best single expert (5) is in group 2 but group 0's top-2 sum is larger.
  logits << 2.0f, 1.9f, -3.0f, -3.0f, -3.0f, 2.2f, -3.0f, -3.0f;
  const auto res = runtime::route(r, logits);
  EXPECT_EQ(res.ids(0, 0), 0);
  EXPECT_EQ(res.ids(0, 1), 1);
  EXPECT_NEAR(res.weights(0, 0) + res.weights(0, 1), 2.5, 1e-5);
  EXPECT_EQ(res.probs.size(), 0);
}

TEST(Routing, GraniteTopKThenSoftmax) {
  RoutingRule r;
  r.family = "granitemoe";
  r.kind = model::Routing::TopKSoftmax;
  r.num_experts = 4;
  r.top_k = 2;
  MatrixRM logits(1, 4);
  logits << 0.0f, 1.0f, 3.0f, 2.0f;
  const auto res = runtime::route(r, logits);
  EXPECT_EQ(res.ids(0, 0), 2);
  EXPECT_EQ(res.ids(0, 1), 3);
  EXPECT_NEAR(res.weights(0, 0), 1.0 / (1.0 + std::exp(-1.0)), 1e-6);
}

// phimoe's sparsemixer (modeling_phimoe.py, inference): the argmax, weighted by the softmax over the
// logits within 2 * jitter (relative to max(|s|, max)) of it; then the argmax of the rest, weighted
// the same way against the second maximum (the masks taken on the unmasked logits); no
// renormalisation. Hand-computed values, negative logits included, and with an expert masked.
TEST(Routing, SparseMixerMasksRelativeToTheMaximum) {
  RoutingRule r;
  r.family = "phimoe";
  r.kind = model::Routing::SparseMixer;
  r.num_experts = 4;
  r.top_k = 2;
  r.jitter_eps = 0.1;
  MatrixRM logits(1, 4);
  // 1.9 is within 0.2 * 2 of 2 (kept), -3 and 1 are not; then 1.9 alone.
  logits << 2.0f, 1.9f, -3.0f, 1.0f;
  auto res = runtime::route(r, logits);
  EXPECT_EQ(res.ids(0, 0), 0);
  EXPECT_EQ(res.ids(0, 1), 1);
  EXPECT_NEAR(res.weights(0, 0), 1.0 / (1.0 + std::exp(-0.1)), 1e-6);
  EXPECT_NEAR(res.weights(0, 1), 1.0, 1e-6);
  // All negative: the factor is |s|; -1.05 kept against -1 (0.05 / 1.05 < 0.1), -1.2 masked
  // against -1.05 (0.15 / 1.2 > 0.1).
  r.jitter_eps = 0.05;
  logits << -1.0f, -1.05f, -4.0f, -1.2f;
  res = runtime::route(r, logits);
  EXPECT_EQ(res.ids(0, 0), 0);
  EXPECT_EQ(res.ids(0, 1), 1);
  EXPECT_NEAR(res.weights(0, 0), 1.0 / (1.0 + std::exp(-0.05)), 1e-6);
  EXPECT_NEAR(res.weights(0, 1), 1.0, 1e-6);
  // Expert 1 inactive: 0 then 3, each alone in its softmax.
  r.jitter_eps = 0.1;
  logits << 2.0f, 1.9f, -3.0f, 1.0f;
  const std::vector<bool> active = {true, false, true, true};
  res = runtime::route(r, logits, nullptr, &active);
  EXPECT_EQ(res.ids(0, 0), 0);
  EXPECT_EQ(res.ids(0, 1), 3);
  EXPECT_NEAR(res.weights(0, 0), 1.0, 1e-6);
  EXPECT_NEAR(res.weights(0, 1), 1.0, 1e-6);
  EXPECT_EQ(res.probs.size(), 0);
}

// A qwen2_moe block whose experts are all the same MLP, with renormalised top-k weights, equals
// that dense MLP; with the shared expert it adds sigmoid(gate x) * shared(x).
TEST(MoeBlock, IdenticalExpertsEqualTheDenseMlp) {
  std::mt19937 g(7);
  const int64_t H = 24, I = 16, E = 6, N = 40;
  MoeWeights w;
  w.router = random_matrix(E, H, g, 1.0f);
  const MlpWeights dense = random_mlp(H, I, g);
  w.experts.assign(E, dense);
  const MatrixRM x = random_matrix(N, H, g, 1.0f);
  const MatrixRM ref = runtime::mlp_forward(dense, x);
  const MatrixRM out = runtime::moe_forward(w, softmax_rule(E, 2, true), x);
  EXPECT_LE((out - ref).cwiseAbs().maxCoeff(), 1e-5 * (1 + ref.cwiseAbs().maxCoeff()));

  w.shared = random_mlp(H, 32, g);
  w.shared_gate = random_matrix(1, H, g, 1.0f);
  const MatrixRM out2 = runtime::moe_forward(w, softmax_rule(E, 2, true), x);
  const MatrixRM so = runtime::mlp_forward(*w.shared, x);
  MatrixRM expect = ref;
  for (int64_t n = 0; n < N; ++n) {
    const float s = 1.0f / (1.0f + std::exp(-x.row(n).dot(*w.shared_gate)));
    expect.row(n) += s * so.row(n);
  }
  EXPECT_LE((out2 - expect).cwiseAbs().maxCoeff(), 1e-5 * (1 + expect.cwiseAbs().maxCoeff()));
}

// The trace's per-expert outputs, weights and shared part rebuild the block output.
TEST(MoeBlock, TraceIsConsistentWithTheOutput) {
  std::mt19937 g(11);
  const int64_t H = 16, I = 8, E = 4, N = 30;
  MoeWeights w;
  w.router = random_matrix(E, H, g, 1.0f);
  for (int e = 0; e < E; ++e) w.experts.push_back(random_mlp(H, I, g));
  w.shared = random_mlp(H, 12, g);
  w.shared_gate = random_matrix(1, H, g, 1.0f);
  const MatrixRM x = random_matrix(N, H, g, 1.0f);
  runtime::MoeDetail d;
  const MatrixRM out = runtime::moe_forward(w, softmax_rule(E, 2, false), x, &d, true);
  MatrixRM rebuilt = MatrixRM::Zero(N, H);
  size_t assignments = 0;
  for (int e = 0; e < E; ++e) {
    ASSERT_EQ(d.h[e].rows(), static_cast<int64_t>(d.tokens[e].size()));
    ASSERT_EQ(d.y[e].rows(), static_cast<int64_t>(d.tokens[e].size()));
    assignments += d.tokens[e].size();
    for (size_t j = 0; j < d.tokens[e].size(); ++j) {
      const int n = d.tokens[e][j];
      float wt = 0;
      for (int s = 0; s < 2; ++s)
        if (d.routing.ids(n, s) == e) wt = d.routing.weights(n, s);
      rebuilt.row(n) += wt * d.y[e].row(j);
      // y = down h
      MatrixRM yj = d.h[e].row(j) * w.experts[e].down.transpose();
      EXPECT_LE((yj - d.y[e].row(j)).cwiseAbs().maxCoeff(), 1e-5);
    }
  }
  EXPECT_EQ(assignments, size_t(N * 2));
  ASSERT_EQ(d.shared_out.rows(), N);
  for (int64_t n = 0; n < N; ++n) rebuilt.row(n) += d.shared_gate(n, 0) * d.shared_out.row(n);
  EXPECT_LE((rebuilt - out).cwiseAbs().maxCoeff(), 1e-5);
}

struct Counter : runtime::Observer {
  bool moe = false;
  int inputs = 0, outputs = 0, moes = 0, attns = 0, mlps = 0;
  int64_t rows = 0;
  bool wants_moe_trace() const override { return moe; }
  void on_layer_input(int, const MatrixRM& X) override {
    ++inputs;
    rows = X.rows();
  }
  void on_layer_output(int, const MatrixRM&) override { ++outputs; }
  void on_moe(int, const runtime::MoeTrace&) override { ++moes; }
  void on_attention(int, const runtime::AttnTrace&) override { ++attns; }
  void on_dense_mlp(int, const runtime::DenseMlpTrace&) override { ++mlps; }
};

std::vector<int32_t> some_tokens(int64_t n, int64_t V, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(g() % V);
  return t;
}

TEST(Forward, ObserversGetOnlyWhatTheyAskFor) {
  TempDir dir;
  synth_to(dir.path(), "qwen2_moe", {.config_patch = {{"decoder_sparse_step", 2}}});
  auto lm = load_model(dir.path());
  runtime::Forward fwd(lm->model);
  const int L = static_cast<int>(lm->model.layers().size());
  int moe_layers = 0;
  for (const auto& l : lm->model.layers()) moe_layers += l.moe.has_value();
  ASSERT_GT(moe_layers, 0);
  ASSERT_LT(moe_layers, L);
  Counter quiet, moe;
  moe.moe = true;
  runtime::Observer* obs[] = {&quiet, &moe};
  const auto toks = some_tokens(2 * 8, fwd.spec().vocab, 3);
  fwd.run(toks, 8, obs);
  EXPECT_EQ(quiet.inputs, L);
  EXPECT_EQ(quiet.outputs, L);
  EXPECT_EQ(quiet.rows, 16);
  EXPECT_EQ(quiet.moes, 0);
  EXPECT_EQ(moe.moes, moe_layers);
  EXPECT_EQ(moe.attns + moe.mlps + quiet.attns + quiet.mlps, 0);
}

// Each window's logits do not depend on the other windows of its batch.
TEST(Forward, WindowsAreIndependentOfTheirBatch) {
  for (const char* fam : {"mixtral", "olmoe", "qwen3_moe", "llama", "phimoe", "granitemoe"}) {
    TempDir dir;
    synth_to(dir.path(), fam);
    auto lm = load_model(dir.path());
    runtime::Forward fwd(lm->model);
    const int64_t T = 12;
    const auto toks = some_tokens(3 * T, fwd.spec().vocab, 5);
    const MatrixRM all = fwd.run(toks, T);
    for (int w = 0; w < 3; ++w) {
      std::span<const int32_t> one(toks.data() + w * T, T);
      const MatrixRM single = fwd.run(one, T);
      EXPECT_LE((single - all.middleRows(w * T, T)).cwiseAbs().maxCoeff(), 1e-5) << fam << " window " << w;
    }
  }
}

TEST(Forward, UnimplementedRopeScalingIsAnError) {
  TempDir dir;
  synth_to(dir.path(), "llama", {.config_patch = {{"rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}}}});
  const std::string m = forward_refusal(dir.path());
  EXPECT_NE(m.find("yarn"), std::string::npos) << m;
}

TEST(Forward, LinearRopeScalingEqualsScaledPositions) {
  // linear scaling by 2 at position 2p equals no scaling at position p.
  runtime::RopeScaling lin;
  lin.type = "linear";
  lin.factor = 2.0;
  const auto a = runtime::RopeTable::make(16, 8, 10000.0, lin, 4096);
  const auto b = runtime::RopeTable::make(16, 8, 10000.0, {}, 4096);
  for (int p = 0; p < 8; ++p)
    for (int i = 0; i < 4; ++i) {
      EXPECT_NEAR(a.cos[(2 * p) * 4 + i], b.cos[p * 4 + i], 1e-5);
      EXPECT_NEAR(a.sin[(2 * p) * 4 + i], b.sin[p * 4 + i], 1e-5);
    }
}

TEST(Forward, TokenOutsideTheVocabularyIsAnError) {
  TempDir dir;
  synth_to(dir.path(), "mistral");
  auto lm = load_model(dir.path());
  runtime::Forward fwd(lm->model);
  std::vector<int32_t> toks{1, 2, static_cast<int32_t>(fwd.spec().vocab)};
  EXPECT_THROW(fwd.run(toks, 3), core::Error);
}

}  // namespace
}  // namespace moe::test
