// Invariants of the statistics, the stats file and the library's error messages.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <numeric>

#include "calib/calibrate.h"
#include "calib/plot.h"
#include "calib/report.h"
#include "calib/sha256.h"
#include "calib/stats.h"
#include "calib/stats_file.h"
#include "calib/stats_observer.h"
#include "calib_test_util.h"
#include "support/expect_error.h"

namespace moe::calib::test {
namespace {

using core::ErrorKind;
using moe::test::expect_error;

const char* kRelQwen3 = "data/models/synthetic/qwen3moe";
const char* kRelOlmoe = "data/models/synthetic/olmoe";
const char* kRelSparse = "data/models/synthetic/qwen2moe-sparse";

CalibrateOptions small(int64_t windows = 4, int64_t ctx = 64) {
  CalibrateOptions o;
  o.ctx = ctx;
  o.windows = windows;
  o.batch_windows = 2;
  o.quiet = true;
  return o;
}

void check_invariants(const Stats& s, int64_t k, bool renormalized) {
  for (const auto& [l, st] : s.layers) {
    SCOPED_TRACE("layer " + std::to_string(l));
    const int64_t E = st.num_experts();
    const double T = static_cast<double>(st.tokens);
    EXPECT_EQ(std::accumulate(st.count.begin(), st.count.end(), 0.0), static_cast<double>(k) * T);
    EXPECT_NEAR(std::accumulate(st.prob_sum.begin(), st.prob_sum.end(), 0.0), T, 1e-5 * T);
    const double wsum = std::accumulate(st.weight_sum.begin(), st.weight_sum.end(), 0.0);
    if (renormalized) EXPECT_NEAR(wsum, T, 1e-5 * T);
    else EXPECT_LT(wsum, T);
    for (int64_t i = 0; i < E; ++i) {
      EXPECT_EQ(st.logit_sim(i, i), 1.0f);
      EXPECT_EQ(st.out_cos(i, i), 1.0f);
      EXPECT_EQ(st.coact(i, i), st.count[i]);
      EXPECT_GE(st.reap[i], 0.0);
      EXPECT_GE(st.out_absmax[i], 0.0f);
      double row = 0;
      for (int64_t j = 0; j < E; ++j) {
        EXPECT_EQ(st.logit_sim(i, j), st.logit_sim(j, i));
        EXPECT_EQ(st.out_cos(i, j), st.out_cos(j, i));
        EXPECT_EQ(st.coact(i, j), st.coact(j, i));
        EXPECT_GE(st.logit_sim(i, j), 0.0f);
        EXPECT_LE(st.logit_sim(i, j), 1.0f);
        EXPECT_LE(std::fabs(st.out_cos(i, j)), 1.0f + 1e-6f);
        if (j != i) row += st.coact(i, j);
      }
      EXPECT_EQ(row, static_cast<double>(k - 1) * st.count[i]);  // each routed token has k-1 partners
    }
  }
}

TEST(CalibInvariants, SumsSymmetryAndDiagonals) {
  for (const char* m : {kRelQwen3, kRelOlmoe, kRelSparse}) {
    SCOPED_TRACE(m);
    auto fx = load_fixture(source_dir() / m);
    TempDir tmp;
    auto r = calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, small(), tmp / "s.stats");
    const bool renorm = std::string(m) != kRelOlmoe;  // olmoe: norm_topk_prob false
    check_invariants(r.stats, fx->model.dims().top_k, renorm);
    check_invariants(Stats::load(tmp / "s.stats"), fx->model.dims().top_k, renorm);
  }
}

TEST(CalibInvariants, MetadataRecordsTheRun) {
  auto fx = load_fixture(source_dir() / kRelQwen3);
  TempDir tmp;
  auto o = small(3, 32);
  o.sample = Sample::Random;
  o.seed = 11;
  calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, o, tmp / "s.stats");
  const Stats s = Stats::load(tmp / "s.stats");
  EXPECT_EQ(s.meta("model_fingerprint"), fx->ckpt.fingerprint());
  EXPECT_EQ(s.meta("text_sha256"), sha256_hex(read_file(calib_text())));
  EXPECT_EQ(s.meta("ctx"), "32");
  EXPECT_EQ(s.meta("windows"), "3");
  EXPECT_EQ(s.meta("tokens"), "96");
  EXPECT_EQ(s.meta("seed"), "11");
  EXPECT_EQ(s.meta("sample"), "random");
  EXPECT_EQ(s.meta("tool_version"), MOE_TOOL_VERSION);
  EXPECT_EQ(s.meta("family"), "qwen3_moe");
  EXPECT_EQ(s.meta("num_layers"), "3");
  EXPECT_EQ(s.meta("format"), "pt");
  EXPECT_EQ(s.meta("gram"), "false");
  EXPECT_EQ(s.meta("prob_sum"), "softmax_all_logits");
  EXPECT_FALSE(s.meta("window_ids").empty());
}

