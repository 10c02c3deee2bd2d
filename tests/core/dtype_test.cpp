// dtype table and the exact scalar conversions: decode is exact, encode rounds to nearest with
// ties to even, checked against closed-form values and against a brute-force reference that
// searches the format's whole code table.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

namespace moe::core {
namespace {

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint64_t bits64(double d) {
  uint64_t u;
  std::memcpy(&u, &d, 8);
  return u;
}

// ------------------------------------------------------------------ table

TEST(DType, TableNamesAndSizes) {
  struct Row {
    DType t;
    const char* name;
    size_t size;
    bool is_float;
  };
  const Row rows[] = {
      {DType::F64, "F64", 8, true},         {DType::F32, "F32", 4, true},  {DType::F16, "F16", 2, true},
      {DType::BF16, "BF16", 2, true},       {DType::F8_E4M3, "F8_E4M3", 1, true},
      {DType::F8_E5M2, "F8_E5M2", 1, true}, {DType::I64, "I64", 8, false}, {DType::I32, "I32", 4, false},
      {DType::I16, "I16", 2, false},        {DType::I8, "I8", 1, false},   {DType::U8, "U8", 1, false},
      {DType::BOOL, "BOOL", 1, false},      {DType::U16, "U16", 2, false}, {DType::U32, "U32", 4, false},
  };
  EXPECT_EQ(std::size(rows), static_cast<size_t>(DType::kCount));
  for (const auto& r : rows) {
    SCOPED_TRACE(r.name);
    EXPECT_STREQ(dtype_name(r.t), r.name);
    EXPECT_EQ(dtype_size(r.t), r.size);
    EXPECT_EQ(dtype_info(r.t).is_float, r.is_float);
    ASSERT_TRUE(parse_dtype(r.name).has_value());
    EXPECT_EQ(*parse_dtype(r.name), r.t);
  }
}

TEST(DType, ParseRejectsUnknownAndOtherSpellings) {
  for (const char* s : {"", "bf16", "f32", "F8", "F8_E4M3FN", "U64", "C64", "F32 ", "float32"})
    EXPECT_FALSE(parse_dtype(s).has_value()) << s;
}

TEST(DType, ParseUserDtype) {
  EXPECT_EQ(parse_user_dtype("bf16"), DType::BF16);
  EXPECT_EQ(parse_user_dtype("bfloat16"), DType::BF16);
  EXPECT_EQ(parse_user_dtype("f16"), DType::F16);
  EXPECT_EQ(parse_user_dtype("fp16"), DType::F16);
  EXPECT_EQ(parse_user_dtype("float16"), DType::F16);
  EXPECT_EQ(parse_user_dtype("f32"), DType::F32);
  EXPECT_EQ(parse_user_dtype("fp32"), DType::F32);
  EXPECT_EQ(parse_user_dtype("float32"), DType::F32);
  EXPECT_FALSE(parse_user_dtype("f64").has_value());
  EXPECT_FALSE(parse_user_dtype("int8").has_value());
  EXPECT_FALSE(parse_user_dtype("").has_value());
}

// ------------------------------------------------------------------ bf16

TEST(BF16, DecodeKnownValues) {
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.0f);
  EXPECT_EQ(bf16_to_f32(0xbf80), -1.0f);
  EXPECT_EQ(bf16_to_f32(0x4049), 3.140625f);
  EXPECT_EQ(bf16_to_f32(0x7f7f), from_bits(0x7f7f0000u));  // largest finite, 3.3895e38
  EXPECT_EQ(bf16_to_f32(0x0001), std::ldexp(1.0f, -133));   // smallest subnormal
  EXPECT_EQ(bits(bf16_to_f32(0x8000)), 0x80000000u);        // -0
  EXPECT_TRUE(std::isinf(bf16_to_f32(0x7f80)) && bf16_to_f32(0x7f80) > 0);
  EXPECT_TRUE(std::isinf(bf16_to_f32(0xff80)) && bf16_to_f32(0xff80) < 0);
  EXPECT_TRUE(std::isnan(bf16_to_f32(0x7fc0)));
}

// from_f32 to f16 of an array (8 at a time with F16C where the CPU has it) gives f32_to_f16 of each
// element, bit for bit: at every midpoint between neighbouring f16 values and one f32 ulp on each
// side (ties to even), the subnormal and overflow edges, NaNs with payloads, and 2^32 / 65,521 patterns
// spread over every exponent; from an odd address, with a tail that is not a whole block.
TEST(DType, F16ArraysConvertAsEachElement) {
  std::vector<float> x;
  auto add_bits = [&](uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    x.push_back(f);
  };
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const float a = f16_to_f32(static_cast<uint16_t>(h)), b = f16_to_f32(static_cast<uint16_t>(h + 1));
    const float m = a + (b - a) / 2;  // exact: 12 significant bits
    for (float v : {m, std::nextafter(m, 0.0f), std::nextafter(m, 1e30f), a})
      for (float sgn : {1.0f, -1.0f}) x.push_back(sgn * v);
  }
  for (uint32_t u : {0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7f800001u, 0xffc12345u, 0x7fbfffffu, 0x477fefffu, 0x477ff000u,
                     0x38800000u, 0x387fffffu, 0x33000000u, 0x33000001u, 0x80000001u, 0x00000001u})
    add_bits(u);
  for (uint64_t u = 0; u < (uint64_t{1} << 32); u += 65521) add_bits(static_cast<uint32_t>(u));
  x.push_back(1.0f), x.push_back(2.0f), x.push_back(3.0f);  // a tail of 3 after the blocks of 8 (x.size() % 8 checked below)
  while (x.size() % 8 != 3) x.push_back(0.5f);
  std::vector<uint8_t> out(1 + 2 * x.size());
  from_f32(DType::F16, x.data(), out.data() + 1, x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    uint16_t got;
    std::memcpy(&got, out.data() + 1 + 2 * i, 2);
    ASSERT_EQ(got, f32_to_f16(x[i])) << "element " << i << " (" << x[i] << ")";
  }
}

