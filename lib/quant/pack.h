// Small helpers shared by the integer and ternary codecs: bit and trit packing of code rows,
// rounding as the quantizers define it, f16 rounding of scales.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/dtype.h"

namespace moe::quant {

// Round to nearest, ties to even (torch.round, numpy.round), for |v| <= kRoundLimit.
constexpr float kRoundLimit = 4194304.0f;  // 2^22
inline float round_even(float v) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: v + magic has no fraction bits left
  return (v + magic) - magic;
}
// The f32 value of the nearest f16 (ties to even); the smallest positive f16 subnormal.
inline float round_f16(float v) { return core::f16_to_f32(core::f32_to_f16(v)); }
constexpr float kF16Tiny = 5.9604644775390625e-08f;  // 2^-24

// lo = min(min x, 0), hi = max(max x, 0) over x[0], x[stride], ... (NaNs are not seen: callers
// check for non-finite weights first).
void range0(const float* x, int64_t n, int64_t stride, float* lo, float* hi);
// The quantizer's range of x (the GPTQ reference's rule): lo = min(min x, 0), hi = max(max x, 0);
// symmetric: lo, hi = −a, a with a = max(−lo, hi); both 0 (an all-zero group): −1, +1.
// Error::invalid when a value is not finite.
void quant_range(const float* x, int64_t n, int64_t stride, bool symmetric, float* lo, float* hi);
// codes[j] = clamp(round(x[j] / scale) + zero, 0, maxq) for j < n (as int_code, quant/intn.h).
void int_codes(const float* x, int64_t n, float scale, int zero, int maxq, uint8_t* codes);

// n codes of `bits` bits each, as an LSB-first bit stream into ceil(n * bits / 8) bytes (the
// last byte's unused high bits are 0).
void pack_bits(const uint8_t* codes, int64_t n, int bits, uint8_t* out);
void unpack_bits(const uint8_t* in, int64_t n, int bits, uint8_t* codes);
// n trits (0, 1, 2), five per byte: byte = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4, into ceil(n / 5)
// bytes (missing trits of the last byte are 0).
void pack_trits(const uint8_t* trits, int64_t n, uint8_t* out);
void unpack_trits(const uint8_t* in, int64_t n, uint8_t* trits);
// dst[j] = the level of trits[j]: 0 → 0, 1 → lo, 2 → hi, for j < n (the ternary decoders' rule).
void trit_levels(const uint8_t* trits, int64_t n, float lo, float hi, float* dst);

}  // namespace moe::quant