TEST(CalibInvariants, SaveOfLoadIsByteIdentical) {
  auto fx = load_fixture(source_dir() / kRelSparse);
  TempDir tmp;
  auto o = small();
  o.gram = true;
  o.keep_grams = true;
  auto r = calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, o, tmp / "a.stats");
  Stats::load(tmp / "a.stats").save(tmp / "b.stats");
  EXPECT_EQ(read_file(tmp / "a.stats"), read_file(tmp / "b.stats"));
  // The in-memory result (keep_grams) is the same statistics as the file.
  EXPECT_EQ(r.stats.grams.size(), 4u);  // every layer: attention (and layer 0's dense MLP)
  r.stats.save(tmp / "c.stats");
  EXPECT_EQ(read_file(tmp / "a.stats"), read_file(tmp / "c.stats"));
  for (const auto& e : fs::directory_iterator(tmp.path()))
    EXPECT_EQ(e.path().filename().string().find("moe-tool-tmp"), std::string::npos) << e.path();
}

TEST(CalibInvariants, BatchSizeChangesOnlyLastBits) {
  auto fx = load_fixture(source_dir() / kRelQwen3);
  TempDir tmp;
  auto o = small(6, 32);
  o.batch_windows = 1;
  auto a = calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, o, tmp / "a.stats");
  o.batch_windows = 6;
  auto b = calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, o, tmp / "b.stats");
  for (const auto& [l, sa] : a.stats.layers) {
    const auto& sb = b.stats.layers.at(l);
    EXPECT_EQ(sa.count, sb.count);
    EXPECT_TRUE(sa.coact == sb.coact);
    for (size_t e = 0; e < sa.count.size(); ++e) EXPECT_NEAR(sa.reap[e], sb.reap[e], 1e-5 * sa.reap[e]);
    EXPECT_LT((sa.out_mean - sb.out_mean).cwiseAbs().maxCoeff(), 1e-6);
    EXPECT_LT((sa.out_cos - sb.out_cos).cwiseAbs().maxCoeff(), 1e-5);
  }
}

TEST(CalibInvariants, RoutedOnlySkipsAllTokenStatistics) {
  auto fx = load_fixture(source_dir() / kRelQwen3);
  TempDir tmp;
  auto o = small();
  o.routed_only = true;
  calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, o, tmp / "s.stats");
  const Stats s = Stats::load(tmp / "s.stats");
  EXPECT_EQ(s.layers.at(0).out_mean.size(), 0);
  EXPECT_EQ(s.layers.at(0).count.size(), 4u);
  expect_error([&] { s.layer(0, "out_mean"); }, ErrorKind::InvalidArgument, {"out_mean", "--routed-only"});
}

