// tokenizer.json "added_tokens": tokens (special or not) that are recognised in the text before the
// model sees it and emitted as their own ids.
//
// HF AddedVocabulary semantics we follow:
//  - tokens with normalized=false are matched in the raw input, before the normalizer; tokens with
//    normalized=true are matched afterwards, in the normalised text, against their normalised
//    content;
//  - matching is leftmost-longest over all tokens (aho-corasick MatchKind::LeftmostLongest),
//    non-overlapping, left to right;
//  - single_word: a match with a word character (Rust regex \w) right before or after is dropped;
//  - lstrip / rstrip: the match swallows the whitespace to its left / right;
//  - special tokens match exactly anywhere, unless parse_special is off (split_special_tokens).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer/split.h"

namespace moe::tokenizer {

class Normalizer;

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = true;
  bool special = false;
};

class AddedVocabulary {
 public:
  // Parses the "added_tokens" array (may be null/absent); `path` names it in errors.
  static AddedVocabulary parse(const nlohmann::json& j, const std::string& path);

  // Builds the matchers; normalized tokens are matched by their content after `normalizer`.
  void prepare(const Normalizer& normalizer);

  // Cuts every non-token piece at the added tokens of one pass (normalized == false: the raw
  // pass; true: the pass after normalisation). Matched tokens become pieces with their id.
  // parse_special = false: special tokens are not recognised in the text (their strings are
  // tokenized as plain text, as llama.cpp's parse_special=false and HF's split_special_tokens do);
  // non-special added tokens still are.
  void split(std::vector<Piece>& pieces, bool normalized_pass, bool parse_special = true) const;

  const std::vector<AddedToken>& tokens() const { return tokens_; }
  const AddedToken* find(std::string_view content) const;
  const AddedToken* find(int32_t id) const;

 private:
  struct Matcher {
    // For each first byte, indices into tokens_ (with their match text) sorted longest first.
    std::array<std::vector<std::pair<std::string, uint32_t>>, 256> by_first_byte;
    bool empty = true;
  };
  void split_piece(const Piece& piece, const Matcher& m, std::vector<Piece>& out, bool parse_special) const;

  std::vector<AddedToken> tokens_;
  std::unordered_map<std::string, uint32_t> by_content_;
  std::unordered_map<int32_t, uint32_t> by_id_;
  Matcher raw_, normalized_;
};

}  // namespace moe::tokenizer
