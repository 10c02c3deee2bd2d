#include "passes/lowrank.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <optional>
#include <queue>

#include "core/error.h"

namespace moe::passes::lowrank {

using core::Error;
using runtime::MatrixRM;

namespace {

std::string shape(int64_t r, int64_t c) { return std::to_string(r) + "x" + std::to_string(c); }

void check_weight(const MatrixRM& w, const std::string& what) {
  if (w.rows() < 1 || w.cols() < 1) throw Error::invalid(what + ": empty matrix (" + shape(w.rows(), w.cols()) + ")");
  if (!w.allFinite()) {
    for (int64_t i = 0; i < w.rows(); ++i)
      for (int64_t j = 0; j < w.cols(); ++j)
        if (!std::isfinite(w(i, j)))
          throw Error::invalid(what + ": weight matrix contains NaN or Inf (first at row " + std::to_string(i) +
                               ", column " + std::to_string(j) + ")");
  }
}

void check_rank(const Spectrum& s, int k, const char* fn) {
  if (k < 0 || k > s.rank_limit())
    throw Error::internal(std::string(fn) + ": rank " + std::to_string(k) + " outside [0, " +
                          std::to_string(s.rank_limit()) + "]");
}

// M [m, n] (destroyed) = U diag(σ) Vᵀ, thin, with LAPACKE_dgesdd. The row-major M is the
// column-major Mᵀ [n, m]; its SVD Mᵀ = V Σ Uᵀ hands back, in column-major, "U" = V [n, p] which
// is our row-major Vᵀ [p, n], and "Vᵀ" = Uᵀ [p, m] which is our row-major U [m, p]: no transposed
// copies.
void decompose(MatrixD& m, Spectrum& out) {
  const int64_t rows = m.rows(), cols = m.cols(), p = std::min(rows, cols);
  out.u.resize(rows, p);
  out.vt.resize(p, cols);
  out.sigma.assign(static_cast<size_t>(p), 0.0);
  const lapack_int info = LAPACKE_dgesdd(LAPACK_COL_MAJOR, 'S', static_cast<lapack_int>(cols),
                                         static_cast<lapack_int>(rows), m.data(), static_cast<lapack_int>(cols),
                                         out.sigma.data(), out.vt.data(), static_cast<lapack_int>(cols),
                                         out.u.data(), static_cast<lapack_int>(p));
  if (info != 0)
    throw Error::internal("low-rank: SVD of a " + shape(rows, cols) + " matrix failed (LAPACKE_dgesdd info " +
                          std::to_string(info) + ")");
  out.rows = rows;
  out.cols = cols;
}

// X ← X·S⁻¹ for S [n, n] lower triangular (solves Y S = X), X [k, n] row-major.
void solve_right_lower(MatrixD& x, const MatrixD& s) {
  if (x.rows() == 0) return;
  cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, static_cast<int>(x.rows()),
              static_cast<int>(x.cols()), 1.0, s.data(), static_cast<int>(s.cols()), x.data(),
              static_cast<int>(x.cols()));
}

// X ← X·S for S lower triangular, in place.
void mul_right_lower(MatrixD& x, const MatrixD& s) {
  cblas_dtrmm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, static_cast<int>(x.rows()),
              static_cast<int>(x.cols()), 1.0, s.data(), static_cast<int>(s.cols()), x.data(),
              static_cast<int>(x.cols()));
}

// Lower Cholesky factor of a (row-major, symmetric) matrix in place. The row-major buffer read as
// column-major is the same symmetric matrix; dpotrf 'U' gives Uᵀ U there, i.e. L Lᵀ with L = Uᵀ
// lower triangular in row-major; the strict upper triangle is not read. On success it is zeroed;
// returns false (strict upper triangle untouched) when not positive definite or a pivot² <= tol.
bool cholesky_lower(MatrixD& a, double tol) {
  const lapack_int n = static_cast<lapack_int>(a.rows());
  const lapack_int info = LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', n, a.data(), n);
  if (info < 0) throw Error::internal("low-rank: LAPACKE_dpotrf argument " + std::to_string(-info) + " invalid");
  if (info > 0) return false;
  for (lapack_int i = 0; i < n; ++i)
    if (a(i, i) * a(i, i) <= tol) return false;
  a.triangularView<Eigen::StrictlyUpper>().setZero();
  return true;
}

