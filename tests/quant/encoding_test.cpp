// The encodings of lib/quant and core (core/encoding.h): exact dequantization by rows, slicing,
// parts, and decoding from a native checkpoint's config entry with its errors.
#include <gtest/gtest.h>

#include <Eigen/Core>
#include <cmath>

#include "core/error.h"
#include "core/fp8_block.h"
#include "passes/delta_ternary.h"
#include "quant/delta_ternary.h"
#include "quant/lowrank.h"
#include "quant/codec.h"
#include "quant/registry.h"
#include "support/expect_error.h"

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
  // gguf-TYPE (a ggml codec's blocks): the bytes back as they were, and what is wrong named.
  {
    std::vector<float> x(2 * 256);
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i)) * 0.1f;
    const auto enc4k = rtn(x.data(), 2, 256, parse_codec("q4_k"));
    ASSERT_EQ(enc4k->name(), "gguf-q4_k");
    json entry = enc4k->params();
    entry["encoding"] = "gguf-q4_k";
    const std::map<std::string, StoredPart> blocks = {{"blocks", {enc4k->parts()[0].tensor, false}}};
    const auto back = decode(entry, blocks);
    EXPECT_EQ(back->dtype_rule(), core::Encoding::DtypeRule::Keep);
    std::vector<float> y0(512), y1(512);
    enc4k->dequantize_rows(0, 2, y0.data());
    back->dequantize_rows(0, 2, y1.data());
    EXPECT_EQ(y0, y1);
    json wrong = entry;
    wrong["cols"] = 512;
    EXPECT_NE(message(wrong, blocks).find("gguf-q4_k: blocks: expected U8 [rows, 288]"), std::string::npos) << message(wrong, blocks);
    wrong = entry;
    wrong["type"] = "q6_k";
    EXPECT_NE(message(wrong, blocks).find("gguf-q4_k: type: expected \"q4_k\""), std::string::npos);
    wrong["cols"] = 100;
    wrong["type"] = "q4_k";
    EXPECT_NE(message(wrong, blocks).find("rows of 100 values in blocks of 256"), std::string::npos);
  }
  // fp8-block from its parts equals the Tensor-level construction.
  const Tensor q = Tensor::from_f32(std::vector<float>(35, 0.5f), {5, 7}).converted(DType::F8_E4M3);
  const Tensor sc = Tensor::from_f32({1, 2, 3, 4, 5, 6}, {3, 2});
  const auto f = decode({{"encoding", "fp8-block"}, {"block", {2, 4}}},
                        {{"codes", {std::make_shared<const Tensor>(q), false}}, {"scale_inv", {std::make_shared<const Tensor>(sc), false}}});
  std::vector<float> got(35);
  f->dequantize_rows(0, 5, got.data());
  EXPECT_EQ(got, q.with_block_scale(sc, 2, 4).to_f32());
}

// The delta-ternary encoding (quant/delta_ternary.h) and the sparse delta of the delta-ternary
// method (passes/delta_ternary.h): the stream's bit layout on a hand-made case, exact decoding,
// density 1 on exact ternary deltas giving W back exactly, the max_error rule, and corrupt parts.
MatrixRM dt_decoded(const core::Encoding& e) {
  MatrixRM out(e.rows(), e.cols());
  e.dequantize_rows(0, e.rows(), out.data());
  return out;
}

MatrixRM dt_base23() {
  MatrixRM b(2, 3);
  b << 0.5f, -1.0f, 2.0f, 0.0f, 0.25f, -0.75f;
  return b;
}

