#include "eval/task_subsets.h"

#include <algorithm>
#include <set>

#include "core/error.h"
#include "io/checkpoint.h"
#include "runtime/routing.h"

namespace moe::eval {

using core::Error;
using nlohmann::json;

std::string TaskSubsets::joined_names() const {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

std::map<int, std::vector<int>> TaskSubsets::keep_of(const std::string& task, const std::string& where) const {
  if (std::find(names.begin(), names.end(), task) == names.end())
    throw Error::invalid(where + ": unknown task '" + task + "' (tasks: " + joined_names() + ")");
  std::map<int, std::vector<int>> out;
  for (const auto& l : layers) out[l.layer] = l.keep.at(task);
  return out;
}

namespace {

std::vector<int> int_list(const json& j, const std::string& path) {
  if (!j.is_array()) throw Error::corruption(path + ": expected a list of integers");
  std::vector<int> v;
  for (size_t i = 0; i < j.size(); ++i) {
    if (!j[i].is_number_integer()) throw Error::corruption(path + "[" + std::to_string(i) + "]: expected an integer");
    v.push_back(j[i].get<int>());
  }
  return v;
}

}  // namespace

TaskSubsets parse_task_subsets(const json& section, const std::string& where) {
  const std::string base = where + ": tasks";
  if (!section.is_object() || !section.contains("names") || !section.contains("layers") ||
      !section.at("names").is_array() || !section.at("layers").is_array())
    throw Error::corruption(base + ": expected an object with the lists \"names\" and \"layers\"");
  TaskSubsets t;
  t.source = base;
  std::set<std::string> seen;
  for (size_t i = 0; i < section.at("names").size(); ++i) {
    const json& n = section.at("names")[i];
    if (!n.is_string() || !seen.insert(n.get<std::string>()).second)
      throw Error::corruption(base + ".names[" + std::to_string(i) + "]: expected a task name not given before");
    t.names.push_back(n.get<std::string>());
  }
  if (t.names.empty()) throw Error::corruption(base + ".names: empty");
  if (section.contains("experts_per_layer")) {
    const json& e = section.at("experts_per_layer");
    if (!e.is_number_integer() || e.get<int64_t>() < 1)
      throw Error::corruption(base + ".experts_per_layer: expected a positive integer, found " + e.dump());
    t.experts_per_layer = e.get<int64_t>();
  }
  const json& layers = section.at("layers");
  for (size_t i = 0; i < layers.size(); ++i) {
    const std::string lp = base + ".layers[" + std::to_string(i) + "]";
    const json& lj = layers[i];
    if (!lj.is_object() || !lj.contains("layer") || !lj.at("layer").is_number_integer() || !lj.contains("experts") ||
        !lj.contains("keep") || !lj.at("keep").is_object())
      throw Error::corruption(lp + ": expected {\"layer\": L, \"experts\": [...], \"keep\": {...}}");
    TaskSubsets::Layer l;
    l.layer = lj.at("layer").get<int>();
    l.experts = static_cast<int64_t>(int_list(lj.at("experts"), lp + ".experts").size());
    for (const auto& name : t.names) {
      if (!lj.at("keep").contains(name)) throw Error::corruption(lp + ".keep: no entry for task '" + name + "'");
      std::vector<int> k = int_list(lj.at("keep").at(name), lp + ".keep." + name);
      for (size_t j = 0; j < k.size(); ++j)
        if (k[j] < 0 || k[j] >= l.experts || (j > 0 && k[j] <= k[j - 1]))
          throw Error::corruption(lp + ".keep." + name + "[" + std::to_string(j) + "]: " + std::to_string(k[j]) +
                                  " is not an ascending index into the layer's " + std::to_string(l.experts) + " experts");
      l.keep[name] = std::move(k);
    }
    t.layers.push_back(std::move(l));
  }
  return t;
}

std::optional<TaskSubsets> task_subsets_from_report(const std::filesystem::path& model_dir) {
  const std::filesystem::path p = model_dir / "moe_tool_report.json";
  auto& env = io::Env::posix();
  if (!env.exists(p)) return std::nullopt;
  const json report = io::parse_json_file_text(env.read_text(p), p.string());
  if (!report.is_object() || !report.contains("tasks")) return std::nullopt;
  return parse_task_subsets(report.at("tasks"), p.string());
}

std::map<int, std::vector<int>> task_keep(const TaskSubsets& t, const model::Model& m, const std::string& task,
                                          const std::string& where) {
  const auto keep = t.keep_of(task, where);
  for (size_t i = 0; i < t.layers.size(); ++i) {
    const int l = t.layers[i].layer;
    if (l < 0 || static_cast<size_t>(l) >= m.layers().size() || !m.layers()[static_cast<size_t>(l)].moe)
      throw Error::invalid(where + " " + task + ": " + t.source + ".layers[" + std::to_string(i) + "].layer: " +
                           std::to_string(l) + " is not an MoE layer of the model (" + std::to_string(m.layers().size()) +
                           " layers; was the checkpoint changed after prune --tasks?)");
  }
  for (const auto& layer : m.layers()) {
    if (!layer.moe) continue;
    const int64_t E = layer.moe->num_experts();
    if (t.experts_per_layer >= 0 && t.experts_per_layer != E)
      throw Error::invalid(where + " " + task + ": layer " + std::to_string(layer.index) + " has " + std::to_string(E) +
                           " experts, but " + t.source + ".experts_per_layer is " + std::to_string(t.experts_per_layer) +
                           " (was the checkpoint changed after prune --tasks?)");
    const auto sec = std::find_if(t.layers.begin(), t.layers.end(), [&](const auto& l) { return l.layer == layer.index; });
    if (sec == t.layers.end() || sec->experts != E)
      throw Error::invalid(where + " " + task + ": layer " + std::to_string(layer.index) + " has " + std::to_string(E) +
                           " experts, but the checkpoint's task section " +
                           (sec == t.layers.end() ? std::string("has no entry for it")
                                                  : "describes " + std::to_string(sec->experts)) +
                           " (was the checkpoint changed after prune --tasks?)");
    // A task routing over fewer experts than each token needs cannot run (nor be written).
    const auto& k = sec->keep.at(task);
    if (static_cast<int64_t>(k.size()) < m.dims().top_k)
      throw Error::corruption(t.source + ".layers[" + std::to_string(sec - t.layers.begin()) + "].keep." + task + ": " +
                              std::to_string(k.size()) + " experts, fewer than the " + std::to_string(m.dims().top_k) +
                              " each token is routed to (" + m.family().topk_key + ")");
  }
  return keep;
}

TaskSubsets require_task_subsets(const std::filesystem::path& model_dir, const std::string& where) {
  auto t = task_subsets_from_report(model_dir);
  if (!t)
    throw Error::invalid(where + ": " + model_dir.string() + " has no task subsets (its moe_tool_report.json has no " +
                         "tasks section; write one with prune --tasks)");
  return std::move(*t);
}

std::vector<std::vector<bool>> task_mask(const TaskSubsets& t, const model::Model& m, const std::string& task,
                                         const std::string& where) {
  const auto keep = task_keep(t, m, task, where);
  const runtime::RoutingRule rule = runtime::RoutingRule::from_model(m);
  std::vector<std::vector<bool>> mask(m.layers().size());
  for (const auto& layer : m.layers()) {
    if (!layer.moe) continue;
    const std::vector<int>& k = keep.at(layer.index);
    const int64_t E = layer.moe->num_experts();
    if (rule.group_limited && rule.n_group > 1 && static_cast<int64_t>(k.size()) < E)
      throw Error::invalid(where + " " + task + ": " + rule.family + " routes within n_group " +
                           std::to_string(rule.n_group) + " expert groups, which a checkpoint holding only the task's "
                           "experts does not (it is written with n_group 1): run convert --task and evaluate that");
    std::vector<bool> active(static_cast<size_t>(E), false);
    for (int e : k) active[static_cast<size_t>(e)] = true;
    mask[static_cast<size_t>(layer.index)] = std::move(active);
  }
  return mask;
}

}  // namespace moe::eval
