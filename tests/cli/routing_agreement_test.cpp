// `eval --against`'s routing agreement: a model against itself agrees everywhere; after a prune,
// layer 0 (where both models see the same input) agrees exactly on the tokens whose reference
// top-k held no pruned expert — computed here from the reference's own routing and the report's
// dropped list, not from eval's mapping; counts that differ with no origin say n/a; a malformed
// origin is refused naming the JSON path.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>

#include "eval/eval.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "runtime/forward.h"
#include "support/paths.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

const std::vector<std::string> kRaWindows = {"--ctx", "64", "--max-windows", "3", "--json"};

json ra_eval(const fs::path& model, const fs::path& ref) {
  std::vector<std::string> args = {"-q", "eval", model.string(), "--against", ref.string(), "--text", kHeldout.string()};
  args.insert(args.end(), kRaWindows.begin(), kRaWindows.end());
  const RunResult r = run_tool(args);
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  return json::parse(r.out);
}

// The pruned model shared by the tests below (random prune: dropped experts differ per layer).
const fs::path& ra_pruned() {
  static TempDir tmp{"moe-routing-agreement"};
  static const fs::path out = [] {
    const fs::path o = tmp / "pruned";
    const RunResult r = run_tool({"-q", "prune", kModel.string(), o.string(), "--method", "random", "--keep", "5"});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return o;
  }();
  return out;
}

class Layer0Routes : public runtime::Observer {
 public:
  bool wants_moe_trace() const override { return true; }
  void on_moe(int layer, const runtime::MoeTrace& t) override {
    if (layer == 0) ids = t.routing.ids;
  }
  runtime::IndexMatrix ids;
};

TEST(RoutingAgreement, AModelAgainstItselfAgreesEverywhere) {
  const json j = ra_eval(kModel, kModel);
  const json& ra = j.at("routing_agreement");
  EXPECT_EQ(ra.at("agreement").get<double>(), 1.0);
  EXPECT_EQ(ra.at("overlap").get<double>(), 1.0);
  EXPECT_EQ(ra.at("pairs").get<int64_t>(), 3 * 64 * 4);  // every token of 3 windows of 64, 4 MoE layers
  EXPECT_EQ(ra.at("expert_map"), "by index");
}

TEST(RoutingAgreement, AfterPruneLayerZeroAgreesExactlyWhereNoPrunedExpertWasChosen) {
  const fs::path& pruned = ra_pruned();
  const json j = ra_eval(pruned, kModel);
  const json& ra = j.at("routing_agreement");
  ASSERT_EQ(ra.at("expert_map"), "report origin") << ra.dump();

  // Independently: the reference's layer-0 choices on the same windows and the report's drops.
  const json report = json::parse(std::ifstream(pruned / "moe_tool_report.json"));
  const json& drops = report.at("layers").at(0).at("passes").at(0).at("dropped");
  ASSERT_EQ(drops.size(), 3u);
  const auto tok = eval::load_tokenizer(kModel);
  eval::EvalOptions eo;
  eo.ctx = 64;
  eo.max_windows = 3;
  const eval::Windows w = eval::make_windows(tok, eval::read_text(kHeldout), eo);
  auto ckpt = io::Checkpoint::open(io::Env::posix(), kModel);
  const auto model = model::Model::load(ckpt);
  runtime::Forward fwd(model);
  Layer0Routes obs;
  std::vector<runtime::Observer*> observers{&obs};
  fwd.run(w.tokens, w.ctx, observers);
  ASSERT_EQ(obs.ids.rows(), 3 * 64);
  int64_t clean = 0;
  for (int64_t n = 0; n < obs.ids.rows(); ++n) {
    bool hit = false;
    for (int64_t s = 0; s < obs.ids.cols(); ++s)
      for (const auto& d : drops) hit |= obs.ids(n, s) == d.get<int32_t>();
    clean += !hit;
  }
  const json& l0 = ra.at("layers").at(0);
  EXPECT_EQ(l0.at("layer"), 0);
  EXPECT_DOUBLE_EQ(l0.at("agreement").get<double>(), double(clean) / double(obs.ids.rows()));
  EXPECT_GT(clean, 0);
  EXPECT_LT(clean, obs.ids.rows());
  // Later layers see drifted inputs: agreement can only be lower on average than the clean share.
  EXPECT_LT(ra.at("agreement").get<double>(), 1.0);
  EXPECT_GE(ra.at("overlap").get<double>(), ra.at("agreement").get<double>());
}

