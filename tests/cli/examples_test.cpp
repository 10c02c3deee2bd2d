// The examples of README.md and docs/ run as written on a fresh checkout: a copy of
// the checkout's layout (data/ linked, recipes/ copied, build/moe-tool linked to the binary under
// test, no build/recipes-out) is the working folder of every command. What runs how:
// - every shipped recipe (recipes/*.json): dry-run as shipped — every check a real run makes
//   before work (inputs, outputs and their missing parents, counts, free space);
// - the MoTE chain (recipes/mote/, the second recipe reads the first one's output): the first
//   recipe runs, the second is dry-run on its output;
// - every recipe in a JSON block of README.md or docs/*.md (an object with model, output and
//   passes or upcycle): dry-run from recipes/, where its relative paths point;
// - every `build/moe-tool` command line of README.md or docs/*.md whose command takes --dry-run
//   (run, prune, merge, factorize, quantize, upcycle): dry-run, with paths under /tmp/ moved into
//   the test's folder. Other commands (eval, inspect, ...) are not run here.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "support/paths.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;


// The documents whose examples are checked.
std::vector<fs::path> documents() {
  std::vector<fs::path> v = {kSrc / "README.md"};
  for (const auto& e : fs::directory_iterator(kSrc / "docs"))
    if (e.path().extension() == ".md") v.push_back(e.path());
  std::sort(v.begin(), v.end());
  return v;
}

// A fresh checkout's layout in `root`: data/ linked, recipes/ copied, build/moe-tool linked.
void fresh_layout(const fs::path& root) {
  fs::create_directory_symlink(kSrc / "data", root / "data");
  fs::copy(kSrc / "recipes", root / "recipes", fs::copy_options::recursive);
  fs::create_directories(root / "build");
  fs::create_symlink(tool_path(), root / "build" / "moe-tool");
}

// The contents of the fenced blocks (```) of a markdown file.
std::vector<std::string> fenced_blocks(const fs::path& md) {
  std::istringstream in(read_file(md));
  std::vector<std::string> blocks;
  std::string line, cur;
  bool inside = false;
  while (std::getline(in, line)) {
    if (line.rfind("```", 0) == 0) {
      if (inside) blocks.push_back(cur);
      cur.clear();
      inside = !inside;
      continue;
    }
    if (inside) cur += line + "\n";
  }
  return blocks;
}

// Command lines that start with build/moe-tool (fenced or indented), continuation lines joined,
// comments dropped.
std::vector<std::string> command_lines(const fs::path& md) {
  std::istringstream in(read_file(md));
  std::vector<std::string> out;
  std::string line, cur;
  while (std::getline(in, line)) {
    const auto first = line.find_first_not_of(' ');
    const std::string t = first == std::string::npos ? "" : line.substr(first);
    if (cur.empty() && t.rfind("build/moe-tool ", 0) != 0) continue;
    cur += (cur.empty() ? "" : " ") + t;
    if (!cur.empty() && cur.back() == '\\') {
      cur.pop_back();
      continue;
    }
    const auto hash = cur.find(" #");
    if (hash != std::string::npos) cur = cur.substr(0, hash);
    out.push_back(cur);
    cur.clear();
  }
  return out;
}

std::vector<std::string> words(const std::string& line) {
  std::istringstream in(line);
  std::vector<std::string> w;
  std::string s;
  while (in >> s) {
    if (s.size() >= 2 && (s.front() == '\'' || s.front() == '"') && s.back() == s.front()) s = s.substr(1, s.size() - 2);
    w.push_back(s);
  }
  return w;
}

class Examples : public ::testing::Test {
 protected:
  TempDir tmp{"moe-examples"};
  void SetUp() override { fresh_layout(tmp.path()); }
};

TEST_F(Examples, ShippedRecipesDryRunOnAFreshCheckout) {
  int n = 0;
  for (const auto& e : fs::directory_iterator(tmp / "recipes")) {
    if (e.path().extension() != ".json") continue;
    SCOPED_TRACE(e.path().filename().string());
    const RunResult r = run_tool({"-q", "run", "recipes/" + e.path().filename().string(), "--dry-run"}, tmp.path());
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    ++n;
  }
  EXPECT_GE(n, 15);
  EXPECT_FALSE(fs::exists(tmp / "build" / "recipes-out"));  // a dry run creates nothing
}

