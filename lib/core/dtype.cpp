#include "core/dtype.h"

#include <array>
#include <cmath>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define MOE_F16C_DISPATCH 1
#endif

#include "core/error.h"

namespace moe::core {

namespace {

constexpr std::array<DTypeInfo, static_cast<size_t>(DType::kCount)> kDTypes{{
    {DType::F64, "F64", 8, true},
    {DType::F32, "F32", 4, true},
    {DType::F16, "F16", 2, true},
    {DType::BF16, "BF16", 2, true},
    {DType::F8_E4M3, "F8_E4M3", 1, true},
    {DType::F8_E5M2, "F8_E5M2", 1, true},
    {DType::I64, "I64", 8, false},
    {DType::I32, "I32", 4, false},
    {DType::I16, "I16", 2, false},
    {DType::I8, "I8", 1, false},
    {DType::U8, "U8", 1, false},
    {DType::BOOL, "BOOL", 1, false},
    {DType::U16, "U16", 2, false},
    {DType::U32, "U32", 4, false},
}};
static_assert(kDTypes.size() == static_cast<size_t>(DType::kCount));

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Generic round-to-nearest-even encoder for small float formats with `ebits` exponent bits,
// `mbits` mantissa bits. `ieee_inf` selects whether the all-ones exponent encodes inf/nan (E5M2,
// F16) or, as in E4M3 (fn variant), only S.1111.111 is NaN and there is no infinity.
uint32_t encode_small_float(double f, int ebits, int mbits, bool ieee_inf) {
  const uint32_t sign = std::signbit(f) ? 1u : 0u;
  const int bias = (1 << (ebits - 1)) - 1;
  const uint32_t sign_bit = sign << (ebits + mbits);
  if (std::isnan(f)) {
    return sign_bit | ((1u << (ebits + mbits)) - 1u);  // all ones: NaN in both conventions
  }
  double a = std::fabs(f);
  // Largest finite value.
  double max_finite;
  if (ieee_inf) {
    max_finite = std::ldexp(2.0 - std::ldexp(1.0, -mbits), (1 << ebits) - 2 - bias);
  } else {
    max_finite = std::ldexp(2.0 - std::ldexp(1.0, -mbits + 1), (1 << ebits) - 1 - bias);
  }
  if (std::isinf(f)) {
    if (ieee_inf) return sign_bit | (((1u << ebits) - 1u) << mbits);
    return sign_bit | (((1u << ebits) - 1u) << mbits) | ((1u << mbits) - 2u);  // saturate
  }
  const int min_exp = 1 - bias;  // exponent of smallest normal
  // Quantum at the value's binade.
  int e = a == 0.0 ? min_exp : std::max(static_cast<int>(std::floor(std::log2(a))), min_exp);
  if (a != 0.0 && std::ldexp(1.0, e) > a) --e;  // guard log2 rounding
  if (a != 0.0 && std::ldexp(1.0, e + 1) <= a) ++e;
  e = std::max(e, min_exp);
  double quantum = std::ldexp(1.0, e - mbits);
  double q = std::nearbyint(a / quantum);  // default rounding mode: nearest even
  double r = q * quantum;
  if (r > max_finite) {
    // Overflow: IEEE-style rounds to inf when beyond max + half ulp; fn saturates to NaN per
    // spec, but for weights we saturate to the largest finite value.
    const double half_ulp = std::ldexp(1.0, e - mbits - 1);
    if (ieee_inf && a >= max_finite + half_ulp) return sign_bit | (((1u << ebits) - 1u) << mbits);
    r = max_finite;
  }
  if (r == 0.0) return sign_bit;
  int re = static_cast<int>(std::floor(std::log2(r)));
  if (std::ldexp(1.0, re) > r) --re;
  if (re < min_exp) {  // subnormal
    uint32_t m = static_cast<uint32_t>(std::llround(r / std::ldexp(1.0, min_exp - mbits)));
    return sign_bit | m;
  }
  uint32_t m = static_cast<uint32_t>(std::llround((r / std::ldexp(1.0, re) - 1.0) * (1 << mbits)));
  uint32_t be = static_cast<uint32_t>(re + bias);
  return sign_bit | (be << mbits) | m;
}

float decode_small_float(uint32_t v, int ebits, int mbits, bool ieee_inf) {
  const uint32_t sign = (v >> (ebits + mbits)) & 1u;
  const uint32_t be = (v >> mbits) & ((1u << ebits) - 1u);
  const uint32_t m = v & ((1u << mbits) - 1u);
  const int bias = (1 << (ebits - 1)) - 1;
  double r;
  if (be == (1u << ebits) - 1u && (ieee_inf || m == (1u << mbits) - 1u)) {
    if (ieee_inf && m == 0) r = INFINITY;
    else r = NAN;
  } else if (be == 0) {
    r = std::ldexp(static_cast<double>(m), 1 - bias - mbits);
  } else {
    r = std::ldexp(1.0 + std::ldexp(static_cast<double>(m), -mbits), static_cast<int>(be) - bias);
  }
  return static_cast<float>(sign ? -r : r);
}

}  // namespace

const DTypeInfo& dtype_info(DType t) { return kDTypes.at(static_cast<size_t>(t)); }

std::optional<DType> parse_dtype(std::string_view s) {
  for (const auto& d : kDTypes)
    if (s == d.name) return d.dtype;
  return std::nullopt;
}

std::optional<DType> parse_user_dtype(std::string_view s) {
  if (s == "bf16" || s == "bfloat16" || s == "BF16") return DType::BF16;
  if (s == "f16" || s == "fp16" || s == "float16" || s == "F16") return DType::F16;
  if (s == "f32" || s == "fp32" || s == "float32" || s == "F32") return DType::F32;
  return std::nullopt;
}

float bf16_to_f32(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

uint16_t f32_to_bf16(float f) {
  uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  uint32_t lsb = (u >> 16) & 1u;
  u += 0x7fffu + lsb;
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    if (man == 0) return float_of(sign);
    // subnormal: value = man * 2^-24
    float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return float_of(sign | 0x7f800000u | (man << 13));
  return float_of(sign | ((exp + 112u) << 23) | (man << 13));
}

uint16_t f32_to_f16(float f) {
  uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (a < 0x38800000u) {
    // Result is subnormal or zero: round a*2^24 to nearest even integer.
    float af = float_of(a);
    float q = std::nearbyint(af * 16777216.0f);  // exact: af < 2^-14, product < 2^10
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(q));
  }
  // Normal: rebias exponent and round the 13 dropped mantissa bits to nearest even.
  uint32_t lsb = (a >> 13) & 1u;
  a += 0xfffu + lsb;
  a -= 112u << 23;
  return static_cast<uint16_t>(sign | (a >> 13));
}

float f8e4m3_to_f32(uint8_t v) { return decode_small_float(v, 4, 3, false); }
uint8_t f32_to_f8e4m3(float f) { return static_cast<uint8_t>(encode_small_float(f, 4, 3, false)); }
float f8e5m2_to_f32(uint8_t v) { return decode_small_float(v, 5, 2, true); }
uint8_t f32_to_f8e5m2(float f) { return static_cast<uint8_t>(encode_small_float(f, 5, 2, true)); }

namespace {

// Element i of an array of T that need not be aligned to sizeof(T): tensors in a safetensors file
// sit at any byte offset (a U8 tensor of odd size moves every later one), so typed pointers into
// mapped data are never dereferenced. The memcpy compiles to a plain load/store.
template <class T>
T load_at(const void* base, size_t i) {
  T v;
  std::memcpy(&v, static_cast<const unsigned char*>(base) + i * sizeof(T), sizeof(T));
  return v;
}
template <class T>
void store_at(void* base, size_t i, T v) {
  std::memcpy(static_cast<unsigned char*>(base) + i * sizeof(T), &v, sizeof(T));
}

// bf16 -> f32: each value's 16 bits become the high half of a float (bf16_to_f32), 8 at a time
// with SSE2 (GCC 12 at -O2 does not vectorise the element loop).
void bf16_to_f32_n(const void* src, float* dst, size_t n) {
  size_t i = 0;
#if defined(__SSE2__)
  const auto* s = static_cast<const unsigned char*>(src);
  const __m128i zero = _mm_setzero_si128();
  for (; i + 8 <= n; i += 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 2 * i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_unpacklo_epi16(zero, v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i + 4), _mm_unpackhi_epi16(zero, v));
  }
#endif
  for (; i < n; ++i) dst[i] = bf16_to_f32(load_at<uint16_t>(src, i));
}

#if defined(MOE_F16C_DISPATCH)
// f32 -> f16 with F16C, 8 at a time, rounding to nearest even as f32_to_f16 does; returns how
// many it converted (whole blocks of 8). A block holding a NaN is converted by f32_to_f16, whose
// NaN is the canonical 0x7e00 (F16C keeps the payload's top bits): the same bytes for every input.
__attribute__((target("avx,f16c"))) size_t f32_to_f16_f16c(const float* src, void* dst, size_t n) {
  auto* d = static_cast<unsigned char*>(dst);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0) {
      for (size_t k = i; k < i + 8; ++k) store_at<uint16_t>(dst, k, f32_to_f16(src[k]));
      continue;
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  return i;
}

// CPUID leaf 1: F16C (ECX bit 29), AVX (bit 28) and OSXSAVE (bit 27), and the OS saving the YMM
// state (XCR0 bits 1 and 2). Read directly: clang's __builtin_cpu_supports has no "f16c".
bool has_f16c() {
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    constexpr unsigned kNeed = (1u << 29) | (1u << 28) | (1u << 27);
    if ((c & kNeed) != kNeed) return false;
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 6u) == 6u;
  }();
  return yes;
}
#endif

