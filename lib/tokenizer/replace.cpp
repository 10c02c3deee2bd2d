#include "tokenizer/replace.h"

#include <vector>

#include "core/error.h"

namespace moe::tokenizer {

using namespace json_fields;

ReplaceRule ReplaceRule::parse(const Json& j, const std::string& path) {
  ReplaceRule r;
  auto [is_regex, pat] = pattern(j, "pattern", path);
  r.content = require_string(j, "content", path);
  if (is_regex)
    r.regex = core::with_context(child(path, "pattern.Regex"), [&pat = pat] { return Regex::compile(pat); });
  else
    r.literal = std::move(pat);
  return r;
}

std::string ReplaceRule::apply(const std::string& s) const {
  if (!regex) return replace_all(s, literal, content);
  std::vector<Span> hits;
  regex->find_all(s, hits);
  if (hits.empty()) return s;
  std::string out;
  size_t pos = 0;
  for (const Span& h : hits) {
    out.append(s, pos, h.begin - pos);
    out += content;
    pos = h.end;
  }
  out.append(s, pos, std::string::npos);
  return out;
}

std::string replace_all(const std::string& s, const std::string& from, const std::string& to) {
  if (from.empty() || s.find(from) == std::string::npos) return s;
  std::string out;
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size()) {
    out.append(s, pos, hit - pos);
    out += to;
  }
  out.append(s, pos, std::string::npos);
  return out;
}

}  // namespace moe::tokenizer
