// `moe-tool sweep MODEL --text CALIB --eval HELDOUT`: one calibration, then every method x budget
// as a one-pass recipe through the runner, each evaluated against the input; a table, DIR/sweep.json
// and DIR/sweep.svg (quality against size, Pareto front marked). Resumable: DIR/cells/<name>/
// keeps each cell's recipe, output and result; a cell whose result matches its inputs is reused.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <set>
#include <sstream>

#include "calib/plot.h"
#include "calib/sha256.h"
#include "command.h"
#include "core/error.h"
#include "eval/eval.h"
#include "io/checkpoint.h"
#include "io/output_dir.h"
#include "model/model.h"
#include "pipeline/calibration_text.h"
#include "passes/pass.h"
#include "pipeline/recipe.h"
#include "pipeline/runner.h"

namespace moe::app {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// The budget key of each pass kind, and the default methods and budgets.
struct Kind {
  const char* pass;
  const char* budget_name;  // what a budget means, for messages
  std::vector<std::string> default_budgets;
};
const Kind kKinds[] = {
    {"prune", "keep ratio in (0, 1]", {"0.75", "0.5"}},
    {"merge", "keep ratio in (0, 1] (experts per layer = round(ratio x experts))", {"0.75", "0.5"}},
    {"quantize", "codec (int8, int4, int3, int2, ternary, ...)", {"int4", "int3", "int2"}},
    {"factorize", "kept-parameter ratio in (0, 1]", {"0.5", "0.25"}},
};
const char* kDefaultMethods = "prune:reap,prune:frequency,merge:hcsmoe,quantize:rtn,quantize:gptq,factorize:svdllm";

const Kind* find_kind(const std::string& pass) {
  for (const auto& k : kKinds)
    if (pass == k.pass) return &k;
  return nullptr;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep)) out.push_back(cur);
  if (!s.empty() && s.back() == sep) out.push_back("");
  return out;
}

struct Cell {
  std::string name, pass, method, budget;
  json recipe;  // the one-pass recipe (eval included)
  bool needs_stats = false, needs_gram = false;
};

// The recipe `moe-tool run` would take for one cell (paths absolute).
json cell_recipe(const std::string& pass, const std::string& method, const std::string& budget, int64_t experts,
                 const json& calibration, const json& eval, const fs::path& out) {
  json p = {{"pass", pass}, {"method", method}};
  const auto ratio = [&](const char* what) {
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(budget, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != budget.size() || !(v > 0 && v <= 1))
      throw core::Error::invalid("--budgets " + pass + "=" + budget + ": expected a " + what);
    return v;
  };
  if (pass == "prune") p["keep_ratio"] = ratio("keep ratio in (0, 1]");
  if (pass == "merge") {
    const double r = ratio("keep ratio in (0, 1]");
    p["experts"] = std::max<int64_t>(1, std::llround(r * static_cast<double>(experts)));
  }
  if (pass == "factorize") p["ratio"] = ratio("kept-parameter ratio in (0, 1]");
  if (pass == "quantize") p["codec"] = budget;
  return {{"model", calibration.at("model")},
          {"seed", calibration.at("seed")},
          {"calibration", calibration.at("calibration")},
          {"passes", json::array({p})},
          {"output", {{"path", out.string()}, {"force", true}}},
          {"eval", eval}};
}

// What identifies the model's contents for the cache: the fingerprint (names, shapes, config) and
// every file's name, size and modification time.
std::string model_identity(const io::Checkpoint& ckpt, const fs::path& dir) {
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    files.push_back(e.path().filename().string() + ":" + std::to_string(e.file_size()) + ":" +
                    std::to_string(e.last_write_time().time_since_epoch().count()));
  }
  std::sort(files.begin(), files.end());
  std::string all = ckpt.fingerprint();
  for (const auto& f : files) all += "\n" + f;
  return calib::sha256_hex(all);
}

json read_json_or_null(const fs::path& p) {
  std::error_code ec;
  if (!fs::is_regular_file(p, ec)) return nullptr;
  try {
    return io::parse_json_file_text(io::Env::posix().read_text(p), p.string());
  } catch (const std::exception&) {
    return nullptr;  // an unfinished or foreign file: the cell is recomputed
  }
}

