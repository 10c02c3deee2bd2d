// tokenizer.json "normalizer": rewrites each piece of raw text (between added tokens) before
// pre-tokenisation. Supported: null, Sequence, Prepend, Replace (String or Regex pattern), Strip,
// NFC / NFD / NFKC / NFKD (unicode_norm.h). Lowercase, BertNormalizer, Precompiled and the others
// are rejected with Error::unsupported.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer/split.h"

namespace moe::tokenizer {

class Normalizer {
 public:
  // Parses the "normalizer" value (may be null); `path` names it in errors.
  static Normalizer parse(const nlohmann::json& j, const std::string& path);

  // Normalises piece.text in place. Clears piece.at_origin if leading text was removed (HF tracks
  // the original offset of the first remaining character).
  void apply(Piece& piece) const;

  bool empty() const { return steps_.empty(); }

  struct Step;

 private:
  std::vector<std::shared_ptr<const Step>> steps_;
};

}  // namespace moe::tokenizer
