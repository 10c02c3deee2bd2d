// The subcommand table (ninja's kTools): each entry is a name, a one-line description and a setup
// function that declares its flags on a CLI11 subcommand and sets the handler to run.
// main.cpp owns the table, dispatch, and the one place that maps errors to exit codes.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

namespace moe::app {

struct GlobalFlags {
  bool quiet = false;
  std::string command_line;  // argv joined, for reports
};

// Exit statuses (docs/recipes.md "Exit codes", --help): scripts rely on them.
inline constexpr int kExitOk = 0;           // done; a written checkpoint is in place
inline constexpr int kExitInternal = 1;     // a bug; nothing left behind
inline constexpr int kExitBadInput = 2;     // bad input (file, tensor, JSON path named); nothing written
inline constexpr int kExitQualityGate = 3;  // run: the written model missed a recipe quality gate (kept)

using Handler = std::function<int()>;

struct Command {
  const char* name;
  // One line for --help; "{methods}" stands for the methods passes.def lists for the pass of
  // this name (describe() fills it in), so method names are spelled once.
  const char* description;
  void (*setup)(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
};

// The methods of `pass` in passes.def, joined with ", " (empty for a name that is not a pass).
std::string pass_methods(const std::string& pass);
// c.description with "{methods}" replaced by pass_methods(c.name).
std::string describe(const Command& c);

void setup_inspect(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
void setup_convert(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
void setup_eval(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
void setup_tokenize(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
void setup_calibrate(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
void setup_stats(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
void setup_prune(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
void setup_merge(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
void setup_factorize(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
void setup_quantize(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
void setup_export(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
void setup_upcycle(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
void setup_share(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
void setup_run(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
void setup_sweep(CLI::App& sub, Handler& handler, const GlobalFlags& flags);
void setup_list(CLI::App& sub, Handler& handler, const GlobalFlags& flags);

}  // namespace moe::app
