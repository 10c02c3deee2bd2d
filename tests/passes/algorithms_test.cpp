// Hungarian assignment, k-means, agglomerative clustering, combinations: small cases with known
// answers and brute-force cross-checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>

#include "core/error.h"
#include "passes/clustering.h"
#include "passes/combinations.h"
#include "passes/hungarian.h"

namespace moe::passes {
namespace {

MatrixXdRM random_cost(int n, int m, std::mt19937_64& rng, bool integers = false) {
  std::uniform_real_distribution<double> u(-5.0, 5.0);
  MatrixXdRM a(n, m);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j) a(i, j) = integers ? std::round(u(rng)) : u(rng);
  return a;
}

// Best value over all injective maps rows -> columns (n <= m) or columns -> rows (n > m).
double brute_force(const MatrixXdRM& a, bool maximise) {
  const int n = static_cast<int>(a.rows()), m = static_cast<int>(a.cols());
  const int small = std::min(n, m), big = std::max(n, m);
  std::vector<int> perm(big);
  std::iota(perm.begin(), perm.end(), 0);
  double best = maximise ? -std::numeric_limits<double>::infinity() : std::numeric_limits<double>::infinity();
  do {
    double s = 0;
    for (int i = 0; i < small; ++i) s += n <= m ? a(i, perm[i]) : a(perm[i], i);
    best = maximise ? std::max(best, s) : std::min(best, s);
  } while (std::next_permutation(perm.begin(), perm.end()));
  return best;
}

void expect_valid(const std::vector<int>& col, int n, int m) {
  ASSERT_EQ(static_cast<int>(col.size()), n);
  std::set<int> used;
  int assigned = 0;
  for (int c : col) {
    if (c < 0) continue;
    ++assigned;
    EXPECT_LT(c, m);
    EXPECT_TRUE(used.insert(c).second) << "column " << c << " used twice";
  }
  EXPECT_EQ(assigned, std::min(n, m));
}

TEST(Hungarian, KnownSquareMinimum) {
  MatrixXdRM a(3, 3);
  a << 4, 1, 3,  //
      2, 0, 5,   //
      3, 2, 2;
  const auto col = assign_min(a);
  EXPECT_EQ(col, (std::vector<int>{1, 0, 2}));  // 1 + 2 + 2 = 5
  EXPECT_DOUBLE_EQ(assignment_value(a, col), 5.0);
  const auto colmax = assign_max(a);
  EXPECT_DOUBLE_EQ(assignment_value(a, colmax), 11.0);  // 4 + 5 + 2
}

TEST(Hungarian, MatchesBruteForceSquare) {
  std::mt19937_64 rng(42);
  for (int n = 1; n <= 7; ++n)
    for (int rep = 0; rep < 20; ++rep) {
      const MatrixXdRM a = random_cost(n, n, rng, rep % 2 == 1);  // odd reps: integer costs (ties)
      const auto cmin = assign_min(a), cmax = assign_max(a);
      expect_valid(cmin, n, n);
      expect_valid(cmax, n, n);
      EXPECT_NEAR(assignment_value(a, cmin), brute_force(a, false), 1e-9) << "n=" << n;
      EXPECT_NEAR(assignment_value(a, cmax), brute_force(a, true), 1e-9) << "n=" << n;
    }
}

TEST(Hungarian, MatchesBruteForceRectangular) {
  std::mt19937_64 rng(7);
  for (int n = 1; n <= 6; ++n)
    for (int m = 1; m <= 6; ++m) {
      if (n == m) continue;
      for (int rep = 0; rep < 5; ++rep) {
        const MatrixXdRM a = random_cost(n, m, rng);
        const auto cmin = assign_min(a), cmax = assign_max(a);
        expect_valid(cmin, n, m);
        expect_valid(cmax, n, m);
        EXPECT_NEAR(assignment_value(a, cmin), brute_force(a, false), 1e-9) << n << "x" << m;
        EXPECT_NEAR(assignment_value(a, cmax), brute_force(a, true), 1e-9) << n << "x" << m;
      }
    }
}

TEST(Hungarian, TiesAreDeterministicAndValid) {
  const MatrixXdRM a = MatrixXdRM::Constant(5, 5, 2.0);
  const auto c1 = assign_max(a), c2 = assign_max(a);
  expect_valid(c1, 5, 5);
  EXPECT_EQ(c1, c2);
  EXPECT_DOUBLE_EQ(assignment_value(a, c1), 10.0);
}

TEST(Hungarian, RecoversPermutation) {
  // score(i, j) = 1 where j = p[i], 0 elsewhere: the maximum is p itself.
  const std::vector<int> p = {3, 0, 4, 1, 2, 6, 5};
  MatrixXdRM s = MatrixXdRM::Zero(7, 7);
  for (int i = 0; i < 7; ++i) s(i, p[i]) = 1.0;
  EXPECT_EQ(assign_max(s), p);
}

TEST(Combinations, Counts) {
  EXPECT_EQ(n_choose_k(8, 2), 28u);
  EXPECT_EQ(n_choose_k(8, 6), 28u);
  EXPECT_EQ(n_choose_k(5, 0), 1u);
  EXPECT_EQ(n_choose_k(5, 5), 1u);
  EXPECT_EQ(n_choose_k(5, 6), 0u);
  EXPECT_EQ(n_choose_k(64, 32), 1832624140942590534ull);
  EXPECT_EQ(n_choose_k(128, 64), std::numeric_limits<uint64_t>::max());  // saturates
}

TEST(Combinations, LexicographicEnumeration) {
  std::vector<std::vector<int>> all;
  std::vector<int> c = first_combination(3);
  do all.push_back(c);
  while (next_combination(c, 5));
  const std::vector<std::vector<int>> want = {{0, 1, 2}, {0, 1, 3}, {0, 1, 4}, {0, 2, 3}, {0, 2, 4},
                                              {0, 3, 4}, {1, 2, 3}, {1, 2, 4}, {1, 3, 4}, {2, 3, 4}};
  EXPECT_EQ(all, want);
  EXPECT_EQ(c, (std::vector<int>{2, 3, 4}));  // unchanged after the last
  // Every size agrees with n_choose_k.
  for (int n = 0; n <= 9; ++n)
    for (int k = 0; k <= n; ++k) {
      uint64_t count = 0;
      std::vector<int> d = first_combination(k);
      do ++count;
      while (next_combination(d, n));
      EXPECT_EQ(count, n_choose_k(n, k)) << n << " choose " << k;
    }
}

MatrixXdRM points_1d(const std::vector<double>& v) {
  MatrixXdRM p(static_cast<int64_t>(v.size()), 1);
  for (size_t i = 0; i < v.size(); ++i) p(static_cast<int64_t>(i), 0) = v[i];
  return p;
}

TEST(Agglomerative, AverageLinkageHandComputed) {
  // a=0, b=1, c=4, d: the first merge is {a,b} (distance 1). Then
  //   d=7.2: d({a,b},c) = (4+3)/2 = 3.5 > d(c,d) = 3.2 -> {a,b},{c,d}  (single linkage: 3 < 3.2 -> {a,b,c},{d})
  //   d=7.8: d({a,b},c) = 3.5 < d(c,d) = 3.8 -> {a,b,c},{d}           (complete linkage: 4 > 3.8 -> {a,b},{c,d})
  EXPECT_EQ(agglomerative_average(points_1d({0, 1, 4, 7.2}), 2), (Groups{{0, 1}, {2, 3}}));
  EXPECT_EQ(agglomerative_average(points_1d({0, 1, 4, 7.8}), 2), (Groups{{0, 1, 2}, {3}}));
  // Order of points does not matter beyond labels: groups come sorted by smallest member.
  EXPECT_EQ(agglomerative_average(points_1d({7.2, 4, 1, 0}), 2), (Groups{{0, 1}, {2, 3}}));
  EXPECT_EQ(agglomerative_average(points_1d({0, 1, 4, 7.2}), 4), (Groups{{0}, {1}, {2}, {3}}));
  EXPECT_EQ(agglomerative_average(points_1d({0, 1, 4, 7.2}), 1), (Groups{{0, 1, 2, 3}}));
}

TEST(Agglomerative, MatchesNaiveAverageLinkage) {
  // Naive reference: recompute the mean pairwise distance between clusters at every step.
  std::mt19937_64 rng(3);
  std::normal_distribution<double> nd;
  for (int rep = 0; rep < 10; ++rep) {
    const int n = 9, d = 3;
    MatrixXdRM p(n, d);
    for (int i = 0; i < p.size(); ++i) p.data()[i] = nd(rng);
    for (int k = 1; k <= n; ++k) {
      Groups g;
      for (int i = 0; i < n; ++i) g.push_back({i});
      while (static_cast<int>(g.size()) > k) {
        double best = std::numeric_limits<double>::infinity();
        size_t bi = 0, bj = 0;
        for (size_t i = 0; i < g.size(); ++i)
          for (size_t j = i + 1; j < g.size(); ++j) {
            double s = 0;
            for (int a : g[i])
              for (int b : g[j]) s += (p.row(a) - p.row(b)).norm();
            s /= static_cast<double>(g[i].size() * g[j].size());
            if (s < best) {
              best = s;
              bi = i;
              bj = j;
            }
          }
        g[bi].insert(g[bi].end(), g[bj].begin(), g[bj].end());
        std::sort(g[bi].begin(), g[bi].end());
        g.erase(g.begin() + static_cast<std::ptrdiff_t>(bj));
      }
      std::sort(g.begin(), g.end());
      EXPECT_EQ(agglomerative_average(p, k), g) << "rep " << rep << " k " << k;
    }
  }
}

TEST(KMeans, RecoversSeparatedClusters) {
  // Three blobs around (0,0), (10,0), (0,10), interleaved in index order.
  std::mt19937_64 rng(5);
  std::normal_distribution<double> nd(0.0, 0.3);
  const double cx[3] = {0, 10, 0}, cy[3] = {0, 0, 10};
  MatrixXdRM p(15, 2);
  for (int i = 0; i < 15; ++i) {
    p(i, 0) = cx[i % 3] + nd(rng);
    p(i, 1) = cy[i % 3] + nd(rng);
  }
  const Groups want = {{0, 3, 6, 9, 12}, {1, 4, 7, 10, 13}, {2, 5, 8, 11, 14}};
  for (uint64_t seed = 0; seed < 20; ++seed) EXPECT_EQ(kmeans(p, 3, seed), want) << "seed " << seed;
}

TEST(KMeans, DeterministicForASeed) {
  std::mt19937_64 rng(9);
  std::normal_distribution<double> nd;
  MatrixXdRM p(30, 4);
  for (int i = 0; i < p.size(); ++i) p.data()[i] = nd(rng);
  for (uint64_t seed : {1ull, 2ull, 12345ull}) {
    const Groups a = kmeans(p, 5, seed), b = kmeans(p, 5, seed);
    EXPECT_EQ(a, b);
    EXPECT_EQ(a.size(), 5u);
  }
}

TEST(KMeans, AlwaysKNonEmptyClusters) {
  // Duplicates: 4 identical points and 2 others, k = 4 and k = 6.
  MatrixXdRM p(6, 2);
  p << 1, 1, 1, 1, 1, 1, 1, 1, 5, 5, 9, 0;
  for (int k : {1, 2, 3, 4, 5, 6}) {
    const Groups g = kmeans(p, k, 11);
    ASSERT_EQ(static_cast<int>(g.size()), k);
    int total = 0;
    for (const auto& m : g) {
      EXPECT_FALSE(m.empty());
      total += static_cast<int>(m.size());
    }
    EXPECT_EQ(total, 6);
  }
  EXPECT_EQ(kmeans(p, 3, 11), (Groups{{0, 1, 2, 3}, {4}, {5}}));
  EXPECT_THROW(kmeans(p, 7, 1), core::Error);
}

// Every clustering and assignment routine guards its own inputs: a NaN or Inf (which compares
// false with everything) is an error with a message, never an index of -1 or a broken sort.
TEST(Algorithms, NonFiniteInputsAreRefusedWithAMessage) {
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (double bad : {nan, inf}) {
    MatrixXdRM p(6, 3);
    for (int i = 0; i < 6; ++i)
      for (int j = 0; j < 3; ++j) p(i, j) = i * 3 + j;
    p(2, 1) = bad;
    auto message = [](auto&& fn) {
      try {
        fn();
      } catch (const core::Error& e) {
        EXPECT_EQ(e.kind(), core::ErrorKind::Internal);
        return e.message();
      }
      return std::string("no error");
    };
    EXPECT_NE(message([&] { kmeans(p, 3, 0); }).find("k-means: non-finite coordinate at point 2, dimension 1"),
              std::string::npos);
    EXPECT_NE(message([&] { agglomerative_average(p, 3); })
                  .find("agglomerative clustering: non-finite coordinate at point 2, dimension 1"),
              std::string::npos);
    // Every point non-finite (the case that used to index with -1).
    MatrixXdRM all = MatrixXdRM::Constant(4, 2, bad);
    EXPECT_THROW(agglomerative_average(all, 2), core::Error);
    EXPECT_THROW(kmeans(all, 2, 0), core::Error);
    MatrixXdRM cost = MatrixXdRM::Zero(3, 3);
    cost(1, 1) = bad;
    EXPECT_THROW(assign_min(cost), core::Error);
  }
}

}  // namespace
}  // namespace moe::passes
