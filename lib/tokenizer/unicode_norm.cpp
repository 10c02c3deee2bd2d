#include "tokenizer/unicode_norm.h"

#include <algorithm>
#include <vector>

#include "tokenizer/unicode_tables.h"
#include "tokenizer/utf8.h"

namespace moe::tokenizer {

namespace ut = unicode_tables;

namespace {

// Hangul syllables are (de)composed arithmetically (Unicode §3.12).
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr char32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
                   kSCount = kLCount * kNCount;

uint8_t combining_class(char32_t cp) {
  if (cp < 0x300) return 0;
  const auto* end = ut::kCombiningClass + ut::kCombiningClassCount;
  const auto* it = std::upper_bound(ut::kCombiningClass, end, cp,
                                    [](char32_t c, const ut::CombiningClassRange& r) { return c < r.first; });
  if (it == ut::kCombiningClass) return 0;
  --it;
  return cp <= it->last ? it->ccc : 0;
}

const ut::Decomposition* find_decomposition(char32_t cp) {
  const auto* end = ut::kDecompositions + ut::kDecompositionCount;
  const auto* it = std::lower_bound(ut::kDecompositions, end, cp,
                                    [](const ut::Decomposition& d, char32_t c) { return d.cp < c; });
  return it != end && it->cp == cp ? it : nullptr;
}

void decompose(char32_t cp, bool compat, std::vector<char32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const char32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount) out.push_back(kTBase + s % kTCount);
    return;
  }
  const ut::Decomposition* d = cp < 0xA0 ? nullptr : find_decomposition(cp);
  if (!d || (d->compat && !compat)) {
    out.push_back(cp);
    return;
  }
  for (uint32_t i = 0; i < d->length; ++i) decompose(ut::kDecompositionData[d->offset + i], compat, out);
}

// The primary composite of (a, b), or 0.
char32_t compose_pair(char32_t a, char32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount) {
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  }
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount) {
    return a + (b - kTBase);
  }
  const auto* end = ut::kCompositions + ut::kCompositionCount;
  const auto* it = std::lower_bound(ut::kCompositions, end, std::pair{a, b},
                                    [](const ut::Composition& c, const std::pair<char32_t, char32_t>& k) {
                                      return c.first != k.first ? c.first < k.first : c.second < k.second;
                                    });
  return it != end && it->first == a && it->second == b ? it->composite : 0;
}

}  // namespace

const char* unicode_tables_version() { return ut::kUnicodeVersion; }

std::string normalize_unicode(std::string_view text, NormalForm form) {
  const bool compat = form == NormalForm::NFKC || form == NormalForm::NFKD;
  const bool compose = form == NormalForm::NFC || form == NormalForm::NFKC;
  // Fast path: below these code points every character is stable under the form (ASCII and
  // Latin-1 text is already NFC).
  const char32_t stable_below = form == NormalForm::NFC ? 0x300 : form == NormalForm::NFD ? 0xC0 : 0xA0;
  std::vector<char32_t> cps;
  cps.reserve(text.size());
  bool all_stable = true;
  for (size_t pos = 0; pos < text.size();) {
    const char32_t cp = next_code_point(text, pos);
    all_stable &= cp < stable_below;
    cps.push_back(cp);
  }
  if (all_stable) return std::string(text);

  // 1. Full decomposition.
  std::vector<char32_t> d;
  d.reserve(cps.size() + 8);
  for (const char32_t cp : cps) decompose(cp, compat, d);

  // 2. Canonical ordering: stable sort of each run of non-starters by combining class.
  for (size_t i = 0; i < d.size();) {
    if (combining_class(d[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < d.size() && combining_class(d[j]) != 0) ++j;
    std::stable_sort(d.begin() + i, d.begin() + j, [](char32_t a, char32_t b) {
      return combining_class(a) < combining_class(b);
    });
    i = j;
  }

  // 3. Canonical composition: each character joins the last starter unless blocked (a character
  //    in between with class 0 or >= its own).
  std::vector<char32_t> out;
  if (!compose) {
    out = std::move(d);
  } else {
    out.reserve(d.size());
    long starter = -1;
    uint8_t last_cc = 0;
    for (const char32_t ch : d) {
      const uint8_t cc = combining_class(ch);
      if (starter >= 0) {
        const bool adjacent = out.size() == static_cast<size_t>(starter) + 1;
        if ((adjacent || (last_cc != 0 && last_cc < cc))) {
          if (const char32_t c = compose_pair(out[starter], ch)) {
            out[starter] = c;
            continue;
          }
        }
      }
      if (cc == 0) starter = static_cast<long>(out.size());
      last_cc = cc;
      out.push_back(ch);
    }
  }
  std::string s;
  s.reserve(text.size() + 8);
  for (const char32_t cp : out) append_utf8(s, cp);
  return s;
}

}  // namespace moe::tokenizer
