// `share` (cross-layer expert sharing, passes/xlayer_share.h) through the CLI on a synthetic
// two-layer mixtral calibrated on the bundled text: budget 0 writes the input's tensors byte for
// byte, a budget writes each pooled expert once (the file smaller by exactly the pooled experts'
// bytes), eval/inspect read it, `convert --materialize` expands it into a stock checkpoint with
// the same logits bit for bit, and bad input is refused in one line with nothing written.
#include <gtest/gtest.h>

#include <cstring>
#include <set>

#include "io/checkpoint.h"
#include "model/model.h"
#include "runtime/forward.h"
#include "support/ckpt_util.h"
#include "support/cli_expect.h"
#include "support/paths.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;

class Share : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = new TempDir("share");
    write_synth(make_synth("mixtral"), *tmp_ / "in", {.tokenizer = true});
    const RunResult r = run_tool({"-q", "calibrate", (*tmp_ / "in").string(), "--text", kCalib.string(), "--ctx", "32",
                                  "--windows", "4", "-o", (*tmp_ / "stats.safetensors").string()});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
  }
  static void TearDownTestSuite() { delete tmp_; }
  static fs::path in() { return *tmp_ / "in"; }
  static fs::path stats() { return *tmp_ / "stats.safetensors"; }
  static RunResult share(const fs::path& out, const std::string& r) {
    return run_tool({"-q", "share", in().string(), out.string(), "--stats", stats().string(), "--share", r, "--json"});
  }
  static TempDir* tmp_;
};
TempDir* Share::tmp_ = nullptr;

runtime::MatrixRM share_logits(const fs::path& dir) {
  auto m = model::Model::load(io::Checkpoint::open(io::Env::posix(), dir));
  runtime::Forward f(m);
  std::vector<int32_t> ids;
  for (int i = 0; i < 64; ++i) ids.push_back(static_cast<int32_t>((i * 37 + 11) % m.dims().vocab));
  return f.run(ids, 32);
}

TEST_F(Share, BudgetZeroWritesTheInputTensorsByteForByte) {
  const fs::path out = *tmp_ / "zero";
  const RunResult r = share(out, "0");
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  auto& env = io::Env::posix();
  const auto a = io::Checkpoint::open(env, in()), b = io::Checkpoint::open(env, out);
  ASSERT_EQ(std::set<std::string>(a.names().begin(), a.names().end()), std::set<std::string>(b.names().begin(), b.names().end()));
  for (const auto& n : a.names()) {
    const core::Tensor x = a.tensor(n), y = b.tensor(n);
    ASSERT_EQ(x.dtype(), y.dtype()) << n;
    ASSERT_EQ(x.shape(), y.shape()) << n;
    EXPECT_EQ(std::memcmp(x.data(), y.data(), x.nbytes()), 0) << n;
  }
  EXPECT_FALSE(read_json(out / "config.json").contains("quantization_config"));
}