double min_eigenvalue(const MatrixD& g) {
  MatrixD a = g;
  const lapack_int n = static_cast<lapack_int>(a.rows());
  std::vector<double> w(static_cast<size_t>(n));
  const lapack_int info = LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'N', 'U', n, a.data(), n, w.data());
  if (info != 0) throw Error::internal("low-rank: eigenvalues of the Gram matrix failed (LAPACKE_dsyevd info " +
                                       std::to_string(info) + ")");
  return w.front();  // ascending
}

std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Spectrum

double Spectrum::loss(int k) const {
  check_rank(*this, k, "Spectrum::loss");
  double sum = 0;
  for (size_t i = sigma.size(); i-- > static_cast<size_t>(k);) sum += sigma[i] * sigma[i];  // small first
  return sum;
}

MatrixD Spectrum::right(int k) const {
  check_rank(*this, k, "Spectrum::right");
  MatrixD r = vt.topRows(k);
  if (!col_scale.empty())
    for (int64_t j = 0; j < r.cols(); ++j) r.col(j) /= col_scale[static_cast<size_t>(j)];
  if (whitening) solve_right_lower(r, *whitening);
  return r;
}

MatrixD Spectrum::reconstruct(int k) const {
  MatrixD us = u.leftCols(k);
  for (int i = 0; i < k; ++i) us.col(i) *= sigma[static_cast<size_t>(i)];
  return us * right(k);
}

Factors truncate(const Spectrum& s, int k) {
  check_rank(s, k, "truncate");
  MatrixD b = s.right(k);
  Factors f{MatrixRM(s.rows, k), MatrixRM(k, s.cols)};
  for (int i = 0; i < k; ++i) {
    const double h = std::sqrt(s.sigma[static_cast<size_t>(i)]);
    f.a.col(i) = (s.u.col(i) * h).cast<float>();
    f.b.row(i) = (b.row(i) * h).cast<float>();
  }
  return f;
}

// ---------------------------------------------------------------------------------------------
// SVD, ASVD

Spectrum svd(const MatrixRM& w) {
  check_weight(w, "SVD");
  MatrixD m = w.cast<double>();
  Spectrum s;
  decompose(m, s);
  return s;
}

Spectrum asvd(const MatrixRM& w, const std::vector<double>& act_scale, double alpha) {
  check_weight(w, "ASVD");
  const int64_t n = w.cols();
  if (static_cast<int64_t>(act_scale.size()) != n)
    throw Error::invalid("ASVD: " + std::to_string(act_scale.size()) + " activation scales for a matrix with " +
                         std::to_string(n) + " input channels");
  if (!std::isfinite(alpha) || alpha < 0) throw Error::invalid("ASVD: alpha must be finite and >= 0, got " + fmt(alpha));
  double mx = 0;
  for (size_t j = 0; j < act_scale.size(); ++j) {
    const double a = act_scale[j];
    if (!std::isfinite(a) || a < 0)
      throw Error::invalid("ASVD: activation scale of input channel " + std::to_string(j) + " is " + fmt(a) +
                           " (must be finite and >= 0)");
    mx = std::max(mx, a);
  }
  if (!(mx > 0)) {
    Spectrum s = svd(w);
    s.note = "activation scales are all zero (no calibration token reached this expert): plain SVD";
    return s;
  }
  const double floor = 1e-6 * mx;
  std::vector<double> scale(static_cast<size_t>(n));
  int64_t floored = 0;
  for (int64_t j = 0; j < n; ++j) {
    double a = act_scale[static_cast<size_t>(j)];
    if (a < floor) {
      a = floor;
      ++floored;
    }
    scale[static_cast<size_t>(j)] = std::pow(a, alpha);
  }
  MatrixD m = w.cast<double>();
  for (int64_t j = 0; j < n; ++j) m.col(j) *= scale[static_cast<size_t>(j)];
  Spectrum s;
  decompose(m, s);
  s.col_scale = std::move(scale);
  if (floored > 0)
    s.note = std::to_string(floored) + " input channel(s) with activation scale below 1e-6 x max raised to it";
  return s;
}

// ---------------------------------------------------------------------------------------------
// SVD-LLM

