#include "family/config.h"

#include "core/error.h"

namespace moe::model {

using core::Error;

// Sizes and counts in config.json are far below 2^31; the bound keeps products of two of them
// (heads x head_dim, experts x width, ...) inside int64 and int casts in the runtime exact.
constexpr int64_t kMaxConfigInt = 2147483647;

void Config::fail(const std::string& key, const std::string& expected) const {
  std::string found = j_.contains(key) ? j_.at(key).dump() : "nothing";
  if (found.size() > 60) found = found.substr(0, 57) + "...";
  throw Error::corruption(source_ + ": " + key_prefix_ + key + ": expected " + expected + ", found " + found);
}

int64_t Config::get_int(const std::string& key) const {
  if (!has(key)) throw Error::corruption(source_ + ": " + key_prefix_ + key + ": missing (required)");
  const auto& v = j_.at(key);
  if (!v.is_number_integer() || v.get<int64_t>() <= 0) fail(key, "a positive integer");
  if (v.get<int64_t>() > kMaxConfigInt) fail(key, "at most " + std::to_string(kMaxConfigInt));
  return v.get<int64_t>();
}

int64_t Config::get_int_or(const std::string& key, int64_t fallback, bool allow_zero) const {
  if (!has(key)) return fallback;
  const auto& v = j_.at(key);
  if (!v.is_number_integer() || v.get<int64_t>() < (allow_zero ? 0 : 1))
    fail(key, allow_zero ? "a non-negative integer" : "a positive integer");
  if (v.get<int64_t>() > kMaxConfigInt) fail(key, "at most " + std::to_string(kMaxConfigInt));
  return v.get<int64_t>();
}

double Config::get_double_or(const std::string& key, double fallback) const {
  if (!has(key)) return fallback;
  const auto& v = j_.at(key);
  if (!v.is_number()) fail(key, "a number");
  return v.get<double>();
}

bool Config::get_bool_or(const std::string& key, bool fallback) const {
  if (!has(key)) return fallback;
  const auto& v = j_.at(key);
  if (!v.is_boolean()) fail(key, "true or false");
  return v.get<bool>();
}

std::string Config::get_string_or(const std::string& key, const std::string& fallback) const {
  if (!has(key)) return fallback;
  const auto& v = j_.at(key);
  if (!v.is_string()) fail(key, "a string");
  return v.get<std::string>();
}

std::vector<int64_t> Config::get_int_list_or(const std::string& key, std::vector<int64_t> fallback) const {
  if (!has(key)) return fallback;
  const auto& v = j_.at(key);
  if (!v.is_array()) fail(key, "a list of integers");
  std::vector<int64_t> out;
  for (const auto& x : v) {
    if (!x.is_number_integer()) fail(key, "a list of integers");
    out.push_back(x.get<int64_t>());
  }
  return out;
}

}  // namespace moe::model
