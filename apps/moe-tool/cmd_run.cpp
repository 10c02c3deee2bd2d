// `run RECIPE.json`, and the one-pass subcommands `prune`, `merge`, `factorize` and `quantize`, which build a recipe from
// their flags: every way in goes through the same validation and runner.
#include <cstdio>
#include <iostream>
#include <optional>

#include "command.h"
#include "flags.h"
#include "core/error.h"
#include "pipeline/keys.h"
#include "pipeline/recipe.h"
#include "pipeline/runner.h"
#include "pipeline/upcycle_run.h"
#include "runtime/mpi.h"
#include "io/checkpoint.h"

namespace moe::app {

namespace {

// prune and merge: MODEL OUT --method M, then every flag of the recipe-key table (pipeline/keys.def).
struct OnePass {
  std::string model, out, method;
  bool dry_run = false, json = false;
  KeyFlags keys;
};

void add_common(CLI::App& sub, OnePass& o, const std::string& command) {
  sub.add_option("MODEL", o.model, "Input checkpoint folder, or a .gguf file (recipe key model)")->required();
  sub.add_option("OUT", o.out, "Output folder (recipe key output.path)")->required();
  sub.add_option("--method", o.method, "Method: " + pass_methods(command) + " (see moe-tool list; recipe key passes[0].method)")
      ->required();
  o.keys.declare(sub, command);
  sub.add_flag("--dry-run", o.dry_run, "Run every check, print the plan; compute and write nothing");
  sub.add_flag("--json", o.json, "Print the result (and errors) as JSON");
}

// A message of a recipe built from flags, in the user's words: every recipe key as its flag, the
// pass's method as --method, the output as OUT.
std::string cli_words(const std::string& message) {
  std::string s = pipeline::with_flag_names(message);
  for (const auto& [path, flag] : {std::pair<std::string, std::string>{"passes[0].method", "--method"},
                                   {"passes[0]: method ", "--method "}, {"output.path", "OUT"}})
    for (size_t i = s.find(path); i != std::string::npos; i = s.find(path, i + flag.size())) s.replace(i, path.size(), flag);
  return s;
}

// The recipe the flags describe: every given flag sets its recipe key; the rest keep the recipe
// defaults. Flag names stand in for JSON paths in messages (Recipe::flag_names).
pipeline::Recipe one_pass_recipe(const OnePass& o, const std::string& command) {
  nlohmann::json r;
  r["model"] = o.model;
  r["passes"] = nlohmann::json::array({{{"pass", command}, {"method", o.method}}});
  r["output"] = {{"path", o.out}};
  o.keys.apply(r, command, o.method);
  if (r.contains("eval") && !r["eval"].contains("text"))
    throw core::Error::invalid("--eval-ctx, --eval-max-windows and --no-against-input need --eval TEXT");
  try {
    auto recipe = pipeline::parse_recipe(r, ".", command);
    for (const auto& k : pipeline::recipe_keys()) recipe.flag_names[k.path] = k.flag;
    recipe.flag_names["output.path"] = "OUT";
    recipe.flag_names["model"] = "MODEL";
    return recipe;
  } catch (core::Error& e) {
    throw core::Error(e.kind(), cli_words(e.message()));
  }
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
  nlohmann::json summary;
  try {
    summary = pipeline::run_recipe(recipe, opts);
  } catch (core::Error& e) {
    if (!recipe.flag_names.empty()) throw core::Error(e.kind(), cli_words(e.message()));
    throw;
  }
  if (runtime::mpi::World::get().rank() != 0) return kExitOk;  // rank 0 wrote the output and prints (docs/mpi.md)
  print_summary(summary, json, false);
  return gate_exit(summary, "");
}

// A recipe with an "upcycle" section (pipeline/upcycle_run.h) runs on its own runner: its
// summary, or nullopt for a pass recipe.
std::optional<nlohmann::json> run_if_upcycle(const std::string& file, const std::vector<std::string>& sets, bool dry_run,
                                             bool quiet, const std::vector<std::string>& batch) {
  const std::filesystem::path path = file;
  nlohmann::json j = io::parse_json_file_text(io::Env::posix().read_text(path), path.string());
  if (!pipeline::is_upcycle_recipe(j)) return std::nullopt;
  if (runtime::mpi::World::get().split())
    throw core::Error::invalid(file + ": an upcycle recipe does not run over MPI ranks: run it as one process (docs/mpi.md)");
  for (const auto& s : sets) pipeline::apply_override(j, s);
  return pipeline::run_upcycle_recipe(j, path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path(),
                                      file, {dry_run, quiet, "moe-tool run " + file, {batch.begin(), batch.end()}});
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

// Every method of passes.def: the passes', then upcycle's.
std::vector<pipeline::PassInfo> all_methods() {
  std::vector<pipeline::PassInfo> v = pipeline::registered_passes();
  const auto& u = pipeline::registered_upcycle_methods();
  v.insert(v.end(), u.begin(), u.end());
  return v;
}

std::string pass_methods(const std::string& pass) {
  std::string s;
  for (const auto& p : all_methods())
    if (pass == p.pass) s += (s.empty() ? "" : ", ") + std::string(p.method);
  return s;
}

std::string describe(const Command& c) {
  std::string s = c.description;
  const auto at = s.find("{methods}");
  if (at != std::string::npos) s.replace(at, 9, pass_methods(c.name));
  return s;
}

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
  sub.add_flag("--dry-run", o->dry_run, "Run every check, print the plan; compute and write nothing");
  sub.add_flag("--json", o->json, "Print the result (and errors) as JSON (one line per run when several recipes are given)");
  sub.callback([o, &handler, &flags] {
    handler = [o, &flags] {
      if (runtime::mpi::World::get().split() && o->recipes.size() > 1)
        throw core::Error::invalid("run: one recipe per launch over MPI ranks (this is one of " +
                                   std::to_string(runtime::mpi::World::get().size()) + "): give " +
                                   o->recipes.front() + " alone (docs/mpi.md)");
      if (o->recipes.size() == 1) {
        if (auto up = run_if_upcycle(o->recipes[0], o->sets, o->dry_run, flags.quiet, o->recipes)) {
          std::cout << up->dump(2) << "\n";
          return kExitOk;
        }
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
          if (auto up = run_if_upcycle(file, o->sets, o->dry_run, flags.quiet, o->recipes)) {
            if (!o->json) std::cout << "== " << file << "\n" << up->dump(2) << "\n";
            else std::cout << nlohmann::json{{"recipe", file}, {"exit", 0}, {"summary", *up}}.dump() << "\n";
            continue;
          }
          auto recipe = pipeline::load_recipe(file, o->sets);
          recipe.reads.assign(o->recipes.begin(), o->recipes.end());  // no run may write over a recipe of the batch
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
  add_common(sub, *o, "prune");
  sub.callback([o, &handler, &flags] {
    handler = [o, &flags] {
      if (o->keys.given("passes[0].keep") == o->keys.given("passes[0].keep_ratio"))
        throw core::Error::invalid(std::string("prune: give one of --keep N or --keep-ratio R") +
                                   (o->keys.given("passes[0].keep") ? ", not both" : ""));
      auto recipe = one_pass_recipe(*o, "prune");
      return execute(recipe, o->dry_run, o->json, flags.quiet, flags.command_line);
    };
  });
}

void setup_merge(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  auto o = std::make_shared<OnePass>();
  add_common(sub, *o, "merge");
  sub.callback([o, &handler, &flags] {
    handler = [o, &flags] {
      if (!o->keys.given("passes[0].experts")) throw core::Error::invalid("merge: --experts N is required");
      auto recipe = one_pass_recipe(*o, "merge");
      return execute(recipe, o->dry_run, o->json, flags.quiet, flags.command_line);
    };
  });
}

void setup_factorize(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  auto o = std::make_shared<OnePass>();
  add_common(sub, *o, "factorize");
  sub.callback([o, &handler, &flags] {
    handler = [o, &flags] {
      int rules = 0;
      for (const char* k : {"passes[0].ratio", "passes[0].rank", "passes[0].energy", "passes[0].budget"}) rules += o->keys.given(k);
      if (rules != 1)
        throw core::Error::invalid(std::string("factorize: give one of --ratio R, --rank K, --energy E, --budget R") +
                                   (rules > 1 ? ", not several" : ""));
      auto recipe = one_pass_recipe(*o, "factorize");
      return execute(recipe, o->dry_run, o->json, flags.quiet, flags.command_line);
    };
  });
}

void setup_quantize(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  auto o = std::make_shared<OnePass>();
  add_common(sub, *o, "quantize");
  sub.footer(
      "Defaults: routed experts, shared experts and dense-layer MLPs take --codec; attention, routers,\n"
      "embeddings and lm_head are kept unless asked (--attention int8, --tensor-type REGEX=CODEC); norms\n"
      "and biases are never quantized. gptq needs --text (Hessians from the calibration tokens).");
  sub.callback([o, &handler, &flags] {
    handler = [o, &flags] {
      auto recipe = one_pass_recipe(*o, "quantize");
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
      for (const auto& p : all_methods()) {
        nlohmann::json keys = nlohmann::json::array();
        std::string text;
        // upcycle's keys (pipeline/keys.def, section "upcycle") are not told apart by method and
        // their defaults do not say which are required: its --help lists them.
        const bool upcycle = std::string(p.pass) == "upcycle";
        if (upcycle) text = "    keys: moe-tool upcycle --help\n";
        for (const auto& k : pipeline::recipe_keys()) {
          if (upcycle || std::string(k.path).rfind("passes[0].", 0) != 0 || !k.for_method(p.pass, p.method)) continue;
          const std::string dflt = !*k.dflt ? "required" : std::string(k.dflt) == "-" ? "none (one of keep, keep_ratio)" : k.dflt;
          keys.push_back({{"key", k.leaf()}, {"flag", k.flag}, {"default", dflt}, {"help", k.help}});
          text += "    " + k.leaf() + std::string(std::max<size_t>(1, 24 - k.leaf().size()), ' ') + k.flag +
                  std::string(std::max<size_t>(1, 26 - std::string(k.flag).size()), ' ') + "default " + dflt + "\n";
        }
        if (*json) {
          out.push_back({{"pass", p.pass}, {"method", p.method}, {"description", p.description}, {"keys", keys}});
        } else {
          std::cout << p.pass << " " << p.method << std::string(static_cast<size_t>(std::max<int64_t>(1, 12 - static_cast<int64_t>(std::string(p.method).size()))), ' ')
                    << p.description << "\n" << text;
        }
      }
      if (*json) std::cout << out.dump(2) << "\n";
      return 0;
    };
  });
}

}  // namespace moe::app
