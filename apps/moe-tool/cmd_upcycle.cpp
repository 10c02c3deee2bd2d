// `upcycle DENSE OUT --to FAMILY --experts E --top-k K [--method copy|drop|split] ...`: builds an
// upcycle recipe (pipeline/upcycle_run.h) from the flags of the recipe-key table (scope
// "upcycle") and runs it, as `moe-tool run` runs a recipe file with an "upcycle" section.
#include <iostream>

#include "command.h"
#include "flags.h"
#include "core/error.h"
#include "core/progress.h"
#include "pipeline/keys.h"
#include "pipeline/upcycle_run.h"

namespace moe::app {

void setup_upcycle(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  struct Opts {
    std::string model, out, dtype;
    int64_t seed = 0;
    bool dry_run = false;
    FolderOutputFlags output;
    KeyFlags keys;
  };
  auto o = std::make_shared<Opts>();
  sub.add_option("DENSE", o->model, "Dense checkpoint, a folder or a GGUF file: llama, mistral, qwen2 or qwen3 (recipe key model)")->required();
  sub.add_option("OUT", o->out, "Output folder (recipe key output.path)")->required();
  o->keys.declare(sub, "upcycle");
  sub.add_option("--seed", o->seed, "Seed of every random choice: router, dropped neurons, segments (recipe key seed, default 0)");
  sub.add_option("--dtype", o->dtype, "Output dtype of float tensors: bf16, f16 or f32 (recipe key output.dtype, default as stored)");
  o->output.declare(sub, /*recipe_keys=*/true);
  sub.add_flag("--dry-run", o->dry_run, "Run every check, print the plan; write nothing");
  sub.callback([o, &handler, &flags] {
    handler = [o, &flags] {
      for (const char* k : {"upcycle.to", "upcycle.experts", "upcycle.top_k"})
        if (!o->keys.given(k))
          throw core::Error::invalid(std::string("upcycle: ") +
                                     (std::string(k) == "upcycle.to" ? "--to FAMILY" : std::string(k) == "upcycle.experts" ? "--experts E" : "--top-k K") +
                                     " is required");
      nlohmann::json r;
      r["model"] = o->model;
      r["seed"] = o->seed;
      r["upcycle"] = nlohmann::json::object();
      r["output"] = {{"path", o->out}};
      if (!o->dtype.empty()) r["output"]["dtype"] = o->dtype;
      if (o->output.max_shard_size_given()) r["output"]["max_shard_size"] = o->output.max_shard_size();
      if (o->output.force) r["output"]["force"] = true;
      const std::string method = o->keys.given("upcycle.method") ? o->keys.value("upcycle.method").get<std::string>() : "copy";
      o->keys.apply(r, "upcycle", method);
      pipeline::UpcycleRunOptions ro{o->dry_run, flags.quiet, flags.command_line};
      nlohmann::json summary;
      try {
        summary = pipeline::run_upcycle_recipe(r, ".", "upcycle", ro);
      } catch (core::Error& e) {
        std::string m = pipeline::with_flag_names(e.message());
        for (const auto& [path, flag] : {std::pair<std::string, std::string>{"output.force", "--force"},
                                         {"output.dtype", "--dtype"}, {"output.max_shard_size", "--max-shard-size"},
                                         {"output.path", "OUT"}}) {
          for (size_t i = m.find(path); i != std::string::npos; i = m.find(path, i + flag.size())) m.replace(i, path.size(), flag);
        }
        if (m.rfind("upcycle: ", 0) == 0) m = m.substr(9);
        throw core::Error(e.kind(), m);
      }
      if (o->output.json) {
        std::cout << summary.dump(2) << "\n";
      } else {
        std::cout << "upcycled " << summary.value("model", "") << " -> " << summary.value("output", "") << " ("
                  << summary.value("to", "") << ", " << summary.value("method", "") << ", E=" << summary["experts"].dump()
                  << ", k=" << summary["top_k"].dump() << ")\n";
        if (summary.contains("bytes"))
          std::cout << "  " << summary["tensors"].dump() << " tensors, " << summary["bytes"].dump() << " bytes, "
                    << summary["seconds"].dump() << " s\n  equals the dense model at init: "
                    << summary["equals_dense_at_init"].get<std::string>() << "\n  next: "
                    << summary["next"].get<std::string>() << "\n";
        else
          std::cout << "  dry run: every check passed, nothing written; the output needs about "
                    << core::format_bytes(summary["disk"]["needs"].get<double>()) << " ("
                    << core::format_bytes(summary["disk"]["free"].get<double>()) << " free)\n";
      }
      return kExitOk;
    };
  });
}

}  // namespace moe::app
