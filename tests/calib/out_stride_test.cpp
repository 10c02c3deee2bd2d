// The token sample of the all-experts statistics (--out-stride): out_mean and out_cos checked
// against a direct computation of their definition on a synthetic MoE block fed to the observer
// in uneven batches, the exact rule for S = 1 (and its equality with the golden run that uses
// it), the estimate's accuracy on a trained fixture, the metadata, and the CLI's validation.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "calib/calibrate.h"
#include "calib/report.h"
#include "calib/stats.h"
#include "calib/stats_observer.h"
#include "calib_test_util.h"
#include "support/expect_error.h"
#include "support/run.h"

namespace moe::calib::test {
namespace {

using core::ErrorKind;
using moe::test::expect_error;
using moe::test::run_tool;
using runtime::MatrixRM;
using Json = nlohmann::json;

// mixtral-tiny, 64 windows x 128, stride 16 against stride 1: out_mean's relative Frobenius error
// per layer measured 0.028-0.047; leaving out the weight S of the sampled unrouted tokens gives
// 0.45-0.76 (make_stats_goldens.py's reference, same tokens). out_cos uses other tokens (every 16th
// instead of the first 512): entries moved by at most 0.047.
constexpr double kEstimateBound = 0.1;
constexpr double kCosBound = 0.1;

// A small MoE block with random weights and a plain softmax top-k router.
struct Block {
  int64_t H = 6, I = 5, E = 4, k = 2;
  runtime::MoeWeights w;
  explicit Block(uint32_t seed) {
    std::mt19937 g(seed);
    std::normal_distribution<float> nd(0.0f, 0.5f);
    auto rnd = [&](int64_t r, int64_t c) {
      MatrixRM m(r, c);
      for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = nd(g);
      return m;
    };
    w.router = rnd(E, H);
    for (int64_t e = 0; e < E; ++e) w.experts.push_back({rnd(I, H), rnd(I, H), rnd(H, I)});
  }
  // expert e on token x, in double (the reference).
  std::vector<double> expert(int64_t e, const float* x) const {
    const auto& W = w.experts[e];
    std::vector<double> h(I), y(H, 0.0);
    for (int64_t c = 0; c < I; ++c) {
      double a = 0, b = 0;
      for (int64_t i = 0; i < H; ++i) {
        a += double(W.gate(c, i)) * x[i];
        b += double(W.up(c, i)) * x[i];
      }
      h[c] = a / (1.0 + std::exp(-a)) * b;
    }
    for (int64_t i = 0; i < H; ++i)
      for (int64_t c = 0; c < I; ++c) y[i] += double(W.down(i, c)) * h[c];
    return y;
  }
};

// Feeds rows [0, N) of X to the observer in batches of the given sizes, as the forward would.
LayerStats observe(const Block& b, const MatrixRM& X, const std::vector<int64_t>& batches, int64_t stride,
                   int64_t cos_tokens) {
  ObserverOptions oo;
  oo.out_stride = stride;
  oo.out_cos_tokens = cos_tokens;
  StatsObserver obs(oo);
  int64_t offset = 0;
  for (int64_t n : batches) {
    const MatrixRM x = X.middleRows(offset, n);
    const MatrixRM logits = x * b.w.router.transpose();
    runtime::RoutingResult r;
    r.ids.resize(n, b.k);
    r.weights.resize(n, b.k);
    r.probs.resize(n, b.E);
    std::vector<std::vector<int32_t>> tokens(b.E);
    for (int64_t t = 0; t < n; ++t) {
      double m = -INFINITY, s = 0;
      for (int64_t e = 0; e < b.E; ++e) m = std::max(m, double(logits(t, e)));
      for (int64_t e = 0; e < b.E; ++e) s += std::exp(double(logits(t, e)) - m);
      for (int64_t e = 0; e < b.E; ++e) r.probs(t, e) = float(std::exp(double(logits(t, e)) - m) / s);
      std::vector<int32_t> order(b.E);
      for (int32_t e = 0; e < b.E; ++e) order[e] = e;
      std::stable_sort(order.begin(), order.end(), [&](int32_t p, int32_t q) { return logits(t, p) > logits(t, q); });
      for (int64_t s2 = 0; s2 < b.k; ++s2) {
        r.ids(t, s2) = order[s2];
        r.weights(t, s2) = r.probs(t, order[s2]);
        tokens[order[s2]].push_back(static_cast<int32_t>(t));
      }
    }
    std::vector<MatrixRM> h(b.E), y(b.E);
    for (int64_t e = 0; e < b.E; ++e) {
      const auto& W = b.w.experts[e];
      MatrixRM xe(static_cast<int64_t>(tokens[e].size()), b.H);
      for (size_t j = 0; j < tokens[e].size(); ++j) xe.row(j) = x.row(tokens[e][j]);
      MatrixRM gt = xe * W.gate.transpose(), up = xe * W.up.transpose();
      h[e] = (gt.array() / (1.0f + (-gt.array()).exp()) * up.array()).matrix();
      y[e] = h[e] * W.down.transpose();
    }
    const MatrixRM none;
    const runtime::MoeTrace t{x, logits, r, tokens, h, y, none, none, none, b.w};
    obs.set_token_offset(offset);
    obs.on_moe(0, t);
    offset += n;
  }
  return *obs.take_layer(0);
}

struct Reference {
  std::vector<std::vector<double>> out_mean;  // [E][H]
  std::vector<std::vector<double>> out_cos;   // [E][E]
};

// The definitions, directly: routed tokens with weight 1, sampled unrouted ones with weight S;
// out_cos over the first cos_tokens sampled tokens.
Reference reference(const Block& b, const MatrixRM& X, int64_t stride, int64_t cos_tokens,
                    const std::vector<std::vector<bool>>& routed, bool weight_s = true) {
  const int64_t N = X.rows();
  Reference ref;
  ref.out_mean.assign(b.E, std::vector<double>(b.H, 0.0));
  ref.out_cos.assign(b.E, std::vector<double>(b.E, 0.0));
  int64_t used = 0;
  for (int64_t n = 0; n < N; ++n) {
    const bool sampled = n % stride == 0;
    std::vector<std::vector<double>> ys;
    for (int64_t e = 0; e < b.E; ++e) {
      ys.push_back(b.expert(e, X.data() + n * b.H));
      const double wgt = routed[n][e] ? 1.0 : sampled ? (weight_s ? double(stride) : 1.0) : 0.0;
      for (int64_t i = 0; i < b.H; ++i) ref.out_mean[e][i] += wgt * ys[e][i] / double(N);
    }
    if (sampled && used < cos_tokens) {
      ++used;
      for (int64_t i = 0; i < b.E; ++i)
        for (int64_t j = 0; j < b.E; ++j) {
          double d = 0, ni = 0, nj = 0;
          for (int64_t c = 0; c < b.H; ++c) {
            d += ys[i][c] * ys[j][c];
            ni += ys[i][c] * ys[i][c];
            nj += ys[j][c] * ys[j][c];
          }
          ref.out_cos[i][j] += d / std::sqrt(ni * nj);
        }
    }
  }
  for (auto& row : ref.out_cos)
    for (auto& v : row) v /= double(used);
  return ref;
}

// Which experts each token of X goes to (same router as observe()).
std::vector<std::vector<bool>> routed_sets(const Block& b, const MatrixRM& X) {
  const MatrixRM logits = X * b.w.router.transpose();
  std::vector<std::vector<bool>> r(X.rows(), std::vector<bool>(b.E, false));
  for (int64_t t = 0; t < X.rows(); ++t) {
    std::vector<int32_t> order(b.E);
    for (int32_t e = 0; e < b.E; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int32_t p, int32_t q) { return logits(t, p) > logits(t, q); });
    for (int64_t s = 0; s < b.k; ++s) r[t][order[s]] = true;
  }
  return r;
}

TEST(CalibOutStride, ObserverMatchesTheDefinition) {
  const Block b(3);
  std::mt19937 g(9);
  std::normal_distribution<float> nd;
  MatrixRM X(23, b.H);
  for (int64_t i = 0; i < X.size(); ++i) X.data()[i] = nd(g);
  const auto routed = routed_sets(b, X);
  // Uneven batches, so the sample's phase differs from batch to batch (offsets 0, 7, 16).
  const std::vector<int64_t> batches = {7, 9, 7};
  struct Case {
    int64_t stride, cos_tokens;
  };
  // cos_tokens caps the sample inside the second batch (S = 1: 10 tokens; S = 5: 0, 5, 10), or
  // not at all (S = 3: 8 samples, cap 100; S = 30: token 0 only).
  for (const Case c : {Case{1, 10}, Case{3, 100}, Case{5, 3}, Case{30, 4}}) {
    SCOPED_TRACE("stride " + std::to_string(c.stride));
    const LayerStats st = observe(b, X, batches, c.stride, c.cos_tokens);
    EXPECT_EQ(st.tokens, 23);
    const Reference ref = reference(b, X, c.stride, c.cos_tokens, routed);
    for (int64_t e = 0; e < b.E; ++e) {
      for (int64_t i = 0; i < b.H; ++i)
        EXPECT_NEAR(st.out_mean(e, i), ref.out_mean[e][i], 1e-5 * (1.0 + std::fabs(ref.out_mean[e][i])))
            << "out_mean " << e << "," << i;
      for (int64_t j = 0; j < b.E; ++j)
        EXPECT_NEAR(st.out_cos(e, j), e == j ? 1.0 : ref.out_cos[e][j], 1e-5) << "out_cos " << e << "," << j;
    }
    if (c.stride > 1) {
      // The weight S matters: without it the reference is clearly different.
      const Reference unweighted = reference(b, X, c.stride, c.cos_tokens, routed, false);
      double diff = 0;
      for (int64_t e = 0; e < b.E; ++e)
        for (int64_t i = 0; i < b.H; ++i) diff = std::max(diff, std::fabs(st.out_mean(e, i) - unweighted.out_mean[e][i]));
      EXPECT_GT(diff, 1e-3);
    }
  }
  // S = 1 gives the same numbers whatever the batching (the sample has no phase).
  const LayerStats one = observe(b, X, {23}, 1, 10);
  const LayerStats split = observe(b, X, batches, 1, 10);
  EXPECT_LT((one.out_mean - split.out_mean).cwiseAbs().maxCoeff(), 1e-6);
  ObserverOptions bad;
  bad.out_stride = 0;
  expect_error([&] { StatsObserver o(bad); }, ErrorKind::InvalidArgument, {"--out-stride"});
}

// Relative Frobenius distance of two [E,H] matrices.
double rel_fro(const MatrixF& a, const MatrixF& ref) {
  return (a.cast<double>() - ref.cast<double>()).norm() / ref.cast<double>().norm();
}

TEST(CalibOutStride, StrideOneIsTheGoldenExactRun) {
  // Golden run 1 of every fixture uses out_stride 1: the exact definition (every token through
  // every expert) that make_stats_goldens.py computes as a plain mean over all tokens.
  const Json g = Json::parse(read_file(source_dir() / "data/golden/stats-qwen3moe.json"));
  const auto& run = g.at("runs")[0];
  ASSERT_EQ(run.at("out_stride").get<int64_t>(), 1);
  auto fx = load_fixture(source_dir() / "data/models/synthetic/qwen3moe");
  CalibrateOptions o;
  o.ctx = run.at("ctx").get<int64_t>();
  o.windows = run.at("windows").get<int64_t>();
  o.out_cos_tokens = run.at("out_cos_tokens").get<int64_t>();
  o.out_stride = 1;
  o.quiet = true;
  TempDir tmp;
  const auto r = calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, o, tmp / "s.stats");
  for (const auto& [key, want] : run.at("layers").items()) {
    const LayerStats& st = r.stats.layers.at(std::stoi(key));
    MatrixF ref(st.out_mean.rows(), st.out_mean.cols());
    for (int64_t e = 0; e < ref.rows(); ++e)
      for (int64_t i = 0; i < ref.cols(); ++i) ref(e, i) = want.at("out_mean")[e][i].get<float>();
    EXPECT_LT(rel_fro(st.out_mean, ref), 1e-5) << "layer " << key;
  }
  EXPECT_EQ(Stats::load(tmp / "s.stats").meta("out_stride"), "1");
}

