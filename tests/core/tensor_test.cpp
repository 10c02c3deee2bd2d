#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/fp8_block.h"
#include "core/tensor.h"

namespace moe::core {
namespace {

TEST(Shape, NumelAndText) {
  EXPECT_EQ(shape_numel({}), 1);
  EXPECT_EQ(shape_numel({0}), 0);
  EXPECT_EQ(shape_numel({3, 0, 5}), 0);
  EXPECT_EQ(shape_numel({4, 32, 16}), 2048);
  EXPECT_EQ(shape_str({}), "[]");
  EXPECT_EQ(shape_str({8, 128}), "[8, 128]");
}

TEST(Shape, RejectsNegativeAndOverflow) {
  try {
    shape_numel({4, -1});
    ADD_FAILURE() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Corruption);
    EXPECT_NE(e.message().find("negative"), std::string::npos) << e.message();
  }
  EXPECT_THROW(shape_numel({int64_t{1} << 40, int64_t{1} << 40}), Error);
  EXPECT_THROW(shape_numel({int64_t{1} << 31, int64_t{1} << 31, 2}), Error);
  EXPECT_EQ(shape_numel({int64_t{1} << 31, int64_t{1} << 31}), int64_t{1} << 62);
  // A zero dimension makes any product fine.
  EXPECT_EQ(shape_numel({int64_t{1} << 62, 0, int64_t{1} << 62}), 0);
}

TEST(Tensor, ZerosFromF32AndConvert) {
  Tensor z = Tensor::zeros(DType::BF16, {2, 3});
  EXPECT_EQ(z.numel(), 6);
  EXPECT_EQ(z.nbytes(), 12u);
  EXPECT_TRUE(z.owns_data());
  for (size_t i = 0; i < z.nbytes(); ++i) EXPECT_EQ(z.data()[i], 0);

  Tensor f = Tensor::from_f32({1.0f, -2.0f, 0.5f, 3.0f}, {2, 2});
  EXPECT_EQ(f.dtype(), DType::F32);
  EXPECT_EQ(f.to_f32(), (std::vector<float>{1.0f, -2.0f, 0.5f, 3.0f}));
  Tensor b = f.converted(DType::BF16);
  EXPECT_EQ(b.dtype(), DType::BF16);
  EXPECT_EQ(b.shape(), (Shape{2, 2}));
  uint16_t raw[4];
  std::memcpy(raw, b.data(), 8);
  EXPECT_EQ(raw[0], 0x3f80);
  EXPECT_EQ(raw[1], 0xc000);
  EXPECT_EQ(raw[2], 0x3f00);
  EXPECT_EQ(raw[3], 0x4040);
  EXPECT_EQ(b.to_f32(), f.to_f32());
  // Same dtype: the same bytes, no copy.
  EXPECT_EQ(f.converted(DType::F32).data(), f.data());
  EXPECT_THROW(Tensor::from_f32({1.0f, 2.0f}, {3}), Error);
}

TEST(Tensor, Slice0AndReshape) {
  std::vector<float> v(12);
  for (int i = 0; i < 12; ++i) v[i] = static_cast<float>(i);
  Tensor t = Tensor::from_f32(v, {4, 3});
  Tensor s = t.slice0(1, 3);
  EXPECT_EQ(s.shape(), (Shape{2, 3}));
  EXPECT_FALSE(s.owns_data());
  EXPECT_EQ(s.data(), t.data() + 12);
  EXPECT_EQ(s.to_f32(), (std::vector<float>{3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(t.slice0(4, 4).numel(), 0);
  EXPECT_THROW(t.slice0(3, 5), Error);
  EXPECT_THROW(t.slice0(2, 1), Error);
  EXPECT_THROW(t.slice0(-1, 1), Error);
  EXPECT_THROW(s.mutable_data(), Error);

  Tensor r = t.reshaped({2, 2, 3});
  EXPECT_EQ(r.shape(), (Shape{2, 2, 3}));
  EXPECT_EQ(r.data(), t.data());
  Tensor r2 = r.reshaped({4, 3}).slice0(3, 4);
  EXPECT_EQ(r2.to_f32(), (std::vector<float>{9, 10, 11}));
  EXPECT_THROW(t.reshaped({5, 3}), Error);
}

TEST(Tensor, ViewKeepsOwnerAlive) {
  auto buf = std::make_shared<std::vector<uint8_t>>(8, 0);
  (*buf)[0] = 0x80;
  (*buf)[1] = 0x3f;
  Tensor t(DType::BF16, {4}, buf->data(), std::shared_ptr<const void>(buf, buf->data()));
  buf.reset();
  EXPECT_EQ(t.to_f32()[0], 1.0f);
}

TEST(Error, FramesAndExitCodes) {
  Error e = Error::corruption("bad");
  e.with_frame("tensor x").with_frame("file.safetensors");
  EXPECT_EQ(e.message(), "file.safetensors: tensor x: bad");
  EXPECT_STREQ(e.what(), "file.safetensors: tensor x: bad");
  EXPECT_EQ(e.exit_code(), 2);
  EXPECT_EQ(Error::internal("x").exit_code(), 1);
  for (auto k : {ErrorKind::InvalidArgument, ErrorKind::NotFound, ErrorKind::Corruption, ErrorKind::IOError,
                 ErrorKind::NotSupported})
    EXPECT_EQ(Error(k, "m").exit_code(), 2);
  try {
    with_context("outer", [] { throw Error::not_found("inner"); });
    ADD_FAILURE();
  } catch (const Error& x) {
    EXPECT_EQ(x.message(), "outer: inner");
    EXPECT_EQ(x.kind(), ErrorKind::NotFound);
  }
  EXPECT_EQ(with_context("ctx", [] { return 42; }), 42);
}

TEST(BlockScale, DequantizesSlicesAndRequantizes) {
  // 5 x 7 FP8 weight in [2, 4] blocks (ragged: 3 x 2 scales).
  std::vector<float> codes(35);
  for (int i = 0; i < 35; ++i) codes[i] = static_cast<float>((i % 9) - 4) * 0.5f;  // exact in e4m3
  const Tensor q = Tensor::from_f32(codes, {5, 7}).converted(DType::F8_E4M3);
  const Tensor sc = Tensor::from_f32({1, 2, 3, 4, 5, 6}, {3, 2});
  const Tensor w = q.with_block_scale(sc, 2, 4);
  auto fp8 = [](const Tensor& t) { return dynamic_cast<const Fp8Block*>(t.encoding()); };
  ASSERT_NE(fp8(w), nullptr);
  EXPECT_EQ(w.dtype(), DType::F8_E4M3);
  EXPECT_EQ(w.data(), nullptr);
  EXPECT_EQ(w.nbytes(), 35u + 6u * 4u);  // codes + F32 scales
  const std::vector<float> v = w.to_f32();
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 7; ++j) EXPECT_EQ(v[i * 7 + j], codes[i * 7 + j] * static_cast<float>(1 + (i / 2) * 2 + j / 4));
  // converted() always dequantizes into a plain tensor.
  EXPECT_EQ(w.converted(DType::F32).to_f32(), v);
  EXPECT_EQ(w.converted(DType::F8_E4M3).encoding(), nullptr);
  // Rows [1, 4) straight from the encoding (a range that cuts blocks).
  std::vector<float> mid(21);
  w.encoding()->dequantize_rows(1, 4, mid.data());
  EXPECT_EQ(mid, std::vector<float>(v.begin() + 7, v.begin() + 28));
  // Whole blocks of rows slice (the last may be ragged); a cut through a block is refused.
  const Tensor tail = w.slice0(2, 5);
  EXPECT_EQ(fp8(tail)->scale().shape(), (Shape{2, 2}));
  EXPECT_EQ(tail.to_f32(), std::vector<float>(v.begin() + 14, v.end()));
  EXPECT_THROW(w.slice0(1, 3), Error);
  EXPECT_THROW(w.reshaped({7, 5}), Error);
  // Scales must fit the weight and the block size.
  EXPECT_THROW(q.with_block_scale(Tensor::from_f32({1, 2}, {1, 2}), 2, 4), Error);
  EXPECT_THROW(Tensor::from_f32(codes, {5, 7}).with_block_scale(sc, 2, 4), Error);  // not F8
  // Re-quantization: each block's max maps to 448; values within 1/16 of their block's max.
  std::vector<float> x(35);
  for (int i = 0; i < 35; ++i) x[i] = std::sin(0.7f * i) * (i < 14 ? 0.01f : 3.0f);
  const Tensor r = Tensor::quantize_fp8_blocks(x, 5, 7, 2, 4);
  const std::vector<float> back = r.to_f32(), rs = fp8(r)->scale().to_f32();
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 7; ++j) EXPECT_LE(std::fabs(back[i * 7 + j] - x[i * 7 + j]), rs[(i / 2) * 2 + j / 4] * 448.0f / 16);
}

}  // namespace
}  // namespace moe::core
