// Robustness of the built moe-tool: non-finite numbers (weights and statistics) refused with the
// tensor and index before any number is computed from them, in every command that converts
// weights (calibrate, eval, prune, merge with each method); the output rules for every file the
// tool writes (stats files, plots), signals and stale temporaries; every check before any work
// (--dry-run runs them); messages that name what the user typed.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <nlohmann/json.hpp>
#include <thread>

#include "support/paths.h"
#include "support/ckpt_util.h"
#include "support/run.h"
#include "support/synth.h"

extern char** environ;

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

const std::string kW1 = "model.layers.0.block_sparse_moe.experts.0.w1.weight";

// A failure is exit 2 and exactly one line on stderr naming every part, nothing on stdout.
void expect_one_line_error(const RunResult& r, std::initializer_list<std::string> parts) {
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_EQ(r.out, "") << r.describe();
  EXPECT_EQ(r.err_lines().size(), 1u) << r.describe();
  for (const auto& p : parts) EXPECT_NE(r.err.find(p), std::string::npos) << "'" << p << "' not in: " << r.err;
}

// Names in `dir` that are temporaries of the tool.
std::vector<std::string> temps_in(const fs::path& dir) {
  std::vector<std::string> v;
  for (const auto& n : list_dir(dir))
    if (n.find("moe-tool-tmp") != std::string::npos) v.push_back(n);
  return v;
}

std::string bf16_nan() { return std::string("\xc0\x7f", 2); }
std::string f64_bytes(double d) {
  std::string s(8, '\0');
  std::memcpy(s.data(), &d, 8);
  return s;
}

class Robust : public ::testing::Test {
 protected:
  TempDir tmp{"moe-robust"};
  // mixtral-tiny with one NaN in layer 0 expert 0's w1 (element 2065: row 16, column 17) — same
  // fingerprint as the original, so the clean model's statistics are accepted: the structure is
  // the same and the element lies between the blocks a statistics file samples of a tensor this
  // size (io::Checkpoint::content_digests: 1 KiB at byte offsets 0, 21504, 43008, 64512 of 64 KiB).
  fs::path nan_model() {
    const fs::path d = tmp / "nan-model";
    if (!fs::exists(d)) {
      copy_folder(kModel, d);
      patch_tensor_bytes(d / "model.safetensors", kW1, 2 * 2065, bf16_nan());
    }
    return d;
  }
  // Statistics of the clean model (small: 8 windows of 32 tokens).
  fs::path clean_stats(bool gram = false) {
    const fs::path s = tmp / (gram ? "clean-gram.stats" : "clean.stats");
    if (!fs::exists(s)) {
      std::vector<std::string> a = {"calibrate", kModel.string(), "--text", kCalib.string(), "--ctx", "32",
                                    "--windows", "8", "-o", s.string(), "-q"};
      if (gram) a.push_back("--gram");
      const auto r = run_tool(a);
      EXPECT_EQ(r.exit_code, 0) << r.describe();
    }
    return s;
  }
};

// ------------------------------------------------------------------ non-finite numbers

