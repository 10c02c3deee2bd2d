// runtime/parallel.h and the forward pieces that use it: every index runs once, errors come back
// to the caller, nested regions run serially, OpenBLAS gets its thread setting back; the MoE block
// gives the same numbers on every run (the accumulation order of the experts does not depend on
// which thread ran which expert) and, to rounding, the forward gives the one-thread numbers.
#include <gtest/gtest.h>

#include <chrono>

#include <atomic>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "runtime/forward.h"
#include "runtime/moe_block.h"
#include "runtime/ops.h"
#include "runtime/parallel.h"
#include "runtime_test_util.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using runtime::MatrixRM;

// Sets the OpenBLAS (and so the forward's) thread count for a scope.
class Threads {
 public:
  explicit Threads(int n) : saved_(runtime::blas_threads()) { runtime::set_blas_threads(n); }
  ~Threads() { runtime::set_blas_threads(saved_); }

 private:
  int saved_;
};

TEST(ParallelFor, EveryIndexOnceAndTheSettingComesBack) {
  const Threads two(2);
  std::vector<std::atomic<int>> hits(1000);
  std::atomic<int> inside_blas{0};
  runtime::parallel_for(1000, [&](int64_t i) {
    hits[i].fetch_add(1);
    if (runtime::blas_threads() != 1) inside_blas.fetch_add(1);
  });
  for (size_t i = 0; i < hits.size(); ++i) ASSERT_EQ(hits[i].load(), 1) << "index " << i;
  EXPECT_EQ(inside_blas.load(), 0) << "OpenBLAS not single-threaded inside the region";
  EXPECT_EQ(runtime::blas_threads(), 2);
}

TEST(ParallelFor, NestedRegionsRunOnTheTaskThread) {
  const Threads two(2);
  std::atomic<int> elsewhere{0}, inner{0};
  runtime::parallel_for(8, [&](int64_t) {
    const auto me = std::this_thread::get_id();
    runtime::parallel_for(16, [&](int64_t) {
      inner.fetch_add(1);
      if (std::this_thread::get_id() != me) elsewhere.fetch_add(1);
    });
  });
  EXPECT_EQ(inner.load(), 8 * 16);
  EXPECT_EQ(elsewhere.load(), 0);
}

TEST(ParallelFor, TheFirstErrorReachesTheCaller) {
  const Threads two(2);
  std::atomic<int> ran{0};
  EXPECT_THROW(runtime::parallel_for(64,
                                     [&](int64_t i) {
                                       ran.fetch_add(1);
                                       if (i == 5) throw std::runtime_error("task 5");
                                     }),
               std::runtime_error);
  EXPECT_GE(ran.load(), 6);
  EXPECT_EQ(runtime::blas_threads(), 2);
  // The pool still works after a failed region.
  std::atomic<int> again{0};
  runtime::parallel_for(10, [&](int64_t) { again.fetch_add(1); });
  EXPECT_EQ(again.load(), 10);
}

// When several tasks throw, the caller gets the error of the lowest index, as a serial loop would
// throw it, whichever thread got there first: index 1 throws after a delay, so index 2's task
// (on the other thread) has thrown long before.
TEST(ParallelFor, TheLowestIndexErrorReachesTheCaller) {
  const Threads two(2);
  for (int rep = 0; rep < 20; ++rep) {
    std::string what;
    try {
      runtime::parallel_for(8, [&](int64_t i) {
        if (i == 1) {
          std::this_thread::sleep_for(std::chrono::milliseconds(2));
          throw std::runtime_error("task 1");
        }
        if (i >= 2) throw std::runtime_error("task " + std::to_string(i));
      });
    } catch (const std::runtime_error& e) {
      what = e.what();
    }
    ASSERT_EQ(what, "task 1") << "repetition " << rep;
  }
}

TEST(ParallelRows, BlocksCoverEveryRowOnce) {
  const Threads two(2);
  for (int64_t rows : {0, 1, 63, 64, 65, 1000, 4097}) {
    std::vector<std::atomic<int>> hits(static_cast<size_t>(rows));
    runtime::parallel_rows(rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) hits[r].fetch_add(1);
    });
    for (int64_t r = 0; r < rows; ++r) ASSERT_EQ(hits[r].load(), 1) << rows << " rows, row " << r;
  }
}

