// DeepSeek-V3 multi-token-prediction (MTP) layers under the passes. An MTP layer
// (num_nextn_predict_layers of them, after the decoder layers) carries a full MoE block whose
// expert count must equal the decoder layers' (n_routed_experts is one key for both). The forward
// runs the decoder layers only (as transformers' DeepseekV3Model does), so no statistics of the
// MTP block are collected; the rule is: prune keeps in every MTP layer the experts the last MoE
// decoder layer keeps (same original ids, same order: router rows, bias entries and expert
// tensors, renumbered 0..E'-1); passes that keep every expert count (quantize, factorize, ...)
// leave the MTP layer as it is; passes that change the counts otherwise (merge) are refused before
// any work.
#pragma once

#include <nlohmann/json.hpp>
#include <vector>

#include "model/model.h"
#include "pipeline/recipe.h"

namespace moe::pipeline {

// Error::unsupported (naming the MTP layer and the pass) when the model has MTP layers with an MoE
// block and the recipe has a pass other than prune that changes (or decides at run time) the
// decoder layers' expert counts.
void check_mtp_passes(const model::Model& m, const Recipe& r);

// The multi-token-prediction heads stored outside model.layers. (qwen3_next's `mtp.*`, ERNIE-4.5's
// `model.mtp_*`: passed through as extras, unused by the forward as transformers ignores them)
// hold an MoE block with the decoder layers' expert count. A recipe whose passes keep every count leaves it as it is; one that
// changes a count drops the head from the output (its experts would no longer match num_experts),
// with a warning naming it. Returns the number of tensors dropped.
size_t drop_stale_mtp_head(model::Model& m, const Recipe& r);

// Keeps experts `kept` (original ids, in order) in every MTP layer's MoE block of m: router rows,
// e_score_correction_bias entries, expert tensors (weights and any _scale_inv) renamed to their
// new index; every other MTP tensor unchanged.
void select_mtp_experts(model::Model& m, const std::vector<int>& kept);

// The kept ids of a layer from its composed origin ([[ [src, 1.0] ], ...]); Error::internal when
// an expert has several sources (a merge).
std::vector<int> kept_from_origin(const nlohmann::json& origin);

}  // namespace moe::pipeline
