#include "core/progress.h"

#include <unistd.h>

#include <cstdio>

namespace moe::core {

std::string format_bytes(double b) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  int u = 0;
  while (b >= 1000 && u < 4) {
    b /= 1000;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.2f %s", b, units[u]);
  return buf;
}

bool& Progress::global_quiet() {
  static bool q = false;
  return q;
}

Progress::Progress(std::string label, uint64_t total, std::string unit, bool quiet)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total), quiet_(quiet || global_quiet()),
      tty_(isatty(STDERR_FILENO) != 0), start_(std::chrono::steady_clock::now()), last_(start_) {}

Progress::~Progress() { finish(); }

void Progress::add(uint64_t n) {
  done_ += n;
  if (quiet_) return;
  auto now = std::chrono::steady_clock::now();
  const double since = std::chrono::duration<double>(now - last_).count();
  if (since >= (tty_ ? 0.2 : 5.0)) {
    last_ = now;
    print(false);
  }
}

void Progress::finish() {
  if (finished_) return;
  finished_ = true;
  if (!quiet_ && (tty_ || std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count() >= 5.0))
    print(true);
}

void Progress::print(bool final) {
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double rate = secs > 0 ? done_ / secs : 0;
  auto amount = [&](double v) {
    return unit_ == "B" ? format_bytes(v) : std::to_string(static_cast<uint64_t>(v)) + " " + unit_;
  };
  const double pct = total_ ? 100.0 * static_cast<double>(done_) / static_cast<double>(total_) : 100.0;
  const double eta = rate > 0 && total_ > done_ ? (total_ - done_) / rate : 0;
  std::fprintf(stderr, "%s%s: %s / %s (%.0f%%), %s/s, %s %.0fs%s", tty_ ? "\r" : "", label_.c_str(),
               amount(static_cast<double>(done_)).c_str(), amount(static_cast<double>(total_)).c_str(), pct,
               amount(rate).c_str(), final ? "took" : "ETA", final ? secs : eta, (tty_ && !final) ? "   " : "\n");
  std::fflush(stderr);
}

}  // namespace moe::core
