// `moe-tool sweep` on the trained mixtral-tiny fixture, a 2 x 2 sweep with tiny windows: every cell
// in the table, each cell's numbers equal to `moe-tool run` of the same recipe plus `eval
// --against`, the Pareto front exactly the non-dominated cells, a second run cached with the same
// table, and bad flags refused before any work.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <set>

#include "support/paths.h"
#include "support/cli_expect.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;


std::vector<std::string> sweep_args(const fs::path& out) {
  return {"-q", "sweep", kModel.string(), "--text", kCalib, "--eval", kHeldout, "--methods", "prune:reap,quantize:rtn",
          "--budgets", "prune=0.75,0.5", "--budgets", "quantize=int4,int2", "--ctx", "64", "--windows", "4",
          "--eval-ctx", "64", "--eval-max-windows", "4", "--out", out.string(), "--json"};
}

struct Sweep {
  TempDir tmp{"moe-sweep"};
  fs::path out = tmp / "sw";
  json first, second;
};

const Sweep& sweep() {
  static Sweep s;
  static const bool ran = [] {
    RunResult r = run_tool(sweep_args(s.out));
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    s.first = json::parse(r.out);
    r = run_tool(sweep_args(s.out));
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    s.second = json::parse(r.out);
    return true;
  }();
  (void)ran;
  return s;
}

TEST(Sweep, TableHasEveryCellAndSweepJsonAndPlot) {
  MOE_SKIP_UNDER_SANITIZERS();  // end to end over every cell; the cache and flag tests run there
  const auto& s = sweep();
  std::set<std::string> names;
  for (const auto& c : s.first.at("cells")) names.insert(c.at("name").get<std::string>());
  EXPECT_EQ(names, (std::set<std::string>{"prune-reap-0.75", "prune-reap-0.5", "quantize-rtn-int4", "quantize-rtn-int2"}));
  EXPECT_EQ(read_json(s.out / "sweep.json").at("cells"), s.second.at("cells"));  // the last run's
  const std::string svg = read_file(s.out / "sweep.svg");
  EXPECT_EQ(svg.rfind("<?xml", 0), 0u);
  for (const auto& n : names) EXPECT_NE(svg.find(n), std::string::npos) << n;
  // One calibration, shared by the cells that read statistics (prune).
  EXPECT_TRUE(fs::exists(s.out / "stats.safetensors"));
  EXPECT_EQ(s.first.at("cells")[0].at("output"), (s.out / "cells/prune-reap-0.75/model").string());
}