TEST_F(Robust, NonFiniteWeightsRefusedByEveryCommandThatConvertsThem) {
  const fs::path m = nan_model();
  const std::vector<std::string> where = {m.string(), "tensor " + kW1, "layer 0", "expert 0", "gate",
                                          "non-finite value nan at index 2065 (row 16, column 17)"};
  auto expect_nan_error = [&](const RunResult& r) {
    EXPECT_EQ(r.exit_code, 2) << r.describe();
    EXPECT_EQ(r.out, "");
    EXPECT_EQ(r.err_lines().size(), 1u) << r.describe();
    for (const auto& p : where) EXPECT_NE(r.err.find(p), std::string::npos) << p << " not in: " << r.err;
  };
  // calibrate (used to write NaN scores and exit 0): refused, nothing written.
  // (-q: the plan line calibrate prints before the forward starts is not part of the error.)
  expect_nan_error(run_tool({"calibrate", m.string(), "--text", kCalib.string(), "--ctx", "32", "--windows", "4", "-o",
                             (tmp / "nan.stats").string(), "-q"}));
  EXPECT_FALSE(fs::exists(tmp / "nan.stats"));
  // eval (used to print perplexity nan), eval --against in both directions (used to say KL 0).
  expect_nan_error(run_tool({"eval", m.string(), "--text", kHeldout.string(), "--ctx", "32", "--max-windows", "2"}));
  expect_nan_error(run_tool({"eval", m.string(), "--text", kHeldout.string(), "--ctx", "32", "--max-windows", "2",
                             "--against", kModel.string()}));
  expect_nan_error(run_tool({"eval", kModel.string(), "--text", kHeldout.string(), "--ctx", "32", "--max-windows",
                             "2", "--against", m.string()}));
  // Every merge method (hcsmoe used to segfault, submoe to abort in k-means, msmoe to exit 1) and
  // prune enumerate, with statistics on the fly (the forward refuses the weights)...
  const std::vector<std::vector<std::string>> methods = {
      {"merge", "--method", "hcsmoe", "--experts", "6"},
      {"merge", "--method", "submoe", "--experts", "6"},
      {"merge", "--method", "msmoe", "--experts", "6"},
      {"merge", "--method", "dern", "--experts", "6"},
      {"prune", "--method", "enumerate", "--keep", "6"},
  };
  for (const auto& mth : methods) {
    std::vector<std::string> a = mth;
    a.insert(a.begin() + 1, {m.string(), (tmp / "out").string()});
    for (const std::string& x : std::vector<std::string>{"--text", kCalib.string(), "--ctx", "32", "--windows", "4"})
      a.push_back(x);
    SCOPED_TRACE(mth[2]);
    expect_nan_error(run_tool(a));
    EXPECT_FALSE(fs::exists(tmp / "out"));
    EXPECT_TRUE(temps_in(tmp.path()).empty());
  }
  // ... and with the clean model's statistics (same fingerprint): the merge converts the experts'
  // weights itself and refuses them there.
  for (const std::string method : {"hcsmoe", "submoe", "msmoe", "dern"}) {
    SCOPED_TRACE(method);
    expect_nan_error(run_tool({"merge", m.string(), (tmp / "out").string(), "--method", method, "--experts", "6",
                               "--stats", clean_stats().string()}));
    EXPECT_FALSE(fs::exists(tmp / "out"));
  }
  // Prune by a score never converts the weights; the writer refuses to copy the NaN into the output
  // (the poisoned expert 0 of layer 0 is kept by --method random --seed 0 ... or dropped: both
  // layers' other tensors are clean, so keep every expert to make sure it is written).
  for (const std::string method : {"frequency", "soft", "reap"}) {
    SCOPED_TRACE(method);
    const RunResult r = run_tool({"prune", m.string(), (tmp / "out").string(), "--method", method, "--keep", "8",
                                  "--stats", clean_stats().string(), "-q"});
    EXPECT_EQ(r.exit_code, 2) << r.describe();
    EXPECT_EQ(r.err_lines().size(), 1u) << r.describe();
    EXPECT_NE(r.err.find("tensor model.layers.0.block_sparse_moe.experts.0.w1.weight: non-finite value at index 2065"),
              std::string::npos)
        << r.describe();
    EXPECT_FALSE(fs::exists(tmp / "out"));
    EXPECT_TRUE(temps_in(tmp.path()).empty());
  }
}

TEST_F(Robust, NonFiniteFusedExpertNamesTheStoredTensor) {
  // gpt_oss and llama4 store a layer's experts as one [E, ...] tensor per projection, copied out
  // per expert at load: the error names that stored tensor and the expert, as the per-expert
  // families' errors name theirs.
  struct Case {
    std::string fixture, tensor;
    uint64_t element;  // BF16 elements into the tensor
    std::string expect;
  };
  const std::vector<Case> cases = {
      // gate_up_proj [8, 64, 32]: element 2048 + 5 is expert 1's.
      {"gpt-oss-tiny", "model.layers.0.mlp.experts.gate_up_proj", 2048 + 5,
       "tensor model.layers.0.mlp.experts.gate_up_proj (expert 1)"},
      // down_proj [8, 16, 64]: element 2048 + 70 is expert 2's.
      {"llama4-tiny", "model.layers.1.feed_forward.experts.down_proj", 2048 + 70,
       "tensor model.layers.1.feed_forward.experts.down_proj (expert 2)"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.fixture);
    const fs::path m = tmp / ("nan-" + c.fixture);
    copy_folder(kSrc / "data" / c.fixture, m);
    patch_tensor_bytes(m / "model.safetensors", c.tensor, 2 * c.element, bf16_nan());
    const RunResult r = run_tool({"eval", m.string(), "--text", kHeldout.string(), "--ctx", "16", "--max-windows", "1"});
    expect_one_line_error(r, {m.string() + ": " + c.expect, "non-finite value nan"});
  }
}