// to_f32 of a bf16 array (8 at a time where SSE2 is there) gives bf16_to_f32 of each element, bit
// for bit: every one of the 65,536 patterns (NaNs and Infs included), from an odd address and with
// a tail that is not a whole vector.
TEST(DType, Bf16ArraysConvertAsEachElement) {
  const size_t n = 65536 + 5;
  std::vector<uint8_t> bytes(1 + 2 * n);
  for (size_t i = 0; i < n; ++i) {
    const auto h = static_cast<uint16_t>(i * 40503u);  // odd multiplier: every pattern once in the first 65,536
    std::memcpy(bytes.data() + 1 + 2 * i, &h, 2);
  }
  std::vector<float> got(n);
  to_f32(DType::BF16, bytes.data() + 1, got.data(), n);
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, bytes.data() + 1 + 2 * i, 2);
    const float want = bf16_to_f32(h);
    ASSERT_EQ(std::memcmp(&got[i], &want, 4), 0) << "element " << i << " (0x" << std::hex << h << ")";
  }
}

TEST(BF16, EncodeRoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  // Tie between 0x3f80 (even) and 0x3f81: goes to even.
  EXPECT_EQ(f32_to_bf16(from_bits(0x3f808000u)), 0x3f80);
  // Tie between 0x3f81 (odd) and 0x3f82: goes to even (up).
  EXPECT_EQ(f32_to_bf16(from_bits(0x3f818000u)), 0x3f82);
  // Just above / below the tie.
  EXPECT_EQ(f32_to_bf16(from_bits(0x3f808001u)), 0x3f81);
  EXPECT_EQ(f32_to_bf16(from_bits(0x3f807fffu)), 0x3f80);
  // Negative tie.
  EXPECT_EQ(f32_to_bf16(from_bits(0xbf818000u)), 0xbf82);
  // Carry into the exponent: 0x3fff8000 is a tie between 0x3fff (odd) and 0x4000.
  EXPECT_EQ(f32_to_bf16(from_bits(0x3fff8000u)), 0x4000);
  // Subnormals round the same way.
  EXPECT_EQ(f32_to_bf16(from_bits(0x00008000u)), 0x0000);
  EXPECT_EQ(f32_to_bf16(from_bits(0x00018000u)), 0x0002);
  EXPECT_EQ(f32_to_bf16(from_bits(0x00010000u)), 0x0001);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
}

