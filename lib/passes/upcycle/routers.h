// Router initialisation from prompts: mergekit-moe's "hidden" (per expert, mean MoE block input of
// its positive prompts minus that of its negative prompts, L2-normalised) and DUME's "ridge"
// (closed-form ridge regression of the block input onto the expert's one-hot domain).
// The random router is drawn where the layer is built (passes/upcycle/layers.cpp).
#pragma once

#include "passes/upcycle/plan.h"

namespace moe::passes::upcycling {

// Reads p.o.prompts, runs the first source's dense forward over every prompt and fills
// p.routers ([L][E*H], router row e of layer l at e*H) and p.router_info (the report's
// "router_init"). Error::invalid naming the prompts file and key for a malformed file, a missing
// expert, an empty list or a prompt that tokenizes to nothing.
void compute_prompt_routers(Plan& p);

}  // namespace moe::passes::upcycling
