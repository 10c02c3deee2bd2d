// The source tree and the bundled data the tests read (absolute paths; MOE_SOURCE_DIR is set by
// tests/CMakeLists.txt). One definition for every test file: the test folders compile in unity
// batches, where two files defining the same name would collide.
#pragma once

#include <filesystem>

namespace moe::test {

inline const std::filesystem::path kSrc = MOE_SOURCE_DIR;
inline const std::filesystem::path kModel = kSrc / "data/models/mixtral-tiny";  // the trained MoE fixture
inline const std::filesystem::path kLlama = kSrc / "data/models/llama-tiny";    // the trained dense fixture
inline const std::filesystem::path kCalib = kSrc / "data/text/calib.txt";       // calibration text
inline const std::filesystem::path kHeldout = kSrc / "data/text/heldout.txt";   // held-out evaluation text

}  // namespace moe::test
