#include "support/packed_fixture.h"

#include <gtest/gtest.h>

#include "support/paths.h"
#include "support/run.h"

namespace moe::test {

namespace fs = std::filesystem;

fs::path quantize_rtn(const fs::path& dir, const std::string& fixture, const std::string& tag,
                      const std::vector<std::string>& flags) {
  const fs::path out = dir / tag;
  std::vector<std::string> args = {"-q", "quantize", (kSrc / "data/models" / fixture).string(), out.string(), "--method", "rtn"};
  args.insert(args.end(), flags.begin(), flags.end());
  const RunResult r = run_tool(args);
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  return out;
}

nlohmann::json export_packed(const fs::path& native, const fs::path& out, const std::string& format) {
  const RunResult r = run_tool({"-q", "export", native.string(), out.string(), "--format", format, "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(r.err, "");
  return r.exit_code == 0 ? nlohmann::json::parse(r.out) : nlohmann::json();
}

}  // namespace moe::test
