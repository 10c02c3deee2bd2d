// moe-tool: compress and transform Mixture-of-Experts checkpoints.
#include <cstdio>
#include <iostream>

#include "command.h"
#include "core/error.h"
#include "core/progress.h"

namespace moe::app {

const Command kCommands[] = {
    {"inspect", "Describe a checkpoint: family, layers, experts, parameters, bytes", setup_inspect},
    {"convert", "Rewrite a checkpoint: re-shard, change dtype (bit-identical otherwise)", setup_convert},
    {"eval", "Perplexity of a model over a text, or KL/top-1 agreement against a reference", setup_eval},
    {"tokenize", "Token ids of a text with a model's tokenizer", setup_tokenize},
    {"calibrate", "Routing statistics of a model over calibration text (stats file for the passes)", setup_calibrate},
    {"stats", "Show or plot a stats file: expert usage, similar experts, super experts", setup_stats},
    {"prune", "Drop experts by a routing score (frequency, soft, reap, enumerate, random)", setup_prune},
    {"merge", "Merge experts into fewer (msmoe, hcsmoe, submoe) with a router for the merged experts", setup_merge},
    {"factorize", "Low-rank experts (svd, asvd, svdllm, delta, latent) in the native checkpoint format", setup_factorize},
    {"run", "Run a JSON recipe: calibration, a pipeline of passes, output, evaluation", setup_run},
    {"list", "List every pass and method", setup_list},
};

int run_main(int argc, char** argv) {
  CLI::App app{"moe-tool: compress and transform Mixture-of-Experts checkpoints", "moe-tool"};
  app.footer(
      "Exit status: 0 done (a written checkpoint is in place); 1 internal error (a bug); 2 bad input (one line on "
      "stderr naming the file, tensor or JSON path; nothing written); 3 run: the written model missed a recipe "
      "quality gate (eval.max_ppl_ratio / max_kl / min_top1; checkpoint kept, its report says so).");
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("moe-tool ") + MOE_TOOL_VERSION);
  GlobalFlags flags;
  flags.command_line = "moe-tool";
  for (int i = 1; i < argc; ++i) flags.command_line += std::string(" ") + argv[i];
  app.add_flag("-q,--quiet", flags.quiet, "No progress output on stderr");
  Handler handler;
  for (const auto& c : kCommands) {
    CLI::App* sub = app.add_subcommand(c.name, c.description);
    sub->fallthrough();
    c.setup(*sub, handler, flags);
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::string msg = e.what();
    if (msg.find("subcommand") != std::string::npos && argc > 1 && argv[1][0] != '-') {
      msg = std::string("unknown command '") + argv[1] + "' (commands:";
      for (const auto& c : kCommands) msg += std::string(" ") + c.name;
      msg += ")";
    }
    std::fprintf(stderr, "moe-tool: error: %s\n", msg.c_str());
    return kExitBadInput;
  }
  core::Progress::global_quiet() = flags.quiet;
  try {
    return handler ? handler() : kExitBadInput;
  } catch (const core::Error& e) {
    std::fprintf(stderr, "moe-tool: error: %s\n", e.message().c_str());
    return e.exit_code();
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "moe-tool: error: out of memory\n");
    return kExitInternal;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe-tool: internal error: %s\n", e.what());
    return kExitInternal;
  }
}

}  // namespace moe::app

int main(int argc, char** argv) { return moe::app::run_main(argc, argv); }