void f32_to_f16_n(const float* src, void* dst, size_t n) {
  size_t i = 0;
#if defined(MOE_F16C_DISPATCH)
  if (has_f16c()) i = f32_to_f16_f16c(src, dst, n);
#endif
  for (; i < n; ++i) store_at<uint16_t>(dst, i, f32_to_f16(src[i]));
}

}  // namespace

void to_f32(DType from, const void* src, float* dst, size_t n) {
  switch (from) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::F64: for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(load_at<double>(src, i)); return;
    case DType::BF16: bf16_to_f32_n(src, dst, n); return;
    case DType::F16: for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(load_at<uint16_t>(src, i)); return;
    case DType::F8_E4M3: { auto p = static_cast<const uint8_t*>(src); for (size_t i = 0; i < n; ++i) dst[i] = f8e4m3_to_f32(p[i]); return; }
    case DType::F8_E5M2: { auto p = static_cast<const uint8_t*>(src); for (size_t i = 0; i < n; ++i) dst[i] = f8e5m2_to_f32(p[i]); return; }
    case DType::I64: for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(load_at<int64_t>(src, i)); return;
    case DType::I32: for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(load_at<int32_t>(src, i)); return;
    case DType::I16: for (size_t i = 0; i < n; ++i) dst[i] = load_at<int16_t>(src, i); return;
    case DType::I8: { auto p = static_cast<const int8_t*>(src); for (size_t i = 0; i < n; ++i) dst[i] = p[i]; return; }
    case DType::U8: case DType::BOOL: { auto p = static_cast<const uint8_t*>(src); for (size_t i = 0; i < n; ++i) dst[i] = p[i]; return; }
    case DType::U16: for (size_t i = 0; i < n; ++i) dst[i] = load_at<uint16_t>(src, i); return;
    case DType::U32: for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(load_at<uint32_t>(src, i)); return;
    case DType::kCount: break;
  }
  throw Error::internal("to_f32: bad dtype");
}

