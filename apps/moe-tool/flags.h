// CLI flags generated from the recipe-key table (pipeline/keys.def): calibrate, prune and merge
// declare their flags from it, and turn what the user gave into recipe values.
#pragma once

#include <CLI/CLI.hpp>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "pipeline/hf_sink.h"
#include "pipeline/keys.h"

namespace moe::app {

// The values of the table's flags one command declared; only the flags the user gave count.
class KeyFlags {
 public:
  // Declares every flag of the table whose scope includes `command`, with "(default: X)" in its help.
  void declare(CLI::App& sub, const std::string& command);
  // Whether the user gave the flag of `path`.
  bool given(const std::string& path) const;
  // Sets every given key into `recipe` (JSON paths; "passes[0]." keys into recipe["passes"][0]),
  // converting to the key's type: Error::invalid naming the flag for a malformed number, or for a
  // flag the pass method does not take (e.g. --no-align with msmoe).
  void apply(nlohmann::json& recipe, const std::string& command, const std::string& method) const;
  // A given key's value as JSON (null when not given).
  nlohmann::json value(const std::string& path) const;

 private:
  struct Slot {
    const pipeline::KeyInfo* key = nullptr;
    CLI::Option* option = nullptr;
    std::vector<std::string> texts;  // one per occurrence
    bool flag = false;
  };
  std::map<std::string, Slot> slots_;  // by JSON path (std::map: stable addresses for CLI11)
};

// The flags of a command that writes one checkpoint folder (convert, share, upcycle):
// --max-shard-size, --force and --json, declared once with one help text each.
class FolderOutputFlags {
 public:
  bool force = false, json = false;
  // Declares the three flags on `sub`; `recipe_keys`: the help names the recipe keys they set
  // (output.max_shard_size, output.force), for a command that builds a recipe from its flags.
  void declare(CLI::App& sub, bool recipe_keys = false);
  // Whether --max-shard-size was given, and its text ("5GB" when not).
  bool max_shard_size_given() const;
  const std::string& max_shard_size() const { return shard_; }
  // The writer's options: quiet, the shard size parsed (Error::invalid naming --max-shard-size for
  // a malformed size); dtype and materialize left to the caller.
  pipeline::HfSinkOptions sink_options(bool quiet) const;

 private:
  std::string shard_ = "5GB";
  CLI::Option* shard_option_ = nullptr;
};

}  // namespace moe::app
