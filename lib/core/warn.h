// Warnings: one line on stderr, "moe-tool: warning: <message>", each distinct message once per
// process (a model loaded several times in one run warns once). Thread-safe.
#pragma once

#include <string>

namespace moe::core {

void warn_once(const std::string& message);
// Set: warn_once prints nothing (ranks other than 0 of an MPI run, runtime/mpi.h, which would
// repeat rank 0's warnings).
bool& warnings_silenced();

}  // namespace moe::core
