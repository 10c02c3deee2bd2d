#include "tokenizer/post_processor.h"

#include "core/error.h"
#include "tokenizer/json_fields.h"

namespace moe::tokenizer {

using core::Error;
using namespace json_fields;

namespace {

int32_t read_id(const Json& v, const std::string& path) {
  if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX) {
    fail(path, "expected a token id");
  }
  return static_cast<int32_t>(v.get<int64_t>());
}

// "cls": ["<s>", 0] -> 0
int32_t read_token_pair(const Json& j, std::string_view key, const std::string& path) {
  const Json& v = require(j, key, path);
  const std::string p = child(path, key);
  if (!v.is_array() || v.size() != 2 || !v[0].is_string()) fail(p, "expected [\"token\", id]");
  return read_id(v[1], child(p, 1));
}

void parse_into(const Json& j, const std::string& path, PostProcessor& out) {
  if (j.is_null()) return;
  expect_object(j, path);
  const std::string type = require_string(j, "type", path);
  if (type == "Sequence") {
    const Json& list = require(j, "processors", path);
    const std::string lp = child(path, "processors");
    if (!list.is_array()) fail(lp, "expected an array");
    // Each processor wraps the result of the previous one.
    for (size_t i = 0; i < list.size(); ++i) {
      PostProcessor inner;
      parse_into(list[i], child(lp, i), inner);
      out.prefix.insert(out.prefix.begin(), inner.prefix.begin(), inner.prefix.end());
      out.suffix.insert(out.suffix.end(), inner.suffix.begin(), inner.suffix.end());
    }
  } else if (type == "ByteLevel") {
    // Only trims offsets; adds no ids.
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    out.prefix.push_back(read_token_pair(j, "cls", path));
    out.suffix.push_back(read_token_pair(j, "sep", path));
  } else if (type == "TemplateProcessing") {
    // special_tokens: {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}, ...}
    const std::string sp = child(path, "special_tokens");
    const Json* specials = member(j, "special_tokens");
    if (specials && !specials->is_object()) fail(sp, "expected an object");
    const Json& single = require(j, "single", path);
    const std::string tp = child(path, "single");
    if (!single.is_array()) fail(tp, "expected an array");
    bool seen_sequence = false;
    for (size_t i = 0; i < single.size(); ++i) {
      const std::string ip = child(tp, i);
      const Json& item = single[i];
      if (const Json* s = member(item, "SpecialToken")) {
        const std::string name = require_string(*s, "id", child(ip, "SpecialToken"));
        const Json* def = specials ? member(*specials, name) : nullptr;
        if (!def) fail(ip, "special token \"" + name + "\" is not listed in " + sp);
        const std::string dp = child(sp, "\"" + name + "\"");
        const Json& ids = require(*def, "ids", dp);
        if (!ids.is_array()) fail(child(dp, "ids"), "expected an array");
        auto& dst = seen_sequence ? out.suffix : out.prefix;
        for (size_t k = 0; k < ids.size(); ++k) dst.push_back(read_id(ids[k], child(child(dp, "ids"), k)));
      } else if (const Json* s = member(item, "Sequence")) {
        const std::string id = require_string(*s, "id", child(ip, "Sequence"));
        if (id != "A" || seen_sequence) fail(ip, "the single template must contain sequence A once");
        seen_sequence = true;
      } else {
        fail(ip, "expected {\"SpecialToken\": ...} or {\"Sequence\": ...}");
      }
    }
    if (!seen_sequence) fail(tp, "the single template has no sequence A");
  } else {
    throw Error::unsupported(child(path, "type") + ": post-processor \"" + type +
                             "\" is not supported (supported: TemplateProcessing, ByteLevel, "
                             "RobertaProcessing, BertProcessing, Sequence)");
  }
}

}  // namespace

PostProcessor PostProcessor::parse(const nlohmann::json& j, const std::string& path) {
  PostProcessor p;
  parse_into(j, path, p);
  return p;
}

}  // namespace moe::tokenizer