Whitening whiten(MatrixD gram, const std::string& what) {
  const int64_t n = gram.rows();
  if (n < 1 || gram.cols() != n) throw Error::invalid(what + ": expected a square matrix, got " + shape(n, gram.cols()));
  if (!gram.allFinite()) throw Error::invalid(what + ": contains NaN or Inf");
  const double max_abs = gram.cwiseAbs().maxCoeff();
  Whitening wh;
  wh.dim = n;
  if (max_abs == 0) {
    wh.plain = true;
    wh.note = what + " is zero (no calibration token reached this expert): plain SVD";
    return wh;
  }
  std::vector<double> diag(static_cast<size_t>(n));
  double max_diag = 0;
  for (int64_t i = 0; i < n; ++i) {
    diag[static_cast<size_t>(i)] = gram(i, i);
    if (gram(i, i) < 0)
      throw Error::invalid(what + ": negative diagonal entry " + fmt(gram(i, i)) + " at " + std::to_string(i) +
                           " (not a Gram matrix)");
    max_diag = std::max(max_diag, gram(i, i));
  }
  if ((gram - gram.transpose()).cwiseAbs().maxCoeff() > 1e-9 * max_abs) throw Error::invalid(what + ": not symmetric");
  // dpotrf works in place on the lower triangle (row-major) and leaves the strict upper one: G is
  // rebuilt from it and `diag` when a retry needs it (no n×n copy on the common path).
  auto restore = [&](double shift) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < i; ++j) gram(i, j) = gram(j, i);
      gram(i, i) = diag[static_cast<size_t>(i)] + shift;
    }
  };
  if (cholesky_lower(gram, 1e-10 * max_diag)) {
    wh.s = std::make_shared<const MatrixD>(std::move(gram));
    return wh;
  }
  // docs/methods.md: G + (−λ_min + 1e−6)·I.
  restore(0);
  const double lambda_min = min_eigenvalue(gram);
  const double base = std::max(-lambda_min, 0.0);
  for (double d = 1e-6; d <= 1e300; d *= 10) {
    const double shift = base + d;
    restore(shift);
    if (cholesky_lower(gram, 1e-10 * (max_diag + shift))) {
      wh.s = std::make_shared<const MatrixD>(std::move(gram));
      wh.shift = shift;
      wh.note = what + " not positive definite (smallest eigenvalue " + fmt(lambda_min) + "): added " + fmt(shift) +
                " to the diagonal" + (d > 1e-6 ? " (1e-6 above -lambda_min was below its rounding level)" : "");
      return wh;
    }
  }
  throw Error::internal(what + ": no diagonal shift made the matrix factorisable");
}

Spectrum svdllm(const MatrixRM& w, MatrixD gram) {
  check_weight(w, "SVD-LLM");
  if (gram.rows() != w.cols() || gram.cols() != w.cols())
    throw Error::invalid("SVD-LLM: Gram matrix is " + shape(gram.rows(), gram.cols()) + ", the weight has " +
                         std::to_string(w.cols()) + " input channels");
  return svdllm(w, whiten(std::move(gram)));
}

Spectrum svdllm(const MatrixRM& w, const Whitening& white) {
  check_weight(w, "SVD-LLM");
  if (white.dim != w.cols())
    throw Error::invalid("SVD-LLM: whitening is for " + std::to_string(white.dim) + " input channels, the weight has " +
                         std::to_string(w.cols()));
  if (white.plain) {
    Spectrum s = svd(w);
    s.note = white.note;
    return s;
  }
  MatrixD m = w.cast<double>();
  mul_right_lower(m, *white.s);
  Spectrum s;
  decompose(m, s);
  s.whitening = white.s;
  s.shift = white.shift;
  s.note = white.note;
  return s;
}

double weighted_error(const MatrixRM& w, const Factors& f, const MatrixD& gram) {
  if (f.a.rows() != w.rows() || f.b.cols() != w.cols() || f.a.cols() != f.b.rows())
    throw Error::invalid("weighted_error: factors " + shape(f.a.rows(), f.a.cols()) + " x " +
                         shape(f.b.rows(), f.b.cols()) + " do not match a " + shape(w.rows(), w.cols()) + " weight");
  MatrixD r = w.cast<double>();
  if (f.a.cols() > 0) r.noalias() -= f.a.cast<double>() * f.b.cast<double>();
  if (gram.size() == 0) return r.squaredNorm();
  if (gram.rows() != w.cols() || gram.cols() != w.cols())
    throw Error::invalid("weighted_error: Gram matrix is " + shape(gram.rows(), gram.cols()) + ", expected " +
                         shape(w.cols(), w.cols()));
  return (r * gram).cwiseProduct(r).sum();
}

