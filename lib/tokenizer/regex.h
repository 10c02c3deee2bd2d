// A compiled PCRE2 regular expression, as used by tokenizer.json's Split / Replace patterns and the
// GPT-2 ByteLevel pattern.
//
// HF tokenizers runs these patterns with Oniguruma (its SysRegex). We compile them with PCRE2 in
// UTF + UCP mode, so \p{L}, \p{N}, \s, \d, (?i:...) and look-arounds (?!\S) behave as Unicode
// classes, and with PCRE2_MULTILINE because Oniguruma's ^ and $ are always line anchors (DeepSeek's
// `\s+$` relies on that). \s / \S are mapped to the White_Space property (see regex.cpp). Known
// remaining difference: PCRE2's \w is [\p{L}\p{N}_], Oniguruma's also has marks (\p{M}).
// JIT is used when the library supports it.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace moe::tokenizer {

struct Span {
  size_t begin = 0;
  size_t end = 0;
};

class Regex {
 public:
  // Compiles `pattern`. Throws Error::corruption naming the pattern and PCRE2's message on failure.
  static Regex compile(std::string_view pattern);
  // A pattern matching `text` literally (HF's {"String": ...} patterns).
  static Regex literal(std::string_view text);

  // Appends every non-overlapping match in `subject` (valid UTF-8), left to right, with
  // Oniguruma's find_iter rule for empty matches: one that starts where the previous match ended
  // is skipped and the search moves one character on.
  void find_all(std::string_view subject, std::vector<Span>& out) const;

  // True when the pattern matches starting exactly at byte `offset` of `subject`.
  bool matches_at(std::string_view subject, size_t offset) const;

  const std::string& pattern() const;

  struct Code;  // the compiled pattern (defined in regex.cpp)

 private:
  explicit Regex(std::shared_ptr<const Code> code) : code_(std::move(code)) {}
  std::shared_ptr<const Code> code_;
};

}  // namespace moe::tokenizer