TEST(BF16, OverflowInfNaN) {
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds past the max: inf
  EXPECT_EQ(f32_to_bf16(from_bits(0x7f7f7fffu)), 0x7f7f);               // below the tie: max finite
  EXPECT_EQ(f32_to_bf16(from_bits(0x7f7f8000u)), 0x7f80);               // tie with odd max: inf
  EXPECT_EQ(f32_to_bf16(INFINITY), 0x7f80);
  EXPECT_EQ(f32_to_bf16(-INFINITY), 0xff80);
  const uint16_t n = f32_to_bf16(NAN);
  EXPECT_EQ(n & 0x7f80, 0x7f80);
  EXPECT_NE(n & 0x007f, 0);
  // A NaN whose payload lives only in the low 16 bits must stay NaN (not become inf).
  const uint16_t n2 = f32_to_bf16(from_bits(0x7f800001u));
  EXPECT_TRUE(std::isnan(bf16_to_f32(n2))) << std::hex << n2;
  const uint16_t n3 = f32_to_bf16(from_bits(0xff800001u));
  EXPECT_TRUE(std::isnan(bf16_to_f32(n3)));
  EXPECT_EQ(n3 & 0x8000, 0x8000);
}

TEST(BF16, AllCodesRoundTrip) {
  for (uint32_t c = 0; c < 65536; ++c) {
    const float f = bf16_to_f32(static_cast<uint16_t>(c));
    EXPECT_EQ(bits(f), c << 16);  // decode is exact: the bf16 bits are the top half
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(f)))) << c;
    } else {
      ASSERT_EQ(f32_to_bf16(f), c) << "code 0x" << std::hex << c;
    }
  }
}

// ------------------------------------------------------------------ f16

TEST(F16, DecodeKnownValues) {
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_f32(0x0400), std::ldexp(1.0f, -14));  // smallest normal
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(f16_to_f32(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_EQ(f16_to_f32(0x8001), -std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_f32(0x3555), 0.25f * (1.0f + 0x155 / 1024.0f));  // 0.33325195
  EXPECT_EQ(bits(f16_to_f32(0x8000)), 0x80000000u);
  EXPECT_EQ(f16_to_f32(0x7c00), INFINITY);
  EXPECT_EQ(f16_to_f32(0xfc00), -INFINITY);
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7e00)));
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7c01)));
}

TEST(F16, EncodeRoundsToNearestEven) {
  const float ulp1 = std::ldexp(1.0f, -10);
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(f32_to_f16(1.0f + ulp1 / 2), 0x3c00);      // tie -> even
  EXPECT_EQ(f32_to_f16(1.0f + 3 * ulp1 / 2), 0x3c02);  // tie -> even (up)
  EXPECT_EQ(f32_to_f16(std::nextafter(1.0f + ulp1 / 2, 2.0f)), 0x3c01);
  EXPECT_EQ(f32_to_f16(std::nextafter(1.0f + ulp1 / 2, 0.0f)), 0x3c00);
  EXPECT_EQ(f32_to_f16(-1.0f - ulp1 / 2), 0xbc00);
  EXPECT_EQ(f32_to_f16(2.0f - ulp1 / 4), 0x4000);  // tie between 0x3bff and 0x4000: carry to even
  EXPECT_EQ(f32_to_f16(0.1f), 0x2e66);
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
}

TEST(F16, Subnormals) {
  const float q = std::ldexp(1.0f, -24);  // subnormal quantum
  EXPECT_EQ(f32_to_f16(q), 0x0001);
  EXPECT_EQ(f32_to_f16(q / 2), 0x0000);      // tie with 0 -> 0 (even)
  EXPECT_EQ(f32_to_f16(-q / 2), 0x8000);
  EXPECT_EQ(f32_to_f16(std::nextafter(q / 2, 1.0f)), 0x0001);
  EXPECT_EQ(f32_to_f16(1.5f * q), 0x0002);   // tie 1|2 -> 2
  EXPECT_EQ(f32_to_f16(2.5f * q), 0x0002);   // tie 2|3 -> 2
  EXPECT_EQ(f32_to_f16(1023.5f * q), 0x0400);  // tie 0x3ff|0x400 -> smallest normal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -30)), 0x0000);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::denorm_min()), 0x0000);
}

TEST(F16, OverflowInfNaN) {
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // tie between max (odd) and 2^16: inf
  EXPECT_EQ(f32_to_f16(1e6f), 0x7c00);
  EXPECT_EQ(f32_to_f16(-1e6f), 0xfc00);
  EXPECT_EQ(f32_to_f16(INFINITY), 0x7c00);
  EXPECT_EQ(f32_to_f16(-INFINITY), 0xfc00);
  const uint16_t n = f32_to_f16(NAN);
  EXPECT_EQ(n & 0x7c00, 0x7c00);
  EXPECT_NE(n & 0x03ff, 0);
}

TEST(F16, AllCodesRoundTrip) {
  for (uint32_t c = 0; c < 65536; ++c) {
    const float f = f16_to_f32(static_cast<uint16_t>(c));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f)))) << c;
    } else {
      ASSERT_EQ(f32_to_f16(f), c) << "code 0x" << std::hex << c;
    }
  }
}

