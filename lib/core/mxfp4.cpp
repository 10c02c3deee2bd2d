// MXFP4 rows of a gpt-oss expert (core/mxfp4.h).
#include "core/mxfp4.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"

namespace moe::core {

namespace {
constexpr float kFp4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                            -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
}  // namespace

Mxfp4::Mxfp4(std::shared_ptr<const Tensor> blocks, std::shared_ptr<const Tensor> scales, int64_t r0, int64_t step, int64_t n)
    : Encoding(n, scales && scales->rank() == 2 ? scales->dim(1) * 32 : 0),
      blocks_(std::move(blocks)),
      scales_(std::move(scales)),
      r0_(r0),
      step_(step) {
  if (!blocks_ || !scales_ || blocks_->dtype() != DType::U8 || scales_->dtype() != DType::U8 || blocks_->rank() != 2 ||
      scales_->rank() != 2 || blocks_->dim(0) != scales_->dim(0) || blocks_->dim(1) != 16 * scales_->dim(1) || step < 1 ||
      r0 < 0 || n < 1 || r0 + (n - 1) * step >= scales_->dim(0))
    throw Error::internal("Mxfp4: blocks/scales/rows do not fit");
}

std::vector<EncodedPart> Mxfp4::parts() const {
  return {{"blocks", "_blocks", blocks_, step_ > 1}, {"scales", "_scales", scales_, step_ > 1}};
}

const uint8_t* Mxfp4::row_blocks(int64_t i) const {
  return blocks_->data() + static_cast<size_t>(r0_ + i * step_) * static_cast<size_t>(blocks_->dim(1));
}
const uint8_t* Mxfp4::row_scales(int64_t i) const {
  return scales_->data() + static_cast<size_t>(r0_ + i * step_) * static_cast<size_t>(scales_->dim(1));
}

void Mxfp4::dequantize_rows(int64_t r0, int64_t r1, float* dst) const {
  check_rows(r0, r1);
  const int64_t G = groups();
  for (int64_t i = r0; i < r1; ++i) {
    const uint8_t* b = row_blocks(i);
    const uint8_t* s = row_scales(i);
    float* out = dst + (i - r0) * G * 32;
    for (int64_t g = 0; g < G; ++g, b += 16, out += 32) {
      // 255 is the E8M0 NaN: refused at load (check_scales); exponents below 2^−126 are
      // subnormal in f32, which ldexp gives exactly.
      const float scale = std::ldexp(1.0f, static_cast<int>(s[g]) - 127);
      for (int j = 0; j < 16; ++j) {
        out[2 * j] = kFp4[b[j] & 0x0F] * scale;
        out[2 * j + 1] = kFp4[b[j] >> 4] * scale;
      }
    }
  }
}

std::shared_ptr<const Encoding> Mxfp4::slice_rows(int64_t r0, int64_t r1) const {
  check_rows(r0, r1);
  if (r1 == r0) throw Error::unsupported("mxfp4: an empty row range");
  return std::make_shared<Mxfp4>(blocks_, scales_, r0_ + r0 * step_, step_, r1 - r0);
}

std::shared_ptr<const Encoding> Mxfp4::take_rows(const std::vector<int64_t>& rows) const {
  if (rows.empty()) throw Error::unsupported("mxfp4: no rows taken");
  const int64_t G = groups(), n = static_cast<int64_t>(rows.size());
  Tensor b = Tensor::zeros(DType::U8, {n, 16 * G}), s = Tensor::zeros(DType::U8, {n, G});
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = rows[static_cast<size_t>(i)];
    check_rows(r, r + 1);
    std::memcpy(b.mutable_data() + i * 16 * G, row_blocks(r), static_cast<size_t>(16 * G));
    std::memcpy(s.mutable_data() + i * G, row_scales(r), static_cast<size_t>(G));
  }
  return std::make_shared<Mxfp4>(std::make_shared<const Tensor>(std::move(b)), std::make_shared<const Tensor>(std::move(s)), 0,
                                 1, n);
}

void Mxfp4::check_scales(const Tensor& scales, const std::string& name) {
  const int64_t per_expert = scales.numel() / std::max<int64_t>(scales.dim(0), 1);
  const uint8_t* p = scales.data();
  const uint8_t* hit = std::find(p, p + scales.numel(), uint8_t{255});
  if (hit != p + scales.numel())
    throw Error::corruption(name + "_scales: e8m0 scale 255 (NaN) in expert " + std::to_string((hit - p) / per_expert));
}

}  // namespace moe::core
