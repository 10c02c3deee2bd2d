#include "passes/search.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace moe::passes {

using core::Error;

MatrixRM log_softmax_rows(const MatrixRM& logits) {
  MatrixRM out(logits.rows(), logits.cols());
  for (int64_t i = 0; i < logits.rows(); ++i) {
    const float m = logits.row(i).maxCoeff();
    double s = 0;
    for (int64_t j = 0; j < logits.cols(); ++j) s += std::exp(static_cast<double>(logits(i, j) - m));
    const float lse = m + static_cast<float>(std::log(s));
    out.row(i) = logits.row(i).array() - lse;
  }
  return out;
}

double mean_kl_logp(const MatrixRM& ref, const MatrixRM& cand) {
  if (ref.rows() != cand.rows() || ref.cols() != cand.cols()) throw Error::internal("mean_kl_logp: shapes differ");
  double total = 0;
  for (int64_t i = 0; i < ref.rows(); ++i) {
    double k = 0;
    for (int64_t j = 0; j < ref.cols(); ++j) {
      const double lp = ref(i, j);
      k += std::exp(lp) * (lp - static_cast<double>(cand(i, j)));
    }
    total += std::max(0.0, k);
  }
  return ref.rows() ? total / static_cast<double>(ref.rows()) : 0.0;
}

EndToEndScorer::EndToEndScorer(const runtime::Forward& fwd, const model::Model& model, int layer, int64_t T)
    : fwd_(fwd), layer_(layer), T_(T) {
  full_ = fwd.load_layer(layer);
  if (!full_.moe) throw Error::internal("search: layer " + std::to_string(layer) + " has no MoE block");
  for (int l = layer + 1; l < static_cast<int>(model.layers().size()); ++l) later_.push_back(fwd.load_layer(l));
}

runtime::LayerWeights EndToEndScorer::subset(const std::vector<int>& kept) const {
  runtime::LayerWeights w = full_;
  runtime::MoeWeights& m = *w.moe;
  const runtime::MoeWeights& f = *full_.moe;
  m.router.resize(static_cast<int64_t>(kept.size()), f.router.cols());
  m.experts.clear();
  for (size_t i = 0; i < kept.size(); ++i) {
    m.router.row(static_cast<int64_t>(i)) = f.router.row(kept[i]);
    m.experts.push_back(f.experts.at(static_cast<size_t>(kept[i])));
  }
  if (f.router_bias) {
    runtime::RowVector b(static_cast<int64_t>(kept.size()));
    for (size_t i = 0; i < kept.size(); ++i) b(static_cast<int64_t>(i)) = (*f.router_bias)(kept[i]);
    m.router_bias = b;
  }
  return w;
}

MatrixRM EndToEndScorer::run(const runtime::LayerWeights& first, const MatrixRM& x, int64_t w0, int64_t w1) {
  // Batches of windows keep the [rows, V] logits small.
  constexpr int64_t kBatch = 8;
  const int64_t V = fwd_.spec().vocab;
  MatrixRM out((w1 - w0) * T_, V);
  for (int64_t b = w0; b < w1; b += kBatch) {
    const int64_t n = std::min(kBatch, w1 - b);
    MatrixRM X = x.middleRows(b * T_, n * T_);
    fwd_.apply_layer(first, X, T_);
    for (const auto& w : later_) fwd_.apply_layer(w, X, T_);
    layer_forwards += 1 + later_.size();
    window_layer_forwards += static_cast<uint64_t>(n) * (1 + later_.size());
    out.middleRows((b - w0) * T_, n * T_) = log_softmax_rows(fwd_.logits(X));
  }
  return out;
}

double EndToEndScorer::kl(const std::vector<int>& kept, const MatrixRM& x, const MatrixRM& ref_logp, int64_t w0, int64_t w1) {
  ++candidates;
  const MatrixRM lp = run(subset(kept), x, w0, w1);
  const double k = mean_kl_logp(ref_logp.middleRows(w0 * T_, (w1 - w0) * T_), lp);
  if (!std::isfinite(k)) throw Error::internal("search: non-finite KL at layer " + std::to_string(layer_));
  return k;
}

MatrixRM EndToEndScorer::logp_full(const MatrixRM& x, int64_t w0, int64_t w1) { return run(full_, x, w0, w1); }

}  // namespace moe::passes
