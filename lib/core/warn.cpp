#include "core/warn.h"

#include <cstdio>
#include <mutex>
#include <set>

namespace moe::core {

void warn_once(const std::string& message) {
  static std::mutex mu;
  static std::set<std::string> seen;
  std::lock_guard<std::mutex> lock(mu);
  if (!seen.insert(message).second) return;
  std::fprintf(stderr, "moe-tool: warning: %s\n", message.c_str());
}

}  // namespace moe::core
