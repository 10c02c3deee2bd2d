#include "quant/ternary.h"

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

const char* grid_name(TernaryGrid g) {
  switch (g) {
    case TernaryGrid::AbsMean: return "absmean";
    case TernaryGrid::MinMax: return "minmax";
    case TernaryGrid::TQ: return "tq";
  }
  return "?";
}

namespace {

float level_f16(double v) {
  const float f = round_f16(static_cast<float>(v));
  if (!std::isfinite(f)) throw Error::invalid("a ternary level " + std::to_string(v) + " overflows f16");
  return f;
}

}  // namespace

TernaryLevels ternary_fixed(double lo, double hi, TernaryGrid grid, bool symmetric) {
  TernaryLevels l;
  l.hi = level_f16(hi);
  l.lo = symmetric ? -l.hi : level_f16(lo);
  if (grid == TernaryGrid::TQ) l.inv = l.hi != 0.0f ? 1.0f / l.hi : 0.0f;
  return l;
}

TernaryLevels ternary_levels(const float* x, int64_t n, int64_t stride, TernaryGrid grid, bool symmetric) {
  TernaryLevels l;
  if (grid == TernaryGrid::AbsMean) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += std::fabs(static_cast<double>(x[i * stride]));
    const float g = n ? static_cast<float>(s / static_cast<double>(n)) : 0.0f;
    l.hi = level_f16(g);
    l.lo = -l.hi;
    return l;
  }
  float lo, hi;
  if (grid == TernaryGrid::TQ) {
    range0(x, n, stride, &lo, &hi);
    if (!std::isfinite(lo) || !std::isfinite(hi)) throw Error::invalid("a weight to quantize is not finite");
    const float d = std::max(-lo, hi);
    l.inv = d != 0.0f ? 1.0f / d : 0.0f;
    l.hi = level_f16(d);
    l.lo = -l.hi;
    return l;
  }
  quant_range(x, n, stride, symmetric, &lo, &hi);
  l.lo = level_f16(lo);
  l.hi = level_f16(hi);
  return l;
}

int ternary_code(float x, const TernaryLevels& l, TernaryGrid grid, double threshold) {
  if (grid == TernaryGrid::TQ) {
    const long t = std::lround(x * l.inv);
    return t >= 1 ? 2 : t <= -1 ? 1 : 0;
  }
  const float tau = static_cast<float>(threshold);
  if (x > l.hi * tau) return 2;
  if (x < l.lo * tau) return 1;
  return 0;
}

void ternary_codes(const float* x, int64_t n, const TernaryLevels& l, TernaryGrid grid, double threshold, uint8_t* t) {
  // tq: lround(v) >= 1 exactly when v >= 0.5 (ties away from zero), <= -1 when v <= -0.5.
  const bool tq = grid == TernaryGrid::TQ;
  const float tau = static_cast<float>(threshold);
  const float up = tq ? 0.5f : l.hi * tau, down = tq ? -0.5f : l.lo * tau, mul = tq ? l.inv : 1.0f;
  int64_t j = 0;
#if defined(__SSE2__)
  const __m128 vup = _mm_set1_ps(up), vdown = _mm_set1_ps(down), vmul = _mm_set1_ps(mul);
  const __m128i two = _mm_set1_epi32(2), one = _mm_set1_epi32(1);
  for (; j + 4 <= n; j += 4) {
    __m128 v = _mm_loadu_ps(x + j);
    if (tq) v = _mm_mul_ps(v, vmul);
    const __m128i hi = _mm_castps_si128(tq ? _mm_cmpge_ps(v, vup) : _mm_cmpgt_ps(v, vup));
    const __m128i lo = _mm_castps_si128(tq ? _mm_cmple_ps(v, vdown) : _mm_cmplt_ps(v, vdown));
    const __m128i q = _mm_or_si128(_mm_and_si128(hi, two), _mm_andnot_si128(hi, _mm_and_si128(lo, one)));
    const int32_t packed = _mm_cvtsi128_si32(_mm_packus_epi16(_mm_packs_epi32(q, q), _mm_setzero_si128()));
    std::memcpy(t + j, &packed, 4);
  }
#endif
  for (; j < n; ++j) {
    const float v = tq ? x[j] * mul : x[j];
    const bool hi = tq ? v >= up : v > up, lo = tq ? v <= down : v < down;
    t[j] = hi ? 2 : lo ? 1 : 0;
  }
}

