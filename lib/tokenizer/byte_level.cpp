#include "tokenizer/byte_level.h"

#include <array>

#include "tokenizer/utf8.h"

namespace moe::tokenizer {

namespace {

struct Tables {
  std::array<std::string, 256> to_unicode;
  std::array<int16_t, 512> to_byte;  // indexed by code point; -1 when unmapped (all cps < 324)
  Tables() {
    to_byte.fill(-1);
    // Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the remaining 68
    // bytes (controls, space, DEL, NBSP, soft hyphen, ...) map to U+0100, U+0101, ... in byte order.
    const auto keeps_itself = [](int b) {
      return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    };
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const char32_t cp = keeps_itself(b) ? static_cast<char32_t>(b) : static_cast<char32_t>(next++);
      append_utf8(to_unicode[b], cp);
      to_byte[cp] = static_cast<int16_t>(b);
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

}  // namespace

const std::string& byte_to_unicode(uint8_t b) { return tables().to_unicode[b]; }

std::optional<uint8_t> unicode_to_byte(char32_t cp) {
  const auto& t = tables();
  if (cp >= t.to_byte.size() || t.to_byte[cp] < 0) return std::nullopt;
  return static_cast<uint8_t>(t.to_byte[cp]);
}

void byte_level_encode(std::string_view text, std::string& out) {
  const auto& t = tables();
  out.reserve(out.size() + text.size() * 2);
  for (const char c : text) out += t.to_unicode[static_cast<unsigned char>(c)];
}

bool byte_level_decode_token(std::string_view token, std::string& out) {
  const size_t mark = out.size();
  size_t pos = 0;
  while (pos < token.size()) {
    const auto b = unicode_to_byte(next_code_point(token, pos));
    if (!b) {
      out.resize(mark);
      return false;
    }
    out.push_back(static_cast<char>(*b));
  }
  return true;
}

}  // namespace moe::tokenizer
