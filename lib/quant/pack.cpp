#include "quant/pack.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace moe::quant {

// The SSE2 paths (every x86-64) compute exactly what the scalar loops do; the build's -O2 does
// not vectorize these loops on its own, and RTN's speed bar (>= 1 GB/s of weights) needs them.
void range0(const float* x, int64_t n, int64_t stride, float* lo_out, float* hi_out) {
  float lo = 0.0f, hi = 0.0f;
  int64_t i = 0;
#if defined(__SSE2__)
  if (stride == 1 && n >= 8) {
    __m128 l0 = _mm_setzero_ps(), l1 = l0, h0 = l0, h1 = l0;
    for (; i + 8 <= n; i += 8) {
      const __m128 a = _mm_loadu_ps(x + i), b = _mm_loadu_ps(x + i + 4);
      l0 = _mm_min_ps(l0, a);
      h0 = _mm_max_ps(h0, a);
      l1 = _mm_min_ps(l1, b);
      h1 = _mm_max_ps(h1, b);
    }
    float l[4], h[4];
    _mm_storeu_ps(l, _mm_min_ps(l0, l1));
    _mm_storeu_ps(h, _mm_max_ps(h0, h1));
    for (int k = 0; k < 4; ++k) {
      lo = l[k] < lo ? l[k] : lo;
      hi = h[k] > hi ? h[k] : hi;
    }
  }
#endif
  for (; i < n; ++i) {
    const float v = x[i * stride];
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  *lo_out = lo;
  *hi_out = hi;
}

void quant_range(const float* x, int64_t n, int64_t stride, bool symmetric, float* lo, float* hi) {
  range0(x, n, stride, lo, hi);
  if (!std::isfinite(*lo) || !std::isfinite(*hi)) throw core::Error::invalid("a weight to quantize is not finite");
  if (symmetric) {
    const float a = std::max(-*lo, *hi);
    *lo = -a;
    *hi = a;
  }
  if (*lo == 0.0f && *hi == 0.0f) {
    *lo = -1.0f;
    *hi = 1.0f;
  }
}

void int_codes(const float* x, int64_t n, float scale, int zero, int maxq, uint8_t* codes) {
  const float z = static_cast<float>(zero), fmax = static_cast<float>(maxq);
  int64_t j = 0;
#if defined(__SSE2__)
  const __m128 vs = _mm_set1_ps(scale), vz = _mm_set1_ps(z), lim = _mm_set1_ps(kRoundLimit),
               nlim = _mm_set1_ps(-kRoundLimit), magic = _mm_set1_ps(12582912.0f), zero0 = _mm_setzero_ps(),
               vmax = _mm_set1_ps(fmax);
  for (; j + 4 <= n; j += 4) {
    __m128 v = _mm_div_ps(_mm_loadu_ps(x + j), vs);
    v = _mm_min_ps(_mm_max_ps(v, nlim), lim);
    v = _mm_sub_ps(_mm_add_ps(v, magic), magic);
    v = _mm_min_ps(_mm_max_ps(_mm_add_ps(v, vz), zero0), vmax);
    const __m128i q = _mm_cvttps_epi32(v);
    const int32_t packed = _mm_cvtsi128_si32(_mm_packus_epi16(_mm_packs_epi32(q, q), _mm_setzero_si128()));
    std::memcpy(codes + j, &packed, 4);
  }
#endif
  for (; j < n; ++j) {
    float v = x[j] / scale;
    v = std::min(std::max(v, -kRoundLimit), kRoundLimit);
    v = round_even(v) + z;
    v = std::min(std::max(v, 0.0f), fmax);
    codes[j] = static_cast<uint8_t>(static_cast<int>(v));
  }
}

void pack_bits(const uint8_t* codes, int64_t n, int bits, uint8_t* out) {
  if (bits == 8) {
    if (n) std::memcpy(out, codes, static_cast<size_t>(n));
    return;
  }
  int64_t j = 0;
  if (bits == 4) {
    for (; j + 2 <= n; j += 2) *out++ = static_cast<uint8_t>(codes[j] | (codes[j + 1] << 4));
  } else if (bits == 2) {
    for (; j + 4 <= n; j += 4)
      *out++ = static_cast<uint8_t>(codes[j] | (codes[j + 1] << 2) | (codes[j + 2] << 4) | (codes[j + 3] << 6));
  }
  uint64_t acc = 0;
  int nb = 0;
  for (; j < n; ++j) {
    acc |= static_cast<uint64_t>(codes[j]) << nb;
    nb += bits;
    while (nb >= 8) {
      *out++ = static_cast<uint8_t>(acc);
      acc >>= 8;
      nb -= 8;
    }
  }
  if (nb > 0) *out = static_cast<uint8_t>(acc);
}

void unpack_bits(const uint8_t* in, int64_t n, int bits, uint8_t* codes) {
  if (bits == 8) {
    if (n) std::memcpy(codes, in, static_cast<size_t>(n));
    return;
  }
  int64_t j = 0;
  if (bits == 4) {
    for (; j + 2 <= n; j += 2) {
      codes[j] = in[j / 2] & 15;
      codes[j + 1] = in[j / 2] >> 4;
    }
  } else if (bits == 2) {
    for (; j + 4 <= n; j += 4) {
      const uint8_t b = in[j / 4];
      codes[j] = b & 3;
      codes[j + 1] = (b >> 2) & 3;
      codes[j + 2] = (b >> 4) & 3;
      codes[j + 3] = b >> 6;
    }
  }
  const int64_t nbytes = (n * bits + 7) / 8;
  const unsigned mask = (1u << bits) - 1;
  for (; j < n; ++j) {
    const int64_t bit = j * bits, byte = bit >> 3;
    unsigned v = in[byte];
    if (byte + 1 < nbytes) v |= static_cast<unsigned>(in[byte + 1]) << 8;
    codes[j] = static_cast<uint8_t>((v >> (bit & 7)) & mask);
  }
}

void pack_trits(const uint8_t* trits, int64_t n, uint8_t* out) {
  for (int64_t j = 0; j < n; j += 5) {
    unsigned b = 0;
    for (int64_t k = std::min<int64_t>(n, j + 5) - 1; k >= j; --k) b = b * 3 + trits[k];
    *out++ = static_cast<uint8_t>(b);
  }
}

namespace {
// The five trits of every byte value (values 243..255 never come from pack_trits; they unpack
// by the same base-3 digits as the loop below always did).
struct TritTable {
  uint8_t t[256][5];
  TritTable() {
    for (unsigned v = 0; v < 256; ++v) {
      unsigned b = v;
      for (int k = 0; k < 5; ++k) {
        t[v][k] = static_cast<uint8_t>(b % 3);
        b /= 3;
      }
    }
  }
};
const TritTable kTrits;
}  // namespace

void unpack_trits(const uint8_t* in, int64_t n, uint8_t* trits) {
  int64_t j = 0;
  for (; j + 5 <= n; j += 5) std::memcpy(trits + j, kTrits.t[*in++], 5);
  if (j < n) std::memcpy(trits + j, kTrits.t[*in], static_cast<size_t>(n - j));
}

void trit_levels(const uint8_t* __restrict trits, int64_t n, float lo, float hi, float* __restrict dst) {
  int64_t j = 0;
  // 16 at a time: a fixed count the compiler vectorises (selects, no branches).
  for (; j + 16 <= n; j += 16)
    for (int k = 0; k < 16; ++k) dst[j + k] = trits[j + k] == 2 ? hi : trits[j + k] == 1 ? lo : 0.0f;
  for (; j < n; ++j) dst[j] = trits[j] == 2 ? hi : trits[j] == 1 ? lo : 0.0f;
}

}  // namespace moe::quant