TEST_F(Share, PooledExpertsStoredOnceAndMaterializeGivesTheSameLogits) {
  const fs::path out = *tmp_ / "quarter", mat = *tmp_ / "quarter-mat";
  const RunResult r = share(out, "0.25");  // 2 of the 8 experts (4 per layer) pooled away
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json j = json::parse(r.out);
  EXPECT_EQ(j["pools"], 2);
  // hidden 32, expert width 16, bf16: an expert's three matrices are 3 · 16 · 32 · 2 bytes.
  const int64_t expert_bytes = 3 * 16 * 32 * 2;
  EXPECT_EQ(j["bytes_after"].get<int64_t>(), j["bytes_before"].get<int64_t>() - 2 * expert_bytes);
  EXPECT_EQ(j["expert_params_logical"].get<int64_t>() - j["expert_params_stored"].get<int64_t>(), 2 * 3 * 16 * 32);
  // 2 pools x 3 matrices x 2 users listed, naming 6 distinct tensors.
  const json w = read_json(out / "config.json")["quantization_config"]["weights"];
  std::set<std::string> parts;
  int pooled = 0;
  for (const auto& [name, e] : w.items())
    if (e["encoding"] == "pooled") {
      ++pooled;
      parts.insert(e["parts"]["weight"].get<std::string>());
    }
  EXPECT_EQ(pooled, 12);
  EXPECT_EQ(parts.size(), 6u);
  const json rep = read_json(out / "moe_tool_report.json");
  ASSERT_EQ(rep["share"]["pools"].size(), 2u);
  EXPECT_EQ(rep["share"]["pools"][0]["layers"], json({0, 1}));

  RunResult ins = run_tool({"-q", "inspect", out.string()});
  ASSERT_EQ(ins.exit_code, 0) << ins.describe();
  EXPECT_NE(ins.out.find("pooled"), std::string::npos) << ins.out;
  const RunResult ev = run_tool({"-q", "eval", out.string(), "--text", kHeldout.string(), "--ctx", "32", "--max-windows", "2"});
  ASSERT_EQ(ev.exit_code, 0) << ev.describe();

  const RunResult c = run_tool({"-q", "convert", out.string(), mat.string(), "--materialize"});
  ASSERT_EQ(c.exit_code, 0) << c.describe();
  EXPECT_FALSE(read_json(mat / "config.json").contains("quantization_config"));
  const runtime::MatrixRM p = share_logits(out), m = share_logits(mat), orig = share_logits(in());
  EXPECT_TRUE(p == m) << "max |diff| " << (p - m).cwiseAbs().maxCoeff();
  EXPECT_FALSE(p == orig);  // two experts of each layer did change

  // prune of the pooled checkpoint: the pool is written once under its first user left in the
  // output (random keep-maps drop first users, second users or both), and the result is the prune
  // of the materialized checkpoint with the same keep-maps, tensor for tensor.
  int pools_lost_a_user = 0;
  for (const std::string seed : {"1", "2", "3"}) {
    SCOPED_TRACE("seed " + seed);
    const fs::path pruned = *tmp_ / ("pruned-" + seed), expanded = *tmp_ / ("pruned-mat-" + seed),
                   reference = *tmp_ / ("mat-pruned-" + seed);
    auto prune = [&](const fs::path& from, const fs::path& to) {
      const RunResult pr = run_tool({"-q", "prune", from.string(), to.string(), "--method", "random", "--keep", "3", "--seed", seed});
      ASSERT_EQ(pr.exit_code, 0) << pr.describe();
    };
    prune(out, pruned);
    prune(mat, reference);
    int pooled_left = 0;
    const json cfg = read_json(pruned / "config.json");  // named: a loop over a temporary's member dangles
    for (const auto& [name, e] : cfg.at("quantization_config").at("weights").items()) pooled_left += e.at("encoding") == "pooled";
    pools_lost_a_user += pooled_left < 12;
    const RunResult cm = run_tool({"-q", "convert", pruned.string(), expanded.string(), "--materialize"});
    ASSERT_EQ(cm.exit_code, 0) << cm.describe();
    EXPECT_EQ(first_difference(read_tensors(expanded), read_tensors(reference)), "");
  }
  EXPECT_GT(pools_lost_a_user, 0);
}

