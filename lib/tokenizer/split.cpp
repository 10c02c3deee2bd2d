#include "tokenizer/split.h"

#include <algorithm>

#include "tokenizer/json_fields.h"

namespace moe::tokenizer {

SplitBehavior parse_split_behavior(const std::string& name, const std::string& path) {
  if (name == "Removed") return SplitBehavior::Removed;
  if (name == "Isolated") return SplitBehavior::Isolated;
  if (name == "MergedWithPrevious") return SplitBehavior::MergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::MergedWithNext;
  if (name == "Contiguous") return SplitBehavior::Contiguous;
  json_fields::fail(path, "unknown split behavior \"" + name +
                              "\" (expected Removed, Isolated, MergedWithPrevious, "
                              "MergedWithNext or Contiguous)");
}

namespace {

struct Segment {
  size_t begin, end;
  bool is_match;  // after the fold: true means "remove"
};

}  // namespace

void split_at(const Piece& piece, const std::vector<Span>& matches, SplitBehavior behavior,
              bool invert, std::vector<Piece>& out) {
  const std::string& s = piece.text;
  // Pattern::find_matches: alternate non-match / match segments covering the whole text.
  std::vector<Segment> segs;
  segs.reserve(matches.size() * 2 + 1);
  if (s.empty()) {
    segs.push_back({0, 0, false});
  } else {
    size_t prev = 0;
    for (const Span& m : matches) {
      if (prev != m.begin) segs.push_back({prev, m.begin, false});
      segs.push_back({m.begin, m.end, true});
      prev = m.end;
    }
    if (prev != s.size()) segs.push_back({prev, s.size(), false});
  }
  if (invert) {
    for (Segment& g : segs) g.is_match = !g.is_match;
  }

  // NormalizedString::split: fold the segments according to the behaviour. In the folded list,
  // is_match == true marks a segment to remove (only Removed keeps that flag).
  std::vector<Segment> folded;
  folded.reserve(segs.size());
  switch (behavior) {
    case SplitBehavior::Removed:
      folded = segs;
      break;
    case SplitBehavior::Isolated:
      for (const Segment& g : segs) folded.push_back({g.begin, g.end, false});
      break;
    case SplitBehavior::Contiguous: {
      bool previous_match = false;
      for (const Segment& g : segs) {
        if (g.is_match == previous_match && !folded.empty()) folded.back().end = g.end;
        else folded.push_back({g.begin, g.end, false});
        previous_match = g.is_match;
      }
      break;
    }
    case SplitBehavior::MergedWithPrevious: {
      bool previous_match = false;
      for (const Segment& g : segs) {
        if (g.is_match && !previous_match && !folded.empty()) folded.back().end = g.end;
        else folded.push_back({g.begin, g.end, false});
        previous_match = g.is_match;
      }
      break;
    }
    case SplitBehavior::MergedWithNext: {
      bool previous_match = false;
      for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
        if (it->is_match && !previous_match && !folded.empty()) folded.back().begin = it->begin;
        else folded.push_back({it->begin, it->end, false});
        previous_match = it->is_match;
      }
      std::reverse(folded.begin(), folded.end());
      break;
    }
  }

  for (const Segment& g : folded) {
    if (g.is_match || g.end == g.begin) continue;
    Piece p;
    p.text.assign(s, g.begin, g.end - g.begin);
    p.at_origin = piece.at_origin && g.begin == 0;
    out.push_back(std::move(p));
  }
}

}  // namespace moe::tokenizer
