// Loading errors: each names the file and the JSON path, with the right error kind.
#include <gtest/gtest.h>

#include "core/error.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer_test_util.h"

namespace moe::tokenizer::test {
namespace {

using core::Error;
using core::ErrorKind;

// Runs fn, which must throw an Error of `kind`; returns its message.
template <typename Fn>
std::string error_of(ErrorKind kind, Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    return e.message();
  }
  ADD_FAILURE() << "no error thrown";
  return {};
}

// Loads tokenizer.json text from a scratch folder; returns the error message.
std::string load_error(ErrorKind kind, const std::string& tokenizer_json,
                       const std::string& config = "") {
  TempDir dir;
  write_file(dir / "tokenizer.json", tokenizer_json);
  if (!config.empty()) write_file(dir / "tokenizer_config.json", config);
  const std::string msg = error_of(kind, [&] { Tokenizer::load(dir.path()); });
  return msg;
}

std::string tokenizer_path(const TempDir& d) { return (d.path() / "tokenizer.json").string(); }

TEST(TokenizerErrors, MissingTokenizerJsonNamesPath) {
  TempDir dir;
  const std::string msg = error_of(ErrorKind::NotFound, [&] { Tokenizer::load(dir.path()); });
  EXPECT_NE(msg.find(tokenizer_path(dir)), std::string::npos) << msg;
  const std::string msg2 =
      error_of(ErrorKind::NotFound, [&] { Tokenizer::load("/nonexistent/moe-tool/dir"); });
  EXPECT_NE(msg2.find("/nonexistent/moe-tool/dir/tokenizer.json"), std::string::npos) << msg2;
}

TEST(TokenizerErrors, MalformedJsonNamesFile) {
  TempDir dir;
  write_file(dir / "tokenizer.json", "{\"model\": {\"type\": \"BPE\",");
  const std::string msg = error_of(ErrorKind::Corruption, [&] { Tokenizer::load(dir.path()); });
  EXPECT_EQ(msg.rfind(tokenizer_path(dir) + ": invalid JSON", 0), 0u) << msg;
}

TEST(TokenizerErrors, MalformedConfigNamesConfigFile) {
  TempDir dir;
  write_file(dir / "tokenizer.json", byte_level_json({}).dump());
  write_file(dir / "tokenizer_config.json", R"({"add_bos_token": "yes"})");
  const std::string msg = error_of(ErrorKind::Corruption, [&] { Tokenizer::load(dir.path()); });
  EXPECT_EQ(msg, (dir.path() / "tokenizer_config.json").string() +
                     ": add_bos_token: expected true or false, got string");
  write_file(dir / "tokenizer_config.json", R"({"bos_token": "<nope>"})");
  const std::string msg2 = error_of(ErrorKind::Corruption, [&] { Tokenizer::load(dir.path()); });
  EXPECT_NE(msg2.find("tokenizer_config.json: bos_token: \"<nope>\" is not in the vocabulary"),
            std::string::npos)
      << msg2;
}

TEST(TokenizerErrors, UnknownModelType) {
  Json j = byte_level_json({});
  j["model"]["type"] = "WordPiece";
  const std::string msg = error_of(ErrorKind::NotSupported, [&] {
    Tokenizer::from_json_text(j.dump(), "", "data/x/tokenizer.json");
  });
  EXPECT_EQ(msg, "data/x/tokenizer.json: model.type: model type \"WordPiece\" is not supported "
                 "(only BPE)");
}

TEST(TokenizerErrors, BadMergeShape) {
  Json j = byte_level_json({{"a", "b"}});
  j["model"]["merges"][0] = "ab";
  EXPECT_EQ(error_of(ErrorKind::Corruption,
                     [&] { Tokenizer::from_json_text(j.dump(), "", "data/tokenizer/tokenizer.json"); }),
            "data/tokenizer/tokenizer.json: model.merges[0]: expected \"a b\" string or [a,b] pair");
  j["model"]["merges"][0] = Json::array({"a", "b", "c"});
  EXPECT_EQ(error_of(ErrorKind::Corruption, [&] { Tokenizer::from_json_text(j.dump()); }),
            "tokenizer.json: model.merges[0]: expected \"a b\" string or [a,b] pair");
}

TEST(TokenizerErrors, MergeReferringToUnknownToken) {
  Json j = byte_level_json({{"a", "b"}, {"b", "c"}});
  j["model"]["merges"][1] = "b zz";
  const std::string msg = load_error(ErrorKind::Corruption, j.dump());
  EXPECT_NE(msg.find("tokenizer.json: model.merges[1]: token \"zz\" is not in the vocabulary"),
            std::string::npos)
      << msg;
  // Both parts known but the merged token missing.
  j = byte_level_json({{"a", "b"}});
  j["model"]["merges"][0] = "b c";
  EXPECT_NE(load_error(ErrorKind::Corruption, j.dump())
                .find("model.merges[0]: merged token \"bc\" is not in the vocabulary"),
            std::string::npos);
}

TEST(TokenizerErrors, BadRegexNamesPattern) {
  Json j = byte_level_json({});
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers",
                         {{{"type", "Split"},
                           {"pattern", {{"Regex", "(\\p{L}+"}}},
                           {"behavior", "Isolated"},
                           {"invert", false}}}}};
  const std::string msg = load_error(ErrorKind::Corruption, j.dump());
  EXPECT_NE(msg.find("tokenizer.json: pre_tokenizer.pretokenizers[0].pattern.Regex: regex "
                     "\"(\\p{L}+\": "),
            std::string::npos)
      << msg;
}

TEST(TokenizerErrors, UnsupportedComponentsAreRejected) {
  Json j = byte_level_json({});
  j["normalizer"] = {{"type", "Lowercase"}};
  EXPECT_NE(load_error(ErrorKind::NotSupported, j.dump()).find("normalizer.type: normalizer \"Lowercase\""),
            std::string::npos);
  j = byte_level_json({});
  j["pre_tokenizer"] = {{"type", "BertPreTokenizer"}};
  EXPECT_NE(load_error(ErrorKind::NotSupported, j.dump()).find("pre_tokenizer.type"),
            std::string::npos);
  j = byte_level_json({});
  j["decoder"] = {{"type", "WordPiece"}};
  EXPECT_NE(load_error(ErrorKind::NotSupported, j.dump()).find("decoder.type"), std::string::npos);
  j = byte_level_json({});
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "x"}}}, {"behavior", "Sideways"}};
  EXPECT_NE(load_error(ErrorKind::Corruption, j.dump())
                .find("pre_tokenizer.behavior: unknown split behavior \"Sideways\""),
            std::string::npos);
}

TEST(TokenizerErrors, MissingModelAndBadVocab) {
  EXPECT_EQ(error_of(ErrorKind::Corruption, [] { Tokenizer::from_json_text("{}"); }),
            "tokenizer.json: model: missing");
  Json j = byte_level_json({});
  j["model"]["vocab"]["x"] = "seven";
  EXPECT_NE(load_error(ErrorKind::Corruption, j.dump())
                .find("model.vocab.\"x\": expected an integer id, got string"),
            std::string::npos);
}

TEST(TokenizerErrors, DecodeUnknownId) {
  const Tokenizer tok = Tokenizer::from_json_text(byte_level_json({}).dump());
  EXPECT_NE(error_of(ErrorKind::InvalidArgument, [&] { tok.decode({5, 999}); }).find("999"),
            std::string::npos);
  EXPECT_NE(error_of(ErrorKind::InvalidArgument, [&] { tok.id_to_token(-1); }).find("-1"),
            std::string::npos);
}

}  // namespace
}  // namespace moe::tokenizer::test