TEST(CalibErrors, MissingGramNamesTheFlag) {
  auto fx = load_fixture(source_dir() / kRelQwen3);
  TempDir tmp;
  calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, small(), tmp / "s.stats");
  const Stats s = Stats::load(tmp / "s.stats");
  expect_error([&] { s.layer(1, "gram_in"); }, ErrorKind::InvalidArgument, {"gram_in", "--gram", "layer 1"});
  expect_error([&] { s.layer_grams(1, "attn_qkv"); }, ErrorKind::InvalidArgument, {"--gram"});
  expect_error([&] { s.layer(7, "count"); }, ErrorKind::InvalidArgument, {"layer 7", "0, 1, 2", "moe-tool calibrate"});
  EXPECT_NO_THROW(s.layer(2, "out_mean"));
}

TEST(CalibErrors, StatsOfAnotherModelNameBothFingerprints) {
  auto fx = load_fixture(source_dir() / kRelQwen3);
  TempDir tmp;
  calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, small(), tmp / "s.stats");
  const Stats s = Stats::load(tmp / "s.stats");
  EXPECT_NO_THROW(s.check_model(fx->ckpt.fingerprint(), tmp / "s.stats"));
  auto other = io::Checkpoint::open(io::Env::posix(), source_dir() / kRelOlmoe);
  const std::string msg = expect_error([&] { s.check_model(other.fingerprint(), tmp / "s.stats"); },
                                       ErrorKind::InvalidArgument,
                                       {fx->ckpt.fingerprint(), other.fingerprint(), "moe-tool calibrate"});
  EXPECT_EQ(core::Error(ErrorKind::InvalidArgument, msg).exit_code(), 2);
}

TEST(CalibErrors, BadOptionsNameTheFlag) {
  auto fx = load_fixture(source_dir() / kRelQwen3);
  TempDir tmp;
  const int64_t available = static_cast<int64_t>(fx->tokens.size()) / 64;
  expect_error([&] { plan_calibration(fx->model, static_cast<int64_t>(fx->tokens.size()), small(available + 1)); },
               ErrorKind::InvalidArgument, {"--windows", std::to_string(available)});
  expect_error([&] { plan_calibration(fx->model, 10, small(1, 64)); }, ErrorKind::InvalidArgument, {"--ctx", "10 tokens"});
  auto o = small();
  o.batch_windows = 0;
  expect_error([&] { plan_calibration(fx->model, 1000, o); }, ErrorKind::InvalidArgument, {"--batch-windows"});
  auto dense = io::Checkpoint::open(io::Env::posix(), source_dir() / "data/models/synthetic/qwen3");
  auto dm = model::Model::load(dense);
  expect_error([&] { plan_calibration(dm, 1000, small()); }, ErrorKind::InvalidArgument, {"dense"});
}

TEST(CalibErrors, NotAStatsFile) {
  expect_error([&] { Stats::load(source_dir() / kRelQwen3 / "model.safetensors"); }, ErrorKind::InvalidArgument,
               {"model.safetensors", "not a moe-tool stats file", "moe-tool calibrate"});
  expect_error([&] { Stats::load("/nonexistent/x.stats"); }, std::nullopt, {"/nonexistent/x.stats"});
  // A truncated stats file is a corruption error naming the file.
  auto fx = load_fixture(source_dir() / kRelQwen3);
  TempDir tmp;
  calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, small(), tmp / "s.stats");
  const std::string bytes = read_file(tmp / "s.stats");
  std::ofstream(tmp / "t.stats", std::ios::binary) << bytes.substr(0, bytes.size() - 16);
  expect_error([&] { Stats::load(tmp / "t.stats"); }, ErrorKind::Corruption, {"t.stats"});
}

TEST(CalibWindows, FirstAndRandom) {
  EXPECT_EQ(choose_windows(10, 3, Sample::First, 0), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(choose_windows(4, 0, Sample::First, 0), (std::vector<int64_t>{0, 1, 2, 3}));
  const auto a = choose_windows(1000, 20, Sample::Random, 5);
  EXPECT_EQ(a, choose_windows(1000, 20, Sample::Random, 5));
  EXPECT_NE(a, choose_windows(1000, 20, Sample::Random, 6));
  EXPECT_TRUE(std::is_sorted(a.begin(), a.end()));
  EXPECT_EQ(std::adjacent_find(a.begin(), a.end()), a.end());
  EXPECT_EQ(choose_windows(7, 7, Sample::Random, 3), (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6}));
  expect_error([] { choose_windows(3, 4, Sample::First, 0); }, ErrorKind::InvalidArgument, {"--windows 4", "3 window"});
}

