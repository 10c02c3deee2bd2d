// Warnings: one line on stderr, "moe-tool: warning: <message>", each distinct message once per
// process (a model loaded several times in one run warns once). Thread-safe.
#pragma once

#include <string>

namespace moe::core {

void warn_once(const std::string& message);

}  // namespace moe::core
