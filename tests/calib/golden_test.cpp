// Statistics of the fixture models against goldens from the PyTorch reference
// (data/scripts/make_stats_goldens.py -> data/golden/stats-<name>.json): counts exact, sums within
// 1e-5 relative, out_mean / out_cos / logit_sim within 1e-4 absolute, Gram summaries within 1e-5
// relative, the same super experts. The runs set out_stride (first run 1: every token through
// every expert; second run 3: the sampled estimate), so both rules are checked. Each golden run is recomputed here through the library and
// read back from the stats file (so the file format is part of what is checked).
#include <gtest/gtest.h>

#include <cmath>

#include "calib/calibrate.h"
#include "calib/stats.h"
#include "calib_test_util.h"

namespace moe::calib::test {
namespace {

using Json = nlohmann::json;

struct Case {
  const char* name;
  const char* dir;
};

const Case kCases[] = {
    {"qwen3moe", "data/models/synthetic/qwen3moe"},
    {"olmoe", "data/models/synthetic/olmoe"},
    {"qwen2moe-sparse", "data/models/synthetic/qwen2moe-sparse"},
    {"mixtral-tiny", "data/models/mixtral-tiny"},
    {"qwen2moe-tiny", "data/models/qwen2moe-tiny"},
};

void expect_rel(double got, double want, double rel, const std::string& what) {
  const double tol = rel * std::max(std::fabs(want), 1e-30);
  EXPECT_LE(std::fabs(got - want), tol) << what << ": got " << got << ", want " << want;
}

void check_gram(const MatrixD& G, const Json& want, const std::string& what) {
  ASSERT_GT(G.rows(), 0) << what;
  const double fro = want.at("fro").get<double>();
  expect_rel(G.trace(), want.at("trace").get<double>(), 1e-5, what + " trace");
  expect_rel(G.norm(), fro, 1e-5, what + " frobenius");
  EXPECT_NEAR(G.sum(), want.at("sum").get<double>(), 1e-5 * fro) << what << " sum";
  const auto& row0 = want.at("row0");
  for (size_t j = 0; j < row0.size(); ++j)
    EXPECT_NEAR(G(0, static_cast<int64_t>(j)), row0[j].get<double>(), 1e-5 * fro) << what << " row 0 col " << j;
  EXPECT_TRUE(G.isApprox(G.transpose(), 0.0)) << what << " not exactly symmetric";
}

class StatsGolden : public ::testing::TestWithParam<Case> {};

TEST_P(StatsGolden, MatchesReference) {
  const Case& c = GetParam();
  const fs::path golden = source_dir() / "data/golden" / ("stats-" + std::string(c.name) + ".json");
  const fs::path dir = source_dir() / c.dir;
  // A missing fixture is a failure, not a skip: the fixtures are committed with the repository.
  ASSERT_TRUE(fs::exists(dir / "config.json")) << "fixture " << dir << " missing";
  ASSERT_TRUE(fs::exists(golden)) << "missing golden " << golden << " (run data/scripts/make_stats_goldens.py)";
  const Json g = Json::parse(read_file(golden));
  auto fx = load_fixture(dir);
  ASSERT_EQ(static_cast<int64_t>(fx->tokens.size()), g.at("text_tokens").get<int64_t>()) << "tokenization differs";
  TempDir tmp;
  int run_no = 0;
  for (const Json& run : g.at("runs")) {
    SCOPED_TRACE("run " + run.dump().substr(0, 120));
    CalibrateOptions o;
    o.ctx = run.at("ctx").get<int64_t>();
    o.windows = run.at("windows").get<int64_t>();
    o.sample = run.at("sample").get<std::string>() == "random" ? Sample::Random : Sample::First;
    o.seed = run.at("seed").get<uint64_t>();
    o.gram = run.at("gram").get<bool>();
    o.out_cos_tokens = run.at("out_cos_tokens").get<int64_t>();
    o.out_stride = run.at("out_stride").get<int64_t>();  // 1: exact out_mean; > 1: the sampled estimate
    o.batch_windows = 3;  // more than one batch per layer: the accumulation across batches is exercised
    o.quiet = true;
    const fs::path out = tmp / ("run" + std::to_string(run_no++) + ".stats");
    auto res = calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, o, out);
    // Windows and their tokens.
    EXPECT_EQ(res.plan.window_ids, run.at("window_ids").get<std::vector<int64_t>>());
    for (size_t w = 0; w < res.plan.window_ids.size(); ++w) {
      const auto head = run.at("window_heads")[w].get<std::vector<int32_t>>();
      for (size_t i = 0; i < head.size(); ++i)
        EXPECT_EQ(fx->tokens[res.plan.window_ids[w] * o.ctx + i], head[i]) << "window " << w << " token " << i;
    }
    const Stats s = Stats::load(out);
    EXPECT_EQ(s.meta("tokens"), std::to_string(run.at("tokens").get<int64_t>()));
    EXPECT_EQ(s.meta("out_stride"), std::to_string(o.out_stride));
    ASSERT_EQ(s.layers.size(), run.at("layers").size());
    for (const auto& [key, want] : run.at("layers").items()) {
      const int l = std::stoi(key);
      SCOPED_TRACE("layer " + key);
      const LayerStats& st = s.layer(l, "count");
      const int64_t E = st.num_experts();
      ASSERT_EQ(E, static_cast<int64_t>(want.at("count").size()));
      EXPECT_EQ(st.tokens, want.at("tokens").get<int64_t>());
      for (int64_t e = 0; e < E; ++e) {
        const std::string ex = "expert " + std::to_string(e);
        EXPECT_EQ(st.count[e], want.at("count")[e].get<double>()) << ex << " count";
        expect_rel(st.prob_sum[e], want.at("prob_sum")[e].get<double>(), 1e-5, ex + " prob_sum");
        expect_rel(st.weight_sum[e], want.at("weight_sum")[e].get<double>(), 1e-5, ex + " weight_sum");
        expect_rel(st.reap[e], want.at("reap")[e].get<double>(), 1e-5, ex + " reap");
        expect_rel(st.out_absmax[e], want.at("out_absmax")[e].get<double>(), 1e-5, ex + " out_absmax");
        // out_mean: 1e-4 absolute, and (much tighter, since the values are small) 1e-4 relative
        // to the norm of the expert's mean output.
        double diff2 = 0, ref2 = 0;
        for (int64_t i = 0; i < st.out_mean.cols(); ++i) {
          const double w = want.at("out_mean")[e][i].get<double>();
          EXPECT_NEAR(st.out_mean(e, i), w, 1e-4) << ex << " out_mean[" << i << "]";
          diff2 += (st.out_mean(e, i) - w) * (st.out_mean(e, i) - w);
          ref2 += w * w;
        }
        EXPECT_LE(std::sqrt(diff2), 1e-4 * std::sqrt(ref2)) << ex << " out_mean relative error";
        for (int64_t j = 0; j < E; ++j) {
          EXPECT_EQ(st.coact(e, j), want.at("coact")[e][j].get<double>()) << "coact " << e << "," << j;
          EXPECT_NEAR(st.logit_sim(e, j), want.at("logit_sim")[e][j].get<double>(), 1e-4) << "logit_sim " << e << "," << j;
          EXPECT_NEAR(st.out_cos(e, j), want.at("out_cos")[e][j].get<double>(), 1e-4) << "out_cos " << e << "," << j;
        }
      }
      if (o.gram) {
        const LayerStats& sg = s.layer(l, "gram_in");
        for (int64_t e = 0; e < E; ++e) {
          check_gram(sg.gram_in[e], want.at("gram_in")[e], "gram_in expert " + std::to_string(e));
          check_gram(sg.gram_mid[e], want.at("gram_mid")[e], "gram_mid expert " + std::to_string(e));
        }
      }
    }
    if (o.gram) {
      ASSERT_EQ(s.grams.size(), run.at("grams").size());
      for (const auto& [key, want] : run.at("grams").items()) {
        const int l = std::stoi(key);
        const LayerGrams& lg = s.layer_grams(l, "attn_qkv");
        check_gram(lg.attn_qkv, want.at("attn.gram_qkv"), "layer " + key + " attn.gram_qkv");
        check_gram(lg.attn_o, want.at("attn.gram_o"), "layer " + key + " attn.gram_o");
        if (want.contains("mlp.gram_in")) {
          check_gram(s.layer_grams(l, "mlp_in").mlp_in, want.at("mlp.gram_in"), "layer " + key + " mlp.gram_in");
          check_gram(lg.mlp_mid, want.at("mlp.gram_mid"), "layer " + key + " mlp.gram_mid");
        }
      }
    }
    std::vector<std::vector<int>> supers;
    for (const auto& [l, st] : s.layers)
      for (size_t e = 0; e < st.super_expert.size(); ++e)
        if (st.super_expert[e]) supers.push_back({l, static_cast<int>(e)});
    EXPECT_EQ(supers, run.at("super_experts").get<std::vector<std::vector<int>>>());
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, StatsGolden, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<Case>& i) {
                           std::string n = i.param.name;
                           for (auto& ch : n)
                             if (ch == '-') ch = '_';
                           return n;
                         });

}  // namespace
}  // namespace moe::calib::test
