// moe_tool_report.json: written into every checkpoint moe-tool writes (docs/recipes.md, output and errors).
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "io/checkpoint.h"
#include "model/model.h"
#include "pipeline/sink.h"

namespace moe::pipeline {

// Command, tool version, input fingerprint, parameter counts and bytes before/after, bits per
// parameter of expert weights, timings. Callers add "passes", "layers" and "eval" as they have them.
nlohmann::json make_report(const std::string& command, const io::Checkpoint& input, const model::Model& before,
                           const model::Model& after, const SinkResult& written, double seconds);
void write_report(io::Env& env, const io::fs::path& dir, const nlohmann::json& report);

}  // namespace moe::pipeline
