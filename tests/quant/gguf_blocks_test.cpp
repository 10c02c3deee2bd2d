// ggml block codecs (quant/gguf_blocks.h): decoding hand-built blocks from the published layouts,
// round trips of closed-form blocks (all equal, zeros, the grid's full range), the error bound of
// nearest rounding on random rows, sizes, and refusals.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/dtype.h"
#include "quant/gguf_blocks.h"
#include "support/expect_error.h"

namespace moe::test {
namespace {

using quant::GgmlType;

const GgmlType kBlockTypes[] = {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0,
                                GgmlType::Q5_1, GgmlType::TQ1_0, GgmlType::TQ2_0};
const GgmlType kCodecTypes[] = {GgmlType::F32,  GgmlType::F16,  GgmlType::BF16, GgmlType::Q8_0,  GgmlType::Q4_0,
                                GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::TQ1_0, GgmlType::TQ2_0};

std::vector<float> round_trip(GgmlType t, const std::vector<float>& x) {
  std::vector<uint8_t> b(quant::ggml_row_bytes(t, static_cast<int64_t>(x.size())));
  quant::encode_row(t, x.data(), static_cast<int64_t>(x.size()), b.data());
  std::vector<float> y(x.size());
  quant::decode_row(t, b.data(), static_cast<int64_t>(x.size()), y.data());
  return y;
}

void put_f16(uint8_t* p, float v) {
  const uint16_t h = core::f32_to_f16(v);
  std::memcpy(p, &h, 2);
}

TEST(GgufBlocks, SizesAsTheLayouts) {
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::Q8_0, 64), 2u * 34u);
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::Q4_0, 32), 18u);
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::Q4_1, 32), 20u);
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::Q5_0, 32), 22u);
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::Q5_1, 32), 24u);
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::Q4_K, 256), 144u);
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::Q6_K, 256), 210u);
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::TQ1_0, 256), 54u);
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::TQ2_0, 256), 66u);
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::BF16, 3), 6u);
  EXPECT_EQ(quant::ggml_type_info(30u)->type, GgmlType::BF16);
  EXPECT_EQ(quant::ggml_type_info(4u), nullptr);  // removed Q4_2
  EXPECT_EQ(quant::parse_ggml_type("Q5_1")->type, GgmlType::Q5_1);
  EXPECT_EQ(quant::parse_ggml_type("q9_0"), nullptr);
}

// Blocks written byte by byte from ggml-common.h, decoded.
TEST(GgufBlocks, DecodesHandBuiltBlocks) {
  float y[32];
  {  // Q4_0: d = 0.5; qs[0] = 0x21: element 0 -> 1, element 16 -> 2; the rest 8 (zero)
    uint8_t b[18];
    put_f16(b, 0.5f);
    std::memset(b + 2, 0x88, 16);
    b[2] = 0x21;
    quant::decode_row(GgmlType::Q4_0, b, 32, y);
    EXPECT_EQ(y[0], 0.5f * (1 - 8));
    EXPECT_EQ(y[16], 0.5f * (2 - 8));
    EXPECT_EQ(y[1], 0.0f);
  }
  {  // Q5_0: element 3 has bit 4 from qh bit 3, element 19 from bit 19
    uint8_t b[22] = {};
    put_f16(b, 2.0f);
    const uint32_t qh = (1u << 3) | (1u << 19);
    std::memcpy(b + 2, &qh, 4);
    b[6 + 3] = 0x51;  // element 3 low nibble 1, element 19 low nibble 5
    quant::decode_row(GgmlType::Q5_0, b, 32, y);
    EXPECT_EQ(y[3], 2.0f * (17 - 16));
    EXPECT_EQ(y[19], 2.0f * (21 - 16));
    EXPECT_EQ(y[0], 2.0f * (0 - 16));
  }
  {  // Q4_1 and Q5_1: x = d * q + m
    uint8_t b[24] = {};
    put_f16(b, 0.25f);
    put_f16(b + 2, -1.0f);
    b[4] = 0xF3;  // element 0 -> 3, element 16 -> 15
    quant::decode_row(GgmlType::Q4_1, b, 32, y);
    EXPECT_EQ(y[0], 0.25f * 3 - 1.0f);
    EXPECT_EQ(y[16], 0.25f * 15 - 1.0f);
    const uint32_t qh = 1u << 31;  // element 31: bit 4
    std::memcpy(b + 4, &qh, 4);
    b[8 + 15] = 0x20;  // element 31 low nibble 2 -> q = 18
    quant::decode_row(GgmlType::Q5_1, b, 32, y);
    EXPECT_EQ(y[31], 0.25f * 18 - 1.0f);
  }
  {  // Q8_0: signed bytes
    uint8_t b[34] = {};
    put_f16(b, 0.125f);
    b[2] = static_cast<uint8_t>(-100);
    b[33] = 127;
    quant::decode_row(GgmlType::Q8_0, b, 32, y);
    EXPECT_EQ(y[0], -12.5f);
    EXPECT_EQ(y[31], 15.875f);
  }
}

