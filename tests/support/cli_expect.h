// Checks shared by the CLI tests. Header-only (GoogleTest); not for the fuzz targets.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "support/run.h"
#include "support/synth.h"

namespace moe::test {

// A JSON file (config.json, moe_tool_report.json) parsed.
inline nlohmann::json read_json(const std::filesystem::path& p) { return nlohmann::json::parse(read_file(p)); }

// Bad input: exit 2 with one line on stderr that contains `needle`.
inline void expect_clean_failure(const RunResult& r, const std::string& needle) {
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_EQ(r.err_lines().size(), 1u) << r.describe();
  EXPECT_NE(r.err.find(needle), std::string::npos) << r.describe();
}

}  // namespace moe::test