Ternary::Ternary(TernaryGrid grid, int64_t group, bool symmetric, int64_t cols, Part codes, Part scales)
    : Encoding(codes && codes->rank() == 2 ? codes->dim(0) : 0, cols), grid_(grid), group_(group),
      symmetric_(symmetric), codes_(std::move(codes)), scales_(std::move(scales)) {
  if (group < 0) throw Error::corruption("ternary: group: expected 0 (whole row) or a positive size, found " + std::to_string(group));
  if (cols < 0) throw Error::corruption("ternary: cols: expected an integer >= 0, found " + std::to_string(cols));
  if (grid == TernaryGrid::TQ && (group != 256 || !symmetric))
    throw Error::corruption("ternary: grid tq needs group 256 and symmetric, found group " + std::to_string(group) +
                            (symmetric ? "" : ", asymmetric"));
  if (!codes_ || !codes_->valid() || codes_->encoding() || codes_->rank() != 2 || codes_->dtype() != DType::U8 ||
      codes_->dim(1) != row_bytes(cols))
    throw Error::corruption("ternary: part \"codes\": expected U8 [rows, " + std::to_string(row_bytes(cols)) + "]" +
                            (codes_ ? ", found " + std::string(core::dtype_name(codes_->dtype())) + " " +
                                          shape_str(codes_->shape())
                                    : std::string(", found nothing")));
  const int64_t rows = codes_->dim(0);
  core::Shape want = {rows, ngroups()};
  if (!symmetric) want.push_back(2);
  if (!scales_ || !scales_->valid() || scales_->encoding() || scales_->dtype() != DType::F16 || scales_->shape() != want)
    throw Error::corruption("ternary: part \"scales\": expected F16 " + shape_str(want) +
                            (scales_ ? ", found " + std::string(core::dtype_name(scales_->dtype())) + " " +
                                           shape_str(scales_->shape())
                                     : std::string(", found nothing")));
  const uint8_t* c = codes_->data();
  for (int64_t i = 0; i < codes_->numel(); ++i)
    if (c[i] > 242)
      throw Error::corruption("ternary: part \"codes\": byte " + std::to_string(c[i]) + " at " + std::to_string(i) +
                              " is not five trits (max 242)");
}

std::shared_ptr<const Ternary> Ternary::pack(TernaryGrid grid, int64_t group, bool symmetric, int64_t rows,
                                             int64_t cols, const uint8_t* trits, const float* lo, const float* hi) {
  const int64_t ng = num_groups(group, cols), rb = row_bytes(cols);
  auto c = std::make_shared<core::Tensor>(core::Tensor::zeros(DType::U8, {rows, rb}));
  for (int64_t r = 0; r < rows; ++r) pack_trits(trits + r * cols, cols, c->mutable_data() + r * rb);
  core::Shape sshape = {rows, ng};
  std::vector<float> sv;
  if (symmetric) {
    sv.assign(hi, hi + rows * ng);
  } else {
    sshape.push_back(2);
    sv.resize(static_cast<size_t>(rows * ng * 2));
    for (int64_t i = 0; i < rows * ng; ++i) {
      sv[2 * i] = lo[i];
      sv[2 * i + 1] = hi[i];
    }
  }
  auto s = std::make_shared<core::Tensor>(core::Tensor::zeros(DType::F16, sshape));
  core::from_f32(DType::F16, sv.data(), s->mutable_data(), sv.size());
  return std::make_shared<const Ternary>(grid, group, symmetric, cols, c, s);
}

nlohmann::json Ternary::params() const {
  return {{"grid", grid_name(grid_)}, {"group", group_}, {"symmetric", symmetric_}, {"cols", cols()}};
}

std::vector<core::EncodedPart> Ternary::parts() const {
  return {{"codes", ".codes", codes_, false}, {"scales", ".scales", scales_, false}};
}

void Ternary::trits_row(int64_t r, uint8_t* dst) const {
  unpack_trits(codes_->data() + r * codes_->dim(1), cols(), dst);
}

namespace {
float f16_at(const core::Tensor& t, int64_t i) {
  uint16_t h;
  std::memcpy(&h, t.data() + i * 2, 2);
  return core::f16_to_f32(h);
}
}  // namespace

float Ternary::hi(int64_t r, int64_t g) const {
  const int64_t i = r * ngroups() + g;
  return symmetric_ ? f16_at(*scales_, i) : f16_at(*scales_, 2 * i + 1);
}

float Ternary::lo(int64_t r, int64_t g) const {
  const int64_t i = r * ngroups() + g;
  return symmetric_ ? -f16_at(*scales_, i) : f16_at(*scales_, 2 * i);
}

void Ternary::dequantize_rows(int64_t r0, int64_t r1, float* dst) const {
  check_rows(r0, r1);
  const int64_t n = cols(), ng = ngroups(), gl = group_len();
  std::vector<uint8_t> t(static_cast<size_t>(n));
  for (int64_t r = r0; r < r1; ++r) {
    trits_row(r, t.data());
    float* d = dst + (r - r0) * n;
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t j0 = g * gl, j1 = std::min(n, j0 + gl);
      trit_levels(t.data() + j0, j1 - j0, lo(r, g), hi(r, g), d + j0);
    }
  }
}

std::shared_ptr<const core::Encoding> Ternary::slice_rows(int64_t r0, int64_t r1) const {
  check_rows(r0, r1);
  return std::make_shared<Ternary>(grid_, group_, symmetric_, cols(), std::make_shared<const core::Tensor>(codes_->slice0(r0, r1)),
                                   std::make_shared<const core::Tensor>(scales_->slice0(r0, r1)));
}

std::shared_ptr<const core::Encoding> Ternary::take_rows(const std::vector<int64_t>& rows) const {
  return std::make_shared<Ternary>(grid_, group_, symmetric_, cols(), std::make_shared<const core::Tensor>(codes_->take_rows(rows)),
                                   std::make_shared<const core::Tensor>(scales_->take_rows(rows)));
}

}  // namespace moe::quant
