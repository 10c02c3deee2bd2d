// ggml block codecs (quant/gguf_blocks.h): decoding hand-built blocks from the published layouts,
// round trips of closed-form blocks (all equal, zeros, the grid's full range), the error bound of
// nearest rounding on random rows, sizes, and refusals.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "core/dtype.h"
#include "io/gguf.h"
#include "quant/gguf_blocks.h"
#include "support/expect_error.h"

namespace moe::test {
namespace {

using quant::GgmlType;

const GgmlType kBlockTypes[] = {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0,
                                GgmlType::Q5_1, GgmlType::TQ1_0, GgmlType::TQ2_0};
const GgmlType kKTypes[] = {GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K};
const GgmlType kCodecTypes[] = {GgmlType::F32,  GgmlType::F16,  GgmlType::BF16,  GgmlType::Q8_0,  GgmlType::Q4_0,
                                GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1,  GgmlType::TQ1_0, GgmlType::TQ2_0,
                                GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K,  GgmlType::Q5_K,  GgmlType::Q6_K};

bool is_k(GgmlType t) { return std::find(std::begin(kKTypes), std::end(kKTypes), t) != std::end(kKTypes); }

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
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::Q2_K, 256), 84u);   // 2.625 bits a weight
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::Q3_K, 256), 110u);  // 3.4375
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::Q4_K, 512), 288u);  // 4.5
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::Q5_K, 256), 176u);  // 5.5
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::Q6_K, 256), 210u);  // 6.5625
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

