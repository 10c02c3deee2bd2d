// What `inspect` reports about a checkpoint, as JSON (the CLI renders it as text or prints it).
#pragma once

#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "model/model.h"

namespace moe::model {

// family, layers, hidden, heads/kv heads, vocab, experts per layer, experts per token, shared
// experts, expert width, dense layers, parameters total/active, bytes by dtype, tensors, shards.
nlohmann::json summarize(const io::Checkpoint& ckpt, const Model& model, bool with_tensors);

// Human-readable rendering of summarize()'s JSON.
std::string render_summary(const nlohmann::json& s);

}  // namespace moe::model
