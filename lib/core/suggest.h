// "Did you mean ..." for unknown names (keys, methods, codecs, commands): the nearest allowed name
// by edit distance, and the tail of an "unknown X" message listing what is allowed.
#pragma once

#include <string>
#include <vector>

namespace moe::core {

// Levenshtein distance (insertions, deletions, substitutions; ASCII case-insensitive).
size_t edit_distance(const std::string& a, const std::string& b);
// The candidate nearest to `s` when it is close enough to be a likely typo, else "".
std::string nearest(const std::string& s, const std::vector<std::string>& candidates);
// " (allowed: a, b, c); did you mean \"b\"?" — the tail of an "unknown X" message.
std::string allowed_suffix(const std::string& found, const std::vector<std::string>& allowed);

}  // namespace moe::core
