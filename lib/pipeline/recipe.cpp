#include "pipeline/recipe.h"

#include <algorithm>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/checkpoint_writer.h"

namespace moe::pipeline {

using core::Error;
using nlohmann::json;

std::string did_you_mean(const std::string& word, const std::vector<std::string>& choices) {
  auto dist = [](const std::string& a, const std::string& b) {
    std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
    for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
    for (size_t i = 1; i <= a.size(); ++i) {
      cur[0] = i;
      for (size_t j = 1; j <= b.size(); ++j)
        cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
      std::swap(prev, cur);
    }
    return prev[b.size()];
  };
  std::string best;
  size_t best_d = 3;
  for (const auto& c : choices) {
    const size_t d = dist(word, c);
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  return best.empty() ? "" : " (did you mean '" + best + "'?)";
}

namespace {

std::string found(const json& v) {
  std::string s = v.dump();
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return s;
}

// Strict object reader: every key must be read or it is reported as unknown.
class Obj {
 public:
  Obj(const json& j, std::string path, std::vector<std::string> allowed) : j_(j), path_(std::move(path)), allowed_(std::move(allowed)) {
    if (!j_.is_object()) throw Error::invalid(path_ + ": expected an object, found " + found(j_));
    for (const auto& [k, v] : j_.items()) {
      if (std::find(allowed_.begin(), allowed_.end(), k) == allowed_.end()) {
        std::string list;
        for (const auto& a : allowed_) list += (list.empty() ? "" : ", ") + a;
        throw Error::invalid(sub(k) + ": unknown key" + did_you_mean(k, allowed_) + "; allowed: " + list);
      }
    }
  }
  std::string sub(const std::string& k) const { return path_.empty() ? k : path_ + "." + k; }
  bool has(const std::string& k) const { return j_.contains(k); }
  const json& at(const std::string& k) const { return j_.at(k); }
  std::string str(const std::string& k, bool required, const std::string& fallback = "") const {
    if (!has(k)) {
      if (required) throw Error::invalid(sub(k) + ": missing (required)");
      return fallback;
    }
    if (!j_.at(k).is_string() || j_.at(k).get<std::string>().empty())
      throw Error::invalid(sub(k) + ": expected a non-empty string, found " + found(j_.at(k)));
    return j_.at(k).get<std::string>();
  }
  int64_t integer(const std::string& k, int64_t fallback, int64_t min) const {
    if (!has(k)) return fallback;
    const json& v = j_.at(k);
    if (!v.is_number_integer() || v.get<int64_t>() < min)
      throw Error::invalid(sub(k) + ": expected an integer >= " + std::to_string(min) + ", found " + found(v));
    return v.get<int64_t>();
  }
  bool boolean(const std::string& k, bool fallback) const {
    if (!has(k)) return fallback;
    if (!j_.at(k).is_boolean()) throw Error::invalid(sub(k) + ": expected true or false, found " + found(j_.at(k)));
    return j_.at(k).get<bool>();
  }

 private:
  const json& j_;
  std::string path_;
  std::vector<std::string> allowed_;
};

fs::path resolve(const fs::path& base, const std::string& p) {
  fs::path x(p);
  return x.is_absolute() ? x : (base / x).lexically_normal();
}

}  // namespace

Recipe parse_recipe(const json& j, const fs::path& base, const std::string& source) {
  return core::with_context(source, [&] {
    Recipe r;
    r.source = source;
    Obj top(j, "", {"model", "seed", "calibration", "passes", "output", "eval", "description"});
    if (top.has("description") && !j.at("description").is_string())
      throw Error::invalid("description: expected a string, found " + found(j.at("description")));
    r.model = resolve(base, top.str("model", true));
    r.seed = static_cast<uint64_t>(top.integer("seed", 0, 0));
    if (top.has("calibration")) {
      Obj c(j.at("calibration"), "calibration", {"text", "stats", "ctx", "windows", "batch_windows", "out_stride", "propagate"});
      if (c.has("text")) r.calibration.text = resolve(base, c.str("text", true));
      if (c.has("stats")) r.calibration.stats = resolve(base, c.str("stats", true));
      r.calibration.ctx = c.integer("ctx", 512, 2);
      r.calibration.windows = c.integer("windows", 0, 1);
      r.calibration.batch_windows = c.integer("batch_windows", 8, 1);
      r.calibration.out_stride = c.integer("out_stride", 16, 1);
      r.calibration.propagate = c.boolean("propagate", true);
    }
    if (!top.has("passes")) throw Error::invalid("passes: missing (required)");
    const json& passes = j.at("passes");
    if (!passes.is_array() || passes.empty())
      throw Error::invalid("passes: expected a non-empty list of pass objects, found " + found(passes));
    for (size_t i = 0; i < passes.size(); ++i) {
      const std::string path = "passes[" + std::to_string(i) + "]";
      r.passes.push_back(make_pass(passes[i], path));
      r.pass_specs.push_back(passes[i]);
    }
    if (!top.has("output")) throw Error::invalid("output: missing (required)");
    {
      Obj o(j.at("output"), "output", {"path", "dtype", "max_shard_size", "force"});
      r.output.path = resolve(base, o.str("path", true));
      if (o.has("dtype")) {
        const std::string d = o.str("dtype", true);
        r.output.dtype = core::parse_user_dtype(d);
        if (!r.output.dtype) throw Error::invalid("output.dtype: '" + d + "' is not one of bf16, f16, f32");
      }
      if (o.has("max_shard_size"))
        r.output.max_shard_bytes = core::with_context("output.max_shard_size", [&] { return io::parse_size(o.str("max_shard_size", true)); });
      r.output.force = o.boolean("force", false);
    }
    if (top.has("eval")) {
      Obj e(j.at("eval"), "eval", {"text", "ctx", "max_windows", "against_input"});
      EvalSpec ev;
      ev.text = resolve(base, e.str("text", true));
      ev.ctx = e.integer("ctx", 512, 2);
      ev.max_windows = e.integer("max_windows", 0, 0);
      ev.against_input = e.boolean("against_input", true);
      r.eval = ev;
    }
    bool needs_stats = false;
    for (const auto& p : r.passes) needs_stats = needs_stats || !p->requirements().stats_fields.empty() || p->requirements().block_inputs;
    if (needs_stats && r.calibration.text.empty() && r.calibration.stats.empty())
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
  return parse_recipe(j, file.parent_path().empty() ? fs::path(".") : file.parent_path(), file.string());
}

}  // namespace moe::pipeline