// K-quant blocks written byte by byte from ggml-common.h's structs and dequantize_row_q*_K, with a
// few sub-scales, mins and codes set by hand; the rest of the block decodes to 0.
TEST(GgufBlocks, DecodesHandBuiltKQuantBlocks) {
  std::vector<float> y(256);
  {  // Q6_K {ql[128], qh[64], i8 scales[16], f16 d}: u = 32 (q = 0) is ql nibble 0, qh bits 10.
    uint8_t b[210] = {};
    std::memset(b + 128, 0xAA, 64);
    for (int j = 0; j < 16; ++j) b[192 + j] = static_cast<uint8_t>(static_cast<int8_t>(j - 8));
    put_f16(b + 208, 0.5f);
    b[0] = 0x0F;                             // element 0 (h 0, k 0, l 0): low nibble 15 in ql[0]
    b[128] = (0xAA & ~0x03) | 0x03;          //   and high bits 11 in qh[0]: u = 63, q = 31
    b[128 + 32 + 8] = 0xAA & ~0x30;          // element 200 (h 1, k 2, l 8): qh[40] bits 4..5 = 0,
                                             //   ql[72] high nibble 0: u = 0, q = -32
    b[32 + 1] = 0x10;                        // element 97 (h 0, k 3, l 1): ql[33] high nibble 1: q = 1
    quant::decode_row(GgmlType::Q6_K, b, 256, y.data());
    EXPECT_EQ(y[0], 0.5f * -8 * 31);
    EXPECT_EQ(y[200], 0.5f * (12 - 8) * -32);
    EXPECT_EQ(y[97], 0.5f * (6 - 8) * 1);
    for (int e : {1, 33, 96, 98, 128, 255}) EXPECT_EQ(y[e], 0.0f) << e;
  }
  {  // Q3_K {hmask[32], qs[64], scales[12], f16 d}: every sub-scale 0 (six-bit 32: bytes 8..11 0xAA)
     // except sub-block 9 = -3 (29 = 0b01'1101: high nibble of scales[1], bits 4..5 of scales[9]).
    uint8_t b[110] = {};
    std::memset(b + 96 + 8, 0xAA, 4);
    b[96 + 1] = 0xD0;
    b[96 + 9] = 0x9A;
    put_f16(b + 108, 2.0f);
    b[32 + 32 + 22] = 0x03;  // element 150 (h 1, k 0, l 22): low bits 11 in qs[54]
    b[22] = 1 << 4;          //   high bit in bit 4h + k = 4 of hmask[22]: u = 7, q = 3
    quant::decode_row(GgmlType::Q3_K, b, 256, y.data());
    EXPECT_EQ(y[150], 2.0f * -3 * 3);
    EXPECT_EQ(y[151], 2.0f * -3 * -4);  // u = 0: q = -4
    EXPECT_EQ(y[143], 0.0f);
    EXPECT_EQ(y[160], 0.0f);
    EXPECT_EQ(y[0], 0.0f);
  }
  {  // Q2_K {scales[16], qs[64], f16 d, f16 dmin}: sub-block 3 (elements 48..63) sc 6, m 5.
    uint8_t b[84] = {};
    b[3] = 0x56;
    b[16 + 18] = 2 << 2;  // element 50 (h 0, k 1, l 18): bits 2..3 of qs[18] = 2
    put_f16(b + 80, 0.5f);
    put_f16(b + 82, 0.25f);
    quant::decode_row(GgmlType::Q2_K, b, 256, y.data());
    EXPECT_EQ(y[50], 0.5f * 6 * 2 - 0.25f * 5);
    EXPECT_EQ(y[49], -0.25f * 5);
    EXPECT_EQ(y[18], 0.0f);
    EXPECT_EQ(y[64], 0.0f);
  }
  // Q4_K / Q5_K {f16 d, f16 dmin, scales[12], (qh[32],) qs[128]}: sub-block 0 sc 5, m 7 (scales[0],
  // scales[4]); sub-block 5 sc 42 = 0b10'1010, m 19 = 0b01'0011: low nibbles in scales[9] (0x3A),
  // high bits in the top of scales[1] (sc) and scales[5] (m). Sub-block 1 reads scales[1] & 63 = 0.
  for (const bool five : {false, true}) {
    uint8_t b[176] = {};
    put_f16(b, 0.25f);
    put_f16(b + 2, 0.5f);
    uint8_t* sc = b + 4;
    sc[0] = 5, sc[4] = 7, sc[9] = 0x3A, sc[1] = 0x80, sc[5] = 0x40;
    uint8_t* qs = b + (five ? 48 : 16);
    qs[64 + 10] = 0x90;  // element 170 (sub-block 5: c 2, high nibble, l 10): q = 9
    qs[3] = 0x0F;        // element 3 (sub-block 0, low nibble): q = 15
    if (five) b[16 + 10] = 1 << 5;  // element 170: bit 4 in bit 5 of qh[10], q = 25
    const GgmlType t = five ? GgmlType::Q5_K : GgmlType::Q4_K;
    quant::decode_row(t, b, 256, y.data());
    EXPECT_EQ(y[170], 0.25f * 42 * (five ? 25 : 9) - 0.5f * 19) << five;
    EXPECT_EQ(y[165], -0.5f * 19) << five;
    EXPECT_EQ(y[3], 0.25f * 5 * 15 - 0.5f * 7) << five;
    EXPECT_EQ(y[4], -0.5f * 7) << five;
    EXPECT_EQ(y[40], 0.0f) << five;
  }
}

// The code bytes of each K-quant block (everything but the scales): all zero bits is the code
// qmin of every value, all one bits qmax.
struct KCodes {
  GgmlType type;
  int sub, qmin, qmax;
  size_t begin, end;
};
const KCodes kKCodes[] = {{GgmlType::Q2_K, 16, 0, 3, 16, 80},    {GgmlType::Q3_K, 16, -4, 3, 0, 96},
                          {GgmlType::Q4_K, 32, 0, 15, 16, 144},  {GgmlType::Q5_K, 32, 0, 31, 16, 176},
                          {GgmlType::Q6_K, 16, -32, 31, 0, 192}};