// Written whole or not at all: a temporary sibling renamed into place.
void write_json_atomic(const fs::path& p, const json& j) {
  const fs::path tmp = p.string() + ".tmp";
  io::Env::posix().write_text(tmp, j.dump(2) + "\n");
  fs::rename(tmp, p);
}

// Non-dominated rows on (bytes, key): no other row is as small and as good with one of them strictly.
void mark_front(json& rows, const std::string& key, const std::string& flag) {
  for (auto& a : rows) {
    if (!a.contains(key) || !a[key].is_number()) continue;
    bool dominated = false;
    for (const auto& b : rows) {
      if (&a == &b || !b.contains(key) || !b[key].is_number()) continue;
      const double ab = a["bytes"].get<double>(), bb = b["bytes"].get<double>();
      const double aq = a[key].get<double>(), bq = b[key].get<double>();
      if (bb <= ab && bq <= aq && (bb < ab || bq < aq)) dominated = true;
    }
    a[flag] = !dominated;
  }
}

std::string render_table(const json& rows, const std::optional<double>& gate) {
  std::ostringstream o;
  char line[512];
  std::snprintf(line, sizeof line, "%-28s %10s %7s %9s %9s %9s %8s %7s  %s\n", "cell", "bytes", "size", "bits/par",
                "ppl_ratio", "kl_mean", "top1", "front", "status");
  o << line;
  for (const auto& r : rows) {
    if (r.contains("error")) {
      o << r["name"].get<std::string>() << "  error: " << r["error"].get<std::string>() << "\n";
      continue;
    }
    std::string front = std::string(r["pareto_ppl"].get<bool>() ? "P" : "-") + (r["pareto_kl"].get<bool>() ? "K" : "-");
    std::string status = r["cached"].get<bool>() ? "cached" : "computed";
    if (gate) status += r["ppl_ratio"].get<double>() <= *gate ? ", gate ok" : ", gate FAIL";
    std::snprintf(line, sizeof line, "%-28s %10lld %6.1f%% %9.3f %9.4f %9.5f %8.4f %7s  %s\n",
                  r["name"].get<std::string>().c_str(), static_cast<long long>(r["bytes"].get<int64_t>()),
                  100.0 * r["size_ratio"].get<double>(), r["bits_per_param"].get<double>(), r["ppl_ratio"].get<double>(),
                  r["kl_mean"].get<double>(), r["top1_agreement"].get<double>(), front.c_str(), status.c_str());
    o << line;
  }
  return o.str();
}

std::string render_plot(const json& rows, const std::string& model) {
  calib::Scatter s;
  s.title = "moe-tool sweep: quality against size";
  s.subtitle = model + "; each point one method x budget evaluated against the input on the held-out text";
  s.xlabel = "size (MB of tensors written)";
  calib::ScatterPanel ppl{"perplexity ratio (after / before)", {}, {}}, kl{"mean KL(input || output), nats/token", {}, {}};
  for (const auto& r : rows) {
    if (r.contains("error")) continue;
    s.x.push_back(r["bytes"].get<double>() / 1e6);
    s.labels.push_back(r["name"].get<std::string>());
    s.groups.push_back(r["pass"].get<std::string>() + " " + r["method"].get<std::string>());
    ppl.y.push_back(r["ppl_ratio"].get<double>());
    ppl.front.push_back(r["pareto_ppl"].get<bool>());
    kl.y.push_back(r["kl_mean"].get<double>());
    kl.front.push_back(r["pareto_kl"].get<bool>());
  }
  s.panels = {ppl, kl};
  return calib::scatter_svg(s);
}

}  // namespace

