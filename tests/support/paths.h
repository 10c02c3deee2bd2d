// The source tree and the bundled data the tests read (absolute paths; MOE_SOURCE_DIR is set by
// tests/CMakeLists.txt). One definition for every test file: the test folders compile in unity
// batches, where two files defining the same name would collide.
// Each constant is built from MOE_SOURCE_DIR itself, and a test file's namespace-scope constants
// must be too (not from these): clang may run an ordinary global's initializer before an inline
// variable's, even one defined above it, and the global then reads an empty path.
#pragma once

#include <filesystem>

namespace moe::test {

inline const std::filesystem::path kSrc = MOE_SOURCE_DIR;
inline const std::filesystem::path kModel = std::filesystem::path(MOE_SOURCE_DIR) / "data/models/mixtral-tiny";  // the trained MoE fixture
inline const std::filesystem::path kLlama = std::filesystem::path(MOE_SOURCE_DIR) / "data/models/llama-tiny";    // the trained dense fixture
inline const std::filesystem::path kCalib = std::filesystem::path(MOE_SOURCE_DIR) / "data/text/calib.txt";       // calibration text
inline const std::filesystem::path kHeldout = std::filesystem::path(MOE_SOURCE_DIR) / "data/text/heldout.txt";   // held-out evaluation text

}  // namespace moe::test
