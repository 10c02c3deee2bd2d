// tokenizer.json "post_processor", for a single sequence: the ids put before and after the encoded
// text when special tokens are requested. Supported: null, ByteLevel (offsets only: no ids),
// TemplateProcessing (the "single" template: SpecialToken items around one Sequence "A"),
// RobertaProcessing / BertProcessing (cls A sep), and Sequence of these.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moe::tokenizer {

struct PostProcessor {
  std::vector<int32_t> prefix;
  std::vector<int32_t> suffix;

  static PostProcessor parse(const nlohmann::json& j, const std::string& path);
};

}  // namespace moe::tokenizer
