// `run RECIPE.json`, and the one-pass subcommands `prune` and `merge`, which build a recipe from
// their flags: every way in goes through the same validation and runner.
#include <iostream>

#include "command.h"
#include "flags.h"
#include "core/error.h"
#include "pipeline/keys.h"
#include "pipeline/recipe.h"
#include "pipeline/runner.h"

namespace moe::app {

namespace {

// prune and merge: MODEL OUT --method M, then every flag of the recipe-key table (pipeline/keys.def).
struct OnePass {
  std::string model, out, method;
  bool dry_run = false, json = false;
  KeyFlags keys;
};

void add_common(CLI::App& sub, OnePass& o, const std::string& command) {
  sub.add_option("MODEL", o.model, "Input checkpoint folder (recipe key model)")->required();
  sub.add_option("OUT", o.out, "Output folder (recipe key output.path)")->required();
  sub.add_option("--method", o.method, "Method (see moe-tool list; recipe key passes[0].method)")->required();
  o.keys.declare(sub, command);
  sub.add_flag("--dry-run", o.dry_run, "Run every check, print the plan; compute and write nothing");
  sub.add_flag("--json", o.json, "Print the result (and errors) as JSON");
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
    throw core::Error(e.kind(), pipeline::with_flag_names(e.message()));
  }
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
    if (!recipe.flag_names.empty()) throw core::Error(e.kind(), pipeline::with_flag_names(e.message()));
    throw;
  }
  if (json) std::cout << summary.dump(2) << "\n";
  else std::cout << pipeline::render_run_summary(summary);
  return 0;
}

}  // namespace

void setup_run(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  struct Opts {
    std::string recipe;
    std::vector<std::string> sets;
    bool dry_run = false, json = false;
  };
  auto o = std::make_shared<Opts>();
  sub.add_option("RECIPE", o->recipe, "Recipe JSON file")->required();
  sub.add_option("--set", o->sets, "Override a recipe value: path=value (e.g. passes[0].keep=4), repeatable");
  sub.add_flag("--dry-run", o->dry_run, "Run every check, print the plan; compute and write nothing");
  sub.add_flag("--json", o->json, "Print the result (and errors) as JSON");
  sub.callback([o, &handler, &flags] {
    handler = [o, &flags] {
      auto recipe = pipeline::load_recipe(o->recipe, o->sets);
      return execute(recipe, o->dry_run, o->json, flags.quiet, "moe-tool run " + o->recipe);
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

void setup_list(CLI::App& sub, Handler& handler, const GlobalFlags&) {
  auto json = std::make_shared<bool>(false);
  sub.add_flag("--json", *json, "Print JSON");
  sub.callback([json, &handler] {
    handler = [json] {
      nlohmann::json out = nlohmann::json::array();
      for (const auto& p : pipeline::registered_passes()) {
        nlohmann::json keys = nlohmann::json::array();
        std::string text;
        for (const auto& k : pipeline::recipe_keys()) {
          if (std::string(k.path).rfind("passes[0].", 0) != 0 || !k.for_method(p.pass, p.method)) continue;
          const std::string dflt = !*k.dflt ? "required" : std::string(k.dflt) == "-" ? "none (one of keep, keep_ratio)" : k.dflt;
          keys.push_back({{"key", k.leaf()}, {"flag", k.flag}, {"default", dflt}, {"help", k.help}});
          text += "    " + k.leaf() + std::string(std::max<size_t>(1, 24 - k.leaf().size()), ' ') + k.flag +
                  std::string(std::max<size_t>(1, 26 - std::string(k.flag).size()), ' ') + "default " + dflt + "\n";
        }
        if (*json) {
          out.push_back({{"pass", p.pass}, {"method", p.method}, {"description", p.description}, {"keys", keys}});
        } else {
          std::cout << p.pass << " " << p.method << std::string(std::max<size_t>(1, 12 - std::string(p.method).size()), ' ')
                    << p.description << "\n" << text;
        }
      }
      if (*json) std::cout << out.dump(2) << "\n";
      return 0;
    };
  });
}

}  // namespace moe::app
