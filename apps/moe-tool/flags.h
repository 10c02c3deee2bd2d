// CLI flags generated from the recipe-key table (pipeline/keys.def): calibrate, prune and merge
// declare their flags from it, and turn what the user gave into recipe values.
#pragma once

#include <CLI/CLI.hpp>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

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

}  // namespace moe::app
