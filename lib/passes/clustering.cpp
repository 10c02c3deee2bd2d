#include "passes/clustering.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <string>

#include "core/error.h"
#include "passes/options.h"

namespace moe::passes {

using core::Error;

Groups groups_from_labels(const std::vector<int>& labels) {
  std::map<int, std::vector<int>> by_label;
  for (int i = 0; i < static_cast<int>(labels.size()); ++i) by_label[labels[i]].push_back(i);
  Groups g;
  for (auto& [label, members] : by_label) g.push_back(std::move(members));
  std::sort(g.begin(), g.end(), [](const auto& a, const auto& b) { return a.front() < b.front(); });
  return g;
}

namespace {

void check_k(int k, int64_t n, const char* what) {
  if (k < 1 || k > n)
    throw Error::invalid(std::string(what) + ": cannot make " + std::to_string(k) + " clusters of " +
                         std::to_string(n) + " points");
}

// The routines below index by the best distance found; with a NaN or Inf coordinate no distance
// compares smaller and that index would stay -1. The callers check their statistics and weights
// first, so a non-finite point here is a bug: say so instead of indexing out of bounds.
void check_points(const MatrixXdRM& points, const char* what) {
  if (points.allFinite()) return;
  for (int64_t i = 0; i < points.rows(); ++i)
    for (int64_t j = 0; j < points.cols(); ++j)
      if (!std::isfinite(points(i, j)))
        throw Error::internal(std::string(what) + ": non-finite coordinate at point " + std::to_string(i) +
                              ", dimension " + std::to_string(j));
}

double sq_dist(const MatrixXdRM& a, int64_t i, const MatrixXdRM& b, int64_t j) {
  return (a.row(i) - b.row(j)).squaredNorm();
}

}  // namespace

Groups kmeans(const MatrixXdRM& points, int k, uint64_t seed, int max_iter) {
  const int64_t n = points.rows(), d = points.cols();
  check_k(k, n, "k-means");
  check_points(points, "k-means");
  std::mt19937_64 rng(seed);

  // k-means++: first centre uniform, then proportional to the squared distance to the nearest centre.
  MatrixXdRM centres(k, d);
  std::vector<char> is_centre(n, 0);
  std::vector<double> d2(n, std::numeric_limits<double>::infinity());
  int64_t first = static_cast<int64_t>(unit_double(rng()) * static_cast<double>(n));
  first = std::min(first, n - 1);
  centres.row(0) = points.row(first);
  is_centre[first] = 1;
  for (int c = 1; c < k; ++c) {
    double total = 0;
    for (int64_t i = 0; i < n; ++i) {
      d2[i] = std::min(d2[i], sq_dist(points, i, centres, c - 1));
      total += is_centre[i] ? 0.0 : d2[i];
    }
    int64_t pick = -1;
    if (total > 0) {
      const double r = unit_double(rng()) * total;
      double acc = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (is_centre[i] || d2[i] <= 0) continue;
        acc += d2[i];
        pick = i;
        if (acc > r) break;
      }
    }
    if (pick < 0)  // every remaining point sits on a centre
      for (int64_t i = 0; i < n && pick < 0; ++i)
        if (!is_centre[i]) pick = i;
    if (pick < 0) throw Error::internal("k-means: no point left for centre " + std::to_string(c));
    centres.row(c) = points.row(pick);
    is_centre[pick] = 1;
  }

  std::vector<int> label(n, -1);
  std::vector<int64_t> size(k);
  for (int it = 0; it < max_iter; ++it) {
    bool changed = false;
    for (int64_t i = 0; i < n; ++i) {
      int best = 0;
      double best_d = sq_dist(points, i, centres, 0);
      for (int c = 1; c < k; ++c) {
        const double dc = sq_dist(points, i, centres, c);
        if (dc < best_d) {
          best_d = dc;
          best = c;
        }
      }
      if (label[i] != best) {
        label[i] = best;
        changed = true;
      }
    }
    // Refill empty clusters with the point farthest from its centre (in a cluster of size > 1).
    std::fill(size.begin(), size.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++size[label[i]];
    for (int c = 0; c < k; ++c) {
      if (size[c] > 0) continue;
      int64_t far = -1;
      double far_d = -1;
      for (int64_t i = 0; i < n; ++i) {
        if (size[label[i]] <= 1) continue;
        const double di = sq_dist(points, i, centres, label[i]);
        if (di > far_d) {
          far_d = di;
          far = i;
        }
      }
      if (far < 0) throw Error::internal("k-means: cluster " + std::to_string(c) + " is empty and no point can move");
      --size[label[far]];
      label[far] = c;
      size[c] = 1;
      changed = true;
    }
    if (!changed && it > 0) break;
    centres.setZero();
    for (int64_t i = 0; i < n; ++i) centres.row(label[i]) += points.row(i);
    for (int c = 0; c < k; ++c) centres.row(c) /= static_cast<double>(size[c]);
  }
  return groups_from_labels(label);
}

Groups agglomerative_average(const MatrixXdRM& points, int k) {
  const int64_t n = points.rows();
  check_k(k, n, "agglomerative clustering");
  check_points(points, "agglomerative clustering");
  // Cluster c lives at index c (its first point); Lance–Williams update for average linkage:
  // d(A∪B, C) = (|A| d(A,C) + |B| d(B,C)) / (|A| + |B|).
  MatrixXdRM dist(n, n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) dist(i, j) = std::sqrt(sq_dist(points, i, points, j));
  std::vector<std::vector<int>> members(n);
  for (int64_t i = 0; i < n; ++i) members[i] = {static_cast<int>(i)};
  std::vector<char> alive(n, 1);
  for (int64_t clusters = n; clusters > k; --clusters) {
    int64_t bi = -1, bj = -1;
    double best = std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < n; ++i) {
      if (!alive[i]) continue;
      for (int64_t j = i + 1; j < n; ++j)
        if (alive[j] && dist(i, j) < best) {
          best = dist(i, j);
          bi = i;
          bj = j;
        }
    }
    if (bi < 0 || bj < 0)
      throw Error::internal("agglomerative clustering: no pair of clusters at a finite distance");
    const double si = static_cast<double>(members[bi].size()), sj = static_cast<double>(members[bj].size());
    for (int64_t c = 0; c < n; ++c) {
      if (!alive[c] || c == bi || c == bj) continue;
      dist(bi, c) = dist(c, bi) = (si * dist(bi, c) + sj * dist(bj, c)) / (si + sj);
    }
    members[bi].insert(members[bi].end(), members[bj].begin(), members[bj].end());
    std::sort(members[bi].begin(), members[bi].end());
    members[bj].clear();
    alive[bj] = 0;
  }
  Groups g;
  for (int64_t i = 0; i < n; ++i)
    if (alive[i]) g.push_back(members[i]);
  return g;  // alive indices ascending = smallest members ascending
}

}  // namespace moe::passes
