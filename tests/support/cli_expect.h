// Checks shared by the CLI tests. Header-only (GoogleTest); not for the fuzz targets.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "support/paths.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {

// A JSON file (config.json, moe_tool_report.json) parsed.
inline nlohmann::json read_json(const std::filesystem::path& p) { return nlohmann::json::parse(read_file(p)); }

// `moe-tool eval MODEL --json` on the held-out text (ctx 32, the first `max_windows` windows),
// parsed; null (and a failed expectation) when the command failed.
inline nlohmann::json eval_json(const std::filesystem::path& model, int max_windows) {
  const RunResult r = run_tool({"-q", "eval", model.string(), "--text", kHeldout.string(), "--ctx", "32", "--max-windows",
                                std::to_string(max_windows), "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  return r.exit_code == 0 ? nlohmann::json::parse(r.out) : nlohmann::json();
}

// Bad input: exit 2 with one line on stderr that contains `needle`.
inline void expect_clean_failure(const RunResult& r, const std::string& needle) {
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_EQ(r.err_lines().size(), 1u) << r.describe();
  EXPECT_NE(r.err.find(needle), std::string::npos) << r.describe();
}

}  // namespace moe::test
