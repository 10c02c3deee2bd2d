// Calibration input for pipelines: the text tokenized once with the model's tokenizer, cut into
// non-overlapping windows of ctx tokens (the first `windows` of them; all when 0).
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "calib/stats.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "pipeline/recipe.h"

namespace moe::pipeline {

struct CalibrationTokens {
  std::vector<int32_t> tokens;  // windows * ctx ids, window-major
  int64_t ctx = 0;
  int64_t windows = 0;
};

CalibrationTokens calibration_tokens(const std::filesystem::path& model_dir, const CalibrationSpec& spec);

// Routing statistics of `model` on the calibration text (what `moe-tool calibrate` computes),
// for recipes that give calibration.text but no stats file. With `out`, also written there as a
// stats file (atomically, replacing what is there; the model and the text may not be `out`).
calib::Stats collect_stats(const io::Checkpoint& ckpt, const model::Model& model, const CalibrationSpec& spec,
                          uint64_t seed, bool quiet, const std::filesystem::path& out = {});

}  // namespace moe::pipeline
