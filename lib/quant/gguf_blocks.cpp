#include "quant/gguf_blocks.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <limits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "core/dtype.h"
#include "core/error.h"

namespace moe::quant {

namespace {

using core::Error;

constexpr int64_t kQK = 256;  // K-quant / TQ super-block

// Sizes from ggml-common.h (static_asserts of each block struct).
const GgmlTypeInfo kTypes[] = {
    {GgmlType::F32, "f32", 1, 4, true},
    {GgmlType::F16, "f16", 1, 2, true},
    {GgmlType::Q4_0, "q4_0", 32, 2 + 16, true},
    {GgmlType::Q4_1, "q4_1", 32, 2 + 2 + 16, true},
    {GgmlType::Q5_0, "q5_0", 32, 2 + 4 + 16, true},
    {GgmlType::Q5_1, "q5_1", 32, 2 + 2 + 4 + 16, true},
    {GgmlType::Q8_0, "q8_0", 32, 2 + 32, true},
    {GgmlType::Q8_1, "q8_1", 32, 2 + 2 + 32, false},
    {GgmlType::Q2_K, "q2_k", kQK, 2 + 2 + kQK / 16 + kQK / 4, true},
    {GgmlType::Q3_K, "q3_k", kQK, 2 + kQK / 4 + kQK / 8 + 12, true},
    {GgmlType::Q4_K, "q4_k", kQK, 2 + 2 + kQK / 2 + 12, true},
    {GgmlType::Q5_K, "q5_k", kQK, 2 + 2 + kQK / 2 + kQK / 8 + 12, true},
    {GgmlType::Q6_K, "q6_k", kQK, 2 + kQK / 2 + kQK / 4 + kQK / 16, true},
    {GgmlType::Q8_K, "q8_k", kQK, 4 + kQK + kQK / 8, false},
    {GgmlType::IQ2_XXS, "iq2_xxs", kQK, 2 + kQK / 4, false},
    {GgmlType::IQ2_XS, "iq2_xs", kQK, 2 + kQK / 4 + kQK / 32, false},
    {GgmlType::IQ3_XXS, "iq3_xxs", kQK, 2 + kQK / 4 + kQK / 8, false},
    {GgmlType::IQ1_S, "iq1_s", kQK, 2 + kQK / 8 + kQK / 16, false},
    {GgmlType::IQ4_NL, "iq4_nl", 32, 2 + 16, true, true},
    {GgmlType::IQ3_S, "iq3_s", kQK, 2 + kQK / 4 + kQK / 8 + kQK / 32 + 4, false},
    {GgmlType::IQ2_S, "iq2_s", kQK, 2 + kQK / 4 + kQK / 16, false},
    {GgmlType::IQ4_XS, "iq4_xs", kQK, 2 + 2 + kQK / 2 + kQK / 64, true, true},
    {GgmlType::I8, "i8", 1, 1, false},
    {GgmlType::I16, "i16", 1, 2, false},
    {GgmlType::I32, "i32", 1, 4, false},
    {GgmlType::I64, "i64", 1, 8, false},
    {GgmlType::F64, "f64", 1, 8, false},
    {GgmlType::IQ1_M, "iq1_m", kQK, kQK / 8 + kQK / 16 + kQK / 32, false},
    {GgmlType::BF16, "bf16", 1, 2, true},
    {GgmlType::TQ1_0, "tq1_0", kQK, 2 + 4 * 13, true},
    {GgmlType::TQ2_0, "tq2_0", kQK, 2 + 64, true},
    {GgmlType::MXFP4, "mxfp4", 32, 1 + 16, true},
};

[[noreturn]] void no_codec(GgmlType t, const char* what, const std::string& names) {
  throw Error::unsupported(std::string("ggml type ") + ggml_type_info(t).name + ": no " + what +
                           " yet (types with one: " + names + ")");
}

// The f16 scale stored for `d` and its value as decode sees it.
uint16_t f16_scale(float d, float* stored) {
  const uint16_t h = core::f32_to_f16(d);
  *stored = core::f16_to_f32(h);
  if (!std::isfinite(*stored)) throw Error::invalid("block scale " + std::to_string(d) + " overflows f16");
  return h;
}

void put_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }
uint16_t get_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// std::nearbyint(v) clamped to [lo, hi], without a libm call so that the loops below vectorize:
// v is clamped to [lo - 1, hi + 1] first (every grid here lies within [-128, 255]), and adding and
// subtracting 1.5 * 2^23 rounds a float of magnitude below 2^22 to an integer, half to even, in the
// default rounding mode: the same result as nearbyint then clamp.
inline int clamp_round(float v, int lo, int hi) {
  v = std::clamp(v, static_cast<float>(lo - 1), static_cast<float>(hi + 1));
  const float r = (v + 12582912.0f) - 12582912.0f;
  return static_cast<int>(std::clamp(r, static_cast<float>(lo), static_cast<float>(hi)));
}

// The element of largest magnitude, with its sign (the first one on ties); +0 when every element
// is ±0 (NaNs are never chosen). The largest magnitude is found first, with independent maxima
// (SSE2: 8 lanes; one running element, compared and chosen, made a dependency chain of about 8
// cycles per element), then its first element.
float signed_absmax(const float* x, int n) {
  float a = 0.0f;
  int j = 0;
#if defined(__SSE2__)
  const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
  __m128 a0 = _mm_setzero_ps(), a1 = _mm_setzero_ps();
  // _mm_max_ps(v, acc) returns acc when v is NaN: a NaN is skipped as the scalar comparison skips it.
  for (; j + 8 <= n; j += 8) {
    a0 = _mm_max_ps(_mm_and_ps(_mm_loadu_ps(x + j), abs_mask), a0);
    a1 = _mm_max_ps(_mm_and_ps(_mm_loadu_ps(x + j + 4), abs_mask), a1);
  }
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, _mm_max_ps(a0, a1));
  for (const float l : lanes) a = std::max(a, l);
#endif
  for (; j < n; ++j) a = std::fabs(x[j]) > a ? std::fabs(x[j]) : a;
  if (a == 0.0f) return 0.0f;
  for (j = 0; j < n; ++j)
    if (std::fabs(x[j]) == a) break;
  return x[j];
}