TEST_F(Examples, MoteChainOnAFreshCheckout) {
  // Step 1 runs (it makes what step 2 reads; 0.3 s), step 2 is dry-run (its GPTQ and evaluation
  // take seconds): together what `run recipes/mote/1-upcycle.json recipes/mote/2-quantize.json` checks.
  const RunResult up = run_tool({"-q", "run", "recipes/mote/1-upcycle.json"}, tmp.path());
  EXPECT_EQ(up.exit_code, 0) << up.describe();
  EXPECT_TRUE(fs::exists(tmp / "build/recipes-out/mote-upcycled/model.safetensors"));
  const RunResult q = run_tool({"-q", "run", "recipes/mote/2-quantize.json", "--dry-run"}, tmp.path());
  EXPECT_EQ(q.exit_code, 0) << q.describe();
  // Its recipes say "force": run again, step 1 replaces its own earlier output.
  const RunResult again = run_tool({"-q", "run", "recipes/mote/1-upcycle.json"}, tmp.path());
  EXPECT_EQ(again.exit_code, 0) << again.describe();
}

TEST_F(Examples, RecipesShownInTheDocs) {
  int n = 0;
  for (const auto& md : documents())
    for (const auto& block : fenced_blocks(md)) {
      json j;
      try {
        j = json::parse(block);
      } catch (const json::exception&) {
        continue;  // not a JSON example (shell, Python, a config excerpt)
      }
      if (!j.is_object() || !j.contains("model") || !j.contains("output") || !(j.contains("passes") || j.contains("upcycle")))
        continue;
      SCOPED_TRACE(md.filename().string() + ": " + block);
      // An output under /tmp goes to the test's folder (a file left there by a reader of the docs
      // would make the dry run refuse to overwrite it).
      json& out = j["output"];
      const json path = out.is_object() ? out.value("path", json()) : out;
      if (path.is_string() && path.get<std::string>().rfind("/tmp/", 0) == 0) {
        const std::string moved = (tmp / path.get<std::string>().substr(5)).string();
        if (out.is_object()) out["path"] = moved;
        else out = moved;
      }
      const fs::path file = tmp / "recipes" / ("example-" + std::to_string(n++) + ".json");
      write_file(file, j.dump(2));
      const RunResult r = run_tool({"-q", "run", file.lexically_relative(tmp.path()).string(), "--dry-run"}, tmp.path());
      EXPECT_EQ(r.exit_code, 0) << r.describe();
    }
  EXPECT_GE(n, 1);
}

TEST_F(Examples, CommandLinesInTheDocs) {
  const std::set<std::string> dry = {"run", "prune", "merge", "factorize", "quantize", "upcycle"};
  int n = 0;
  for (const auto& md : documents())
    for (const auto& line : command_lines(md)) {
      std::vector<std::string> w = words(line);
      if (w.size() < 2 || !dry.count(w[1])) continue;
      SCOPED_TRACE(md.filename().string() + ": " + line);
      std::vector<std::string> args = {"-q"};
      // Paths under /tmp (alone or as the value of --set path=/tmp/...) go to the test's folder.
      for (size_t i = 1; i < w.size(); ++i) {
        const size_t eq = w[i].find('=');
        const size_t at = w[i].rfind("/tmp/", 0) == 0 ? 0 : eq != std::string::npos && w[i].compare(eq + 1, 5, "/tmp/") == 0 ? eq + 1 : std::string::npos;
        args.push_back(at == std::string::npos ? w[i] : w[i].substr(0, at) + (tmp / w[i].substr(at + 1)).string());
      }
      args.push_back("--dry-run");
      const RunResult r = run_tool(args, tmp.path());
      EXPECT_EQ(r.exit_code, 0) << r.describe();
      ++n;
    }
  EXPECT_GE(n, 1);
}

}  // namespace
}  // namespace moe::test