TEST(CalibOutStride, EstimateIsCloseOnATrainedFixture) {
  MOE_SKIP_UNDER_SANITIZERS();
  const fs::path dir = source_dir() / "data/models/mixtral-tiny";
  ASSERT_TRUE(fs::exists(dir / "config.json")) << "fixture " << dir << " missing";
  auto fx = load_fixture(dir);
  CalibrateOptions o;
  o.ctx = 128;
  o.windows = 64;  // 8192 tokens: 512 sampled at the default stride
  o.quiet = true;
  TempDir tmp;
  o.out_stride = 1;
  const auto exact = calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, o, tmp / "exact.stats");
  o.out_stride = 16;
  const auto est = calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, o, tmp / "est.stats");
  for (const auto& [l, se] : exact.stats.layers) {
    SCOPED_TRACE("layer " + std::to_string(l));
    const LayerStats& ss = est.stats.layers.at(l);
    // Routed statistics do not depend on the stride.
    EXPECT_EQ(se.count, ss.count);
    EXPECT_EQ(se.reap, ss.reap);
    const double err = rel_fro(ss.out_mean, se.out_mean);
    EXPECT_GT(err, 0.0);  // an estimate, not the exact value
    EXPECT_LT(err, kEstimateBound);
    EXPECT_LT((ss.out_cos - se.out_cos).cwiseAbs().maxCoeff(), kCosBound);
  }
}

