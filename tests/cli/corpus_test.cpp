// The bad-input corpus (tests/corpus, made by tests/corpus/make_corpus.py): every case run through
// the built binary on a temporary copy of its folder. Each must fail with exit status 2, exactly one
// line on stderr naming the file/tensor/key and the problem, nothing on stdout, the input untouched,
// no output folder and no temporary folder left behind.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <set>
#include <nlohmann/json.hpp>

#include "support/ckpt_util.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

const fs::path kCorpus = fs::path(MOE_SOURCE_DIR) / "tests" / "corpus";

struct Case {
  std::string name, description, command, output;
  int exit = 2;
  std::vector<std::string> stderr_parts;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

std::vector<Case> load_cases() {
  std::vector<Case> v;
  try {
    const json j = json::parse(read_file(kCorpus / "cases.json"));
    for (const auto& c : j.at("cases")) {
      Case k;
      k.name = c.at("name");
      k.description = c.value("description", "");
      k.command = c.at("command");
      k.output = c.value("output", "");
      k.exit = c.at("exit");
      k.stderr_parts = c.at("stderr").get<std::vector<std::string>>();
      v.push_back(k);
    }
  } catch (const std::exception& e) {
    v.push_back({"cases.json unreadable: " + std::string(e.what()), "", "", "", 2, {}});
  }
  return v;
}

// Every regular file under `dir` (relative path -> bytes) and every folder (-> "<dir>").
std::map<std::string, std::string> snapshot(const fs::path& dir) {
  std::map<std::string, std::string> m;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    const std::string rel = fs::relative(e.path(), dir).string();
    m[rel] = e.is_directory() ? "<dir>" : read_file(e.path());
  }
  return m;
}

class CorpusCase : public ::testing::TestWithParam<Case> {};

TEST_P(CorpusCase, FailsCleanlyWithOneLine) {
  const Case& c = GetParam();
  ASSERT_FALSE(c.command.empty()) << c.name;
  SCOPED_TRACE(c.name + ": " + c.description);
  TempDir tmp("moe-corpus");
  const fs::path in = tmp / c.name;
  fs::copy(kCorpus / c.name, in, fs::copy_options::recursive);
  const auto before = snapshot(in);

  std::vector<std::string> args = {c.command, in.string()};
  fs::path out;
  std::map<std::string, std::string> out_before;
  if (c.command == "convert") {
    if (c.output == "fresh") {
      out = tmp / "out";
    } else if (c.output == "parent-file") {
      write_file(tmp / "afile", "a file\n");
      out = tmp / "afile" / "out";
    } else if (c.output == "file") {
      out = tmp / "out";
      write_file(out, "a file, not a folder\n");
    } else if (c.output == "nonempty") {
      out = tmp / "out";
      fs::create_directory(out);
      write_file(out / "keep.txt", "keep me\n");
      out_before = snapshot(out);
    } else if (c.output == "input") {
      out = in;
    } else if (c.output == "inside-input") {
      out = in / "converted";
    } else {
      FAIL() << "unknown output kind '" << c.output << "'";
    }
    args.push_back(out.string());
  } else {
    ASSERT_EQ(c.command, "inspect");
  }

  const RunResult r = run_tool(args);
  EXPECT_EQ(r.exit_code, c.exit) << r.describe();
  EXPECT_EQ(r.out, "") << r.describe();
  const auto lines = r.err_lines();
  ASSERT_EQ(lines.size(), 1u) << "stderr must be exactly one line\n" << r.describe();
  EXPECT_EQ(r.err.back(), '\n');
  EXPECT_EQ(lines[0].rfind("moe-tool: error: ", 0), 0u) << lines[0];
  for (const auto& p : c.stderr_parts) EXPECT_NE(lines[0].find(p), std::string::npos) << "'" << p << "' not in:\n" << lines[0];

  EXPECT_EQ(snapshot(in), before) << "the input folder was modified";
  EXPECT_EQ(temp_leftovers(tmp.path()), std::vector<std::string>{});
  EXPECT_EQ(temp_leftovers(in), std::vector<std::string>{});
  if (c.command == "convert") {
    if (c.output == "fresh" || c.output == "inside-input") {
      EXPECT_FALSE(fs::exists(out)) << "output folder created";
    } else if (c.output == "parent-file") {
      EXPECT_EQ(read_file(out.parent_path()), "a file\n");
    } else if (c.output == "file") {
      EXPECT_EQ(read_file(out), "a file, not a folder\n");
    } else if (c.output == "nonempty") {
      EXPECT_EQ(snapshot(out), out_before);
    }
    if (fs::exists(out.parent_path())) {
      EXPECT_EQ(temp_leftovers(out.parent_path()), std::vector<std::string>{});
    }
  }
  // Nothing else appeared next to the input either.
  std::vector<std::string> expect = {c.name};
  if (c.command == "convert" && (c.output == "file" || c.output == "nonempty")) expect.push_back("out");
  if (c.output == "parent-file") expect.push_back("afile");
  std::sort(expect.begin(), expect.end());
  EXPECT_EQ(list_dir(tmp.path()), expect);
}