TEST_F(Robust, NonFiniteStatisticsRefusedAtLoad) {
  // A NaN REAP score of layer 0 expert 0 (prune reap used to keep that expert): every command that
  // loads the file refuses it, naming the file, the tensor, the expert and the index.
  const fs::path s = tmp / "nan.stats";
  fs::copy_file(clean_stats(), s);
  patch_tensor_bytes(s, "layers.0.reap", 0, f64_bytes(std::nan("")));
  const std::vector<std::string> parts = {s.string(), "tensor layers.0.reap", "non-finite value nan at index 0",
                                          "expert 0"};
  auto r = run_tool({"prune", kModel.string(), (tmp / "out").string(), "--method", "reap", "--keep", "6", "--stats",
                     s.string()});
  expect_one_line_error(r, {});
  for (const auto& p : parts) EXPECT_NE(r.err.find(p), std::string::npos) << p << " not in: " << r.err;
  EXPECT_FALSE(fs::exists(tmp / "out"));
  // --dry-run checks the file too; merge and stats show refuse it as well.
  for (const auto& a : std::vector<std::vector<std::string>>{
           {"prune", kModel.string(), (tmp / "out").string(), "--method", "reap", "--keep", "6", "--stats", s.string(),
            "--dry-run"},
           {"merge", kModel.string(), (tmp / "out").string(), "--method", "msmoe", "--experts", "6", "--stats",
            s.string()},
           {"stats", "show", s.string()}}) {
    r = run_tool(a);
    expect_one_line_error(r, {"tensor layers.0.reap", "non-finite"});
  }
  // An Inf in a matrix names row and column.
  const fs::path s2 = tmp / "inf.stats";
  fs::copy_file(clean_stats(), s2);
  float inf = std::numeric_limits<float>::infinity();
  std::string b(4, '\0');
  std::memcpy(b.data(), &inf, 4);
  patch_tensor_bytes(s2, "layers.1.logit_sim", 4 * (8 * 3 + 5), b);
  expect_one_line_error(run_tool({"stats", "show", s2.string()}),
                    {"tensor layers.1.logit_sim", "non-finite value inf at index 29 (row 3, column 5), expert 3"});
}

// ------------------------------------------------------------------ output files

TEST_F(Robust, CalibrateOutputFollowsTheOutputRules) {
  const fs::path model = tmp / "model";
  copy_folder(kModel, model);
  const fs::path text = tmp / "calib.txt";
  fs::copy_file(kCalib, text);
  const std::string model_bytes = read_file(model / "model.safetensors"), text_bytes = read_file(text);
  auto cal = [&](const fs::path& out, std::vector<std::string> extra = {}) {
    std::vector<std::string> a = {"calibrate", model.string(), "--text", text.string(), "--ctx", "32", "--windows",
                                  "2", "-o", out.string(), "-q"};
    a.insert(a.end(), extra.begin(), extra.end());
    return run_tool(a);
  };
  // Never over an input, never into the model folder (even with --force).
  expect_one_line_error(cal(model / "model.safetensors", {"--force"}), {"output is inside the input"});
  expect_one_line_error(cal(model / "stats.safetensors"), {"output is inside the input"});
  expect_one_line_error(cal(text, {"--force"}), {"output is the input"});
  EXPECT_EQ(read_file(model / "model.safetensors"), model_bytes);
  EXPECT_EQ(read_file(text), text_bytes);
  // An existing file needs --force; a folder is refused.
  write_file(tmp / "old.stats", "old");
  expect_one_line_error(cal(tmp / "old.stats"), {"old.stats: output file exists (use --force to replace it)"});
  EXPECT_EQ(read_file(tmp / "old.stats"), "old");
  fs::create_directories(tmp / "dir.stats");
  expect_one_line_error(cal(tmp / "dir.stats", {"--force"}), {"output is a folder"});
  // --force replaces a statistics file moe-tool wrote, never another file.
  expect_one_line_error(cal(tmp / "old.stats", {"--force"}), {"old.stats: output file exists and is neither a statistics file"});
  EXPECT_EQ(read_file(tmp / "old.stats"), "old");
  fs::remove(tmp / "old.stats");
  EXPECT_EQ(cal(tmp / "old.stats").exit_code, 0);
  const std::string first = read_file(tmp / "old.stats");
  const auto ok = cal(tmp / "old.stats", {"--force", "--out-stride", "8"});
  EXPECT_EQ(ok.exit_code, 0) << ok.describe();
  EXPECT_NE(read_file(tmp / "old.stats"), first);
  EXPECT_TRUE(temps_in(tmp.path()).empty());
  // The checks come before any work: a missing text with an existing output names the output.
  expect_one_line_error(run_tool({"calibrate", model.string(), "--text", (tmp / "missing.txt").string(), "-o",
                              (tmp / "old.stats").string()}),
                    {"use --force"});
}

