// Recipes and the one-pass subcommands end to end through the CLI: every recipe in recipes/ runs,
// bad recipes are rejected before any work with the JSON path, outputs load back and carry the
// report with the keep-map.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "model/model.h"
#include "support/paths.h"
#include "support/run.h"

namespace fs = std::filesystem;
using nlohmann::json;
using moe::test::kSrc;

namespace {

fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("moe-recipes-test-" + std::to_string(getpid())) / name;
  fs::remove_all(p);
  fs::create_directories(p.parent_path());
  return p;
}

fs::path write_recipe(const std::string& name, const json& j) {
  fs::path p = temp_dir(name + ".json");
  std::ofstream(p) << j.dump(2);
  return p;
}

json small_recipe(const fs::path& out) {
  return {{"model", (kSrc / "data/models/qwen2moe-tiny").string()},
          {"calibration", {{"text", (kSrc / "data/text/calib.txt").string()}, {"ctx", 64}, {"windows", 4}}},
          {"passes", json::array({{{"pass", "prune"}, {"method", "reap"}, {"keep", 6}}})},
          {"output", {{"path", out.string()}}}};
}

void expect_rejected(const json& recipe, const std::string& needle) {
  const fs::path out = temp_dir("rejected-out");
  const auto r = moe::test::run_tool({"-q", "run", write_recipe("bad", recipe).string()});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  ASSERT_EQ(r.err_lines().size(), 1u) << r.describe();
  EXPECT_NE(r.err.find(needle), std::string::npos) << r.describe();
  EXPECT_TRUE(r.out.empty());
  EXPECT_FALSE(fs::exists(out));
}

}  // namespace

TEST(Recipes, EveryShippedRecipeValidatesAndPlans) {
  int n = 0;
  for (const auto& e : fs::directory_iterator(kSrc / "recipes")) {
    if (e.path().extension() != ".json") continue;
    ++n;
    // The dry run checks the output like a real run (its parent folder must exist): a fresh one.
    const fs::path out = temp_dir("dry-" + e.path().stem().string());
    const auto r = moe::test::run_tool(
        {"-q", "run", e.path().string(), "--dry-run", "--json", "--set", "output.path=" + out.string()});
    ASSERT_EQ(r.exit_code, 0) << e.path() << ": " << r.describe();
    EXPECT_FALSE(fs::exists(out));  // nothing written
    const json s = json::parse(r.out);
    EXPECT_TRUE(s.at("dry_run").get<bool>());
    const json recipe = json::parse(std::ifstream(e.path()));
    if (recipe.contains("upcycle")) continue;  // no passes: tests/cli/upcycle_test.cpp
    // Every recipe but a factorize-, quantize- or share-only one changes the expert count.
    bool changes = false;
    for (const auto& p : recipe.at("passes"))
      changes = changes || (p.at("pass") != "factorize" && p.at("pass") != "quantize" && p.at("pass") != "share");
    for (const auto& l : s.at("layers")) {
      if (changes) EXPECT_LT(l.at("experts_after").get<int>(), l.at("experts_before").get<int>());
      else EXPECT_EQ(l.at("experts_after").get<int>(), l.at("experts_before").get<int>());
    }
  }
  EXPECT_GE(n, 10);  // demo + one per method + a chain
}

