// prune --method search (passes/search.h) end to end on the mixtral fixture, with few short
// windows so the tests stay quick.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <set>

#include "support/ckpt_util.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

const fs::path kSrc = MOE_SOURCE_DIR;
const fs::path kModel = kSrc / "data/models/mixtral-tiny";
const fs::path kCalib = kSrc / "data/text/calib.txt";

// prune --method search on `model` with 6 windows of 32 tokens (4 search, 2 held out).
RunResult search(const fs::path& model, const fs::path& out, int keep, const std::vector<std::string>& more = {}) {
  std::vector<std::string> a = {"-q", "prune", model.string(), out.string(), "--method", "search", "--keep",
                                std::to_string(keep), "--text", kCalib.string(), "--ctx", "32", "--windows", "6",
                                "--search-windows", "4", "--heldout-windows", "2", "--force"};
  a.insert(a.end(), more.begin(), more.end());
  return run_tool(a);
}

std::vector<json> layer_reports(const fs::path& out) {
  const json rep = json::parse(read_file(out / "moe_tool_report.json"));
  std::vector<json> v;
  for (const auto& l : rep.at("layers")) v.push_back(l.at("passes").at(0));
  return v;
}

TEST(PruneSearch, NeverWorseThanItsStartAndReportsItsCost) {
  TempDir tmp;
  const RunResult r = search(kModel, tmp.path() / "out", 4, {"--time-budget", "60"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto layers = layer_reports(tmp.path() / "out");
  ASSERT_EQ(layers.size(), 4u);
  for (const auto& p : layers) {
    SCOPED_TRACE(p.dump());
    EXPECT_EQ(p.at("kept").size(), 4u);
    const double start = p.at("start_kl_search").get<double>();
    EXPECT_LE(p.at("kl_search").get<double>(), start);  // by construction
    // The start is the best of the starts scored.
    for (const auto& [name, s] : p.at("starts").items()) {
      if (s.contains("kl_search")) {
        EXPECT_GE(s.at("kl_search").get<double>(), start) << name;
      }
    }
    EXPECT_TRUE(p.at("starts").at(p.at("start").get<std::string>()).contains("kept"));
    // Each accepted swap lowers the search KL.
    double prev = start;
    for (const auto& s : p.at("swaps")) {
      EXPECT_LT(s.at("kl_search").get<double>(), prev);
      prev = s.at("kl_search").get<double>();
    }
    EXPECT_GT(p.at("candidates").get<int64_t>(), 0);
    EXPECT_GT(p.at("layer_forwards").get<int64_t>(), 0);
    EXPECT_GE(p.at("seconds").get<double>(), 0.0);
  }
}

// Top-1 routing and expert 1 a copy of expert 0 (weights and router row) in every layer: dropping
// either copy leaves the output exactly as it was, dropping any other expert does not.
TEST(PruneSearch, DropsADuplicatedExpert) {
  TempDir tmp;
  const fs::path m = tmp.path() / "dup";
  copy_folder(kModel, m);
  json cfg = json::parse(read_file(m / "config.json"));
  cfg["num_experts_per_tok"] = 1;
  write_file(m / "config.json", cfg.dump(2));
  const TensorMap t = read_tensors(m);
  for (int l = 0; l < 4; ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".block_sparse_moe.";
    for (const char* w : {"w1", "w2", "w3"})
      patch_tensor_bytes(m / "model.safetensors", pre + "experts.1." + w + ".weight", 0,
                         t.at(pre + "experts.0." + w + ".weight").bytes);
    const TensorBytes& gate = t.at(pre + "gate.weight");
    const size_t row = gate.bytes.size() / static_cast<size_t>(gate.shape[0]);
    patch_tensor_bytes(m / "model.safetensors", pre + "gate.weight", row, gate.bytes.substr(0, row));
  }
  const RunResult r = search(m, tmp.path() / "out", 7, {"--time-budget", "60"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  for (const auto& p : layer_reports(tmp.path() / "out")) {
    SCOPED_TRACE(p.dump());
    ASSERT_EQ(p.at("dropped").size(), 1u);
    const int d = p.at("dropped").at(0).get<int>();
    EXPECT_TRUE(d == 0 || d == 1);
    EXPECT_LT(p.at("kl_search").get<double>(), 1e-6);
  }
}

TEST(PruneSearch, ZeroTimeBudgetKeepsTheStart) {
  TempDir tmp;
  const RunResult r = search(kModel, tmp.path() / "out", 4, {"--time-budget", "0"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  for (const auto& p : layer_reports(tmp.path() / "out")) {
    SCOPED_TRACE(p.dump());
    EXPECT_TRUE(p.at("swaps").empty());
    EXPECT_NE(p.at("stopped").get<std::string>().find("time budget"), std::string::npos);
    EXPECT_EQ(p.at("kept"), p.at("starts").at(p.at("start").get<std::string>()).at("kept"));
  }
}

TEST(PruneSearch, BadKeysAreRejected) {
  TempDir tmp;
  auto expect_refused = [&](const RunResult& r, const std::string& part) {
    EXPECT_EQ(r.exit_code, 2) << r.describe();
    EXPECT_NE(r.err.find(part), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(tmp.path() / "out"));
  };
  expect_refused(search(kModel, tmp.path() / "out", 4, {"--time-budget", "-1"}), "budget");
  expect_refused(search(kModel, tmp.path() / "out", 4, {"--search-windows", "0"}), "search");
  expect_refused(run_tool({"prune", kModel.string(), (tmp.path() / "out").string(), "--method", "search", "--keep",
                           "4", "--text", kCalib.string(), "--ctx", "32", "--windows", "6", "--search-windows", "4",
                           "--heldout-windows", "3"}),
                 "calibration windows");
  expect_refused(run_tool({"prune", kModel.string(), (tmp.path() / "out").string(), "--method", "search",
                           "--keep-ratio", "0.5", "--text", kCalib.string()}),
                 "across layers");
  expect_refused(run_tool({"prune", kModel.string(), (tmp.path() / "out").string(), "--method", "reap", "--keep",
                           "4", "--text", kCalib.string(), "--time-budget", "5"}),
                 "time");
}

}  // namespace
}  // namespace moe::test