void from_f32(DType to, const float* src, void* dst, size_t n) {
  switch (to) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::F64: for (size_t i = 0; i < n; ++i) store_at<double>(dst, i, src[i]); return;
    case DType::BF16: for (size_t i = 0; i < n; ++i) store_at<uint16_t>(dst, i, f32_to_bf16(src[i])); return;
    case DType::F16: f32_to_f16_n(src, dst, n); return;
    case DType::F8_E4M3: { auto p = static_cast<uint8_t*>(dst); for (size_t i = 0; i < n; ++i) p[i] = f32_to_f8e4m3(src[i]); return; }
    case DType::F8_E5M2: { auto p = static_cast<uint8_t*>(dst); for (size_t i = 0; i < n; ++i) p[i] = f32_to_f8e5m2(src[i]); return; }
    default: break;
  }
  throw Error::unsupported(std::string("cannot convert f32 to ") + dtype_name(to));
}

void convert(DType from, const void* src, DType to, void* dst, size_t n) {
  if (from == to) {
    std::memcpy(dst, src, n * dtype_size(from));
    return;
  }
  if (!dtype_info(to).is_float) throw Error::unsupported(std::string("cannot convert ") + dtype_name(from) + " to " + dtype_name(to));
  if (from == DType::F64 && to != DType::F32) {
    // Round once, from the double value (going through f32 would round twice).
    struct Fmt { int ebits, mbits; bool ieee_inf; };
    const Fmt fmt = to == DType::BF16 ? Fmt{8, 7, true} : to == DType::F16 ? Fmt{5, 10, true}
                  : to == DType::F8_E5M2 ? Fmt{5, 2, true} : Fmt{4, 3, false};
    for (size_t i = 0; i < n; ++i) {
      const uint32_t v = encode_small_float(load_at<double>(src, i), fmt.ebits, fmt.mbits, fmt.ieee_inf);
      if (core::dtype_size(to) == 2) store_at<uint16_t>(dst, i, static_cast<uint16_t>(v));
      else static_cast<uint8_t*>(dst)[i] = static_cast<uint8_t>(v);
    }
    return;
  }
  if (from == DType::F64 && to == DType::F32) {
    for (size_t i = 0; i < n; ++i) store_at<float>(dst, i, static_cast<float>(load_at<double>(src, i)));
    return;
  }
  constexpr size_t kChunk = 4096;
  float buf[kChunk];
  const auto* s = static_cast<const uint8_t*>(src);
  auto* d = static_cast<uint8_t*>(dst);
  const size_t fs = dtype_size(from), ts = dtype_size(to);
  for (size_t i = 0; i < n; i += kChunk) {
    size_t m = std::min(kChunk, n - i);
    to_f32(from, s + i * fs, buf, m);
    from_f32(to, buf, d + i * ts, m);
  }
}

}  // namespace moe::core

