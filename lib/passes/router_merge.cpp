#include "passes/router_merge.h"

#include <Eigen/Cholesky>
#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"

namespace moe::passes {

using core::Error;
using MatD = MatrixXdRM;

MatrixRM router_dominant(const MatrixRM& router, const Groups& groups, const std::vector<int>& dominant) {
  MatrixRM out(static_cast<int64_t>(groups.size()), router.cols());
  for (size_t g = 0; g < groups.size(); ++g) out.row(g) = router.row(dominant.at(g));
  return out;
}

MatrixRM router_mean(const MatrixRM& router, const Groups& groups, const std::vector<std::vector<double>>& weights) {
  MatrixRM out(static_cast<int64_t>(groups.size()), router.cols());
  for (size_t g = 0; g < groups.size(); ++g) {
    if (groups[g].size() == 1) {
      out.row(g) = router.row(groups[g][0]);
      continue;
    }
    Eigen::Matrix<double, 1, Eigen::Dynamic> acc = Eigen::Matrix<double, 1, Eigen::Dynamic>::Zero(router.cols());
    for (size_t i = 0; i < groups[g].size(); ++i) acc += weights[g][i] * router.row(groups[g][i]).cast<double>();
    out.row(g) = acc.cast<float>();
  }
  return out;
}

namespace {

// Rows [t0, t0+n) of x as f64 and their group targets.
void targets(const MatrixRM& router, const MatD& xd, const Groups& groups, MatD& y) {
  const MatD logits = xd * router.cast<double>().transpose();  // [n, E]
  y.resize(xd.rows(), static_cast<int64_t>(groups.size()));
  for (int64_t i = 0; i < xd.rows(); ++i)
    for (size_t g = 0; g < groups.size(); ++g) {
      double mx = -std::numeric_limits<double>::infinity();
      for (int e : groups[g]) mx = std::max(mx, logits(i, e));
      double s = 0;
      for (int e : groups[g]) s += std::exp(logits(i, e) - mx);
      y(i, g) = mx + std::log(s);
    }
}

constexpr int64_t kChunk = 2048;

}  // namespace

MatD group_logsumexp(const MatrixRM& router, const MatrixRM& x, const Groups& groups) {
  MatD y;
  targets(router, x.cast<double>(), groups, y);
  return y;
}

MatrixRM router_refit(const MatrixRM& router, const MatrixRM& x, const Groups& groups, double ridge) {
  const int64_t N = x.rows(), H = x.cols(), G = static_cast<int64_t>(groups.size());
  if (N == 0) throw Error::invalid("router refit: no calibration tokens to fit on");
  MatD xtx = MatD::Zero(H, H), xty = MatD::Zero(H, G), y;
  for (int64_t t0 = 0; t0 < N; t0 += kChunk) {
    const MatD xd = x.middleRows(t0, std::min(kChunk, N - t0)).cast<double>();
    targets(router, xd, groups, y);
    xtx.noalias() += xd.transpose() * xd;
    xty.noalias() += xd.transpose() * y;
  }
  const double lambda = ridge * xtx.trace() / static_cast<double>(H);
  if (!(lambda > 0)) throw Error::invalid("router refit: the calibration inputs are all zero");
  xtx.diagonal().array() += lambda;
  const MatD W = Eigen::LLT<MatD>(xtx).solve(xty);  // [H, G]
  MatrixRM out = W.transpose().cast<float>();
  for (int64_t g = 0; g < G; ++g)
    if (groups[g].size() == 1) out.row(g) = router.row(groups[g][0]);
  return out;
}

}  // namespace moe::passes
