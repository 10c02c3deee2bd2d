// The gpt_oss fused-expert strided views (lib/model/detail.h).
#include <algorithm>
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

}  // namespace moe::model::detail
