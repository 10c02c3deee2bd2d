// Native quantized fixtures and their compressed-tensors / GPTQ / AWQ exports, made through the
// CLI for the tests of `export --format` and of packed inputs (io/packed_input.h).
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moe::test {

// `moe-tool quantize data/models/FIXTURE DIR/TAG --method rtn FLAGS...` (e.g. {"--codec", "int4",
// "--group", "32", "--sym"}); the output folder. A failed run is a test failure (EXPECT).
std::filesystem::path quantize_rtn(const std::filesystem::path& dir, const std::string& fixture, const std::string& tag,
                                   const std::vector<std::string>& flags);

// `moe-tool export NATIVE OUT --format FORMAT --json` ("compressed-tensors", "gptq" or "awq"): the
// printed result, or null when the run failed (a test failure: exit 0 and an empty stderr are
// EXPECTed).
nlohmann::json export_packed(const std::filesystem::path& native, const std::filesystem::path& out, const std::string& format);

}  // namespace moe::test
