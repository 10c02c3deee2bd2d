// prune --method search (passes/search.h) end to end on the mixtral fixture, with few short
// windows so the tests stay quick.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <cmath>
#include <set>

#include "io/checkpoint.h"
#include "io/env.h"
#include "model/model.h"
#include "pipeline/calibration_text.h"
#include "runtime/forward.h"
#include "support/paths.h"
#include "support/ckpt_util.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;


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
  MOE_SKIP_UNDER_SANITIZERS();  // a numeric check; the search's code runs there in the tests below
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
// Mean KL(p_ref || p) in nats over rows [r0, r1) of two logit matrices, in double: computed here,
// apart from the pass's own scorer (passes/search.h), which it checks.
double mean_kl(const runtime::MatrixRM& ref, const runtime::MatrixRM& got, int64_t r0, int64_t r1) {
  double sum = 0;
  for (int64_t r = r0; r < r1; ++r) {
    auto logsumexp = [&](const runtime::MatrixRM& m) {
      double mx = -INFINITY;
      for (int64_t j = 0; j < m.cols(); ++j) mx = std::max(mx, static_cast<double>(m(r, j)));
      double z = 0;
      for (int64_t j = 0; j < m.cols(); ++j) z += std::exp(static_cast<double>(m(r, j)) - mx);
      return mx + std::log(z);
    };
    const double lr = logsumexp(ref), lg = logsumexp(got);
    for (int64_t j = 0; j < ref.cols(); ++j) {
      const double a = static_cast<double>(ref(r, j)) - lr, b = static_cast<double>(got(r, j)) - lg;
      sum += std::exp(a) * (a - b);
    }
  }
  return sum / static_cast<double>(r1 - r0);
}

// The KLs the last layer reports are those of the whole pruned model against the input (the
// windows reach it through the already-pruned layers): recomputed here from the two checkpoints'
// logits on the same windows (the first 4 search, the last 2 held out, 32 tokens each).
TEST(PruneSearch, ReportedKlMatchesTheWrittenModel) {
  MOE_SKIP_UNDER_SANITIZERS();
  TempDir tmp;
  const RunResult r = search(kModel, tmp.path() / "out", 4, {"--time-budget", "60"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json last = layer_reports(tmp.path() / "out").back();
  pipeline::CalibrationSpec spec;
  spec.text = kCalib;
  spec.ctx = 32;
  spec.windows = 6;
  const auto tokens = pipeline::calibration_tokens(kModel, spec);
  ASSERT_EQ(tokens.windows, 6);
  auto logits = [&](const fs::path& dir) {
    auto ck = io::Checkpoint::open(io::Env::posix(), dir);
    const model::Model m = model::Model::load(ck);
    return runtime::Forward(m).run(tokens.tokens, 32);
  };
  const runtime::MatrixRM ref = logits(kModel), got = logits(tmp.path() / "out");
  const double kl_search = mean_kl(ref, got, 0, 4 * 32), kl_heldout = mean_kl(ref, got, 4 * 32, 6 * 32);
  EXPECT_GT(kl_search, 1e-3);  // 4 of 8 experts dropped: not the input model
  EXPECT_NEAR(last.at("kl_search").get<double>(), kl_search, 1e-3 * kl_search) << last.dump();
  EXPECT_NEAR(last.at("kl_heldout").get<double>(), kl_heldout, 1e-3 * kl_heldout) << last.dump();
}

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
                 "--windows 6: --search-windows + --heldout-windows = 7 calibration windows");
  expect_refused(run_tool({"prune", kModel.string(), (tmp.path() / "out").string(), "--method", "search",
                           "--keep-ratio", "0.5", "--text", kCalib.string()}),
                 "across layers");
  expect_refused(run_tool({"prune", kModel.string(), (tmp.path() / "out").string(), "--method", "reap", "--keep",
                           "4", "--text", kCalib.string(), "--time-budget", "5"}),
                 "time");
}

}  // namespace
}  // namespace moe::test