TEST_F(Robust, StatsPlotOutputFollowsTheOutputRules) {
  const fs::path s = clean_stats();
  const fs::path out = tmp / "plots";
  fs::create_directories(out);
  write_file(out / "keep.txt", "mine");
  expect_one_line_error(run_tool({"stats", "plot", s.string(), "-o", out.string()}),
                    {"output folder exists and is not empty (use --force to replace it)"});
  EXPECT_EQ(read_file(out / "keep.txt"), "mine");
  expect_one_line_error(run_tool({"stats", "plot", s.string(), "-o", s.string(), "--force"}), {"output is the input"});
  EXPECT_TRUE(fs::is_regular_file(s));
  // --force never deletes a folder moe-tool did not write.
  expect_one_line_error(run_tool({"stats", "plot", s.string(), "-o", out.string(), "--force"}),
                    {"output folder exists and was not written by moe-tool"});
  EXPECT_EQ(read_file(out / "keep.txt"), "mine");
  fs::remove(out / "keep.txt");
  auto r = run_tool({"stats", "plot", s.string(), "-o", out.string()});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  r = run_tool({"stats", "plot", s.string(), "-o", out.string(), "--force"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_TRUE(fs::exists(out / "usage.svg"));
  EXPECT_TRUE(temps_in(tmp.path()).empty());
  // A plot into a folder whose parents do not exist: they are made; a parent that is a file is refused.
  r = run_tool({"stats", "plot", s.string(), "-o", (tmp / "no/such/dir").string()});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_TRUE(fs::exists(tmp / "no/such/dir/usage.svg"));
  expect_one_line_error(run_tool({"stats", "plot", s.string(), "-o", (out / "usage.svg" / "x").string()}),
                    {"parent folder", "cannot be made", "usage.svg is not a folder"});
}

// A child moe-tool that runs in the background.
pid_t spawn_tool(const std::vector<std::string>& args) {
  std::vector<std::string> all = {tool_path()};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
  pid_t pid = -1;
  if (posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ) != 0) pid = -1;
  posix_spawn_file_actions_destroy(&fa);
  return pid;
}

// Waits until `dir` holds a temporary of the tool (true), or the child ended / 60 s passed.
bool wait_for_temp(pid_t pid, const fs::path& dir) {
  for (int i = 0; i < 6000; ++i) {
    if (!temps_in(dir).empty()) return true;
    int st = 0;
    if (waitpid(pid, &st, WNOHANG) == pid) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

TEST_F(Robust, SignalsRemoveTemporaries) {
  // A long calibration (every window of the text, ctx 128) and a merge with statistics on the fly,
  // each stopped by a signal once its temporary exists: the temporary goes with the process.
  struct Case {
    std::vector<std::string> args;
    int sig;
  };
  const std::vector<Case> cases = {
      {{"calibrate", kModel.string(), "--text", kCalib.string(), "--ctx", "128", "-o", (tmp / "x.stats").string()},
       SIGTERM},
      {{"merge", kModel.string(), (tmp / "out").string(), "--method", "hcsmoe", "--experts", "6", "--text",
        kCalib.string(), "--ctx", "128"},
       SIGINT},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.args[0]);
    const pid_t pid = spawn_tool(c.args);
    ASSERT_GT(pid, 0);
    ASSERT_TRUE(wait_for_temp(pid, tmp.path())) << "no temporary appeared";
    kill(pid, c.sig);
    int st = 0;
    ASSERT_EQ(waitpid(pid, &st, 0), pid);
    EXPECT_TRUE(WIFSIGNALED(st)) << st;
    if (WIFSIGNALED(st)) {
      EXPECT_EQ(WTERMSIG(st), c.sig);
    }
    EXPECT_TRUE(temps_in(tmp.path()).empty()) << temps_in(tmp.path()).front();
    EXPECT_FALSE(fs::exists(tmp / "x.stats"));
    EXPECT_FALSE(fs::exists(tmp / "out"));
  }
}

TEST_F(Robust, StaleTemporariesOfDeadProcessesAreRemoved) {
  // kill -9 leaves the temporary behind; the next run into the same place removes it (and says so),
  // but leaves a live process's temporary alone.
  const pid_t pid = spawn_tool({"calibrate", kModel.string(), "--text", kCalib.string(), "--ctx", "128", "-o",
                                (tmp / "x.stats").string()});
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(wait_for_temp(pid, tmp.path()));
  kill(pid, SIGKILL);
  int st = 0;
  ASSERT_EQ(waitpid(pid, &st, 0), pid);
  const auto left = temps_in(tmp.path());
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(left[0].rfind(".x.stats.moe-tool-tmp-" + std::to_string(pid) + "-", 0), 0u) << left[0];
  const std::string live = ".x.stats.moe-tool-tmp-" + std::to_string(getpid()) + "-0000abcd";
  write_file(tmp / live, "a live run's file");
  const auto r = run_tool({"calibrate", kModel.string(), "--text", kCalib.string(), "--ctx", "32", "--windows", "2",
                           "-o", (tmp / "x.stats").string()});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.err.find("removed " + (tmp / left[0]).string() + ", left by an interrupted run"), std::string::npos)
      << r.err;
  EXPECT_EQ(temps_in(tmp.path()), std::vector<std::string>{live});
  // The same for checkpoint folders (prune, merge, convert share io::OutputDir).
  fs::create_directories(tmp / ".out.moe-tool-tmp-999999999-00000001");
  write_file(tmp / ".out.moe-tool-tmp-999999999-00000001/model.safetensors", "partial");
  const auto c = run_tool({"convert", kModel.string(), (tmp / "out").string(), "-q"});
  EXPECT_EQ(c.exit_code, 0) << c.describe();
  EXPECT_FALSE(fs::exists(tmp / ".out.moe-tool-tmp-999999999-00000001"));
}

// ------------------------------------------------------------------ checks before work

TEST_F(Robust, DryRunRunsEveryCheck) {
  const fs::path out = tmp / "out";
  auto prune = [&](std::vector<std::string> extra) {
    std::vector<std::string> a = {"prune", kModel.string(), out.string(), "--method", "reap", "--keep", "6",
                                  "--text", kCalib.string(), "--dry-run"};
    a.insert(a.end(), extra.begin(), extra.end());
    if (std::find(extra.begin(), extra.end(), "--ctx") == extra.end()) a.insert(a.end(), {"--ctx", "32"});
    if (std::find(extra.begin(), extra.end(), "--windows") == extra.end()) a.insert(a.end(), {"--windows", "4"});
    return run_tool(a);
  };
  EXPECT_EQ(prune({}).exit_code, 0);
  // An existing output (used to be found only after calibration).
  fs::create_directories(out);
  write_file(out / "x", "x");
  expect_one_line_error(prune({}), {out.string() + ": output folder exists and is not empty (use --force to replace it)"});
  fs::remove_all(out);
  // A missing evaluation text (used to be found after every layer was written), with its flag.
  expect_one_line_error(prune({"--eval", (tmp / "missing.txt").string()}), {"--eval: ", "missing.txt", "not found"});
  // An evaluation context beyond the model's positions: named as typed, no --force to offer.
  auto r = prune({"--eval", kHeldout.string(), "--eval-ctx", "100000"});
  expect_one_line_error(r, {"--eval-ctx 100000 exceeds max_position_embeddings"});
  EXPECT_EQ(r.err.find("--force"), std::string::npos) << r.err;
  // More calibration windows than the text has; a calibration ctx beyond the model's positions.
  expect_one_line_error(prune({"--windows", "100000"}), {"--text: "});
  expect_one_line_error(prune({"--ctx", "100000"}), {"--ctx 100000 exceeds the model's max_position_embeddings"});
  // A stats file from another model, and one without the Gram matrices submoe whiten needs (used
  // to pass --dry-run and fail after calibration naming an internal temporary file).
  const fs::path other = kSrc / "data/models/qwen2moe-tiny";
  const fs::path other_stats = tmp / "other.stats";
  ASSERT_EQ(run_tool({"calibrate", other.string(), "--text", kCalib.string(), "--ctx", "32", "--windows", "2", "-o",
                      other_stats.string(), "-q"})
                .exit_code,
            0);
  expect_one_line_error(run_tool({"prune", kModel.string(), out.string(), "--method", "reap", "--keep", "6", "--stats",
                              other_stats.string(), "--dry-run"}),
                    {"statistics were computed on model fingerprint"});
  expect_one_line_error(run_tool({"merge", kModel.string(), out.string(), "--method", "submoe", "--experts", "6",
                              "--whiten", "--stats", clean_stats().string(), "--dry-run"}),
                    {clean_stats().string(), "has no gram_in", "--gram"});
  // With statistics on the fly, whiten gets its Gram matrices computed (it used to fail).
  r = run_tool({"merge", kModel.string(), out.string(), "--method", "submoe", "--experts", "6", "--whiten", "--text",
                kCalib.string(), "--ctx", "32", "--windows", "4", "-q"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_TRUE(fs::exists(out / "moe_tool_report.json"));
  // Recipes: the same checks, named by JSON path.
  const fs::path recipe = tmp / "r.json";
  write_file(recipe, json({{"model", kModel.string()},
                           {"calibration", {{"text", kCalib.string()}, {"ctx", 32}, {"windows", 2}}},
                           {"passes", {{{"pass", "prune"}, {"method", "reap"}, {"keep", 6}}}},
                           {"output", {{"path", out.string()}}},
                           {"eval", {{"text", kHeldout.string()}, {"ctx", 100000}}}})
                         .dump());
  expect_one_line_error(run_tool({"run", recipe.string(), "--dry-run"}), {"output.force"});
  expect_one_line_error(run_tool({"run", recipe.string(), "--dry-run", "--set", "output.force=true"}),
                    {"eval.ctx 100000 exceeds", "(lower eval.ctx)"});
}

// ------------------------------------------------------------------ concurrent runs

TEST_F(Robust, ConcurrentCalibrateRunsUseTheirOwnTemporaries) {
  // Two runs into one new output at once: each writes its own temporary; exactly one wins the final
  // rename, the other reports that the output appeared meanwhile (or, if it started after the
  // first finished, that it exists) — never both success with one result silently replaced.
  const fs::path out = tmp / "x.stats";
  std::vector<std::string> a = {"calibrate", kModel.string(), "--text", kCalib.string(), "--ctx", "32", "--windows",
                                "64", "-o", out.string(), "-q"};
  RunResult r1, r2;
  std::thread t1([&] { r1 = run_tool(a); });
  std::thread t2([&] { r2 = run_tool(a); });
  t1.join();
  t2.join();
  EXPECT_EQ((r1.exit_code == 0) + (r2.exit_code == 0), 1) << r1.describe() << r2.describe();
  const RunResult& loser = r1.exit_code == 0 ? r2 : r1;
  EXPECT_EQ(loser.exit_code, 2) << loser.describe();
  EXPECT_TRUE(loser.err.find("output appeared while this run was writing") != std::string::npos ||
              loser.err.find("output file exists") != std::string::npos)
      << loser.err;
  EXPECT_TRUE(temps_in(tmp.path()).empty());
  EXPECT_EQ(run_tool({"stats", "show", out.string(), "--json"}).exit_code, 0);
}

// ------------------------------------------------------------------ messages

TEST_F(Robust, MessagesNameWhatTheUserTyped) {
  const std::string out = (tmp / "out").string();
  // Flags, not JSON paths, for prune and merge.
  expect_one_line_error(run_tool({"merge", kModel.string(), out, "--method", "msmoe", "--experts", "6", "--no-align",
                              "--stats", "x"}),
                    {"--no-align: applies to --method hcsmoe, submoe, not msmoe"});
  expect_one_line_error(run_tool({"prune", kModel.string(), out, "--method", "reap", "--keep-ratio", "0", "--stats", "x"}),
                    {"--keep-ratio: expected a number in (0, 1], found 0"});
  expect_one_line_error(run_tool({"prune", kModel.string(), out, "--method", "reap", "--keep", "6"}),
                    {"give --text", "or --stats"});
  expect_one_line_error(run_tool({"merge", kModel.string(), out, "--method", "hcsmoe", "--experts", "6", "--router",
                              "best", "--text", kCalib.string()}),
                    {"--router: unknown value \"best\""});
  expect_one_line_error(run_tool({"prune", kModel.string(), out, "--method", "reap", "--keep", "6", "--ctx", "x"}),
                    {"--ctx: expected an integer, found 'x'"});
  expect_one_line_error(run_tool({"factorize", kModel.string(), out, "--method", "svd", "--budget", "nan"}),
                    {"--budget: expected a finite number, found 'nan'"});
  // Small ones.
  expect_one_line_error(run_tool({"stats"}), {"stats: give a subcommand: show or plot"});
  expect_one_line_error(run_tool({"stats", "show", clean_stats().string(), "--layer", "-1"}),
                    {"--layer: expected a layer index >= 0"});
  expect_one_line_error(run_tool({"stats", "show", clean_stats().string(), "--layer", "99"}), {"--layer 99: no such MoE layer"});
  expect_one_line_error(run_tool({"eval", kModel.string(), "--text", kHeldout.string(), "--max-windows", "0"}),
                    {"--max-windows: expected an integer >= 1"});
  // --json: the error is JSON too (one line on stderr).
  const auto r = run_tool({"prune", kModel.string(), out, "--method", "reap", "--keep", "6", "--json"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_EQ(r.out, "");
  ASSERT_EQ(r.err_lines().size(), 1u) << r.err;
  const json j = json::parse(r.err);
  EXPECT_EQ(j["exit_code"], 2);
  EXPECT_NE(j["error"].get<std::string>().find("give --text"), std::string::npos) << j.dump();
}

TEST_F(Robust, StatsShowJsonNumbersAreNumbers) {
  const auto r = run_tool({"stats", "show", clean_stats().string(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json j = json::parse(r.out);
  std::function<void(const json&, const std::string&)> walk = [&](const json& v, const std::string& path) {
    if (v.is_object())
      for (const auto& [k, x] : v.items()) walk(x, path + "." + k);
    else if (v.is_array())
      for (size_t i = 0; i < v.size(); ++i) walk(v[i], path + "[" + std::to_string(i) + "]");
    else if (v.is_string() && path != ".metadata.model_fingerprint") {
      const std::string s = v.get<std::string>();
      char* end = nullptr;
      std::strtod(s.c_str(), &end);
      const bool numeric = !s.empty() && end == s.c_str() + s.size();
      EXPECT_FALSE(numeric) << path << " is the number " << s << " as a string";
    }
  };
  walk(j, "");
}

// ------------------------------------------------------------------ keep ratio and the report

TEST_F(Robust, KeepRatioKeepsWhatWasAskedAndSaysSo) {
  for (const auto& [ratio, kept] : std::vector<std::pair<std::string, int>>{{"0.75", 6}, {"0.25", 2}, {"0.3", 2}}) {
    SCOPED_TRACE(ratio);
    fs::remove_all(tmp / "out");
    const auto r = run_tool({"prune", kModel.string(), (tmp / "out").string(), "--method", "reap", "--keep-ratio",
                             ratio, "--stats", clean_stats().string(), "--json", "-q"});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    const json j = json::parse(r.out);
    for (const auto& l : j["layers"]) EXPECT_EQ(l["experts_after"], kept) << l.dump();
    EXPECT_DOUBLE_EQ(j["passes"][0]["params"]["keep_ratio_achieved"].get<double>(), kept / 8.0);
    const json cfg = json::parse(read_file(tmp / "out/config.json"));
    EXPECT_EQ(cfg["num_local_experts"], kept);
  }
}

TEST_F(Robust, ReportRecordsTheStatsFilesCalibration) {
  const auto r = run_tool({"prune", kModel.string(), (tmp / "out").string(), "--method", "reap", "--keep", "6",
                           "--stats", clean_stats().string(), "-q"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json rep = json::parse(read_file(tmp / "out/moe_tool_report.json"));
  EXPECT_EQ(rep["calibration"]["ctx"], 32) << rep["calibration"].dump();  // not the default 512
  EXPECT_EQ(rep["calibration"]["windows"], 8);
  EXPECT_EQ(rep["calibration"]["stats_file"]["tokens"], 256);
}

TEST_F(Robust, FingerprintSurvivesAReformattedConfig) {
  // Stats of the original are accepted for a copy whose config.json was reformatted; inspect --json
  // shows the same fingerprint for both.
  const fs::path copy = tmp / "copy";
  copy_folder(kModel, copy);
  const json cfg = json::parse(read_file(copy / "config.json"));
  write_file(copy / "config.json", cfg.dump(1) + "\n\n");
  const auto a = run_tool({"inspect", kModel.string(), "--json"}), b = run_tool({"inspect", copy.string(), "--json"});
  ASSERT_EQ(a.exit_code, 0);
  ASSERT_EQ(b.exit_code, 0);
  const std::string fa = json::parse(a.out)["fingerprint"], fb = json::parse(b.out)["fingerprint"];
  EXPECT_EQ(fa.size(), 16u);
  EXPECT_EQ(fa, fb);
  const auto r = run_tool({"prune", copy.string(), (tmp / "out").string(), "--method", "reap", "--keep", "6",
                           "--stats", clean_stats().string(), "--dry-run"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  // A changed value is another model.
  json cfg2 = cfg;
  cfg2["rms_norm_eps"] = 1e-3;
  write_file(copy / "config.json", cfg2.dump());
  EXPECT_NE(json::parse(run_tool({"inspect", copy.string(), "--json"}).out)["fingerprint"], fa);
}

// ------------------------------------------------------------------ one vocabulary

TEST_F(Robust, ListShowsEveryMethodsKeysWithDefaults) {
  const auto r = run_tool({"list", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json j = json::parse(r.out);
  auto keys_of = [&](const std::string& pass, const std::string& method) {
    std::map<std::string, std::string> m;
    for (const auto& p : j)
      if (p["pass"] == pass && p["method"] == method)
        for (const auto& k : p["keys"]) m[k["key"]] = k["default"];
    return m;
  };
  const auto sub = keys_of("merge", "submoe");
  EXPECT_EQ(sub.at("rank_ratio"), "1");
  EXPECT_EQ(sub.at("damp"), "0.01");
  EXPECT_EQ(sub.at("align"), "true");
  EXPECT_EQ(sub.at("router"), "mean");
  EXPECT_EQ(sub.at("experts"), "required");
  EXPECT_EQ(keys_of("merge", "msmoe").count("align"), 0u);
  EXPECT_EQ(keys_of("prune", "enumerate").at("max_subsets"), "5000");
  EXPECT_EQ(keys_of("prune", "reap").count("max_subsets"), 0u);
  EXPECT_EQ(keys_of("prune", "reap").at("uniform"), "true");
  // --help states the defaults.
  const auto h = run_tool({"merge", "--help"});
  EXPECT_NE(h.out.find("recipe key passes[0].rank_ratio, default 1"), std::string::npos) << h.out;
  EXPECT_NE(h.out.find("--eval-max-windows"), std::string::npos) << h.out;
}

}  // namespace
}  // namespace moe::test
