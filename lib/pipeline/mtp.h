// Multi-token-prediction (MTP) layers under the passes.
// DeepSeek-V3 / Kimi-K2 / GLM-4.5 (num_nextn_predict_layers 1, model.layers.{L}.): the runner
// adopts the MTP layer's decoder block as layer L (runtime/mtp.h adopt_mtp_layer), so every pass
// runs on its MoE block as on any MoE layer, from its own statistics and its own calibration inputs
// (runtime::MtpForward: the decoder's last hidden states and the shifted embeddings of the same
// windows), streamed after the last decoder layer and written back under the same names. Its expert
// count must equal the decoder layers' in the output (n_routed_experts is one key for both):
// check_mtp_passes refuses, before any work, a run that would leave them different.
// The heads stored outside model.layers. (qwen3_next's mtp.*, ERNIE-4.5's model.mtp_*), whose
// forward is not run: drop_stale_mtp_head.
#pragma once

#include <nlohmann/json.hpp>
#include <vector>

#include "calib/stats.h"
#include "model/model.h"
#include "pipeline/recipe.h"

namespace moe::pipeline {

// With an adopted MTP layer L (runtime::adopted_mtp_layer): Error::unsupported (one line naming
// the pass and the layer) when a pass decides expert counts while it runs (counts_at_run), when
// `counts` (experts per layer after the passes, as planned) differ between an MoE layer and L, for
// prune search (it scores by the main model's final output, which the MTP logits do not enter) and
// quantize delta-ternary (its dense parent has no MLP for the MTP layer); Error::invalid when the
// calibration windows are shorter than 2 tokens (the MTP input pairs each position with the next token).
void check_mtp_passes(const model::Model& m, const Recipe& r, const std::vector<int64_t>& counts);

// Error::invalid when `stats` (read from `path`) lack the adopted MTP layer: a file made before
// calibrate collected the MTP layer's statistics (no fallback to another rule).
void check_mtp_stats(const model::Model& m, const calib::Stats& stats, const std::string& path);

// The multi-token-prediction heads stored outside model.layers. (qwen3_next's `mtp.*`, ERNIE-4.5's
// `model.mtp_*`: passed through as extras, unused by the forward as transformers ignores them)
// hold an MoE block with the decoder layers' expert count. A recipe whose passes keep every count leaves it as it is; one that
// changes a count drops the head from the output (its experts would no longer match num_experts),
// with a warning naming it. Returns the number of tensors dropped.
size_t drop_stale_mtp_head(model::Model& m, const Recipe& r);

}  // namespace moe::pipeline
