#include "tokenizer/added_vocabulary.h"

#include <algorithm>

#include "core/error.h"
#include "tokenizer/json_fields.h"
#include "tokenizer/normalizer.h"
#include "tokenizer/regex.h"
#include "tokenizer/utf8.h"

namespace moe::tokenizer {

using namespace json_fields;

namespace {

// Rust regex's \w: Alphabetic, marks, decimal digits, connector punctuation, joiners.
bool is_word_char(std::string_view s, size_t pos) {
  static const Regex re = Regex::compile(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}])");
  return re.matches_at(s, pos);
}

// Start of the code point that ends at byte `end` (end > 0).
size_t previous_char_start(std::string_view s, size_t end) {
  size_t p = end - 1;
  while (p > 0 && (static_cast<unsigned char>(s[p]) & 0xC0) == 0x80) --p;
  return p;
}

}  // namespace

AddedVocabulary AddedVocabulary::parse(const nlohmann::json& j, const std::string& path) {
  AddedVocabulary v;
  if (j.is_null()) return v;
  if (!j.is_array()) fail(path, std::string("expected an array, got ") + type_name(j));
  for (size_t i = 0; i < j.size(); ++i) {
    const std::string p = child(path, i);
    const Json& t = j[i];
    expect_object(t, p);
    AddedToken tok;
    const int64_t id = require_int(t, "id", p);
    if (id < 0 || id > INT32_MAX) fail(child(p, "id"), "out of range: " + std::to_string(id));
    tok.id = static_cast<int32_t>(id);
    tok.content = require_string(t, "content", p);
    if (tok.content.empty()) fail(child(p, "content"), "empty token");
    if (!is_valid_utf8(tok.content)) fail(child(p, "content"), "not valid UTF-8");
    tok.single_word = optional_bool(t, "single_word", false, p);
    tok.lstrip = optional_bool(t, "lstrip", false, p);
    tok.rstrip = optional_bool(t, "rstrip", false, p);
    tok.special = optional_bool(t, "special", false, p);
    // HF's AddedToken default: normalized = !special.
    tok.normalized = optional_bool(t, "normalized", !tok.special, p);
    if (v.by_id_.count(tok.id)) {
      fail(child(p, "id"), "id " + std::to_string(tok.id) + " used twice");
    }
    v.by_id_[tok.id] = static_cast<uint32_t>(v.tokens_.size());
    v.by_content_.emplace(tok.content, static_cast<uint32_t>(v.tokens_.size()));
    v.tokens_.push_back(std::move(tok));
  }
  return v;
}

void AddedVocabulary::prepare(const Normalizer& normalizer) {
  raw_ = Matcher{};
  normalized_ = Matcher{};
  for (uint32_t i = 0; i < tokens_.size(); ++i) {
    const AddedToken& t = tokens_[i];
    std::string text = t.content;
    Matcher& m = t.normalized ? normalized_ : raw_;
    if (t.normalized) {
      Piece p{text, -1, false};
      normalizer.apply(p);
      text = std::move(p.text);
      if (text.empty()) continue;
    }
    m.by_first_byte[static_cast<unsigned char>(text[0])].emplace_back(std::move(text), i);
    m.empty = false;
  }
  for (Matcher* m : {&raw_, &normalized_}) {
    for (auto& list : m->by_first_byte) {
      std::stable_sort(list.begin(), list.end(), [](const auto& a, const auto& b) {
        return a.first.size() > b.first.size();
      });
    }
  }
}

const AddedToken* AddedVocabulary::find(std::string_view content) const {
  const auto it = by_content_.find(std::string(content));
  return it == by_content_.end() ? nullptr : &tokens_[it->second];
}

const AddedToken* AddedVocabulary::find(int32_t id) const {
  const auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &tokens_[it->second];
}

void AddedVocabulary::split_piece(const Piece& piece, const Matcher& m, std::vector<Piece>& out,
                                  bool parse_special) const {
  const std::string& s = piece.text;
  size_t start_offset = 0;  // end of the previous emitted match
  const auto emit_text = [&](size_t b, size_t e) {
    if (e <= b) return;
    Piece p;
    p.text.assign(s, b, e - b);
    p.at_origin = piece.at_origin && b == 0;
    out.push_back(std::move(p));
  };
  size_t pos = 0;
  while (pos < s.size()) {
    // Leftmost-longest: the first position where some token matches, the longest token there.
    const auto& cands = m.by_first_byte[static_cast<unsigned char>(s[pos])];
    const std::pair<std::string, uint32_t>* hit = nullptr;
    for (const auto& c : cands) {
      if (!parse_special && tokens_[c.second].special) continue;
      if (s.compare(pos, c.first.size(), c.first) == 0) {
        hit = &c;
        break;
      }
    }
    if (!hit) {
      ++pos;
      continue;
    }
    const AddedToken& tok = tokens_[hit->second];
    size_t start = pos, stop = pos + hit->first.size();
    pos = stop;  // the match is consumed even if single_word discards it
    if (tok.single_word) {
      const bool start_space = start == 0 || !is_word_char(s, previous_char_start(s, start));
      const bool stop_space = stop == s.size() || !is_word_char(s, stop);
      if (!start_space || !stop_space) continue;
    }
    if (tok.lstrip) {
      // Swallow the whitespace run before the match, but not text an earlier match consumed.
      size_t b = start;
      while (b > 0) {
        const size_t c = previous_char_start(s, b);
        size_t q = c;
        if (!is_white_space(next_code_point(s, q))) break;
        b = c;
      }
      start = std::max(b, start_offset);
    }
    if (tok.rstrip) {
      while (stop < s.size()) {
        size_t q = stop;
        if (!is_white_space(next_code_point(s, q))) break;
        stop = q;
      }
      pos = stop;
    }
    emit_text(start_offset, start);
    Piece t;
    t.text.assign(s, start, stop - start);
    t.id = tok.id;
    out.push_back(std::move(t));
    start_offset = stop;
  }
  emit_text(start_offset, s.size());
}

void AddedVocabulary::split(std::vector<Piece>& pieces, bool normalized_pass, bool parse_special) const {
  const Matcher& m = normalized_pass ? normalized_ : raw_;
  if (m.empty) return;
  std::vector<Piece> out;
  out.reserve(pieces.size() + 8);
  for (Piece& p : pieces) {
    if (p.id >= 0) out.push_back(std::move(p));
    else split_piece(p, m, out, parse_special);
  }
  pieces.swap(out);
}

}  // namespace moe::tokenizer
