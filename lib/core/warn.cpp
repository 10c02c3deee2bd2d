#include "core/warn.h"

#include <cstdio>
#include <mutex>
#include <set>

namespace moe::core {

bool& warnings_silenced() {
  static bool silenced = false;
  return silenced;
}

void warn_once(const std::string& message) {
  if (warnings_silenced()) return;
  static std::mutex mu;
  static std::set<std::string> seen;
  std::lock_guard<std::mutex> lock(mu);
  if (!seen.insert(message).second) return;
  std::fprintf(stderr, "moe-tool: warning: %s\n", message.c_str());
}

}  // namespace moe::core
