// Task subsets (docs/tasks.md): a checkpoint written by `prune --tasks` holds, per MoE layer, every
// expert any task keeps, and its moe_tool_report.json has a "tasks" section with each task's
// keep-map. This reads that section and turns one task's keep-map into the forward's routing mask
// (runtime::Forward::set_active_experts) or the expert list convert --task keeps.
//
// The section (docs/FORMAT.md "Task subsets"):
//   "tasks": {"names": [NAME, ...],
//             "layers": [{"layer": L, "experts": [source expert id of each written expert],
//                         "union": U, "padding": [source ids written for equal counts only],
//                         "keep": {NAME: [written expert indices, ascending]},
//                         "keep_source": {NAME: [source expert ids, ascending]}}, ...], ...}
#pragma once

#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/model.h"

namespace moe::eval {

struct TaskSubsets {
  std::vector<std::string> names;  // in the order the run was given them
  struct Layer {
    int layer = 0;
    int64_t experts = 0;  // experts written in this layer
    std::map<std::string, std::vector<int>> keep;  // task -> written expert indices, ascending
  };
  std::vector<Layer> layers;  // MoE layers, ascending
  int64_t experts_per_layer = -1;  // the section's "experts_per_layer" (every layer's count); -1 absent
  std::string source;         // "<report path>: tasks" (for messages)

  // The keep-map of `task` per MoE layer; Error::invalid "unknown task 'x' (tasks: a, b)" naming
  // `where` (the flag) for a name the checkpoint does not have.
  std::map<int, std::vector<int>> keep_of(const std::string& task, const std::string& where) const;
  // "a, b"
  std::string joined_names() const;
};

// The "tasks" section of `model_dir`/moe_tool_report.json; nullopt when the file or the section is
// absent. Error::corruption naming the file and the JSON path for a malformed section.
std::optional<TaskSubsets> task_subsets_from_report(const std::filesystem::path& model_dir);
// The same for a command given a task (`where`: "--task code"): Error::invalid naming `model_dir`
// when the checkpoint has no task subsets.
TaskSubsets require_task_subsets(const std::filesystem::path& model_dir, const std::string& where);
// The same from a parsed section; `where` prefixes errors.
TaskSubsets parse_task_subsets(const nlohmann::json& section, const std::string& where);

// `task`'s keep-map checked against `m` (the checkpoint the section describes): per MoE layer
// index, the written expert indices the task keeps. Error::invalid for an unknown task (naming the
// known ones, as `where` spells the option) and for layers whose expert counts disagree with the
// section (the checkpoint was changed after prune --tasks): a layer's "experts" list, the section's
// experts_per_layer, or a section layer that is not an MoE layer of `m`.
std::map<int, std::vector<int>> task_keep(const TaskSubsets& t, const model::Model& m, const std::string& task,
                                          const std::string& where);

// `task`'s routing mask for `m` (the checkpoint the section describes): per layer (index), E flags
// (true: routable), empty for dense layers. Error::invalid as task_keep, and for group-limited routing with n_group > 1 (DeepSeek): masking within groups is not what a
// checkpoint holding only the task's experts computes (written with n_group 1): use convert --task.
std::vector<std::vector<bool>> task_mask(const TaskSubsets& t, const model::Model& m, const std::string& task,
                                         const std::string& where);

}  // namespace moe::eval
