// UTF-8 helpers for the tokenizer: validation, lossy repair, code point iteration.
//
// Invalid input policy (used by Tokenizer::encode): every maximal invalid subsequence is replaced
// by U+FFFD, exactly as Rust's String::from_utf8_lossy and Python's bytes.decode(errors="replace")
// do (the Unicode "maximal subpart" practice). HF tokenizers only ever sees valid Rust Strings, so
// this is the closest equivalent; it is also what PCRE2 with PCRE2_UTF requires.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace moe::tokenizer {

inline constexpr char32_t kReplacementChar = 0xFFFD;

// Length in bytes of the valid UTF-8 sequence starting at s[pos], or 0 if it is invalid there.
size_t valid_sequence_length(std::string_view s, size_t pos);

// True when `s` is entirely well-formed UTF-8 (no surrogates, no overlongs, <= U+10FFFF).
bool is_valid_utf8(std::string_view s);

// `s` with each maximal invalid subsequence replaced by U+FFFD (EF BF BD).
std::string repair_utf8(std::string_view s);

// Decodes the code point at s[pos] (s must be valid UTF-8 there) and advances pos past it.
char32_t next_code_point(std::string_view s, size_t& pos);

// Byte length of the UTF-8 sequence introduced by lead byte `c` (1 for ASCII and stray bytes).
inline size_t utf8_length_from_lead(unsigned char c) {
  if (c < 0xC0) return 1;
  if (c < 0xE0) return 2;
  if (c < 0xF0) return 3;
  return 4;
}

// Appends the UTF-8 encoding of `cp` to `out`.
void append_utf8(std::string& out, char32_t cp);

// Rust's char::is_whitespace (the Unicode White_Space property), used where HF uses `\s` from the
// Rust regex crate or is_whitespace().
bool is_white_space(char32_t cp);

}  // namespace moe::tokenizer