TEST(Recipes, EveryShippedRecipeRuns) {
  MOE_SKIP_UNDER_SANITIZERS();
  for (const auto& e : fs::directory_iterator(kSrc / "recipes")) {
    if (e.path().extension() != ".json" || e.path().stem() == "demo") continue;
    if (json::parse(std::ifstream(e.path())).contains("upcycle")) continue;  // tests/cli/upcycle_test.cpp runs them
    const fs::path out = temp_dir("out-" + e.path().stem().string());
    // Fewer calibration and evaluation windows than the recipe asks, to keep the suite fast (the
    // evaluation of the whole held-out text took most of its time; the quality figures are the
    // benchmarks' work, not this test's).
    std::vector<std::string> args = {"-q", "run", e.path().string(), "--set", "output.path=" + out.string(),
                                     "--set", "calibration.windows=4", "--json"};
    if (json::parse(std::ifstream(e.path())).contains("eval")) {
      args.push_back("--set");
      args.push_back("eval.max_windows=2");
    }
    const auto r = moe::test::run_tool(args);
    ASSERT_EQ(r.exit_code, 0) << e.path() << ": " << r.describe();
    const auto ckpt = moe::io::Checkpoint::open(moe::io::Env::posix(), out);
    const auto m = moe::model::Model::load(ckpt);
    const json report = json::parse(std::ifstream(out / "moe_tool_report.json"));
    // The experts left: set by the last pass that changes the count ("keep" / "experts"); 8 when
    // only factorize runs.
    const json passes = json::parse(std::ifstream(e.path())).at("passes");
    int last = -1;
    size_t experts = 8;
    for (size_t i = 0; i < passes.size(); ++i)
      if (passes[i].contains("keep") || passes[i].contains("experts")) {
        last = static_cast<int>(i);
        experts = passes[i].value("keep", passes[i].value("experts", 8));
      }
    for (const auto& l : m.layers()) {
      ASSERT_TRUE(l.moe);
      EXPECT_EQ(l.moe->num_experts(), static_cast<int64_t>(experts)) << e.path();
      EXPECT_EQ(l.moe->router.dim(0), l.moe->num_experts());
    }
    // The keep-map: kept ids (prune) or groups (merge) of that pass for every layer, and the
    // origin of every written expert.
    for (const auto& lr : report.at("layers")) {
      EXPECT_EQ(lr.at("origin").size(), experts);
      if (last < 0) continue;
      const json& p = lr.at("passes").at(static_cast<size_t>(last));
      // merge dern keeps experts (its keep-map is "kept", like prune); the other merges report groups.
      if (passes[last].at("pass") == "prune" || passes[last].value("method", "") == "dern")
        EXPECT_EQ(p.at("kept").size(), experts) << p.dump();
      else EXPECT_EQ(p.at("groups").size(), experts) << p.dump();
    }
    fs::remove_all(out);
  }
}