TEST(DeltaTernary, HandMadeStreamDecodesToBasePlusSignedScale) {
  // Kept positions 1 (+) and 5 (−): gaps 1 and 3. Rice k = 0 needs 3 + 5 bits, k = 1 needs 3 + 4,
  // k = 2 needs 4 + 4: k = 1. Bits, LSB first: [0 | 1 | 0] [1 0 | 1 | 1] = 0b1101010 = 106.
  const auto enc = DeltaTernary::pack(tensor(dt_base23()), {1, 5}, {false, true}, 0.25f);
  EXPECT_EQ(enc->rice_k(), 1);
  EXPECT_EQ(enc->nnz(), 2);
  const auto parts = enc->parts();
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[0].role, "base");
  EXPECT_TRUE(parts[0].shared);
  ASSERT_EQ(parts[1].tensor->numel(), 1);
  EXPECT_EQ(parts[1].tensor->data()[0], 106);
  MatrixRM want = dt_base23();
  want(0, 1) += 0.25f;
  want(1, 2) -= 0.25f;
  EXPECT_TRUE(dt_decoded(*enc) == want) << dt_decoded(*enc);
  // Row ranges decode the same rows.
  MatrixRM row1(1, 3);
  enc->dequantize_rows(1, 2, row1.data());
  EXPECT_TRUE(row1 == want.row(1)) << row1;

  // Read back from a config entry and its parts, as a checkpoint gives them.
  const json entry = {{"encoding", "delta-ternary"}, {"nnz", 2}, {"rice_k", 1}};
  std::map<std::string, StoredPart> stored = {
      {"base", {parts[0].tensor, true}}, {"stream", {parts[1].tensor, false}}, {"scale", {parts[2].tensor, false}}};
  const auto back = decode(entry, stored);
  EXPECT_EQ(back->name(), "delta-ternary");
  EXPECT_TRUE(dt_decoded(*back) == want);
}

TEST(DeltaTernary, DensityOneOnExactTernaryDeltasGivesTheWeightBack) {
  MatrixRM base(4, 6), t(4, 6);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 6; ++j) {
      base(i, j) = static_cast<float>((i * 5 + j * 3) % 11 - 5) / 64.0f;
      t(i, j) = static_cast<float>((i + 2 * j) % 3 - 1);  // −1, 0, +1
    }
  const float s = 0.0625f;
  const MatrixRM w = base + s * t;
  const passes::SparseDelta d = passes::sparse_delta(w, base, 1.0, -1.0);
  EXPECT_EQ(static_cast<int64_t>(d.positions.size()), (t.array() != 0).count());
  EXPECT_EQ(d.scale, s);
  EXPECT_EQ(d.rel_error, 0.0);
  const auto enc = DeltaTernary::pack(tensor(base), d.positions, d.negative, d.scale);
  EXPECT_TRUE(dt_decoded(*enc) == w) << dt_decoded(*enc) - w;

  // Density 0.25 keeps the 6 largest |delta| (all equal here: the lowest flat indices).
  const passes::SparseDelta q = passes::sparse_delta(w, base, 0.25, -1.0);
  ASSERT_EQ(q.positions.size(), 6u);
  EXPECT_EQ(q.scale, s);
  EXPECT_GT(q.rel_error, 0.0);
}

TEST(DeltaTernary, MaxErrorPicksTheSmallestSufficientDensity) {
  MatrixRM base = MatrixRM::Zero(1, 4), w(1, 4);
  w << 4.0f, 0.0f, 1.0f, -1.0f;  // ‖W‖ = √18
  // m = 1: s = 4, residual 1 + 1 = 2 → error √(2/18) = 1/3. m = 2 (ties: lower index): s = 2.5,
  // 1.5² + 1.5² + 1 = 5.5 → 0.553. m = 3: s = 2, 4 + 1 + 1 = 6 → 0.577 (error not monotone in m).
  const passes::SparseDelta a = passes::sparse_delta(w, base, 0, 0.34);
  ASSERT_EQ(a.positions.size(), 1u);
  EXPECT_EQ(a.positions[0], 0);
  EXPECT_EQ(a.scale, 4.0f);
  EXPECT_NEAR(a.rel_error, 1.0 / 3.0, 1e-12);
  EXPECT_TRUE(a.reached);
  const passes::SparseDelta b = passes::sparse_delta(w, base, 0, 0.3);  // no m reaches it: the least error, m = 1
  EXPECT_EQ(b.positions.size(), 1u);
  EXPECT_NEAR(b.rel_error, 1.0 / 3.0, 1e-12);
  EXPECT_FALSE(b.reached);
  const passes::SparseDelta c = passes::sparse_delta(w, base, 0, 0.6);  // m = 1 already
  EXPECT_EQ(c.positions.size(), 1u);
  const passes::SparseDelta d = passes::sparse_delta(w, base, 1.0, -1.0);  // density 1: every nonzero delta
  EXPECT_EQ(d.positions, (std::vector<int64_t>{0, 2, 3}));
  EXPECT_EQ(d.negative, (std::vector<bool>{false, false, true}));
  EXPECT_NEAR(d.rel_error, std::sqrt(6.0 / 18.0), 1e-12);
}

