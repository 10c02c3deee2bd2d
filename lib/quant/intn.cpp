#include "quant/intn.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "quant/pack.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace moe::quant {

using core::DType;
using core::Error;
using core::shape_str;

IntParams int_params(const float* x, int64_t n, int64_t stride, int bits, bool symmetric) {
  const int maxq = (1 << bits) - 1;
  float lo, hi;
  quant_range(x, n, stride, symmetric, &lo, &hi);
  IntParams p;
  p.scale = round_f16((hi - lo) / static_cast<float>(maxq));
  if (std::isinf(p.scale))
    throw Error::invalid("a group's range " + std::to_string(hi - lo) + " overflows an f16 scale at " +
                         std::to_string(bits) + " bits");
  if (p.scale == 0.0f) p.scale = kF16Tiny;
  p.zero = symmetric ? (maxq + 1) / 2 : std::clamp(static_cast<int>(round_even(-lo / p.scale)), 0, maxq);
  return p;
}

int int_code(float x, const IntParams& p, int maxq) {
  const int q = static_cast<int>(round_even(std::clamp(x / p.scale, -kRoundLimit, kRoundLimit))) + p.zero;
  return std::clamp(q, 0, maxq);
}

namespace {

void check_part(const IntN::Part& p, const char* role, DType dtype, const core::Shape& want) {
  if (!p || !p->valid()) throw Error::corruption(std::string("intN: part \"") + role + "\" missing");
  if (p->encoding() || p->dtype() != dtype || p->shape() != want)
    throw Error::corruption(std::string("intN: part \"") + role + "\": expected " + core::dtype_name(dtype) + " " +
                            shape_str(want) + ", found " + core::dtype_name(p->dtype()) + " " + shape_str(p->shape()));
}

}  // namespace

IntN::IntN(int bits, int64_t group, bool symmetric, int64_t cols, Part codes, Part scales, Part zeros)
    : Encoding(codes && codes->rank() == 2 ? codes->dim(0) : 0, cols), bits_(bits), group_(group),
      symmetric_(symmetric), codes_(std::move(codes)), scales_(std::move(scales)), zeros_(std::move(zeros)) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
    throw Error::corruption("intN: bits: expected 2, 3, 4 or 8, found " + std::to_string(bits));
  if (group < 0) throw Error::corruption("intN: group: expected 0 (whole row) or a positive size, found " + std::to_string(group));
  if (cols < 0) throw Error::corruption("intN: cols: expected an integer >= 0, found " + std::to_string(cols));
  if (!codes_ || codes_->rank() != 2)
    throw Error::corruption("intN: part \"codes\": expected a rank-2 U8 tensor" +
                            (codes_ ? ", found " + shape_str(codes_->shape()) : std::string()));
  const int64_t rows = codes_->dim(0), ng = ngroups();
  check_part(codes_, "codes", DType::U8, {rows, row_bytes(bits, cols)});
  check_part(scales_, "scales", DType::F16, {rows, ng});
  if (symmetric) {
    if (zeros_) throw Error::corruption("intN: part \"zeros\" given for a symmetric weight");
  } else {
    check_part(zeros_, "zeros", DType::U8, {rows, ng});
    const int maxq = (1 << bits) - 1;
    const uint8_t* z = zeros_->data();
    for (int64_t i = 0; i < rows * ng; ++i)
      if (z[i] > maxq)
        throw Error::corruption("intN: part \"zeros\": zero point " + std::to_string(z[i]) + " above " +
                                std::to_string(maxq) + " at " + std::to_string(bits) + " bits");
  }
}

std::shared_ptr<const IntN> IntN::pack(int bits, int64_t group, bool symmetric, int64_t rows, int64_t cols,
                                       const uint8_t* codes, const float* scales, const uint8_t* zeros) {
  const int64_t ng = num_groups(group, cols), rb = row_bytes(bits, cols);
  auto c = std::make_shared<core::Tensor>(core::Tensor::zeros(DType::U8, {rows, rb}));
  for (int64_t r = 0; r < rows; ++r) pack_bits(codes + r * cols, cols, bits, c->mutable_data() + r * rb);
  auto s = std::make_shared<core::Tensor>(core::Tensor::zeros(DType::F16, {rows, ng}));
  core::from_f32(DType::F16, scales, s->mutable_data(), static_cast<size_t>(rows * ng));
  Part z;
  if (!symmetric) {
    auto zt = std::make_shared<core::Tensor>(core::Tensor::zeros(DType::U8, {rows, ng}));
    if (rows * ng > 0) std::memcpy(zt->mutable_data(), zeros, static_cast<size_t>(rows * ng));
    z = zt;
  }
  return std::make_shared<const IntN>(bits, group, symmetric, cols, c, s, z);
}

nlohmann::json IntN::params() const {
  return {{"bits", bits_}, {"group", group_}, {"symmetric", symmetric_}, {"cols", cols()}};
}

