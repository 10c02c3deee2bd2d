// moe-tool: compress and transform Mixture-of-Experts checkpoints.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <nlohmann/json.hpp>
#include <iostream>
#include <thread>

#include "command.h"
#include "core/error.h"
#include "core/progress.h"
#include "core/warn.h"
#include "runtime/mpi.h"

namespace moe::app {

const Command kCommands[] = {
    {"inspect", "Describe a checkpoint: family, layers, experts, parameters, bytes", setup_inspect},
    {"convert", "Rewrite a checkpoint: re-shard, change dtype (bit-identical otherwise)", setup_convert},
    {"eval", "Perplexity of a model over a text, or KL/top-1 agreement against a reference", setup_eval},
    {"tokenize", "Token ids of a text with a model's tokenizer", setup_tokenize},
    {"calibrate", "Routing statistics of a model over calibration text (stats file for the passes)", setup_calibrate},
    {"stats", "Show or plot a stats file: expert usage, similar experts, super experts", setup_stats},
    {"prune", "Drop experts by a routing score or a search ({methods})", setup_prune},
    {"merge", "Merge experts into fewer ({methods}) with a router for the merged experts", setup_merge},
    {"factorize", "Low-rank experts ({methods}) in the native checkpoint format", setup_factorize},
    {"quantize", "Integer-group and ternary experts ({methods}; mixed precision by --avg-bits) in the native checkpoint format", setup_quantize},
    {"export", "GGUF file for llama.cpp (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k..q6_k, tq1_0, tq2_0), or a compressed-tensors / GPTQ / AWQ folder of intN codes for vLLM and transformers", setup_export},
    {"share", "Cross-layer expert sharing ({methods}): experts of adjacent MoE layers pooled, stored once (convert --materialize expands)", setup_share},
    {"upcycle", "Dense checkpoint into an MoE one ({methods} experts; random, hidden or ridge router)", setup_upcycle},
    {"run", "Run a JSON recipe: calibration, a pipeline of passes, output, evaluation", setup_run},
    {"sweep", "Methods x budgets from one calibration, each evaluated against the input: table, JSON, quality-vs-size plot with the Pareto front", setup_sweep},
    {"list", "List every pass and method", setup_list},
};

namespace {

// One line on stderr; with --json a JSON object (so a caller parsing JSON gets JSON either way).
int report_error(bool json, const std::string& kind, const std::string& msg, int code) {
  if (json) {
    const nlohmann::json j = {{"error", msg}, {"kind", kind}, {"exit_code", code}};
    std::fprintf(stderr, "%s\n", j.dump().c_str());
  } else {
    std::fprintf(stderr, "moe-tool: %s: %s\n", code == 1 && kind == "internal" ? "internal error" : "error", msg.c_str());
  }
  return code;
}

// Commands that run under several MPI ranks (docs/mpi.md): the runner's, where ranks other than 0
// write nothing. The others would each write or print the same thing N times.
bool runs_under_mpi(const std::string& command) {
  for (const char* c : {"calibrate", "prune", "merge", "factorize", "quantize", "run"})
    if (command == c) return true;
  return false;
}

// Reports an error (kind, message, exit status) and returns the status to exit with.
using Fail = std::function<int(const std::string&, const std::string&, int)>;

// Parses the command line and runs the command; errors go through `fail`.
int run_command(int argc, char** argv, const Fail& fail);

}  // namespace

int run_main(int argc, char** argv) {
  bool json = false;
  for (int i = 1; i < argc; ++i) json = json || std::string(argv[i]) == "--json";
  runtime::mpi::World& world = runtime::mpi::World::get();
  try {
    world.init(&argc, &argv);
  } catch (const core::Error& e) {
    // Every rank of the launch fails the same way: rank 0 says so, the others exit quietly.
    int rank = 0;
    try {
      rank = runtime::mpi::launch_env().rank;
    } catch (const core::Error&) {
    }
    return rank == 0 ? report_error(json, core::error_kind_name(e.kind()), e.message(), kExitBadInput) : kExitBadInput;
  }
  // An error on one rank ends every rank (MPI_Abort with the exit status; the launcher adds its
  // own lines). Ranks other than 0 wait a moment first, so an error every rank meets (bad input)
  // is printed once, by rank 0, whose abort ends them.
  auto fail = [&](const std::string& kind, const std::string& msg, int code) {
    if (!world.split()) return report_error(json, kind, msg, code);
    if (world.rank() != 0) std::this_thread::sleep_for(std::chrono::seconds(2));
    report_error(json, kind, world.rank() == 0 ? msg : "rank " + std::to_string(world.rank()) + ": " + msg, code);
    std::fflush(stderr);
    world.abort_all(code);
    return code;
  };
  const int code = run_command(argc, argv, fail);
  world.finalize();
  return code;
}

namespace {

int run_command(int argc, char** argv, const Fail& fail) {
  const runtime::mpi::World& world = runtime::mpi::World::get();
  const bool quiet_rank = world.split() && world.rank() != 0;  // rank 0 prints; the others only their errors
  if (quiet_rank) {
    core::warnings_silenced() = true;
    if (!std::freopen("/dev/null", "w", stdout))
      return fail(core::error_kind_name(core::ErrorKind::IOError), "cannot open /dev/null for the standard output",
                  kExitInternal);
  }
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
    CLI::App* sub = app.add_subcommand(c.name, describe(c));
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
    const bool known = argc > 1 && std::any_of(std::begin(kCommands), std::end(kCommands),
                                               [&](const Command& c) { return std::string(argv[1]) == c.name; });
    if (msg.find("subcommand") != std::string::npos && known && std::string(argv[1]) == "stats") {
      msg = "stats: give a subcommand: show or plot (moe-tool stats --help)";
    } else if (msg.find("subcommand") != std::string::npos && argc > 1 && argv[1][0] != '-' && !known) {
      msg = std::string("unknown command '") + argv[1] + "' (commands:";
      for (const auto& c : kCommands) msg += std::string(" ") + c.name;
      msg += ")";
    }
    return fail("usage", msg, kExitBadInput);
  }
  if (world.split()) {
    const std::string command = app.get_subcommands().empty() ? "" : app.get_subcommands().front()->get_name();
    if (!runs_under_mpi(command))
      return fail(core::error_kind_name(core::ErrorKind::InvalidArgument),
                  command + " does not run over MPI ranks (this is one of " + std::to_string(world.size()) +
                      "): run it as one process; calibrate, prune, merge, factorize, quantize and run do (docs/mpi.md)",
                  kExitBadInput);
  }
  flags.quiet = flags.quiet || quiet_rank;
  core::Progress::global_quiet() = flags.quiet;
  try {
    return handler ? handler() : kExitBadInput;
  } catch (const core::Error& e) {
    return fail(core::error_kind_name(e.kind()), e.message(), e.exit_code());
  } catch (const std::bad_alloc&) {
    return fail("out_of_memory", "out of memory", kExitInternal);
  } catch (const std::exception& e) {
    return fail("internal", e.what(), kExitInternal);
  }
}

}  // namespace

}  // namespace moe::app

int main(int argc, char** argv) { return moe::app::run_main(argc, argv); }
