#include "passes/options.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <sstream>

#include "core/error.h"

namespace moe::passes {

using core::Error;
using nlohmann::json;

std::string json_found(const json& v) {
  std::string s = v.dump();
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  const char* type = v.is_string() ? "" : v.is_boolean() ? " (a boolean)" : v.is_number_float() ? " (a number)"
                                         : v.is_number() ? " (an integer)" : v.is_array() ? " (an array)"
                                         : v.is_object() ? " (an object)" : "";
  return s + type;
}

Options::Options(const json& spec, std::string path, std::string what)
    : spec_(spec), path_(std::move(path)), what_(std::move(what)) {
  if (!spec_.is_object()) throw Error::invalid(path_ + ": expected a JSON object, found " + json_found(spec_));
}

bool Options::has(const std::string& key) const { return spec_.contains(key); }

const json* Options::find(const std::string& key) {
  if (std::find(allowed_.begin(), allowed_.end(), key) == allowed_.end()) allowed_.push_back(key);
  auto it = spec_.find(key);
  return it == spec_.end() ? nullptr : &*it;
}

void Options::type_error(const std::string& key, const std::string& expected) const {
  throw Error::invalid(key_path(key) + ": expected " + expected + ", found " + json_found(spec_.at(key)));
}

namespace {
std::string range_text(const char* kind, int64_t min, int64_t max) {
  std::string s = std::string(kind) + " >= " + std::to_string(min);
  if (max != std::numeric_limits<int64_t>::max()) s = std::string(kind) + " in [" + std::to_string(min) + ", " +
                                                         std::to_string(max) + "]";
  return s;
}
std::string num(double v) {
  std::ostringstream o;
  o << v;
  return o.str();
}
}  // namespace

std::optional<int64_t> Options::opt_int(const std::string& key, int64_t min, int64_t max) {
  const json* v = find(key);
  if (!v) return std::nullopt;
  const std::string expected = range_text("an integer", min, max);
  if (!v->is_number_integer()) type_error(key, expected);
  if (v->is_number_unsigned() && v->get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
    type_error(key, expected);
  const int64_t x = v->get<int64_t>();
  if (x < min || x > max) type_error(key, expected);
  return x;
}

int64_t Options::get_int(const std::string& key, int64_t dflt, int64_t min, int64_t max) {
  return opt_int(key, min, max).value_or(dflt);
}

std::optional<uint64_t> Options::opt_uint64(const std::string& key) {
  const json* v = find(key);
  if (!v) return std::nullopt;
  if (v->is_number_unsigned()) return v->get<uint64_t>();
  if (v->is_number_integer() && v->get<int64_t>() >= 0) return static_cast<uint64_t>(v->get<int64_t>());
  type_error(key, "an integer in [0, 2^64)");
}

std::optional<double> Options::opt_number(const std::string& key, double min, double max, bool min_open) {
  const json* v = find(key);
  if (!v) return std::nullopt;
  const std::string expected =
      "a number in " + std::string(min_open ? "(" : "[") + num(min) + ", " + num(max) + "]";
  if (!v->is_number()) type_error(key, expected);
  const double x = v->get<double>();
  if (!std::isfinite(x) || x < min || (min_open && x == min) || x > max) type_error(key, expected);
  return x;
}

double Options::get_number(const std::string& key, double dflt, double min, double max, bool min_open) {
  return opt_number(key, min, max, min_open).value_or(dflt);
}

std::optional<bool> Options::opt_bool(const std::string& key) {
  const json* v = find(key);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) type_error(key, "true or false");
  return v->get<bool>();
}

bool Options::get_bool(const std::string& key, bool dflt) { return opt_bool(key).value_or(dflt); }

std::optional<bool> Options::opt_bool_or_auto(const std::string& key) {
  const json* v = find(key);
  if (!v || (v->is_string() && v->get<std::string>() == "auto")) return std::nullopt;
  if (!v->is_boolean()) type_error(key, "true, false or \"auto\"");
  return v->get<bool>();
}

std::optional<std::string> Options::opt_string(const std::string& key, bool non_empty) {
  const json* v = find(key);
  if (!v) return std::nullopt;
  if (!v->is_string() || (non_empty && v->get<std::string>().empty()))
    type_error(key, non_empty ? "a non-empty string" : "a string");
  return v->get<std::string>();
}

std::string Options::get_string(const std::string& key) {
  auto v = opt_string(key);
  if (!v) throw Error::invalid(key_path(key) + ": missing (required)");
  return *v;
}

std::string Options::get_enum(const std::string& key, const std::string& dflt,
                              const std::vector<std::string>& allowed) {
  const json* v = find(key);
  if (!v) return dflt;
  std::string list;
  for (size_t i = 0; i < allowed.size(); ++i) list += (i ? ", " : "") + allowed[i];
  if (!v->is_string()) type_error(key, "one of " + list);
  const std::string s = v->get<std::string>();
  if (std::find(allowed.begin(), allowed.end(), s) == allowed.end())
    throw Error::invalid(key_path(key) + ": unknown value \"" + s + "\"" + allowed_suffix(s, allowed));
  return s;
}

void Options::allow(const std::vector<std::string>& keys) {
  for (const auto& k : keys)
    if (std::find(allowed_.begin(), allowed_.end(), k) == allowed_.end()) allowed_.push_back(k);
}

void Options::finish() const {
  for (auto it = spec_.begin(); it != spec_.end(); ++it) {
    if (std::find(allowed_.begin(), allowed_.end(), it.key()) != allowed_.end()) continue;
    throw Error::invalid(key_path(it.key()) + ": unknown key for " + what_ + allowed_suffix(it.key(), allowed_));
  }
}

uint64_t layer_seed(std::optional<uint64_t> pass_seed, uint64_t runner_seed, int layer) {
  if (!pass_seed) return runner_seed;
  // splitmix64 finaliser over seed + layer * golden ratio.
  uint64_t z = *pass_seed + 0x9E3779B97F4A7C15ull * (static_cast<uint64_t>(layer) + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace moe::passes
