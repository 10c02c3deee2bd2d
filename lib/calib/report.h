// `moe-tool stats show`: a per-layer summary of a stats file: expert usage (count share, weight
// share, REAP, out_absmax, super flag), the most similar expert pairs (logit_sim, out_cos) and
// the load imbalance (max/mean count), as JSON or as a text table.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "calib/stats.h"

namespace moe::calib {

// `layer`: only that layer (Error::invalid naming the MoE layers when absent). `top_pairs`: how
// many most-similar pairs to list per matrix.
nlohmann::ordered_json stats_summary(const Stats& s, std::optional<int> layer, int top_pairs = 5);
std::string render_stats_summary(const nlohmann::ordered_json& summary);

}  // namespace moe::calib
