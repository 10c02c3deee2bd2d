// Progress on stderr: a single updating line with rate and ETA when stderr is a TTY, plain lines
// every few seconds otherwise; nothing when quiet.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace moe::core {

class Progress {
 public:
  // `unit`: "B" formats amounts as bytes (KB/MB/GB); anything else is printed after the count.
  // `scale` > 1: amounts are counted in 1/scale of a unit (e.g. 100: a layer in steps of 1/100)
  // and shown with two decimals, so work inside a unit shows before the unit is done; total and
  // add() are in those parts.
  Progress(std::string label, uint64_t total, std::string unit, bool quiet, uint64_t scale = 1);
  ~Progress();
  void add(uint64_t n);
  void finish();
  static bool& global_quiet();  // set by --quiet

 private:
  void print(bool final);
  std::string label_, unit_;
  uint64_t total_, done_ = 0, scale_ = 1;
  bool quiet_, tty_, finished_ = false;
  std::chrono::steady_clock::time_point start_, last_;
};

std::string format_bytes(double bytes);

}  // namespace moe::core
