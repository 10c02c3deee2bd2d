// Small helpers to read tokenizer.json fields with errors that name the JSON path, e.g.
//   model.merges[12]: expected "a b" string or [a,b] pair
// (the loader prepends the file name).
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace moe::tokenizer::json_fields {

using Json = nlohmann::json;

// "a" + "b" -> "a.b" (just "b" when base is empty); "a" + 3 -> "a[3]".
std::string child(const std::string& base, std::string_view key);
std::string child(const std::string& base, size_t index);

// Human-readable JSON type name for messages ("string", "array", ...).
const char* type_name(const Json& j);

// Throws Error::corruption("<path>: <message>").
[[noreturn]] void fail(const std::string& path, const std::string& message);

// Member `key` of object `obj`, or nullptr when absent or JSON null.
const Json* member(const Json& obj, std::string_view key);

// Required / optional typed members; wrong types fail naming path.key.
const Json& require(const Json& obj, std::string_view key, const std::string& path);
std::string require_string(const Json& obj, std::string_view key, const std::string& path);
std::optional<std::string> optional_string(const Json& obj, std::string_view key,
                                           const std::string& path);
bool optional_bool(const Json& obj, std::string_view key, bool fallback, const std::string& path);
int64_t require_int(const Json& obj, std::string_view key, const std::string& path);

// `j` must be an object (fails naming path otherwise).
void expect_object(const Json& j, const std::string& path);

// Reads a pattern object {"String": s} or {"Regex": r}; returns (is_regex, text).
std::pair<bool, std::string> pattern(const Json& obj, std::string_view key, const std::string& path);

}  // namespace moe::tokenizer::json_fields
