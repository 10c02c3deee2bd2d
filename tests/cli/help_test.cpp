// Every help text names the methods `moe-tool list` names (both come from passes/passes.def):
// the top-level --help line of each pass command, and that command's --method option.
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "support/run.h"

namespace moe::test {
namespace {

using nlohmann::json;

// pass -> its methods, in list order, from `moe-tool list --json`.
std::map<std::string, std::vector<std::string>> listed_methods() {
  const auto r = run_tool({"list", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  std::map<std::string, std::vector<std::string>> m;
  for (const auto& p : json::parse(r.out)) m[p.at("pass").get<std::string>()].push_back(p.at("method").get<std::string>());
  return m;
}

// The line of `text` that starts (after spaces) with `word` followed by a space.
std::string line_starting(const std::string& text, const std::string& word) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    const auto b = line.find_first_not_of(' ');
    if (b != std::string::npos && line.compare(b, word.size() + 1, word + " ") == 0) return line;
  }
  return "";
}

bool has_word(const std::string& text, const std::string& word) {
  return std::regex_search(text, std::regex("(^|[^a-z0-9_])" + word + "([^a-z0-9_]|$)"));
}

TEST(Help, ListNamesEveryPassWithMethods) {
  const auto m = listed_methods();
  for (const char* pass : {"prune", "merge", "factorize", "quantize", "upcycle"}) {
    ASSERT_TRUE(m.count(pass)) << pass;
    EXPECT_GE(m.at(pass).size(), 2u) << pass;
  }
  EXPECT_EQ(m.at("prune").back(), "search");
  EXPECT_EQ(m.at("upcycle"), (std::vector<std::string>{"copy", "drop", "split"}));
}

TEST(Help, TopLevelHelpNamesEveryMethodOfEveryPass) {
  const auto r = run_tool({"--help"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  for (const auto& [pass, methods] : listed_methods()) {
    const std::string line = line_starting(r.out, pass);
    ASSERT_FALSE(line.empty()) << pass << " not in:\n" << r.out;
    for (const auto& method : methods) EXPECT_TRUE(has_word(line, method)) << method << " not in: " << line;
  }
}

TEST(Help, EachPassCommandsMethodOptionListsItsMethodsInOrder) {
  for (const auto& [pass, methods] : listed_methods()) {
    const auto r = run_tool({pass, "--help"});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    const std::string line = line_starting(r.out, "--method");
    if (pass == "upcycle") {  // its --method help is the recipe key's prose (pipeline/keys.def)
      for (const auto& method : methods) EXPECT_TRUE(has_word(line, method)) << method << " not in: " << line;
      continue;
    }
    std::smatch got;
    ASSERT_TRUE(std::regex_search(line, got, std::regex("Method: ([a-z0-9_, -]+) \\(see moe-tool list"))) << line;
    std::string want;
    for (const auto& method : methods) want += (want.empty() ? "" : ", ") + method;
    EXPECT_EQ(got[1].str(), want) << pass;
  }
}

}  // namespace
}  // namespace moe::test