// ------------------------------------------------------------------ f8

TEST(F8E4M3, KnownValues) {
  EXPECT_EQ(f8e4m3_to_f32(0x38), 1.0f);
  EXPECT_EQ(f8e4m3_to_f32(0xb8), -1.0f);
  EXPECT_EQ(f8e4m3_to_f32(0x7e), 448.0f);  // largest finite
  EXPECT_EQ(f8e4m3_to_f32(0xfe), -448.0f);
  EXPECT_EQ(f8e4m3_to_f32(0x78), 256.0f);
  EXPECT_EQ(f8e4m3_to_f32(0x08), std::ldexp(1.0f, -6));   // smallest normal
  EXPECT_EQ(f8e4m3_to_f32(0x07), std::ldexp(7.0f, -9));   // largest subnormal
  EXPECT_EQ(f8e4m3_to_f32(0x01), std::ldexp(1.0f, -9));   // smallest subnormal
  EXPECT_EQ(f8e4m3_to_f32(0x00), 0.0f);
  EXPECT_EQ(bits(f8e4m3_to_f32(0x80)), 0x80000000u);
  EXPECT_EQ(f8e4m3_to_f32(0x77), 240.0f);  // exponent 14, mantissa 7: 1.875 * 128
  // No infinities in the fn variant: only S.1111.111 is NaN.
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0x7f)));
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0xff)));
  for (int c = 0; c < 256; ++c)
    if ((c & 0x7f) != 0x7f) {
      EXPECT_TRUE(std::isfinite(f8e4m3_to_f32(static_cast<uint8_t>(c)))) << c;
    }
}

TEST(F8E4M3, EncodeRoundingAndSaturation) {
  EXPECT_EQ(f32_to_f8e4m3(1.0f), 0x38);
  EXPECT_EQ(f32_to_f8e4m3(1.0625f), 0x38);  // tie 1|1.125 -> even (1)
  EXPECT_EQ(f32_to_f8e4m3(1.1875f), 0x3a);  // tie 1.125|1.25 -> even (1.25)
  EXPECT_EQ(f32_to_f8e4m3(std::nextafter(1.0625f, 2.0f)), 0x39);
  EXPECT_EQ(f32_to_f8e4m3(448.0f), 0x7e);
  EXPECT_EQ(f32_to_f8e4m3(464.0f), 0x7e);   // tie 448|480 -> 448 (even)
  EXPECT_EQ(f32_to_f8e4m3(480.0f), 0x7e);   // out of range: saturates to the largest finite
  EXPECT_EQ(f32_to_f8e4m3(1e9f), 0x7e);
  EXPECT_EQ(f32_to_f8e4m3(-1e9f), 0xfe);
  EXPECT_EQ(f32_to_f8e4m3(INFINITY), 0x7e);
  EXPECT_EQ(f32_to_f8e4m3(-INFINITY), 0xfe);
  EXPECT_EQ(f32_to_f8e4m3(NAN) & 0x7f, 0x7f);
  // Subnormals: quantum 2^-9.
  EXPECT_EQ(f32_to_f8e4m3(std::ldexp(1.0f, -10)), 0x00);       // tie with 0 -> 0
  EXPECT_EQ(f32_to_f8e4m3(-std::ldexp(1.0f, -10)), 0x80);
  EXPECT_EQ(f32_to_f8e4m3(std::ldexp(3.0f, -10)), 0x02);       // tie 1|2 -> 2
  EXPECT_EQ(f32_to_f8e4m3(std::ldexp(15.0f, -10)), 0x08);      // tie 7|8 -> smallest normal
  EXPECT_EQ(f32_to_f8e4m3(std::ldexp(1.0f, -12)), 0x00);
  EXPECT_EQ(f32_to_f8e4m3(-0.0f), 0x80);
}

TEST(F8E4M3, AllCodesRoundTrip) {
  for (int c = 0; c < 256; ++c) {
    const float f = f8e4m3_to_f32(static_cast<uint8_t>(c));
    ASSERT_EQ(f32_to_f8e4m3(f), c) << "code 0x" << std::hex << c << " value " << f;
  }
}

