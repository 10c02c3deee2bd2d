// Strict reading of a pass's JSON options (a recipe's "passes"[i] object or a subcommand's flags).
// Every key a pass reads is recorded; finish() rejects the keys nobody read, naming the JSON path,
// the allowed keys and the nearest one ("did you mean ..."). Type and range errors name the path,
// what was expected and what was found: `passes[0].keep: expected an integer >= 1, found "six"`.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/suggest.h"

namespace moe::passes {

// The "did you mean" helpers (core/suggest.h), as every pass has used them.
using core::allowed_suffix;
using core::edit_distance;
using core::nearest;

// A JSON value as it appears in messages (strings quoted, long values cut).
std::string json_found(const nlohmann::json& v);

class Options {
 public:
  // `spec` must be an object (Error::invalid at `path` otherwise). `what` names the owner in
  // messages about unknown keys, e.g. "prune/reap".
  Options(const nlohmann::json& spec, std::string path, std::string what);

  const std::string& path() const { return path_; }
  // "path.key" ("key" for the top level, path "").
  std::string key_path(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }
  bool has(const std::string& key) const;

  // Each getter marks `key` as allowed. Absent → the default / nullopt.
  std::optional<int64_t> opt_int(const std::string& key, int64_t min, int64_t max);
  int64_t get_int(const std::string& key, int64_t dflt, int64_t min, int64_t max);
  std::optional<uint64_t> opt_uint64(const std::string& key);
  // Numbers in [min, max] (min_open: min itself excluded).
  std::optional<double> opt_number(const std::string& key, double min, double max, bool min_open = false);
  double get_number(const std::string& key, double dflt, double min, double max, bool min_open = false);
  bool get_bool(const std::string& key, bool dflt);
  std::optional<bool> opt_bool(const std::string& key);
  // true, false or "auto" (the pass decides: nullopt, as when absent).
  std::optional<bool> opt_bool_or_auto(const std::string& key);
  // Strings (non-empty unless non_empty is false); get_string: required ("missing (required)").
  std::optional<std::string> opt_string(const std::string& key, bool non_empty = true);
  std::string get_string(const std::string& key);
  std::string get_enum(const std::string& key, const std::string& dflt, const std::vector<std::string>& allowed);
  // Marks keys as allowed without reading them (read elsewhere, e.g. "pass", "method").
  void allow(const std::vector<std::string>& keys);

  // Throws Error::invalid for the first key that no getter or allow() accepted.
  void finish() const;

 private:
  const nlohmann::json* find(const std::string& key);
  [[noreturn]] void type_error(const std::string& key, const std::string& expected) const;

  const nlohmann::json& spec_;
  std::string path_, what_;
  std::vector<std::string> allowed_;
};

// Seed of one layer: the runner's per-layer seed, or, when the pass object sets "seed", a
// per-layer seed mixed from it (splitmix64 of seed and layer), so a pass-level seed overrides
// the recipe's and still differs between layers.
uint64_t layer_seed(std::optional<uint64_t> pass_seed, uint64_t runner_seed, int layer);

// Uniform double in [0,1) from a 64-bit generator output (portable, unlike
// std::uniform_real_distribution whose algorithm is implementation-defined).
inline double unit_double(uint64_t bits) { return static_cast<double>(bits >> 11) * 0x1.0p-53; }

}  // namespace moe::passes
