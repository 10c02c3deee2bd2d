// Pooled weights (core/encoding.h): cross-layer expert sharing (passes/xlayer_share.h) stores an
// expert of an expert pool once and lets the experts of two adjacent MoE layers refer to it.
//   part "weight" [out, in], F32, BF16 or F16: the weight itself, always a shared part (stored
//   once, as `<first user's name>.pooled`; the other users name that tensor, docs/FORMAT.md).
// Decoding is the part read as it is (W = weight), so a pooled model computes exactly what its
// materialized copy (`convert --materialize`) computes.
#pragma once

#include <memory>

#include "core/encoding.h"
#include "core/tensor.h"

namespace moe::quant {

class Pooled final : public core::Encoding {
 public:
  using Part = std::shared_ptr<const core::Tensor>;
  // Throws Error::corruption when the part is missing or not a plain rank-2 float tensor.
  explicit Pooled(Part weight);

  std::string name() const override { return "pooled"; }
  nlohmann::json params() const override { return nlohmann::json::object(); }
  std::vector<core::EncodedPart> parts() const override { return {{"weight", ".pooled", weight_, true}}; }
  void dequantize_rows(int64_t r0, int64_t r1, float* dst) const override;
  DtypeRule dtype_rule() const override { return DtypeRule::ConvertParts; }

  const Part& weight() const { return weight_; }

 private:
  Part weight_;
};

}  // namespace moe::quant
