// OutputDir: temporary sibling, rename on commit, cleanup on failure, refusal of dangerous
// outputs; and failures injected mid-write through FaultEnv leave nothing behind.
#include <gtest/gtest.h>
#include <unistd.h>

#include "io/checkpoint.h"
#include "io/output_dir.h"
#include "model/model.h"
#include "pipeline/hf_sink.h"
#include "support/ckpt_util.h"
#include "support/expect_error.h"
#include "support/fault_env.h"
#include "support/synth.h"

namespace moe::io {
namespace {

using core::ErrorKind;
using test::expect_error;

// A statistics file as `force` recognises one: safetensors whose metadata has model_fingerprint.
std::string stats_like(const std::string& fingerprint = "f") {
  return test::safetensors_bytes({}, {{"format", "pt"}, {"model_fingerprint", fingerprint}});
}

class OutputDirTest : public ::testing::Test {
 protected:
  test::TempDir tmp{"moe-out"};
  fs::path in() const { return tmp / "in"; }
  fs::path out() const { return tmp / "out"; }
  void SetUp() override { test::synth_to(in(), "mixtral"); }
  // Names in the temp folder other than the input and the expected output.
  std::vector<std::string> leftovers() const {
    std::vector<std::string> v;
    for (const auto& n : test::list_dir(tmp.path()))
      if (n != "in" && n != "out") v.push_back(n);
    return v;
  }
};

TEST_F(OutputDirTest, WritesToHiddenSiblingThenRenames) {
  {
    OutputDir od(Env::posix(), out(), {in()}, false);
    EXPECT_EQ(od.final_path(), out());
    EXPECT_EQ(od.path().parent_path(), fs::weakly_canonical(tmp.path()));
    EXPECT_EQ(od.path().filename().string().rfind(".out.moe-tool-tmp-", 0), 0u) << od.path();
    EXPECT_TRUE(fs::is_directory(od.path()));
    EXPECT_TRUE(fs::is_empty(od.path()));
    test::write_file(od.path() / "a.txt", "hello");
    EXPECT_FALSE(fs::exists(out()));
    od.commit();
    EXPECT_FALSE(fs::exists(od.path()));
  }
  EXPECT_EQ(test::read_file(out() / "a.txt"), "hello");
  EXPECT_EQ(leftovers(), std::vector<std::string>{});
}

TEST_F(OutputDirTest, NoCommitRemovesEverything) {
  {
    OutputDir od(Env::posix(), out(), {in()}, false);
    test::write_file(od.path() / "a.txt", "partial");
    fs::create_directories(od.path() / "sub" / "deeper");
  }
  EXPECT_FALSE(fs::exists(out()));
  EXPECT_EQ(leftovers(), std::vector<std::string>{});
}

// Two runs into one new output: each has its own temporary, and the final rename refuses to replace
// an output that appeared after the start unless force was given.
TEST_F(OutputDirTest, ConcurrentRunsDoNotReplaceEachOther) {
  {
    OutputDir a(Env::posix(), out(), {in()}, false);
    OutputDir b(Env::posix(), out(), {in()}, false);
    EXPECT_NE(a.path(), b.path());
    test::write_file(a.path() / "who", "a");
    test::write_file(b.path() / "who", "b");
    a.commit();
    expect_error([&] { b.commit(); }, ErrorKind::InvalidArgument,
                 {out().string(), "output appeared while this run was writing", "use --force"});
  }
  EXPECT_EQ(test::read_file(out() / "who"), "a");
  EXPECT_EQ(leftovers(), std::vector<std::string>{});
  // With force the later run replaces it, as asked.
  {
    OutputDir c(Env::posix(), out(), {in()}, true);
    test::write_file(c.path() / "who", "c");
    c.commit();
  }
  EXPECT_EQ(test::read_file(out() / "who"), "c");
  // An output that was an empty folder at the start stays replaceable without force.
  fs::remove_all(out());
  fs::create_directories(out());
  {
    OutputDir d(Env::posix(), out(), {in()}, false, "output.force");
    test::write_file(d.path() / "who", "d");
    d.commit();
  }
  EXPECT_EQ(test::read_file(out() / "who"), "d");
  EXPECT_EQ(leftovers(), std::vector<std::string>{});
}

TEST_F(OutputDirTest, OutputFileRules) {
  const fs::path f = tmp / "x.stats";
  {
    OutputFile a(Env::posix(), f, {in()}, false);
    OutputFile b(Env::posix(), f, {in()}, false);
    EXPECT_NE(a.path(), b.path());
    EXPECT_EQ(a.path().filename().string().rfind(".x.stats.moe-tool-tmp-" + std::to_string(getpid()) + "-", 0), 0u);
    test::write_file(a.path(), "a");
    test::write_file(b.path(), "b");
    a.commit();
    expect_error([&] { b.commit(); }, ErrorKind::InvalidArgument, {"output appeared while this run was writing"});
  }
  EXPECT_EQ(test::read_file(f), "a");
  expect_error([&] { OutputFile(Env::posix(), f, {in()}, false, "output.force"); }, ErrorKind::InvalidArgument,
               {"output file exists (use output.force to replace it)"});
  expect_error([&] { OutputFile(Env::posix(), in() / "stats", {in()}, true); }, ErrorKind::InvalidArgument,
               {"output is inside the input"});
  // force replaces a statistics file (or a GGUF file) only, never another file.
  expect_error([&] { OutputFile(Env::posix(), f, {in()}, true); }, ErrorKind::InvalidArgument,
               {f.string() + ": output file exists and is neither a statistics file written by moe-tool",
                "--force replaces only an earlier output of moe-tool"});
  EXPECT_EQ(test::read_file(f), "a");
  test::write_file(tmp / "m.gguf", std::string("GGUF\x03\0\0\0", 8));
  EXPECT_TRUE(is_tool_output(tmp / "m.gguf", OutputKind::File));
  EXPECT_FALSE(is_tool_output(f, OutputKind::File));
  fs::remove(tmp / "m.gguf");
  test::write_file(f, stats_like());
  {
    OutputFile c(Env::posix(), f, {in()}, true);
    test::write_file(c.path(), stats_like("c"));
    c.commit();
  }
  EXPECT_EQ(test::read_file(f), stats_like("c"));
  {
    OutputFile d(Env::posix(), f, {in()}, true);
    test::write_file(d.path(), "partial");
  }  // no commit: the temporary goes, the old file stays
  EXPECT_EQ(test::read_file(f), stats_like("c"));
  std::vector<std::string> names = leftovers();
  EXPECT_EQ(names, std::vector<std::string>{"x.stats"});
}

TEST_F(OutputDirTest, StaleTemporariesOfDeadProcessesAreRemoved) {
  // A pid that cannot be alive (above pid_max), and this process's own.
  const fs::path dead = tmp / ".out.moe-tool-tmp-2147483000-00000001";
  const fs::path dead_old = tmp / ".out.moe-tool-tmp-2147483001-00000002.old";
  const fs::path live = tmp / (".out.moe-tool-tmp-" + std::to_string(getpid()) + "-00000003");
  const fs::path other = tmp / ".other.moe-tool-tmp-2147483000-00000001";
  for (const auto& d : {dead, dead_old, live, other}) {
    fs::create_directories(d / "sub");
    test::write_file(d / "sub" / "f", "x");
  }
  {
    OutputDir od(Env::posix(), out(), {in()}, false);
    EXPECT_FALSE(fs::exists(dead));
    EXPECT_FALSE(fs::exists(dead_old));
    EXPECT_TRUE(fs::exists(live));
    EXPECT_TRUE(fs::exists(other));  // another output's: left to the run that writes there
  }
}

TEST_F(OutputDirTest, RefusesInputInsideOrAround) {
  expect_error([&] { OutputDir(Env::posix(), in(), {in()}, true); }, ErrorKind::InvalidArgument, {"output is the input"});
  expect_error([&] { OutputDir(Env::posix(), tmp / "in" / ".." / "in", {in()}, true); }, ErrorKind::InvalidArgument,
               {"output is the input"});
  expect_error([&] { OutputDir(Env::posix(), in() / "sub", {in()}, true); }, ErrorKind::InvalidArgument,
               {"output is inside the input"});
  expect_error([&] { OutputDir(Env::posix(), in() / "a" / "b", {in()}, true); }, ErrorKind::InvalidArgument,
               {"output is inside the input"});
  expect_error([&] { OutputDir(Env::posix(), tmp.path(), {in()}, true); }, ErrorKind::InvalidArgument,
               {"output contains the input"});
  fs::create_directory_symlink(in(), tmp / "link");
  expect_error([&] { OutputDir(Env::posix(), tmp / "link", {in()}, true); }, ErrorKind::InvalidArgument, {"output is the input"});
  // A sibling whose name starts with the input's name is not inside it.
  OutputDir ok(Env::posix(), tmp / "in2", {in()}, false);
  EXPECT_TRUE(fs::exists(ok.path()));
}

TEST_F(OutputDirTest, RelativePathsAreResolved) {
  const fs::path cwd = fs::current_path();
  fs::current_path(tmp.path());
  try {
    expect_error([&] { OutputDir(Env::posix(), "in", {in()}, true); }, ErrorKind::InvalidArgument, {"output is the input"});
    expect_error([&] { OutputDir(Env::posix(), "./in/x", {"in"}, true); }, ErrorKind::InvalidArgument, {"inside the input"});
    {
      OutputDir od(Env::posix(), "out", {"in"}, false);
      od.commit();
    }
    EXPECT_TRUE(fs::is_directory(tmp / "out"));
  } catch (...) {
    fs::current_path(cwd);
    throw;
  }
  fs::current_path(cwd);
}

TEST_F(OutputDirTest, ExistingOutput) {
  fs::create_directory(out());
  {  // empty: fine without --force
    OutputDir od(Env::posix(), out(), {in()}, false);
    test::write_file(od.path() / "new.txt", "new");
    od.commit();
  }
  EXPECT_EQ(test::list_dir(out()), (std::vector<std::string>{kListingName, "new.txt"}));
  // Non-empty: refused without --force, and left alone.
  expect_error([&] { OutputDir(Env::posix(), out(), {in()}, false); }, ErrorKind::InvalidArgument,
               {out().string(), "exists and is not empty", "--force"});
  EXPECT_EQ(test::list_dir(out()), (std::vector<std::string>{kListingName, "new.txt"}));
  EXPECT_EQ(leftovers(), std::vector<std::string>{});
  {  // --force replaces it entirely
    OutputDir od(Env::posix(), out(), {in()}, true);
    test::write_file(od.path() / "newer.txt", "newer");
    EXPECT_EQ(test::read_file(out() / "new.txt"), "new");  // untouched until commit
    od.commit();
  }
  EXPECT_EQ(test::list_dir(out()), (std::vector<std::string>{kListingName, "newer.txt"}));
  EXPECT_EQ(leftovers(), std::vector<std::string>{});
  {  // --force without commit leaves the old output as it was
    OutputDir od(Env::posix(), out(), {in()}, true);
    test::write_file(od.path() / "x", "x");
  }
  EXPECT_EQ(test::list_dir(out()), (std::vector<std::string>{kListingName, "newer.txt"}));
  EXPECT_EQ(leftovers(), std::vector<std::string>{});
}

TEST_F(OutputDirTest, OutputIsAFileOrParentMissing) {
  test::write_file(out(), "i am a file");
  expect_error([&] { OutputDir(Env::posix(), out(), {in()}, true); }, ErrorKind::InvalidArgument,
               {out().string(), "exists and is not a folder"});
  EXPECT_EQ(test::read_file(out()), "i am a file");
  // The parent is a file (or a folder above it is).
  expect_error([&] { OutputDir(Env::posix(), out() / "sub", {in()}, false); }, ErrorKind::NotFound,
               {"parent folder", "cannot be made", out().string() + " is not a folder"});
  expect_error([&] { OutputDir(Env::posix(), out() / "a" / "sub", {in()}, false); }, ErrorKind::NotFound,
               {"cannot be made", out().string() + " is not a folder"});
  expect_error([&] { OutputDir(Env::posix(), "", {in()}, false); }, ErrorKind::InvalidArgument, {"output path is empty"});
}

// Shell completion adds a trailing slash: "out/" must mean the folder out, built next to it.
TEST_F(OutputDirTest, TrailingSlash) {
  {
    OutputDir od(Env::posix(), out().string() + "/", {in()}, false);
    EXPECT_EQ(od.path().parent_path(), fs::weakly_canonical(tmp.path())) << od.path();
    test::write_file(od.path() / "a.txt", "a");
    od.commit();
  }
  EXPECT_EQ(test::read_file(out() / "a.txt"), "a");
  EXPECT_EQ(leftovers(), std::vector<std::string>{});
  {  // replacing an existing output named with a trailing slash
    OutputDir od(Env::posix(), out().string() + "/", {in()}, true);
    EXPECT_FALSE(od.path().string().rfind(out().string() + "/", 0) == 0) << "temporary folder inside the output: " << od.path();
    test::write_file(od.path() / "b.txt", "b");
    od.commit();
  }
  EXPECT_EQ(test::list_dir(out()), (std::vector<std::string>{kListingName, "b.txt"}));
  EXPECT_EQ(leftovers(), std::vector<std::string>{});
  expect_error([&] { OutputDir(Env::posix(), in().string() + "/", {in()}, true); }, ErrorKind::InvalidArgument,
               {"output is the input"});
}

// ------------------------------------------------------------------ failures mid-write

class FaultTest : public OutputDirTest {
 protected:
  // An earlier output of the tool at out(): old.txt and the listing that names it.
  void old_output() {
    OutputDir od(Env::posix(), out(), {in()}, false);
    test::write_file(od.path() / "old.txt", "old");
    od.commit();
  }
  // Converts `in` to `out` through `env` as `moe-tool convert` does; returns the error message or "".
  std::string convert(test::FaultEnv& env, bool force = false, uint64_t shard = 8000) {
    try {
      auto ck = Checkpoint::open(env, in());
      auto m = model::Model::load(ck);
      OutputDir od(env, out(), {in()}, force);
      pipeline::HfSinkOptions opts;
      opts.quiet = true;
      opts.max_shard_bytes = shard;
      pipeline::write_hf_checkpoint(env, m, ck, od.path(), opts);
      od.commit();
      return "";
    } catch (const core::Error& e) {
      return e.message();
    }
  }
};

TEST_F(FaultTest, WriteFailuresPropagateAndLeaveNothing) {
  test::FaultEnv probe;
  ASSERT_EQ(convert(probe), "");
  const uint64_t total = probe.bytes_written();
  ASSERT_GT(total, 40000u);
  EXPECT_EQ(test::first_difference(test::read_tensors(out()), test::read_tensors(in())), "");
  fs::remove_all(out());
  for (uint64_t budget : {uint64_t{0}, uint64_t{1}, uint64_t{100}, total / 3, total / 2, total - 1}) {
    SCOPED_TRACE("budget " + std::to_string(budget));
    test::FaultEnv env;
    env.write_budget = static_cast<int64_t>(budget);
    const std::string msg = convert(env);
    EXPECT_NE(msg.find("injected fault: no space left on device"), std::string::npos) << msg;
    EXPECT_EQ(env.faults(), 1);
    EXPECT_FALSE(fs::exists(out()));
    EXPECT_EQ(leftovers(), std::vector<std::string>{});
  }
  test::FaultEnv enough;
  enough.write_budget = static_cast<int64_t>(total);
  EXPECT_EQ(convert(enough), "");
  EXPECT_EQ(enough.faults(), 0);
}

TEST_F(FaultTest, FailureWhileReplacingKeepsTheOldOutput) {
  old_output();
  test::FaultEnv env;
  env.write_budget = 5000;
  const std::string msg = convert(env, /*force=*/true);
  EXPECT_NE(msg.find("injected fault"), std::string::npos) << msg;
  EXPECT_EQ(test::list_dir(out()), (std::vector<std::string>{kListingName, "old.txt"}));
  EXPECT_EQ(leftovers(), std::vector<std::string>{});
}

TEST_F(FaultTest, CloseAndRenameFailures) {
  {
    test::FaultEnv env;
    env.fail_close = true;
    const std::string msg = convert(env);
    EXPECT_NE(msg.find("close failed: injected fault"), std::string::npos) << msg;
    EXPECT_FALSE(fs::exists(out()));
    EXPECT_EQ(leftovers(), std::vector<std::string>{});
  }
  {
    test::FaultEnv env;
    env.fail_rename = true;
    const std::string msg = convert(env);
    EXPECT_NE(msg.find("cannot rename"), std::string::npos) << msg;
    EXPECT_FALSE(fs::exists(out()));
    EXPECT_EQ(leftovers(), std::vector<std::string>{});
  }
  {  // replacing: the first rename (old output aside) fails; the old output stays
    old_output();
    test::FaultEnv env;
    env.fail_rename = true;
    EXPECT_NE(convert(env, true).find("cannot rename"), std::string::npos);
    EXPECT_EQ(test::list_dir(out()), (std::vector<std::string>{kListingName, "old.txt"}));
    EXPECT_EQ(leftovers(), std::vector<std::string>{});
  }
}

}  // namespace
}  // namespace moe::io