void setup_sweep(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  struct Opts {
    std::string model, text, eval, out = "sweep";
    std::vector<std::string> methods, budgets;
    int64_t ctx = 512, windows = 0, batch_windows = 8, eval_ctx = 512, eval_max_windows = 0, seed = 0;
    std::optional<double> max_ppl_ratio;
    bool json = false;
  };
  auto o = std::make_shared<Opts>();
  sub.add_option("MODEL", o->model, "Input checkpoint folder")->required();
  sub.add_option("--text", o->text, "Calibration text (UTF-8): one statistics file for every cell, and block inputs of the passes")
      ->required();
  sub.add_option("--eval", o->eval, "Held-out text: every output is evaluated against the input on it")->required();
  sub.add_option("--methods", o->methods,
                 std::string("PASS:METHOD[:BUDGET], comma-separated or repeated (default ") + kDefaultMethods +
                     "); a BUDGET fixes that method's budgets, e.g. quantize:gptq:int4");
  sub.add_option("--budgets", o->budgets,
                 "PASS=B1,B2,... repeatable: prune and merge keep ratios (default 0.75,0.5), quantize codecs (default "
                 "int4,int3,int2), factorize kept-parameter ratios (default 0.5,0.25)");
  sub.add_option("-o,--out", o->out, "Sweep folder: cells/<name>/ (recipe, output, result), stats.safetensors, sweep.json, "
                                      "sweep.svg; an existing sweep folder is resumed (default: sweep)");
  sub.add_option("--ctx", o->ctx, "Calibration window length in tokens (default 512)");
  sub.add_option("--windows", o->windows, "Calibration windows (default: all)");
  sub.add_option("--batch-windows", o->batch_windows, "Windows per forward batch (default 8)");
  sub.add_option("--eval-ctx", o->eval_ctx, "Evaluation window length in tokens (default 512)");
  sub.add_option("--eval-max-windows", o->eval_max_windows, "Evaluate at most N windows (default: all)");
  sub.add_option("--seed", o->seed, "Seed of every random choice (default 0)");
  sub.add_option("--max-ppl-ratio", o->max_ppl_ratio,
                 "Gate: exit 3 when no cell keeps perplexity after / before within this (the table marks each cell)");
  sub.add_flag("--json", o->json, "Print the table (and errors) as JSON");
  // The methods from the pass table itself (what `moe-tool list` prints), so the help cannot drift.
  std::string methods_help;
  for (const auto& k : kKinds) {
    std::string ms;
    for (const auto& p : pipeline::registered_passes())
      if (p.pass == std::string(k.pass)) ms += (ms.empty() ? "" : "|") + std::string(p.method);
    methods_help += std::string(methods_help.empty() ? "" : ", ") + k.pass + ":<" + ms + ">";
  }
  sub.footer(
      "Methods: " + methods_help + " (moe-tool list).\nEach cell is the recipe "
      "moe-tool run takes (DIR/cells/<name>/recipe.json); its output is DIR/cells/<name>/model. Exit 0 done,\n"
      "2 bad input (nothing computed), 3 --max-ppl-ratio missed by every cell, 1 internal error.");
  sub.callback([o, &handler, &flags] {
    handler = [o, &flags]() -> int {
      // ---- Every check before any work.
      if (o->ctx < 1) throw core::Error::invalid("--ctx: expected an integer >= 1");
      if (o->windows < 0) throw core::Error::invalid("--windows: expected an integer >= 0");
      if (o->batch_windows < 1) throw core::Error::invalid("--batch-windows: expected an integer >= 1");
      if (o->eval_ctx < 1) throw core::Error::invalid("--eval-ctx: expected an integer >= 1");
      if (o->eval_max_windows < 0) throw core::Error::invalid("--eval-max-windows: expected an integer >= 0");
      if (o->seed < 0) throw core::Error::invalid("--seed: expected an integer >= 0");
      if (o->max_ppl_ratio && !(*o->max_ppl_ratio > 0))
        throw core::Error::invalid("--max-ppl-ratio: expected a number > 0");
      const fs::path model_dir = fs::absolute(o->model), text = fs::absolute(o->text), heldout = fs::absolute(o->eval);
      const fs::path dir = fs::absolute(o->out);
      auto& env = io::Env::posix();
      // The sweep folder: never an input or inside one; an existing non-empty folder only when it is a sweep's.
      // A sweep folder is never replaced, only added to (resumed), so the output rules apply to a
      // new folder as given, and to an existing sweep folder through a name inside it (no input is
      // that name or above it) plus the check that no input lies inside the folder.
      {
        const std::vector<fs::path> inputs = {model_dir, text, heldout};
        std::error_code ec;
        if (!fs::exists(dir, ec)) {
          io::check_output(dir, inputs, /*force=*/false, io::OutputKind::Folder);
        } else {
          if (!fs::is_empty(dir, ec) && !fs::exists(dir / "cells", ec))
            throw core::Error::invalid("--out " + o->out + ": exists and is not a sweep folder (no cells/ in it)");
          io::check_output(dir / "cells" / ".moe-tool-sweep-probe", inputs, /*force=*/false, io::OutputKind::Folder);
          const fs::path d = fs::weakly_canonical(dir, ec);
          for (const auto& in : inputs) {
            const fs::path c = fs::weakly_canonical(in, ec);
            const auto rel = c.lexically_relative(d);
            if (!rel.empty() && *rel.begin() != "..")
              throw core::Error::invalid("--out " + o->out + ": holds the input " + in.string() + "; choose another folder");
          }
        }
      }
      const std::string text_body = eval::read_text(text);
      const std::string heldout_body = eval::read_text(heldout);
      auto ckpt = io::Checkpoint::open(env, model_dir);
      auto model = model::Model::load(ckpt);
      int64_t experts = 0;
      for (const auto& l : model.layers())
        if (l.moe) experts = std::max(experts, l.moe->num_experts());

      // Methods and budgets.
      std::map<std::string, std::vector<std::string>> budgets;
      for (const auto& b : o->budgets) {
        const auto eq = b.find('=');
        const std::string pass = b.substr(0, eq);
        if (eq == std::string::npos || !find_kind(pass))
          throw core::Error::invalid("--budgets " + b + ": expected PASS=B1,B2,... with PASS prune, merge, quantize or factorize");
        if (budgets.count(pass)) throw core::Error::invalid("--budgets " + b + ": " + pass + " given twice");
        if (eq + 1 == b.size()) throw core::Error::invalid("--budgets " + b + ": no budget after '='");
        for (const auto& v : split(b.substr(eq + 1), ','))
          if (v.empty()) throw core::Error::invalid("--budgets " + b + ": an empty budget");
          else budgets[pass].push_back(v);
      }
      std::vector<std::string> methods;
      for (const auto& m : o->methods.empty() ? std::vector<std::string>{kDefaultMethods} : o->methods)
        for (const auto& x : split(m, ',')) methods.push_back(x);
      json calibration = {{"model", model_dir.string()},
                          {"seed", o->seed},
                          {"calibration", {{"text", text.string()}, {"ctx", o->ctx}, {"batch_windows", o->batch_windows}}}};
      if (o->windows > 0) calibration["calibration"]["windows"] = o->windows;  // absent: all
      json eval = {{"text", heldout.string()}, {"ctx", o->eval_ctx}};
      if (o->eval_max_windows > 0) eval["max_windows"] = o->eval_max_windows;
      std::vector<Cell> cells;
      std::set<std::string> names;
      for (const auto& m : methods) {
        const auto parts = split(m, ':');
        if (parts.size() < 2 || parts.size() > 3 || parts[0].empty() || parts[1].empty())
          throw core::Error::invalid("--methods " + m + ": expected PASS:METHOD or PASS:METHOD:BUDGET (e.g. prune:reap, quantize:gptq:int4)");
        const Kind* kind = find_kind(parts[0]);
        if (!kind) throw core::Error::invalid("--methods " + m + ": unknown pass '" + parts[0] + "' (prune, merge, quantize, factorize)");
        const auto bs = parts.size() == 3 ? std::vector<std::string>{parts[2]}
                        : budgets.count(parts[0]) ? budgets.at(parts[0])
                                                  : kind->default_budgets;
        for (const auto& b : bs) {
          Cell c{parts[0] + "-" + parts[1] + "-" + b, parts[0], parts[1], b, {}, false, false};
          for (char& ch : c.name)
            if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '.' && ch != '-' && ch != '_') ch = '_';
          if (!names.insert(c.name).second) continue;  // the same cell asked twice: once
          c.recipe = cell_recipe(c.pass, c.method, b, experts, calibration, eval, dir / "cells" / c.name / "model");
          // The runner's own validation, before any work: unknown methods, impossible budgets.
          pipeline::Recipe r = [&] {
            try {
              return pipeline::parse_recipe(c.recipe, ".", "--methods " + m);
            } catch (core::Error& e) {
              throw core::Error(e.kind(), e.message() + " (" + c.name + ")");
            }
          }();
          for (const auto& f : r.passes.at(0)->requirements().stats_fields) {
            c.needs_stats = true;
            c.needs_gram = c.needs_gram || f == "gram_in" || f == "gram_mid";
          }
          cells.push_back(std::move(c));
        }
      }
      if (cells.empty()) throw core::Error::invalid("--methods: no cell to run");

      // ---- One calibration for every cell that reads statistics (with Gram matrices when one needs them).
      const std::string identity = model_identity(ckpt, model_dir);
      const bool any_stats = std::any_of(cells.begin(), cells.end(), [](const Cell& c) { return c.needs_stats; });
      const bool gram = std::any_of(cells.begin(), cells.end(), [](const Cell& c) { return c.needs_gram; });
      std::error_code exists_ec;
      const bool made_dir = !fs::exists(dir, exists_ec);  // removed again if the calibration fails
      fs::create_directories(dir / "cells");
      const fs::path stats_path = dir / "stats.safetensors", stats_key_path = dir / "stats.json";
      const json stats_key = {{"model", identity}, {"text_sha256", calib::sha256_hex(text_body)}, {"calibration", calibration},
                              {"gram", gram}};
      bool stats_cached = false;
      if (any_stats) {
        const json old = read_json_or_null(stats_key_path);
        // A file with Gram matrices serves a sweep that needs none.
        json want = stats_key, have = old;
        if (!have.is_null() && have.contains("gram") && have["gram"].get<bool>()) want["gram"] = true;
        stats_cached = !old.is_null() && have == want && fs::exists(stats_path);
        if (!stats_cached) {
          fs::remove(stats_key_path);
          pipeline::Recipe r = pipeline::parse_recipe(cells.front().recipe, ".", "sweep");
          r.calibration.gram = gram;
          if (!flags.quiet) std::fprintf(stderr, "sweep: calibrating once%s\n", gram ? " (with Gram matrices)" : "");
          try {
            pipeline::collect_stats(ckpt, model, r.calibration, static_cast<uint64_t>(o->seed), flags.quiet, stats_path);
          } catch (...) {
            std::error_code ec;
            if (made_dir) fs::remove_all(dir, ec);  // nothing of a new sweep folder is left behind
            throw;
          }
          write_json_atomic(stats_key_path, stats_key);
        } else if (!flags.quiet) {
          std::fprintf(stderr, "sweep: statistics cached (%s)\n", stats_path.string().c_str());
        }
      }
      const std::string stats_sha = any_stats ? calib::sha256_hex(env.read_text(stats_key_path)) : "";

      // ---- The cells.
      json rows = json::array();
      int worst = kExitOk;
      for (auto& c : cells) {
        if (c.needs_stats) c.recipe["calibration"]["stats"] = stats_path.string();
        const fs::path cdir = dir / "cells" / c.name;
        // The key names the folder's own files relative to it: a sweep folder moved or copied
        // elsewhere keeps its cells.
        json key_recipe = c.recipe;
        key_recipe["output"]["path"] = (fs::path("cells") / c.name / "model").string();
        if (c.needs_stats) key_recipe["calibration"]["stats"] = "stats.safetensors";
        const json key = {{"model", identity},
                          {"text_sha256", calib::sha256_hex(text_body)},
                          {"eval_sha256", calib::sha256_hex(heldout_body)},
                          {"stats", stats_sha},
                          {"recipe", key_recipe}};
        const json old = read_json_or_null(cdir / "result.json");
        json row;
        if (!old.is_null() && old.value("key", json()) == key && old.contains("row") &&
            fs::exists(cdir / "model" / "moe_tool_report.json")) {
          row = old["row"];
          row["output"] = (cdir / "model").string();
          row["cached"] = true;
          if (!flags.quiet) std::fprintf(stderr, "sweep: %s cached\n", c.name.c_str());
        } else {
          fs::create_directories(cdir);
          fs::remove(cdir / "result.json");
          write_json_atomic(cdir / "recipe.json", c.recipe);
          if (!flags.quiet) std::fprintf(stderr, "sweep: %s\n", c.name.c_str());
          try {
            pipeline::Recipe r = pipeline::parse_recipe(c.recipe, ".", (cdir / "recipe.json").string());
            pipeline::RunOptions ro;
            ro.quiet = flags.quiet;
            ro.command = "moe-tool run " + (cdir / "recipe.json").string() + " (" + flags.command_line + ")";
            pipeline::run_recipe(r, ro);
            // Size and quality from the written report.
            const json rep = io::parse_json_file_text(env.read_text(cdir / "model" / "moe_tool_report.json"),
                                                      (cdir / "model" / "moe_tool_report.json").string());
            const double bytes = rep.at("bytes").at("after").get<double>(), bytes0 = rep.at("bytes").at("before").get<double>();
            const double params0 = rep.at("params").at("before").get<double>();
            const auto& ev = rep.at("eval");
            row = {{"name", c.name},
                   {"pass", c.pass},
                   {"method", c.method},
                   {"budget", c.budget},
                   {"bytes", rep.at("bytes").at("after")},
                   {"bytes_before", rep.at("bytes").at("before")},
                   {"size_ratio", bytes / bytes0},
                   {"params", rep.at("params").at("after")},
                   {"params_before", rep.at("params").at("before")},
                   {"bits_per_param", 8.0 * bytes / params0},
                   {"perplexity_before", ev.at("perplexity_before")},
                   {"perplexity_after", ev.at("perplexity_after")},
                   {"ppl_ratio", ev.at("perplexity_after").get<double>() / ev.at("perplexity_before").get<double>()},
                   {"kl_mean", ev.at("kl_mean")},
                   {"top1_agreement", ev.at("top1_agreement")},
                   {"seconds", rep.at("timings").at("total_seconds")},
                   {"output", (cdir / "model").string()}};
            write_json_atomic(cdir / "result.json", {{"key", key}, {"row", row}});
            row["cached"] = false;
          } catch (const core::Error& e) {
            row = {{"name", c.name}, {"pass", c.pass}, {"method", c.method}, {"budget", c.budget}, {"error", e.message()}};
            std::fprintf(stderr, "moe-tool: error: sweep cell %s: %s\n", c.name.c_str(), e.message().c_str());
            if (worst == kExitOk) worst = e.exit_code();
          }
        }
        rows.push_back(row);
      }

      // ---- Front, gate, outputs.
      mark_front(rows, "ppl_ratio", "pareto_ppl");
      mark_front(rows, "kl_mean", "pareto_kl");
      bool any_pass = false;
      for (auto& r : rows) {
        if (r.contains("error") || !o->max_ppl_ratio) continue;
        r["gate_passed"] = r["ppl_ratio"].get<double>() <= *o->max_ppl_ratio;
        any_pass = any_pass || r["gate_passed"].get<bool>();
      }
      json result = {{"model", model_dir.string()},
                     {"text", text.string()},
                     {"eval", heldout.string()},
                     {"out", dir.string()},
                     {"statistics", any_stats ? json{{"path", stats_path.string()}, {"gram", gram}, {"cached", stats_cached}}
                                              : json(nullptr)},
                     {"cells", rows},
                     {"plot", (dir / "sweep.svg").string()}};
      if (o->max_ppl_ratio) result["max_ppl_ratio"] = *o->max_ppl_ratio;
      write_json_atomic(dir / "sweep.json", result);
      env.write_text(dir / "sweep.svg", render_plot(rows, model_dir.filename().string()));
      if (o->json) std::cout << result.dump(2) << "\n";
      else std::cout << render_table(rows, o->max_ppl_ratio) << "wrote " << (dir / "sweep.json").string() << ", "
                     << (dir / "sweep.svg").string() << "\n";
      if (worst != kExitOk) return worst;
      if (o->max_ppl_ratio && !any_pass) {
        std::fprintf(stderr, "moe-tool: quality gate failed: --max-ppl-ratio %g: no cell within it\n", *o->max_ppl_ratio);
        return kExitQualityGate;
      }
      return kExitOk;
    };
  });
}

}  // namespace moe::app
