// moe-tool calibrate / stats show / stats plot end to end: byte-identical reruns, exit codes and
// messages.
#include <gtest/gtest.h>

#include "calib_test_util.h"
#include "support/run.h"

namespace moe::calib::test {
namespace {

using moe::test::run_tool;

const std::string kQwen3 = (source_dir() / "data/models/synthetic/qwen3moe").string();
const std::string kOlmoe = (source_dir() / "data/models/synthetic/olmoe").string();
const std::string kSparse = (source_dir() / "data/models/synthetic/qwen2moe-sparse").string();
const std::string kText = calib_text().string();

std::vector<std::string> cal(const std::string& model, const fs::path& out, std::vector<std::string> extra = {},
                             const std::string& windows = "4", const std::string& ctx = "64") {
  std::vector<std::string> a = {"calibrate", model, "--text", kText, "-o", out.string(), "--ctx", ctx, "--windows", windows};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

TEST(CalibCli, SecondRunIsByteIdentical) {
  TempDir tmp;
  for (const auto& extra : std::vector<std::vector<std::string>>{{}, {"--gram", "--batch-windows", "3"},
                                                                  {"--sample", "random", "--seed", "3"}}) {
    // The loop writes the same files again: an existing stats file needs --force.
    std::vector<std::string> forced = extra;
    forced.push_back("--force");
    auto a = run_tool(cal(kSparse, tmp / "a.stats", forced));
    ASSERT_EQ(a.exit_code, 0) << a.describe();
    auto b = run_tool(cal(kSparse, tmp / "b.stats", forced));
    ASSERT_EQ(b.exit_code, 0) << b.describe();
    const std::string fa = read_file(tmp / "a.stats"), fb = read_file(tmp / "b.stats");
    EXPECT_FALSE(fa.empty());
    EXPECT_TRUE(fa == fb) << "stats files differ with flags " << ::testing::PrintToString(extra);
  }
}

TEST(CalibCli, QuietAndProgress) {
  TempDir tmp;
  auto q = run_tool(cal(kQwen3, tmp / "q.stats", {"--quiet"}));
  ASSERT_EQ(q.exit_code, 0) << q.describe();
  EXPECT_EQ(q.err, "");
  EXPECT_NE(q.out.find("wrote"), std::string::npos);
  auto v = run_tool(cal(kQwen3, tmp / "v.stats", {"--gram"}));
  ASSERT_EQ(v.exit_code, 0) << v.describe();
  EXPECT_NE(v.err.find("256 tokens"), std::string::npos) << v.err;
  EXPECT_NE(v.err.find("--gram keeps fp64 Gram matrices"), std::string::npos) << v.err;
  auto j = run_tool(cal(kQwen3, tmp / "j.stats", {"--quiet", "--json"}));
  ASSERT_EQ(j.exit_code, 0) << j.describe();
  auto parsed = nlohmann::json::parse(j.out);
  EXPECT_EQ(parsed["tokens"].get<int>(), 256);
  EXPECT_EQ(parsed["moe_layers"].get<int>(), 3);
}

TEST(CalibCli, ShowPlotAndModelCheck) {
  TempDir tmp;
  ASSERT_EQ(run_tool(cal(kQwen3, tmp / "s.stats", {"--quiet"})).exit_code, 0);
  auto show = run_tool({"stats", "show", (tmp / "s.stats").string()});
  ASSERT_EQ(show.exit_code, 0) << show.describe();
  for (const char* s : {"layer 0:", "layer 2:", "load imbalance", "count%", "saliency%", "most similar by logit_sim",
                        "most similar by out_cos", "super experts:"})
    EXPECT_NE(show.out.find(s), std::string::npos) << s << " not in:\n" << show.out;
  auto one = run_tool({"stats", "show", (tmp / "s.stats").string(), "--layer", "1", "--json"});
  ASSERT_EQ(one.exit_code, 0) << one.describe();
  auto j = nlohmann::json::parse(one.out);
  ASSERT_EQ(j["layers"].size(), 1u);
  EXPECT_EQ(j["layers"][0]["layer"].get<int>(), 1);
  // saliency_share = count * reap normalised over the layer (what merges weigh members by).
  const auto st = calib::Stats::load(tmp / "s.stats", false).layers.at(1);
  double ssum = 0;
  for (size_t e = 0; e < st.count.size(); ++e) ssum += st.count[e] * st.reap[e];
  for (size_t e = 0; e < st.count.size(); ++e)
    EXPECT_NEAR(j["layers"][0]["expert_usage"][e]["saliency_share"].get<double>(), st.count[e] * st.reap[e] / ssum, 1e-12);
  auto bad_layer = run_tool({"stats", "show", (tmp / "s.stats").string(), "--layer", "5"});
  EXPECT_EQ(bad_layer.exit_code, 2) << bad_layer.describe();
  EXPECT_NE(bad_layer.err.find("layer 5"), std::string::npos) << bad_layer.err;
  // The right model passes; another model fails with both fingerprints named.
  EXPECT_EQ(run_tool({"stats", "show", (tmp / "s.stats").string(), "--model", kQwen3}).exit_code, 0);
  auto other = run_tool({"stats", "show", (tmp / "s.stats").string(), "--model", kOlmoe});
  EXPECT_EQ(other.exit_code, 2) << other.describe();
  const auto fp_q = io::Checkpoint::open(io::Env::posix(), kQwen3).fingerprint();
  const auto fp_o = io::Checkpoint::open(io::Env::posix(), kOlmoe).fingerprint();
  EXPECT_NE(other.err.find(fp_q), std::string::npos) << other.err;
  EXPECT_NE(other.err.find(fp_o), std::string::npos) << other.err;
  EXPECT_EQ(other.err_lines().size(), 1u) << other.err;
  auto plot = run_tool({"stats", "plot", (tmp / "s.stats").string(), "-o", (tmp / "plots").string()});
  ASSERT_EQ(plot.exit_code, 0) << plot.describe();
  for (const char* f : {"usage.svg", "layer-0-logit_sim.svg", "layer-2-out_cos.svg", "out_absmax.svg", "index.html"})
    EXPECT_TRUE(fs::exists(tmp / "plots" / f)) << f;
}

TEST(CalibCli, ErrorsExitTwoWithOneLine) {
  TempDir tmp;
  struct Bad {
    std::vector<std::string> args;
    std::string needle;
  };
  const std::vector<Bad> cases = {
      {cal(kQwen3, tmp / "x.stats", {}, "100000"), "--windows 100000"},
      {{"calibrate", kQwen3, "--text", "/nonexistent.txt", "-o", (tmp / "x.stats").string()}, "/nonexistent.txt"},
      {{"calibrate", (source_dir() / "data/models/synthetic/qwen3").string(), "--text", kText, "-o",
        (tmp / "x.stats").string()},
       "dense"},
      {cal(kQwen3, tmp / "x.stats", {}, "1", "100000"), "--ctx"},
      {{"stats", "show", (source_dir() / "data/models/synthetic/qwen3moe/model.safetensors").string()},
       "not a moe-tool stats file"},
  };
  for (const auto& c : cases) {
    auto r = run_tool(c.args);
    EXPECT_EQ(r.exit_code, 2) << r.describe();
    EXPECT_NE(r.err.find(c.needle), std::string::npos) << c.needle << " not in: " << r.err;
    EXPECT_EQ(r.err_lines().size(), 1u) << r.err;
  }
  EXPECT_FALSE(fs::exists(tmp / "x.stats"));
  for (const auto& e : fs::directory_iterator(tmp.path()))
    EXPECT_EQ(e.path().filename().string().find("moe-tool-tmp"), std::string::npos) << e.path();
}

}  // namespace
}  // namespace moe::calib::test