// Random rows, some sub-blocks scaled down by up to 1000 or all zero: every decoded value is the
// nearest point of its sub-block's grid D * q - M (D and M read back by decoding the same block with
// its codes all qmin, then all qmax), and within one step |D| of the source.
TEST(GgufBlocks, KQuantsRoundToTheNearestPointOfTheirGrid) {
  std::mt19937 rng(11);
  std::normal_distribution<float> n(0.0f, 0.05f);
  std::vector<float> x(1024);
  for (size_t i = 0; i < x.size(); ++i) x[i] = n(rng) * (i / 16 % 7 == 3 ? 0.001f : i / 16 % 5 == 1 ? 0.1f : 1.0f);
  for (int i = 512; i < 528; ++i) x[i] = 0.0f;
  for (int i = 600; i < 632; ++i) x[i] = std::fabs(x[i]) + 0.01f;  // a sub-block above zero
  for (const KCodes& k : kKCodes) {
    const char* name = quant::ggml_type_info(k.type).name;
    const size_t bs = quant::ggml_type_info(k.type).type_size;
    std::vector<uint8_t> b(quant::ggml_row_bytes(k.type, 1024));
    quant::encode_row(k.type, x.data(), 1024, b.data());
    std::vector<float> y(1024), lo(256), hi(256);
    quant::decode_row(k.type, b.data(), 1024, y.data());
    for (size_t blk = 0; blk < 4; ++blk) {
      std::vector<uint8_t> c(b.begin() + blk * bs, b.begin() + (blk + 1) * bs);
      std::fill(c.begin() + k.begin, c.begin() + k.end, 0x00);
      quant::decode_row(k.type, c.data(), 256, lo.data());
      std::fill(c.begin() + k.begin, c.begin() + k.end, 0xFF);
      quant::decode_row(k.type, c.data(), 256, hi.data());
      for (int e = 0; e < 256; ++e) {
        const size_t i = blk * 256 + e;
        const double D = (static_cast<double>(hi[e]) - lo[e]) / (k.qmax - k.qmin), M = D * k.qmin - lo[e];
        const double err = std::fabs(static_cast<double>(y[i]) - x[i]);
        ASSERT_LE(err, std::fabs(D) * 1.01 + 1e-9) << name << " element " << i << " beyond one step";
        for (int q = k.qmin; q <= k.qmax; ++q)
          ASSERT_GE(std::fabs(D * q - M - x[i]), err - 1e-4 * std::fabs(D) - 1e-12)
              << name << " element " << i << ": code " << q << " is nearer";
      }
    }
  }
}

// More bits, less error: the largest error on the same Gaussian rows falls strictly from q2_k to
// q6_k.
TEST(GgufBlocks, KQuantErrorFallsWithTheBits) {
  std::mt19937 rng(5);
  std::normal_distribution<float> n(0.0f, 0.02f);
  std::vector<float> x(16 * 256);
  for (auto& v : x) v = n(rng);
  double prev = 1e30;
  for (GgmlType t : kKTypes) {
    const auto y = round_trip(t, x);
    double worst = 0, sq = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      worst = std::max(worst, static_cast<double>(std::fabs(y[i] - x[i])));
      sq += static_cast<double>(y[i] - x[i]) * (y[i] - x[i]);
    }
    const double rms = std::sqrt(sq / static_cast<double>(x.size()));
    std::printf("%s: max abs error %.3g, rms %.3g (source sigma 0.02)\n", quant::ggml_type_info(t).name, worst, rms);
    EXPECT_LT(worst, prev) << quant::ggml_type_info(t).name;
    prev = worst;
  }
}

TEST(GgufBlocks, ZerosAndEqualValuesAreExact) {
  for (GgmlType t : kCodecTypes) {
    const char* name = quant::ggml_type_info(t).name;
    const std::vector<float> zeros(256, 0.0f);
    EXPECT_EQ(round_trip(t, zeros), zeros) << name;
    // All equal: the symmetric grids put the value at their end (-half * d), the asymmetric ones at
    // their min; 0.75 is exact in f16, so is every scale derived from it by a power of two. The
    // K-quants' value is d * sc * q with d = range / (sc * q) rounded to f16: within its rounding.
    for (float c : {0.75f, -0.5f}) {
      const std::vector<float> equal(256, c);
      const auto y = round_trip(t, equal);
      const float tol = t == GgmlType::Q8_0 ? std::fabs(c) / 127 / 2 : is_k(t) ? std::fabs(c) / 1024 : 0.0f;
      for (float v : y) ASSERT_NEAR(v, c, tol) << name;
      if (is_k(t)) {
        EXPECT_EQ(y, std::vector<float>(256, y[0])) << name << ": one value for all";
      }
    }
  }
}