TEST(RoutingAgreement, ARunsOwnEvalEqualsEvalAgainstItsInput) {
  // A merge (groups of experts) with the run's evaluation: the run matches experts through its own
  // origin, `eval --against` through the written report; same windows, same numbers.
  TempDir tmp{"moe-routing-agreement-run"};
  const fs::path out = tmp / "merged";
  const RunResult r = run_tool({"-q", "merge", kModel.string(), out.string(), "--method", "hcsmoe", "--experts", "5",
                                "--text", kCalib.string(), "--ctx", "64", "--windows", "8", "--eval", kHeldout.string(), "--eval-ctx", "64",
                                "--eval-max-windows", "3", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json run = json::parse(r.out).at("eval").at("routing_agreement");
  EXPECT_EQ(run.at("expert_map"), "run origin");
  const json cli = ra_eval(out, kModel).at("routing_agreement");
  EXPECT_EQ(cli.at("expert_map"), "report origin");
  EXPECT_EQ(run.at("pairs"), cli.at("pairs"));
  EXPECT_DOUBLE_EQ(run.at("agreement").get<double>(), cli.at("agreement").get<double>());
  EXPECT_DOUBLE_EQ(run.at("overlap").get<double>(), cli.at("overlap").get<double>());
  EXPECT_GT(run.at("agreement").get<double>(), 0.0);
  EXPECT_LT(run.at("agreement").get<double>(), 1.0);
}

TEST(RoutingAgreement, DifferentCountsWithoutOriginSayWhy) {
  TempDir tmp{"moe-routing-agreement-noorigin"};
  const fs::path copy = tmp / "m";
  fs::copy(ra_pruned(), copy);
  fs::remove(copy / "moe_tool_report.json");
  const json j = ra_eval(copy, kModel);
  const std::string why = j.at("routing_agreement").at("unavailable");
  EXPECT_NE(why.find("layer 0 has 5 experts, the reference 8"), std::string::npos) << why;
  EXPECT_TRUE(j.contains("kl_mean"));  // the rest of the comparison is still reported
}

TEST(RoutingAgreement, MalformedOriginIsRefusedNamingThePath) {
  TempDir tmp{"moe-routing-agreement-bad"};
  const fs::path copy = tmp / "m";
  fs::copy(ra_pruned(), copy);
  json report = json::parse(std::ifstream(copy / "moe_tool_report.json"));
  report["layers"][1]["origin"][2] = json::array({"x"});
  std::ofstream(copy / "moe_tool_report.json") << report.dump();
  const RunResult r = run_tool({"-q", "eval", copy.string(), "--against", kModel.string(), "--text", kHeldout.string(),
                                "--ctx", "64", "--max-windows", "1"});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_NE(r.err.find("moe_tool_report.json: layers[1].origin[2]"), std::string::npos) << r.err;
}

// A chain of runs (prune, then quantize int8 of the pruned model) evaluated against the original:
// the experts are matched through both reports (the quantize report's input is the pruned model,
// not the reference), so the agreement is the pruned model's up to int8 rounding; a second prune
// (random, other experts) composes too. A chain whose middle folder is gone gives no figure.
TEST(RoutingAgreement, ChainedRunsMatchThroughEveryReport) {
  const fs::path& pruned = ra_pruned();
  TempDir tmp("moe-routing-chain");
  const fs::path q = tmp / "q", qp = tmp / "qp", mid = tmp / "mid", end = tmp / "end";
  RunResult r = run_tool({"-q", "quantize", pruned.string(), q.string(), "--method", "rtn", "--codec", "int8"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json p = ra_eval(pruned, kModel).at("routing_agreement"), c = ra_eval(q, kModel).at("routing_agreement");
  EXPECT_EQ(c.at("expert_map"), "report chain") << c.dump();
  EXPECT_NEAR(c.at("overlap").get<double>(), p.at("overlap").get<double>(), 0.05) << c.dump() << p.dump();
  EXPECT_GT(c.at("overlap").get<double>(), 0.5) << c.dump();
  r = run_tool({"-q", "prune", q.string(), qp.string(), "--method", "random", "--keep", "4", "--seed", "7"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json qpj = ra_eval(qp, kModel).at("routing_agreement");
  EXPECT_EQ(qpj.at("expert_map"), "report chain");
  EXPECT_LE(qpj.at("overlap").get<double>(), c.at("overlap").get<double>() + 1e-9);
  // The middle of a chain removed: no figure, and why.
  fs::copy(pruned, mid, fs::copy_options::recursive);
  r = run_tool({"-q", "quantize", mid.string(), end.string(), "--method", "rtn", "--codec", "int8"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  fs::remove_all(mid);
  r = run_tool({"-q", "eval", end.string(), "--against", kModel.string(), "--text", kHeldout.string(), "--ctx", "64",
                "--max-windows", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("routing agreement: n/a"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("that folder is gone"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace moe::test
