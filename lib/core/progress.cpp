#include "core/progress.h"

#include <unistd.h>

#include <algorithm>
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

Progress::Progress(std::string label, uint64_t total, std::string unit, bool quiet, uint64_t scale)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total), scale_(scale ? scale : 1),
      quiet_(quiet || global_quiet()),
      tty_(isatty(STDERR_FILENO) != 0), start_(std::chrono::steady_clock::now()), last_(start_) {
  if (!quiet_ && tty_) print(false);  // something on the terminal before the first unit is done
}

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
    if (unit_ == "B") return format_bytes(v);
    if (scale_ > 1) {
      char buf[48];
      std::snprintf(buf, sizeof buf, "%.2f", v / static_cast<double>(scale_));
      return std::string(buf) + " " + unit_;
    }
    return std::to_string(static_cast<uint64_t>(v)) + " " + unit_;
  };
  // Rates below 10 per second keep two significant decimals ("0.42 layers/s", not "0 layers/s").
  auto rate_text = [&](double v) {
    const double u = v / static_cast<double>(scale_);
    if (unit_ == "B" || u >= 10) return scale_ > 1 ? std::to_string(static_cast<uint64_t>(u)) + " " + unit_ : amount(v);
    char buf[32];
    std::snprintf(buf, sizeof buf, u >= 1 ? "%.1f" : "%.2f", u);
    return std::string(buf) + " " + unit_;
  };
  const double pct = total_ ? 100.0 * static_cast<double>(done_) / static_cast<double>(total_) : 100.0;
  const double eta = rate > 0 && total_ > done_ ? (total_ - done_) / rate : 0;
  std::string bar;
  if (tty_) {  // [#########...........]
    const int filled = static_cast<int>(pct / 5.0);
    bar = "[" + std::string(static_cast<size_t>(std::clamp(filled, 0, 20)), '#') +
          std::string(static_cast<size_t>(20 - std::clamp(filled, 0, 20)), '.') + "] ";
  }
  const bool eta_known = final || done_ > 0;
  char eta_text[48];
  if (eta_known) std::snprintf(eta_text, sizeof eta_text, "%s %.0fs", final ? "took" : "ETA", final ? secs : eta);
  else std::snprintf(eta_text, sizeof eta_text, "ETA ?");
  std::fprintf(stderr, "%s%s: %s%s / %s (%.0f%%), %s/s, %s%s", tty_ ? "\r" : "", label_.c_str(), bar.c_str(),
               amount(static_cast<double>(done_)).c_str(), amount(static_cast<double>(total_)).c_str(), pct,
               rate_text(rate).c_str(), eta_text, (tty_ && !final) ? "   " : "\n");
  std::fflush(stderr);
}

}  // namespace moe::core
