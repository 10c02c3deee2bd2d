// The recipe keys a command line can set, with their flags (pipeline/keys.def).
#pragma once

#include <string>
#include <vector>

namespace moe::pipeline {

// List: a string flag that may be given several times (the recipe key then takes a list).
enum class KeyType { String, Int, Number, Flag, NoFlag, List };

struct KeyInfo {
  const char* path;   // JSON path in a recipe ("calibration.ctx", "passes[0].keep")
  const char* flag;   // "--ctx", "--no-align"
  KeyType type;
  const char* dflt;   // "" when required or none
  const char* scope;  // "calibrate prune merge", "merge:submoe", ...
  const char* help;
  // Whether `command` (calibrate, prune, merge) takes the key at all, and with `method` given,
  // whether that method does ("merge:submoe" keys: only submoe).
  bool for_command(const std::string& command) const;
  bool for_method(const std::string& command, const std::string& method) const;
  // The key name inside its section ("keep" for "passes[0].keep").
  std::string leaf() const;
};

const std::vector<KeyInfo>& recipe_keys();

// `message` with every JSON path of the table replaced by its flag (errors of a recipe built from
// flags name what the user typed).
std::string with_flag_names(const std::string& message);

}  // namespace moe::pipeline
