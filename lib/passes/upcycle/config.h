// The target family's config.json: the source's attention, RoPE and token keys carried over, the
// MoE keys of the target (expert count and width keys from its family table entry, top-k,
// norm_topk_prob, shared-expert width) and the keys each target family spells differently.
#pragma once

#include <nlohmann/json.hpp>

#include "passes/upcycle/plan.h"

namespace moe::passes::upcycling {

nlohmann::json target_config(const Plan& p);

}  // namespace moe::passes::upcycling
