#include "passes/combinations.h"

#include <limits>
#include <numeric>

namespace moe::passes {

uint64_t n_choose_k(int64_t n, int64_t k) {
  if (k < 0 || n < 0 || k > n) return 0;
  k = std::min(k, n - k);
  // C(n, i) = C(n, i-1) * (n - k + i) / i stays an integer at every step; divide by the gcd
  // first so the product only overflows when the result would.
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  uint64_t r = 1;
  for (int64_t i = 1; i <= k; ++i) {
    uint64_t num = static_cast<uint64_t>(n - k + i), den = static_cast<uint64_t>(i);
    const uint64_t g1 = std::gcd(r, den);
    r /= g1;
    den /= g1;
    num /= den;  // den now divides num (C(n,i) is an integer and gcd(r, den) = 1)
    if (r > kMax / num) return kMax;
    r *= num;
  }
  return r;
}

std::vector<int> first_combination(int k) {
  std::vector<int> c(k);
  std::iota(c.begin(), c.end(), 0);
  return c;
}

bool next_combination(std::vector<int>& c, int n) {
  const int k = static_cast<int>(c.size());
  int i = k - 1;
  while (i >= 0 && c[i] == n - k + i) --i;
  if (i < 0) return false;
  ++c[i];
  for (int j = i + 1; j < k; ++j) c[j] = c[j - 1] + 1;
  return true;
}

}  // namespace moe::passes
