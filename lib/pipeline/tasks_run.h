// Task subsets in a run (calibration.tasks; docs/tasks.md): the checks before any work, each
// task's statistics, the report's "tasks" section and the per-task evaluation of the output.
// The prune pass plans the keep-maps (passes::Pass::plan_tasks); the runner calls these.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "calib/stats.h"
#include "eval/eval.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "pipeline/recipe.h"

namespace moe::pipeline {

// Before any work (parse_recipe has checked the passes: one that takes tasks): no
// calibration.text or calibration.stats beside the tasks, every task's stats file this model's (fingerprint and
// sampled values) with `fields`, every task text readable with at least one window. Adds the
// task files to r.reads (the output may not be, be inside or contain them). Error::invalid
// naming calibration.tasks (--tasks) and the task.
void check_tasks(Recipe& r, const io::Checkpoint& ckpt, const model::Model& model, const std::vector<std::string>& fields);

// The statistics of every task, in the recipe's order: stats files loaded, texts calibrated with
// the rest of the calibration section.
std::vector<calib::Stats> task_statistics(const Recipe& r, const io::Checkpoint& ckpt, const model::Model& model,
                                          bool quiet);

// The pass's plan (Pass::plan_tasks) with where each task's statistics came from.
nlohmann::json task_section(const Recipe& r, const std::vector<calib::Stats>& stats, nlohmann::json plan);

// The written model evaluated once per task, routing over that task's experts only
// (eval/task_subsets.h): {NAME: {"perplexity_after", and against the input "perplexity_before",
// "kl_mean", "top1_agreement"}}.
nlohmann::json evaluate_tasks(const nlohmann::json& section, const model::Model& original, const model::Model& written,
                              const eval::Windows& windows, const eval::EvalOptions& eo, bool against_input,
                              const eval::ExpertOrigin* origin);

// The input's task subsets (the "tasks" section of its moe_tool_report.json: indices into its
// experts), for the output's report when they still hold: every layer report's origin
// (compose_origin) keeps each expert in place, as quantize and factorize do. Null when the input
// has none; null, with `note` saying the subsets were dropped, when a pass moved experts.
nlohmann::json inherited_task_subsets(const io::Checkpoint& ckpt, const nlohmann::json& layer_reports, std::string& note);

}  // namespace moe::pipeline