// Independent check: the same recipe through `moe-tool calibrate` + `prune` / `quantize` and `eval
// --against`, written by hand here, gives each cell's bytes, perplexities, KL and top-1.
TEST(Sweep, CellsEqualOnePassCommandsAndEvalAgainst) {
  MOE_SKIP_UNDER_SANITIZERS();  // end to end over every cell; the cache and flag tests run there
  const auto& s = sweep();
  TempDir tmp{"moe-sweep-check"};
  const fs::path stats = tmp / "stats.safetensors";
  RunResult r = run_tool({"-q", "calibrate", kModel.string(), "--text", kCalib, "--ctx", "64", "--windows", "4", "-o",
                          stats.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const std::map<std::string, std::vector<std::string>> cmds = {
      {"prune-reap-0.5", {"prune", "--method", "reap", "--keep-ratio", "0.5", "--stats", stats.string()}},
      {"quantize-rtn-int2", {"quantize", "--method", "rtn", "--codec", "int2"}}};
  for (const auto& [name, cmd] : cmds) {
    const fs::path out = tmp / name;
    std::vector<std::string> args = {"-q", cmd[0], kModel.string(), out.string()};
    args.insert(args.end(), cmd.begin() + 1, cmd.end());
    for (const std::string a : {"--text", kCalib.c_str()}) args.push_back(a);
    for (const std::string a : {"--ctx", "64", "--windows", "4"}) args.push_back(a);
    r = run_tool(args);
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    r = run_tool({"-q", "eval", out.string(), "--against", kModel.string(), "--text", kHeldout, "--ctx", "64",
                  "--max-windows", "4", "--json"});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    const json ev = json::parse(r.out);
    const json rep = read_json(out / "moe_tool_report.json");
    json cell;
    for (const auto& c : s.first.at("cells"))
      if (c.at("name") == name) cell = c;
    ASSERT_FALSE(cell.is_null()) << name;
    EXPECT_EQ(cell.at("bytes"), rep.at("bytes").at("after")) << name;
    EXPECT_DOUBLE_EQ(cell.at("bits_per_param").get<double>(),
                     8.0 * rep.at("bytes").at("after").get<double>() / rep.at("params").at("before").get<double>());
    EXPECT_NEAR(cell.at("kl_mean").get<double>(), ev.at("kl_mean").get<double>(), 1e-9) << name << " " << ev.dump();
    EXPECT_NEAR(cell.at("top1_agreement").get<double>(), ev.at("top1_agreement").get<double>(), 1e-12) << name;
    EXPECT_NEAR(cell.at("perplexity_after").get<double>(), ev.at("perplexity").get<double>(),
                1e-9 * ev.at("perplexity").get<double>())
        << name << " " << ev.dump();
  }
}

TEST(Sweep, ParetoFrontIsExactlyTheNonDominatedCells) {
  MOE_SKIP_UNDER_SANITIZERS();  // end to end over every cell; the cache and flag tests run there
  const auto& cells = sweep().first.at("cells");
  for (const auto& [key, flag] : std::vector<std::pair<std::string, std::string>>{{"ppl_ratio", "pareto_ppl"}, {"kl_mean", "pareto_kl"}}) {
    int on_front = 0;
    for (const auto& a : cells) {
      bool dominated = false;
      for (const auto& b : cells) {
        const int64_t ab = a.at("bytes"), bb = b.at("bytes");
        const double aq = a.at(key), bq = b.at(key);
        dominated = dominated || (bb <= ab && bq <= aq && (bb < ab || bq < aq));
      }
      EXPECT_EQ(a.at(flag).get<bool>(), !dominated) << a.at("name") << " " << key;
      on_front += !dominated;
    }
    EXPECT_GE(on_front, 1);
    EXPECT_LT(on_front, static_cast<int>(cells.size())) << "a front of every cell checks nothing";
  }
}

TEST(Sweep, SecondRunRecomputesNothingAndGivesTheSameTable) {
  const auto& s = sweep();
  ASSERT_EQ(s.first.at("cells").size(), s.second.at("cells").size());
  EXPECT_FALSE(s.first.at("statistics").at("cached").get<bool>());
  EXPECT_TRUE(s.second.at("statistics").at("cached").get<bool>());
  for (size_t i = 0; i < s.first.at("cells").size(); ++i) {
    json a = s.first.at("cells")[i], b = s.second.at("cells")[i];
    EXPECT_FALSE(a.at("cached").get<bool>());
    EXPECT_TRUE(b.at("cached").get<bool>());
    a.erase("cached");
    b.erase("cached");
    EXPECT_EQ(a, b);
  }
}

TEST(Sweep, ChangedParametersRecomputeOnlyTheirCells) {
  const auto& s = sweep();
  TempDir tmp{"moe-sweep-resume"};
  const fs::path out = tmp / "sw";
  fs::copy(s.out, out, fs::copy_options::recursive);
  auto args = sweep_args(out);
  // quantize int2 -> int3: the prune cells and int4 stay cached, int3 is computed.
  for (auto& a : args)
    if (a == "quantize=int4,int2") a = "quantize=int4,int3";
  const RunResult r = run_tool(args);
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json report = json::parse(r.out);  // a range-for over .at() of a temporary reads freed memory
  ASSERT_EQ(report.at("cells").size(), 4u);
  for (const auto& c : report.at("cells")) {
    // The copied folder keeps its cells (the cache key names the folder's files relative to it),
    // and a cached row points into the folder it is read from.
    EXPECT_EQ(c.at("cached").get<bool>(), c.at("name") != "quantize-rtn-int3") << c.at("name");
    EXPECT_EQ(c.at("output").get<std::string>(), (out / "cells" / c.at("name").get<std::string>() / "model").string());
  }
}

TEST(Sweep, GateExitsThreeWhenNoCellIsWithinIt) {
  const auto& s = sweep();
  TempDir tmp{"moe-sweep-gate"};
  const fs::path out = tmp / "sw";
  fs::copy(s.out, out, fs::copy_options::recursive);
  auto args = sweep_args(out);
  args.push_back("--max-ppl-ratio");
  args.push_back("1.0001");
  RunResult r = run_tool(args);
  EXPECT_EQ(r.exit_code, 3) << r.describe();
  EXPECT_NE(r.err.find("--max-ppl-ratio"), std::string::npos) << r.describe();
  args.back() = "1.2";
  r = run_tool(args);
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  const json report = json::parse(r.out);
  ASSERT_EQ(report.at("cells").size(), 4u);
  for (const auto& c : report.at("cells"))
    EXPECT_EQ(c.at("gate_passed").get<bool>(), c.at("ppl_ratio").get<double>() <= 1.2) << c.at("name");
}

TEST(Sweep, BadFlagsRefusedBeforeAnyWork) {
  TempDir tmp{"moe-sweep-bad"};
  const fs::path out = tmp / "sw";
  auto with = [&](const std::string& flag, const std::string& value) {
    auto a = sweep_args(out);
    a.pop_back();  // --json
    for (size_t i = 0; i + 1 < a.size(); ++i)
      if (a[i] == flag) {
        a[i + 1] = value;
        return a;
      }
    a.push_back(flag);
    a.push_back(value);
    return a;
  };
  const std::vector<std::tuple<std::string, std::string, std::string>> bad = {
      {"--methods", "prune", "--methods prune"},
      {"--methods", "shrink:reap", "unknown pass 'shrink'"},
      {"--methods", "prune:nosuch", "nosuch"},
      {"--methods", "quantize:rtn:int5", "int5"},
      {"--budgets", "prune=1.5", "--budgets prune=1.5"},
      {"--budgets", "prune=", "--budgets prune="},
      {"--budgets", "cut=0.5", "--budgets cut=0.5"},
      {"--ctx", "0", "--ctx"},
      {"--max-ppl-ratio", "-1", "--max-ppl-ratio"},
      {"--eval", (tmp / "missing.txt").string(), "missing.txt"},
      {"--out", kModel.string(), kModel.string()},
      {"--out", (kModel / "sw").string(), "sw"},
  };
  for (const auto& [flag, value, needle] : bad) {
    const RunResult r = run_tool(with(flag, value));
    expect_clean_failure(r, needle);
    EXPECT_FALSE(fs::exists(out)) << flag << " " << value;
    EXPECT_FALSE(fs::exists(kModel / "sw")) << flag << " " << value;
  }
  // A folder that is not a sweep's is not written into.
  fs::create_directories(tmp / "other");
  write_file(tmp / "other" / "keep.txt", "x");
  expect_clean_failure(run_tool(with("--out", (tmp / "other").string())), "not a sweep folder");
  EXPECT_FALSE(fs::exists(tmp / "other" / "cells"));
}

}  // namespace
}  // namespace moe::test