std::vector<core::EncodedPart> IntN::parts() const {
  std::vector<core::EncodedPart> p = {{"codes", ".codes", codes_, false}, {"scales", ".scales", scales_, false}};
  if (zeros_) p.push_back({"zeros", ".zeros", zeros_, false});
  return p;
}

void IntN::codes_row(int64_t r, uint8_t* dst) const {
  unpack_bits(codes_->data() + r * codes_->dim(1), cols(), bits_, dst);
}

float IntN::scale(int64_t r, int64_t g) const {
  uint16_t h;
  std::memcpy(&h, scales_->data() + (r * ngroups() + g) * 2, 2);
  return core::f16_to_f32(h);
}

int IntN::zero(int64_t r, int64_t g) const {
  return symmetric_ ? (1 << (bits_ - 1)) : zeros_->data()[r * ngroups() + g];
}

void IntN::dequantize_rows(int64_t r0, int64_t r1, float* dst) const {
  check_rows(r0, r1);
  const int64_t n = cols(), ng = ngroups(), gl = group_len();
  if (bits_ == 4 && gl % 2 == 0) {
    // Two codes per byte, s·(q − z) with one rounding (SSE2, or a group's 16 values tabled): the
    // same floats as below.
    const int64_t rb = codes_->dim(1);
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* c = codes_->data() + r * rb;
      float* d = dst + (r - r0) * n;
      for (int64_t g = 0; g < ng; ++g) {
        const float s = scale(r, g);
        const int z = zero(r, g);
        const int64_t j0 = g * gl, j1 = std::min(n, j0 + gl);
        int64_t j = j0;
#if defined(__SSE2__)
        // 32 codes (16 bytes) at a time: the nibbles widened to int32, s · float(q − z) as the
        // table holds it (the same one rounding), about twice the table's rate on one thread. j0 is even.
        const __m128i low4 = _mm_set1_epi8(0x0f), none = _mm_setzero_si128(), zv = _mm_set1_epi32(z);
        const __m128 sv = _mm_set1_ps(s);
        for (; j + 32 <= j1; j += 32) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j / 2));
          const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
          const __m128i q8[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};  // codes in order
          for (int h = 0; h < 2; ++h) {
            const __m128i q16[2] = {_mm_unpacklo_epi8(q8[h], none), _mm_unpackhi_epi8(q8[h], none)};
            for (int k = 0; k < 2; ++k) {
              const __m128i a = _mm_sub_epi32(_mm_unpacklo_epi16(q16[k], none), zv);
              const __m128i e = _mm_sub_epi32(_mm_unpackhi_epi16(q16[k], none), zv);
              float* o = d + j + 16 * h + 8 * k;
              _mm_storeu_ps(o, _mm_mul_ps(sv, _mm_cvtepi32_ps(a)));
              _mm_storeu_ps(o + 4, _mm_mul_ps(sv, _mm_cvtepi32_ps(e)));
            }
          }
        }
#endif
        if (j == j1) continue;
        float lut[16];  // the rest of the group (all of it without SSE2)
        for (int q = 0; q < 16; ++q) lut[q] = s * static_cast<float>(q - z);
        for (; j + 2 <= j1; j += 2) {
          const uint8_t b = c[j / 2];
          d[j] = lut[b & 15];
          d[j + 1] = lut[b >> 4];
        }
        if (j < j1) d[j] = lut[c[j / 2] & 15];
      }
    }
    return;
  }
  std::vector<uint8_t> q(static_cast<size_t>(n));
  for (int64_t r = r0; r < r1; ++r) {
    codes_row(r, q.data());
    float* d = dst + (r - r0) * n;
    for (int64_t g = 0; g < ng; ++g) {
      const float s = scale(r, g);
      const int z = zero(r, g);
      const int64_t j1 = std::min(n, (g + 1) * gl);
      for (int64_t j = g * gl; j < j1; ++j) d[j] = s * static_cast<float>(q[j] - z);
    }
  }
}

std::shared_ptr<const core::Encoding> IntN::slice_rows(int64_t r0, int64_t r1) const {
  check_rows(r0, r1);
  auto sl = [&](const Part& p) -> Part { return p ? std::make_shared<const core::Tensor>(p->slice0(r0, r1)) : nullptr; };
  return std::make_shared<IntN>(bits_, group_, symmetric_, cols(), sl(codes_), sl(scales_), sl(zeros_));
}

std::shared_ptr<const core::Encoding> IntN::take_rows(const std::vector<int64_t>& rows) const {
  auto tk = [&](const Part& p) -> Part { return p ? std::make_shared<const core::Tensor>(p->take_rows(rows)) : nullptr; };
  return std::make_shared<IntN>(bits_, group_, symmetric_, cols(), tk(codes_), tk(scales_), tk(zeros_));
}

}  // namespace moe::quant
