// The machine's measured sgemm rate, the yardstick the forward benchmarks report against:
// cblas_sgemm on square n x n f32 matrices, best of `reps` runs after one warm-up.
#pragma once

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <vector>

namespace moe::bench {

// GFLOP/s of one n x n x n sgemm.
inline double sgemm_gflops(int n, int reps) {
  using Clock = std::chrono::steady_clock;
  std::vector<float> A(size_t(n) * n), B(size_t(n) * n), C(size_t(n) * n);
  std::mt19937 g(1);
  std::uniform_real_distribution<float> d(-1, 1);
  for (auto* v : {&A, &B})
    for (auto& x : *v) x = d(g);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, A.data(), n, B.data(), n, 0.0f, C.data(), n);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, A.data(), n, B.data(), n, 0.0f, C.data(),
                n);
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return 2.0 * double(n) * n * n / best / 1e9;
}

}  // namespace moe::bench
