// The trained fixtures' texts: validation-tiny (the validation fixture, data/README.md) has its own
// corpus and tokenizer in data/text-validation; mixtral-tiny, qwen2moe-tiny and llama-tiny share
// data/text (calib.txt for calibration, heldout.txt for evaluation).
#pragma once

#include <filesystem>
#include <string>

namespace moe::bench {

inline std::filesystem::path fixture_text_dir(const std::filesystem::path& src, const std::string& name) {
  return src / (name == "validation-tiny" ? "data/text-validation" : "data/text");
}

}  // namespace moe::bench