// Q4_0/Q5_0 take the element of largest magnitude with its sign, the first one on ties: it lands
// exactly on the grid's long end (-half), the other sign is clamped to half - 1. A block of zeros,
// -0 included, has the scale (+0) / -half = -0: the f16 bytes 00 80, as ggml's reference rounding
// (max / -8 with max = 0) stores it.
TEST(GgufBlocks, SymmetricBlocksTakeTheFirstLargestMagnitudeWithItsSign) {
  for (const auto& [t, half] : {std::pair{GgmlType::Q4_0, 8}, std::pair{GgmlType::Q5_0, 16}}) {
    for (const bool negative_first : {true, false}) {
      std::vector<float> x(32);
      for (int j = 0; j < 32; ++j) x[j] = 0.01f * static_cast<float>(j % 7 - 3);
      x[3] = negative_first ? -0.5f : 0.5f;
      x[19] = -x[3];
      const auto y = round_trip(t, x);
      const float d = 0.5f / static_cast<float>(half);  // exact in f16
      EXPECT_EQ(y[3], x[3]) << quant::ggml_type_info(t).name;
      EXPECT_EQ(y[19], -x[3] / static_cast<float>(half) * static_cast<float>(half - 1)) << quant::ggml_type_info(t).name;
      EXPECT_NEAR(y[5], x[5], d / 2) << quant::ggml_type_info(t).name;
    }
    std::vector<float> zeros(32, 0.0f);
    zeros[0] = -0.0f;
    std::vector<uint8_t> b(quant::ggml_type_info(t).type_size);
    quant::encode_row(t, zeros.data(), 32, b.data());
    EXPECT_EQ(b[0], 0x00);
    EXPECT_EQ(b[1], 0x80) << quant::ggml_type_info(t).name << ": the scale of a block of zeros";
  }
}

// F16 and BF16 hold no value beyond their range: one that would round to inf is refused, naming
// the value and its column, as the finite check of a safetensors output refuses it.
TEST(GgufBlocks, ElementTypesRefuseValuesBeyondTheirRange) {
  std::vector<float> x(8, 1.0f);
  std::vector<uint8_t> out(16);
  x[3] = 65504.0f, x[4] = 65519.0f;  // the largest f16 and a value that rounds down to it
  EXPECT_NO_THROW(quant::encode_row(GgmlType::F16, x.data(), 8, out.data()));
  x[5] = -65520.0f;  // the first that rounds to -inf
  expect_error([&] { quant::encode_row(GgmlType::F16, x.data(), 8, out.data()); }, core::ErrorKind::InvalidArgument,
               {"value -65520.000000 at column 5 is beyond f16's range"});
  std::vector<float> b(8, 1.0f);
  b[6] = std::numeric_limits<float>::max();  // rounds to bf16 inf
  expect_error([&] { quant::encode_row(GgmlType::BF16, b.data(), 8, out.data()); }, core::ErrorKind::InvalidArgument,
               {"at column 6 is beyond bf16's range"});
  EXPECT_NO_THROW(quant::encode_row(GgmlType::F32, b.data(), 8, std::vector<uint8_t>(32).data()));
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

// A committed golden file of data/golden/ (made by the script `maker` names), parsed.
nlohmann::json read_golden(const std::string& file, const std::string& maker) {
  const std::filesystem::path path = std::filesystem::path(MOE_SOURCE_DIR) / "data/golden" / file;
  std::ifstream in(path);
  EXPECT_TRUE(in) << "missing " << path << " (run data/scripts/" << maker << ")";
  std::stringstream ss;
  ss << in.rdbuf();
  return nlohmann::json::parse(ss.str());
}

// The bytes a golden file spells as hex.
std::vector<uint8_t> hex_bytes(const std::string& hex) {
  std::vector<uint8_t> b(hex.size() / 2);
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
  return b;
}

// IQ4_NL and IQ4_XS (read, never written): seeded random blocks and their values from an
// independent NumPy decoder of ggml-common.h's layouts (data/scripts/make_iq4_goldens.py), bit for
// bit; both are refused as encoder types, and named in the decoders' list only.
TEST(GgufBlocks, DecodesIq4BlocksAsTheNumPyGoldens) {
  const auto golden = read_golden("iq4_blocks.json", "make_iq4_goldens.py");
  for (const GgmlType t : {GgmlType::IQ4_NL, GgmlType::IQ4_XS}) {
    const auto& g = golden.at(quant::ggml_type_info(t).name);
    std::vector<uint8_t> b = hex_bytes(g.at("blocks"));
    const auto& want = g.at("values");
    const auto n = static_cast<int64_t>(want.size());
    ASSERT_EQ(quant::ggml_row_bytes(t, n), b.size()) << quant::ggml_type_info(t).name;
    std::vector<float> y(want.size());
    quant::decode_row(t, b.data(), n, y.data());
    for (size_t i = 0; i < y.size(); ++i) {
      uint32_t bits;
      std::memcpy(&bits, &y[i], 4);
      ASSERT_EQ(bits, want[i].get<uint32_t>()) << quant::ggml_type_info(t).name << " value " << i << ": " << y[i];
    }
    std::vector<float> x(256, 1.0f);
    expect_error([&] { quant::encode_row(t, x.data(), 256, b.data()); }, core::ErrorKind::NotSupported,
                 {quant::ggml_type_info(t).name, "no encoder"});
    EXPECT_NE(quant::ggml_codec_names().find(quant::ggml_type_info(t).name), std::string::npos);
    EXPECT_EQ(quant::ggml_encoder_names().find(quant::ggml_type_info(t).name), std::string::npos);
  }
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::IQ4_NL, 64), 36u);   // 4.5 bits a weight
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::IQ4_XS, 256), 136u);  // 4.25
}

