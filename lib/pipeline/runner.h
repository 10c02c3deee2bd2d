// Runs a recipe: read the checkpoint, check budgets, load or compute routing statistics, walk the
// layers in order (keeping the calibration hidden states when a pass needs MoE block inputs,
// pushing them through the compressed layer when calibration.propagate is set), run the passes
// on each MoE layer, write each layer as soon as it is done, then the report; evaluate when the
// recipe asks. Memory: one layer plus the calibration hidden states.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "pipeline/recipe.h"

namespace moe::pipeline {

struct RunOptions {
  bool dry_run = false;
  bool quiet = false;
  std::string command;  // the command line or "run recipe.json", for the report
};

// Returns the summary (also the report's core). With dry_run, nothing is computed or written:
// the summary holds the plan (per-layer experts before/after, parameters and bytes before/after,
// what will be computed).
nlohmann::json run_recipe(Recipe& recipe, const RunOptions& opts);

// The recipe's quality gates (eval.max_ppl_ratio, max_kl, min_top1) checked against the eval
// results (perplexity_before/after, kl_mean, top1_agreement): {"passed": bool, "bounds": {...},
// "failed": ["eval.max_kl 0.1: mean KL 0.24 nats/token", ...]}.
nlohmann::json check_quality_gates(const EvalSpec& spec, const nlohmann::json& eval_json);

// Human-readable rendering of run_recipe's summary.
std::string render_run_summary(const nlohmann::json& s);

}  // namespace moe::pipeline
