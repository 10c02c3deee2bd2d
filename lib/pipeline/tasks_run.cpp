#include "pipeline/tasks_run.h"

#include "core/error.h"
#include "eval/task_subsets.h"
#include "io/env.h"
#include "pipeline/calibration_text.h"
#include "pipeline/preflight.h"

namespace moe::pipeline {

using core::Error;
using nlohmann::json;

namespace {

// The calibration section a task's text is calibrated with: the recipe's, on the task's text.
CalibrationSpec task_spec(const Recipe& r, const TaskCalibration& t) {
  CalibrationSpec c = r.calibration;
  c.text = t.text;
  c.stats.clear();
  c.tasks.clear();
  return c;
}

}  // namespace

void check_tasks(Recipe& r, const io::Checkpoint& ckpt, const model::Model& model, const std::vector<std::string>& fields) {
  // A recipe's messages start with its file, as its other errors do; flags name themselves.
  const std::string key = (r.flag_names.empty() ? r.source + ": " : "") + r.key("calibration.tasks");
  for (const char* other : {"calibration.text", "calibration.stats"})
    if (!(std::string(other) == "calibration.text" ? r.calibration.text : r.calibration.stats).empty())
      throw Error::invalid(key + " and " + r.key(other) + ": each task brings its own statistics; drop " + r.key(other));
  for (const auto& t : r.calibration.tasks) {
    const std::string where = key + " " + t.name;
    core::with_context(where, [&] {
      if (!t.stats.empty()) {
        const auto s = calib::Stats::load(t.stats, /*with_gram=*/false);
        s.check_model(ckpt, t.stats);
        check_stats_fields(s, model, fields);
      } else {
        (void)calibration_tokens(r.model, task_spec(r, t));
      }
    });
    r.reads.push_back(t.stats.empty() ? t.text : t.stats);
  }
}

std::vector<calib::Stats> task_statistics(const Recipe& r, const io::Checkpoint& ckpt, const model::Model& model,
                                          bool quiet) {
  std::vector<calib::Stats> out;
  for (const auto& t : r.calibration.tasks) {
    if (!t.stats.empty()) {
      out.push_back(calib::Stats::load(t.stats));
      out.back().check_model(ckpt, t.stats);
    } else {
      out.push_back(collect_stats(ckpt, model, task_spec(r, t), r.seed, quiet));
      out.back().source = t.text;  // messages about missing fields name the task's text
    }
  }
  return out;
}

json task_section(const Recipe& r, const std::vector<calib::Stats>& stats, json plan) {
  json cal = json::object();
  for (size_t i = 0; i < r.calibration.tasks.size(); ++i) {
    const auto& t = r.calibration.tasks[i];
    cal[t.name] = {{"stats", t.stats.string()}, {"text", t.text.string()},
                   {"text_sha256", stats[i].meta("text_sha256")}, {"tokens", stats[i].meta("tokens")}};
  }
  plan["calibration"] = std::move(cal);
  return plan;
}

json evaluate_tasks(const json& section, const model::Model& original, const model::Model& written,
                    const eval::Windows& windows, const eval::EvalOptions& eo, bool against_input,
                    const eval::ExpertOrigin* origin) {
  const eval::TaskSubsets t = eval::parse_task_subsets(section, "run report");
  json out = json::object();
  for (const auto& name : t.names) {
    eval::EvalOptions o = eo;
    o.active = eval::task_mask(t, written, name, "calibration.tasks");
    if (against_input) {
      const auto c = eval::compare(original, written, windows, o, origin);
      out[name] = {{"perplexity_before", c.reference.perplexity()}, {"perplexity_after", c.model.perplexity()},
                   {"kl_mean", c.mean_kl()}, {"top1_agreement", c.top1_agreement()}};
    } else {
      out[name] = {{"perplexity_after", eval::perplexity(written, windows, o).perplexity()}};
    }
  }
  return out;
}

json inherited_task_subsets(const io::Checkpoint& ckpt, const json& layer_reports, std::string& note) {
  if (!eval::task_subsets_from_report(ckpt.dir())) return nullptr;  // checks the section too
  const auto path = ckpt.dir() / "moe_tool_report.json";
  const json section = io::parse_json_file_text(io::Env::posix().read_text(path), path.string()).at("tasks");
  for (const auto& lr : layer_reports) {
    if (!lr.contains("origin")) continue;
    const json& origin = lr.at("origin");
    bool in_place = lr.value("experts_before", int64_t{-1}) == static_cast<int64_t>(origin.size());
    for (size_t e = 0; in_place && e < origin.size(); ++e)
      in_place = origin[e].size() == 1 && origin[e][0][0] == e && origin[e][0][1] == 1.0;
    if (!in_place) {
      note = "tasks: the input's task subsets (" + path.string() + " \"tasks\") are not carried over: layer " +
             lr.value("layer", json(nullptr)).dump() + "'s experts were moved, so their indices no longer hold";
      return nullptr;
    }
  }
  return section;
}

}  // namespace moe::pipeline