TEST(Recipes, PruneKeepsTheExpertsTheReportNames) {
  const fs::path out = temp_dir("prune-keepmap");
  const auto r = moe::test::run_tool({"-q", "run", write_recipe("keepmap", small_recipe(out)).string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto in_ckpt = moe::io::Checkpoint::open(moe::io::Env::posix(), kSrc / "data/models/qwen2moe-tiny");
  const auto out_ckpt = moe::io::Checkpoint::open(moe::io::Env::posix(), out);
  const json report = json::parse(std::ifstream(out / "moe_tool_report.json"));
  for (const auto& lr : report.at("layers")) {
    const int l = lr.at("layer").get<int>();
    const auto kept = lr.at("passes").at(0).at("kept").get<std::vector<int>>();
    for (size_t j = 0; j < kept.size(); ++j) {
      const std::string a = "model.layers." + std::to_string(l) + ".mlp.experts." + std::to_string(kept[j]) + ".up_proj.weight";
      const std::string b = "model.layers." + std::to_string(l) + ".mlp.experts." + std::to_string(j) + ".up_proj.weight";
      const auto ta = in_ckpt.tensor(a), tb = out_ckpt.tensor(b);
      ASSERT_EQ(ta.nbytes(), tb.nbytes());
      EXPECT_EQ(0, std::memcmp(ta.data(), tb.data(), ta.nbytes())) << a << " vs " << b;
    }
    // Router rows: the kept rows, in order.
    const std::string g = "model.layers." + std::to_string(l) + ".mlp.gate.weight";
    const auto ra = in_ckpt.tensor(g), rb = out_ckpt.tensor(g);
    const size_t row = ra.nbytes() / static_cast<size_t>(ra.dim(0));
    for (size_t j = 0; j < kept.size(); ++j)
      EXPECT_EQ(0, std::memcmp(ra.data() + kept[j] * row, rb.data() + j * row, row));
  }
  const json cfg = json::parse(std::ifstream(out / "config.json"));
  EXPECT_EQ(cfg.at("num_experts").get<int>(), 6);
}

TEST(Recipes, BadRecipesAreRejectedWithTheJsonPath) {
  const fs::path out = temp_dir("rejected-out");
  json r = small_recipe(out);
  r["passes"][0]["keep"] = "six";
  expect_rejected(r, "passes[0].keep");
  r = small_recipe(out);
  r["passes"][0]["kep"] = 6;
  expect_rejected(r, "did you mean \"keep\"");
  r = small_recipe(out);
  r["passes"][0]["method"] = "reep";
  expect_rejected(r, "did you mean \"reap\"");
  r = small_recipe(out);
  r["passes"][0]["pass"] = "prunee";
  expect_rejected(r, "passes[0].pass");
  r = small_recipe(out);
  r["passes"][0]["keep"] = 1;  // fewer than experts per token (2)
  expect_rejected(r, "passes[0]");
  r = small_recipe(out);
  r["passes"][0]["keep"] = 9;  // more than exist (8)
  expect_rejected(r, "passes[0]");
  r = small_recipe(out);
  r["outptu"] = r["output"];
  expect_rejected(r, "outptu: unknown key for a recipe (allowed: model, seed, calibration, passes, output, eval, description); did you mean \"output\"?");
  r = small_recipe(out);
  r["calibration"]["ctx"] = "long";
  expect_rejected(r, "calibration.ctx: expected an integer");
  r = small_recipe(out);
  r["calibration"]["out_stride"] = 0;
  expect_rejected(r, "calibration.out_stride: expected an integer >= 1");
  r = small_recipe(out);
  r.erase("calibration");
  expect_rejected(r, "calibration");
  r = small_recipe(out);
  r["passes"] = json::array();
  expect_rejected(r, "passes: expected a non-empty list");
  r = small_recipe(out);
  r["calibration"]["txet"] = "x";
  expect_rejected(r, "calibration.txet: unknown key for calibration (allowed: text, stats, ctx, windows, "
                     "batch_windows, out_stride, propagate, sample, gram, routed_only, out_cos_tokens, memory_budget, tasks); did you mean "
                     "\"text\"?");
  r = small_recipe(out);
  r["output"].erase("path");
  expect_rejected(r, "output.path: missing (required)");
  r = small_recipe(out);
  r["model"] = 5;
  expect_rejected(r, "model: expected a non-empty string, found 5 (an integer)");
  r = small_recipe(out);
  r["eval"] = {{"text", "x.txt"}, {"ctx", 1}};
  expect_rejected(r, "eval.ctx: expected an integer >= 2, found 1");
  r = small_recipe(out);
  r["description"] = 3;
  expect_rejected(r, "description: expected a string, found 3");
  r = small_recipe(out);
  r["calibration"]["propagate"] = "yes";
  expect_rejected(r, "calibration.propagate: expected true or false, found \"yes\"");
}

TEST(Recipes, CalibrationOutStrideIsAccepted) {
  json r = small_recipe(temp_dir("stride-out"));
  r["calibration"]["out_stride"] = 1;  // the exact out_mean for statistics computed on the fly
  const auto d = moe::test::run_tool({"-q", "run", write_recipe("stride", r).string(), "--dry-run", "--json"});
  EXPECT_EQ(d.exit_code, 0) << d.describe();
}

// calibration.memory_budget: a size string or a whole number of bytes; the plan shows it.
TEST(Recipes, MemoryBudgetTakesASizeOrBytes) {
  for (const json& v : {json("2MB"), json(1000000)}) {
    json r = small_recipe(temp_dir("budget-out"));
    r["passes"] = json::array({{{"pass", "quantize"}, {"method", "gptq"}}});
    r["calibration"]["memory_budget"] = v;
    const auto d = moe::test::run_tool({"-q", "run", write_recipe("budget", r).string(), "--dry-run", "--json"});
    ASSERT_EQ(d.exit_code, 0) << d.describe();
    const json plan = json::parse(d.out);
    EXPECT_EQ(plan.at("memory").at("activation_budget"), v.is_string() ? 2000000 : 1000000) << d.out;
    EXPECT_EQ(plan.at("memory").at("source"), "calibration.memory_budget") << d.out;
  }
  for (const json& v : {json(-5), json(1.5), json("lots")}) {
    json r = small_recipe(temp_dir("budget-bad-out"));
    r["calibration"]["memory_budget"] = v;
    expect_rejected(r, "calibration.memory_budget");
  }
}

TEST(Recipes, SetOverridesAndMissingRecipe) {
  const auto missing = moe::test::run_tool({"run", "/nonexistent/recipe.json"});
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_NE(missing.err.find("/nonexistent/recipe.json"), std::string::npos);
  const fs::path out = temp_dir("set-out");
  const fs::path p = write_recipe("set", small_recipe(out));
  const auto r = moe::test::run_tool({"-q", "run", p.string(), "--set", "passes[0].keep=4", "--dry-run", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json report = json::parse(r.out);
  for (const auto& l : report.at("layers")) EXPECT_EQ(l.at("experts_after").get<int>(), 4);
  const auto bad = moe::test::run_tool({"run", p.string(), "--set", "passes[3].keep=4"});
  EXPECT_EQ(bad.exit_code, 2) << bad.describe();
}

TEST(Subcommands, MergeWithEvalReportsQuality) {
  const fs::path out = temp_dir("merge-eval");
  const auto r = moe::test::run_tool({"-q", "merge", (kSrc / "data/models/mixtral-tiny").string(), out.string(),
                                      "--method", "msmoe", "--experts", "6", "--text", (kSrc / "data/text/calib.txt").string(),
                                      "--ctx", "64", "--windows", "4", "--eval", (kSrc / "data/text/heldout.txt").string(),
                                      "--eval-ctx", "64", "--eval-max-windows", "4", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json s = json::parse(r.out);
  const json& e = s.at("eval");
  EXPECT_GT(e.at("perplexity_after").get<double>(), 1.0);
  EXPECT_GT(e.at("kl_mean").get<double>(), 0.0);  // 6 of 8 experts cannot be exact
  EXPECT_LT(e.at("top1_agreement").get<double>(), 1.0);
  EXPECT_GT(e.at("top1_agreement").get<double>(), 0.3);
  const json report = json::parse(std::ifstream(out / "moe_tool_report.json"));
  EXPECT_TRUE(report.contains("eval"));
  EXPECT_LT(report.at("bytes").at("after").get<double>(), report.at("bytes").at("before").get<double>());
}

namespace {

std::string read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST(Recipes, LaterPassSeesTheStatisticsOfTheExpertsLeft) {
  // A first pass that keeps every expert (random, keep 8 of 8) changes nothing, so a merge after it
  // must see exactly the statistics the merge sees as the only pass. Without propagation both
  // runs give each layer the input model's block inputs: the checkpoints are byte-identical.
  // Under the sanitizers one method (the code that hands statistics on is the same for all).
  const std::vector<std::string> methods =
      moe::test::under_sanitizers() ? std::vector<std::string>{"hcsmoe"} : std::vector<std::string>{"msmoe", "hcsmoe", "submoe"};
  for (const std::string& method : methods) {
    SCOPED_TRACE(method);
    const json merge = {{"pass", "merge"}, {"method", method}, {"experts", 4}, {"seed", 3}};
    std::vector<fs::path> outs;
    for (bool chained : {false, true}) {
      const fs::path out = temp_dir(std::string("chain-eq-") + method + (chained ? "-2" : "-1"));
      json r = small_recipe(out);
      r["calibration"]["propagate"] = false;
      r["output"]["dtype"] = "f32";
      r["passes"] = chained ? json::array({{{"pass", "prune"}, {"method", "random"}, {"keep", 8}}, merge}) : json::array({merge});
      const auto res = moe::test::run_tool({"-q", "run", write_recipe("chain-eq", r).string()});
      ASSERT_EQ(res.exit_code, 0) << res.describe();
      const json report = json::parse(std::ifstream(out / "moe_tool_report.json"));
      const json& last = report.at("layers").at(0).at("passes").back();
      EXPECT_EQ(last.contains("statistics"), chained) << last.dump();
      outs.push_back(out);
    }
    EXPECT_EQ(read_bytes(outs[0] / "model.safetensors"), read_bytes(outs[1] / "model.safetensors"));
    for (const auto& o : outs) fs::remove_all(o);
  }
}

TEST(Recipes, PruneThenMergeComposesTheKeepMap) {
  const fs::path out = temp_dir("prune-merge");
  json r = small_recipe(out);
  r["passes"] = json::array({{{"pass", "prune"}, {"method", "reap"}, {"keep", 6}},
                             {{"pass", "merge"}, {"method", "msmoe"}, {"experts", 4}}});
  const auto res = moe::test::run_tool({"-q", "run", write_recipe("prune-merge", r).string()});
  ASSERT_EQ(res.exit_code, 0) << res.describe();
  const auto m = moe::model::Model::load(moe::io::Checkpoint::open(moe::io::Env::posix(), out));
  for (const auto& l : m.layers()) EXPECT_EQ(l.moe->num_experts(), 4);
  const json report = json::parse(std::ifstream(out / "moe_tool_report.json"));
  for (const auto& lr : report.at("layers")) {
    const auto kept = lr.at("passes").at(0).at("kept").get<std::vector<int>>();
    const json& merge = lr.at("passes").at(1);
    // The merge groups the 6 experts the prune left (its own numbering 0..5), each exactly once.
    std::vector<int> seen;
    for (const auto& g : merge.at("groups"))
      for (const auto& e : g) seen.push_back(e.get<int>());
    std::sort(seen.begin(), seen.end());
    EXPECT_EQ(seen, (std::vector<int>{0, 1, 2, 3, 4, 5}));
    // origin: written expert j = Σ weight · input expert, the input ids among the kept ones.
    const json& origin = lr.at("origin");
    ASSERT_EQ(origin.size(), 4u);
    for (size_t j = 0; j < 4; ++j) {
      const json& g = merge.at("groups").at(j);
      ASSERT_EQ(origin[j].size(), g.size());
      double sum = 0;
      for (size_t i = 0; i < g.size(); ++i) {
        EXPECT_EQ(origin[j][i][0].get<int>(), kept.at(g[i].get<size_t>()));  // kept is ascending: order preserved
        EXPECT_DOUBLE_EQ(origin[j][i][1].get<double>(), merge.at("weights")[j][i].get<double>());
        sum += origin[j][i][1].get<double>();
      }
      EXPECT_NEAR(sum, 1.0, 1e-12);
    }
  }
  fs::remove_all(out);
}

TEST(Recipes, LaterPassLimitsAreRejectedBeforeAnyWork) {
  const fs::path out = temp_dir("rejected-out");
  json r = small_recipe(out);
  r["passes"].push_back({{"pass", "prune"}, {"method", "reap"}, {"keep_ratio", 0.5}});
  expect_rejected(r, "passes[1]: method 'reap' ranks experts across layers (keep_ratio)");
  // A later pass's statistics come from the calibration windows: a stats file alone is not enough.
  const fs::path stats = temp_dir("later.stats.safetensors");
  const auto c = moe::test::run_tool({"-q", "calibrate", (kSrc / "data/models/qwen2moe-tiny").string(), "--text",
                                      (kSrc / "data/text/calib.txt").string(), "--ctx", "64", "--windows", "4",
                                      "-o", stats.string()});
  ASSERT_EQ(c.exit_code, 0) << c.describe();
  r = small_recipe(out);
  r["calibration"] = {{"stats", stats.string()}};
  r["passes"].push_back({{"pass", "merge"}, {"method", "hcsmoe"}, {"experts", 4}});
  expect_rejected(r, "passes[1]: method 'hcsmoe' needs statistics of the experts left by the earlier passes");
  fs::remove(stats);
}

// ---- one vocabulary: every recipe key a command line can set has its flag in pipeline/keys.def ----

#include "core/error.h"
#include "pipeline/keys.h"
#include "pipeline/recipe.h"
#include "passes/pass.h"

namespace {

// The keys a recipe section accepts, from the "allowed: ..." list of an unknown-key error.
std::vector<std::string> allowed_keys(const json& recipe) {
  try {
    moe::pipeline::parse_recipe(recipe, ".", "t");
  } catch (const moe::core::Error& e) {
    const std::string m = e.message();
    const auto b = m.find("(allowed: ");
    if (b == std::string::npos) return {"<no allowed list in: " + m + ">"};
    const auto end = m.find(')', b);
    std::vector<std::string> keys;
    std::string list = m.substr(b + 10, end - b - 10);
    for (size_t i = 0; i <= list.size();) {
      size_t j = list.find(", ", i);
      if (j == std::string::npos) j = list.size();
      keys.push_back(list.substr(i, j - i));
      i = j + 2;
    }
    return keys;
  }
  return {"<no error>"};
}

bool table_has(const std::string& path, const std::string& command, const std::string& method) {
  for (const auto& k : moe::pipeline::recipe_keys())
    if (k.path == path && (method.empty() ? k.for_command(command) : k.for_method(command, method))) return true;
  return false;
}

}  // namespace

TEST(Vocabulary, EveryRecipeKeyHasItsFlag) {
  const json base = {{"model", "m"},
                     {"passes", {{{"pass", "prune"}, {"method", "random"}, {"keep", 1}}}},
                     {"output", {{"path", "o"}}}};
  // Sections: calibration (calibrate, prune, merge; memory_budget: factorize, quantize), output and
  // eval (prune, merge).
  for (const std::string section : {"calibration", "output", "eval"}) {
    json r = base;
    r[section] = {{"zz_unknown", 1}, {"text", "t"}, {"path", "o"}};
    const auto keys = allowed_keys(r);
    ASSERT_GT(keys.size(), 2u) << section << ": " << keys.front();
    for (const auto& k : keys) {
      if (section == "output" && k == "path") continue;  // the OUT argument
      const std::string command = section + "." + k == "calibration.memory_budget" ? "quantize" : "prune";
      EXPECT_TRUE(table_has(section + "." + k, command, "")) << section << "." << k << " has no flag in keys.def";
    }
  }
  // Every pass method's keys (the pass-level "seed" is the top-level --seed for one-pass commands).
  for (const auto& p : moe::pipeline::registered_passes()) {
    json r = base;
    r["passes"] = {{{"pass", p.pass}, {"method", p.method}, {"zz_unknown", 1}}};
    const auto keys = allowed_keys(r);
    ASSERT_GT(keys.size(), 2u) << p.pass << "/" << p.method << ": " << keys.front();
    for (const auto& k : keys) {
      if (k == "pass" || k == "method" || k == "seed") continue;
      EXPECT_TRUE(table_has("passes[0]." + k, p.pass, p.method))
          << p.pass << "/" << p.method << ": key " << k << " has no flag in keys.def";
    }
    // And the other way: every flag the table gives this method is a key the method accepts.
    for (const auto& k : moe::pipeline::recipe_keys()) {
      if (std::string(k.path).rfind("passes[0].", 0) != 0 || !k.for_method(p.pass, p.method)) continue;
      EXPECT_NE(std::find(keys.begin(), keys.end(), k.leaf()), keys.end())
          << p.pass << "/" << p.method << ": flag " << k.flag << " sets " << k.path << ", which the method does not take";
    }
  }
  // Recipe sections' keys that the table lists exist in the sections.
  for (const auto& k : moe::pipeline::recipe_keys()) {
    const std::string path = k.path;
    if (path.rfind("passes[0].", 0) == 0 || path == "seed") continue;
    const std::string section = path.substr(0, path.find('.'));
    json r = base;
    r[section] = {{"zz_unknown", 1}, {"text", "t"}, {"path", "o"}};
    const auto keys = allowed_keys(r);
    EXPECT_NE(std::find(keys.begin(), keys.end(), k.leaf()), keys.end()) << path << " is not a recipe key";
  }
}

// The defaults the table prints (--help, moe-tool list) are the passes' defaults.
TEST(Vocabulary, TableDefaultsAreThePassDefaults) {
  for (const auto& p : moe::pipeline::registered_passes()) {
    json spec = {{"pass", p.pass}, {"method", p.method}};
    if (std::string(p.pass) == "prune") spec["keep"] = 4;
    if (std::string(p.pass) == "merge") spec["experts"] = 4;
    if (std::string(p.pass) == "factorize") spec["ratio"] = 0.5;
    if (std::string(p.pass) == "share") spec["share"] = 0.25;
    const auto pass = moe::pipeline::make_pass(spec, "passes[0]");
    const json params = pass->params();
    for (const auto& k : moe::pipeline::recipe_keys()) {
      if (std::string(k.path).rfind("passes[0].", 0) != 0 || !k.for_method(p.pass, p.method) || !*k.dflt ||
          std::string(k.dflt) == "-")
        continue;
      if (!params.contains(k.leaf())) continue;  // e.g. damp only reported when whitening
      const json& v = params[k.leaf()];
      const std::string shown = v.is_string() ? v.get<std::string>() : v.dump();
      if (v.is_number_float())
        EXPECT_DOUBLE_EQ(v.get<double>(), std::stod(k.dflt)) << p.pass << "/" << p.method << " " << k.path;
      else
        EXPECT_EQ(shown, k.dflt) << p.pass << "/" << p.method << " " << k.path;
    }
  }
}