INSTANTIATE_TEST_SUITE_P(Corpus, CorpusCase, ::testing::ValuesIn(load_cases()), [](const auto& info) {
  std::string n = info.param.name;
  for (auto& ch : n)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return n;
});

// ------------------------------------------------------------------ the corpus itself

TEST(Corpus, EveryFolderIsACaseAndEnoughCases) {
  const json j = json::parse(read_file(kCorpus / "cases.json"));
  std::set<std::string> listed;
  for (const auto& c : j.at("cases")) {
    const std::string name = c.at("name");
    EXPECT_TRUE(listed.insert(name).second) << "duplicate case " << name;
    EXPECT_TRUE(fs::is_directory(kCorpus / name)) << name;
    EXPECT_EQ(c.at("exit"), 2) << name;
    EXPECT_FALSE(c.at("stderr").empty()) << name;
  }
  for (const auto& v : j.at("valid")) listed.insert(v.get<std::string>());
  for (const auto& n : list_dir(kCorpus)) {
    if (fs::is_directory(kCorpus / n)) {
      EXPECT_TRUE(listed.count(n)) << "folder " << n << " is not in cases.json";
    }
  }
  EXPECT_GE(j.at("cases").size(), 30u);
  // Small checkpoints: a few KB each.
  for (const auto& name : listed) {
    uintmax_t bytes = 0;
    for (const auto& e : fs::recursive_directory_iterator(kCorpus / name)) {
      if (e.is_regular_file()) bytes += e.file_size();
    }
    EXPECT_LT(bytes, 8192u) << name;
  }
}

// The untouched bases of the corpus are valid: each case fails because of its one defect.
TEST(Corpus, ValidBasesPass) {
  for (const char* name : {"valid-single", "valid-sharded"}) {
    SCOPED_TRACE(name);
    TempDir tmp("moe-corpus");
    fs::copy(kCorpus / name, tmp / "in", fs::copy_options::recursive);
    const RunResult i = run_tool({"inspect", "--json", (tmp / "in").string()});
    EXPECT_EQ(i.exit_code, 0) << i.describe();
    EXPECT_EQ(json::parse(i.out)["family"], "mixtral");
    const RunResult c = run_tool({"-q", "convert", (tmp / "in").string(), (tmp / "out").string()});
    EXPECT_EQ(c.exit_code, 0) << c.describe();
    EXPECT_EQ(c.err, "");
    EXPECT_EQ(first_difference(read_tensors(tmp / "out"), read_tensors(tmp / "in")), "");
  }
}

// The untouched native base (one expert weight stored as low-rank factors, docs/FORMAT.md) is
// valid too: the native cases fail because of their one defect.
TEST(Corpus, ValidNativeBasePasses) {
  TempDir tmp("moe-corpus");
  fs::copy(kCorpus / "valid-native", tmp / "in", fs::copy_options::recursive);
  const RunResult i = run_tool({"inspect", "--json", (tmp / "in").string()});
  EXPECT_EQ(i.exit_code, 0) << i.describe();
  const RunResult c = run_tool({"-q", "convert", (tmp / "in").string(), (tmp / "out").string(), "--materialize"});
  EXPECT_EQ(c.exit_code, 0) << c.describe();
  EXPECT_TRUE(fs::exists(tmp / "out" / "config.json"));
}

// An unreadable weights file or config. Permissions cannot stop root, so when the test runs as
// root (as CI does) the tool runs as the unprivileged user `nobody` (util-linux setpriv), for whom
// chmod 000 does make the file unreadable.
TEST(Corpus, UnreadableFiles) {
  const bool as_root = geteuid() == 0;
  for (const char* file : {"model.safetensors", "config.json"}) {
    SCOPED_TRACE(file);
    TempDir tmp("moe-corpus");
    fs::copy(kCorpus / "valid-single", tmp / "in", fs::copy_options::recursive);
    ASSERT_EQ(chmod((tmp / "in" / file).c_str(), 0), 0);
    std::vector<std::string> args = {"convert", (tmp / "in").string(), (tmp / "out").string()};
    RunResult r;
    if (as_root) {
      // nobody must be able to enter the folder and create the output beside the input.
      ASSERT_EQ(chmod(tmp.path().c_str(), 0777), 0);
      ASSERT_TRUE(fs::exists("/usr/bin/setpriv")) << "setpriv (util-linux) is needed to run this test as root";
      std::vector<std::string> a = {"--reuid=65534", "--regid=65534", "--clear-groups", "--", tool_path()};
      a.insert(a.end(), args.begin(), args.end());
      r = run_process("/usr/bin/setpriv", a);
    } else {
      r = run_tool(args);
    }
    chmod((tmp / "in" / file).c_str(), 0644);
    EXPECT_EQ(r.exit_code, 2) << r.describe();
    EXPECT_EQ(r.err_lines().size(), 1u) << r.describe();
    EXPECT_NE(r.err.find(file), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("Permission denied"), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(tmp / "out"));
  }
}

}  // namespace
}  // namespace moe::test
