// NAEE expert pruning by enumeration (Lu et al. 2024, "Not All Experts are Equal"): for every set
// S of experts to drop, recompute the MoE block with S's logits at −∞ (the family's own routing:
// softmax/sigmoid, top-k, renormalisation) and measure ‖Z − Z_S‖_F against the original block
// output Z over the calibration tokens; keep the set with the least loss.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/routing.h"
#include "runtime/weights.h"

namespace moe::passes {

struct EnumerateResult {
  std::vector<int> dropped;       // the best set, ascending
  double loss = 0;                // its ‖Z − Z_S‖_F over all tokens
  uint64_t subsets = 0;           // sets evaluated
  std::vector<double> min_loss_dropping;  // per expert: least loss of a set that drops it (inf: never dropped)
};

// Drops E − keep experts of the block `w` given its inputs x [N,H]. Protected experts (mask
// entries true, optional) are never in a dropped set. Refuses with Error::invalid when the number
// of sets C(E − protected, E − keep) exceeds max_subsets, naming a cheaper method.
//
// Cost: every expert runs once on every token (chunks of at least 16 tokens whose E expert outputs
// hold at most `chunk_floats` floats, so memory stays bounded; 2^24 floats = 64 MB); each
// set then only re-routes the logits and recombines the stored expert outputs. Tokens whose
// routing (ids and weights) a set does not change contribute the same as under full routing.
// The loss is the Frobenius norm over all calibration tokens at once (one batch), accumulated
// in double; ties keep the first set in lexicographic order.
EnumerateResult naee_enumerate(const runtime::MoeWeights& w, const runtime::RoutingRule& rule, const runtime::MatrixRM& x,
                               int keep, uint64_t max_subsets, const std::vector<bool>* protect = nullptr,
                               int64_t chunk_floats = int64_t{1} << 24);

}  // namespace moe::passes
