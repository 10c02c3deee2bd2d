// The pipeline's building blocks: UTF-8 repair, the byte-level table, PCRE2 wrapper, split
// behaviours and decoders.
#include <gtest/gtest.h>

#include "tokenizer/byte_level.h"
#include "tokenizer/decoder.h"
#include "tokenizer/regex.h"
#include "tokenizer/split.h"
#include "tokenizer/unicode_norm.h"
#include "tokenizer/utf8.h"
#include "tokenizer_test_util.h"

namespace moe::tokenizer::test {
namespace {

TEST(Utf8, RepairUsesMaximalSubparts) {
  EXPECT_TRUE(is_valid_utf8("plain \u00e9\u4e2d\U0001F642"));
  EXPECT_FALSE(is_valid_utf8("\xC3"));
  EXPECT_EQ(repair_utf8("ok"), "ok");
  EXPECT_EQ(repair_utf8("a\xC3"), "a\uFFFD");                 // truncated 2-byte
  EXPECT_EQ(repair_utf8("\xF0\x9F\x99z"), "\uFFFDz");         // truncated 4-byte: one U+FFFD
  EXPECT_EQ(repair_utf8("\xE0\x80\x80"), "\uFFFD\uFFFD\uFFFD");  // overlong: per byte
  EXPECT_EQ(repair_utf8("\xF4\x90\x80\x80"), "\uFFFD\uFFFD\uFFFD\uFFFD");  // > U+10FFFF
  EXPECT_EQ(repair_utf8("\xFF\xFE"), "\uFFFD\uFFFD");
  EXPECT_EQ(repair_utf8("\xE2\x82\xAC"), "\u20AC");  // valid stays
}

TEST(UnicodeNormalization, FourForms) {
  // Marks below and above in either order compose to the same character (canonical ordering).
  EXPECT_EQ(normalize_unicode("a\u0323\u0302", NormalForm::NFC), "\u1EAD");
  EXPECT_EQ(normalize_unicode("a\u0302\u0323", NormalForm::NFC), "\u1EAD");
  EXPECT_EQ(normalize_unicode("\u1EAD", NormalForm::NFD), "a\u0323\u0302");
  // Hangul: jamo compose arithmetically; a syllable decomposes.
  EXPECT_EQ(normalize_unicode("\u1100\u1161\u11A8", NormalForm::NFC), "\uAC01");
  EXPECT_EQ(normalize_unicode("\uAC01", NormalForm::NFD), "\u1100\u1161\u11A8");
  // Composition exclusions and singletons stay decomposed / mapped.
  EXPECT_EQ(normalize_unicode("\u0344", NormalForm::NFC), "\u0308\u0301");
  EXPECT_EQ(normalize_unicode("\u212B", NormalForm::NFC), "\u00C5");  // ANGSTROM SIGN
  // Compatibility forms only in NFK*.
  EXPECT_EQ(normalize_unicode("\uFB01\u00BD", NormalForm::NFC), "\uFB01\u00BD");
  EXPECT_EQ(normalize_unicode("\uFB01\u00BD", NormalForm::NFKC), "fi1\u20442");
  EXPECT_EQ(normalize_unicode("\u00C5", NormalForm::NFKD), "A\u030A");
  EXPECT_EQ(normalize_unicode("plain ASCII", NormalForm::NFKD), "plain ASCII");
}

TEST(ByteLevelTable, Gpt2Mapping) {
  EXPECT_EQ(byte_to_unicode(' '), "\u0120");   // Ġ
  EXPECT_EQ(byte_to_unicode('\n'), "\u010A");  // Ċ
  EXPECT_EQ(byte_to_unicode('A'), "A");
  EXPECT_EQ(byte_to_unicode(0xAD), "\u0143");  // soft hyphen is remapped
  EXPECT_EQ(byte_to_unicode(0xFF), "\u00FF");
  for (int b = 0; b < 256; ++b) {
    std::string s = byte_to_unicode(static_cast<uint8_t>(b));
    size_t pos = 0;
    EXPECT_EQ(unicode_to_byte(next_code_point(s, pos)), b);
  }
  EXPECT_FALSE(unicode_to_byte(0x4E2D).has_value());
}

std::vector<std::string> pieces_of(const std::string& text, const std::string& pattern,
                                   SplitBehavior behavior, bool invert = false) {
  const Regex re = Regex::compile(pattern);
  std::vector<Span> m;
  re.find_all(text, m);
  std::vector<Piece> out;
  split_at(Piece{text, -1, true}, m, behavior, invert, out);
  std::vector<std::string> s;
  for (const Piece& p : out) s.push_back(p.text);
  return s;
}

using Strs = std::vector<std::string>;

TEST(Split, BehaviorsMatchHf) {
  // Examples from HF's normalizer.rs tests (split on "-" or " ").
  const std::string t = "The-final--countdown";
  EXPECT_EQ(pieces_of(t, "-", SplitBehavior::Removed), (Strs{"The", "final", "countdown"}));
  EXPECT_EQ(pieces_of(t, "-", SplitBehavior::Isolated),
            (Strs{"The", "-", "final", "-", "-", "countdown"}));
  EXPECT_EQ(pieces_of(t, "-", SplitBehavior::MergedWithPrevious),
            (Strs{"The-", "final-", "-", "countdown"}));
  EXPECT_EQ(pieces_of(t, "-", SplitBehavior::MergedWithNext),
            (Strs{"The", "-final", "-", "-countdown"}));
  EXPECT_EQ(pieces_of(t, "-", SplitBehavior::Contiguous),
            (Strs{"The", "-", "final", "--", "countdown"}));
  EXPECT_EQ(pieces_of(t, "-", SplitBehavior::Removed, true), (Strs{"-", "-", "-"}));
}

TEST(Regex, UnicodeClassesAndLookahead) {
  const Regex re = Regex::compile(R"(\p{L}+|\s+(?!\S)|\s+)");
  std::vector<Span> m;
  re.find_all("\u00e9t\u00e9   x", m);
  ASSERT_EQ(m.size(), 4u);
  EXPECT_EQ(m[0].end, 5u);                       // "été" is 5 bytes
  EXPECT_EQ(m[1].end - m[1].begin, 2u);          // two spaces not followed by non-space
  EXPECT_EQ(m[2].end - m[2].begin, 1u);          // the last space
  // Case-insensitive group as in the Qwen2 pattern.
  const Regex ci = Regex::compile(R"((?i:'s|'t))");
  EXPECT_TRUE(ci.matches_at("'S", 0));
  // \s is Unicode White_Space (as Oniguruma / Rust / Python regex): U+0085 and U+3000 are
  // spaces, U+180E (Mongolian vowel separator, PCRE2's own \s) and U+200B are not.
  const Regex ws = Regex::compile(R"(^\s$)");
  EXPECT_TRUE(ws.matches_at("\u0085", 0));
  EXPECT_TRUE(ws.matches_at("\u3000", 0));
  EXPECT_FALSE(ws.matches_at("\u180E", 0));
  EXPECT_FALSE(ws.matches_at("\u200B", 0));
  EXPECT_TRUE(Regex::compile(R"([^\s\p{L}])").matches_at("\u180E", 0));
  EXPECT_FALSE(Regex::compile(R"(\S)").matches_at("\u00A0", 0));
  // Escapes other than \s / \S are untouched, also inside \Q...\E.
  EXPECT_TRUE(Regex::compile(R"(\\s)").matches_at("\\s", 0));
  EXPECT_TRUE(Regex::compile(R"(\Q\s\E\s)").matches_at("\\s ", 0));
  // Oniguruma's $ is an end-of-line anchor.
  m.clear();
  Regex::compile(R"(\s+$)").find_all("a  \nb ", m);
  EXPECT_EQ(m.size(), 2u);
  m.clear();
  // Empty matches do not loop forever.
  m.clear();
  Regex::compile("x*").find_all("abc", m);
  EXPECT_EQ(m.size(), 4u);
  // No empty match right after a match (onig): "xa" gives [0,1) and [2,2) only.
  m.clear();
  Regex::compile("x*").find_all("xa", m);
  ASSERT_EQ(m.size(), 2u);
  EXPECT_EQ(m[1].begin, 2u);
}

TEST(Decoders, SentencePieceChain) {
  const Json j = sp_json();
  const Decoder d = Decoder::parse(j.at("decoder"), "decoder");
  EXPECT_EQ(d.decode({"\u2581Hello", "\u2581", "<0xE2>", "<0x82>", "<0xAC>", "!"}), "Hello \u20AC!");
  // An incomplete byte run decodes as one U+FFFD per byte.
  EXPECT_EQ(d.decode({"\u2581a", "<0xE2>", "<0x82>", "b"}), "a\uFFFD\uFFFDb");
  // Strip removes at most one leading space.
  EXPECT_EQ(d.decode({"\u2581\u2581x"}), " x");
}

TEST(Decoders, MetaspaceAndNull) {
  const Decoder m = Decoder::parse(
      {{"type", "Metaspace"}, {"replacement", "\u2581"}, {"prepend_scheme", "always"}}, "decoder");
  EXPECT_EQ(m.decode({"\u2581Hey", "\u2581friend!"}), "Hey friend!");
  const Decoder never = Decoder::parse(
      {{"type", "Metaspace"}, {"replacement", "\u2581"}, {"prepend_scheme", "never"}}, "decoder");
  EXPECT_EQ(never.decode({"\u2581Hey", "\u2581friend!"}), " Hey friend!");
  EXPECT_EQ(Decoder::parse(nullptr, "decoder").decode({"a", "b"}), "a b");
}

TEST(Decoders, ByteLevelKeepsUnmappedTokensAndRepairs) {
  const Decoder d = Decoder::parse({{"type", "ByteLevel"}}, "decoder");
  EXPECT_EQ(d.decode({"\u0120hello", "<|endoftext|>", "\u4e2d"}), " hello<|endoftext|>\u4e2d");
  // Bytes that do not form UTF-8 are replaced lossily.
  EXPECT_EQ(d.decode({bl("\xC3"), "a"}), "\uFFFDa");
}

}  // namespace
}  // namespace moe::tokenizer::test
