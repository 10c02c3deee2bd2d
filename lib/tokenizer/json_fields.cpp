#include "tokenizer/json_fields.h"

#include "core/error.h"

namespace moe::tokenizer::json_fields {

std::string child(const std::string& base, std::string_view key) {
  return base.empty() ? std::string(key) : base + "." + std::string(key);
}

std::string child(const std::string& base, size_t index) {
  return base + "[" + std::to_string(index) + "]";
}

const char* type_name(const Json& j) { return j.type_name(); }

void fail(const std::string& path, const std::string& message) {
  throw core::Error::corruption(path.empty() ? message : path + ": " + message);
}

void expect_object(const Json& j, const std::string& path) {
  if (!j.is_object()) fail(path, std::string("expected an object, got ") + type_name(j));
}

const Json* member(const Json& obj, std::string_view key) {
  if (!obj.is_object()) return nullptr;
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

const Json& require(const Json& obj, std::string_view key, const std::string& path) {
  const Json* j = member(obj, key);
  if (!j) fail(child(path, key), "missing");
  return *j;
}

std::string require_string(const Json& obj, std::string_view key, const std::string& path) {
  const Json& j = require(obj, key, path);
  if (!j.is_string()) fail(child(path, key), std::string("expected a string, got ") + type_name(j));
  return j.get<std::string>();
}

std::optional<std::string> optional_string(const Json& obj, std::string_view key,
                                           const std::string& path) {
  const Json* j = member(obj, key);
  if (!j) return std::nullopt;
  if (!j->is_string()) {
    fail(child(path, key), std::string("expected a string, got ") + type_name(*j));
  }
  return j->get<std::string>();
}

bool optional_bool(const Json& obj, std::string_view key, bool fallback, const std::string& path) {
  const Json* j = member(obj, key);
  if (!j) return fallback;
  if (!j->is_boolean()) {
    fail(child(path, key), std::string("expected true or false, got ") + type_name(*j));
  }
  return j->get<bool>();
}

int64_t require_int(const Json& obj, std::string_view key, const std::string& path) {
  const Json& j = require(obj, key, path);
  if (!j.is_number_integer()) {
    fail(child(path, key), std::string("expected an integer, got ") + type_name(j));
  }
  return j.get<int64_t>();
}

std::pair<bool, std::string> pattern(const Json& obj, std::string_view key,
                                     const std::string& path) {
  const std::string p = child(path, key);
  const Json& j = require(obj, key, path);
  if (j.is_object() && j.size() == 1) {
    if (const Json* s = member(j, "String"); s && s->is_string()) return {false, s->get<std::string>()};
    if (const Json* r = member(j, "Regex"); r && r->is_string()) return {true, r->get<std::string>()};
  }
  fail(p, "expected {\"String\": ...} or {\"Regex\": ...}");
}

}  // namespace moe::tokenizer::json_fields
