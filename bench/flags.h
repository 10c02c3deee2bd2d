// Command-line helpers of the benchmarks that take flags: a bad flag is one line on stderr,
// "<program>: <message>", and exit status 2.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace moe::bench {

[[noreturn]] inline void bad_flag(const char* program, const std::string& msg) {
  std::fprintf(stderr, "%s: %s\n", program, msg.c_str());
  std::exit(2);
}

// `v` as an integer of at least `min`; otherwise bad_flag naming `what` (the flag).
inline int64_t flag_int(const char* program, const std::string& what, const std::string& v, int64_t min) {
  size_t used = 0;
  int64_t x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != v.size() || x < min)
    bad_flag(program, what + ": expected an integer of at least " + std::to_string(min) + ", got '" + v + "'");
  return x;
}

}  // namespace moe::bench
