// The command reference in docs/commands/ follows the CLI: every subcommand `moe-tool --help` lists
// has a page docs/commands/<command>.md, and every flag its `--help` (and its own subcommands'
// `--help`, e.g. stats show / stats plot) prints appears on that page. The help is read at run
// time, so a flag or command added later fails this test until its page says what it is.
#include <gtest/gtest.h>

#include <cctype>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "support/run.h"

namespace {

namespace fs = std::filesystem;

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string help_of(const std::vector<std::string>& command) {
  std::vector<std::string> args = command;
  args.push_back("--help");
  auto r = moe::test::run_tool(args);
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  return r.out;
}

// The entries of one section ("Subcommands:", "Options:") of a CLI11 help text: the first word of
// each line indented by two spaces, up to the next blank line.
std::vector<std::string> section_names(const std::string& help, const std::string& header) {
  std::vector<std::string> names;
  std::istringstream in(help);
  std::string line;
  bool inside = false;
  while (std::getline(in, line)) {
    if (line == header) {
      inside = true;
    } else if (inside && line.empty()) {
      break;
    } else if (inside && line.rfind("  ", 0) == 0 && line.size() > 2 && line[2] != ' ') {
      names.push_back(line.substr(2, line.find(' ', 2) - 2));
    }
  }
  return names;
}

// Every long flag named in the option column of a help text ("-o,--output TEXT", "--no-uniform",
// "--add-special Excludes: --no-add-special" gives --add-special only).
std::set<std::string> flags_of(const std::string& help) {
  std::set<std::string> flags;
  static const std::regex flag(R"(--[A-Za-z0-9][A-Za-z0-9_-]*)");
  for (const auto& name : section_names(help, "Options:")) {
    for (std::sregex_iterator it(name.begin(), name.end(), flag), end; it != end; ++it)
      flags.insert(it->str());
  }
  return flags;
}

// `flag` appears on the page as a whole flag (not as the prefix of a longer one: --keep is not
// found in --keep-ratio).
bool page_names_flag(const std::string& page, const std::string& flag) {
  for (size_t at = page.find(flag); at != std::string::npos; at = page.find(flag, at + 1)) {
    size_t after = at + flag.size();
    if (after == page.size()) return true;
    char c = page[after];
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_')) return true;
  }
  return false;
}

TEST(Docs, EveryCommandHasAPageWithEveryFlagOfItsHelp) {
  const fs::path dir = fs::path(MOE_SOURCE_DIR) / "docs" / "commands";
  const auto commands = section_names(help_of({}), "Subcommands:");
  ASSERT_GE(commands.size(), 13u) << "moe-tool --help lists too few subcommands to parse";
  for (const auto& command : commands) {
    const fs::path page_path = dir / (command + ".md");
    ASSERT_TRUE(fs::exists(page_path)) << "no page " << page_path << " for `moe-tool " << command << "`";
    const std::string page = read_file(page_path);
    std::vector<std::vector<std::string>> helps = {{command}};
    const std::string help = help_of({command});
    for (const auto& sub : section_names(help, "Subcommands:")) helps.push_back({command, sub});
    for (const auto& args : helps) {
      const std::string h = args.size() == 1 ? help : help_of(args);
      const auto flags = flags_of(h);
      EXPECT_FALSE(flags.empty()) << "no flags parsed from the help of " << command;
      for (const auto& f : flags)
        EXPECT_TRUE(page_names_flag(page, f))
            << page_path.string() << " does not document " << f << " (moe-tool " << args[0]
            << (args.size() > 1 ? " " + args[1] : "") << " --help prints it)";
    }
  }
}

TEST(Docs, FlagMatchingIsWholeFlag) {
  EXPECT_TRUE(page_names_flag("`--keep` and `--keep-ratio`", "--keep"));
  EXPECT_FALSE(page_names_flag("`--keep-ratio` only", "--keep"));
  EXPECT_EQ(flags_of("Options:\n  -o,--output TEXT   x\n  --a Excludes: --b\n                 y\n\n"),
            (std::set<std::string>{"--output", "--a"}));
}

}  // namespace
