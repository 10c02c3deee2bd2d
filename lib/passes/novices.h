// MoNE novices (docs/methods.md; "MoNE: Replacing Redundant Experts with Lightweight Novices"):
// instead of deleting a pruned expert e, replace it by the constant n_e = mean of expert_e(x) over
// the calibration tokens routed to it. The router keeps all E rows and routing is unchanged; a
// token routed to a novice gets gate_weight · n_e. Stock formats cannot hold a constant expert:
// the model is written in the native format (docs/FORMAT.md, encoding "novice").
#pragma once

#include <cstdint>
#include <vector>

#include "model/model.h"
#include "runtime/routing.h"
#include "runtime/weights.h"

namespace moe::passes {

struct NoviceValue {
  int expert = 0;
  std::vector<float> value;  // n_e [H]
  // Calibration tokens routed to the expert (top-k of the family's routing rule on x). 0: none was,
  // and n_e is the mean of expert_e(x) over all N tokens instead (the only estimate left).
  int64_t routed_tokens = 0;
};

// n_e of each expert in `experts` (ids into w.experts, real MLP experts) on the block inputs x
// [N, H] (the MoE block's input, post-attention layernorm output, of the calibration tokens):
// route with `rule` (as the forward does, no expert masked), then average expert_e's output over
// its routed rows, in double. Error::invalid when x is empty or its width is not the router's.
std::vector<NoviceValue> novice_values(const runtime::MoeWeights& w, const runtime::RoutingRule& rule,
                                       const runtime::MatrixRM& x, const std::vector<int>& experts);

// Replaces the experts of `values` by novices holding n_e as F32 [H] tensors (their MLP tensors
// released); router, router_bias and the other experts unchanged.
void make_novices(model::MoeBlock& block, const std::vector<NoviceValue>& values);

}  // namespace moe::passes