TEST(DeltaTernary, CorruptPartsAreRefusedNamingThePart) {
  const auto enc = DeltaTernary::pack(tensor(dt_base23()), {1, 5}, {false, true}, 0.25f);
  const auto parts = enc->parts();
  std::map<std::string, StoredPart> stored = {
      {"base", {parts[0].tensor, true}}, {"stream", {parts[1].tensor, false}}, {"scale", {parts[2].tensor, false}}};
  // More entries than the stream's bits can hold at the least (k + 2 each): refused when built.
  test::expect_error([&] { decode({{"encoding", "delta-ternary"}, {"nnz", 3}, {"rice_k", 1}}, stored); },
                     core::ErrorKind::Corruption, {"delta-ternary part stream: 1 bytes cannot hold nnz 3"});
  // Bits enough for the count, not for the gaps: refused when decoded, naming the origin the
  // checkpoint reader gave (the file and the weight).
  auto ones = stored;
  core::Tensor st = core::Tensor::zeros(core::DType::U8, {1});
  st.mutable_data()[0] = 0xff;  // one entry at k 0: a unary quotient that never ends
  ones["stream"].tensor = std::make_shared<const core::Tensor>(std::move(st));
  const auto endless = decode({{"encoding", "delta-ternary"}, {"nnz", 1}, {"rice_k", 0}}, ones, "m/model.safetensors: weight w");
  MatrixRM out(2, 3);
  test::expect_error([&] { endless->dequantize_rows(0, 2, out.data()); }, core::ErrorKind::Corruption,
                     {"m/model.safetensors: weight w: delta-ternary part stream: a gap longer than the weight"});
  test::expect_error([&] { decode({{"encoding", "delta-ternary"}, {"nnz", 7}, {"rice_k", 1}}, stored); },
                     core::ErrorKind::Corruption, {"nnz 7 outside [0, 6]"});
  test::expect_error([&] { decode({{"encoding", "delta-ternary"}, {"nnz", 2}, {"rice_k", 31}}, stored); },
                     core::ErrorKind::Corruption, {"rice_k"});
  auto bad_scale = stored;
  bad_scale["scale"].tensor = tensor(MatrixRM::Constant(1, 1, -1.0f));
  test::expect_error([&] { decode({{"encoding", "delta-ternary"}, {"nnz", 2}, {"rice_k", 1}}, bad_scale); },
                     core::ErrorKind::Corruption, {"delta-ternary part scale"});
  auto no_stream = stored;
  no_stream.erase("stream");
  test::expect_error([&] { decode({{"encoding", "delta-ternary"}, {"nnz", 2}, {"rice_k", 1}}, no_stream); },
                     core::ErrorKind::Corruption, {"part \"stream\" missing"});
  // A NaN delta is bad input.
  MatrixRM w = dt_base23();
  w(0, 0) = std::nanf("");
  test::expect_error([&] { passes::sparse_delta(w, dt_base23(), 0.5, -1.0); }, core::ErrorKind::InvalidArgument, {"not finite"});
}

}  // namespace
}  // namespace moe::quant
