// Expert pruning (METHODS.md §3): score the experts of each MoE layer, keep the best, delete the
// others' tensors, router rows and router_bias entries (kept experts stay in their order).
//
// Options (besides "pass", "method", "seed"):
//   "keep": N                 experts kept in every layer (top_k <= N <= E)
//   "keep_ratio": R           a share of all experts of all MoE layers. "uniform": true (the
//                             default; stock loaders such as transformers, vLLM and llama.cpp need
//                             the same expert count in every layer): every layer keeps the same
//                             count n, the one whose total is nearest R · Σ E_l (ties: the larger;
//                             at least top_k and every protected expert), so R = 0.75 of 8 keeps 6
//                             and 0.3 of 8 keeps 2 (25%); the achieved share is reported
//                             ("keep_ratio_achieved"). "uniform": false ranks the experts of all
//                             layers together by the method's scores normalised per layer (divided
//                             by the layer's sum; equal when the sum is 0) and keeps the top
//                             round(R · Σ E_l), with at least top_k (and every protected expert)
//                             per layer: ragged counts (only the native format can hold them).
//                             random has no cross-layer information: round(R · E_l) per layer.
//                             enumerate cannot plan globally (its scores need the block inputs).
//   "protect_super_experts": bool  never drop an expert flagged super (stats, METHODS.md §2)
//   "max_subsets": N          enumerate only: refuse above N subsets (default 5000)
// Methods: frequency (count), soft (weight_sum), reap (reap), random (std::mt19937_64 seeded with
// the layer's seed), enumerate (NAEE, passes/naee.h).
// Report per layer: {"kept": [original ids], "dropped": [...], "scores": [per original expert],
// "score": what the scores are}; enumerate adds "loss" and "subsets".
#pragma once

#include <cstdint>
#include <map>
#include <vector>

namespace moe::passes {

// The `keep` experts to keep, ascending: protected ones first, then by descending score (ties:
// lower id). Error::invalid when more than `keep` are protected.
std::vector<int> select_top(const std::vector<double>& score, int64_t keep, const std::vector<bool>* protect,
                            int layer);

struct LayerScores {
  int layer = 0;
  int64_t experts = 0;
  std::vector<double> score;  // [E] (empty: no information, keep the ratio within the layer)
  std::vector<bool> protect;  // [E] or empty
};

// Experts kept per layer under a global keep ratio (see the "keep_ratio" option above).
std::map<int, int64_t> plan_keep_ratio(const std::vector<LayerScores>& layers, double ratio, int64_t top_k,
                                       bool uniform);

}  // namespace moe::passes
