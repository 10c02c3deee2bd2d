// The encodings of lib/quant and core (core/encoding.h): exact dequantization by rows, slicing,
// parts, and decoding from a native checkpoint's config entry with its errors.
#include <gtest/gtest.h>

#include <Eigen/Core>

#include "core/error.h"
#include "core/fp8_block.h"
#include "quant/lowrank.h"
#include "quant/registry.h"

namespace moe::quant {
namespace {

using core::DType;
using core::Tensor;
using nlohmann::json;
using MatrixRM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

std::shared_ptr<const Tensor> tensor(const MatrixRM& m, DType d = DType::F32) {
  std::vector<float> v(m.data(), m.data() + m.size());
  return std::make_shared<const Tensor>(Tensor::from_f32(v, {m.rows(), m.cols()}).converted(d));
}

MatrixRM ints(int64_t r, int64_t c, int seed) {  // small integers: products exact in f32
  MatrixRM m(r, c);
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) m(i, j) = static_cast<float>(((i * 7 + j * 3 + seed) % 9) - 4);
  return m;
}

TEST(LowRank, DequantizesRowsExactly) {
  const MatrixRM a = ints(6, 2, 1), b = ints(2, 5, 2), base = ints(6, 5, 3);
  const LowRank lr(tensor(a), tensor(b));
  EXPECT_EQ(lr.rows(), 6);
  EXPECT_EQ(lr.cols(), 5);
  EXPECT_EQ(lr.rank(), 2);
  const MatrixRM want = a * b;
  MatrixRM got(6, 5);
  lr.dequantize_rows(0, 6, got.data());
  EXPECT_EQ(got, want);
  MatrixRM rows(3, 5);
  lr.dequantize_rows(2, 5, rows.data());
  EXPECT_EQ(rows, want.middleRows(2, 3));
  // With a base, as a Tensor (to_f32, converted, slice0).
  const Tensor t = Tensor::encoded(std::make_shared<LowRank>(tensor(a, DType::BF16), tensor(b, DType::BF16), tensor(base)), DType::BF16);
  EXPECT_EQ(t.shape(), (core::Shape{6, 5}));
  EXPECT_EQ(t.nbytes(), (12u + 10u) * 2u + 30u * 4u);
  const std::vector<float> v = t.to_f32();
  const MatrixRM wb = want + base;
  EXPECT_EQ(v, std::vector<float>(wb.data(), wb.data() + wb.size()));
  EXPECT_EQ(t.converted(DType::F32).to_f32(), v);
  EXPECT_EQ(t.slice0(1, 3).to_f32(), std::vector<float>(v.begin() + 5, v.begin() + 15));
  EXPECT_EQ(t.stored_tensors().size(), 3u);
  const auto parts = t.encoding()->parts();
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[0].suffix, ".lr_a");
  EXPECT_EQ(parts[1].suffix, ".lr_b");
  EXPECT_EQ(parts[2].suffix, ".lr_base");
}

TEST(LowRank, RefusesFactorsThatDoNotFit) {
  EXPECT_THROW(LowRank(tensor(ints(6, 2, 1)), tensor(ints(3, 5, 2))), core::Error);          // 2 != 3
  EXPECT_THROW(LowRank(tensor(ints(4, 5, 1)), tensor(ints(5, 3, 2))), core::Error);          // rank 5 > min(4, 3)
  EXPECT_THROW(LowRank(tensor(ints(6, 2, 1)), tensor(ints(2, 5, 2)), tensor(ints(5, 6, 0))), core::Error);  // base shape
  auto codes = std::make_shared<const Tensor>(Tensor::zeros(DType::I8, {6, 2}));
  EXPECT_THROW(LowRank(codes, tensor(ints(2, 5, 2))), core::Error);  // not float
}

TEST(Registry, DecodesEntriesAndNamesWhatIsWrong) {
  const auto a = tensor(ints(6, 2, 1)), b = tensor(ints(2, 5, 2));
  std::map<std::string, StoredPart> parts = {{"a", {a, false}}, {"b", {b, true}}};
  const auto enc = decode({{"encoding", "lowrank"}, {"rank", 2}}, parts);
  ASSERT_EQ(enc->name(), "lowrank");
  EXPECT_TRUE(enc->parts()[1].shared);
  auto message = [&](const json& entry, const std::map<std::string, StoredPart>& p) {
    try {
      decode(entry, p);
    } catch (const core::Error& e) {
      EXPECT_EQ(e.kind(), core::ErrorKind::Corruption);
      return e.message();
    }
    return std::string("no error");
  };
  EXPECT_NE(message({{"encoding", "lowrnk"}, {"rank", 2}}, parts).find("unknown encoding \"lowrnk\" (known: lowrank, fp8-block"),
            std::string::npos);
  EXPECT_NE(message({{"encoding", "lowrank"}, {"rank", 3}}, parts).find("rank 3 but the factors have rank 2"), std::string::npos);
  EXPECT_NE(message({{"encoding", "lowrank"}}, parts).find("rank: expected an integer"), std::string::npos);
  EXPECT_NE(message({{"encoding", "lowrank"}, {"rank", 2}}, {{"a", {a, false}}}).find("part \"b\" missing"), std::string::npos);
  auto extra = parts;
  extra["c"] = {a, false};
  EXPECT_NE(message({{"encoding", "lowrank"}, {"rank", 2}}, extra).find("unexpected part \"c\""), std::string::npos);
  // fp8-block from its parts equals the Tensor-level construction.
  const Tensor q = Tensor::from_f32(std::vector<float>(35, 0.5f), {5, 7}).converted(DType::F8_E4M3);
  const Tensor sc = Tensor::from_f32({1, 2, 3, 4, 5, 6}, {3, 2});
  const auto f = decode({{"encoding", "fp8-block"}, {"block", {2, 4}}},
                        {{"codes", {std::make_shared<const Tensor>(q), false}}, {"scale_inv", {std::make_shared<const Tensor>(sc), false}}});
  std::vector<float> got(35);
  f->dequantize_rows(0, 5, got.data());
  EXPECT_EQ(got, q.with_block_scale(sc, 2, 4).to_f32());
}

}  // namespace
}  // namespace moe::quant
