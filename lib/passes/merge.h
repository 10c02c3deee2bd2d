// Expert merging (METHODS.md §4): group the experts of each MoE layer into N groups, merge each
// group into one expert and one router row. The shared expert is untouched.
//
// Options (besides "pass", "method", "seed"):
//   "experts": N          experts per layer after merging (top_k <= N <= E), required
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
//                         weight_sum. Saliency measured better in 10 of 12 fixture cells (README).
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
