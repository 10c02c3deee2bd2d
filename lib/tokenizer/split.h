// The unit of text that flows through normalisation and pre-tokenisation, and HF's rule for cutting
// it at pattern matches (NormalizedString::split with a SplitDelimiterBehavior).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/regex.h"

namespace moe::tokenizer {

// One piece of the input. Added tokens found in the text become pieces with `id` set; they are
// final and skipped by every later stage. Other pieces are normalised, pre-tokenised, then fed to
// the model one at a time.
struct Piece {
  std::string text;
  int32_t id = -1;         // >= 0: an added token, already resolved
  bool at_origin = false;  // starts at byte 0 of the original input (Metaspace "first" needs it)
};

// What happens to the matched delimiters when a piece is split (HF SplitDelimiterBehavior).
enum class SplitBehavior {
  Removed,             // drop the matches
  Isolated,            // every match is its own piece
  MergedWithPrevious,  // a match is glued to the piece before it
  MergedWithNext,      // a match is glued to the piece after it
  Contiguous,          // consecutive matches become one piece
};

// Parses "Removed" / "Isolated" / ... ; fails naming `path` on anything else.
SplitBehavior parse_split_behavior(const std::string& name, const std::string& path);

// Splits `piece` at `matches` (sorted, non-overlapping spans of piece.text) following HF: the text
// is cut into match / non-match segments (an empty text is one empty non-match; empty matches are
// kept as segments), `invert` swaps which segments count as matches, `behavior` merges or drops
// them, and empty results are discarded. Appends the results to `out`; only a result starting at
// byte 0 keeps `at_origin`.
void split_at(const Piece& piece, const std::vector<Span>& matches, SplitBehavior behavior,
              bool invert, std::vector<Piece>& out);

}  // namespace moe::tokenizer
