// Task subsets (docs/tasks.md): `prune --tasks` keeps, per task, exactly the experts a prune on
// that task's statistics keeps, writes their union, and records the keep-maps; `eval --task`
// (routing masked to the task's experts) equals eval of `convert --task`'s output, which is
// byte-for-byte the checkpoint a prune on that task's statistics writes; bad inputs are refused
// with one line and nothing written.
#include <fstream>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "support/cli_expect.h"
#include "support/paths.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// Two tasks: the first and the second half of the calibration text's paragraphs, each with its
// own stats file (ctx 64, 4 windows: fast), and the shared checkpoint of frequency --keep 3.
struct TaskFixture {
  TempDir tmp{"moe-tasks"};
  fs::path text_a = tmp / "a.txt", text_b = tmp / "b.txt", stats_a = tmp / "a.st", stats_b = tmp / "b.st";
  fs::path shared = tmp / "shared";
  fs::path model;
  TaskFixture(const fs::path& m, const std::string& method, const std::string& keep) : model(m) {
    const std::string text = read_file(kCalib);
    size_t mid = text.find("\n\n", text.size() / 2);
    write_file(text_a, text.substr(0, mid));
    write_file(text_b, text.substr(mid + 2));
    for (const auto& [t, s] : {std::pair{text_a, stats_a}, std::pair{text_b, stats_b}}) {
      const RunResult r = run_tool({"-q", "calibrate", model.string(), "--text", t.string(), "--ctx", "64", "--windows",
                                    "4", "-o", s.string()});
      EXPECT_EQ(r.exit_code, 0) << r.describe();
    }
    const RunResult r = run_tool({"-q", "prune", model.string(), shared.string(), "--method", method, "--keep", keep,
                                  "--tasks", "code=" + stats_a.string() + ",prose=" + stats_b.string()});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
  }
  std::string tasks_flag() const { return "code=" + stats_a.string() + ",prose=" + stats_b.string(); }
};

const TaskFixture& mixtral_tasks() {
  static const TaskFixture f(kModel, "frequency", "3");
  return f;
}

double eval_nll(const std::vector<std::string>& extra, const fs::path& model) {
  std::vector<std::string> args = {"-q", "eval", model.string(), "--text", kHeldout.string(), "--ctx", "64",
                                   "--max-windows", "3", "--json"};
  args.insert(args.end(), extra.begin(), extra.end());
  const RunResult r = run_tool(args);
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  return r.exit_code == 0 ? json::parse(r.out).at("nll_sum").get<double>() : NAN;
}

std::vector<int> ints(const json& j) { return j.get<std::vector<int>>(); }

TEST(TaskSubsets, UnionIsTheUnionOfSeparatePrunesKeepSets) {
  const TaskFixture& f = mixtral_tasks();
  const json sec = read_json(f.shared / "moe_tool_report.json").at("tasks");
  EXPECT_EQ(sec.at("names"), json({"code", "prose"}));
  std::map<std::string, json> separate;
  for (const auto& [name, stats] : {std::pair{"code", f.stats_a}, std::pair{"prose", f.stats_b}}) {
    const fs::path out = f.tmp / (std::string("sep-") + name);
    const RunResult r = run_tool({"-q", "prune", kModel.string(), out.string(), "--method", "frequency", "--keep", "3",
                                  "--stats", stats.string()});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    separate[name] = read_json(out / "moe_tool_report.json").at("layers");
  }
  size_t widest = 0, differing = 0;
  for (const auto& l : sec.at("layers")) widest = std::max(widest, l.at("union").get<size_t>());
  ASSERT_EQ(sec.at("layers").size(), 4u);
  for (size_t i = 0; i < sec.at("layers").size(); ++i) {
    const json& l = sec.at("layers")[i];
    std::set<int> u;
    for (const auto& name : {"code", "prose"}) {
      const std::vector<int> kept = ints(separate[name][i].at("passes")[0].at("kept"));
      EXPECT_EQ(ints(l.at("keep_source").at(name)), kept) << "layer " << i << " task " << name;
      u.insert(kept.begin(), kept.end());
      // The written-expert indices point at the same source experts.
      const std::vector<int> written = ints(l.at("experts"));
      std::vector<int> via;
      for (int w : ints(l.at("keep").at(name))) via.push_back(written.at(static_cast<size_t>(w)));
      EXPECT_EQ(via, kept) << "layer " << i << " task " << name;
    }
    differing += ints(l.at("keep_source").at("code")) != ints(l.at("keep_source").at("prose"));
    EXPECT_EQ(l.at("union").get<size_t>(), u.size()) << "layer " << i;
    // Written: the union, then padding up to the widest union (equal counts for stock loaders).
    const std::vector<int> written_v = ints(l.at("experts")), padding_v = ints(l.at("padding"));
    const std::set<int> written(written_v.begin(), written_v.end()), padding(padding_v.begin(), padding_v.end());
    EXPECT_EQ(written.size(), widest) << "layer " << i;
    for (int e : u) EXPECT_TRUE(written.count(e)) << "layer " << i << " expert " << e;
    EXPECT_EQ(written.size(), u.size() + padding.size()) << "layer " << i;
  }
  EXPECT_GT(differing, 0u) << "the two tasks keep the same experts everywhere: the test shows nothing";
  EXPECT_EQ(read_json(f.shared / "config.json").at("num_local_experts").get<size_t>(), widest);
}

