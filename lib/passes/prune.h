// Expert pruning (docs/methods.md): score the experts of each MoE layer, keep the best, delete the
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
//   "protect_super_experts": bool  never drop an expert flagged super (stats, docs/methods.md)
//   "novices": bool           MoNE (passes/novices.h): the dropped experts become novices (constant
//                             mean outputs over their routed calibration tokens) instead of being
//                             deleted; the router keeps every row and the report gives "experts"
//                             (the MLP experts kept) and "novices" instead of "kept"/"dropped",
//                             with "novice_routed_tokens" and "novices_from_all_tokens". Native
//                             format only; must be the last pass.
//   "max_subsets": N          enumerate: refuse above N subsets (default 5000); search: skip the
//                             enumerate start above it
//   search only (passes/search.h; "keep" only):
//   "time_budget": S          seconds for the whole pass (default 300), shared among the MoE layers
//                             left (a layer gets what is left / layers left); swaps stop when the
//                             layer's share is spent. The starts and the held-out scoring always run.
//   "search_windows": N       the first N calibration windows score keep-sets (default 16)
//   "heldout_windows": N      the next N pick among the start and the accepted swaps (default 8)
//                             Memory: the original log-probs, (N_search + N_heldout) · ctx · vocab floats.
// Methods: frequency (count), soft (weight_sum), reap (reap), random (std::mt19937_64 seeded with
// the layer's seed), enumerate (NAEE, passes/naee.h), search (the project's own method, a greedy
// local search by the final output's KL against the model before the pass, not exact:
// passes/search.h).
// Report per layer: {"kept": [original ids], "dropped": [...], "scores": [per original expert],
// "score": what the scores are}; enumerate adds "loss" and "subsets"; search adds "starts" (each
// start's keep-set and search KL), "start", "start_kl_search", "start_kl_heldout", "swaps"
// ([{out, in, kl_search}] accepted), "swaps_kept" (how many of them the held-out choice kept),
// "kl_search", "kl_heldout", "stopped", "budget_seconds", "candidates" (keep-sets scored),
// "layer_forwards" (decoder-layer applications, each on a batch of up to 8 windows),
// "window_layer_forwards" (the same per window) and "seconds".
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
