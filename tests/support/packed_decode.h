// Test-local decoders of the compressed-tensors pack-quantized, GPTQ (v1) and AWQ GEMM layouts,
// written from the formats' published sources (compressed-tensors `unpack_from_int32` and the
// dequantization of compressed_tensors/quantization/lifecycle/forward.py; AutoGPTQ
// qlinear_cuda_old.py `forward`; AutoAWQ awq/utils/packing_utils.py `unpack_awq`,
// `reverse_awq_order`, `dequantize_gemm`), independently of lib/io/compressed_tensors.cpp.
// Header-only; GoogleTest-free.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace moe::test {

inline int32_t packed_word(const std::vector<uint8_t>& b, int64_t i) {
  int32_t w;
  std::memcpy(&w, b.data() + 4 * i, 4);
  return w;
}

inline float f16_value(const std::vector<uint8_t>& b, int64_t i) {
  float f;
  core::convert(core::DType::F16, b.data() + 2 * i, core::DType::F32, &f, 1);
  return f;
}

// compressed-tensors pack-quantized: W [out, in] (row-major) from weight_packed [out, words],
// weight_scale F16 [out, ngroups], weight_zero_point [ceil(out/pf), ngroups] (empty: symmetric).
inline std::vector<float> decode_compressed_tensors(int bits, int64_t out, int64_t in, const std::vector<uint8_t>& packed,
                                                    const std::vector<uint8_t>& scale, int64_t ngroups,
                                                    const std::vector<uint8_t>& zero_point) {
  const int64_t pf = 32 / bits, words = (in + pf - 1) / pf, offset = int64_t{1} << (bits - 1);
  const uint32_t mask = (1u << bits) - 1;
  if (static_cast<int64_t>(packed.size()) != 4 * out * words) throw std::runtime_error("weight_packed: wrong size");
  std::vector<float> w(static_cast<size_t>(out * in));
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) {
      const int64_t g = i / (in / ngroups);
      const int64_t q = static_cast<int64_t>((static_cast<uint32_t>(packed_word(packed, o * words + i / pf)) >> (bits * (i % pf))) & mask) - offset;
      int64_t z = 0;
      if (!zero_point.empty())
        z = static_cast<int64_t>((static_cast<uint32_t>(packed_word(zero_point, (o / pf) * ngroups + g)) >> (bits * (o % pf))) & mask) - offset;
      w[o * in + i] = static_cast<float>(q - z) * f16_value(scale, o * ngroups + g);
    }
  return w;
}

// GPTQ v1: W [out, in] from qweight [in/pf, out], qzeros [ngroups, out/pf] (zero − 1), scales F16
// [ngroups, out], g_idx I32 [in].
inline std::vector<float> decode_gptq(int bits, int64_t out, int64_t in, const std::vector<uint8_t>& qweight,
                                      const std::vector<uint8_t>& qzeros, const std::vector<uint8_t>& scales,
                                      const std::vector<uint8_t>& g_idx) {
  const int64_t pf = 32 / bits;
  const uint32_t mask = (1u << bits) - 1;
  const int64_t ngroups = static_cast<int64_t>(scales.size()) / 2 / out;
  if (static_cast<int64_t>(qweight.size()) != 4 * (in / pf) * out) throw std::runtime_error("qweight: wrong size");
  std::vector<float> w(static_cast<size_t>(out * in));
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) {
      const int32_t g = packed_word(g_idx, i);
      if (g < 0 || g >= ngroups) throw std::runtime_error("g_idx out of range");
      const int64_t q = (static_cast<uint32_t>(packed_word(qweight, (i / pf) * out + o)) >> (bits * (i % pf))) & mask;
      const int64_t z = ((static_cast<uint32_t>(packed_word(qzeros, g * (out / pf) + o / pf)) >> (bits * (o % pf))) & mask) + 1;
      w[o * in + i] = static_cast<float>(q - z) * f16_value(scales, g * out + o);
    }
  return w;
}

// AWQ GEMM: W [out, in] from qweight [in, out/8], qzeros [ngroups, out/8] (zero points as stored),
// scales F16 [ngroups, out], as dequantize_gemm does it: unpack_awq shifts each word right by 0,
// 4, ..., 28 (value v of word c at unpacked column 8c + v), reverse_awq_order then takes column
// 8c + AWQ_REVERSE_ORDER[p] as output 8c + p; both masked to 4 bits; (q − z) · scale (here in
// f32, exact, where the library multiplies in f16).
inline std::vector<float> decode_awq(int64_t out, int64_t in, const std::vector<uint8_t>& qweight,
                                     const std::vector<uint8_t>& qzeros, const std::vector<uint8_t>& scales) {
  static const int kReverse[8] = {0, 4, 1, 5, 2, 6, 3, 7};  // AWQ_REVERSE_ORDER
  const int64_t cols = out / 8, ngroups = static_cast<int64_t>(scales.size()) / 2 / out;
  if (out % 8 != 0 || static_cast<int64_t>(qweight.size()) != 4 * in * cols) throw std::runtime_error("qweight: wrong size");
  if (ngroups < 1 || in % ngroups != 0 || static_cast<int64_t>(qzeros.size()) != 4 * ngroups * cols)
    throw std::runtime_error("qzeros / scales: wrong size");
  const int64_t group = in / ngroups;
  auto unpacked = [&](const std::vector<uint8_t>& words, int64_t row, int64_t o) {
    const int64_t col = 8 * (o / 8) + kReverse[o % 8];  // the unpacked column holding output o
    return static_cast<int64_t>((static_cast<uint32_t>(packed_word(words, row * cols + col / 8)) >> (4 * (col % 8))) & 15u);
  };
  std::vector<float> w(static_cast<size_t>(out * in));
  for (int64_t i = 0; i < in; ++i)
    for (int64_t o = 0; o < out; ++o) {
      const int64_t g = i / group;
      w[o * in + i] = static_cast<float>(unpacked(qweight, i, o) - unpacked(qzeros, g, o)) * f16_value(scales, g * out + o);
    }
  return w;
}

}  // namespace moe::test