TEST(F8E5M2, KnownValues) {
  EXPECT_EQ(f8e5m2_to_f32(0x3c), 1.0f);
  EXPECT_EQ(f8e5m2_to_f32(0xbc), -1.0f);
  EXPECT_EQ(f8e5m2_to_f32(0x7b), 57344.0f);  // largest finite
  EXPECT_EQ(f8e5m2_to_f32(0x04), std::ldexp(1.0f, -14));
  EXPECT_EQ(f8e5m2_to_f32(0x01), std::ldexp(1.0f, -16));
  EXPECT_EQ(f8e5m2_to_f32(0x03), std::ldexp(3.0f, -16));
  EXPECT_EQ(f8e5m2_to_f32(0x7c), INFINITY);
  EXPECT_EQ(f8e5m2_to_f32(0xfc), -INFINITY);
  for (int c : {0x7d, 0x7e, 0x7f, 0xfd, 0xfe, 0xff}) EXPECT_TRUE(std::isnan(f8e5m2_to_f32(static_cast<uint8_t>(c)))) << c;
  // E5M2 is the top byte of an f16: decoding agrees with f16.
  for (int c = 0; c < 256; ++c) {
    const float a = f8e5m2_to_f32(static_cast<uint8_t>(c)), b = f16_to_f32(static_cast<uint16_t>(c << 8));
    if (std::isnan(a)) {
      EXPECT_TRUE(std::isnan(b));
    } else {
      EXPECT_EQ(a, b) << c;
    }
  }
}

TEST(F8E5M2, EncodeRoundingOverflow) {
  EXPECT_EQ(f32_to_f8e5m2(57344.0f), 0x7b);
  EXPECT_EQ(f32_to_f8e5m2(61439.0f), 0x7b);
  EXPECT_EQ(f32_to_f8e5m2(61440.0f), 0x7c);  // tie between max (odd) and 2^16: inf
  EXPECT_EQ(f32_to_f8e5m2(1e9f), 0x7c);
  EXPECT_EQ(f32_to_f8e5m2(-1e9f), 0xfc);
  EXPECT_EQ(f32_to_f8e5m2(INFINITY), 0x7c);
  EXPECT_EQ(f32_to_f8e5m2(-INFINITY), 0xfc);
  EXPECT_TRUE(std::isnan(f8e5m2_to_f32(f32_to_f8e5m2(NAN))));
  EXPECT_EQ(f32_to_f8e5m2(1.125f), 0x3c);  // tie 1|1.25 -> 1
  EXPECT_EQ(f32_to_f8e5m2(1.375f), 0x3e);  // tie 1.25|1.5 -> 1.5
  EXPECT_EQ(f32_to_f8e5m2(std::ldexp(1.0f, -17)), 0x00);  // tie with 0
  EXPECT_EQ(f32_to_f8e5m2(std::ldexp(3.0f, -17)), 0x02);
  EXPECT_EQ(f32_to_f8e5m2(-0.0f), 0x80);
}

TEST(F8E5M2, AllCodesRoundTrip) {
  for (int c = 0; c < 256; ++c) {
    const float f = f8e5m2_to_f32(static_cast<uint8_t>(c));
    if (std::isnan(f)) {
      const uint8_t back = f32_to_f8e5m2(f);
      EXPECT_TRUE(std::isnan(f8e5m2_to_f32(back))) << c;
      EXPECT_EQ(back & 0x80, c & 0x80) << "NaN sign, code " << c;
    } else {
      ASSERT_EQ(f32_to_f8e5m2(f), c) << "code 0x" << std::hex << c << " value " << f;
    }
  }
}

// ------------------------------------------------------------------ brute-force reference

struct Format {
  const char* name;
  int bits;
  std::function<float(uint32_t)> decode;
  std::function<uint32_t(float)> encode;
};

// Nearest representable value, ties to the even code, by searching the sorted code table.
// Only for |x| <= the largest finite value.
class Reference {
 public:
  explicit Reference(const Format& f) : f_(f) {
    const uint32_t sign = 1u << (f.bits - 1);
    for (uint32_t c = 0; c < sign; ++c) {
      const float v = f.decode(c);
      if (std::isfinite(v)) table_.push_back({v, c});
    }
    std::sort(table_.begin(), table_.end(), [](auto& a, auto& b) { return a.first < b.first; });
    max_ = table_.back().first;
    sign_ = sign;
  }
  float max() const { return max_; }
  uint32_t round(float x) const {
    const float a = std::fabs(x);
    auto hi = std::lower_bound(table_.begin(), table_.end(), a, [](auto& p, float v) { return p.first < v; });
    uint32_t code;
    if (hi->first == a) {
      code = hi->second;
    } else {
      auto lo = hi - 1;
      const double dl = static_cast<double>(a) - lo->first, dh = static_cast<double>(hi->first) - a;
      if (dl < dh) code = lo->second;
      else if (dh < dl) code = hi->second;
      else code = (lo->second % 2 == 0) ? lo->second : hi->second;
    }
    return std::signbit(x) ? (code | sign_) : code;
  }
  const std::vector<std::pair<float, uint32_t>>& table() const { return table_; }

