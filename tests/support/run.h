// Runs the built moe-tool binary (MOE_TOOL_BIN) as a child process and captures its output.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace moe::test {

struct RunResult {
  int exit_code = -1;  // exit status, or 128 + signal number when killed by a signal
  std::string out, err;
  // Lines of stderr (a trailing newline does not start a new line).
  std::vector<std::string> err_lines() const;
  // "exit 2, stderr: ..." for assertion messages.
  std::string describe() const;
};

// Runs `program` with `args` (argv[1..]); stdin is /dev/null. `cwd` empty: the current directory.
RunResult run_process(const std::string& program, const std::vector<std::string>& args,
                      const std::filesystem::path& cwd = {});
// Runs the moe-tool binary under test.
RunResult run_tool(const std::vector<std::string>& args, const std::filesystem::path& cwd = {});
std::string tool_path();

}  // namespace moe::test
