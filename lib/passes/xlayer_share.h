// Cross-layer expert sharing (an expert pool per pair of adjacent MoE layers; Megrez2, MoUE's
// conversion of trained MoE checkpoints): experts of neighbouring layers that compute nearly the
// same function are merged into one pooled expert stored once; both layers' expert slots refer to
// it (quant/pooled.h, docs/FORMAT.md "pooled") and each layer keeps its own router, rows unchanged.
// Stored parameters fall; the forward computes the same number of expert FLOPs as before.
//
// Method (docs/xlayer.md):
//   - the MoE layers are paired in order: (m0, m1), (m2, m3), ... (an odd last MoE layer is not
//     pooled);
//   - in each pair (l, l'), candidate pairs (e, e') are a maximum-weight matching (Hungarian) of the
//     cosine similarity of the experts' mean outputs on calibration tokens (stats out_mean [E, H]);
//   - the budget `share` in [0, 0.5] is the share of expert parameters pooled away: P =
//     round(share · Σ_l E_l) pools, each saving one expert; the P candidates of highest cosine over
//     all pairs of layers are pooled (ties: lower layer, lower e);
//   - each pooled pair: the neurons of e' are aligned to e's (passes/expert_merge.h align_neurons),
//     then W = (c_e W_e + c_e' W_e'π) / (c_e + c_e'), c = routed-token counts (equal weights when
//     both are 0; an aligned e' equal to e bit for bit gives e itself), stored in e's dtype.
// Refusals (Error::invalid, one line): share outside [0, 0.5] or more pools than the pairs of
// layers allow, fewer than two MoE layers, MoE layers of different expert widths, a family with a
// fused expert layout, encoded, novice or biased experts, stats without out_mean for a paired layer.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "calib/stats.h"
#include "model/model.h"

namespace moe::passes {

// What a share of `m` pools: its MoE layers in order, P = round(share · experts) pools, the
// parameters of one expert. Every refusal above but the statistics' (Error::invalid; `key` names
// the share: "--share" or "passes[0].share").
struct SharePlan {
  std::vector<int> moe_layers;
  int64_t experts_total = 0, pools = 0, params_per_expert = 0;
};
SharePlan check_share(const model::Model& m, double share, const std::string& key = "--share");

// Pools experts of `m` in place as described above. Returns the report: {"share", "pools": [{"layers":
// [l, l'], "experts": [e, e'], "cosine", "weights": [w_e, w_e']}], "expert_params_logical",
// "expert_params_stored"} (parameters of the experts, a pooled expert counted once when stored).
// Recipes: the pass {"pass": "share", "method": "pairs", "share": R} (passes/passes.h make_share),
// which the runner applies before the layer loop (pipeline::Pass::model_scope).
nlohmann::json share_experts_across_layers(model::Model& m, const calib::Stats& stats, double share,
                                           const std::string& key = "--share");

}  // namespace moe::passes