TEST(TaskSubsets, ConvertTaskWritesThePruneOfThatTasksStatsByteForByte) {
  const TaskFixture& f = mixtral_tasks();
  const fs::path conv = f.tmp / "convert-code", sep = f.tmp / "prune-code";
  RunResult r = run_tool({"-q", "convert", f.shared.string(), conv.string(), "--task", "code"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  r = run_tool({"-q", "prune", kModel.string(), sep.string(), "--method", "frequency", "--keep", "3", "--stats",
                f.stats_a.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_TRUE(read_file(conv / "model.safetensors") == read_file(sep / "model.safetensors"));
  EXPECT_EQ(read_json(conv / "config.json"), read_json(sep / "config.json"));
  // Its report maps its experts to the source's: eval --against the source agrees as the prune's does.
  const json origin = read_json(conv / "moe_tool_report.json").at("layers")[0].at("origin");
  const json sep_origin = read_json(sep / "moe_tool_report.json").at("layers")[0].at("origin");
  EXPECT_EQ(origin, sep_origin);
}

TEST(TaskSubsets, EvalTaskEqualsEvalOfConvertTaskAndDiffersFromAllExperts) {
  const TaskFixture& f = mixtral_tasks();
  const fs::path conv = f.tmp / "convert-prose";
  const RunResult r = run_tool({"-q", "convert", f.shared.string(), conv.string(), "--task", "prose"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const double masked = eval_nll({"--task", "prose"}, f.shared), subset = eval_nll({}, conv), all = eval_nll({}, f.shared);
  EXPECT_NEAR(masked, subset, 1e-9 * std::abs(subset));
  EXPECT_GT(std::abs(masked - all), 1e-3 * std::abs(all)) << "the mask changed nothing";
}

// qwen2_moe with norm_topk_prob false: the top-k weights are the softmax over every expert's
// logits, so the mask must apply before the softmax for the shared checkpoint to equal the subset.
TEST(TaskSubsets, MaskBeforeSoftmaxWithoutRenormalisation) {
  MOE_SKIP_UNDER_SANITIZERS();
  const TaskFixture f(kSrc / "data/models/qwen2moe-tiny", "soft", "4");
  const fs::path conv = f.tmp / "convert-code";
  const RunResult r = run_tool({"-q", "convert", f.shared.string(), conv.string(), "--task", "code"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const double masked = eval_nll({"--task", "code"}, f.shared), subset = eval_nll({}, conv);
  EXPECT_NEAR(masked, subset, 1e-9 * std::abs(subset));
}

// deepseek_v3: sigmoid scores, the correction bias in the choice, group-limited routing. A pruned
// checkpoint is written with n_group 1, so the mask equals the subset; when the tasks keep every
// expert the config keeps n_group 4, and eval --task refuses (masking within groups is not the subset).
TEST(TaskSubsets, DeepSeekV3MaskEqualsSubsetAndGroupRoutingIsRefused) {
  MOE_SKIP_UNDER_SANITIZERS();
  const fs::path ds = kSrc / "data/deepseek-v3-tiny";
  const TaskFixture f(ds, "soft", "4");
  ASSERT_EQ(read_json(f.shared / "config.json").at("n_group").get<int>(), 1);
  const fs::path conv = f.tmp / "convert-code";
  RunResult r = run_tool({"-q", "convert", f.shared.string(), conv.string(), "--task", "code"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const double masked = eval_nll({"--task", "code"}, f.shared), subset = eval_nll({}, conv);
  EXPECT_NEAR(masked, subset, 1e-9 * std::abs(subset));
  const fs::path all = f.tmp / "keep-all";
  r = run_tool({"-q", "prune", ds.string(), all.string(), "--method", "soft", "--keep", "7", "--tasks", f.tasks_flag()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  ASSERT_EQ(read_json(all / "config.json").at("n_group").get<int>(), 4) << "the tasks' union no longer covers every expert";
  expect_clean_failure(run_tool({"-q", "eval", all.string(), "--task", "code", "--text", kHeldout.string(), "--ctx", "64",
                                 "--max-windows", "1"}),
                       "routes within n_group 4 expert groups");
}

TEST(TaskSubsets, PruneEvalReportsEachTaskAsEvalTaskDoes) {
  const TaskFixture& f = mixtral_tasks();
  const fs::path out = f.tmp / "with-eval";
  const RunResult r = run_tool({"-q", "prune", kModel.string(), out.string(), "--method", "frequency", "--keep", "3",
                                "--tasks", f.tasks_flag(), "--eval", kHeldout.string(), "--eval-ctx", "64",
                                "--eval-max-windows", "3", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json tasks = json::parse(r.out).at("eval").at("tasks");
  const RunResult e = run_tool({"-q", "eval", out.string(), "--task", "code", "--text", kHeldout.string(), "--ctx", "64",
                                "--max-windows", "3", "--json"});
  ASSERT_EQ(e.exit_code, 0) << e.describe();
  // Relative 1e-9: the run compares against the input, so it batches windows differently (last bits).
  const double alone = json::parse(e.out).at("perplexity").get<double>();
  EXPECT_NEAR(tasks.at("code").at("perplexity_after").get<double>(), alone, 1e-9 * alone);
  EXPECT_TRUE(tasks.at("prose").contains("kl_mean"));
}

// The recipe form calibrates each task on its own text: the same keep-maps as stats files made by
// `calibrate` with the same ctx and windows.
TEST(TaskSubsets, RecipeWithTaskTextsEqualsStatsFiles) {
  const TaskFixture& f = mixtral_tasks();
  const fs::path recipe = f.tmp / "tasks.json", out = f.tmp / "from-recipe";
  const json j = {{"model", kModel.string()},
                  {"calibration", {{"ctx", 64}, {"windows", 4},
                                   {"tasks", json::array({{{"name", "code"}, {"text", f.text_a.string()}},
                                                          {{"name", "prose"}, {"text", f.text_b.string()}}})}}},
                  {"passes", json::array({{{"pass", "prune"}, {"method", "frequency"}, {"keep", 3}}})},
                  {"output", {{"path", out.string()}}}};
  write_file(recipe, j.dump());
  const RunResult r = run_tool({"-q", "run", recipe.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json a = read_json(out / "moe_tool_report.json").at("tasks").at("layers");
  const json b = read_json(f.shared / "moe_tool_report.json").at("tasks").at("layers");
  EXPECT_EQ(a, b);
}

TEST(TaskSubsets, BadInputsAreRefusedWithOneLineAndNothingWritten) {
  const TaskFixture& f = mixtral_tasks();
  const fs::path out = f.tmp / "refused";
  auto prune = [&](const std::string& tasks, const std::string& method = "frequency") {
    return run_tool({"-q", "prune", kModel.string(), out.string(), "--method", method, "--keep", "3", "--tasks", tasks});
  };
  expect_clean_failure(prune("code=" + f.stats_a.string() + ",code=" + f.stats_b.string()), "task name 'code' given twice");
  EXPECT_FALSE(fs::exists(out));
  expect_clean_failure(prune("code=" + f.stats_a.string() + ",prose=" + (f.tmp / "missing.st").string()), "missing.st");
  EXPECT_FALSE(fs::exists(out));
  expect_clean_failure(prune("code=" + f.stats_a.string()), "at least two tasks");
  expect_clean_failure(prune(f.tasks_flag(), "search"), "method search");
  expect_clean_failure(run_tool({"-q", "prune", kModel.string(), out.string(), "--method", "reap", "--keep", "3",
                                 "--tasks", f.tasks_flag(), "--text", kCalib.string()}),
                       "each task brings its own statistics; drop --text");
  EXPECT_FALSE(fs::exists(out));
  // Statistics of another model (qwen2moe-tiny): its fingerprint differs.
  const fs::path other = f.tmp / "other.st";
  RunResult r = run_tool({"-q", "calibrate", (kSrc / "data/models/qwen2moe-tiny").string(), "--text", f.text_a.string(),
                          "--ctx", "64", "--windows", "2", "-o", other.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  expect_clean_failure(prune("code=" + f.stats_a.string() + ",prose=" + other.string()), "other.st: statistics were computed on model fingerprint");
  EXPECT_FALSE(fs::exists(out));
  // Unknown task names, in eval and convert: the known ones are named.
  expect_clean_failure(run_tool({"-q", "eval", f.shared.string(), "--task", "poetry", "--text", kHeldout.string()}),
                       "unknown task 'poetry' (tasks: code, prose)");
  expect_clean_failure(run_tool({"-q", "convert", f.shared.string(), out.string(), "--task", "poetry"}),
                       "unknown task 'poetry' (tasks: code, prose)");
  EXPECT_FALSE(fs::exists(out));
  // --task on a checkpoint without task subsets.
  expect_clean_failure(run_tool({"-q", "eval", kModel.string(), "--task", "code", "--text", kHeldout.string()}),
                       "has no task subsets");
  // A task section edited to keep fewer experts than each token is routed to: refused, naming the
  // report's JSON path (convert would otherwise write a checkpoint nothing reads).
  const fs::path edited = f.tmp / "edited";
  fs::copy(f.shared, edited, fs::copy_options::recursive);
  json report = read_json(edited / "moe_tool_report.json");
  report["tasks"]["layers"][0]["keep"]["code"] = json::array({1});
  std::ofstream(edited / "moe_tool_report.json") << report.dump();
  expect_clean_failure(run_tool({"-q", "convert", edited.string(), out.string(), "--task", "code"}),
                       "moe_tool_report.json: tasks.layers[0].keep.code: 1 experts, fewer than the 2");
  EXPECT_FALSE(fs::exists(out));
  // The section's experts_per_layer and its layer numbers are checked against the model's layers.
  for (const std::string what : {"experts_per_layer", "layer"}) {
    SCOPED_TRACE(what);
    const fs::path bad = f.tmp / ("edited-" + what);
    fs::copy(f.shared, bad, fs::copy_options::recursive);
    json rep = read_json(bad / "moe_tool_report.json");
    const int written = rep["tasks"]["experts_per_layer"].get<int>();
    if (what == "layer") rep["tasks"]["layers"][1]["layer"] = 9;
    else rep["tasks"]["experts_per_layer"] = written + 1;
    std::ofstream(bad / "moe_tool_report.json") << rep.dump();
    for (const auto& args : {std::vector<std::string>{"-q", "convert", bad.string(), out.string(), "--task", "code"},
                             std::vector<std::string>{"-q", "eval", bad.string(), "--task", "code", "--text", kHeldout.string()}})
      expect_clean_failure(run_tool(args), what == "layer"
                                               ? "moe_tool_report.json: tasks.layers[1].layer: 9 is not an MoE layer of the model (4 layers"
                                               : "layer 0 has " + std::to_string(written) + " experts, but " + bad.string() +
                                                     "/moe_tool_report.json: tasks.experts_per_layer is " + std::to_string(written + 1));
    EXPECT_FALSE(fs::exists(out));
  }
}

// A recipe's calibration.tasks errors start with the recipe file, as its other errors do.
TEST(TaskSubsets, RecipeTaskErrorsNameTheRecipeFile) {
  const TaskFixture& f = mixtral_tasks();
  const fs::path recipe = f.tmp / "bad-tasks.json", out = f.tmp / "bad-tasks-out";
  auto run_with = [&](const json& tasks, bool with_text) {
    json cal = {{"ctx", 64}, {"windows", 2}, {"tasks", tasks}};
    if (with_text) cal["text"] = kCalib.string();
    write_file(recipe, json{{"model", kModel.string()},
                            {"calibration", cal},
                            {"passes", json::array({{{"pass", "prune"}, {"method", "frequency"}, {"keep", 3}}})},
                            {"output", {{"path", out.string()}}}}
                           .dump());
    return run_tool({"-q", "run", recipe.string(), "--dry-run"});
  };
  const json good = json::array({{{"name", "code"}, {"stats", f.stats_a.string()}}, {{"name", "prose"}, {"stats", f.stats_b.string()}}});
  expect_clean_failure(run_with(good, true),
                       recipe.string() + ": calibration.tasks and calibration.text: each task brings its own statistics");
  json missing_text = good;
  missing_text[1] = {{"name", "prose"}, {"text", (f.tmp / "no-such.txt").string()}};
  expect_clean_failure(run_with(missing_text, false), recipe.string() + ": calibration.tasks prose: " + (f.tmp / "no-such.txt").string());
  json junk = good;
  write_file(f.tmp / "junk.st", "junk");
  junk[0] = {{"name", "code"}, {"stats", (f.tmp / "junk.st").string()}};
  expect_clean_failure(run_with(junk, false), recipe.string() + ": calibration.tasks code: " + (f.tmp / "junk.st").string());
  EXPECT_FALSE(fs::exists(out));
}

// --keep-ratio (uniform) plans per task as a single prune does: the same keep sets.
TEST(TaskSubsets, KeepRatioKeepsPerTaskWhatASinglePruneKeeps) {
  const TaskFixture& f = mixtral_tasks();
  const fs::path shared = f.tmp / "ratio-shared", sep = f.tmp / "ratio-prose";
  RunResult r = run_tool({"-q", "prune", kModel.string(), shared.string(), "--method", "soft", "--keep-ratio", "0.4",
                          "--tasks", f.tasks_flag()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  r = run_tool({"-q", "prune", kModel.string(), sep.string(), "--method", "soft", "--keep-ratio", "0.4", "--stats",
                f.stats_b.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json sec = read_json(shared / "moe_tool_report.json").at("tasks").at("layers");
  const json layers = read_json(sep / "moe_tool_report.json").at("layers");
  for (size_t i = 0; i < sec.size(); ++i) {
    EXPECT_EQ(sec[i].at("keep_source").at("prose"), layers[i].at("passes")[0].at("kept")) << "layer " << i;
    EXPECT_EQ(sec[i].at("keep_source").at("prose").size(), 3u) << "layer " << i;  // 0.4 of 8 is 3 (3.2)
  }
}

TEST(TaskSubsets, InspectListsTheTasks) {
  const TaskFixture& f = mixtral_tasks();
  const RunResult r = run_tool({"-q", "inspect", f.shared.string(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json t = json::parse(r.out).at("tasks");
  EXPECT_EQ(t.at("names"), json({"code", "prose"}));
  EXPECT_EQ(t.at("experts_per_layer").at("code"), json({3, 3, 3, 3}));
}

// A run that keeps every expert in place (quantize) carries the input's task subsets over: the
// report's "tasks" section is the input's and `eval --task` routes over the same experts; one that
// moves experts (another prune) drops them and says so in its notes.
TEST(TaskSubsets, QuantizeKeepsTheSubsetsAPruneDropsThemWithANote) {
  const TaskFixture& f = mixtral_tasks();
  TempDir tmp("moe-tasks-kept");
  const fs::path q = tmp / "q", p = tmp / "p";
  RunResult r = run_tool({"-q", "quantize", f.shared.string(), q.string(), "--method", "rtn", "--codec", "int8"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(read_json(q / "moe_tool_report.json").at("tasks"), read_json(f.shared / "moe_tool_report.json").at("tasks"));
  r = run_tool({"-q", "eval", q.string(), "--task", "code", "--text", kHeldout.string(), "--ctx", "64", "--max-windows", "2"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  r = run_tool({"-q", "prune", f.shared.string(), p.string(), "--method", "random", "--keep", "2", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json report = read_json(p / "moe_tool_report.json");
  EXPECT_FALSE(report.contains("tasks"));
  ASSERT_TRUE(report.contains("notes"));
  EXPECT_NE(report.at("notes").dump().find("task subsets"), std::string::npos) << report.at("notes");
  expect_clean_failure(run_tool({"-q", "eval", p.string(), "--task", "code", "--text", kHeldout.string()}), p.string());
}

}  // namespace
}  // namespace moe::test
