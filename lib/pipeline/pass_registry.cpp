// make_pass and registered_passes, generated from passes.def.
#include <algorithm>

#include "core/error.h"
#include "passes/options.h"
#include "passes/passes.h"
#include "passes/pass.h"

namespace moe::pipeline {

using core::Error;
using nlohmann::json;

const std::vector<PassInfo>& registered_passes() {
  static const std::vector<PassInfo> table = {
#define MOE_PASS(pass, method, description) {#pass, #method, description},
#include "passes/passes.def"
  };
  return table;
}

const std::vector<PassInfo>& registered_upcycle_methods() {
  static const std::vector<PassInfo> table = {
#define MOE_PASS(pass, method, description)
#define MOE_UPCYCLE(method, description) {"upcycle", #method, description},
#include "passes/passes.def"
  };
  return table;
}

namespace {

std::vector<std::string> pass_names() {
  std::vector<std::string> names;
  for (const auto& p : registered_passes())
    if (std::find(names.begin(), names.end(), p.pass) == names.end()) names.push_back(p.pass);
  return names;
}

std::vector<std::string> method_names(const std::string& pass) {
  std::vector<std::string> names;
  for (const auto& p : registered_passes())
    if (pass == p.pass) names.push_back(p.method);
  return names;
}

// spec[key] as a string, or Error::invalid naming the path and the allowed values.
std::string string_key(const json& spec, const std::string& path, const std::string& key,
                       const std::vector<std::string>& allowed, const std::string& what) {
  std::string list;
  for (size_t i = 0; i < allowed.size(); ++i) list += (i ? ", " : "") + allowed[i];
  auto it = spec.find(key);
  if (it == spec.end()) throw Error::invalid(path + ": missing key \"" + key + "\" (" + what + ": " + list + ")");
  if (!it->is_string())
    throw Error::invalid(path + "." + key + ": expected a string (" + what + ": " + list + "), found " +
                         passes::json_found(*it));
  const std::string s = it->get<std::string>();
  if (std::find(allowed.begin(), allowed.end(), s) == allowed.end())
    throw Error::invalid(path + "." + key + ": unknown " + key + " \"" + s + "\"" +
                         (key == "method" ? " for pass " + spec.at("pass").get<std::string>() : std::string()) +
                         passes::allowed_suffix(s, allowed));
  return s;
}

}  // namespace

std::unique_ptr<Pass> make_pass(const json& spec, const std::string& json_path) {
  if (!spec.is_object())
    throw Error::invalid(json_path + ": expected a pass object such as {\"pass\": \"prune\", \"method\": \"reap\", "
                                     "\"keep\": 6}, found " + passes::json_found(spec));
  const std::string pass = string_key(spec, json_path, "pass", pass_names(), "passes");
  const std::string method = string_key(spec, json_path, "method", method_names(pass), pass + " methods");
#define MOE_PASS(p, m, d) \
  if (pass == #p) return passes::make_##p(spec, method, json_path);
#include "passes/passes.def"
  throw Error::internal("pass " + pass + " listed without a factory");
}

}  // namespace moe::pipeline