// Ternary blocks written from the layouts: TQ2_0 two bits a value, TQ1_0 five trits a byte.
TEST(GgufBlocks, DecodesHandBuiltTernaryBlocks) {
  std::vector<float> y(256);
  {
    uint8_t b[66] = {};
    std::memset(b, 0x55, 64);  // t = 1 everywhere: 0
    b[32 + 5] = (0x55 & ~0x30) | (2 << 4);  // element 128 + 64 + 5: bits 4..5 of qs[37] -> t = 2
    b[0] = 0x54;                                  // element 0: bits 0..1 of qs[0] -> t = 0
    put_f16(b + 64, 0.5f);
    quant::decode_row(GgmlType::TQ2_0, b, 256, y.data());
    EXPECT_EQ(y[197], 0.5f);
    EXPECT_EQ(y[0], -0.5f);
    EXPECT_EQ(y[1], 0.0f);
    EXPECT_EQ(y[32], 0.0f);
  }
  {
    // Trits (2, 1, 0, 1, 2): 2*81 + 27 + 3 + 2 = 194, byte ceil(194 * 256 / 243) = 205. In qs[3]
    // they are elements 3, 35, 67, 99, 131; in qh[1] (four trits) elements 241, 245, 249, 253.
    uint8_t b[54] = {};
    const uint8_t one = static_cast<uint8_t>((121 * 256 + 242) / 243);  // every trit 1: 81+27+9+3+1
    std::memset(b, one, 48);
    b[3] = 205;
    std::memset(b + 48, static_cast<uint8_t>((120 * 256 + 242) / 243), 4);  // 81+27+9+3, fifth trit 0
    b[49] = static_cast<uint8_t>(((2 * 81 + 27 + 0 + 3) * 256 + 242) / 243);  // (2, 1, 0, 1)
    put_f16(b + 52, 2.0f);
    quant::decode_row(GgmlType::TQ1_0, b, 256, y.data());
    EXPECT_EQ(y[3], 2.0f);
    EXPECT_EQ(y[35], 0.0f);
    EXPECT_EQ(y[67], -2.0f);
    EXPECT_EQ(y[99], 0.0f);
    EXPECT_EQ(y[131], 2.0f);
    EXPECT_EQ(y[241], 2.0f);
    EXPECT_EQ(y[249], -2.0f);
    for (int e : {0, 100, 159, 160, 239, 240, 255}) EXPECT_EQ(y[e], 0.0f) << e;
  }
}

TEST(GgufBlocks, ZerosAndEqualValuesAreExact) {
  for (GgmlType t : kCodecTypes) {
    const char* name = quant::ggml_type_info(t).name;
    const std::vector<float> zeros(256, 0.0f);
    EXPECT_EQ(round_trip(t, zeros), zeros) << name;
    // All equal: the symmetric grids put the value at their end (-half * d), the asymmetric ones at
    // their min; 0.75 is exact in f16, so is every scale derived from it by a power of two.
    const std::vector<float> equal(256, 0.75f);
    const auto y = round_trip(t, equal);
    for (float v : y) ASSERT_NEAR(v, 0.75f, t == GgmlType::Q8_0 ? 0.75f / 127 / 2 : 0.0f) << name;
  }
}

// A block spanning the grid exactly: every level once (or the range's ends), decoded without error.
TEST(GgufBlocks, FullRangeOnTheGridIsExact) {
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = 0.5f * static_cast<float>(j % 16 - 8);  // Q4_0: d = 0.5, q - 8 in [-8, 7]
  EXPECT_EQ(round_trip(GgmlType::Q4_0, x), x);
  for (int j = 0; j < 32; ++j) x[j] = 0.25f * static_cast<float>(j - 16);  // Q5_0: d = 0.25, [-16, 15]
  EXPECT_EQ(round_trip(GgmlType::Q5_0, x), x);
  for (int j = 0; j < 32; ++j) x[j] = -2.0f + 0.5f * static_cast<float>(j % 16);  // Q4_1: min -2, d = 0.5
  EXPECT_EQ(round_trip(GgmlType::Q4_1, x), x);
  for (int j = 0; j < 32; ++j) x[j] = 1.0f + 0.125f * static_cast<float>(j == 31 ? 31 : j);  // Q5_1: min 1, d = 1/8
  EXPECT_EQ(round_trip(GgmlType::Q5_1, x), x);
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j * 8 - 127);  // Q8_0: d = 1
  x[31] = 127.0f;
  EXPECT_EQ(round_trip(GgmlType::Q8_0, x), x);
  std::vector<float> t(256);
  for (int j = 0; j < 256; ++j) t[j] = 0.5f * static_cast<float>((j * 7) % 3 - 1);  // ternary, d = 0.5
  EXPECT_EQ(round_trip(GgmlType::TQ1_0, t), t);
  EXPECT_EQ(round_trip(GgmlType::TQ2_0, t), t);
}