// Packs 32 codes (0..31) into nibbles qs[16] (element j low, j + 16 high) and, when qh is not
// null, bit 4 of element j into bit j of the little-endian u32 at qh.
void pack_nibbles(const int* q, uint8_t* qs, uint8_t* qh) {
  uint32_t high = 0;
  for (int j = 0; j < 16; ++j) {
    qs[j] = static_cast<uint8_t>((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
    high |= static_cast<uint32_t>((q[j] >> 4) & 1) << j;
    high |= static_cast<uint32_t>((q[j + 16] >> 4) & 1) << (j + 16);
  }
  if (qh) std::memcpy(qh, &high, 4);
}

void unpack_nibbles(const uint8_t* qs, const uint8_t* qh, int* q) {
  uint32_t high = 0;
  if (qh) std::memcpy(&high, qh, 4);
  for (int j = 0; j < 16; ++j) {
    q[j] = (qs[j] & 0xF) | static_cast<int>(((high >> j) & 1) << 4);
    q[j + 16] = (qs[j] >> 4) | static_cast<int>(((high >> (j + 16)) & 1) << 4);
  }
}

// Symmetric 32-blocks (Q4_0, Q5_0): d = (signed absmax) / -half, q = round(x / d) + half in
// [0, 2 * half - 1], so the largest-magnitude element maps exactly onto the grid's end -half.
void encode_sym(const float* x, uint8_t* b, int half, bool five_bit) {
  const float m = signed_absmax(x, 32);
  float d;
  put_u16(b, f16_scale(m / static_cast<float>(-half), &d));
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  int q[32];
  for (int j = 0; j < 32; ++j) q[j] = clamp_round(x[j] * id, -half, half - 1) + half;
  pack_nibbles(q, five_bit ? b + 6 : b + 2, five_bit ? b + 2 : nullptr);
}

void decode_sym(const uint8_t* b, float* y, int half, bool five_bit) {
  const float d = core::f16_to_f32(get_u16(b));
  int q[32];
  unpack_nibbles(five_bit ? b + 6 : b + 2, five_bit ? b + 2 : nullptr, q);
  for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(q[j] - half);
}

// Asymmetric 32-blocks (Q4_1, Q5_1): m = min, d = (max - min) / levels, q = round((x - m) / d).
void encode_asym(const float* x, uint8_t* b, int levels, bool five_bit) {
  const auto [lo, hi] = std::minmax_element(x, x + 32);
  float d, m;
  put_u16(b, f16_scale((*hi - *lo) / static_cast<float>(levels), &d));
  put_u16(b + 2, f16_scale(*lo, &m));
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  int q[32];
  for (int j = 0; j < 32; ++j) q[j] = clamp_round((x[j] - m) * id, 0, levels);
  pack_nibbles(q, five_bit ? b + 8 : b + 4, five_bit ? b + 4 : nullptr);
}

void decode_asym(const uint8_t* b, float* y, bool five_bit) {
  const float d = core::f16_to_f32(get_u16(b));
  const float m = core::f16_to_f32(get_u16(b + 2));
  int q[32];
  unpack_nibbles(five_bit ? b + 8 : b + 4, five_bit ? b + 4 : nullptr, q);
  for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(q[j]) + m;
}

void encode_q8_0(const float* x, uint8_t* b) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  float d;
  put_u16(b, f16_scale(amax / 127.0f, &d));
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int j = 0; j < 32; ++j) b[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(clamp_round(x[j] * id, -127, 127)));
}

void decode_q8_0(const uint8_t* b, float* y) {
  const float d = core::f16_to_f32(get_u16(b));
  for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(static_cast<int8_t>(b[2 + j]));
}

// The non-linear 4-bit grid of IQ4_NL and IQ4_XS (ggml-common.h's kvalues_iq4nl).
constexpr int8_t kIq4nlValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// 32 values of 4-bit indices into kIq4nlValues (element j low nibble of qs[j], j + 16 high), times dl.
void decode_iq4_32(const uint8_t* qs, float dl, float* y) {
  for (int j = 0; j < 16; ++j) {
    y[j] = dl * static_cast<float>(kIq4nlValues[qs[j] & 0xF]);
    y[j + 16] = dl * static_cast<float>(kIq4nlValues[qs[j] >> 4]);
  }
}

// IQ4_NL {f16 d; u8 qs[16]}: x = d * grid[q].
void decode_iq4_nl(const uint8_t* b, float* y) { decode_iq4_32(b + 2, core::f16_to_f32(get_u16(b)), y); }

// IQ4_XS {f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]}: sub-block i of 32 has the 6-bit scale
// ls = (nibble i of scales_l) | (bits 2i..2i+1 of scales_h) << 4, and x = (d * (ls - 32)) * grid[q].
void decode_iq4_xs(const uint8_t* b, float* y) {
  const float d = core::f16_to_f32(get_u16(b));
  const uint16_t scales_h = get_u16(b + 2);
  for (int i = 0; i < kQK / 32; ++i) {
    const int ls = ((b[4 + i / 2] >> (4 * (i % 2))) & 0xF) | (((scales_h >> (2 * i)) & 3) << 4);
    decode_iq4_32(b + 8 + 16 * i, d * static_cast<float>(ls - 32), y + 32 * i);
  }
}

// MXFP4 {u8 e; u8 qs[16]}: x = fp4(q) * 2^(e - 127), element j < 16 in the low nibble of qs[j],
// j + 16 in the high one. E2M1 codes: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6. e = 255 is the
// E8M0 NaN (every value NaN); e = 0 is 2^-127 (a subnormal f32, exact).
constexpr float kE2m1Values[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                   -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
void decode_mxfp4(const uint8_t* b, float* y) {
  const float d = b[0] == 0xFF ? std::numeric_limits<float>::quiet_NaN() : std::ldexp(1.0f, static_cast<int>(b[0]) - 127);
  for (int j = 0; j < 16; ++j) {
    y[j] = kE2m1Values[b[1 + j] & 0xF] * d;
    y[j + 16] = kE2m1Values[b[1 + j] >> 4] * d;
  }
}

// MXFP4 encoder (OCP Microscaling Formats v1.0, section 6.3): the block's shared exponent is
// floor(log2(amax)) - 2 (2 = the largest E2M1 exponent: 6 = 1.5 * 2^2), stored as E8M0 e = that + 127
// clamped to [0, 254] (an all-zero block: e = 0); each x / 2^(e - 127) rounded to the nearest E2M1
// value, ties to the even code (the one whose mantissa bit is 0), beyond 6 clamped to 6 (the spec's
// saturation). x / 2^(e - 127) is exact in float (a power of two), so the rounding is on x itself.
uint8_t e2m1_code(float v) {
  const float a = std::fabs(v);
  int code = 7;
  for (int c = 0; c < 7; ++c) {
    const float mid = 0.5f * (kE2m1Values[c] + kE2m1Values[c + 1]);
    if (a < mid || (a == mid && c % 2 == 0)) {
      code = c;
      break;
    }
  }
  return static_cast<uint8_t>(code | (std::signbit(v) && code != 0 ? 8 : 0));
}
void encode_mxfp4(const float* x, uint8_t* b) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  int e = 0;
  if (amax > 0.0f) {
    int exp2 = 0;
    std::frexp(amax, &exp2);  // amax = m * 2^exp2, m in [0.5, 1): floor(log2(amax)) = exp2 - 1
    e = std::clamp(exp2 - 1 - 2 + 127, 0, 254);
  }
  b[0] = static_cast<uint8_t>(e);
  const float inv = std::ldexp(1.0f, 127 - e);  // 1 / 2^(e - 127), at most 2^127: finite
  for (int j = 0; j < 16; ++j) b[1 + j] = static_cast<uint8_t>(e2m1_code(x[j] * inv) | e2m1_code(x[j + 16] * inv) << 4);
}

