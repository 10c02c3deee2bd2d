// Typed access to config.json with errors that name the key: "config.json: num_experts: expected
// a positive integer, found \"8\"".
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace moe::model {

class Config {
 public:
  Config() = default;
  Config(nlohmann::json j, std::string source) : j_(std::move(j)), source_(std::move(source)) {}
  // A section of a file (llama4's text_config): errors name its keys "<key_prefix><key>".
  Config(nlohmann::json j, std::string source, std::string key_prefix)
      : j_(std::move(j)), source_(std::move(source)), key_prefix_(std::move(key_prefix)) {}

  const nlohmann::json& json() const { return j_; }
  nlohmann::json& json() { return j_; }
  const std::string& source() const { return source_; }
  bool has(const std::string& key) const { return j_.contains(key) && !j_.at(key).is_null(); }
  // "<source>: <key_prefix><key>", the start of an error message about a key (or a key path such as
  // "rope_scaling.rope_type") of this config.
  std::string where(const std::string& key) const { return source_ + ": " + key_prefix_ + key; }

  int64_t get_int(const std::string& key) const;  // required, > 0 unless allow_zero
  int64_t get_int_or(const std::string& key, int64_t fallback, bool allow_zero = true) const;
  double get_double_or(const std::string& key, double fallback) const;
  bool get_bool_or(const std::string& key, bool fallback) const;
  std::string get_string_or(const std::string& key, const std::string& fallback) const;
  std::vector<int64_t> get_int_list_or(const std::string& key, std::vector<int64_t> fallback) const;

 private:
  [[noreturn]] void fail(const std::string& key, const std::string& expected) const;
  nlohmann::json j_;
  std::string source_;
  std::string key_prefix_;  // "" or e.g. "text_config."
};

}  // namespace moe::model
