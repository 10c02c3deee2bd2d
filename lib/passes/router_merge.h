// The router after merging: one row per merged expert (stock formats need one per expert).
//   dominant: the row of the group's dominant (most important) member;
//   mean:     the importance-weighted mean of the members' rows (merge option "importance");
//   refit:    ridge regression on the calibration block inputs x so that the new logit of group g
//             approximates log Σ_{e∈g} exp(logit_e(x)) (for softmax routers the merged expert then
//             gets the summed probability of its members): W = (XᵀX + λI)⁻¹ XᵀY with
//             λ = ridge · trace(XᵀX)/H, accumulated and solved in f64, no bias term.
// In every mode a group of one keeps its member's row unchanged (its own row reproduces its
// logit exactly, better than any fit).
#pragma once

#include <vector>

#include "passes/clustering.h"  // Groups
#include "runtime/weights.h"

namespace moe::passes {

using runtime::MatrixRM;

MatrixRM router_dominant(const MatrixRM& router, const Groups& groups, const std::vector<int>& dominant);
MatrixRM router_mean(const MatrixRM& router, const Groups& groups, const std::vector<std::vector<double>>& weights);
// Error::invalid when x has no rows (nothing to fit).
MatrixRM router_refit(const MatrixRM& router, const MatrixRM& x, const Groups& groups, double ridge = 1e-2);

// Per group: log Σ_{e∈g} exp(router_e · x_n), [N, G] in f64 (the refit target).
MatrixXdRM group_logsumexp(const MatrixRM& router, const MatrixRM& x, const Groups& groups);

}  // namespace moe::passes
