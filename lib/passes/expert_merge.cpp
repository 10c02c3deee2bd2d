#include "passes/expert_merge.h"

#include <Eigen/Cholesky>
#include <algorithm>
#include <cmath>
#include <lapacke.h>
#include <limits>

#include "core/error.h"

namespace moe::passes {

using core::Error;
using MatD = MatrixXdRM;

std::vector<int> align_neurons(const MlpWeights& ref, const MlpWeights& e) {
  if (ref.gate.rows() != e.gate.rows() || ref.gate.cols() != e.gate.cols() || ref.down.cols() != e.down.cols())
    throw Error::invalid("M-SMoE alignment needs experts of equal shape (widths " + std::to_string(ref.width()) +
                         " and " + std::to_string(e.width()) + ")");
  // Products in f32 (BLAS; no f64 copies of the weights), the assignment in f64.
  MatrixRM C = ref.gate * e.gate.transpose();
  C.noalias() += ref.up * e.up.transpose();
  C.noalias() += ref.down.transpose() * e.down;
  return assign_max(C.cast<double>());
}

MlpWeights permute_neurons(const MlpWeights& e, const std::vector<int>& perm) {
  const int64_t I = e.width();
  if (static_cast<int64_t>(perm.size()) != I) throw Error::internal("permute_neurons: permutation size != width");
  MlpWeights out{MatrixRM(I, e.gate.cols()), MatrixRM(I, e.up.cols()), MatrixRM(e.down.rows(), I)};
  out.act = e.act;
  out.down_bias = e.down_bias;  // per output, not per neuron
  if (e.gate_bias) out.gate_bias = RowVector(I);
  if (e.up_bias) out.up_bias = RowVector(I);
  for (int64_t i = 0; i < I; ++i) {
    out.gate.row(i) = e.gate.row(perm[i]);
    out.up.row(i) = e.up.row(perm[i]);
    out.down.col(i) = e.down.col(perm[i]);
    if (e.gate_bias) (*out.gate_bias)(i) = (*e.gate_bias)(perm[i]);
    if (e.up_bias) (*out.up_bias)(i) = (*e.up_bias)(perm[i]);
  }
  return out;
}

MatrixRM weighted_sum(const std::vector<const MatrixRM*>& ms, const std::vector<double>& w) {
  MatrixRM out = MatrixRM::Zero(ms.at(0)->rows(), ms[0]->cols());
  for (size_t i = 0; i < ms.size(); ++i) {
    if (ms[i]->rows() != out.rows() || ms[i]->cols() != out.cols())
      throw Error::invalid("merge: experts of a group differ in shape");
    out += static_cast<float>(w[i]) * *ms[i];
  }
  return out;
}

MlpWeights weighted_average(const std::vector<const MlpWeights*>& ms, const std::vector<double>& w) {
  std::vector<const MatrixRM*> g, u, d;
  for (const auto* m : ms) {
    g.push_back(&m->gate);
    u.push_back(&m->up);
    d.push_back(&m->down);
  }
  MlpWeights out{weighted_sum(g, w), weighted_sum(u, w), weighted_sum(d, w)};
  average_biases(out, ms, w);
  return out;
}

void average_biases(MlpWeights& out, const std::vector<const MlpWeights*>& ms, const std::vector<double>& w) {
  out.act = ms.at(0)->act;
  using Bias = std::optional<RowVector> MlpWeights::*;
  for (Bias b : {&MlpWeights::gate_bias, &MlpWeights::up_bias, &MlpWeights::down_bias}) {
    if (!(ms[0]->*b)) {
      (out.*b).reset();
      continue;
    }
    RowVector acc = RowVector::Zero((ms[0]->*b)->size());
    for (size_t i = 0; i < ms.size(); ++i) {
      if (!(ms[i]->*b) || (ms[i]->*b)->size() != acc.size()) throw Error::invalid("merge: experts of a group differ in biases");
      acc += static_cast<float>(w[i]) * *(ms[i]->*b);
    }
    out.*b = acc;
  }
}

namespace {

// Lower Cholesky factor S of gram + damp·mean(diag)·I (gram = S Sᵀ); damping grows tenfold until
// the factorisation succeeds. Identity for an all-zero Gram (the expert saw no tokens).
MatD whitening_factor(const calib::MatrixD& gram, double damp) {
  const int64_t c = gram.rows();
  const double mean_diag = gram.diagonal().mean();
  if (!(mean_diag > 0)) return MatD::Identity(c, c);
  for (double d = damp; d < 1e6; d *= 10) {
    MatD g = gram;
    g.diagonal().array() += d * mean_diag;
    Eigen::LLT<MatD> llt(g);
    if (llt.info() == Eigen::Success) return llt.matrixL();
  }
  throw Error::invalid("Sub-MoE whitening: the Gram matrix is not positive definite at any damping");
}

}  // namespace

MatrixRM joint_svd_merge(const std::vector<const MatrixRM*>& ms, const std::vector<double>& w, double rank_ratio,
                         const std::vector<const calib::MatrixD*>* grams, double damp) {
  const int64_t k = static_cast<int64_t>(ms.size()), m = ms.at(0)->rows(), c = ms[0]->cols();
  const int64_t n = k * c, full = std::min(m, n);
  // A = [W_1 S_1 | W_2 S_2 | ...], f64.
  MatD A(m, n);
  for (int64_t e = 0; e < k; ++e) {
    if (ms[e]->rows() != m || ms[e]->cols() != c) throw Error::invalid("merge: experts of a group differ in shape");
    if (grams) {
      const calib::MatrixD& G = *grams->at(e);
      if (G.rows() != c || G.cols() != c)
        throw Error::invalid("Sub-MoE whitening: Gram matrix is " + std::to_string(G.rows()) + "x" +
                             std::to_string(G.cols()) + ", expected " + std::to_string(c) + "x" + std::to_string(c));
      A.middleCols(e * c, c) = ms[e]->cast<double>() * whitening_factor(G, damp);
    } else {
      A.middleCols(e * c, c) = ms[e]->cast<double>();
    }
  }
  // A = U Σ Vᵀ (thin); only U is needed for the rebuild (see the header).
  std::vector<double> s(full);
  MatD U(m, full), Vt(full, n);
  const lapack_int info = LAPACKE_dgesdd(LAPACK_ROW_MAJOR, 'S', m, n, A.data(), n, s.data(), U.data(), full,
                                         Vt.data(), n);
  if (info != 0) throw Error::internal("Sub-MoE: SVD failed (LAPACKE_dgesdd info " + std::to_string(info) + ")");
  const int64_t r = std::clamp<int64_t>(std::llround(rank_ratio * static_cast<double>(full)), 1, full);
  const auto Ur = U.leftCols(r);
  MatD merged = MatD::Zero(m, c);  // Σ_e w_e W_e
  for (int64_t e = 0; e < k; ++e) merged += w[e] * ms[e]->cast<double>();
  const MatD coeff = Ur.transpose() * merged;  // V_mergedᵀ scaled by Σ_r: Σ_e w_e U_rᵀ W_e
  return (Ur * coeff).cast<float>();
}

DernResult dern_recombine(const std::vector<MlpWeights>& experts, const std::vector<int>& kept,
                          const std::vector<int>& dropped, const std::vector<double>& weights, double threshold) {
  if (kept.empty()) throw Error::internal("DERN: no retained expert");
  const MlpWeights& first = experts.at(kept[0]);
  if (first.gate_bias || first.up_bias || first.down_bias)
    throw Error::unsupported("DERN: experts with biases (gpt_oss) are not recombined (a moved neuron's bias has no "
                             "defined share of the down bias); use merge --method msmoe, hcsmoe or submoe");
  const int64_t I = first.width(), H = first.gate.cols();
  auto check = [&](int e) {
    const MlpWeights& x = experts.at(e);
    if (x.width() != I || x.gate.cols() != H || x.up.cols() != H || x.down.rows() != first.down.rows())
      throw Error::invalid("DERN needs experts of equal shape (widths " + std::to_string(I) + " and " +
                           std::to_string(x.width()) + ")");
  };
  // Unit rows [gate_i | up_i] (a zero row stays zero: cosine 0 with everything).
  auto keys = [&](const MlpWeights& x) {
    MatrixRM k(I, 2 * H);
    k.leftCols(H) = x.gate;
    k.rightCols(H) = x.up;
    for (int64_t i = 0; i < I; ++i) {
      const float n = k.row(i).norm();
      if (n > 0) k.row(i) /= n;
    }
    return k;
  };
  std::vector<MatrixRM> kept_keys;
  for (int r : kept) {
    check(r);
    kept_keys.push_back(keys(experts[r]));
  }
  DernResult out;
  const size_t R = kept.size();
  // Accumulators per kept expert and neuron.
  std::vector<MatrixRM> acc_gate(R), acc_up(R), acc_down(R);
  std::vector<std::vector<double>> acc_w(R, std::vector<double>(I, 0.0));
  std::vector<std::vector<int>> acc_n(R, std::vector<int>(I, 0));
  for (size_t r = 0; r < R; ++r) {
    acc_gate[r] = MatrixRM::Zero(I, H);
    acc_up[r] = MatrixRM::Zero(I, H);
    acc_down[r] = MatrixRM::Zero(first.down.rows(), I);
  }
  for (int d : dropped) {
    check(d);
    const MlpWeights& x = experts[d];
    const MatrixRM s = keys(x);
    std::vector<int> tgt(I, -1), neuron(I, -1);
    std::vector<double> best(I, -std::numeric_limits<double>::infinity());
    for (size_t r = 0; r < R; ++r) {
      const MatrixRM C = s * kept_keys[r].transpose();  // [segment, neuron of r]
      for (int64_t j = 0; j < I; ++j) {
        Eigen::Index i = 0;
        const double c = C.row(j).maxCoeff(&i);
        if (c > best[j]) {
          best[j] = c;
          tgt[j] = static_cast<int>(r);
          neuron[j] = static_cast<int>(i);
        }
      }
    }
    for (int64_t j = 0; j < I; ++j) {
      if (!(best[j] >= threshold)) {
        tgt[j] = -1;
        continue;
      }
      const int r = tgt[j], i = neuron[j];
      const double w = weights.at(d);
      acc_gate[r].row(i) += static_cast<float>(w) * x.gate.row(j);
      acc_up[r].row(i) += static_cast<float>(w) * x.up.row(j);
      acc_down[r].col(i) += static_cast<float>(w) * x.down.col(j);
      acc_w[r][i] += w;
      ++acc_n[r][i];
    }
    out.target.push_back(std::move(tgt));
    out.cosine.push_back(std::move(best));
  }
  for (size_t r = 0; r < R; ++r) {
    MlpWeights m = experts[kept[r]];
    const double wr = weights.at(kept[r]);
    int merged = 0;
    for (int64_t i = 0; i < I; ++i) {
      if (acc_n[r][i] == 0) continue;
      ++merged;
      const double total = wr + acc_w[r][i];
      if (total > 0) {
        const float a = static_cast<float>(wr / total), b = static_cast<float>(1.0 / total);
        m.gate.row(i) = a * m.gate.row(i) + b * acc_gate[r].row(i);
        m.up.row(i) = a * m.up.row(i) + b * acc_up[r].row(i);
        m.down.col(i) = a * m.down.col(i) + b * acc_down[r].col(i);
      } else {
        --merged;  // every weight 0 (no calibration token reached these experts): unchanged
      }
    }
    out.experts.push_back(std::move(m));
    out.neurons_merged.push_back(merged);
  }
  return out;
}

}  // namespace moe::passes
