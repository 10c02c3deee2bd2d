// Runs a command as a child process and measures it: wall time, peak RSS (getrusage of the child,
// so the benchmark's own memory is not counted) and exit status. stdout goes to /dev/null; stderr
// is inherited, or written to a file (run_child's `stderr_path`).
#pragma once

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

namespace moe::bench {

struct ChildResult {
  double seconds = 0;
  long max_rss_kb = 0;
  int status = -1;          // exit status, -1 when killed
  int signal = 0;           // the signal that killed the child (SIGKILL: e.g. the OOM killer), else 0
  double cpu_seconds = 0;   // user + system time of the child (robust to a loaded machine)
};

// `stderr_path` non-empty: the child's stderr goes to that file (created or truncated).
inline ChildResult run_child(const std::vector<std::string>& args, const std::string& stderr_path = {}) {
  const auto t0 = std::chrono::steady_clock::now();
  pid_t pid = fork();
  if (pid == 0) {
    FILE* null = std::fopen("/dev/null", "w");
    if (null) dup2(fileno(null), STDOUT_FILENO);
    if (!stderr_path.empty()) {
      FILE* err = std::fopen(stderr_path.c_str(), "w");
      if (!err) _exit(127);
      dup2(fileno(err), STDERR_FILENO);
    }
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execvp(argv[0], argv.data());
    _exit(127);
  }
  int status = 0;
  struct rusage ru {};
  wait4(pid, &status, 0, &ru);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double cpu = static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                     1e-6 * static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
  return {secs, ru.ru_maxrss, WIFEXITED(status) ? WEXITSTATUS(status) : -1, WIFSIGNALED(status) ? WTERMSIG(status) : 0,
          cpu};
}

// The median of timings (the mean of the middle two for an even count; 0 for none): on a machine
// whose page costs vary from run to run, the figure to read beside the best.
inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0 : n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Writes every dirty page out (`sync`), then with `drop` empties the page cache (3 into
// /proc/sys/vm/drop_caches: root only) so the next timing reads its input from the disk. Returns
// whether the cache was dropped.
inline bool settle_page_cache(bool drop) {
  run_child({"sync"});
  if (!drop) return false;
  std::ofstream f("/proc/sys/vm/drop_caches");
  f << "3\n";
  f.flush();
  return static_cast<bool>(f);
}

}  // namespace moe::bench
