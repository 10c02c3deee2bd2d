#include "passes/hungarian.h"

#include <cmath>
#include <limits>

#include "core/error.h"

namespace moe::passes {

namespace {

// Rows <= cols. Classic shortest-augmenting-path Hungarian with row/column potentials u, v;
// 1-based internally, p[j] = row matched to column j (0: none).
std::vector<int> solve(const MatrixXdRM& a) {
  const int n = static_cast<int>(a.rows()), m = static_cast<int>(a.cols());
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> u(n + 1, 0.0), v(m + 1, 0.0), minv(m + 1);
  std::vector<int> p(m + 1, 0), way(m + 1, 0);
  std::vector<char> used(m + 1);
  for (int i = 1; i <= n; ++i) {
    p[0] = i;
    int j0 = 0;
    std::fill(minv.begin(), minv.end(), inf);
    std::fill(used.begin(), used.end(), 0);
    do {
      used[j0] = 1;
      const int i0 = p[j0];
      double delta = inf;
      int j1 = -1;
      for (int j = 1; j <= m; ++j) {
        if (used[j]) continue;
        const double cur = a(i0 - 1, j - 1) - u[i0] - v[j];
        if (cur < minv[j]) {
          minv[j] = cur;
          way[j] = j0;
        }
        if (minv[j] < delta) {
          delta = minv[j];
          j1 = j;
        }
      }
      if (j1 < 0) throw core::Error::internal("assignment: no augmenting path (non-finite costs?)");
      for (int j = 0; j <= m; ++j) {
        if (used[j]) {
          u[p[j]] += delta;
          v[j] -= delta;
        } else {
          minv[j] -= delta;
        }
      }
      j0 = j1;
    } while (p[j0] != 0);
    do {  // augment along the path
      const int j1 = way[j0];
      p[j0] = p[j1];
      j0 = j1;
    } while (j0);
  }
  std::vector<int> col(n, -1);
  for (int j = 1; j <= m; ++j)
    if (p[j]) col[p[j] - 1] = j - 1;
  return col;
}

}  // namespace

std::vector<int> assign_min(const MatrixXdRM& cost) {
  if (!cost.allFinite()) throw core::Error::internal("assignment: non-finite cost");
  if (cost.rows() == 0) return {};
  if (cost.rows() <= cost.cols()) return solve(cost);
  // More rows than columns: solve the transpose, then map back.
  const MatrixXdRM t = cost.transpose();
  const std::vector<int> row_of_col = solve(t);
  std::vector<int> col(cost.rows(), -1);
  for (int j = 0; j < static_cast<int>(row_of_col.size()); ++j) col[row_of_col[j]] = j;
  return col;
}

std::vector<int> assign_max(const MatrixXdRM& score) { return assign_min(-score); }

double assignment_value(const MatrixXdRM& m, const std::vector<int>& col) {
  double s = 0;
  for (size_t i = 0; i < col.size(); ++i)
    if (col[i] >= 0) s += m(static_cast<int64_t>(i), col[i]);
  return s;
}

}  // namespace moe::passes
