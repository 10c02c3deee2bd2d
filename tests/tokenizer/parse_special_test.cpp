// parse_special = false (llama.cpp's parse_special = false, HF's split_special_tokens): special
// tokens are not cut out of the text, non-special added tokens still are.
#include <gtest/gtest.h>

#include <algorithm>

#include "tokenizer/tokenizer.h"
#include "tokenizer_test_util.h"

namespace moe::tokenizer::test {
namespace {

Tokenizer sp_with_user_token() {
  Json j = sp_json();
  j["added_tokens"].push_back(added_token(266, "hoho", /*special=*/false));
  j["model"]["vocab"]["hoho"] = 266;
  return Tokenizer::from_json_text(j.dump());
}

TEST(ParseSpecial, SpecialStringsStayTextWhenOff) {
  const Tokenizer t = sp_with_user_token();
  const std::string text = "hi</s>hi";
  const auto on = t.encode(text, /*add_special=*/false, /*parse_special=*/true);
  const auto off = t.encode(text, false, false);
  EXPECT_EQ(std::count(on.begin(), on.end(), 2), 1);   // </s> became its id
  EXPECT_EQ(std::count(off.begin(), off.end(), 2), 0);  // read as text (byte fallback)
  EXPECT_GT(off.size(), on.size());
  // BOS from the post-processor is a separate choice.
  const auto off_bos = t.encode(text, true, false);
  ASSERT_FALSE(off_bos.empty());
  EXPECT_EQ(off_bos.front(), 1);
  EXPECT_EQ(std::vector<int32_t>(off_bos.begin() + 1, off_bos.end()), off);
}

TEST(ParseSpecial, NonSpecialAddedTokensStillMatch) {
  const Tokenizer t = sp_with_user_token();
  const auto off = t.encode("hi hoho", false, false);
  EXPECT_EQ(std::count(off.begin(), off.end(), 266), 1);
  EXPECT_EQ(off, t.encode("hi hoho", false, true));
}

TEST(ParseSpecial, SpecialTokenList) {
  const auto v = sp_with_user_token().special_tokens();
  EXPECT_EQ(v, (std::vector<std::string>{"<unk>", "<s>", "</s>"}));
}

}  // namespace
}  // namespace moe::tokenizer::test