 private:
  Format f_;
  std::vector<std::pair<float, uint32_t>> table_;
  float max_ = 0;
  uint32_t sign_ = 0;
};

std::vector<Format> formats() {
  return {
      {"bf16", 16, [](uint32_t c) { return bf16_to_f32(static_cast<uint16_t>(c)); },
       [](float f) { return static_cast<uint32_t>(f32_to_bf16(f)); }},
      {"f16", 16, [](uint32_t c) { return f16_to_f32(static_cast<uint16_t>(c)); },
       [](float f) { return static_cast<uint32_t>(f32_to_f16(f)); }},
      {"e4m3", 8, [](uint32_t c) { return f8e4m3_to_f32(static_cast<uint8_t>(c)); },
       [](float f) { return static_cast<uint32_t>(f32_to_f8e4m3(f)); }},
      {"e5m2", 8, [](uint32_t c) { return f8e5m2_to_f32(static_cast<uint8_t>(c)); },
       [](float f) { return static_cast<uint32_t>(f32_to_f8e5m2(f)); }},
  };
}

TEST(RoundToNearestEven, EveryMidpointAndItsNeighbours) {
  for (const auto& f : formats()) {
    SCOPED_TRACE(f.name);
    Reference ref(f);
    const auto& t = ref.table();
    int checked = 0;
    for (size_t i = 0; i + 1 < t.size(); ++i) {
      const float mid = static_cast<float>((static_cast<double>(t[i].first) + t[i + 1].first) / 2);
      ASSERT_EQ(static_cast<double>(mid), (static_cast<double>(t[i].first) + t[i + 1].first) / 2) << "midpoint not exact";
      for (float x : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY), -mid}) {
        ASSERT_EQ(f.encode(x), ref.round(x)) << "x=" << x << " between codes " << t[i].second << " and " << t[i + 1].second;
        ++checked;
      }
    }
    EXPECT_GT(checked, 4 * 100);
  }
}

TEST(RoundToNearestEven, RandomValuesAgainstReference) {
  std::mt19937_64 rng(12345);
  for (const auto& f : formats()) {
    SCOPED_TRACE(f.name);
    Reference ref(f);
    const int max_exp = static_cast<int>(std::floor(std::log2(ref.max())));
    // From a few binades below the smallest subnormal (table()[0] is zero) to the largest binade.
    const int min_exp = std::max(-149, static_cast<int>(std::floor(std::log2(ref.table()[1].first))) - 3);
    std::uniform_int_distribution<int> exp(min_exp, max_exp);
    std::uniform_real_distribution<float> mant(1.0f, 2.0f);
    for (int i = 0; i < 100000; ++i) {
      float x = std::ldexp(mant(rng), exp(rng));
      if (x > ref.max()) x = ref.max();
      if (rng() & 1) x = -x;
      ASSERT_EQ(f.encode(x), ref.round(x)) << "x=" << x << " (bits 0x" << std::hex << bits(x) << ")";
    }
  }
}

// ------------------------------------------------------------------ buffers

