// tokenizer.json's Replace rule, shared by normalizers and decoders: every non-overlapping match of
// a {"String": ...} or {"Regex": ...} pattern, left to right, replaced by `content`.
#pragma once

#include <optional>
#include <string>

#include "tokenizer/json_fields.h"
#include "tokenizer/regex.h"

namespace moe::tokenizer {

struct ReplaceRule {
  std::optional<Regex> regex;  // {"Regex": ...}
  std::string literal;         // {"String": ...}
  std::string content;

  // Reads "pattern" and "content" of the object `j` at JSON path `path`.
  static ReplaceRule parse(const json_fields::Json& j, const std::string& path);
  std::string apply(const std::string& s) const;
};

// Every non-overlapping occurrence of `from` (left to right) replaced by `to`; `s` when from is empty.
std::string replace_all(const std::string& s, const std::string& from, const std::string& to);

}  // namespace moe::tokenizer