// MXFP4 (read, and written by --type mxfp4: the encoder's test is below): seeded random blocks and their values from an independent
// Python decoder of ggml-common.h's block_mxfp4 (data/scripts/make_mxfp4_goldens.py), bit for bit,
// E8M0 0 (subnormal 2^-127) included; the E8M0 NaN (255) decodes to NaN and the scale scan sees it.
TEST(GgufBlocks, DecodesMxfp4BlocksAsTheGoldens) {
  const auto golden = read_golden("mxfp4_blocks.json", "make_mxfp4_goldens.py");
  const auto& g = golden.at("mxfp4");
  std::vector<uint8_t> b = hex_bytes(g.at("blocks"));
  const auto& want = g.at("values");
  const auto n = static_cast<int64_t>(want.size());
  ASSERT_EQ(quant::ggml_row_bytes(GgmlType::MXFP4, n), b.size());
  EXPECT_EQ(quant::ggml_row_bytes(GgmlType::MXFP4, 64), 34u);  // 4.25 bits a weight
  std::vector<float> y(want.size());
  quant::decode_row(GgmlType::MXFP4, b.data(), n, y.data());
  for (size_t i = 0; i < y.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &y[i], 4);
    ASSERT_EQ(bits, want[i].get<uint32_t>()) << "value " << i << ": " << y[i];
  }
  EXPECT_TRUE(io::gguf_scales_finite(GgmlType::MXFP4, b.data(), b.size()).value());
  b[17 * 5] = 0xFF;  // block 5's scale: the E8M0 NaN
  quant::decode_row(GgmlType::MXFP4, b.data(), n, y.data());
  EXPECT_TRUE(std::isnan(y[5 * 32])) << y[5 * 32];
  EXPECT_TRUE(std::isfinite(y[4 * 32]));
  EXPECT_FALSE(io::gguf_scales_finite(GgmlType::MXFP4, b.data(), b.size()).value());
  EXPECT_NE(quant::ggml_codec_names().find("mxfp4"), std::string::npos);
  EXPECT_EQ(quant::parse_ggml_type("MXFP4")->type, GgmlType::MXFP4);
}

