// Behaviour of encode/decode on small hand-built tokenizers whose expected ids follow from the
// merge list by hand.
#include <gtest/gtest.h>

#include "tokenizer/tokenizer.h"
#include "tokenizer_test_util.h"

namespace moe::tokenizer::test {
namespace {

using Ids = std::vector<int32_t>;

Tokenizer from(const Json& j, const Json& config = Json()) {
  return Tokenizer::from_json_text(j.dump(), config.is_null() ? std::string() : config.dump());
}

// "hello world" merges: ids 256.. in this order.
const std::vector<std::pair<std::string, std::string>> kHelloMerges = {
    {"h", "e"},    {"l", "l"},     {"he", "ll"},    {"hell", "o"},  {" ", "w"},
    {"o", "r"},    {" w", "or"},   {" wor", "l"},   {" worl", "d"},
};

TEST(ByteLevelBpe, MergesByRank) {
  const Tokenizer tok = from(byte_level_json(kHelloMerges));
  EXPECT_EQ(tok.encode("hello world"), (Ids{259, 264}));
  EXPECT_EQ(tok.id_to_token(264), "\u0120world");  // Ġworld
  // Partial merges: "hel" -> he + l; " wo" -> " w" + o.
  EXPECT_EQ(tok.encode("hel wo"), (Ids{256, 'l', 260, 'o'}));
  EXPECT_EQ(tok.decode(tok.encode("hello world, hel wo!")), "hello world, hel wo!");
}

TEST(ByteLevelBpe, LowerRankWinsNotLeftmost) {
  // "abc": with b+c ranked first the result is a|bc; with a+b first it is ab|c.
  EXPECT_EQ(from(byte_level_json({{"b", "c"}, {"a", "b"}})).encode("abc"), (Ids{'a', 256}));
  EXPECT_EQ(from(byte_level_json({{"a", "b"}, {"b", "c"}})).encode("abc"), (Ids{256, 'c'}));
  // Equal ranks (the same pair twice): leftmost first, so "aaa" -> aa|a.
  EXPECT_EQ(from(byte_level_json({{"a", "a"}})).encode("aaa"), (Ids{256, 'a'}));
  EXPECT_EQ(from(byte_level_json({{"a", "a"}, {"aa", "aa"}})).encode("aaaaa"), (Ids{257, 'a'}));
}

TEST(ByteLevelBpe, MergesAsPairsEqualMergesAsStrings) {
  const Tokenizer strings = from(byte_level_json(kHelloMerges, /*as_pairs=*/false));
  const Tokenizer pairs = from(byte_level_json(kHelloMerges, /*as_pairs=*/true));
  for (const char* text : {"hello world", "hell, world!", "  well hello  ", "\u00e9t\u00e9 \U0001F642"}) {
    SCOPED_TRACE(text);
    EXPECT_EQ(strings.encode(text), pairs.encode(text));
    EXPECT_EQ(pairs.decode(pairs.encode(text)), text);
  }
}

TEST(ByteLevelBpe, Gpt2RegexPreTokenization) {
  // No merges: every byte is its own token, so the ids are just the bytes, whatever the split;
  // use merges that would cross a pre-token boundary to see the split.
  const Tokenizer tok = from(byte_level_json({{"o", " "}, {"'", "s"}, {" ", " "}}));
  // "o " never merges: ` ?\p{L}+` takes "o" and the space belongs to the next word.
  EXPECT_EQ(tok.encode("go home"), (Ids{'g', 'o', ' ', 'h', 'o', 'm', 'e'}));
  // "'s" is its own pre-token.
  EXPECT_EQ(tok.encode("it's"), (Ids{'i', 't', 257}));
  // `\s+(?!\S)`: of three spaces before a word, two form one pre-token, the last joins the word.
  EXPECT_EQ(tok.encode("a   b"), (Ids{'a', 258, ' ', 'b'}));
}

TEST(ByteLevelBpe, SplitPreTokenizerBehaviors) {
  Json j = byte_level_json({{"a", "-"}, {"-", "b"}, {"-", "-"}});
  auto with_split = [&](const std::string& behavior, bool invert = false) {
    j["pre_tokenizer"] = {
        {"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"}, {"pattern", {{"String", "-"}}}, {"behavior", behavior}, {"invert", invert}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
    return from(j);
  };
  EXPECT_EQ(with_split("Isolated").encode("a-b"), (Ids{'a', '-', 'b'}));
  EXPECT_EQ(with_split("Removed").encode("a-b"), (Ids{'a', 'b'}));
  EXPECT_EQ(with_split("MergedWithPrevious").encode("a-b"), (Ids{256, 'b'}));
  EXPECT_EQ(with_split("MergedWithNext").encode("a-b"), (Ids{'a', 257}));
  EXPECT_EQ(with_split("Isolated").encode("a--b"), (Ids{'a', '-', '-', 'b'}));
  EXPECT_EQ(with_split("Contiguous").encode("a--b"), (Ids{'a', 258, 'b'}));
  // invert: the matches are the content, the rest is the delimiter (here removed).
  EXPECT_EQ(with_split("Removed", true).encode("a-b"), (Ids{'-'}));
}

TEST(Normalizers, NfcAsInQwen2AndGptNeoX) {
  // Merges "é" (C3 A9) = 256, then "ét" = 257.
  Json j = byte_level_json({{"\xC3", "\xA9"}, {"\xC3\xA9", "t"}});
  j["normalizer"] = {{"type", "NFC"}};
  const Tokenizer tok = from(j);
  // "e" + COMBINING ACUTE is composed to "é" before the byte-level mapping.
  EXPECT_EQ(tok.encode("e\u0301t"), (Ids{257}));
  EXPECT_EQ(from(byte_level_json({{"\xC3", "\xA9"}, {"\xC3\xA9", "t"}})).encode("e\u0301t"),
            (Ids{'e', 0xCC, 0x81, 't'}));  // without the normalizer
  EXPECT_EQ(tok.decode(tok.encode("cafe\u0301")), "caf\u00e9");
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFKC"}}}}};
  EXPECT_EQ(from(j).encode("\uFB01"), (Ids{'f', 'i'}));  // LATIN SMALL LIGATURE FI
}

TEST(AddedTokens, SpecialTokenInTheMiddle) {
  const Tokenizer tok = from(byte_level_json(kHelloMerges, false, Json::array({added_token(300, "<|endoftext|>")})));
  EXPECT_EQ(tok.encode("hello<|endoftext|>hello"), (Ids{259, 300, 259}));
  // Text around the token is encoded as separate pieces (the space before it is not merged
  // into " w..." and stays a lone Ġ).
  EXPECT_EQ(tok.encode("hello <|endoftext|> world"), (Ids{259, ' ', 300, 264}));
  EXPECT_EQ(tok.encode("<|endoftext|><|endoftext|>"), (Ids{300, 300}));
  // A broken token is plain text.
  EXPECT_EQ(tok.encode("<|endoftext|").size(), 12u);
  EXPECT_EQ(tok.decode({259, 300, 264}), "hello<|endoftext|> world");
  EXPECT_EQ(tok.decode({259, 300, 264}, /*skip_special=*/true), "hello world");
  EXPECT_EQ(tok.vocab_size(), 301u);
}

TEST(AddedTokens, LongestMatchWins) {
  const Tokenizer tok = from(byte_level_json(
      {}, false, {added_token(300, "<|a|>"), added_token(301, "<|a|>b"), added_token(302, "|a")}));
  EXPECT_EQ(tok.encode("<|a|>bc"), (Ids{301, 'c'}));
  EXPECT_EQ(tok.encode("<|a|>c"), (Ids{300, 'c'}));
  // Leftmost first: "|a" at position 0 wins over "<|a|>" that would start later.
  EXPECT_EQ(tok.encode("|a|>"), (Ids{302, '|', '>'}));
}

TEST(AddedTokens, StripAndSingleWordFlags) {
  Json mask = added_token(300, "<mask>");
  mask["lstrip"] = true;
  Json both = added_token(301, "<both>");
  both["lstrip"] = both["rstrip"] = true;
  Json word = added_token(302, "cat", /*special=*/false);
  word["single_word"] = true;
  word["normalized"] = false;
  const Tokenizer tok = from(byte_level_json({}, false, {mask, both, word}));
  EXPECT_EQ(tok.encode("a <mask> b"), (Ids{'a', 300, ' ', 'b'}));
  EXPECT_EQ(tok.encode("a  <both>  b"), (Ids{'a', 301, 'b'}));
  EXPECT_EQ(tok.encode("a cat b"), (Ids{'a', ' ', 302, ' ', 'b'}));
  EXPECT_EQ(tok.encode("cat"), (Ids{302}));
  EXPECT_EQ(tok.encode("concat"), (Ids{'c', 'o', 'n', 'c', 'a', 't'}));
  EXPECT_EQ(tok.encode("cats"), (Ids{'c', 'a', 't', 's'}));
  EXPECT_FALSE(tok.is_special(302));
}

TEST(SentencePieceBpe, MetaspaceAndTemplateBos) {
  const Tokenizer tok = from(sp_json("first"));
  EXPECT_EQ(tok.encode("hi"), (Ids{1, 263}));
  EXPECT_EQ(tok.encode("hi", /*add_special=*/false), (Ids{263}));
  EXPECT_EQ(tok.encode("hi hi ho"), (Ids{1, 263, 263, 265}));
  EXPECT_EQ(tok.encode(""), (Ids{1}));
  // Strip removes the leading space only when it is the first character (not after "<s>").
  EXPECT_EQ(tok.decode({1, 263, 263, 265}), "<s> hi hi ho");
  EXPECT_EQ(tok.decode({1, 263, 263, 265}, true), "hi hi ho");
  EXPECT_TRUE(tok.adds_bos());
  EXPECT_EQ(tok.bos_id(), 1);
}

TEST(SentencePieceBpe, PrependSchemeFirstVsAlwaysAfterSpecialToken) {
  // "first": only the piece at the very start of the input gets "▁".
  EXPECT_EQ(from(sp_json("first")).encode("<s>hi", false), (Ids{1, 260, 261}));
  EXPECT_EQ(from(sp_json("always")).encode("<s>hi", false), (Ids{1, 263}));
  EXPECT_EQ(from(sp_json("never")).encode("hi", false), (Ids{260, 261}));
  // A text starting with " " is not given a second "▁".
  EXPECT_EQ(from(sp_json("first")).encode(" hi", false), (Ids{263}));
}

TEST(SentencePieceBpe, ByteFallbackAndUnknown) {
  const Tokenizer tok = from(sp_json());
  // "é" is C3 A9: two byte tokens (3 + byte).
  EXPECT_EQ(tok.encode("h\u00e9", false), (Ids{262, 3 + 0xC3, 3 + 0xA9}));
  EXPECT_EQ(tok.decode(tok.encode("h\u00e9 \U0001F642 hi", false)), "h\u00e9 \U0001F642 hi");
  // A lone byte token that is not valid UTF-8 decodes as U+FFFD per byte.
  EXPECT_EQ(tok.decode({263, 3 + 0xC3}), "hi\uFFFD");
  // Without byte_fallback: unknown characters become <unk>, fused or not.
  EXPECT_EQ(from(sp_json("first", false, true)).encode("\u00e9\u00e9h", false), (Ids{259, 0, 260}));
  EXPECT_EQ(from(sp_json("first", false, false)).encode("\u00e9\u00e9h", false),
            (Ids{259, 0, 0, 260}));
}

TEST(SentencePieceBpe, LegacyNormalizerLayout) {
  // Older Llama files: normalizer Prepend("▁") + Replace(" " -> "▁"), no pre-tokenizer. The
  // normalizer runs on each piece between added tokens, so "<s>hi" gets "▁hi".
  Json j = sp_json();
  j["pre_tokenizer"] = nullptr;
  j["normalizer"] = {
      {"type", "Sequence"},
      {"normalizers",
       {{{"type", "Prepend"}, {"prepend", "\u2581"}},
        {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\u2581"}}}}};
  const Tokenizer tok = from(j);
  EXPECT_EQ(tok.encode("hi hi", false), (Ids{263, 263}));
  EXPECT_EQ(tok.encode("<s>hi", false), (Ids{1, 263}));
  EXPECT_EQ(tok.decode(tok.encode("hi ho hi")), "<s> hi ho hi");
}

TEST(SentencePieceBpe, RegexReplaceRules) {
  // Replace with a {"Regex": ...} pattern, in the normalizer (" +" -> "▁": runs of spaces become
  // one "▁", where the String pattern " " would give one per space) and in the decoder.
  Json j = sp_json();
  j["pre_tokenizer"] = nullptr;
  j["normalizer"] = {
      {"type", "Sequence"},
      {"normalizers",
       {{{"type", "Prepend"}, {"prepend", "\u2581"}},
        {{"type", "Replace"}, {"pattern", {{"Regex", " +"}}}, {"content", "\u2581"}}}}};
  j["decoder"]["decoders"][0]["pattern"] = {{"Regex", "\u2581"}};
  const Tokenizer tok = from(j);
  EXPECT_EQ(tok.encode("hi   hi", false), (Ids{263, 263}));
  EXPECT_EQ(tok.decode(tok.encode("hi  ho hi")), "<s> hi ho hi");
}

TEST(SentencePieceBpe, LongTextSplitsLikeOneWord) {
  // Long single words are cut before each "▁" (an optimisation): results must not change.
  const Tokenizer tok = from(sp_json());
  std::string text;
  Ids want;
  for (int i = 0; i < 500; ++i) {
    text += i ? " hi ho h\u00e9" : "hi ho h\u00e9";
    for (int32_t id : {263, 265, 262, 3 + 0xC3, 3 + 0xA9}) want.push_back(id);
  }
  EXPECT_EQ(tok.encode(text, false), want);
}

TEST(TokenizerConfig, AddBosTokenControlsBos) {
  const Json j = sp_json();
  EXPECT_EQ(from(j, {{"add_bos_token", false}}).encode("hi"), (Ids{263}));
  EXPECT_FALSE(from(j, {{"add_bos_token", false}}).adds_bos());
  EXPECT_EQ(from(j, {{"add_bos_token", true}, {"bos_token", {{"content", "<s>"}}}}).encode("hi"),
            (Ids{1, 263}));
  EXPECT_EQ(from(j, {{"add_eos_token", true}, {"eos_token", "</s>"}}).encode("hi"),
            (Ids{1, 263, 2}));
  // A byte-level tokenizer without a template gets BOS from the config alone.
  Json b = byte_level_json({}, false, Json::array({added_token(300, "<bos>")}));
  const Tokenizer t2 = from(b, {{"add_bos_token", true}, {"bos_token", "<bos>"}});
  EXPECT_EQ(t2.encode("a"), (Ids{300, 'a'}));
  EXPECT_EQ(t2.encode("a", false), (Ids{'a'}));
  EXPECT_TRUE(t2.adds_bos());
  EXPECT_EQ(from(b, {{"bos_token", "<bos>"}}).encode("a"), (Ids{'a'}));
}

}  // namespace
}  // namespace moe::tokenizer::test