TEST(CalibOutStride, MetadataAndReport) {
  auto fx = load_fixture(source_dir() / "data/models/synthetic/qwen3moe");
  TempDir tmp;
  CalibrateOptions o;
  o.ctx = 64;
  o.windows = 4;  // 256 tokens
  o.quiet = true;
  calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, o, tmp / "d.stats");
  const Stats d = Stats::load(tmp / "d.stats");
  EXPECT_EQ(d.meta("out_stride"), "16");
  EXPECT_EQ(d.meta("out_cos_tokens"), "16");  // 256 / 16 sampled tokens, fewer than 512
  const std::string text = render_stats_summary(stats_summary(d, std::nullopt, 3));
  EXPECT_NE(text.find("out_mean: routed tokens exact + every 16th token for the rest"), std::string::npos) << text;
  o.out_stride = 1;
  calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, o, tmp / "e.stats");
  Stats e = Stats::load(tmp / "e.stats");
  EXPECT_EQ(e.meta("out_stride"), "1");
  EXPECT_EQ(e.meta("out_cos_tokens"), "256");
  EXPECT_NE(render_stats_summary(stats_summary(e, std::nullopt, 3)).find("out_mean: every token"), std::string::npos);
  // A file without the key (made before out_stride existed) reads as every token.
  e.metadata.erase("out_stride");
  EXPECT_NE(render_stats_summary(stats_summary(e, std::nullopt, 3)).find("out_mean: every token"), std::string::npos);
  o.out_stride = 0;
  expect_error([&] { plan_calibration(fx->model, 1000, o); }, ErrorKind::InvalidArgument, {"--out-stride"});
}

TEST(CalibOutStride, CliRejectsBadStride) {
  TempDir tmp;
  for (const char* bad : {"0", "-3"}) {
    auto r = run_tool({"calibrate", (source_dir() / "data/models/synthetic/qwen3moe").string(), "--text",
                       calib_text().string(), "-o", (tmp / "x.stats").string(), "--ctx", "64", "--windows", "2",
                       "--out-stride", bad});
    EXPECT_EQ(r.exit_code, 2) << r.describe();
    EXPECT_NE(r.err.find("--out-stride"), std::string::npos) << r.err;
    EXPECT_EQ(r.err_lines().size(), 1u) << r.err;
  }
  EXPECT_FALSE(fs::exists(tmp / "x.stats"));
  auto ok = run_tool({"calibrate", (source_dir() / "data/models/synthetic/qwen3moe").string(), "--text",
                      calib_text().string(), "-o", (tmp / "y.stats").string(), "--ctx", "64", "--windows", "2",
                      "--out-stride", "4", "--quiet"});
  ASSERT_EQ(ok.exit_code, 0) << ok.describe();
  EXPECT_EQ(Stats::load(tmp / "y.stats").meta("out_stride"), "4");
}

}  // namespace
}  // namespace moe::calib::test
