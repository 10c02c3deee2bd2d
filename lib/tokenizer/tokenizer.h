// A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) with a BPE model: byte-level
// (GPT-2 / Qwen / OLMoE / DeepSeek / Llama-3) or SentencePiece-style (Llama / Mistral / Mixtral,
// with byte_fallback). encode() follows HF `tokenizers` step by step:
//   raw text -> invalid UTF-8 repaired (U+FFFD, see utf8.h) -> added tokens with normalized=false
//   cut out -> normalizer on each remaining piece -> added tokens with normalized=true cut out ->
//   pre_tokenizer -> BPE on each word -> post_processor ids (BOS/EOS) when add_special.
// decode() maps ids to token strings (added tokens by content) and runs the decoder.
//
// A Tokenizer is immutable after loading and cheap to copy (shared state); encode/decode may be
// called from several threads at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace moe::tokenizer {

class Tokenizer {
 public:
  // Reads dir/tokenizer.json (required) and dir/tokenizer_config.json (optional). Errors name the
  // file and the JSON path: Error::not_found for a missing tokenizer.json, Error::corruption for
  // malformed contents, Error::unsupported for valid settings we do not implement.
  static Tokenizer load(const std::filesystem::path& dir);

  // The same from in-memory JSON texts (config_json may be empty: no tokenizer_config.json).
  // `source` / `config_source` name the texts in error messages.
  static Tokenizer from_json_text(std::string_view tokenizer_json, std::string_view config_json = {},
                                  const std::string& source = "tokenizer.json",
                                  const std::string& config_source = "tokenizer_config.json");

  // Token ids of `text`; add_special adds the post-processor's BOS/EOS (as adjusted by
  // tokenizer_config's add_bos_token / add_eos_token). parse_special = false: special-token
  // strings in the text (e.g. "<|endoftext|>") are tokenized as plain text, not turned into their
  // ids (llama.cpp's parse_special = false, HF's split_special_tokens = True).
  std::vector<int32_t> encode(std::string_view text, bool add_special = true, bool parse_special = true) const;

  // Text of `ids`; skip_special drops special added tokens. Throws Error::invalid for an id with
  // no token.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  // 1 + the largest id of the model vocabulary and the added tokens (the embedding rows needed).
  size_t vocab_size() const;

  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  // Whether encode(text, true) starts with bos_id() / ends with eos_id().
  bool adds_bos() const;
  bool adds_eos() const;

  std::optional<int32_t> token_to_id(std::string_view token) const;
  // Throws Error::invalid for an id with no token.
  std::string id_to_token(int32_t id) const;
  // True for added tokens marked special.
  bool is_special(int32_t id) const;
  // The contents of the added tokens marked special (e.g. "<|endoftext|>", "<s>").
  std::vector<std::string> special_tokens() const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

}  // namespace moe::tokenizer