TEST(Convert, ToF32ByValueForEveryDtype) {
  float out[4];
  {
    const double src[] = {1.5, -2.25, 1e-300, 3.0e38};
    to_f32(DType::F64, src, out, 4);
    EXPECT_EQ(out[0], 1.5f);
    EXPECT_EQ(out[1], -2.25f);
    EXPECT_EQ(out[2], 0.0f);
    EXPECT_EQ(out[3], 3.0e38f);
  }
  {
    const uint16_t src[] = {0x3f80, 0xc040, 0x0001, 0x7f80};
    to_f32(DType::BF16, src, out, 4);
    EXPECT_EQ(out[0], 1.0f);
    EXPECT_EQ(out[1], -3.0f);
    EXPECT_EQ(out[2], std::ldexp(1.0f, -133));
    EXPECT_EQ(out[3], INFINITY);
  }
  {
    const uint16_t src[] = {0x3c00, 0xc200, 0x0001, 0x7bff};
    to_f32(DType::F16, src, out, 4);
    EXPECT_EQ(out[0], 1.0f);
    EXPECT_EQ(out[1], -3.0f);
    EXPECT_EQ(out[2], std::ldexp(1.0f, -24));
    EXPECT_EQ(out[3], 65504.0f);
  }
  {
    const uint8_t src[] = {0x38, 0x7e, 0x01, 0xc0};
    to_f32(DType::F8_E4M3, src, out, 4);
    EXPECT_EQ(out[0], 1.0f);
    EXPECT_EQ(out[1], 448.0f);
    EXPECT_EQ(out[2], std::ldexp(1.0f, -9));
    EXPECT_EQ(out[3], -2.0f);
  }
  {
    const uint8_t src[] = {0x3c, 0x7b, 0x01, 0xc0};
    to_f32(DType::F8_E5M2, src, out, 4);
    EXPECT_EQ(out[0], 1.0f);
    EXPECT_EQ(out[1], 57344.0f);
    EXPECT_EQ(out[2], std::ldexp(1.0f, -16));
    EXPECT_EQ(out[3], -2.0f);
  }
  {
    const int64_t src[] = {-5, 0, int64_t{1} << 40, 7};
    to_f32(DType::I64, src, out, 4);
    EXPECT_EQ(out[0], -5.0f);
    EXPECT_EQ(out[2], std::ldexp(1.0f, 40));
    EXPECT_EQ(out[3], 7.0f);
  }
  {
    const int32_t src[] = {-2147483647 - 1, 16777216, -1, 3};
    to_f32(DType::I32, src, out, 4);
    EXPECT_EQ(out[0], -2147483648.0f);
    EXPECT_EQ(out[1], 16777216.0f);
    EXPECT_EQ(out[2], -1.0f);
  }
  {
    const int16_t src[] = {-32768, 32767, 0, -1};
    to_f32(DType::I16, src, out, 4);
    EXPECT_EQ(out[0], -32768.0f);
    EXPECT_EQ(out[1], 32767.0f);
    EXPECT_EQ(out[3], -1.0f);
  }
  {
    const int8_t src[] = {-128, 127, 0, -1};
    to_f32(DType::I8, src, out, 4);
    EXPECT_EQ(out[0], -128.0f);
    EXPECT_EQ(out[1], 127.0f);
    EXPECT_EQ(out[3], -1.0f);
  }
  {
    const uint8_t src[] = {255, 0, 128, 1};
    to_f32(DType::U8, src, out, 4);
    EXPECT_EQ(out[0], 255.0f);
    EXPECT_EQ(out[2], 128.0f);
  }
  {
    const uint8_t src[] = {1, 0, 1, 0};
    to_f32(DType::BOOL, src, out, 4);
    EXPECT_EQ(out[0], 1.0f);
    EXPECT_EQ(out[1], 0.0f);
  }
  {
    const uint16_t src[] = {65535, 0, 32768, 1};
    to_f32(DType::U16, src, out, 4);
    EXPECT_EQ(out[0], 65535.0f);
    EXPECT_EQ(out[2], 32768.0f);
  }
  {
    const uint32_t src[] = {4000000000u, 0, 7, 1};
    to_f32(DType::U32, src, out, 4);
    EXPECT_EQ(out[0], 4000000000.0f);
    EXPECT_EQ(out[2], 7.0f);
  }
}

TEST(Convert, FromF32ToFloatTypesAndRejectsIntegers) {
  const float src[] = {1.0f, -448.0f, 0.5f};
  uint16_t h[3];
  from_f32(DType::BF16, src, h, 3);
  EXPECT_EQ(h[0], 0x3f80);
  EXPECT_EQ(h[1], 0xc3e0);
  EXPECT_EQ(h[2], 0x3f00);
  from_f32(DType::F16, src, h, 3);
  EXPECT_EQ(h[0], 0x3c00);
  EXPECT_EQ(h[1], 0xdf00);
  uint8_t b[3];
  from_f32(DType::F8_E4M3, src, b, 3);
  EXPECT_EQ(b[0], 0x38);
  EXPECT_EQ(b[1], 0xfe);
  EXPECT_EQ(b[2], 0x30);
  double d[3];
  from_f32(DType::F64, src, d, 3);
  EXPECT_EQ(d[1], -448.0);
  int32_t i[3];
  for (DType t : {DType::I8, DType::U8, DType::I16, DType::I32, DType::I64, DType::BOOL, DType::U16, DType::U32}) {
    try {
      from_f32(t, src, i, 1);
      ADD_FAILURE() << "from_f32 to " << dtype_name(t) << " did not throw";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::NotSupported);
      EXPECT_NE(e.message().find(dtype_name(t)), std::string::npos) << e.message();
    }
  }
}

