// `run RECIPE.json`, and the one-pass subcommands `prune`, `merge` and `factorize`, which build a recipe from
// their flags: every way in goes through the same validation and runner.
#include <cstdio>
#include <iostream>

#include "command.h"
#include "core/error.h"
#include "pipeline/recipe.h"
#include "pipeline/runner.h"

namespace moe::app {

namespace {

// Flags shared by the one-pass subcommands.
struct OnePass {
  std::string model, out, method, stats, text, dtype, shard = "5GB", eval_text;
  int64_t ctx = 512, windows = 0, seed = 0, eval_ctx = 512;
  bool force = false, dry_run = false, json = false, no_propagate = false;
};

void add_common(CLI::App& sub, OnePass& o) {
  sub.add_option("MODEL", o.model, "Input checkpoint folder")->required();
  sub.add_option("OUT", o.out, "Output folder")->required();
  sub.add_option("--method", o.method, "Method (see moe-tool list)")->required();
  sub.add_option("--stats", o.stats, "Routing statistics from moe-tool calibrate");
  sub.add_option("--text", o.text, "Calibration text (statistics and block inputs computed on the fly)");
  sub.add_option("--ctx", o.ctx, "Calibration window length (default 512)");
  sub.add_option("--windows", o.windows, "Calibration windows (default all)");
  sub.add_option("--seed", o.seed, "Seed for random choices (default 0)");
  sub.add_flag("--no-propagate", o.no_propagate, "Calibrate every layer on the input model's hidden states");
  sub.add_option("--dtype", o.dtype, "Output dtype for float tensors: bf16, f16, f32");
  sub.add_option("--max-shard-size", o.shard, "Largest shard (default 5GB)");
  sub.add_option("--eval", o.eval_text, "Evaluate the output against the input on this text");
  sub.add_option("--eval-ctx", o.eval_ctx, "Evaluation window length (default 512)");
  sub.add_flag("--force", o.force, "Replace a non-empty output folder");
  sub.add_flag("--dry-run", o.dry_run, "Print the plan; compute and write nothing");
  sub.add_flag("--json", o.json, "Print the result as JSON");
}

nlohmann::json recipe_json(const OnePass& o, nlohmann::json pass) {
  nlohmann::json r;
  r["model"] = o.model;
  r["seed"] = o.seed;
  nlohmann::json cal = {{"ctx", o.ctx}, {"propagate", !o.no_propagate}};
  if (!o.text.empty()) cal["text"] = o.text;
  if (!o.stats.empty()) cal["stats"] = o.stats;
  if (o.windows > 0) cal["windows"] = o.windows;
  r["calibration"] = cal;
  pass["method"] = o.method;
  r["passes"] = nlohmann::json::array({pass});
  r["output"] = {{"path", o.out}, {"max_shard_size", o.shard}, {"force", o.force}};
  if (!o.dtype.empty()) r["output"]["dtype"] = o.dtype;
  if (!o.eval_text.empty()) r["eval"] = {{"text", o.eval_text}, {"ctx", o.eval_ctx}, {"against_input", true}};
  return r;
}

// Prints a run's summary (JSON pretty, one compact line per run in a batch, or text). The
// checkpoint is already in place: a failure to render must not turn the run into a failure, so
// it falls back to the JSON and says so.
void print_summary(const nlohmann::json& summary, bool json, bool one_line) {
  if (json) {
    std::cout << (one_line ? summary.dump() : summary.dump(2)) << "\n";
    return;
  }
  std::string text;
  try {
    text = pipeline::render_run_summary(summary);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe-tool: warning: the summary could not be rendered (%s); printed as JSON\n", e.what());
    text = summary.dump(2) + "\n";
  }
  std::cout << text;
}

// Exit status of a finished run: 0, or 3 when a quality gate failed (one line on stderr naming
// the bound; the checkpoint is kept and its report says so).
int gate_exit(const nlohmann::json& summary, const std::string& label) {
  if (!summary.contains("quality_gate") || summary.at("quality_gate").at("passed").get<bool>()) return kExitOk;
  const auto& failed = summary.at("quality_gate").at("failed");
  std::string line;
  for (const auto& f : failed) line += (line.empty() ? "" : "; ") + f.get<std::string>();
  std::fprintf(stderr, "moe-tool: quality gate failed: %s%s (checkpoint kept: %s)\n", label.empty() ? "" : (label + ": ").c_str(),
               line.c_str(), summary.at("output").get<std::string>().c_str());
  return kExitQualityGate;
}

int execute(pipeline::Recipe& recipe, bool dry_run, bool json, bool quiet, const std::string& command) {
  pipeline::RunOptions opts;
  opts.dry_run = dry_run;
  opts.quiet = quiet;
  opts.command = command;
  const auto summary = pipeline::run_recipe(recipe, opts);
  print_summary(summary, json, false);
  return gate_exit(summary, "");
}

// Severity of an exit status, to pick a batch's worst: internal (1) > bad input (2) > quality
// gate (3) > ok (0).
int severity(int code) {
  switch (code) {
    case kExitOk: return 0;
    case kExitQualityGate: return 1;
    case kExitBadInput: return 2;
    default: return 3;
  }
}

}  // namespace

void setup_run(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  struct Opts {
    std::vector<std::string> recipes;
    std::vector<std::string> sets;
    bool dry_run = false, json = false;
  };
  auto o = std::make_shared<Opts>();
  sub.add_option("RECIPE", o->recipes,
                 "Recipe JSON file(s); several run one after the other, each to the end whatever the others did, and "
                 "the exit status is the worst (1 > 2 > 3 > 0)")
      ->required();
  sub.add_option("--set", o->sets, "Override a recipe value: path=value (e.g. passes[0].keep=4), repeatable, applied to every recipe");
  sub.add_flag("--dry-run", o->dry_run, "Validate and print the plan; compute and write nothing");
  sub.add_flag("--json", o->json, "Print the result as JSON (one line per run when several recipes are given)");
  sub.callback([o, &handler, &flags] {
    handler = [o, &flags] {
      if (o->recipes.size() == 1) {
        auto recipe = pipeline::load_recipe(o->recipes[0], o->sets);
        return execute(recipe, o->dry_run, o->json, flags.quiet, "moe-tool run " + o->recipes[0]);
      }
      // A batch: every recipe runs; a failing one prints its error line (and, with --json, a JSON
      // line {"recipe", "exit", "error"}) and leaves no output behind, as a single run would.
      int worst = kExitOk;
      for (const auto& file : o->recipes) {
        nlohmann::json line = {{"recipe", file}};
        int code = kExitOk;
        try {
          auto recipe = pipeline::load_recipe(file, o->sets);
          pipeline::RunOptions opts;
          opts.dry_run = o->dry_run;
          opts.quiet = flags.quiet;
          opts.command = "moe-tool run " + file;
          const auto summary = pipeline::run_recipe(recipe, opts);
          if (!o->json) std::cout << "== " << file << "\n";
          code = gate_exit(summary, file);
          if (o->json) {
            line["exit"] = code;
            line["summary"] = summary;
            print_summary(line, true, true);
          } else {
            print_summary(summary, false, false);
          }
        } catch (const core::Error& e) {
          code = e.exit_code();
          std::fprintf(stderr, "moe-tool: error: %s\n", e.message().c_str());
          line["error"] = e.message();
        } catch (const std::bad_alloc&) {
          code = kExitInternal;
          std::fprintf(stderr, "moe-tool: error: %s: out of memory\n", file.c_str());
          line["error"] = "out of memory";
        } catch (const std::exception& e) {
          code = kExitInternal;
          std::fprintf(stderr, "moe-tool: internal error: %s: %s\n", file.c_str(), e.what());
          line["error"] = std::string("internal error: ") + e.what();
        }
        if (code != kExitOk && line.contains("error") && o->json) {
          line["exit"] = code;
          std::cout << line.dump() << "\n";
        }
        std::cout.flush();
        if (severity(code) > severity(worst)) worst = code;
      }
      return worst;
    };
  });
}

void setup_prune(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  auto o = std::make_shared<OnePass>();
  auto keep = std::make_shared<int64_t>(0);
  auto ratio = std::make_shared<double>(0);
  auto protect = std::make_shared<bool>(false);
  add_common(sub, *o);
  auto* k = sub.add_option("--keep", *keep, "Experts to keep in every MoE layer");
  auto* r = sub.add_option("--keep-ratio", *ratio, "Fraction of all experts to keep, ranked across layers");
  k->excludes(r);
  sub.add_flag("--protect-super-experts", *protect, "Never drop an expert flagged super");
  sub.callback([o, keep, ratio, protect, &handler, &flags] {
    handler = [o, keep, ratio, protect, &flags] {
      nlohmann::json pass = {{"pass", "prune"}};
      if (*keep > 0) pass["keep"] = *keep;
      else if (*ratio > 0) pass["keep_ratio"] = *ratio;
      else throw core::Error::invalid("prune: give --keep N or --keep-ratio R");
      if (*protect) pass["protect_super_experts"] = true;
      auto recipe = pipeline::parse_recipe(recipe_json(*o, pass), ".", "prune");
      return execute(recipe, o->dry_run, o->json, flags.quiet, flags.command_line);
    };
  });
}

void setup_merge(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  auto o = std::make_shared<OnePass>();
  auto experts = std::make_shared<int64_t>(0);
  auto router = std::make_shared<std::string>();
  auto importance = std::make_shared<std::string>();
  auto no_align = std::make_shared<bool>(false);
  auto protect = std::make_shared<bool>(false);
  add_common(sub, *o);
  sub.add_option("--experts", *experts, "Experts per MoE layer after merging")->required();
  sub.add_option("--router", *router, "Router rows for merged experts: dominant, mean or refit");
  sub.add_option("--importance", *importance,
                 "Expert score that picks dominant experts and weights the merge: saliency (default; count x reap), "
                 "frequency (count, the papers' rule) or soft (weight_sum)");
  sub.add_flag("--no-align", *no_align,
               "hcsmoe/submoe: average without aligning neurons to the dominant expert (the papers' rule)");
  sub.add_flag("--protect-super-experts", *protect, "Keep every expert flagged super as a group of its own");
  sub.callback([o, experts, router, importance, no_align, protect, &handler, &flags] {
    handler = [o, experts, router, importance, no_align, protect, &flags] {
      nlohmann::json pass = {{"pass", "merge"}, {"experts", *experts}};
      if (!router->empty()) pass["router"] = *router;
      if (!importance->empty()) pass["importance"] = *importance;
      if (*no_align) pass["align"] = false;
      if (*protect) pass["protect_super_experts"] = true;
      auto recipe = pipeline::parse_recipe(recipe_json(*o, pass), ".", "merge");
      return execute(recipe, o->dry_run, o->json, flags.quiet, flags.command_line);
    };
  });
}

void setup_factorize(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  auto o = std::make_shared<OnePass>();
  struct F {
    double ratio = 0, energy = 0, budget = 0, alpha = -1, damp = -1;
    int64_t rank = 0;
    std::vector<std::string> targets;
    bool shared_v = false, materialize = false;
  };
  auto f = std::make_shared<F>();
  add_common(sub, *o);
  auto* r1 = sub.add_option("--ratio", f->ratio, "Kept-parameter ratio per matrix, in (0, 1]");
  auto* r2 = sub.add_option("--rank", f->rank, "The same rank for every matrix");
  auto* r3 = sub.add_option("--energy", f->energy, "Smallest rank keeping this fraction of the singular-value energy");
  auto* r4 = sub.add_option("--budget", f->budget,
                            "Kept-parameter ratio of each layer's targeted weights, ranks allocated across matrices by loss");
  r1->excludes(r2)->excludes(r3)->excludes(r4);
  r2->excludes(r3)->excludes(r4);
  r3->excludes(r4);
  sub.add_option("--targets", f->targets, "What to factorize: experts (default), shared, attention, dense, all")->delimiter(',');
  sub.add_option("--alpha", f->alpha, "asvd: activation exponent (default 0.5)");
  sub.add_option("--damp", f->damp, "Gram damping: G + damp * mean(diag G) * I (default 0.01; 0 = plain SVD-LLM)");
  sub.add_flag("--shared-v", f->shared_v, "delta: one right factor shared by all experts' deltas of a matrix type");
  sub.add_flag("--materialize", f->materialize, "Write the factorized weights dense (a stock checkpoint, no size win)");
  sub.callback([o, f, &handler, &flags] {
    handler = [o, f, &flags] {
      nlohmann::json pass = {{"pass", "factorize"}};
      if (f->ratio > 0) pass["ratio"] = f->ratio;
      if (f->rank > 0) pass["rank"] = f->rank;
      if (f->energy > 0) pass["energy"] = f->energy;
      if (f->budget > 0) pass["budget"] = f->budget;
      if (!pass.contains("ratio") && !pass.contains("rank") && !pass.contains("energy") && !pass.contains("budget"))
        throw core::Error::invalid("factorize: give one of --ratio R, --rank K, --energy E, --budget R");
      if (!f->targets.empty()) pass["targets"] = f->targets;
      if (f->alpha >= 0) pass["alpha"] = f->alpha;
      if (f->damp >= 0) pass["damp"] = f->damp;
      if (f->shared_v) pass["shared_v"] = true;
      nlohmann::json rj = recipe_json(*o, pass);
      if (f->materialize) rj["output"]["materialize"] = true;
      auto recipe = pipeline::parse_recipe(rj, ".", "factorize");
      return execute(recipe, o->dry_run, o->json, flags.quiet, flags.command_line);
    };
  });
}

void setup_list(CLI::App& sub, Handler& handler, const GlobalFlags&) {
  auto json = std::make_shared<bool>(false);
  sub.add_flag("--json", *json, "Print JSON");
  sub.callback([json, &handler] {
    handler = [json] {
      nlohmann::json out = nlohmann::json::array();
      for (const auto& p : pipeline::registered_passes()) {
        if (*json) out.push_back({{"pass", p.pass}, {"method", p.method}, {"description", p.description}});
        else std::cout << p.pass << " " << p.method << std::string(std::max<size_t>(1, 12 - std::string(p.method).size()), ' ') << p.description << "\n";
      }
      if (*json) std::cout << out.dump(2) << "\n";
      return 0;
    };
  });
}

}  // namespace moe::app
