// project_in_tiles (runtime/weights.h): a weight decoded a tile of rows at a time and multiplied at
// once gives the whole conversion followed by one GEMM (up to the order OpenBLAS sums in: its
// kernels split a GEMM's columns differently from a tile's, so a few outputs differ in their last
// bits), and refuses a non-finite weight with the message of the whole conversion (the index in
// the whole tensor).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <iostream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"
#include "model/model.h"
#include "quant/delta_ternary.h"
#include "quant/intn.h"
#include "quant/lowrank.h"
#include "runtime/finite.h"
#include "runtime/ops.h"
#include "runtime/weights.h"

namespace moe::test {
namespace {

using runtime::MatrixRM;

// A bf16 weight [rows, cols] of normal values; `nan_at` (flat index, -1 none) set to NaN.
core::Tensor bf16_weight(int64_t rows, int64_t cols, uint32_t seed, int64_t nan_at = -1) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  core::Tensor t = core::Tensor::zeros(core::DType::BF16, {rows, cols});
  auto* p = reinterpret_cast<uint16_t*>(t.mutable_data());
  for (int64_t i = 0; i < rows * cols; ++i) {
    const float v = i == nan_at ? std::nanf("") : nd(rng);
    uint32_t u;
    std::memcpy(&u, &v, 4);
    p[i] = static_cast<uint16_t>(u >> 16);  // truncation: any bf16 will do
  }
  return t;
}

// The reference: the whole weight converted (runtime::to_matrix), one GEMM.
MatrixRM whole(const MatrixRM& X, const core::Tensor& W) {
  const MatrixRM w = runtime::to_matrix(W);
  MatrixRM Y(X.rows(), w.rows());
  runtime::gemm_nt(X.rows(), w.rows(), w.cols(), 1.0f, X.data(), X.cols(), w.data(), w.cols(), 0.0f, Y.data(), Y.cols());
  return Y;
}

MatrixRM tiled(const MatrixRM& X, const core::Tensor& W) {
  std::vector<float> tile;
  MatrixRM Y(X.rows(), W.dim(0));
  runtime::project_in_tiles(X.rows(), X.data(), X.cols(), W, Y.data(), Y.cols(), tile);
  // A tile holds about 2^20 values, so a weight of more rows than fit is decoded in several.
  EXPECT_LT(static_cast<int64_t>(tile.size()), W.numel()) << "the weight fit in one tile: not a test of the tiling";
  return Y;
}

std::string message(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const runtime::NonFiniteError& e) {
    return e.what();
  }
  return "(nothing thrown)";
}

MatrixRM input(int64_t n, int64_t cols) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  MatrixRM X(n, cols);
  for (int64_t i = 0; i < X.size(); ++i) X.data()[i] = nd(rng);
  return X;
}

// Every output equal to the reference within a float rounding of its dot product: |a − b| at most
// 2^-20 · Σ_k |x_k w_k| (OpenBLAS's kernels sum in single precision in blocks; a wrong row, tile
// offset or stride gives errors of the order of the values themselves).
void expect_same_products(const MatrixRM& a, const MatrixRM& b, const MatrixRM& X, const core::Tensor& W) {
  ASSERT_EQ(a.rows(), b.rows());
  ASSERT_EQ(a.cols(), b.cols());
  const MatrixRM bound = X.cwiseAbs() * runtime::to_matrix(W).cwiseAbs().transpose();
  int64_t differ = 0;
  double worst = 0;
  for (int64_t i = 0; i < a.rows(); ++i)
    for (int64_t j = 0; j < a.cols(); ++j) {
      ASSERT_LE(std::abs(a(i, j) - b(i, j)), std::ldexp(bound(i, j), -20)) << "row " << i << ", column " << j;
      differ += a(i, j) != b(i, j);
      worst = std::max(worst, double(std::abs(a(i, j) - b(i, j))) / bound(i, j));
    }
  EXPECT_GT(a.cwiseAbs().maxCoeff(), 0.1f);
  std::cout << differ << " of " << a.size() << " outputs differ in their last bits, the largest by " << worst << " of the bound\n";
}

TEST(ProjectInTiles, Bf16GivesTheProductsOfTheWholeConversion) {
  // 3,000 inputs: 320 rows a tile, so 700 rows are three tiles, the last one partial.
  const core::Tensor W = bf16_weight(700, 3000, 1);
  const MatrixRM X = input(37, 3000);
  expect_same_products(whole(X, W), tiled(X, W), X, W);
}