TEST(CalibParts, Sha256) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST(CalibParts, GramUpdateMatchesNaive) {
  runtime::MatrixRM A = runtime::MatrixRM::Random(37, 5);
  MatrixD G = MatrixD::Zero(5, 5);
  gram_update(G, A.data(), 20, 5);
  gram_update(G, A.data() + 20 * 5, 17, 5);
  gram_symmetrize(G);
  const MatrixD want = A.cast<double>().transpose() * A.cast<double>();
  EXPECT_LT((G - want).cwiseAbs().maxCoeff(), 1e-12);
}

TEST(CalibParts, StreamingWriterChecksCompleteness) {
  TempDir tmp;
  LayerLayout L;
  L.layer = 0;
  L.moe = true;
  L.experts = 2;
  L.hidden = 3;
  {
    StatsWriter w(io::Env::posix(), tmp / "x.stats", {L}, {{"model_fingerprint", "x"}});
    // A hidden sibling unique to this process: .x.stats.moe-tool-tmp-PID-NONCE.
    int temps = 0;
    for (const auto& e : fs::directory_iterator(tmp.path()))
      temps += e.path().filename().string().rfind(".x.stats.moe-tool-tmp-" + std::to_string(getpid()) + "-", 0) == 0;
    EXPECT_EQ(temps, 1);
    expect_error([&] { w.finish(); }, ErrorKind::Internal, {"never written"});
  }
  EXPECT_TRUE(fs::is_empty(tmp.path()));  // the temporary is removed when abandoned
  EXPECT_FALSE(fs::exists(tmp / "x.stats"));
}

TEST(CalibReport, ShowAndPlot) {
  auto fx = load_fixture(source_dir() / kRelSparse);
  TempDir tmp;
  auto r = calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, small(), tmp / "s.stats");
  const Stats s = Stats::load(tmp / "s.stats", false);
  const auto j = stats_summary(s, std::nullopt, 3);
  ASSERT_EQ(j.at("layers").size(), 2u);  // layers 1 and 3 are MoE
  EXPECT_EQ(j.at("layers")[0].at("layer").get<int>(), 1);
  EXPECT_EQ(j.at("layers")[0].at("similar_by_logit_sim").size(), 3u);
  double share = 0;
  for (const auto& e : j.at("layers")[0].at("expert_usage")) share += e.at("count_share").get<double>();
  EXPECT_NEAR(share, 1.0, 1e-12);
  const std::string text = render_stats_summary(j);
  EXPECT_NE(text.find("load imbalance"), std::string::npos);
  EXPECT_NE(text.find("super experts:"), std::string::npos);
  expect_error([&] { stats_summary(s, 0, 3); }, ErrorKind::InvalidArgument, {"layer 0", "1, 3"});
  const auto files = plot_stats(s, tmp / "plots");
  for (const char* f : {"usage.svg", "layer-1-logit_sim.svg", "layer-3-out_cos.svg", "out_absmax.svg", "index.html"}) {
    EXPECT_NE(std::find(files.begin(), files.end(), f), files.end()) << f;
    const std::string svg = read_file(tmp / "plots" / f);
    if (std::string(f).ends_with(".svg")) {
      EXPECT_EQ(svg.rfind("<?xml", 0), 0u) << f;
      EXPECT_NE(svg.find("</svg>"), std::string::npos) << f;
    }
  }
  const std::string usage = read_file(tmp / "plots/usage.svg");
  EXPECT_NE(usage.find("(max)"), std::string::npos);
  EXPECT_NE(usage.find("(min)"), std::string::npos);
  EXPECT_NE(usage.find(">expert<"), std::string::npos);
  EXPECT_NE(usage.find(">layer<"), std::string::npos);
}

}  // namespace
}  // namespace moe::calib::test