TEST(Convert, SameDtypeIsBitCopy) {
  // Even NaN payloads and signalling NaNs survive a same-dtype convert.
  const uint16_t src[] = {0x7f81, 0xffff, 0x0001, 0x8000};
  uint16_t dst[4] = {};
  convert(DType::BF16, src, DType::BF16, dst, 4);
  EXPECT_EQ(std::memcmp(src, dst, sizeof src), 0);
  const uint32_t fsrc[] = {0x7f800001u, 0xffc00001u};
  uint32_t fdst[2] = {};
  convert(DType::F32, fsrc, DType::F32, fdst, 2);
  EXPECT_EQ(fdst[0], 0x7f800001u);
  EXPECT_EQ(fdst[1], 0xffc00001u);
}

TEST(Convert, LargeBuffersCrossChunkBoundaries) {
  // convert() works in chunks of 4096: make sure every element of a long odd-sized buffer is done.
  const size_t n = 3 * 4096 + 17;
  std::vector<uint16_t> src(n), dst(n);
  std::vector<float> f32(n);
  for (size_t i = 0; i < n; ++i) src[i] = static_cast<uint16_t>(0x3c00 + (i % 1000));
  convert(DType::F16, src.data(), DType::F32, f32.data(), n);
  convert(DType::F32, f32.data(), DType::F16, dst.data(), n);
  EXPECT_EQ(src, dst);
  std::vector<uint16_t> bf(n);
  convert(DType::F16, src.data(), DType::BF16, bf.data(), n);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(bf[i], f32_to_bf16(f16_to_f32(src[i]))) << i;
}

TEST(Convert, BF16ToF32AndBackIsExact) {
  std::vector<uint16_t> src;
  for (uint32_t c = 0; c < 65536; ++c)
    if (!std::isnan(bf16_to_f32(static_cast<uint16_t>(c)))) src.push_back(static_cast<uint16_t>(c));
  std::vector<float> mid(src.size());
  std::vector<uint16_t> back(src.size());
  convert(DType::BF16, src.data(), DType::F32, mid.data(), src.size());
  convert(DType::F32, mid.data(), DType::BF16, back.data(), src.size());
  EXPECT_EQ(src, back);
}

TEST(Convert, ToIntegerTypesIsRejected) {
  const float src[] = {1.0f};
  int32_t dst[1];
  EXPECT_THROW(convert(DType::F32, src, DType::I32, dst, 1), Error);
  EXPECT_THROW(convert(DType::BF16, src, DType::BOOL, dst, 1), Error);
}

TEST(Convert, F64ToF32RoundsToNearestEven) {
  // 1 + 2^-24 is a tie between 1 and 1 + 2^-23: to even (1).
  const double src[] = {1.0 + std::ldexp(1.0, -24), 1.0 + 3 * std::ldexp(1.0, -24), 1.0 + std::ldexp(1.0, -24) + std::ldexp(1.0, -50)};
  float dst[3];
  convert(DType::F64, src, DType::F32, dst, 3);
  EXPECT_EQ(bits(dst[0]), 0x3f800000u);
  EXPECT_EQ(bits(dst[1]), 0x3f800002u);
  EXPECT_EQ(bits(dst[2]), 0x3f800001u);
}

// F64 -> BF16/F16 must round the double once. Going through f32 rounds twice, which is wrong when
// the double lies just above a bf16 tie but the f32 rounding lands exactly on the tie.
TEST(Convert, F64ToBF16AndF16RoundOnce) {
  const double above_tie = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);  // nearest bf16: 1 + 2^-7
  const double below_tie = 1.0 + std::ldexp(1.0, -8) - std::ldexp(1.0, -40);  // nearest bf16: 1
  uint16_t b[2];
  const double s1[] = {above_tie, below_tie};
  convert(DType::F64, s1, DType::BF16, b, 2);
  EXPECT_EQ(b[0], 0x3f81) << "f64 " << above_tie << " is above the bf16 tie: must round up";
  EXPECT_EQ(b[1], 0x3f80);
  const double f16_above = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);  // nearest f16: 1 + 2^-10
  const double s2[] = {f16_above};
  convert(DType::F64, s2, DType::F16, b, 1);
  EXPECT_EQ(b[0], 0x3c01) << "f64 " << f16_above << " is above the f16 tie: must round up";
  (void)bits64;
}

}  // namespace
}  // namespace moe::core
