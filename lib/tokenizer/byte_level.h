// GPT-2's reversible byte <-> Unicode mapping ("bytes_to_unicode"), used by byte-level BPE
// (GPT-2, Qwen, OLMoE, DeepSeek, Llama-3): every byte of the UTF-8 text is replaced by one printable
// character, so the BPE vocabulary never needs raw control bytes or spaces (" " becomes "Ġ").
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace moe::tokenizer {

// The UTF-8 text of the character byte `b` maps to.
const std::string& byte_to_unicode(uint8_t b);

// The byte a mapped character stands for, or nullopt if `cp` is not in the mapping.
std::optional<uint8_t> unicode_to_byte(char32_t cp);

// Maps every byte of `text` through byte_to_unicode and appends the result to `out`.
void byte_level_encode(std::string_view text, std::string& out);

// HF's ByteLevel decoder for one token: if every character is in the mapping, appends the bytes it
// stands for and returns true; otherwise appends nothing and returns false.
bool byte_level_decode_token(std::string_view token, std::string& out);

}  // namespace moe::tokenizer