// ---------------------------------------------------------------------------------------------
// D²-MoE base and deltas

MatrixRM delta_base(const std::vector<const MatrixRM*>& ws, const std::vector<double>& weights) {
  if (ws.empty()) throw Error::invalid("D2-MoE base: no expert matrices");
  if (weights.size() != ws.size())
    throw Error::invalid("D2-MoE base: " + std::to_string(weights.size()) + " weights for " +
                         std::to_string(ws.size()) + " experts");
  double total = 0;
  for (size_t e = 0; e < weights.size(); ++e) {
    if (!std::isfinite(weights[e]) || weights[e] < 0)
      throw Error::invalid("D2-MoE base: weight of expert " + std::to_string(e) + " is " + fmt(weights[e]) +
                           " (must be finite and >= 0)");
    total += weights[e];
  }
  if (!(total > 0)) throw Error::invalid("D2-MoE base: the expert weights sum to zero");
  const int64_t m = ws[0]->rows(), n = ws[0]->cols();
  MatrixD acc = MatrixD::Zero(m, n);
  for (size_t e = 0; e < ws.size(); ++e) {
    check_weight(*ws[e], "D2-MoE base, expert " + std::to_string(e));
    if (ws[e]->rows() != m || ws[e]->cols() != n)
      throw Error::invalid("D2-MoE base: expert " + std::to_string(e) + " is " + shape(ws[e]->rows(), ws[e]->cols()) +
                           ", expert 0 is " + shape(m, n));
    acc += (weights[e] / total) * ws[e]->cast<double>();
  }
  return acc.cast<float>();
}