TEST(ProjectInTiles, EncodedInt4GivesTheProductsOfTheWholeConversion) {
  const int64_t rows = 1100, cols = 1024;  // 1,024 rows a tile: two tiles
  std::mt19937 rng(3);
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols)), zeros(static_cast<size_t>(rows * 8));
  std::vector<float> scales(static_cast<size_t>(rows * 8));
  for (auto& c : codes) c = static_cast<uint8_t>(rng() % 16);
  for (auto& z : zeros) z = static_cast<uint8_t>(rng() % 16);
  for (size_t i = 0; i < scales.size(); ++i) scales[i] = core::f16_to_f32(core::f32_to_f16(0.001f * (1 + i % 13)));
  const auto enc = quant::IntN::pack(4, 128, false, rows, cols, codes.data(), scales.data(), zeros.data());
  const core::Tensor W = core::Tensor::encoded(enc, core::DType::BF16);
  const MatrixRM X = input(19, cols);
  expect_same_products(whole(X, W), tiled(X, W), X, W);
}

TEST(ProjectInTiles, ANonFiniteWeightInALaterTileIsRefusedAsTheWholeConversionRefusesIt) {
  const int64_t bad = 650 * 3000 + 5;  // row 650: the third tile
  const core::Tensor W = bf16_weight(700, 3000, 2, bad);
  const MatrixRM X = input(4, 3000);
  const std::string expected = message([&] { runtime::to_matrix(W); });
  EXPECT_NE(expected.find("index " + std::to_string(bad) + " (row 650, column 5) of [700, 3000]"), std::string::npos) << expected;
  EXPECT_EQ(message([&] { tiled(X, W); }), expected);
  // No rows (an expert no token was routed to): still decoded and checked.
  std::vector<float> tile;
  std::vector<float> y;
  EXPECT_EQ(message([&] { runtime::project_in_tiles(0, X.data(), 3000, W, y.data(), 700, tile); }), expected);
}

// Which streamed experts run in tiles: a delta-ternary weight's row ranges decode its whole
// Rice-coded stream (Encoding::decodes_row_ranges_alone), so an expert holding one is converted
// whole, once, as are novices and experts with a projection kept low-rank; the others run in tiles.
TEST(ProjectInTiles, DeltaTernaryNoviceAndFactoredExpertsAreConvertedWhole) {
  const int64_t H = 64, I = 96;
  auto dense = [](int64_t r, int64_t c, uint32_t seed) { return bf16_weight(r, c, seed); };
  auto plain = [&](uint32_t seed) {
    model::Mlp m;
    m.gate = dense(I, H, seed), m.up = dense(I, H, seed + 1), m.down = dense(H, I, seed + 2);
    return m;
  };
  model::MoeBlock block;
  block.experts.push_back(plain(10));  // 0: bf16
  model::Mlp delta = plain(20);         // 1: down delta-ternary over a base
  const auto base = std::make_shared<const core::Tensor>(dense(H, I, 30).converted(core::DType::F32));
  delta.down = core::Tensor::encoded(quant::DeltaTernary::pack(base, {3, 70, 200}, {false, true, false}, 0.01f),
                                     core::DType::BF16);
  block.experts.push_back(delta);
  model::Mlp novice;  // 2: a novice
  novice.novice = core::Tensor::zeros(core::DType::F32, {H});
  block.experts.push_back(novice);
  model::Mlp factored = plain(40);  // 3: gate low-rank
  const auto a = std::make_shared<const core::Tensor>(dense(I, 8, 50)), b = std::make_shared<const core::Tensor>(dense(8, H, 51));
  factored.gate = core::Tensor::encoded(std::make_shared<quant::LowRank>(a, b), core::DType::BF16);
  block.experts.push_back(factored);

  runtime::MoeWeights w;
  w.source = &block;
  w.widths = {I, I, 0, I};
  EXPECT_TRUE(w.expert_in_tiles(0));
  EXPECT_FALSE(w.expert_in_tiles(1));
  EXPECT_FALSE(w.expert_in_tiles(2));
  EXPECT_TRUE(w.expert_in_tiles(3)) << "low-rank, not kept as factors: decoded in tiles like any encoding";
  w.factored = true;
  EXPECT_FALSE(w.expert_in_tiles(3));
  // The delta-ternary expert's whole conversion is its decoded weights.
  runtime::MlpWeights scratch;
  const runtime::MlpWeights& got = w.expert(1, scratch);
  EXPECT_TRUE(got.down == runtime::to_matrix(block.experts[1].down));
  EXPECT_TRUE(got.gate == runtime::to_matrix(block.experts[1].gate));
}

}  // namespace
}  // namespace moe::test
