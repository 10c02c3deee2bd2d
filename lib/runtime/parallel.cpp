#include "runtime/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "runtime/ops.h"

namespace moe::runtime {

namespace {

thread_local bool t_in_region = false;

// Workers wait for a new generation; the first `wanted` of them take part in it if they wake
// before the caller has closed it. The caller closes a generation once every index is taken and
// waits for the workers that joined it; the next generation starts only after that.
class Pool {
 public:
  void run(int threads, int64_t n, const std::function<void(int64_t)>& fn) {
    const int helpers = threads - 1;
    {
      std::unique_lock lk(m_);
      while (static_cast<int>(workers_.size()) < helpers) {
        const int id = static_cast<int>(workers_.size());
        workers_.emplace_back([this, id] { loop(id); });
        workers_.back().detach();
      }
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      failed_at_.store(kNone);
      err_ = nullptr;
      wanted_ = helpers;
      closed_ = false;
      ++generation_;
    }
    start_.notify_all();
    work();
    // Every index is taken. Close the region: a worker that has not woken yet (the machine may be
    // busy) skips it instead of being waited for; those that joined are waited for.
    std::unique_lock lk(m_);
    closed_ = true;
    done_.wait(lk, [&] { return active_ == 0; });
    fn_ = nullptr;
    if (err_) std::rethrow_exception(err_);
  }

 private:
  void work() {
    for (;;) {
      const int64_t i = next_.fetch_add(1);
      if (i >= n_) return;
      // After a failure the later indices are skipped; an earlier one still runs, and the error
      // of the lowest index that fails is the one thrown (the same whichever thread ran first).
      if (i > failed_at_.load()) continue;
      try {
        (*fn_)(i);
      } catch (...) {
        std::lock_guard g(m_);
        if (i < failed_at_.load()) {
          err_ = std::current_exception();
          failed_at_.store(i);
        }
      }
    }
  }

  void loop(int id) {
    t_in_region = true;  // a task's own parallel_for calls run serially
    uint64_t seen = 0;
    std::unique_lock lk(m_);
    for (;;) {
      start_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (id >= wanted_ || closed_) continue;
      ++active_;
      lk.unlock();
      work();
      lk.lock();
      if (--active_ == 0) done_.notify_all();
    }
  }

  std::mutex m_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;  // detached; the pool lives until the process ends
  uint64_t generation_ = 0;
  int wanted_ = 0, active_ = 0;
  bool closed_ = false;  // the caller has finished the current generation
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  static constexpr int64_t kNone = INT64_MAX;
  std::atomic<int64_t> failed_at_{kNone};  // the lowest index whose task threw
  std::exception_ptr err_;
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: detached workers may still wait on it at exit
  return *p;
}

std::mutex g_region;  // one region at a time; a second caller runs its loop serially

}  // namespace

int parallel_threads() { return std::max(1, blas_threads()); }

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  const int threads = t_in_region ? 1 : static_cast<int>(std::min<int64_t>(parallel_threads(), n));
  std::unique_lock region(g_region, std::defer_lock);
  if (threads < 2 || !region.try_lock()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  const int blas = blas_threads();
  set_blas_threads(1);
  t_in_region = true;
  try {
    pool().run(threads, n, fn);
  } catch (...) {
    t_in_region = false;
    set_blas_threads(blas);
    throw;
  }
  t_in_region = false;
  set_blas_threads(blas);
}

void parallel_rows(int64_t rows, int64_t min_rows, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t blocks = std::clamp<int64_t>(rows / std::max<int64_t>(1, min_rows), 1, 4 * parallel_threads());
  const int64_t step = (rows + blocks - 1) / blocks;
  parallel_for(blocks, [&](int64_t b) {
    const int64_t r0 = b * step, r1 = std::min(rows, r0 + step);
    if (r0 < r1) fn(r0, r1);
  });
}

}  // namespace moe::runtime