// Many small experts, a shared expert: on two threads the output is the same bit for bit on every
// run (the experts' order of accumulation does not depend on which thread finished first), it
// equals the one-thread output (to rounding: OpenBLAS may split the router and shared-expert GEMMs
// over its threads) and both match a per-token reference (each token through its k experts,
// weighted, plus the gated shared expert).
TEST(MoeBlock, TwoThreadsAreDeterministicAndMatchOneThread) {
  std::mt19937 g(3);
  const int64_t H = 32, I = 24, E = 16, N = 300;
  const int k = 4;
  runtime::MoeWeights w;
  w.router = random_matrix(E, H, g, 1.0f);
  for (int e = 0; e < E; ++e)
    w.experts.push_back({random_matrix(I, H, g, 0.2f), random_matrix(I, H, g, 0.2f), random_matrix(H, I, g, 0.2f)});
  w.shared = runtime::MlpWeights{random_matrix(48, H, g, 0.2f), random_matrix(48, H, g, 0.2f),
                                 random_matrix(H, 48, g, 0.2f)};
  w.shared_gate = random_matrix(1, H, g, 1.0f);
  runtime::RoutingRule rule;
  rule.family = "test";
  rule.kind = model::Routing::SoftmaxTopK;
  rule.num_experts = E;
  rule.top_k = k;
  const MatrixRM x = random_matrix(N, H, g, 1.0f);
  MatrixRM one, first;
  runtime::MoeDetail d;
  {
    const Threads t(1);
    one = runtime::moe_forward(w, rule, x, &d);
  }
  {
    const Threads t(2);
    first = runtime::moe_forward(w, rule, x);
    for (int rep = 0; rep < 8; ++rep) {
      const MatrixRM again = runtime::moe_forward(w, rule, x);
      ASSERT_TRUE(again == first) << "repeat " << rep << ": max difference " << (again - first).cwiseAbs().maxCoeff();
    }
  }
  EXPECT_LE((first - one).cwiseAbs().maxCoeff(), 1e-6 * (1 + one.cwiseAbs().maxCoeff()));
  MatrixRM ref = MatrixRM::Zero(N, H);
  const MatrixRM so = runtime::mlp_forward(*w.shared, x);
  for (int64_t n = 0; n < N; ++n) {
    for (int e = 0; e < E; ++e)
      for (int s = 0; s < k; ++s)
        if (d.routing.ids(n, s) == e) ref.row(n) += d.routing.weights(n, s) * runtime::mlp_forward(w.experts[e], x.row(n));
    ref.row(n) += 1.0f / (1.0f + std::exp(-x.row(n).dot(*w.shared_gate))) * so.row(n);
  }
  EXPECT_LE((one - ref).cwiseAbs().maxCoeff(), 1e-5 * (1 + ref.cwiseAbs().maxCoeff()));
}

// The whole forward (attention per window and head, norms, RoPE, experts) on one thread and two.
TEST(Forward, TwoThreadsMatchOneThread) {
  TempDir dir;
  synth_to(dir.path(), "qwen2_moe", {.config_patch = {{"num_experts", 8}, {"num_experts_per_tok", 4}}});
  auto lm = load_model(dir.path());
  runtime::Forward fwd(lm->model);
  std::mt19937 g(9);
  std::vector<int32_t> toks(4 * 70);
  for (auto& t : toks) t = static_cast<int32_t>(g() % fwd.spec().vocab);
  MatrixRM one, two;
  {
    const Threads t(1);
    one = fwd.run(toks, 70);
  }
  {
    const Threads t(2);
    two = fwd.run(toks, 70);
  }
  ASSERT_EQ(one.rows(), two.rows());
  EXPECT_LE((one - two).cwiseAbs().maxCoeff(), 1e-5 * (1 + one.cwiseAbs().maxCoeff()));
}

}  // namespace
}  // namespace moe::test
