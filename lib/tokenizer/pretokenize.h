// tokenizer.json "pre_tokenizer": cuts normalised text into words the model encodes one at a time.
// Supported (HF semantics):
//   Sequence   — each step runs on the pieces the previous one produced;
//   Split      — pattern {"Regex"} (PCRE2) or {"String"} (literal), behavior Removed / Isolated /
//                MergedWithPrevious / MergedWithNext / Contiguous, invert;
//   ByteLevel  — optional " " prefix (add_prefix_space, on every piece not starting with one),
//                optional GPT-2 regex split (use_regex), then the bytes_to_unicode mapping;
//   Metaspace  — " " -> replacement, prepend_scheme always / first / never (or legacy
//                add_prefix_space), optional split before each replacement (MergedWithNext);
//   Digits     — split off digits (individual_digits: one per piece).
// Anything else is rejected with Error::unsupported.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer/split.h"

namespace moe::tokenizer {

class PreTokenizer {
 public:
  // Parses the "pre_tokenizer" value (may be null); `path` names it in errors.
  static PreTokenizer parse(const nlohmann::json& j, const std::string& path);

  // Replaces every non-token piece by the pieces it splits into (added tokens pass through).
  void apply(std::vector<Piece>& pieces) const;

  // True when a ByteLevel step is present (the model then sees byte-level text).
  bool is_byte_level() const { return byte_level_; }

  struct Step;

 private:
  std::vector<std::shared_ptr<const Step>> steps_;
  bool byte_level_ = false;
};

// The GPT-2 pattern ByteLevel uses when use_regex is true.
inline constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

}  // namespace moe::tokenizer