// Nearest rounding: every value within one step of its block (half a step inside the grid;
// the symmetric 4/5-bit grids may clamp their positive end by one step).
TEST(GgufBlocks, RandomRowsWithinOneStep) {
  std::mt19937 rng(7);
  std::normal_distribution<float> n(0.0f, 0.05f);
  std::vector<float> x(1024);
  for (auto& v : x) v = n(rng);
  for (GgmlType t : kBlockTypes) {
    const auto y = round_trip(t, x);
    const int64_t bs = quant::ggml_type_info(t).block;
    for (size_t b = 0; b < x.size() / bs; ++b) {
      float lo = x[b * bs], hi = lo, amax = 0;
      for (int j = 0; j < bs; ++j) {
        lo = std::min(lo, x[b * bs + j]);
        hi = std::max(hi, x[b * bs + j]);
        amax = std::max(amax, std::fabs(x[b * bs + j]));
      }
      float step = 0;
      switch (t) {
        case GgmlType::Q8_0: step = amax / 127 / 2; break;
        case GgmlType::Q4_0: step = amax / 8; break;
        case GgmlType::Q5_0: step = amax / 16; break;
        case GgmlType::Q4_1: step = (hi - lo) / 15 / 2; break;
        case GgmlType::Q5_1: step = (hi - lo) / 31 / 2; break;
        default: step = amax / 2; break;  // ternary: {-d, 0, d} with d = absmax
      }
      for (int j = 0; j < bs; ++j)
        ASSERT_LE(std::fabs(y[b * bs + j] - x[b * bs + j]), step * 1.01f + 1e-6f)
            << quant::ggml_type_info(t).name << " block " << b << " element " << j;
    }
  }
  // f16 and bf16 round to nearest even as core/dtype does; f32 is a copy.
  const auto h = round_trip(GgmlType::F16, x);
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(h[i], core::f16_to_f32(core::f32_to_f16(x[i])));
  EXPECT_EQ(round_trip(GgmlType::F32, x), x);
}

// Codes already on the grid (symmetric int4 / int8 groups of 32) stored without rounding.
TEST(GgufBlocks, PacksCodesExactly) {
  uint8_t codes[64];
  for (int j = 0; j < 64; ++j) codes[j] = static_cast<uint8_t>((j * 5) % 16);
  const float scales[2] = {0.5f, 0.0078125f};
  uint8_t b[68];
  float y[64];
  quant::pack_codes_row(GgmlType::Q4_0, codes, scales, 64, b);
  quant::decode_row(GgmlType::Q4_0, b, 64, y);
  for (int j = 0; j < 64; ++j) ASSERT_EQ(y[j], scales[j / 32] * static_cast<float>(codes[j] - 8)) << j;
  for (int j = 0; j < 64; ++j) codes[j] = static_cast<uint8_t>((j * 37) % 256);
  quant::pack_codes_row(GgmlType::Q8_0, codes, scales, 64, b);
  quant::decode_row(GgmlType::Q8_0, b, 64, y);
  for (int j = 0; j < 64; ++j) ASSERT_EQ(y[j], scales[j / 32] * static_cast<float>(codes[j] - 128)) << j;
  std::memset(codes, 8, sizeof codes);
  codes[3] = 16;
  expect_error([&] { quant::pack_codes_row(GgmlType::Q4_0, codes, scales, 64, b); }, core::ErrorKind::InvalidArgument,
               {"code 16 above 15"});
  const float inexact[2] = {0.1f, 0.5f};
  expect_error([&] { quant::pack_codes_row(GgmlType::Q8_0, codes, inexact, 64, b); }, core::ErrorKind::InvalidArgument,
               {"not exact in f16"});
  expect_error([&] { quant::pack_codes_row(GgmlType::Q4_1, codes, scales, 64, b); }, core::ErrorKind::InvalidArgument,
               {"q4_1 without re-quantizing"});
}

TEST(GgufBlocks, Refusals) {
  std::vector<float> x(256, 1.0f);
  std::vector<uint8_t> b(1024);
  expect_error([&] { quant::encode_row(GgmlType::TQ2_0, x.data(), 128, b.data()); }, core::ErrorKind::InvalidArgument,
               {"128", "tq2_0 block size 256"});
  expect_error([&] { quant::encode_row(GgmlType::Q4_K, x.data(), 256, b.data()); }, core::ErrorKind::NotSupported,
               {"q4_k", "no encoder"});
  expect_error([&] { quant::decode_row(GgmlType::IQ1_S, b.data(), 256, x.data()); }, core::ErrorKind::NotSupported,
               {"iq1_s", "no decoder"});
  expect_error([&] { quant::encode_row(GgmlType::Q8_0, x.data(), 48, b.data()); }, core::ErrorKind::InvalidArgument,
               {"48", "q8_0 block size 32"});
  x[5] = std::nanf("");
  expect_error([&] { quant::encode_row(GgmlType::Q4_0, x.data(), 32, b.data()); }, core::ErrorKind::InvalidArgument,
               {"non-finite", "column 5"});
  std::vector<float> big(32, 1e9f);
  expect_error([&] { quant::encode_row(GgmlType::Q8_0, big.data(), 32, b.data()); }, core::ErrorKind::InvalidArgument,
               {"overflows f16"});
}

}  // namespace
}  // namespace moe::test