std::vector<MatrixRM> deltas(const std::vector<const MatrixRM*>& ws, const MatrixRM& base) {
  std::vector<MatrixRM> out;
  out.reserve(ws.size());
  for (size_t e = 0; e < ws.size(); ++e) {
    if (ws[e]->rows() != base.rows() || ws[e]->cols() != base.cols())
      throw Error::invalid("D2-MoE deltas: expert " + std::to_string(e) + " is " +
                           shape(ws[e]->rows(), ws[e]->cols()) + ", the base " + shape(base.rows(), base.cols()));
    out.push_back(*ws[e] - base);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Shared bases (D²-MoE shared V, MoLE)

SharedSpectrum shared_spectrum(const std::vector<const MatrixRM*>& ws, Side side, const std::vector<const MatrixD*>* grams) {
  if (ws.empty()) throw Error::invalid("shared basis: no expert matrices");
  const int64_t E = static_cast<int64_t>(ws.size()), m = ws[0]->rows(), n = ws[0]->cols();
  for (int64_t e = 0; e < E; ++e) {
    check_weight(*ws[e], "shared basis, expert " + std::to_string(e));
    if (ws[e]->rows() != m || ws[e]->cols() != n)
      throw Error::invalid("shared basis: expert " + std::to_string(e) + " is " + shape(ws[e]->rows(), ws[e]->cols()) +
                           ", expert 0 is " + shape(m, n));
  }
  if (grams) {
    if (static_cast<int64_t>(grams->size()) != E)
      throw Error::invalid("shared basis: " + std::to_string(grams->size()) + " Gram matrices for " +
                           std::to_string(E) + " experts");
    for (int64_t e = 0; e < E; ++e) {
      const MatrixD& g = *(*grams)[e];
      if (g.rows() != n || g.cols() != n)
        throw Error::invalid("shared basis: Gram matrix of expert " + std::to_string(e) + " is " +
                             shape(g.rows(), g.cols()) + ", expected " + shape(n, n));
    }
  }
  SharedSpectrum out;
  out.side = side;
  out.experts = E;
  out.rows = m;
  out.cols = n;
  if (side == Side::Right) {
    MatrixD stacked(E * m, n);  // [W_1; …; W_E]
    for (int64_t e = 0; e < E; ++e) stacked.middleRows(e * m, m) = ws[e]->cast<double>();
    Whitening wh;
    if (grams) {
      MatrixD sum = MatrixD::Zero(n, n);
      for (int64_t e = 0; e < E; ++e) {
        if (!(*grams)[e]->allFinite())
          throw Error::invalid("shared basis: Gram matrix of expert " + std::to_string(e) + " contains NaN or Inf");
        sum += *(*grams)[e];
      }
      wh = whiten(std::move(sum), "summed Gram matrix");
      out.shifts = {wh.shift};
      if (!wh.note.empty()) out.notes.push_back(wh.note);
      if (!wh.plain) mul_right_lower(stacked, *wh.s);
    }
    decompose(stacked, out.joint);
    if (grams && !wh.plain) {
      out.joint.whitening = wh.s;
      out.joint.shift = wh.shift;
    }
  } else {
    MatrixD stacked(m, E * n);  // [W_1 S_1 | … | W_E S_E]
    out.block_whitening.assign(static_cast<size_t>(E), nullptr);
    for (int64_t e = 0; e < E; ++e) {
      MatrixD blk = ws[e]->cast<double>();
      if (grams) {
        Whitening wh = whiten(*(*grams)[e], "Gram matrix of expert " + std::to_string(e));
        out.shifts.push_back(wh.shift);
        if (!wh.note.empty()) out.notes.push_back(wh.note);
        if (!wh.plain) {
          mul_right_lower(blk, *wh.s);
          out.block_whitening[static_cast<size_t>(e)] = wh.s;
        }
      }
      stacked.middleCols(e * n, n) = blk;
    }
    decompose(stacked, out.joint);
  }
  return out;
}

MatrixRM SharedFactors::product(size_t e) const {
  return side == Side::Right ? MatrixRM(own.at(e) * shared) : MatrixRM(shared * own.at(e));
}

int64_t SharedFactors::params() const {
  int64_t p = shared.size();
  for (const auto& o : own) p += o.size();
  return p;
}

SharedFactors truncate_shared(const SharedSpectrum& s, int k, SigmaSplit split) {
  check_rank(s.joint, k, "truncate_shared");
  const int64_t E = s.experts, m = s.rows, n = s.cols;
  // Σ^β on the shared factor, Σ^(1−β) on the experts' (β = ½ Balanced, 0 OnExperts).
  std::vector<double> on_shared(static_cast<size_t>(k)), on_own(static_cast<size_t>(k));
  for (int i = 0; i < k; ++i) {
    const double sg = s.joint.sigma[static_cast<size_t>(i)];
    on_shared[static_cast<size_t>(i)] = split == SigmaSplit::Balanced ? std::sqrt(sg) : 1.0;
    on_own[static_cast<size_t>(i)] = split == SigmaSplit::Balanced ? std::sqrt(sg) : sg;
  }
  SharedFactors f;
  f.side = s.side;
  if (s.side == Side::Right) {
    MatrixD b = s.joint.right(k);  // V_kᵀ S⁻¹ [k, n]
    for (int i = 0; i < k; ++i) b.row(i) *= on_shared[static_cast<size_t>(i)];
    f.shared = b.cast<float>();
    for (int64_t e = 0; e < E; ++e) {
      MatrixD a = s.joint.u.block(e * m, 0, m, k);
      for (int i = 0; i < k; ++i) a.col(i) *= on_own[static_cast<size_t>(i)];
      f.own.push_back(a.cast<float>());
    }
  } else {
    MatrixD a = s.joint.u.leftCols(k);
    for (int i = 0; i < k; ++i) a.col(i) *= on_shared[static_cast<size_t>(i)];
    f.shared = a.cast<float>();
    for (int64_t e = 0; e < E; ++e) {
      MatrixD b = s.joint.vt.block(0, e * n, k, n);
      const auto& S = s.block_whitening.empty() ? nullptr : s.block_whitening[static_cast<size_t>(e)];
      if (S) solve_right_lower(b, *S);
      for (int i = 0; i < k; ++i) b.row(i) *= on_own[static_cast<size_t>(i)];
      f.own.push_back(b.cast<float>());
    }
  }
  return f;
}

// ---------------------------------------------------------------------------------------------
// Ranks

int rank_for_ratio(int64_t m, int64_t n, double ratio) {
  if (m < 1 || n < 1) throw Error::invalid("rank_for_ratio: empty matrix " + shape(m, n));
  if (!(ratio > 0 && ratio <= 1)) throw Error::invalid("rank ratio must be in (0, 1], got " + fmt(ratio));
  const double k = std::floor(ratio * static_cast<double>(m) * static_cast<double>(n) / static_cast<double>(m + n));
  return static_cast<int>(std::clamp<double>(k, 1.0, static_cast<double>(std::min(m, n))));
}

int rank_for_energy(const Spectrum& s, double energy) {
  if (!(energy >= 0 && energy <= 1)) throw Error::invalid("energy must be in [0, 1], got " + fmt(energy));
  double total = 0;
  for (double v : s.sigma) total += v * v;
  if (!(total > 0) || energy == 0) return 0;
  const double target = energy * total;
  double acc = 0;
  for (int k = 0; k < s.rank_limit(); ++k) {
    if (acc >= target) return k;
    acc += s.sigma[static_cast<size_t>(k)] * s.sigma[static_cast<size_t>(k)];
  }
  return s.rank_limit();  // also when rounding keeps the last partial sum a hair below the target
}

int64_t max_useful_rank(int64_t m, int64_t n) {
  if (m < 1 || n < 1) return 0;
  return (m * n - 1) / (m + n);  // largest k with k(m+n) <= mn − 1
}

// ---------------------------------------------------------------------------------------------
// Budget allocation

BudgetItem budget_item(const Spectrum& s, double weight) {
  return {s.sigma, s.rows + s.cols, s.rows * s.cols, weight};
}

BudgetItem budget_item(const SharedSpectrum& s, double weight) {
  const int64_t E = s.experts, m = s.rows, n = s.cols;
  const int64_t per_rank = s.side == Side::Right ? n + E * m : m + E * n;
  return {s.joint.sigma, per_rank, E * m * n, weight};
}

namespace {

int64_t kmax_of(const BudgetItem& it) {
  if (it.cost_per_rank <= 0) return 0;
  const int64_t k = (it.dense_params - 1) / it.cost_per_rank;
  return std::clamp<int64_t>(k, 0, static_cast<int64_t>(it.sigma.size()));
}

double tail(const BudgetItem& it, int64_t k) {
  double s = 0;
  for (size_t i = it.sigma.size(); i-- > static_cast<size_t>(k);) s += it.sigma[i] * it.sigma[i];
  return s;
}

void check_items(const std::vector<BudgetItem>& items) {
  for (size_t j = 0; j < items.size(); ++j) {
    const BudgetItem& it = items[j];
    const std::string w = "budget item " + std::to_string(j);
    if (it.cost_per_rank < 1 || it.dense_params < 1)
      throw Error::invalid(w + ": cost per rank and dense parameters must be >= 1");
    if (!std::isfinite(it.weight) || it.weight < 0) throw Error::invalid(w + ": weight must be finite and >= 0");
    for (size_t i = 0; i < it.sigma.size(); ++i) {
      if (!std::isfinite(it.sigma[i]) || it.sigma[i] < 0) throw Error::invalid(w + ": singular value not finite or negative");
      if (i > 0 && it.sigma[i] > it.sigma[i - 1]) throw Error::invalid(w + ": singular values not descending");
    }
  }
}

}  // namespace

int64_t allocation_params(const std::vector<BudgetItem>& items, const std::vector<int>& ranks) {
  if (ranks.size() != items.size()) throw Error::internal("allocation_params: ranks and items differ in count");
  int64_t p = 0;
  for (size_t j = 0; j < items.size(); ++j)
    p += ranks[j] == kKeepDense ? items[j].dense_params : int64_t{ranks[j]} * items[j].cost_per_rank;
  return p;
}

double allocation_loss(const std::vector<BudgetItem>& items, const std::vector<int>& ranks) {
  if (ranks.size() != items.size()) throw Error::internal("allocation_loss: ranks and items differ in count");
  double l = 0;
  for (size_t j = 0; j < items.size(); ++j)
    if (ranks[j] != kKeepDense) l += items[j].weight * tail(items[j], ranks[j]);
  return l;
}

std::vector<int> allocate_ranks(const std::vector<BudgetItem>& items, int64_t param_budget) {
  check_items(items);
  const size_t J = items.size();
  std::vector<int> ranks(J, kKeepDense);
  std::vector<int64_t> kmax(J);
  int64_t used = 0;
  for (size_t j = 0; j < J; ++j) {
    kmax[j] = kmax_of(items[j]);
    if (kmax[j] >= 1) {
      ranks[j] = 1;
      used += items[j].cost_per_rank;
    } else {
      used += items[j].dense_params;
    }
  }
  if (used > param_budget)
    throw Error::invalid("parameter budget " + std::to_string(param_budget) + " is below the minimum " +
                         std::to_string(used) + " (every factorisable matrix at rank 1, the others dense)");
  // The next step of item j from rank r: gain (loss removed) and cost (parameters).
  struct Step {
    double ratio;
    size_t item;
    double gain;
    int64_t cost;
  };
  auto next_step = [&](size_t j, int r) -> std::optional<Step> {
    const BudgetItem& it = items[j];
    if (r == kKeepDense) return std::nullopt;
    if (r < kmax[j]) {
      const double s = it.sigma[static_cast<size_t>(r)];
      const double gain = it.weight * s * s;
      return Step{gain / static_cast<double>(it.cost_per_rank), j, gain, it.cost_per_rank};
    }
    const int64_t cost = it.dense_params - int64_t{r} * it.cost_per_rank;  // > 0 by the definition of kmax
    const double gain = it.weight * tail(it, r);
    return Step{gain / static_cast<double>(cost), j, gain, cost};
  };
  auto worse = [](const Step& a, const Step& b) {  // priority: larger ratio, then lower index
    if (a.ratio != b.ratio) return a.ratio < b.ratio;
    return a.item > b.item;
  };
  // Greedy fill of `left` parameters from ranks `rk` (item `skip` excluded); returns the loss removed.
  auto fill = [&](std::vector<int>& rk, int64_t& left, size_t skip) {
    std::priority_queue<Step, std::vector<Step>, decltype(worse)> heap(worse);
    for (size_t j = 0; j < J; ++j)
      if (j != skip)
        if (auto s = next_step(j, rk[j])) heap.push(*s);
    double gained = 0;
    while (!heap.empty()) {
      const Step s = heap.top();
      heap.pop();
      // A step that does not fit ends its item (its later steps come after it); a step that
      // removes no loss is not worth parameters.
      if (s.cost > left || !(s.gain > 0)) continue;
      left -= s.cost;
      gained += s.gain;
      const size_t j = s.item;
      rk[j] = rk[j] < kmax[j] ? rk[j] + 1 : kKeepDense;
      if (auto n = next_step(j, rk[j])) heap.push(*n);
    }
    return gained;
  };
  int64_t left = param_budget - used;
  fill(ranks, left, J);
  // Exchange improvement (the dense steps and unequal costs make the greedy a knapsack heuristic):
  // undo one item's last step, refill the freed parameters greedily from the other items, keep
  // the best strictly improving exchange; repeat until none improves.
  double scale = 0;
  for (const auto& it : items) scale += it.weight * tail(it, 0);
  for (int round = 0; round < 64; ++round) {  // a cap; the tests need at most a few rounds
    double best = 1e-12 * scale;
    std::vector<int> best_ranks;
    int64_t best_left = 0;
    for (size_t j = 0; j < J; ++j) {
      const BudgetItem& it = items[j];
      double lost;
      int64_t freed;
      int back;
      if (ranks[j] == kKeepDense) {
        if (kmax[j] < 1) continue;  // always dense
        back = static_cast<int>(kmax[j]);
        freed = it.dense_params - kmax[j] * it.cost_per_rank;
        lost = it.weight * tail(it, back);
      } else if (ranks[j] >= 2) {
        back = ranks[j] - 1;
        freed = it.cost_per_rank;
        const double sg = it.sigma[static_cast<size_t>(back)];
        lost = it.weight * sg * sg;
      } else {
        continue;
      }
      std::vector<int> rk = ranks;
      rk[j] = back;
      int64_t lft = left + freed;
      const double delta = fill(rk, lft, j) - lost;
      if (delta > best) {
        best = delta;
        best_ranks = std::move(rk);
        best_left = lft;
      }
    }
    if (best_ranks.empty()) break;
    ranks = std::move(best_ranks);
    left = best_left;
  }
  return ranks;
}

}  // namespace moe::passes::lowrank
