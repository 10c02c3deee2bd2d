#include "passes/naee.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "passes/combinations.h"
#include "runtime/moe_block.h"

namespace moe::passes {

using core::Error;
using runtime::MatrixRM;

EnumerateResult naee_enumerate(const runtime::MoeWeights& w, const runtime::RoutingRule& rule, const MatrixRM& x,
                               int keep, uint64_t max_subsets, const std::vector<bool>* protect, int64_t chunk_floats) {
  const int E = static_cast<int>(w.num_experts());
  const int64_t N = x.rows(), H = x.cols();
  if (keep < rule.top_k || keep > E)
    throw Error::invalid("enumerate: keep " + std::to_string(keep) + " not in [num_experts_per_tok " +
                         std::to_string(rule.top_k) + ", " + std::to_string(E) + " experts]");
  const int r = E - keep;

  // Candidates for dropping: every expert that is not protected.
  std::vector<int> cand;
  for (int e = 0; e < E; ++e)
    if (!protect || !(*protect)[e]) cand.push_back(e);
  if (static_cast<int>(cand.size()) < r)
    throw Error::invalid("enumerate: " + std::to_string(E - static_cast<int>(cand.size())) +
                         " protected (super) experts leave fewer than " + std::to_string(r) + " to drop");
  const uint64_t n_sets = n_choose_k(static_cast<int64_t>(cand.size()), r);
  if (n_sets > max_subsets)
    throw Error::invalid("enumerate: dropping " + std::to_string(r) + " of " + std::to_string(cand.size()) +
                         " experts means " + (n_sets == std::numeric_limits<uint64_t>::max() ? std::string("more than 2^64")
                                                                                              : std::to_string(n_sets)) +
                         " subsets, above max_subsets " + std::to_string(max_subsets) +
                         "; use method \"reap\" (or \"frequency\"), or raise max_subsets");

  // The active mask of every set, in lexicographic order of the dropped ids.
  std::vector<std::vector<bool>> masks;
  std::vector<std::vector<int>> sets;
  for (std::vector<int> c = first_combination(r);;) {
    std::vector<int> dropped(r);
    std::vector<bool> active(E, true);
    for (int i = 0; i < r; ++i) active[dropped[i] = cand[c[i]]] = false;
    masks.push_back(std::move(active));
    sets.push_back(std::move(dropped));
    if (!next_combination(c, static_cast<int>(cand.size()))) break;
  }

  std::vector<double> sq(sets.size(), 0.0);
  const runtime::RowVector* bias = runtime::choice_bias(w, rule);
  // Chunks of tokens: E expert outputs of a chunk stay under chunk_floats floats.
  const int64_t chunk = std::clamp<int64_t>(chunk_floats / std::max<int64_t>(1, E * H), 16, std::max<int64_t>(N, 16));
  std::vector<MatrixRM> Y(E);
  for (int64_t t0 = 0; t0 < N; t0 += chunk) {
    const int64_t n = std::min(chunk, N - t0);
    const MatrixRM xc = x.middleRows(t0, n);
    runtime::MoeDetail det;
    const MatrixRM Z = runtime::moe_forward(w, rule, xc, &det, /*keep_intermediates=*/true);
    for (int e = 0; e < E; ++e) Y[e] = runtime::mlp_forward(w.experts[e], xc);
    // The part every set shares: the (gated) shared expert.
    MatrixRM base = MatrixRM::Zero(n, H);
    if (det.shared_out.size()) base = det.shared_gate.col(0).asDiagonal() * det.shared_out;
    auto recombine = [&](const runtime::RoutingResult& rr, int64_t i) {
      runtime::RowVector z = base.row(i);
      for (int64_t j = 0; j < rr.ids.cols(); ++j) z += rr.weights(i, j) * Y[rr.ids(i, j)].row(i);
      return z;
    };
    // Error of the full routing recombined (float rounding only): what an unchanged token adds.
    std::vector<double> same(n);
    for (int64_t i = 0; i < n; ++i) same[i] = (Z.row(i) - recombine(det.routing, i)).cast<double>().squaredNorm();
    for (size_t s = 0; s < sets.size(); ++s) {
      const runtime::RoutingResult rr = runtime::route(rule, det.logits, bias, &masks[s]);
      double acc = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (rr.ids.row(i) == det.routing.ids.row(i) && rr.weights.row(i) == det.routing.weights.row(i)) {
          acc += same[i];
          continue;
        }
        acc += (Z.row(i) - recombine(rr, i)).cast<double>().squaredNorm();
      }
      sq[s] += acc;
    }
  }

  // A NaN loss compares false with everything and would silently pick the first subset.
  for (size_t s = 0; s < sets.size(); ++s)
    if (!std::isfinite(sq[s]))
      throw Error::internal("enumerate: non-finite block-output loss for subset " + std::to_string(s) +
                            " (non-finite weights or block inputs)");
  EnumerateResult res;
  res.subsets = sets.size();
  res.min_loss_dropping.assign(E, std::numeric_limits<double>::infinity());
  size_t best = 0;
  for (size_t s = 0; s < sets.size(); ++s) {
    const double loss = std::sqrt(sq[s]);
    if (loss < std::sqrt(sq[best])) best = s;
    for (int e : sets[s]) res.min_loss_dropping[e] = std::min(res.min_loss_dropping[e], loss);
  }
  res.dropped = sets[best];
  res.loss = std::sqrt(sq[best]);
  return res;
}

}  // namespace moe::passes
