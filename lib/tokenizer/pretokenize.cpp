#include "tokenizer/pretokenize.h"

#include <optional>

#include "core/error.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/json_fields.h"
#include "tokenizer/regex.h"
#include "tokenizer/utf8.h"

namespace moe::tokenizer {

using core::Error;
using core::with_context;
using namespace json_fields;

enum class PrependScheme { Always, First, Never };

struct PreTokenizer::Step {
  enum class Kind { Split, ByteLevel, Metaspace, Digits } kind;
  // Split / Digits / ByteLevel(use_regex)
  std::optional<Regex> regex;
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
  // ByteLevel
  bool add_prefix_space = false;
  // Metaspace
  std::string replacement;
  PrependScheme prepend = PrependScheme::Always;
  bool split = true;
};

namespace {

const Regex& gpt2_regex() {
  static const Regex re = Regex::compile(kGpt2Pattern);
  return re;
}

const Regex& digit_regex() {
  static const Regex re = Regex::compile(R"(\p{N})");
  return re;
}

std::string read_char(const Json& j, std::string_view key, const std::string& path) {
  std::string s = require_string(j, key, path);
  size_t pos = 0;
  if (s.empty() || !is_valid_utf8(s) || (next_code_point(s, pos), pos != s.size())) {
    fail(child(path, key), "expected a single character, got \"" + s + "\"");
  }
  return s;
}

PrependScheme read_prepend_scheme(const Json& j, const std::string& path) {
  // Metaspace deserialisation: prepend_scheme defaults to "always"; the legacy
  // add_prefix_space=false means "never" (HF rejects it together with another scheme).
  PrependScheme scheme = PrependScheme::Always;
  if (auto s = optional_string(j, "prepend_scheme", path)) {
    if (*s == "always") scheme = PrependScheme::Always;
    else if (*s == "first") scheme = PrependScheme::First;
    else if (*s == "never") scheme = PrependScheme::Never;
    else fail(child(path, "prepend_scheme"), "expected \"always\", \"first\" or \"never\", got \"" + *s + "\"");
  }
  if (!optional_bool(j, "add_prefix_space", true, path)) {
    if (member(j, "prepend_scheme") && scheme != PrependScheme::Never) {
      fail(path, "add_prefix_space false does not match prepend_scheme");
    }
    scheme = PrependScheme::Never;
  }
  return scheme;
}

void parse_into(const Json& j, const std::string& path,
                std::vector<std::shared_ptr<const PreTokenizer::Step>>& steps) {
  if (j.is_null()) return;
  expect_object(j, path);
  const std::string type = require_string(j, "type", path);
  using Kind = PreTokenizer::Step::Kind;
  auto step = std::make_shared<PreTokenizer::Step>();
  if (type == "Sequence") {
    const Json& list = require(j, "pretokenizers", path);
    const std::string lp = child(path, "pretokenizers");
    if (!list.is_array()) fail(lp, "expected an array");
    for (size_t i = 0; i < list.size(); ++i) parse_into(list[i], child(lp, i), steps);
    return;
  } else if (type == "Split") {
    step->kind = Kind::Split;
    auto [is_regex, pat] = pattern(j, "pattern", path);
    step->regex = with_context(child(path, is_regex ? "pattern.Regex" : "pattern.String"), [is_regex = is_regex, &pat = pat] {
      return is_regex ? Regex::compile(pat) : Regex::literal(pat);
    });
    step->behavior =
        parse_split_behavior(require_string(j, "behavior", path), child(path, "behavior"));
    step->invert = optional_bool(j, "invert", false, path);
  } else if (type == "ByteLevel") {
    step->kind = Kind::ByteLevel;
    step->add_prefix_space = optional_bool(j, "add_prefix_space", true, path);
    if (optional_bool(j, "use_regex", true, path)) step->regex = gpt2_regex();
  } else if (type == "Metaspace") {
    step->kind = Kind::Metaspace;
    step->replacement = read_char(j, "replacement", path);
    step->prepend = read_prepend_scheme(j, path);
    step->split = optional_bool(j, "split", true, path);
  } else if (type == "Digits") {
    step->kind = Kind::Digits;
    step->regex = digit_regex();
    step->behavior = optional_bool(j, "individual_digits", false, path) ? SplitBehavior::Isolated
                                                                         : SplitBehavior::Contiguous;
  } else {
    throw Error::unsupported(child(path, "type") + ": pre-tokenizer \"" + type +
                             "\" is not supported (supported: Sequence, Split, ByteLevel, "
                             "Metaspace, Digits)");
  }
  steps.push_back(std::move(step));
}

// Byte offsets of every occurrence of `needle` in `s` (non-overlapping, left to right).
void find_literal(const std::string& s, const std::string& needle, std::vector<Span>& out) {
  for (size_t pos = 0; (pos = s.find(needle, pos)) != std::string::npos; pos += needle.size()) {
    out.push_back({pos, pos + needle.size()});
  }
}

void run_step(const PreTokenizer::Step& st, Piece& piece, std::vector<Span>& scratch,
              std::vector<Piece>& out) {
  using Kind = PreTokenizer::Step::Kind;
  scratch.clear();
  switch (st.kind) {
    case Kind::Split:
    case Kind::Digits:
      st.regex->find_all(piece.text, scratch);
      split_at(piece, scratch, st.behavior, st.invert, out);
      return;
    case Kind::ByteLevel: {
      if (st.add_prefix_space && (piece.text.empty() || piece.text[0] != ' ')) {
        std::string spaced;  // (not insert(0, " "): GCC 12 -Wrestrict false positive)
        spaced.reserve(piece.text.size() + 1);
        spaced.push_back(' ');
        spaced += piece.text;
        piece.text.swap(spaced);
      }
      const size_t first = out.size();
      if (st.regex) {
        st.regex->find_all(piece.text, scratch);
        split_at(piece, scratch, SplitBehavior::Isolated, false, out);
      } else if (!piece.text.empty()) {
        out.push_back(std::move(piece));
      }
      // Then every resulting piece is rewritten byte by byte through bytes_to_unicode.
      std::string mapped;
      for (size_t i = first; i < out.size(); ++i) {
        mapped.clear();
        byte_level_encode(out[i].text, mapped);
        out[i].text.swap(mapped);
      }
      return;
    }
    case Kind::Metaspace: {
      std::string& s = piece.text;
      if (s.find(' ') != std::string::npos) {
        std::string r;
        r.reserve(s.size() + 16);
        for (const char c : s) {
          if (c == ' ') r += st.replacement;
          else r.push_back(c);
        }
        s.swap(r);
      }
      const bool starts = s.compare(0, st.replacement.size(), st.replacement) == 0;
      if (!starts && (st.prepend == PrependScheme::Always ||
                      (st.prepend == PrependScheme::First && piece.at_origin))) {
        s.insert(0, st.replacement);
      }
      if (st.split) {
        find_literal(s, st.replacement, scratch);
        split_at(piece, scratch, SplitBehavior::MergedWithNext, false, out);
      } else if (!s.empty()) {
        out.push_back(std::move(piece));
      }
      return;
    }
  }
}

}  // namespace

PreTokenizer PreTokenizer::parse(const nlohmann::json& j, const std::string& path) {
  PreTokenizer p;
  parse_into(j, path, p.steps_);
  for (const auto& s : p.steps_) p.byte_level_ |= s->kind == Step::Kind::ByteLevel;
  return p;
}

void PreTokenizer::apply(std::vector<Piece>& pieces) const {
  std::vector<Piece> next;
  std::vector<Span> scratch;
  for (const auto& st : steps_) {
    next.clear();
    next.reserve(pieces.size() * 2);
    for (Piece& p : pieces) {
      if (p.id >= 0) next.push_back(std::move(p));
      else run_step(*st, p, scratch, next);
    }
    pieces.swap(next);
  }
}

}  // namespace moe::tokenizer
