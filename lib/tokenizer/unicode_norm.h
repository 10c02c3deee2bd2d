// Unicode normalisation forms (UAX #15) for the NFC / NFD / NFKC / NFKD normalizers of
// tokenizer.json (Qwen2 and GPT-NeoX-style tokenizers use NFC). Data: unicode_tables.cpp,
// generated from Python's unicodedata (Unicode 14.0 here); HF tokenizers' Rust crate may carry a
// newer Unicode version, which only matters for characters assigned since then.
#pragma once

#include <string>
#include <string_view>

namespace moe::tokenizer {

enum class NormalForm { NFC, NFD, NFKC, NFKD };

// `text` (valid UTF-8) in the given normalisation form.
std::string normalize_unicode(std::string_view text, NormalForm form);

// The Unicode version of the tables.
const char* unicode_tables_version();

}  // namespace moe::tokenizer