TEST_F(Share, Refusals) {
  const fs::path out = *tmp_ / "refused";
  expect_clean_failure(share(out, "0.7"), "--share: expected a share of expert parameters in [0, 0.5]");
  EXPECT_FALSE(fs::exists(out));
  const fs::path one = *tmp_ / "one";
  write_synth(make_synth("mixtral", {.layers = 1}), one, {.tokenizer = true});
  RunResult r = run_tool({"-q", "calibrate", one.string(), "--text", kCalib.string(), "--ctx", "32", "--windows", "2", "-o",
                          (*tmp_ / "one.safetensors").string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  r = run_tool({"-q", "share", one.string(), out.string(), "--stats", (*tmp_ / "one.safetensors").string(), "--share", "0.25"});
  expect_clean_failure(r, "needs at least two MoE layers, found 1");
  EXPECT_FALSE(fs::exists(out));
  // A pooled down projection naming a gate tensor ([I, H] for [H, I]): refused when read.
  const fs::path bad = *tmp_ / "bad-pool";
  ASSERT_EQ(share(bad, "0.25").exit_code, 0);
  json cfg = read_json(bad / "config.json");
  json& w = cfg["quantization_config"]["weights"];
  std::string down, gate;
  for (const auto& [name, e] : w.items())
    if (e["encoding"] == "pooled") (name.ends_with("w2.weight") ? down : gate) = name;
  w[down]["parts"]["weight"] = w[gate]["parts"]["weight"];
  write_file(bad / "config.json", cfg.dump());
  expect_clean_failure(run_tool({"-q", "inspect", bad.string()}), "shape [16, 32] but config");
  // Stats of another model.
  r = run_tool({"-q", "share", one.string(), out.string(), "--stats", stats().string(), "--share", "0.25"});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_EQ(r.err_lines().size(), 1u) << r.describe();
  EXPECT_FALSE(fs::exists(out));
}

// The recipe pass {"pass": "share", "method": "pairs"} (moe-tool run) writes what the command
// writes, tensor for tensor, reports the pools under "plans", evaluates the output, and runs alone.
TEST_F(Share, RecipePassWritesWhatTheCommandWrites) {
  const fs::path cmd = *tmp_ / "recipe-cmd", out = *tmp_ / "recipe-out", recipe = *tmp_ / "share.json";
  ASSERT_EQ(share(cmd, "0.25").exit_code, 0);
  json rj = {{"model", in().string()},
             {"calibration", {{"stats", stats().string()}}},
             {"passes", json::array({{{"pass", "share"}, {"method", "pairs"}, {"share", 0.25}}})},
             {"output", {{"path", out.string()}}},
             {"eval", {{"text", kHeldout.string()}, {"ctx", 32}, {"max_windows", 2}}}};
  write_file(recipe, rj.dump());
  const RunResult dry = run_tool({"-q", "run", recipe.string(), "--dry-run"});
  ASSERT_EQ(dry.exit_code, 0) << dry.describe();
  EXPECT_FALSE(fs::exists(out));
  const RunResult r = run_tool({"-q", "run", recipe.string(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(first_difference(read_tensors(out), read_tensors(cmd)), "");
  EXPECT_EQ(read_json(out / "config.json")["quantization_config"], read_json(cmd / "config.json")["quantization_config"]);
  const json sum = json::parse(r.out);
  ASSERT_EQ(sum["plans"].size(), 1u) << r.out;
  EXPECT_EQ(sum["plans"][0]["pass"], "share");
  EXPECT_EQ(sum["plans"][0]["pools"].size(), 2u);
  EXPECT_EQ(sum["plans"][0]["pools"], read_json(cmd / "moe_tool_report.json")["share"]["pools"]);
  EXPECT_TRUE(sum["eval"].contains("kl_mean")) << r.out;
  EXPECT_GT(sum["eval"]["kl_mean"].get<double>(), 0.0);  // two experts per layer changed
  const RunResult text = run_tool({"-q", "run", recipe.string(), "--set", "output.path=" + (*tmp_ / "recipe-text").string(),
                                   "--set", "eval.max_windows=1"});
  ASSERT_EQ(text.exit_code, 0) << text.describe();
  EXPECT_NE(text.out.find("pools    2 experts pooled across adjacent layers"), std::string::npos) << text.out;
  // Alone in its recipe, a budget in range, statistics with out_mean: refused before any work.
  const fs::path refused = *tmp_ / "recipe-refused";
  json two = rj;
  two["output"]["path"] = refused.string();
  two["passes"].push_back({{"pass", "prune"}, {"method", "frequency"}, {"keep", 3}});
  write_file(recipe, two.dump());
  expect_clean_failure(run_tool({"-q", "run", recipe.string()}), "passes[0]: pass share changes the whole model before the layer loop");
  json big = rj;
  big["output"]["path"] = refused.string();
  big["passes"][0]["share"] = 0.7;
  write_file(recipe, big.dump());
  expect_clean_failure(run_tool({"-q", "run", recipe.string()}), "passes[0].share");
  EXPECT_FALSE(fs::exists(refused));
  // An export format has no pooled weight: refused by the plan (a dry run too), before calibration.
  json gguf = rj;
  gguf["output"] = {{"path", (*tmp_ / "recipe.gguf").string()}, {"format", "gguf"}, {"type", "q8_0"}};
  write_file(recipe, gguf.dump());
  for (const bool dry_run : {true, false}) {
    std::vector<std::string> args = {"-q", "run", recipe.string()};
    if (dry_run) args.push_back("--dry-run");
    expect_clean_failure(run_tool(args), "output.format gguf: passes[0] (share) pools experts across layers");
    EXPECT_FALSE(fs::exists(*tmp_ / "recipe.gguf"));
  }
  // output.materialize writes each layer's copy: the stored figure says so.
  json mat = rj;
  mat["output"] = {{"path", (*tmp_ / "recipe-mat").string()}, {"materialize", true}};
  mat.erase("eval");
  write_file(recipe, mat.dump());
  const RunResult m = run_tool({"-q", "run", recipe.string(), "--json"});
  ASSERT_EQ(m.exit_code, 0) << m.describe();
  const json ms = json::parse(m.out);
  EXPECT_EQ(ms["plans"][0]["expert_params_stored"], ms["plans"][0]["expert_params_logical"]) << m.out;
  EXPECT_TRUE(ms["plans"][0]["materialized"].get<bool>());
  EXPECT_FALSE(read_json(*tmp_ / "recipe-mat" / "config.json").contains("quantization_config"));
  // A budget that is not a number names the value given.
  expect_clean_failure(share(*tmp_ / "nan", "nan"), "found nan");
}

}  // namespace
}  // namespace moe::test