// Ternary 256-blocks as quantize_row_tq1_0_ref / tq2_0_ref round them (and the ternary-tq codec,
// quant/ternary.h): d = absmax, stored f16(d); t = lroundf(x · (1/d)) + 1 in {0, 1, 2} with 1/d
// of the unrounded d in f32 (ties away from zero: |x| = d/2 gives ±1); x = d * (t - 1).
void ternary_codes(const float* x, float* d, uint16_t* dh, int* t) {
  float amax = 0.0f;
  for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[j]));
  *dh = f16_scale(amax, d);
  const float id = amax != 0.0f ? 1.0f / amax : 0.0f;
  for (int j = 0; j < kQK; ++j) t[j] = static_cast<int>(std::clamp(std::lroundf(x[j] * id), -1L, 1L)) + 1;
}

// TQ2_0 {u8 qs[64]; f16 d}: element 128 * h + 32 * l + m in bits 2l..2l+1 of qs[32 * h + m].
// t: stored values in {0, 1, 2} (trit + 1).
void pack_tq2_0(const int* t, uint16_t dh, uint8_t* b) {
  std::memset(b, 0, 64);
  for (int e = 0; e < kQK; ++e) b[32 * (e / 128) + e % 32] |= static_cast<uint8_t>(t[e] << (2 * ((e % 128) / 32)));
  put_u16(b + 64, dh);
}

