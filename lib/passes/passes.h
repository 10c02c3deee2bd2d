// Factories of the passes listed in passes/passes.def. make_<pass>(spec, method, path) builds
// the pass from its (already pass/method-checked) JSON object; every option is validated strictly
// (passes/options.h). pipeline::make_pass dispatches here.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "passes/pass.h"

namespace moe::passes {

std::unique_ptr<pipeline::Pass> make_prune(const nlohmann::json& spec, const std::string& method, const std::string& path);
std::unique_ptr<pipeline::Pass> make_merge(const nlohmann::json& spec, const std::string& method, const std::string& path);
std::unique_ptr<pipeline::Pass> make_factorize(const nlohmann::json& spec, const std::string& method, const std::string& path);
std::unique_ptr<pipeline::Pass> make_share(const nlohmann::json& spec, const std::string& method, const std::string& path);
std::unique_ptr<pipeline::Pass> make_quantize(const nlohmann::json& spec, const std::string& method, const std::string& path);

}  // namespace moe::passes
