#include "pipeline/recipe.h"

#include <algorithm>
#include <limits>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/checkpoint_writer.h"
#include "passes/options.h"
#include "pipeline/gguf_export.h"
#include "pipeline/upcycle_run.h"

namespace moe::pipeline {

using core::Error;
using nlohmann::json;
using passes::json_found;
using passes::Options;

namespace {

fs::path resolve(const fs::path& base, const std::string& p) {
  fs::path x(p);
  return x.is_absolute() ? x : (base / x).lexically_normal();
}


// calibration.tasks (recipe.h CalibrationSpec::tasks).
std::vector<TaskCalibration> parse_tasks(const json& j, const fs::path& base) {
  const std::string path = "calibration.tasks";
  std::vector<TaskCalibration> tasks;
  auto add = [&](TaskCalibration t, const std::string& where) {
    if (t.name.empty() || t.name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") !=
                              std::string::npos)
      throw Error::invalid(where + ": task name '" + t.name + "': use letters, digits, '_', '.' or '-'");
    for (const auto& u : tasks)
      if (u.name == t.name) throw Error::invalid(where + ": task name '" + t.name + "' given twice");
    tasks.push_back(std::move(t));
  };
  auto add_assignments = [&](const std::string& text, const std::string& where) {
    for (size_t a = 0; a <= text.size();) {
      size_t b = text.find(',', a);
      if (b == std::string::npos) b = text.size();
      const std::string item = text.substr(a, b - a);
      const size_t eq = item.find('=');
      if (eq == std::string::npos || eq + 1 == item.size())
        throw Error::invalid(where + ": expected NAME=STATS_FILE, found '" + item + "'");
      add({item.substr(0, eq), resolve(base, item.substr(eq + 1)), {}}, where);
      a = b + 1;
    }
  };
  const json items = j.is_array() ? j : json::array({j});
  if (!j.is_array() && !j.is_string())
    throw Error::invalid(path + ": expected a list of {\"name\", \"stats\" or \"text\"} objects or NAME=STATS_FILE strings, found " +
                         json_found(j));
  for (size_t i = 0; i < items.size(); ++i) {
    const std::string where = j.is_array() ? path + "[" + std::to_string(i) + "]" : path;
    const json& it = items[i];
    if (it.is_string()) {
      add_assignments(it.get<std::string>(), where);
      continue;
    }
    Options o(it, where, "a task");
    TaskCalibration t;
    t.name = o.get_string("name");
    const auto stats = o.opt_string("stats"), text = o.opt_string("text");
    o.finish();
    if (stats.has_value() == text.has_value())
      throw Error::invalid(where + ": give exactly one of \"stats\" (a stats file) or \"text\" (a calibration text)");
    if (stats) t.stats = resolve(base, *stats);
    if (text) t.text = resolve(base, *text);
    add(std::move(t), where);
  }
  if (tasks.size() < 2) throw Error::invalid(path + ": give at least two tasks (one task is a plain prune with --stats)");
  return tasks;
}

}  // namespace

void parse_output_format(Options& o, const json& spec, OutputSpec& out) {
  out.format = o.get_enum("format", "hf", {"hf", "gguf", "compressed-tensors", "gptq", "awq"});
  out.format_given = spec.contains("format");
  if (auto t = o.opt_string("type")) out.type = *t;
  o.allow({"tensor_type"});
  const bool one_rule = o.has("tensor_type") && spec.at("tensor_type").is_string();
  if (o.has("tensor_type")) {
    const json& t = spec.at("tensor_type");
    if (t.is_string()) {
      out.tensor_type.push_back(t.get<std::string>());
    } else if (t.is_array()) {
      for (size_t i = 0; i < t.size(); ++i) {
        if (!t[i].is_string())
          throw Error::invalid("output.tensor_type[" + std::to_string(i) + "]: expected \"REGEX=TYPE\", found " + json_found(t[i]));
        out.tensor_type.push_back(t[i].get<std::string>());
      }
    } else {
      throw Error::invalid("output.tensor_type: expected \"REGEX=TYPE\" or a list of them, found " + json_found(t));
    }
  }
  if (out.format != "gguf") {
    if ((!out.type.empty() || !out.tensor_type.empty()) && !out.format_given)
      throw Error::invalid(std::string(out.type.empty() ? "output.tensor_type" : "output.type") +
                           ": GGUF only: give output.format gguf with it (a prune of a GGUF input writes GGUF without "
                           "it, its blocks copied as stored, and takes no type)");
    if (!out.type.empty() || !out.tensor_type.empty())
      throw Error::invalid(std::string(out.type.empty() ? "output.tensor_type" : "output.type") +
                           ": GGUF only; output.format " + out.format + " writes the model's codes as they are");
    if (out.format != "hf" && out.materialize)
      throw Error::invalid("output.materialize: writes every weight dense, but output.format " + out.format +
                           " stores int4/int8 codes: drop one of them");
    return;
  }
  // A GGUF output is one file whose tensor types output.type and output.tensor_type choose: the
  // hf folder's shard size has nothing to cut, and materialize (every weight dense) would undo the
  // int4/int8 groups copied as q4_0/q8_0 blocks behind the types' back (docs/gguf.md). output.dtype
  // stays: the float dtype of the native output the file is converted from.
  if (spec.contains("max_shard_size"))
    throw Error::invalid("output.max_shard_size: output.format gguf writes one file, never shards: leave it out");
  if (out.materialize)
    throw Error::invalid("output.materialize: output.format gguf chooses every tensor's type itself (output.type, "
                         "output.tensor_type): leave it out, or write output.format hf with materialize and `moe-tool "
                         "export` that folder");
  // output.type: required unless the input is a GGUF file (checked with the input, check_gguf_plan).
  if (!out.type.empty()) (void)gguf_writable_type(out.type, "output.type");
  (void)parse_gguf_overrides(out.tensor_type, [&](size_t i) {
    return one_rule ? std::string("output.tensor_type") : "output.tensor_type[" + std::to_string(i) + "]";
  });
}

CalibrationSpec parse_calibration(const json& j, const fs::path& base) {
  CalibrationSpec cs;
  const int64_t big = std::numeric_limits<int64_t>::max();
  Options c(j, "calibration", "calibration");
  if (auto t = c.opt_string("text")) cs.text = resolve(base, *t);
  if (auto t = c.opt_string("stats")) cs.stats = resolve(base, *t);
  cs.ctx = c.get_int("ctx", 512, 2, big);
  cs.windows = c.get_int("windows", 0, 1, big);
  cs.batch_windows = c.get_int("batch_windows", 8, 1, big);
  cs.out_stride = c.get_int("out_stride", 16, 1, big);
  cs.propagate = c.get_bool("propagate", true);
  cs.sample = c.get_enum("sample", "first", {"first", "random"});
  cs.gram = c.get_bool("gram", false);
  cs.routed_only = c.get_bool("routed_only", false);
  cs.out_cos_tokens = c.get_int("out_cos_tokens", 512, 1, big);
  if (j.is_object() && j.contains("memory_budget") && j.at("memory_budget").is_number()) {  // bytes
    const json& v = j.at("memory_budget");
    if (!v.is_number_integer() || v.get<double>() < 1)
      throw Error::invalid("calibration.memory_budget: expected a size (\"512MB\", \"auto\") or a whole number of bytes "
                           ">= 1, found " + v.dump());
    cs.memory_budget = v.get<uint64_t>();
    c.allow({"memory_budget"});
  } else if (auto m = c.opt_string("memory_budget"); m && *m != "auto") {
    cs.memory_budget = core::with_context("calibration.memory_budget", [&] { return io::parse_size(*m); });
  }
  c.allow({"tasks"});
  c.finish();
  if (c.has("tasks")) cs.tasks = parse_tasks(j.at("tasks"), base);
  return cs;
}

Recipe parse_recipe(const json& j, const fs::path& base, const std::string& source) {
  return core::with_context(source, [&] {
    Recipe r;
    r.source = source;
    Options top(j, "", "a recipe");
    top.allow({"model", "seed", "calibration", "passes", "output", "eval", "description"});
    if (j.is_object() && j.contains("upcycle")) {  // an upcycle recipe (pipeline/upcycle_run.h) has no passes
      check_upcycle_section_keys(j.at("upcycle"));
      throw Error::invalid("upcycle: a recipe has either passes or an upcycle section, not both (moe-tool run takes either)");
    }
    top.opt_string("description", /*non_empty=*/false);
    r.model = resolve(base, top.get_string("model"));
    r.seed = static_cast<uint64_t>(top.get_int("seed", 0, 0, std::numeric_limits<int64_t>::max()));
    const int64_t big = std::numeric_limits<int64_t>::max();
    if (top.has("calibration")) r.calibration = parse_calibration(j.at("calibration"), base);
    r.calibration.seed = r.seed;
    if (!top.has("passes")) throw Error::invalid("passes: missing (required)");
    const json& passes = j.at("passes");
    if (!passes.is_array() || passes.empty())
      throw Error::invalid("passes: expected a non-empty list of pass objects, found " + json_found(passes));
    for (size_t i = 0; i < passes.size(); ++i) {
      const std::string path = "passes[" + std::to_string(i) + "]";
      // A pass's path key (quantize delta-ternary's "parent") resolves against the recipe's
      // folder, as every path of a recipe does.
      json spec = passes[i];
      if (spec.is_object() && spec.contains("parent") && spec.at("parent").is_string())
        spec["parent"] = resolve(base, spec.at("parent").get<std::string>()).string();
      r.passes.push_back(make_pass(spec, path));
      r.pass_specs.push_back(spec);
    }
    if (!top.has("output")) throw Error::invalid("output: missing (required)");
    {
      Options o(j.at("output"), "output", "output");
      r.output.path = resolve(base, o.get_string("path"));
      if (auto d = o.opt_string("dtype")) {
        r.output.dtype = core::parse_user_dtype(*d);
        if (!r.output.dtype) throw Error::invalid("output.dtype: '" + *d + "' is not one of bf16, f16, f32");
      }
      if (auto m = o.opt_string("max_shard_size")) {
        r.output.max_shard_bytes = core::with_context("output.max_shard_size", [&] { return io::parse_size(*m); });
        r.output.max_shard_given = true;
      }
      r.output.force = o.get_bool("force", false);
      r.output.materialize = o.get_bool("materialize", false);
      parse_output_format(o, j.at("output"), r.output);
      o.finish();
    }
    if (top.has("eval")) {
      Options e(j.at("eval"), "eval", "eval");
      EvalSpec ev;
      ev.text = resolve(base, e.get_string("text"));
      ev.ctx = e.get_int("ctx", 512, 2, big);
      ev.max_windows = e.get_int("max_windows", 0, 1, big);  // absent: every window
      ev.against_input = e.get_bool("against_input", true);
      const double inf = std::numeric_limits<double>::infinity();
      ev.max_ppl_ratio = e.opt_number("max_ppl_ratio", 0.0, inf, /*min_open=*/true);
      ev.max_kl = e.opt_number("max_kl", 0.0, inf);
      ev.min_top1 = e.opt_number("min_top1", 0.0, 1.0);
      e.finish();
      if (ev.has_gates() && !ev.against_input)
        throw Error::invalid(std::string("eval.") + (ev.max_ppl_ratio ? "max_ppl_ratio" : ev.max_kl ? "max_kl" : "min_top1") +
                             ": a quality gate compares the written model with the input: needs eval.against_input true");
      r.eval = ev;
    }
    top.finish();
    if (!r.calibration.tasks.empty()) {  // task subsets (docs/tasks.md): one pass that takes them
      if (r.passes.size() != 1)
        throw Error::invalid("calibration.tasks: task subsets take one prune pass, the recipe has " +
                             std::to_string(r.passes.size()) + " passes");
      const std::string why = r.passes[0]->tasks_refusal();
      if (!why.empty())
        throw Error::invalid("calibration.tasks: " + r.passes[0]->name() + " " + r.passes[0]->method() + ": " + why);
    }
    bool needs_stats = false;
    for (const auto& p : r.passes) needs_stats = needs_stats || !p->requirements().stats_fields.empty() || p->requirements().block_inputs;
    if (needs_stats && r.calibration.text.empty() && r.calibration.stats.empty() && r.calibration.tasks.empty())
      throw Error::invalid("calibration: the passes need routing statistics: give calibration.text (computed on the fly) or calibration.stats (from moe-tool calibrate)");
    for (size_t i = 0; i < r.passes.size(); ++i)
      if (r.passes[i]->requirements().block_inputs && r.calibration.text.empty())
        throw Error::invalid("passes[" + std::to_string(i) + "]: method '" + r.passes[i]->method() +
                             "' runs the MoE block on calibration inputs: give calibration.text");
    r.json = j;
    return r;
  });
}

void apply_override(json& j, const std::string& assignment) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw Error::invalid("--set '" + assignment + "': expected path=value, e.g. passes[0].keep=4");
  const std::string path = assignment.substr(0, eq), value = assignment.substr(eq + 1);
  json v;
  try {
    v = json::parse(value);
  } catch (const json::exception&) {
    v = value;
  }
  json* cur = &j;
  size_t i = 0;
  while (i < path.size()) {
    if (path[i] == '.') {
      ++i;
      continue;
    }
    if (path[i] == '[') {
      const auto close = path.find(']', i);
      if (close == std::string::npos) throw Error::invalid("--set '" + assignment + "': missing ']'");
      size_t idx = 0;
      try {
        idx = std::stoul(path.substr(i + 1, close - i - 1));
      } catch (...) {
        throw Error::invalid("--set '" + assignment + "': bad index");
      }
      if (!cur->is_array() || idx >= cur->size())
        throw Error::invalid("--set '" + assignment + "': " + path.substr(0, close + 1) + " does not exist");
      cur = &(*cur)[idx];
      i = close + 1;
      continue;
    }
    size_t end = path.find_first_of(".[", i);
    if (end == std::string::npos) end = path.size();
    const std::string key = path.substr(i, end - i);
    if (!cur->is_object()) throw Error::invalid("--set '" + assignment + "': " + path.substr(0, i) + " is not an object");
    cur = &(*cur)[key];
    i = end;
  }
  *cur = v;
}

Recipe load_recipe(const fs::path& file, const std::vector<std::string>& overrides) {
  auto& env = io::Env::posix();
  json j = io::parse_json_file_text(env.read_text(file), file.string());
  for (const auto& o : overrides) apply_override(j, o);
  Recipe r = parse_recipe(j, file.parent_path().empty() ? fs::path(".") : file.parent_path(), file.string());
  r.reads.push_back(file);
  return r;
}

}  // namespace moe::pipeline