void decode_tq2_0(const uint8_t* b, float* y) {
  const float d = core::f16_to_f32(get_u16(b + 64));
  for (int e = 0; e < kQK; ++e)
    y[e] = d * static_cast<float>(((b[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3) - 1);
}

// TQ1_0 {u8 qs[48]; u8 qh[4]; f16 d}: bytes of 5 trits (4 in qh, the fifth 0), the trit with
// weight 3^4 first: byte = ceil(sum t_k 3^(4-k) * 256 / 243); trit n of a byte q is
// ((q * 3^n mod 256) * 3) >> 8. Element order: qs[0..31] trit n gives elements 32n + m (160),
// qs[32..47] trit n gives 160 + 16n + m (80), qh[j] trit n gives 240 + 4n + j (16).
struct Tq1Place {
  int byte, trit;
};
Tq1Place tq1_place(int e) {
  if (e < 160) return {e % 32, e / 32};
  if (e < 240) return {32 + (e - 160) % 16, (e - 160) / 16};
  return {48 + (e - 240) % 4, (e - 240) / 4};
}

void pack_tq1_0(const int* t, uint16_t dh, uint8_t* b) {
  int sum[52] = {};
  static constexpr int kPow3[5] = {81, 27, 9, 3, 1};
  for (int e = 0; e < kQK; ++e) {
    const Tq1Place p = tq1_place(e);
    sum[p.byte] += t[e] * kPow3[p.trit];
  }
  for (int k = 0; k < 52; ++k) b[k] = static_cast<uint8_t>((sum[k] * 256 + 242) / 243);
  put_u16(b + 52, dh);
}

// TQ1_0 / TQ2_0 from floats: ternary_codes, then the type's packing.
template <void (*Pack)(const int*, uint16_t, uint8_t*)>
void encode_tq(const float* x, uint8_t* b) {
  float d;
  uint16_t dh;
  int t[kQK];
  ternary_codes(x, &d, &dh, t);
  Pack(t, dh, b);
}

void decode_tq1_0(const uint8_t* b, float* y) {
  const float d = core::f16_to_f32(get_u16(b + 52));
  static constexpr int kPow3[5] = {1, 3, 9, 27, 81};
  for (int e = 0; e < kQK; ++e) {
    const Tq1Place p = tq1_place(e);
    const auto q = static_cast<uint8_t>(b[p.byte] * kPow3[p.trit]);
    y[e] = d * static_cast<float>(((q * 3) >> 8) - 1);
  }
}


// ---- K-quants: super-blocks of 256 values in sub-blocks of 16 or 32 values. Each sub-block j has
// an integer scale sc[j] (and, for the types with mins, an integer min m[j]) against the block's
// f16 d (and dmin); decode computes x = (d * sc[j]) * q - (dmin * m[j]) in float, in that order
// (dequantize_row_q*_K). The layouts are in gguf_blocks.h.

struct KSpec {
  int sub;         // values per sub-block (16 or 32)
  int qmin, qmax;  // codes as decode applies them
  int scmax;       // sub-scales in [-scmax, scmax] (signed) or [0, scmax]
  bool signed_sc;  // the types without mins: a sub-scale may be negative
  int mmax;        // sub-mins in [0, mmax]; 0 = no mins
};
constexpr KSpec kQ2K{16, 0, 3, 15, false, 15};
constexpr KSpec kQ3K{16, -4, 3, 31, true, 0};
constexpr KSpec kQ4K{32, 0, 15, 63, false, 63};
constexpr KSpec kQ5K{32, 0, 31, 63, false, 63};
constexpr KSpec kQ6K{16, -32, 31, 127, true, 0};

// A super-block as decode sees it: f16 d and dmin, sub-scales and sub-mins, codes.
struct KBlock {
  uint16_t dh = 0, dminh = 0;
  int sc[16] = {}, m[16] = {};
  int q[kQK] = {};
};

void k_values(const KSpec& s, const KBlock& b, float* y) {
  const float d = core::f16_to_f32(b.dh), dmin = core::f16_to_f32(b.dminh);
  for (int e = 0; e < kQK; ++e) {
    const int j = e / s.sub;
    y[e] = (d * static_cast<float>(b.sc[j])) * static_cast<float>(b.q[e]) - dmin * static_cast<float>(b.m[j]);
  }
}

struct KFit {
  double sse = 0;
  float max_err = 0;
};

// The nearest code of each of n values on the grid D * q - M, q in [qmin, qmax], computed as
// decode computes it (the rounded quotient and its two neighbours compared on the decoded values).
KFit nearest_codes(int qmin, int qmax, const float* x, int n, float D, float M, int* q) {
  // The codes (as floats) and their errors first, in a loop of selects without branches (the block
  // search calls this ~20 times per sub-block); then the sum in double in element order. Same
  // codes as clamp_round and the neighbours compared one by one.
  float code[32], err[32];
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  if (D == 0.0f) {
    for (int i = 0; i < n; ++i) code[i] = 0.0f, err[i] = std::fabs(x[i] + M);
  } else {
    int i = 0;
#if defined(__SSE2__)
    // The loop below, 4 values at a time (GCC 12 at -O2 does not vectorise it): the same IEEE
    // operations in the same order, the selects as masks, so the same codes and errors.
    const __m128 vD = _mm_set1_ps(D), vM = _mm_set1_ps(M), vlo = _mm_set1_ps(lo), vhi = _mm_set1_ps(hi);
    const __m128 one = _mm_set1_ps(1.0f), magic = _mm_set1_ps(12582912.0f);
    const __m128 lo1 = _mm_set1_ps(lo - 1.0f), hi1 = _mm_set1_ps(hi + 1.0f);
    const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    auto select = [](__m128 m, __m128 a, __m128 b) { return _mm_or_ps(_mm_and_ps(m, a), _mm_andnot_ps(m, b)); };
    for (; i + 4 <= n; i += 4) {
      const __m128 xi = _mm_loadu_ps(x + i);
      __m128 v = _mm_div_ps(_mm_add_ps(xi, vM), vD);
      v = select(_mm_cmplt_ps(v, lo1), lo1, select(_mm_cmpgt_ps(v, hi1), hi1, v));
      __m128 r = _mm_sub_ps(_mm_add_ps(v, magic), magic);
      r = select(_mm_cmplt_ps(r, vlo), vlo, select(_mm_cmpgt_ps(r, vhi), vhi, r));
      const __m128 rm = _mm_sub_ps(r, one), rp = _mm_add_ps(r, one);
      const __m128 e0 = _mm_and_ps(_mm_sub_ps(xi, _mm_sub_ps(_mm_mul_ps(vD, r), vM)), abs_mask);
      const __m128 em = _mm_and_ps(_mm_sub_ps(xi, _mm_sub_ps(_mm_mul_ps(vD, rm), vM)), abs_mask);
      const __m128 ep = _mm_and_ps(_mm_sub_ps(xi, _mm_sub_ps(_mm_mul_ps(vD, rp), vM)), abs_mask);
      const __m128 take_m = _mm_and_ps(_mm_cmpge_ps(rm, vlo), _mm_cmplt_ps(em, e0));
      const __m128 e1 = select(take_m, em, e0), c1 = select(take_m, rm, r);
      const __m128 take_p = _mm_and_ps(_mm_cmple_ps(rp, vhi), _mm_cmplt_ps(ep, e1));
      _mm_storeu_ps(err + i, select(take_p, ep, e1));
      _mm_storeu_ps(code + i, select(take_p, rp, c1));
    }
#endif
    for (; i < n; ++i) {
      float v = (x[i] + M) / D;
      v = v < lo - 1.0f ? lo - 1.0f : (v > hi + 1.0f ? hi + 1.0f : v);
      float r = (v + 12582912.0f) - 12582912.0f;
      r = r < lo ? lo : (r > hi ? hi : r);
      const float e0 = std::fabs(x[i] - (D * r - M));
      const float em = std::fabs(x[i] - (D * (r - 1.0f) - M));
      const float ep = std::fabs(x[i] - (D * (r + 1.0f) - M));
      const bool take_m = r - 1.0f >= lo && em < e0;
      const float e1 = take_m ? em : e0;
      const float c1 = take_m ? r - 1.0f : r;
      const bool take_p = r + 1.0f <= hi && ep < e1;
      err[i] = take_p ? ep : e1;
      code[i] = take_p ? r + 1.0f : c1;
    }
  }
  KFit f;
  for (int i = 0; i < n; ++i) {
    q[i] = static_cast<int>(code[i]);
    f.sse += static_cast<double>(err[i]) * err[i];
    f.max_err = std::max(f.max_err, err[i]);
  }
  return f;
}

// A sub-block's float scale (and min, as M = -offset >= 0) before the super-block quantizes them:
// `cover` maps the range onto the grid's ends; `fit` is the best of a few least-squares refits of
// the codes, started from scales around the cover.
struct KTarget {
  float cover_s = 0, cover_m = 0;  // the range on the grid: every value within half a step
  float s = 0, m = 0;              // least squares
};

KTarget k_target(const KSpec& s, const float* x) {
  KTarget t;
  int q[32];
  const int n = s.sub;
  if (s.mmax == 0) {
    // The largest magnitude on the grid's long end qmin, as Q4_0 does.
    const float a = signed_absmax(x, n);
    t.cover_s = t.s = a / static_cast<float>(s.qmin);
    if (a == 0.0f) return t;
    // The scales tried so far, with their codes and error: k = 0 below is the first scale again,
    // and refits often land on a scale tried before (the same codes refit the same way). A scale
    // seen before is looked up, not evaluated again: the same results, fewer evaluations.
    struct Tried {
      uint32_t bits;
      double sse;
      int q[32];
    };
    Tried tried[19];
    int ntried = 0;
    auto eval = [&](float sk) -> const Tried& {
      uint32_t bits;
      std::memcpy(&bits, &sk, 4);
      for (int i = 0; i < ntried; ++i)
        if (tried[i].bits == bits) return tried[i];
      Tried& e = tried[ntried++];
      e.bits = bits;
      e.sse = nearest_codes(s.qmin, s.qmax, x, n, sk, 0.0f, e.q).sse;
      return e;
    };
    double best = eval(t.s).sse;
    for (int k = -4; k <= 4; ++k) {
      float sk = a / (static_cast<float>(s.qmin) + 0.125f * static_cast<float>(k));
      for (int it = 0; it < 2; ++it) {
        const Tried& e = eval(sk);
        if (e.sse < best) best = e.sse, t.s = sk;
        if (it == 1) break;  // its refit would not be tried
        double sxq = 0, sqq = 0;
        for (int i = 0; i < n; ++i) sxq += static_cast<double>(x[i]) * e.q[i], sqq += static_cast<double>(e.q[i]) * e.q[i];
        if (sqq == 0) break;
        sk = static_cast<float>(sxq / sqq);
      }
    }
    return t;
  }
  // Types with mins: the grid starts at -M <= 0 (mins are stored unsigned), so the range is
  // [min(x, 0), max(x)].
  float lo = 0.0f, hi = x[0];
  for (int i = 0; i < n; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
  t.cover_s = t.s = (hi - lo) / static_cast<float>(s.qmax);
  t.cover_m = t.m = -lo;
  if (hi == lo) return t;
  double best = nearest_codes(s.qmin, s.qmax, x, n, t.s, t.m, q).sse;
  float sk = t.s, mk = t.m;
  for (int it = 0; it < 4; ++it) {
    // Least squares x ~ s * q - m with m >= 0.
    double sq = 0, sqq = 0, sx = 0, sxq = 0;
    for (int i = 0; i < n; ++i) sq += q[i], sqq += static_cast<double>(q[i]) * q[i], sx += x[i], sxq += static_cast<double>(x[i]) * q[i];
    const double det = n * sqq - sq * sq;
    if (det <= 0) break;
    double ls = (n * sxq - sq * sx) / det, lm = (ls * sq - sx) / n;
    if (lm < 0) lm = 0, ls = sxq / sqq;
    if (ls <= 0) break;
    // The refit of the last try's codes gives its scale and min back: every further try
    // would give the same codes, error and refit (converged; nothing would change).
    if (static_cast<float>(ls) == sk && static_cast<float>(lm) == mk) break;
    sk = static_cast<float>(ls), mk = static_cast<float>(lm);
    const double sse = nearest_codes(s.qmin, s.qmax, x, n, sk, mk, q).sse;
    if (sse < best) best = sse, t.s = sk, t.m = mk;
  }
  return t;
}

int ceil_div_clamped(float v, float d, int hi) {
  if (d == 0.0f) return 0;
  return static_cast<int>(std::clamp(std::ceil(v / d), 0.0f, static_cast<float>(hi)));
}

// Chooses a super-block: d (and dmin) from the sub-blocks' targets, rounded to f16; then each
// sub-block's integer scale (and min) among its rounded target, its neighbours and the one that
// covers its range, by the squared error of the nearest codes on the grid as decode reconstructs
// it, among the candidates whose largest error is at most a step (or the covering one's); then the
// codes, nearest on that grid.
KBlock k_encode(const KSpec& s, const float* x) {
  const int nsub = kQK / s.sub;
  KTarget t[16];
  for (int j = 0; j < nsub; ++j) t[j] = k_target(s, x + j * s.sub);
  KBlock b;
  float dmin = 0.0f;
  if (s.mmax > 0) {
    float mmax = 0.0f;
    for (int j = 0; j < nsub; ++j) mmax = std::max({mmax, t[j].m, t[j].cover_m});
    b.dminh = f16_scale(mmax / static_cast<float>(s.mmax), &dmin);
  }
  // The covering sub-scale once the min is quantized (rounded up, so the grid's bottom is at or
  // below the sub-block's minimum).
  int cover_m[16] = {};
  float cover_s[16];
  for (int j = 0; j < nsub; ++j) {
    cover_s[j] = t[j].cover_s;
    if (s.mmax > 0) {
      cover_m[j] = ceil_div_clamped(t[j].cover_m, dmin, s.mmax);
      float hi = x[j * s.sub];
      for (int i = 0; i < s.sub; ++i) hi = std::max(hi, x[j * s.sub + i]);
      cover_s[j] = std::max(0.0f, (hi + dmin * static_cast<float>(cover_m[j])) / static_cast<float>(s.qmax));
    }
  }
  float smax = 0.0f;
  for (int j = 0; j < nsub; ++j) smax = std::max({smax, std::fabs(t[j].s), std::fabs(cover_s[j])});
  float d;
  b.dh = f16_scale(smax / static_cast<float>(s.scmax), &d);
  const int sclo = s.signed_sc ? -s.scmax : 0;
  auto sc_of = [&](float v) { return d != 0.0f ? clamp_round(v / d, sclo, s.scmax) : 0; };
  auto m_of = [&](float v) { return dmin != 0.0f ? clamp_round(v / dmin, 0, s.mmax) : 0; };
  for (int j = 0; j < nsub; ++j) {
    const float* xj = x + j * s.sub;
    int* qj = b.q + j * s.sub;
    const int cs = s.signed_sc ? (cover_s[j] < 0 ? -1 : 1) * ceil_div_clamped(std::fabs(cover_s[j]), d, s.scmax)
                               : ceil_div_clamped(cover_s[j], d, s.scmax);
    const int rs = sc_of(t[j].s), rm = m_of(t[j].m);
    const int sc_cand[4] = {cs, rs, rs - 1, rs + 1};
    const int m_cand[4] = {cover_m[j], rm, rm - 1, rm + 1};
    const int n_m = s.mmax > 0 ? 4 : 1;
    int q[32];
    KFit cover;
    double best = 0;
    // A pair tried before is skipped: the cover is often the rounded target or its neighbour, and
    // a repeat gives the same error, which the rule below never takes twice (the same choice).
    int tried_sc[16], tried_m[16], ntried = 0;
    for (int a = 0; a < 4; ++a)
      for (int c = 0; c < n_m; ++c) {
        const int sc = sc_cand[a], m = m_cand[c];
        if (sc < sclo || sc > s.scmax || m < 0 || m > s.mmax) continue;
        bool repeat = false;
        for (int k = 0; k < ntried; ++k) repeat = repeat || (tried_sc[k] == sc && tried_m[k] == m);
        if (repeat) continue;
        tried_sc[ntried] = sc, tried_m[ntried] = m, ++ntried;
        const float D = d * static_cast<float>(sc), M = dmin * static_cast<float>(m);
        const KFit f = nearest_codes(s.qmin, s.qmax, xj, s.sub, D, M, q);
        if (a == 0 && c == 0) cover = f;
        else if (f.max_err > std::max(std::fabs(D), cover.max_err) || f.sse >= best) continue;
        best = f.sse;
        b.sc[j] = sc, b.m[j] = m;
        std::copy_n(q, s.sub, qj);
      }
  }
  return b;
}

// Element e of a super-block in the 2-bit planes of Q2_K / Q3_K (and Q6_K's high bits):
// element 128h + 32k + l in bits 2k..2k+1 of byte 32h + l.
int plane2_byte(int e) { return 32 * (e / 128) + e % 32; }
int plane2_shift(int e) { return 2 * ((e % 128) / 32); }

// Q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: u = q + 32; element 128h + 32k + l has its
// low nibble in ql[64h + 32(k % 2) + l] (high nibble for k >= 2), its high two bits as plane2.
int q6_low_byte(int e) { return 64 * (e / 128) + 32 * ((e % 128) / 32 % 2) + e % 32; }
int q6_low_shift(int e) { return 4 * ((e % 128) / 64); }

void pack_q6_k(const KBlock& k, uint8_t* b) {
  std::memset(b, 0, 208);
  for (int e = 0; e < kQK; ++e) {
    const int u = k.q[e] + 32;
    b[q6_low_byte(e)] |= static_cast<uint8_t>((u & 0xF) << q6_low_shift(e));
    b[128 + plane2_byte(e)] |= static_cast<uint8_t>((u >> 4) << plane2_shift(e));
  }
  for (int j = 0; j < 16; ++j) b[192 + j] = static_cast<uint8_t>(static_cast<int8_t>(k.sc[j]));
  put_u16(b + 208, k.dh);
}

KBlock unpack_q6_k(const uint8_t* b) {
  KBlock k;
  for (int e = 0; e < kQK; ++e)
    k.q[e] = (((b[q6_low_byte(e)] >> q6_low_shift(e)) & 0xF) | (((b[128 + plane2_byte(e)] >> plane2_shift(e)) & 3) << 4)) - 32;
  for (int j = 0; j < 16; ++j) k.sc[j] = static_cast<int8_t>(b[192 + j]);
  k.dh = get_u16(b + 208);
  return k;
}

// Q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}: u = q + 4; low two bits as plane2 in qs,
// bit 2 of element 128h + 32k + l in bit 4h + k of hmask[l]. Sub-scale j stored as sc + 32 in six
// bits: low nibble in scales[j % 8] (high nibble for j >= 8), high two bits at bit 2(j / 4) of
// scales[8 + j % 4].
int q3_hbit(int e) { return 4 * (e / 128) + (e % 128) / 32; }

void pack_q3_k(const KBlock& k, uint8_t* b) {
  std::memset(b, 0, 108);
  for (int e = 0; e < kQK; ++e) {
    const int u = k.q[e] + 4;
    b[32 + plane2_byte(e)] |= static_cast<uint8_t>((u & 3) << plane2_shift(e));
    b[e % 32] |= static_cast<uint8_t>((u >> 2) << q3_hbit(e));
  }
  for (int j = 0; j < 16; ++j) {
    const int u = k.sc[j] + 32;
    b[96 + j % 8] |= static_cast<uint8_t>((u & 0xF) << (4 * (j / 8)));
    b[96 + 8 + j % 4] |= static_cast<uint8_t>((u >> 4) << (2 * (j / 4)));
  }
  put_u16(b + 108, k.dh);
}

KBlock unpack_q3_k(const uint8_t* b) {
  KBlock k;
  for (int e = 0; e < kQK; ++e)
    k.q[e] = (((b[32 + plane2_byte(e)] >> plane2_shift(e)) & 3) | (((b[e % 32] >> q3_hbit(e)) & 1) << 2)) - 4;
  for (int j = 0; j < 16; ++j)
    k.sc[j] = (((b[96 + j % 8] >> (4 * (j / 8))) & 0xF) | (((b[96 + 8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
  k.dh = get_u16(b + 108);
  return k;
}

// Q2_K {u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}: scales[j] = sc | m << 4; codes as plane2.
void pack_q2_k(const KBlock& k, uint8_t* b) {
  for (int j = 0; j < 16; ++j) b[j] = static_cast<uint8_t>(k.sc[j] | (k.m[j] << 4));
  std::memset(b + 16, 0, 64);
  for (int e = 0; e < kQK; ++e) b[16 + plane2_byte(e)] |= static_cast<uint8_t>(k.q[e] << plane2_shift(e));
  put_u16(b + 80, k.dh);
  put_u16(b + 82, k.dminh);
}

KBlock unpack_q2_k(const uint8_t* b) {
  KBlock k;
  for (int j = 0; j < 16; ++j) k.sc[j] = b[j] & 0xF, k.m[j] = b[j] >> 4;
  for (int e = 0; e < kQK; ++e) k.q[e] = (b[16 + plane2_byte(e)] >> plane2_shift(e)) & 3;
  k.dh = get_u16(b + 80);
  k.dminh = get_u16(b + 82);
  return k;
}

// Q4_K / Q5_K {f16 d; f16 dmin; u8 scales[12]; (Q5_K: u8 qh[32];) u8 qs[128]}: eight sub-blocks
// of 32, six-bit sc and m (get_scale_min_k4): j < 4: sc in scales[j] & 63, m in scales[j + 4] & 63;
// j >= 4: low nibbles in scales[j + 4] (sc low, m high), high two bits in the top bits of
// scales[j - 4] (sc) and scales[j] (m). Element 64c + 32h + l: low nibble of qs[32c + l] (high
// nibble for h = 1); Q5_K's bit 4 in bit 2c + h of qh[l].
void pack_scales_k4(const KBlock& k, uint8_t* sb) {
  std::memset(sb, 0, 12);
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      sb[j] |= static_cast<uint8_t>(k.sc[j]);
      sb[j + 4] |= static_cast<uint8_t>(k.m[j]);
    } else {
      sb[j + 4] = static_cast<uint8_t>((k.sc[j] & 0xF) | ((k.m[j] & 0xF) << 4));
      sb[j - 4] |= static_cast<uint8_t>((k.sc[j] >> 4) << 6);
      sb[j] |= static_cast<uint8_t>((k.m[j] >> 4) << 6);
    }
  }
}

void unpack_scales_k4(const uint8_t* sb, KBlock& k) {
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      k.sc[j] = sb[j] & 63;
      k.m[j] = sb[j + 4] & 63;
    } else {
      k.sc[j] = (sb[j + 4] & 0xF) | ((sb[j - 4] >> 6) << 4);
      k.m[j] = (sb[j + 4] >> 4) | ((sb[j] >> 6) << 4);
    }
  }
}

int k4_byte(int e) { return 32 * (e / 64) + e % 32; }
int k4_shift(int e) { return 4 * ((e / 32) % 2); }

void pack_q45_k(const KBlock& k, uint8_t* b, bool five_bit) {
  put_u16(b, k.dh);
  put_u16(b + 2, k.dminh);
  pack_scales_k4(k, b + 4);
  uint8_t* qs = b + (five_bit ? 48 : 16);
  std::memset(qs, 0, 128);
  if (five_bit) std::memset(b + 16, 0, 32);
  for (int e = 0; e < kQK; ++e) {
    qs[k4_byte(e)] |= static_cast<uint8_t>((k.q[e] & 0xF) << k4_shift(e));
    if (five_bit) b[16 + e % 32] |= static_cast<uint8_t>((k.q[e] >> 4) << (e / 32));
  }
}

KBlock unpack_q45_k(const uint8_t* b, bool five_bit) {
  KBlock k;
  k.dh = get_u16(b);
  k.dminh = get_u16(b + 2);
  unpack_scales_k4(b + 4, k);
  const uint8_t* qs = b + (five_bit ? 48 : 16);
  for (int e = 0; e < kQK; ++e)
    k.q[e] = ((qs[k4_byte(e)] >> k4_shift(e)) & 0xF) | (five_bit ? ((b[16 + e % 32] >> (e / 32)) & 1) << 4 : 0);
  return k;
}

// One K-quant type: its spec, packer and unpacker.
template <const KSpec& S, void (*Pack)(const KBlock&, uint8_t*), KBlock (*Unpack)(const uint8_t*)>
struct KCodec {
  static void encode(const float* x, uint8_t* b) { Pack(k_encode(S, x), b); }
  static void decode(const uint8_t* b, float* y) { k_values(S, Unpack(b), y); }
};
void pack_q4_k(const KBlock& k, uint8_t* b) { pack_q45_k(k, b, false); }
void pack_q5_k(const KBlock& k, uint8_t* b) { pack_q45_k(k, b, true); }
KBlock unpack_q4_k(const uint8_t* b) { return unpack_q45_k(b, false); }
KBlock unpack_q5_k(const uint8_t* b) { return unpack_q45_k(b, true); }

}  // namespace

const GgmlTypeInfo* ggml_type_info(uint32_t id) {
  for (const auto& t : kTypes)
    if (static_cast<uint32_t>(t.type) == id) return &t;
  return nullptr;
}

const GgmlTypeInfo& ggml_type_info(GgmlType t) {
  const GgmlTypeInfo* i = ggml_type_info(static_cast<uint32_t>(t));
  if (!i) throw Error::internal("ggml type " + std::to_string(static_cast<uint32_t>(t)) + " not in the table");
  return *i;
}

const GgmlTypeInfo* parse_ggml_type(std::string_view name) {
  std::string lower(name);
  for (auto& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const auto& t : kTypes)
    if (lower == t.name) return &t;
  return nullptr;
}

std::string ggml_codec_names() {
  std::string s;
  for (const auto& t : kTypes)
    if (t.codec) s += (s.empty() ? "" : ", ") + std::string(t.name);
  return s;
}

std::string ggml_encoder_names() {
  std::string s;
  for (const auto& t : kTypes)
    if (t.encodes()) s += (s.empty() ? "" : ", ") + std::string(t.name);
  return s;
}

uint64_t ggml_row_bytes(GgmlType t, int64_t n) {
  const auto& info = ggml_type_info(t);
  if (n < 0 || n % info.block != 0)
    throw Error::invalid(std::string("row of ") + std::to_string(n) + " values is not a multiple of the " + info.name +
                         " block size " + std::to_string(info.block));
  return static_cast<uint64_t>(n / info.block) * info.type_size;
}

namespace {

// The grid of a block (ggml_block_grid): per sub-block, step and offset as decode applies them.
void grid_q8_0(const uint8_t* b, float* step, float* offset) { step[0] = core::f16_to_f32(get_u16(b)), offset[0] = 0.0f; }
void grid_asym(const uint8_t* b, float* step, float* offset) {
  step[0] = core::f16_to_f32(get_u16(b));
  offset[0] = -core::f16_to_f32(get_u16(b + 2));  // d * q - (-m) == d * q + m exactly
}
template <const KSpec& S, KBlock (*Unpack)(const uint8_t*)>
void grid_k(const uint8_t* b, float* step, float* offset) {
  const KBlock k = Unpack(b);
  const float d = core::f16_to_f32(k.dh), dmin = core::f16_to_f32(k.dminh);
  for (int j = 0; j < kQK / S.sub; ++j) step[j] = d * static_cast<float>(k.sc[j]), offset[j] = dmin * static_cast<float>(k.m[j]);
}

// A block's codes replaced, its scales kept (ggml_set_block_codes; codes as the grid numbers them).
void set_q8_0(uint8_t* b, const int* q) {
  for (int j = 0; j < 32; ++j) b[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(q[j]));
}
template <int Half, bool Five>
void set_sym(uint8_t* b, const int* q) {
  int u[32];
  for (int j = 0; j < 32; ++j) u[j] = q[j] + Half;
  pack_nibbles(u, Five ? b + 6 : b + 2, Five ? b + 2 : nullptr);
}
template <bool Five>
void set_asym(uint8_t* b, const int* q) { pack_nibbles(q, Five ? b + 8 : b + 4, Five ? b + 4 : nullptr); }
template <void (*Pack)(const KBlock&, uint8_t*), KBlock (*Unpack)(const uint8_t*)>
void set_k(uint8_t* b, const int* q) {
  KBlock k = Unpack(b);
  std::copy_n(q, kQK, k.q);
  Pack(k, b);
}

// The block types: one encoder and one decoder per block; for the types GPTQ rounds within (every
// block type but the ternary ones, whose GPTQ is the ternary-tq codec), the grid and the codes.
struct BlockCodec {
  GgmlType type;
  void (*encode)(const float* x, uint8_t* b);
  void (*decode)(const uint8_t* b, float* y);
  GgmlGridInfo grid_info = {};
  void (*grid)(const uint8_t* b, float* step, float* offset) = nullptr;
  void (*set)(uint8_t* b, const int* q) = nullptr;
};
template <const KSpec& S>
constexpr GgmlGridInfo k_grid_info() { return {S.sub, S.qmin, S.qmax}; }
const BlockCodec kBlockCodecs[] = {
    {GgmlType::Q8_0, encode_q8_0, decode_q8_0, {32, -127, 127}, grid_q8_0, set_q8_0},
    {GgmlType::Q4_0, [](const float* x, uint8_t* b) { encode_sym(x, b, 8, false); },
     [](const uint8_t* b, float* y) { decode_sym(b, y, 8, false); }, {32, -8, 7}, grid_q8_0, set_sym<8, false>},
    {GgmlType::Q5_0, [](const float* x, uint8_t* b) { encode_sym(x, b, 16, true); },
     [](const uint8_t* b, float* y) { decode_sym(b, y, 16, true); }, {32, -16, 15}, grid_q8_0, set_sym<16, true>},
    {GgmlType::Q4_1, [](const float* x, uint8_t* b) { encode_asym(x, b, 15, false); },
     [](const uint8_t* b, float* y) { decode_asym(b, y, false); }, {32, 0, 15}, grid_asym, set_asym<false>},
    {GgmlType::Q5_1, [](const float* x, uint8_t* b) { encode_asym(x, b, 31, true); },
     [](const uint8_t* b, float* y) { decode_asym(b, y, true); }, {32, 0, 31}, grid_asym, set_asym<true>},
    {GgmlType::IQ4_NL, nullptr, decode_iq4_nl},
    {GgmlType::IQ4_XS, nullptr, decode_iq4_xs},
    {GgmlType::MXFP4, encode_mxfp4, decode_mxfp4},
    {GgmlType::TQ1_0, encode_tq<pack_tq1_0>, decode_tq1_0},
    {GgmlType::TQ2_0, encode_tq<pack_tq2_0>, decode_tq2_0},
    {GgmlType::Q6_K, KCodec<kQ6K, pack_q6_k, unpack_q6_k>::encode, KCodec<kQ6K, pack_q6_k, unpack_q6_k>::decode,
     k_grid_info<kQ6K>(), grid_k<kQ6K, unpack_q6_k>, set_k<pack_q6_k, unpack_q6_k>},
    {GgmlType::Q4_K, KCodec<kQ4K, pack_q4_k, unpack_q4_k>::encode, KCodec<kQ4K, pack_q4_k, unpack_q4_k>::decode,
     k_grid_info<kQ4K>(), grid_k<kQ4K, unpack_q4_k>, set_k<pack_q4_k, unpack_q4_k>},
    {GgmlType::Q5_K, KCodec<kQ5K, pack_q5_k, unpack_q5_k>::encode, KCodec<kQ5K, pack_q5_k, unpack_q5_k>::decode,
     k_grid_info<kQ5K>(), grid_k<kQ5K, unpack_q5_k>, set_k<pack_q5_k, unpack_q5_k>},
    {GgmlType::Q3_K, KCodec<kQ3K, pack_q3_k, unpack_q3_k>::encode, KCodec<kQ3K, pack_q3_k, unpack_q3_k>::decode,
     k_grid_info<kQ3K>(), grid_k<kQ3K, unpack_q3_k>, set_k<pack_q3_k, unpack_q3_k>},
    {GgmlType::Q2_K, KCodec<kQ2K, pack_q2_k, unpack_q2_k>::encode, KCodec<kQ2K, pack_q2_k, unpack_q2_k>::decode,
     k_grid_info<kQ2K>(), grid_k<kQ2K, unpack_q2_k>, set_k<pack_q2_k, unpack_q2_k>},
};

const BlockCodec* gridded_codec(GgmlType t) {
  for (const auto& c : kBlockCodecs)
    if (c.type == t && c.grid) return &c;
  return nullptr;
}

const BlockCodec& need_grid(GgmlType t) {
  const BlockCodec* c = gridded_codec(t);
  if (!c) throw Error::unsupported(std::string("ggml type ") + ggml_type_info(t).name + ": no rounding grid (grids: " + ggml_grid_names() + ")");
  return *c;
}

// The dtype of a one-value-per-element type (F32, F16, BF16), else nullopt.
std::optional<core::DType> element_dtype(GgmlType t) {
  if (t == GgmlType::F32) return core::DType::F32;
  if (t == GgmlType::F16) return core::DType::F16;
  if (t == GgmlType::BF16) return core::DType::BF16;
  return std::nullopt;
}

// The codec of a block type after the checks both directions share.
const BlockCodec* checked_codec(GgmlType t, int64_t n, bool encoding) {
  const auto& info = ggml_type_info(t);
  if (encoding ? !info.encodes() : !info.codec)
    no_codec(t, encoding ? "encoder" : "decoder", encoding ? ggml_encoder_names() : ggml_codec_names());
  (void)ggml_row_bytes(t, n);
  for (const auto& c : kBlockCodecs)
    if (c.type == t) return &c;
  return nullptr;  // an element type
}

}  // namespace

void encode_row(GgmlType t, const float* x, int64_t n, uint8_t* dst) {
  const BlockCodec* c = checked_codec(t, n, /*encoding=*/true);
  const int64_t bad = core::first_non_finite(core::DType::F32, x, static_cast<size_t>(n));
  if (bad >= 0) throw Error::invalid("non-finite value " + std::to_string(x[bad]) + " at column " + std::to_string(bad));
  if (!c) {
    // A finite value beyond the element type's range rounds to inf (f16: from 65520 up): refused
    // as the finite check of every safetensors output refuses it, never written.
    const core::DType d = *element_dtype(t);
    core::from_f32(d, x, dst, static_cast<size_t>(n));
    const int64_t over = core::first_non_finite(d, dst, static_cast<size_t>(n));
    if (over >= 0)
      throw Error::invalid("value " + std::to_string(x[over]) + " at column " + std::to_string(over) + " is beyond " +
                           ggml_type_info(t).name + "'s range and would be written as inf (give the tensor another type "
                           "with --tensor-type, e.g. f32)");
    return;
  }
  const auto& info = ggml_type_info(t);
  for (int64_t i = 0; i < n / info.block; ++i) c->encode(x + i * info.block, dst + i * info.type_size);
}

void decode_row(GgmlType t, const uint8_t* src, int64_t n, float* dst) {
  const BlockCodec* c = checked_codec(t, n, /*encoding=*/false);
  if (!c) return core::to_f32(*element_dtype(t), src, dst, static_cast<size_t>(n));
  const auto& info = ggml_type_info(t);
  for (int64_t i = 0; i < n / info.block; ++i) c->decode(src + i * info.type_size, dst + i * info.block);
}

void pack_codes_row(GgmlType t, const uint8_t* codes, const float* scales, int64_t n, uint8_t* dst) {
  const auto& info = ggml_type_info(t);
  (void)ggml_row_bytes(t, n);
  if (t == GgmlType::TQ1_0 || t == GgmlType::TQ2_0) {
    for (int64_t i = 0; i < n / kQK; ++i) {
      float stored;
      const uint16_t dh = f16_scale(scales[i], &stored);
      if (stored != scales[i]) throw Error::invalid("scale " + std::to_string(scales[i]) + " of block " + std::to_string(i) + " is not exact in f16");
      int v[kQK];
      for (int j = 0; j < kQK; ++j) {
        const uint8_t c = codes[i * kQK + j];
        if (c > 2) throw Error::invalid("trit " + std::to_string(c) + " above 2");
        v[j] = c == 0 ? 1 : c == 1 ? 0 : 2;  // zero, lo = -d, hi = +d -> stored t + 1
      }
      (t == GgmlType::TQ1_0 ? pack_tq1_0 : pack_tq2_0)(v, dh, dst + i * info.type_size);
    }
    return;
  }
  if (t != GgmlType::Q4_0 && t != GgmlType::Q8_0)
    throw Error::invalid(std::string("codes cannot be stored as ") + info.name + " without re-quantizing");
  const int maxq = t == GgmlType::Q4_0 ? 15 : 255;
  for (int64_t i = 0; i < n / 32; ++i) {
    const uint8_t* q = codes + i * 32;
    uint8_t* b = dst + i * info.type_size;
    float stored;
    put_u16(b, f16_scale(scales[i], &stored));
    if (stored != scales[i]) throw Error::invalid("scale " + std::to_string(scales[i]) + " of block " + std::to_string(i) + " is not exact in f16");
    int c[32];
    for (int j = 0; j < 32; ++j) {
      if (q[j] > maxq) throw Error::invalid("code " + std::to_string(q[j]) + " above " + std::to_string(maxq));
      c[j] = q[j];
    }
    if (t == GgmlType::Q4_0) {
      pack_nibbles(c, b + 2, nullptr);
    } else {
      for (int j = 0; j < 32; ++j) b[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(c[j] - 128));
    }
  }
}

std::optional<GgmlGridInfo> ggml_grid_info(GgmlType t) {
  if (const BlockCodec* c = gridded_codec(t)) return c->grid_info;
  return std::nullopt;
}

std::vector<GgmlType> ggml_grid_types() {
  std::vector<GgmlType> t;
  for (const auto& c : kBlockCodecs)
    if (c.grid) t.push_back(c.type);
  return t;
}

std::string ggml_grid_names() {
  std::string s;
  for (const GgmlType t : ggml_grid_types()) s += (s.empty() ? "" : ", ") + std::string(ggml_type_info(t).name);
  return s;
}

void ggml_block_grid(GgmlType t, const uint8_t* block, float* step, float* offset) { need_grid(t).grid(block, step, offset); }

int ggml_grid_code(float step, float offset, const GgmlGridInfo& g, float x, float* value) {
  // The K-quant encoders' rule for one value (nearest_codes): the rounded quotient and its
  // neighbours compared on the values decode computes.
  int q;
  nearest_codes(g.qmin, g.qmax, &x, 1, step, offset, &q);
  *value = step * static_cast<float>(q) - offset;
  return q;
}

void ggml_set_block_codes(GgmlType t, uint8_t* block, const int* codes) {
  const BlockCodec& c = need_grid(t);
  for (int64_t i = 0; i < ggml_type_info(t).block; ++i)
    if (codes[i] < c.grid_info.qmin || codes[i] > c.grid_info.qmax)
      throw Error::internal(std::string(ggml_type_info(t).name) + ": code " + std::to_string(codes[i]) + " outside [" +
                            std::to_string(c.grid_info.qmin) + ", " + std::to_string(c.grid_info.qmax) + "]");
  c.set(block, codes);
}

// ---- GgufBlocks ----

GgufBlocks::GgufBlocks(GgmlType type, int64_t cols, core::Tensor bytes, bool stored)
    : Encoding(bytes.rank() == 2 ? bytes.dim(0) : 0, cols), type_(type), stored_(stored) {
  if (bytes.dtype() != core::DType::U8 || bytes.rank() != 2 || bytes.encoding() ||
      static_cast<uint64_t>(bytes.dim(1)) != ggml_row_bytes(type, cols))
    throw Error::internal("GgufBlocks: bytes " + core::shape_str(bytes.shape()) + " do not hold rows of " +
                          std::to_string(cols) + " " + ggml_type_info(type).name + " values");
  bytes_ = std::make_shared<const core::Tensor>(std::move(bytes));
}

std::string GgufBlocks::name() const { return std::string("gguf-") + ggml_type_info(type_).name; }

nlohmann::json GgufBlocks::params() const { return {{"type", ggml_type_info(type_).name}, {"cols", cols()}}; }

std::vector<core::EncodedPart> GgufBlocks::parts() const { return {{"blocks", "", bytes_, false}}; }

void GgufBlocks::dequantize_rows(int64_t r0, int64_t r1, float* dst) const {
  check_rows(r0, r1);
  const int64_t n = cols();
  const size_t rb = static_cast<size_t>(bytes_->dim(1));
  for (int64_t r = r0; r < r1; ++r) decode_row(type_, bytes_->data() + static_cast<size_t>(r) * rb, n, dst + (r - r0) * n);
}

std::shared_ptr<const core::Encoding> GgufBlocks::slice_rows(int64_t r0, int64_t r1) const {
  check_rows(r0, r1);
  return std::make_shared<GgufBlocks>(type_, cols(), bytes_->slice0(r0, r1), stored_);
}

std::shared_ptr<const core::Encoding> GgufBlocks::take_rows(const std::vector<int64_t>& rows) const {
  return std::make_shared<GgufBlocks>(type_, cols(), bytes_->take_rows(rows), stored_);
}

}  // namespace moe::quant
