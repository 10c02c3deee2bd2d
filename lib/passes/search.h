// prune --method search (the project's own method, not from a paper): each MoE layer's kept
// experts chosen by the end-to-end loss, the mean KL(original || candidate) of the next-token
// distribution on calibration windows. A greedy local search, not exact: layers in order (the
// runner propagates the calibration windows through the layers already pruned); at each layer
// the start is the best, by that KL, of the keep-sets of frequency, soft, REAP and NAEE's
// enumerate (when its subsets fit max_subsets); then first-improvement swaps (a kept expert for a
// dropped one) are accepted while they lower the KL on the search windows, until no swap does or
// the layer's share of the time budget is spent. Every accepted set lowers the search KL, so the
// result is never worse than its start on the search windows; among the start and the accepted
// sets, the one with the least KL on the held-out windows is kept (the stopping rule).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "model/model.h"
#include "runtime/forward.h"
#include "runtime/weights.h"

namespace moe::passes {

using runtime::MatrixRM;

// Log-probabilities [N, V] of logits, row by row.
MatrixRM log_softmax_rows(const MatrixRM& logits);
// Mean over rows of KL(ref || cand) in nats, from log-probabilities.
double mean_kl_logp(const MatrixRM& ref_logp, const MatrixRM& cand_logp);

// Scores keep-sets of one MoE layer by the KL of the final output. Holds layer l's weights (all
// experts) and layers l+1.. (converted once); a candidate runs layer l with its experts (router
// rows selected), then the later layers, the final norm and lm_head.
class EndToEndScorer {
 public:
  // x: residual stream at layer l's input, windows of T tokens, window-major. ref_logp: the
  // original model's log-probabilities on the same rows.
  EndToEndScorer(const runtime::Forward& fwd, const model::Model& model, int layer, int64_t T);
  // KL on rows [w0*T, w1*T) of x against the same rows of ref_logp.
  double kl(const std::vector<int>& kept, const MatrixRM& x, const MatrixRM& ref_logp, int64_t w0, int64_t w1);
  // Log-probs of the layers as they are (all experts at layer l) on the windows of x.
  MatrixRM logp_full(const MatrixRM& x, int64_t w0, int64_t w1);
  uint64_t candidates = 0;      // keep-sets evaluated
  uint64_t layer_forwards = 0;  // decoder-layer applications, each on one batch of windows
  uint64_t window_layer_forwards = 0;   // decoder-layer applications counted per window

 private:
  runtime::LayerWeights subset(const std::vector<int>& kept) const;
  MatrixRM run(const runtime::LayerWeights& first, const MatrixRM& x, int64_t w0, int64_t w1);
  const runtime::Forward& fwd_;
  int layer_;
  int64_t T_;
  runtime::LayerWeights full_;
  std::vector<runtime::LayerWeights> later_;
};

}  // namespace moe::passes
