// Expert pruning (METHODS.md §3): score the experts of each MoE layer, keep the best, delete the
// others' tensors, router rows and router_bias entries (kept experts stay in their order).
//
// Options (besides "pass", "method", "seed"):
//   "keep": N                 experts kept in every layer (top_k <= N <= E)
//   "keep_ratio": R           global budget: the method's scores are normalised per layer (divided
//                             by the layer's sum; equal when the sum is 0), all experts of all
//                             layers are ranked together and the top round(R · Σ E_l) are kept,
//                             with at least top_k (and every protected expert) per layer. Then,
//                             because stock loaders (transformers, vLLM, llama.cpp) need the same
//                             expert count in every layer, every layer keeps the largest per-layer
//                             count ("uniform": true, the default); "uniform": false keeps the
//                             ragged counts (only the native format can hold them). random has no
//                             cross-layer information: it keeps round(R · E_l) per layer.
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
