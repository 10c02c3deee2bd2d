// The gpt_oss fused-expert strided views and the MXFP4 decoder (lib/model/detail.h).
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "model/detail.h"

namespace moe::model::detail {

using core::Error;

Tensor gather(const Tensor& flat, const Shape& shape, Strides st) {
  if (flat.encoding()) throw Error::internal("gather: encoded tensor");
  Tensor out = Tensor::zeros(flat.dtype(), shape);
  const size_t es = core::dtype_size(flat.dtype());
  const int64_t n = shape.at(0), m = shape.size() > 1 ? shape[1] : 1;
  uint8_t* dst = out.mutable_data();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j)
      std::copy_n(flat.data() + static_cast<size_t>(st.offset + i * st.s0 + j * st.s1) * es, es,
                  dst + static_cast<size_t>(i * m + j) * es);
  return out;
}
void scatter(const Tensor& t, Tensor& flat, Strides st) {
  const size_t es = core::dtype_size(flat.dtype());
  const int64_t n = t.dim(0), m = t.rank() > 1 ? t.dim(1) : 1;
  uint8_t* dst = flat.mutable_data();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j)
      std::copy_n(t.data() + static_cast<size_t>(i * m + j) * es, es, dst + static_cast<size_t>(st.offset + i * st.s0 + j * st.s1) * es);
}

Tensor mxfp4_rows(const Tensor& blocks, const Tensor& scales, int64_t e, int64_t r0, int64_t step, int64_t n,
                  const std::string& name) {
  static constexpr float kFp4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
  const int64_t R = blocks.dim(1), G = blocks.dim(2);
  std::vector<float> v(static_cast<size_t>(n * G * 32));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = r0 + i * step;
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t s = scales.data()[(e * R + r) * G + g];
      if (s == 255) throw Error::corruption(name + "_scales: e8m0 scale 255 (NaN) in expert " + std::to_string(e));
      const float scale = std::ldexp(1.0f, int(s) - 127);
      const uint8_t* b = blocks.data() + ((e * R + r) * G + g) * 16;
      float* out = v.data() + i * G * 32 + g * 32;
      for (int j = 0; j < 16; ++j) {
        out[2 * j] = kFp4[b[j] & 0x0F] * scale;
        out[2 * j + 1] = kFp4[b[j] >> 4] * scale;
      }
    }
  }
  return Tensor::from_f32(v, {n, G * 32}).converted(DType::BF16);
}

}  // namespace moe::model::detail
