// Runs an upcycle recipe (passes/upcycle.h) — the pipeline written as JSON for `upcycle`:
// {
//   "model": "path/to/dense", "seed": 0,
//   "upcycle": {"to": "mixtral", "experts": 8, "top_k": 2, "method": "copy", ...},
//   "output": {"path": "out", "dtype": "bf16", "max_shard_size": "5GB", "force": false}
// }
// Upcycling changes the family and every layer's structure, so it is not a pass of the per-layer
// runner (pipeline/runner.h): a recipe has either "passes" or "upcycle". `moe-tool run` and
// `moe-tool upcycle` both come here. The output folder follows io/output_dir.h (temporary
// sibling, renamed on success, never an input); moe_tool_report.json says what was done and
// that the model needs continued training.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moe::pipeline {

bool is_upcycle_recipe(const nlohmann::json& recipe);

struct UpcycleRunOptions {
  bool dry_run = false;
  bool quiet = false;
  std::string command;
  std::vector<std::filesystem::path> reads;  // more files the run reads (the recipe files of `run`)
};

// Validates everything before any output exists (Error::invalid naming the JSON path, or the
// flag when the recipe was built from flags: pipeline::with_flag_names), then upcycles and
// commits. Returns the summary (the report's core; with dry_run the plan only).
nlohmann::json run_upcycle_recipe(const nlohmann::json& recipe, const std::filesystem::path& base,
                                  const std::string& source, const UpcycleRunOptions& opts);

// Checks the "upcycle" section's keys only (unknown keys with the allowed list): what
// parse_recipe() runs on a recipe that mixes "upcycle" and "passes".
void check_upcycle_section_keys(const nlohmann::json& section);

}  // namespace moe::pipeline
