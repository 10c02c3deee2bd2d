// Helpers shared by the tokenizer tests: fixture paths, file reading, tiny tokenizer.json builders.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "support/synth.h"
#include "tokenizer/byte_level.h"

namespace moe::tokenizer::test {

using Json = nlohmann::json;

inline std::filesystem::path source_dir() { return std::filesystem::path(MOE_SOURCE_DIR); }

// Reads a whole file; a missing file is a test failure (not a skip): the fixtures are part of the
// tree and the golden tests must not pass silently without them.
inline std::string read_file_or_fail(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) {
    ADD_FAILURE() << "missing fixture file " << p.string();
    return {};
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Scratch folders (removed at the end of the test) and file writing: the shared test helpers.
using moe::test::TempDir;
using moe::test::write_file;

inline std::string bl(const std::string& plain) {
  std::string out;
  byte_level_encode(plain, out);
  return out;
}

// A tiny byte-level tokenizer.json: ids 0..255 are the byte characters (id == byte value), then
// one id per merge in order (256, 257, ...), then any added tokens the caller lists. Merges are
// given in plain text ({"h", "e"}) and written in byte-level form, as "a b" strings or [a, b].
inline Json byte_level_json(const std::vector<std::pair<std::string, std::string>>& merges,
                            bool merges_as_pairs = false, Json added_tokens = Json::array()) {
  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_to_unicode(static_cast<uint8_t>(b))] = b;
  Json jm = Json::array();
  int next = 256;
  for (const auto& [a, b] : merges) {
    const std::string merged = bl(a) + bl(b);
    if (!vocab.contains(merged)) vocab[merged] = next++;
    if (merges_as_pairs) jm.push_back(Json::array({bl(a), bl(b)}));
    else jm.push_back(bl(a) + " " + bl(b));
  }
  const Json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false},
                           {"trim_offsets", true}, {"use_regex", true}};
  return {
      {"version", "1.0"},
      {"added_tokens", std::move(added_tokens)},
      {"normalizer", nullptr},
      {"pre_tokenizer", byte_level},
      {"post_processor", byte_level},
      {"decoder", byte_level},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"fuse_unk", false},
        {"byte_fallback", false}, {"vocab", vocab}, {"merges", jm}}},
  };
}

inline Json added_token(int id, const std::string& content, bool special = true) {
  return {{"id", id},         {"content", content}, {"single_word", false}, {"lstrip", false},
          {"rstrip", false},  {"normalized", !special}, {"special", special}};
}

// A tiny SentencePiece-style tokenizer.json (Llama layout): <unk>=0, <s>=1, </s>=2,
// <0x00>..<0xFF> = 3..258, then "▁"=259, "h"=260, "i"=261, "▁h"=262, "▁hi"=263, "o"=264,
// "▁ho"=265. Metaspace pre-tokenizer (prepend_scheme `scheme`), byte_fallback, fuse_unk,
// TemplateProcessing "<s> $A", decoder Sequence[Replace, ByteFallback, Fuse, Strip].
inline Json sp_json(const std::string& scheme = "first", bool byte_fallback = true,
                    bool fuse_unk = true) {
  Json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    vocab[name] = 3 + b;
  }
  vocab["\u2581"] = 259;
  vocab["h"] = 260;
  vocab["i"] = 261;
  vocab["\u2581h"] = 262;
  vocab["\u2581hi"] = 263;
  vocab["o"] = 264;
  vocab["\u2581ho"] = 265;
  return {
      {"version", "1.0"},
      {"added_tokens", {added_token(0, "<unk>"), added_token(1, "<s>"), added_token(2, "</s>")}},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Metaspace"}, {"replacement", "\u2581"}, {"prepend_scheme", scheme},
        {"split", false}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                    {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"pair", Json::array()},
        {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
      {"decoder",
       {{"type", "Sequence"},
        {"decoders",
         {{{"type", "Replace"}, {"pattern", {{"String", "\u2581"}}}, {"content", " "}},
          {{"type", "ByteFallback"}},
          {{"type", "Fuse"}},
          {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", "<unk>"}, {"fuse_unk", fuse_unk},
        {"byte_fallback", byte_fallback}, {"vocab", vocab},
        {"merges", Json::array({Json::array({"\u2581", "h"}), Json::array({"\u2581h", "i"}),
                                Json::array({"\u2581h", "o"})})}}},
  };
}

}  // namespace moe::tokenizer::test
