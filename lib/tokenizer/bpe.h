// The tokenizer.json "model" of type BPE: vocabulary, ranked merges, and HF's encoding of one word.
//
// Encoding a word (HF BPE::tokenize / Word::merge_all):
//  1. ignore_merges: a word that is itself in the vocabulary is one token;
//  2. every character becomes a symbol (with continuing_subword_prefix on non-first characters and
//     end_of_word_suffix on the last, when set); a character not in the vocabulary becomes its
//     UTF-8 bytes as <0xNN> tokens when byte_fallback is on and they all exist, else unk_token
//     (consecutive unknowns fused into one when fuse_unk), else it is dropped;
//  3. repeatedly merge the adjacent pair with the lowest merge rank (leftmost first on ties),
//     using a priority queue, until no pair has a merge.
// Results are cached per word (words up to 256 bytes), so repeated words cost one lookup; long
// SentencePiece-style words are cut before each "▁" first when that cannot change the result.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

namespace moe::tokenizer {

// Hash/equality that let unordered_map<std::string, ...> be searched with a string_view.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using Vocab = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

class BpeModel {
 public:
  // Parses the "model" object; `path` names it in errors. Throws Error::unsupported for a model
  // type other than BPE, Error::corruption for malformed vocab/merges.
  static std::unique_ptr<BpeModel> parse(const nlohmann::json& j, const std::string& path);

  BpeModel(const BpeModel&) = delete;
  BpeModel& operator=(const BpeModel&) = delete;

  // Appends the ids of `word` (one pre-tokenised piece) to `out`.
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  std::optional<int32_t> token_to_id(std::string_view token) const;
  // The token with this id, or nullptr if the model has none.
  const std::string* id_to_token(int32_t id) const;
  // 1 + the largest id in the vocabulary.
  size_t id_limit() const { return by_id_.size(); }
  size_t size() const { return vocab_.size(); }

 private:
  BpeModel() = default;
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  void encode_part(std::string_view word, std::vector<int32_t>& out) const;  // cached
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;

  Vocab vocab_;
  std::vector<const std::string*> by_id_;  // id -> token (nullptr for holes)
  std::unordered_map<uint64_t, Merge> merges_;
  std::optional<std::string> unk_token_;
  std::optional<int32_t> unk_id_;
  std::string continuing_subword_prefix_, end_of_word_suffix_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  std::array<int32_t, 256> byte_ids_{};  // id of <0xNN>, -1 if absent
  static constexpr std::string_view kMetaspace = "\xE2\x96\x81";  // U+2581 "▁"
  bool split_at_metaspace_ = false;

  static constexpr size_t kMaxCachedWordBytes = 256;
  static constexpr size_t kMaxCacheEntries = 200000;
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> cache_;
};

}  // namespace moe::tokenizer
