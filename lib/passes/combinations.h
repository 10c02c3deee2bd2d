// k-subsets of {0, ..., n-1} in lexicographic order (NAEE's enumeration of experts to drop).
#pragma once

#include <cstdint>
#include <vector>

namespace moe::passes {

// C(n, k), saturating at UINT64_MAX; 0 when k < 0 or k > n.
uint64_t n_choose_k(int64_t n, int64_t k);

// The first k-subset {0, 1, ..., k-1}.
std::vector<int> first_combination(int k);
// Advances `c` (ascending, values < n) to the next k-subset in lexicographic order; false (and
// `c` unchanged) after the last one {n-k, ..., n-1}.
bool next_combination(std::vector<int>& c, int n);

}  // namespace moe::passes