// The MXFP4 encoder: the block's E8M0 exponent is floor(log2 amax) - 2 + 127 (OCP MX), every value
// decodes to its nearest E2M1 point times that scale (ties to the even code, above 6 saturated),
// the golden blocks' values (already on the grid, amax's exponent as the encoder chooses it) encode
// back to themselves, and an all-zero block is e = 0 with zero codes.
TEST(GgufBlocks, EncodesMxfp4WithTheOcpScaleAndNearestValues) {
  const float grid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 0.03f);
  std::vector<float> x(32 * 64), y(x.size());
  for (auto& v : x) v = nd(rng);
  x[5] = 0.0f;
  std::vector<uint8_t> b(quant::ggml_row_bytes(GgmlType::MXFP4, static_cast<int64_t>(x.size())));
  quant::encode_row(GgmlType::MXFP4, x.data(), static_cast<int64_t>(x.size()), b.data());
  quant::decode_row(GgmlType::MXFP4, b.data(), static_cast<int64_t>(x.size()), y.data());
  for (size_t blk = 0; blk < x.size() / 32; ++blk) {
    float amax = 0;
    for (size_t j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[blk * 32 + j]));
    const int e = static_cast<int>(std::floor(std::log2(amax))) - 2 + 127;
    ASSERT_EQ(b[blk * 17], e) << "block " << blk;
    const float d = std::ldexp(1.0f, e - 127);
    for (size_t j = 0; j < 32; ++j) {
      const float v = x[blk * 32 + j] / d, got = y[blk * 32 + j] / d;
      float best = 1e9f;
      for (float g : grid) best = std::min(best, std::fabs(std::fabs(v) - g));
      ASSERT_EQ(std::fabs(std::fabs(v) - std::fabs(got)), best) << "block " << blk << " value " << j << ": " << v << " -> " << got;
      ASSERT_TRUE(got == 0.0f || std::signbit(got) == std::signbit(v));
    }
  }
  // Ties to the even code; saturation; zero block.
  std::vector<float> t(32, 0.0f);
  t[0] = 4.0f;           // amax 4: e = 2 - 2 + 127, d = 1
  t[1] = 0.25f;          // 0 | 0.5 -> 0
  t[2] = 0.75f;          // 0.5 | 1 -> 1
  t[3] = 2.5f;           // 2 | 3 -> 2
  t[4] = -5.0f;          // 4 | 6 -> -4
  t[5] = 1.75f;          // 1.5 | 2 -> 2
  std::vector<uint8_t> tb(17);
  std::vector<float> ty(32);
  quant::encode_row(GgmlType::MXFP4, t.data(), 32, tb.data());
  quant::decode_row(GgmlType::MXFP4, tb.data(), 32, ty.data());
  EXPECT_EQ(tb[0], 127);
  EXPECT_EQ((std::vector<float>{ty[0], ty[1], ty[2], ty[3], ty[4], ty[5]}), (std::vector<float>{4.0f, 0.0f, 1.0f, 2.0f, -4.0f, 2.0f}));
  t.assign(32, 0.0f);
  quant::encode_row(GgmlType::MXFP4, t.data(), 32, tb.data());
  EXPECT_EQ(tb, std::vector<uint8_t>(17, 0));
  EXPECT_NE(quant::ggml_encoder_names().find("mxfp4"), std::string::npos);
}

TEST(GgufBlocks, Refusals) {
  std::vector<float> x(256, 1.0f);
  std::vector<uint8_t> b(1024);
  expect_error([&] { quant::encode_row(GgmlType::TQ2_0, x.data(), 128, b.data()); }, core::ErrorKind::InvalidArgument,
               {"128", "tq2_0 block size 256"});
  expect_error([&] { quant::encode_row(GgmlType::IQ2_XS, x.data(), 256, b.data()); }, core::ErrorKind::NotSupported,
               {"iq2_xs", "no encoder"});
  for (GgmlType t : kKTypes)
    expect_error([&] { quant::encode_row(t, x.data(), 128, b.data()); }, core::ErrorKind::InvalidArgument,
                 {"128", std::string(quant::ggml_type_info(t).name) + " block size 256"});
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
