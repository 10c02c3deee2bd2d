// Expert-aware smoothing scales (passes/smooth.h) against a hand computation, and the router
// re-fit: it restores top-k agreement a distortion of the inputs broke, and leaves the router as
// it was when the inputs did not change.
#include <gtest/gtest.h>

#include <random>

#include "passes/pass_test_util.h"
#include "passes/smooth.h"

namespace moe::passes {
namespace {

using testing::random_matrix;
using testing::softmax_rule;

TEST(Smoothing, ScalesEqualAHandComputation) {
  // x [3, 3]: channel 2 never active.
  MatrixRM x(3, 3);
  x << 1, -4, 0,  //
      2, 1, 0,    //
      0.5, 16, 0;
  MatrixRM expert(2, 3);  // stacked gate and up rows of an expert routed tokens 0 and 1
  expert << 2, 1, 5,      //
      -1, 0.5, 0;
  MatrixRM router(2, 3);  // reads every token
  router << 0.5, 1, 3,    //
      0.25, -1, 0;
  MatrixRM unused(1, 3);  // an expert no token reached: no term
  unused << 100, 100, 100;
  const std::vector<int32_t> routed = {0, 1}, none = {};
  const std::vector<SmoothReader> readers = {{&expert, &routed}, {&router, nullptr}, {&unused, &none}};
  // alpha 0.5: channel 0 max(sqrt(2)/sqrt(2), sqrt(2)/sqrt(0.5)) = 2; channel 1 max(sqrt(4)/sqrt(1),
  // sqrt(16)/sqrt(1)) = 4; channel 2: no active input, 1.
  EXPECT_EQ(smoothing_scales(x, readers, 0.5), (std::vector<double>{2, 4, 1}));
  // alpha 1: the largest |x| a reader sees, 2 and 16; alpha 0: 1 / the smallest column maximum.
  EXPECT_EQ(smoothing_scales(x, readers, 1.0), (std::vector<double>{2, 16, 1}));
  // Channel 2 again has no term: its input is never active, whatever the weights.
  EXPECT_EQ(smoothing_scales(x, readers, 0.0), (std::vector<double>{2, 1, 1}));
  // Rounded to the nearest power of two in log2: 3 -> 4, 2.5 -> 2.
  MatrixRM one(1, 1), w(1, 1);
  w << 1;
  one << 3;
  EXPECT_EQ(smoothing_scales(one, {{&w, nullptr}}, 1.0), std::vector<double>{4});
  one << 2.5;
  EXPECT_EQ(smoothing_scales(one, {{&w, nullptr}}, 1.0), std::vector<double>{2});
}

TEST(Smoothing, TopkSetAgreementIgnoresOrder) {
  runtime::IndexMatrix a(3, 2), b(3, 2);
  a << 0, 1, 2, 3, 1, 2;
  b << 1, 0, 2, 1, 1, 2;
  EXPECT_DOUBLE_EQ(topk_set_agreement(a, b), 2.0 / 3.0);
}

TEST(RouterAlignment, RestoresAgreementADistortionBroke) {
  std::mt19937_64 rng(7);
  const int E = 6, H = 12, N = 600;
  const MatrixRM r0 = random_matrix(E, H, rng);
  const MatrixRM xr = random_matrix(N, H, rng);
  // The "quantized" inputs: a fixed linear distortion of the reference ones.
  const MatrixRM m = MatrixRM::Identity(H, H) + random_matrix(H, H, rng, 0.35f);
  const MatrixRM xq = xr * m;
  const auto keep = [](const MatrixRM& w) { return w; };
  // A linear distortion is undone exactly by R' = R0 M⁻ᵀ: with almost no ridge the fit finds it.
  const RouterFit exact = fit_router(r0, r0, nullptr, softmax_rule(E, 2), xq, xr, 1e-9, keep);
  EXPECT_LT(exact.before, 0.8);
  EXPECT_GT(exact.after, 0.99);
  EXPECT_EQ(exact.tokens, N);
  // The pass's ridge (toward the current router) still wins most of it back.
  const RouterFit f = fit_router(r0, r0, nullptr, softmax_rule(E, 2), xq, xr, 1e-3, keep);
  EXPECT_EQ(f.before, exact.before);
  EXPECT_GT(f.after, f.before + 0.1);
}

TEST(RouterAlignment, UnchangedInputsLeaveTheRouter) {
  std::mt19937_64 rng(8);
  const int E = 6, H = 12, N = 400;
  const MatrixRM r0 = random_matrix(E, H, rng), x = random_matrix(N, H, rng);
  const RouterFit f = fit_router(r0, r0, nullptr, softmax_rule(E, 2), x, x, 1e-3, [](const MatrixRM& w) { return w; });
  EXPECT_EQ(f.before, 1.0);
  EXPECT_EQ(f.after, 1.0);  // not a rise: the caller keeps the router
  EXPECT_LT((f.router - r0).cwiseAbs().maxCoeff(), 1e-4f);
}

}  // namespace
}  // namespace moe::passes
