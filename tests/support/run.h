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

// True in the AddressSanitizer build (scripts/test.sh's sanitizer stage), where code runs about ten
// times slower. Tests that assert numeric quality on the trained fixtures, or run every shipped
// recipe end to end, skip there (GTEST_SKIP with the reason): they run in the Release stage, and the
// code they reach is reached under the sanitizers by the other tests.
constexpr bool under_sanitizers() {
#if defined(__SANITIZE_ADDRESS__)
  return true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
  return true;
#else
  return false;
#endif
#else
  return false;
#endif
}
#define MOE_SKIP_UNDER_SANITIZERS()                                                           \
  do {                                                                                         \
    if (::moe::test::under_sanitizers())                                                       \
      GTEST_SKIP() << "numeric-quality / end-to-end test: runs in the Release stage, not under the sanitizers"; \
  } while (0)

}  // namespace moe::test