namespace moe::core {

int64_t first_non_finite(DType t, const void* src, size_t n) {
  // Element by element through memcpy: `src` need not be aligned to the element size (a writer's
  // chunk may start anywhere in a tensor); the copy compiles to a plain load.
  const auto* bytes = static_cast<const unsigned char*>(src);
  // Blocks of 64 elements without an early exit (SSE2 for the 32- and 16-bit types: GCC 12 at -O2
  // does not vectorise the element loop), then the first one element by element from the block
  // that holds one.
  auto scan = [&](auto mask, auto inf_or_nan) -> int64_t {
    decltype(mask) v;
    constexpr size_t kBlock = 64;
    size_t i = 0;
#if defined(__SSE2__)
    if constexpr (sizeof v == 4 || sizeof v == 2) {
      const __m128i m = sizeof v == 4 ? _mm_set1_epi32(static_cast<int>(mask)) : _mm_set1_epi16(static_cast<short>(mask));
      const __m128i want = sizeof v == 4 ? _mm_set1_epi32(static_cast<int>(inf_or_nan))
                                         : _mm_set1_epi16(static_cast<short>(inf_or_nan));
      constexpr size_t kVectors = kBlock * sizeof v / 16;
      for (; i + kBlock <= n; i += kBlock) {
        __m128i any = _mm_setzero_si128();
        for (size_t k = 0; k < kVectors; ++k) {
          const __m128i x = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + i * sizeof v + 16 * k)), m);
          any = _mm_or_si128(any, sizeof v == 4 ? _mm_cmpeq_epi32(x, want) : _mm_cmpeq_epi16(x, want));
        }
        if (_mm_movemask_epi8(any) != 0) break;
      }
    }
#endif
    for (; i + kBlock <= n; i += kBlock) {
      bool any = false;
      for (size_t k = 0; k < kBlock; ++k) {
        std::memcpy(&v, bytes + (i + k) * sizeof v, sizeof v);
        any |= (v & mask) == inf_or_nan;
      }
      if (any) break;
    }
    for (; i < n; ++i) {
      std::memcpy(&v, bytes + i * sizeof v, sizeof v);
      if ((v & mask) == inf_or_nan) return static_cast<int64_t>(i);
    }
    return -1;
  };
  switch (t) {
    case DType::F32: return scan(uint32_t{0x7F800000}, uint32_t{0x7F800000});
    case DType::BF16: return scan(uint16_t{0x7F80}, uint16_t{0x7F80});
    case DType::F16: return scan(uint16_t{0x7C00}, uint16_t{0x7C00});
    case DType::F64: return scan(uint64_t{0x7FF0000000000000ull}, uint64_t{0x7FF0000000000000ull});
    case DType::F8_E4M3: return scan(uint8_t{0x7F}, uint8_t{0x7F});  // e4m3fn: only NaN
    case DType::F8_E5M2: return scan(uint8_t{0x7C}, uint8_t{0x7C});
    default: return -1;
  }
}

}  // namespace moe::core
