// Expert merging (docs/methods.md): group the experts of each MoE layer into N groups, merge each
// group into one expert and one router row. The shared expert is untouched.
//
// Options (besides "pass", "method", "seed"):
//   "experts": N          experts per layer after merging (top_k <= N <= E), required
//   dern only: "threshold" in [-1, 1], default 0.4 (below it a segment is discarded); the router,
//              router_bias, align and protect_super_experts options do not apply.
//   "router": "mean"      router rows of the merged experts: "dominant" | "mean" | "refit"
//                         (passes/router_merge.h); default mean (lowest mean KL in bench_quality)
//   "router_bias": "max"  deepseek_v3 e_score_correction_bias of a merged expert: the max of its
//                         members' biases (default: the merged expert stays as attractive to the
//                         choice as its most favoured member) or their importance-weighted "mean"
//   submoe only: "rank_ratio" (0, 1], default 1 (no truncation); "whiten" bool, default false
//                (SVD-LLM whitening with gram_in for gate/up and gram_mid for down; needs
//                calibrate --gram); "damp" (whitening damping relative to mean(diag), default 0.01)
//   "importance": "saliency"  the per-expert score that picks dominant experts and weights the
//                         merge: "saliency" = count * reap = Σ over routed tokens of gate · ‖expert
//                         output‖ (default), "frequency" = count (the papers' rule), "soft" =
//                         weight_sum. Saliency measured better in 10 of 12 fixture cells (docs/benchmarks.md).
//   "align": true         hcsmoe/submoe: align members' neurons to the dominant one (msmoe always does)
//   "protect_super_experts": false  every flagged super expert stays a group of its own
// Methods (f = the importance above):
//   msmoe:  dominant experts = top-N by f (ties: lower id); every other expert joins the
//           dominant expert with the highest logit_sim (ties: lower id); members' neurons aligned
//           to the dominant one (Hungarian), then W = Σ f_e W_e / Σ f_e.
//   hcsmoe: average-linkage agglomerative clustering of the out_mean rows (Euclidean) into N
//           groups, f-weighted average (aligned to the group's most important member by default).
//   submoe: k-means (k-means++ from the layer's seed) of the out_cos rows into N groups; per group
//           and matrix type the joint SVD merge (passes/expert_merge.h) with weights f.
//   dern:   DERN (Zhou et al., "Dropping Experts, Recombining Neurons: Retraining-Free Pruning for
//           Sparse Mixture-of-Experts LLMs", Findings of EMNLP 2025, arXiv 2509.10377): keep the top-N
//           experts by f (ties: lower id), split each dropped expert into neuron segments (one
//           neuron = its gate row, up row and down column), give each segment to the retained
//           expert holding its most similar neuron (cosine of the [gate | up] rows) unless that
//           cosine is below "threshold" (default 0.4, in the range the paper's threshold study
//           favours; the segment is then dropped), and merge it there. The paper merges a retained
//           expert's original and incoming segments into a compact expert; stock formats have one
//           expert width per model, so here the width stays uniform: each incoming segment is
//           averaged into its most similar neuron, weights f of the experts the segments come
//           from (passes/expert_merge.h dern_recombine). Only the paper's outline (prune by router
//           statistics, segments, assignment by similarity, merge) was available to this
//           implementation; the segment similarity and in-expert merge above are this one's rule.
//           Retained experts keep their own router rows and biases; no router options. Report
//           per layer ("kept" is the keep-map, as prune's: each written expert's origin is its
//           retained expert): {"kept", "dropped", "segments": [{"expert": d, "to": {"retained id":
//           segments}, "discarded": n}], "neurons_merged": [per kept expert], "segments_discarded"}.
// Weights: f normalised within the group, equal when every member's f is 0. The router's "mean"
// rows and router_bias "mean" use the same weights.
// Merged experts are ordered by group: msmoe by dominant id, the others by smallest member id.
// Report per layer: {"groups": [[members]], "weights": [[f_e / Σ f]], "dominant": [id per group],
// "router": mode} (+ "router_bias": mode when the layer has one).
#pragma once

#include <vector>

#include "calib/stats.h"
#include "passes/clustering.h"

namespace moe::passes {

// M-SMoE grouping (dominant = top-n by importance); `dominant` receives the dominant expert of each group.
Groups msmoe_groups(const std::vector<double>& importance, const calib::MatrixF& logit_sim, int n,
                    std::vector<int>& dominant);
// The member of each group with the largest importance (ties: lower id).
std::vector<int> most_important(const Groups& groups, const std::vector<double>& importance);

}  // namespace moe::passes
