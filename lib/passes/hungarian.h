// Linear assignment (Kuhn–Munkres / Hungarian algorithm with potentials, O(n^2 m)).
// Used by M-SMoE to align the intermediate neurons of an expert to its group's dominant expert.
#pragma once

#include <Eigen/Core>
#include <vector>

namespace moe::passes {

using MatrixXdRM = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Rectangular cost [n, m]. Returns col[i] for each row i: with n <= m every row gets a distinct
// column; with n > m only m rows are assigned (the others get -1). Minimises (maximises for
// assign_max) the sum of the chosen entries. Deterministic: ties are broken by the fixed scan
// order (lower indices first), so equal inputs give equal outputs. Entries must be finite.
std::vector<int> assign_min(const MatrixXdRM& cost);
std::vector<int> assign_max(const MatrixXdRM& score);

// Sum of the chosen entries (rows with -1 skipped).
double assignment_value(const MatrixXdRM& m, const std::vector<int>& col);

}  // namespace moe::passes
