#include "io/temp_files.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>

namespace moe::io {

namespace {

constexpr int kSlots = 64;
constexpr size_t kPathMax = 4096;

struct Slot {
  std::atomic<bool> used{false};
  char path[kPathMax] = {};
};
Slot g_slots[kSlots];
std::mutex g_mutex;  // registration only (never taken in the handler)
std::once_flag g_install;

// Removes the entries of the open directory fd, then nothing else (the caller removes the folder).
// Only system calls: open/getdents64/unlinkat/close are async-signal-safe.
void remove_tree_at(int dirfd, int depth) {
  if (depth > 8) return;
  alignas(8) char buf[4096];
  for (;;) {
    const long n = syscall(SYS_getdents64, dirfd, buf, sizeof buf);
    if (n <= 0) return;
    bool removed_any = false;
    for (long off = 0; off < n;) {
      struct Ent {
        uint64_t ino;
        int64_t off;
        unsigned short reclen;
        unsigned char type;
        char name[1];
      };
      const Ent* e = reinterpret_cast<const Ent*>(buf + off);
      off += e->reclen;
      const char* nm = e->name;
      if ((nm[0] == '.' && nm[1] == 0) || (nm[0] == '.' && nm[1] == '.' && nm[2] == 0)) continue;
      if (unlinkat(dirfd, nm, 0) == 0) {
        removed_any = true;
        continue;
      }
      const int sub = openat(dirfd, nm, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (sub >= 0) {
        remove_tree_at(sub, depth + 1);
        close(sub);
      }
      if (unlinkat(dirfd, nm, AT_REMOVEDIR) == 0) removed_any = true;
    }
    if (removed_any) lseek(dirfd, 0, SEEK_SET);  // entries moved: read the folder again from the start
  }
}

void remove_path_signal_safe(const char* p) {
  if (unlink(p) == 0) return;
  const int fd = open(p, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return;
  remove_tree_at(fd, 0);
  close(fd);
  rmdir(p);
}

void on_signal(int sig) {
  for (auto& s : g_slots)
    if (s.used.load(std::memory_order_acquire)) remove_path_signal_safe(s.path);
  signal(sig, SIG_DFL);
  raise(sig);
}

void install_handlers() {
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
    struct sigaction old {};
    sigaction(sig, nullptr, &old);
    if (old.sa_handler == SIG_IGN) continue;  // e.g. nohup: keep ignoring
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    sigaction(sig, &sa, nullptr);
  }
}

bool process_alive(long pid) {
  if (pid <= 0) return true;  // not ours to judge
  if (kill(static_cast<pid_t>(pid), 0) == 0) return true;
  return errno != ESRCH;  // EPERM: alive, another user's
}

}  // namespace

std::string temp_prefix(const std::string& name, bool hidden) {
  return (hidden ? "." : "") + name + ".moe-tool-tmp-";
}

fs::path temp_name(const fs::path& dir, const std::string& name, bool hidden) {
  static std::atomic<uint64_t> counter{0};
  const uint64_t t = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  const uint64_t nonce = (t ^ (counter.fetch_add(1) * 0x9E3779B97F4A7C15ull)) & 0xffffffffull;
  char buf[32];
  std::snprintf(buf, sizeof buf, "%08llx", static_cast<unsigned long long>(nonce));
  return dir / (temp_prefix(name, hidden) + std::to_string(getpid()) + "-" + buf);
}

int register_temp(const fs::path& path) {
  std::call_once(g_install, install_handlers);
  const std::string s = fs::absolute(path).string();
  if (s.size() + 1 > kPathMax) return -1;
  std::lock_guard<std::mutex> lock(g_mutex);
  for (int i = 0; i < kSlots; ++i) {
    if (g_slots[i].used.load(std::memory_order_acquire)) continue;
    std::memcpy(g_slots[i].path, s.c_str(), s.size() + 1);
    g_slots[i].used.store(true, std::memory_order_release);
    return i;
  }
  return -1;
}

void unregister_temp(int slot) {
  if (slot < 0 || slot >= kSlots) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_slots[slot].used.store(false, std::memory_order_release);
}

std::vector<fs::path> remove_stale_temps(const fs::path& dir, const std::string& prefix) {
  std::vector<fs::path> removed;
  std::error_code ec;
  fs::directory_iterator it(dir.empty() ? fs::path(".") : dir, ec), end;
  for (; !ec && it != end; it.increment(ec)) {
    const std::string n = it->path().filename().string();
    if (n.compare(0, prefix.size(), prefix) != 0) continue;
    // PID-NONCE (optionally followed by ".old" from a replaced folder).
    const std::string rest = n.substr(prefix.size());
    const auto dash = rest.find('-');
    if (dash == std::string::npos || dash == 0) continue;
    long pid = 0;
    try {
      pid = std::stol(rest.substr(0, dash));
    } catch (...) {
      continue;
    }
    if (process_alive(pid)) continue;
    std::error_code rec;
    fs::remove_all(it->path(), rec);
    if (!rec) removed.push_back(it->path());
  }
  return removed;
}

}  // namespace moe::io
