#include "core/suggest.h"

#include <algorithm>
#include <cctype>
#include <limits>

namespace moe::core {

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const bool same = std::tolower(static_cast<unsigned char>(a[i - 1])) ==
                        std::tolower(static_cast<unsigned char>(b[j - 1]));
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (same ? 0 : 1)});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string nearest(const std::string& s, const std::vector<std::string>& candidates) {
  // Close enough: at most a third of the longer word, and at least 2 edits allowed for short words.
  std::string best;
  size_t best_d = std::numeric_limits<size_t>::max();
  for (const auto& c : candidates) {
    const size_t d = edit_distance(s, c);
    const size_t limit = std::max<size_t>(2, std::max(s.size(), c.size()) / 3);
    if (d <= limit && d < best_d) {
      best_d = d;
      best = c;
    }
  }
  return best;
}

std::string allowed_suffix(const std::string& found, const std::vector<std::string>& allowed) {
  std::string s = " (allowed: ";
  for (size_t i = 0; i < allowed.size(); ++i) s += (i ? ", " : "") + allowed[i];
  s += ")";
  const std::string near = nearest(found, allowed);
  if (!near.empty()) s += "; did you mean \"" + near + "\"?";
  return s;
}

}  // namespace moe::core
