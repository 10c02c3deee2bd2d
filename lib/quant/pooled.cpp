#include "quant/pooled.h"

#include "core/error.h"

namespace moe::quant {

using core::Error;

namespace {
int64_t pooled_dim(const Pooled::Part& p, int d) { return p && p->valid() && p->rank() == 2 ? p->dim(d) : 0; }
}  // namespace

Pooled::Pooled(Part weight) : Encoding(pooled_dim(weight, 0), pooled_dim(weight, 1)), weight_(std::move(weight)) {
  if (!weight_ || !weight_->valid()) throw Error::corruption("pooled part weight missing");
  const core::DType t = weight_->dtype();
  if (weight_->encoding() || weight_->rank() != 2 ||
      !(t == core::DType::F32 || t == core::DType::BF16 || t == core::DType::F16))
    throw Error::corruption(std::string("pooled part weight: expected a rank-2 F32, BF16 or F16 tensor, found ") +
                            core::dtype_name(t) + " " + core::shape_str(weight_->shape()));
}

void Pooled::dequantize_rows(int64_t r0, int64_t r1, float* dst) const {
  check_rows(r0, r1);
  if (r1 > r0) weight_->slice0(r0, r1).to_f32(dst);
}

}  // namespace moe::quant
