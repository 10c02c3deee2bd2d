#include "tokenizer/normalizer.h"

#include <optional>

#include "core/error.h"
#include "tokenizer/json_fields.h"
#include "tokenizer/replace.h"
#include "tokenizer/unicode_norm.h"
#include "tokenizer/utf8.h"

namespace moe::tokenizer {

using core::Error;
using namespace json_fields;

struct Normalizer::Step {
  enum class Kind { Prepend, Replace, Strip, Unicode } kind;
  NormalForm form = NormalForm::NFC;  // Unicode
  std::string text;             // Prepend: the prefix
  ReplaceRule replace;          // Replace
  bool strip_left = false, strip_right = false;
};

namespace {

void parse_into(const Json& j, const std::string& path,
                std::vector<std::shared_ptr<const Normalizer::Step>>& steps) {
  if (j.is_null()) return;
  expect_object(j, path);
  const std::string type = require_string(j, "type", path);
  using Kind = Normalizer::Step::Kind;
  auto step = std::make_shared<Normalizer::Step>();
  if (type == "Sequence") {
    const Json& list = require(j, "normalizers", path);
    const std::string lp = child(path, "normalizers");
    if (!list.is_array()) fail(lp, "expected an array");
    for (size_t i = 0; i < list.size(); ++i) parse_into(list[i], child(lp, i), steps);
    return;
  } else if (type == "Prepend") {
    // HF Prepend: adds the prefix to every non-empty piece.
    step->kind = Kind::Prepend;
    step->text = require_string(j, "prepend", path);
  } else if (type == "Replace") {
    step->kind = Kind::Replace;
    step->replace = ReplaceRule::parse(j, path);
  } else if (type == "Strip") {
    step->kind = Kind::Strip;
    step->strip_left = optional_bool(j, "strip_left", true, path);
    step->strip_right = optional_bool(j, "strip_right", true, path);
  } else if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
    step->kind = Kind::Unicode;
    step->form = type == "NFC"    ? NormalForm::NFC
                 : type == "NFD"  ? NormalForm::NFD
                 : type == "NFKC" ? NormalForm::NFKC
                                  : NormalForm::NFKD;
  } else {
    throw Error::unsupported(child(path, "type") + ": normalizer \"" + type +
                             "\" is not supported (supported: Sequence, Prepend, Replace, Strip, "
                             "NFC, NFD, NFKC, NFKD)");
  }
  steps.push_back(std::move(step));
}

}  // namespace

Normalizer Normalizer::parse(const nlohmann::json& j, const std::string& path) {
  Normalizer n;
  parse_into(j, path, n.steps_);
  return n;
}

void Normalizer::apply(Piece& piece) const {
  for (const auto& sp : steps_) {
    const Step& st = *sp;
    switch (st.kind) {
      case Step::Kind::Prepend:
        if (!piece.text.empty()) piece.text.insert(0, st.text);
        break;
      case Step::Kind::Replace:
        piece.text = st.replace.apply(piece.text);
        break;
      case Step::Kind::Unicode:
        piece.text = normalize_unicode(piece.text, st.form);
        break;
      case Step::Kind::Strip: {
        // Rust's str::trim_start / trim_end: White_Space characters.
        const std::string& s = piece.text;
        size_t b = 0, e = s.size();
        if (st.strip_left) {
          while (b < e) {
            size_t p = b;
            if (!is_white_space(next_code_point(s, p))) break;
            b = p;
          }
        }
        if (st.strip_right) {
          while (e > b) {
            size_t start = e - 1;
            while (start > b && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
            size_t p = start;
            if (!is_white_space(next_code_point(s, p))) break;
            e = start;
          }
        }
        if (b > 0) piece.at_origin = false;
        piece.text = s.substr(b, e - b);
        break;
      }
    }
  }
}

}  // namespace moe::tokenizer
