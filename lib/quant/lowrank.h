// Low-rank weights (core/encoding.h): W = A·B, or W = base + A·B.
//   A [out, r], B [r, in], base [out, in]; any float dtype (F32, BF16, F16), each part may be
//   shared by several weights (a layer's shared basis, a D²-MoE base): stored once.
// Stored as `<name>.lr_a`, `<name>.lr_b`, `<name>.lr_base` (docs/FORMAT.md). Produced by the
// factorize pass (passes/factorize.h):
//   svd / asvd / svdllm: own A and B (SVD, ASVD, SVD-LLM: docs/methods.md)
//   delta (D²-MoE, Gu et al. 2025): shared base + own A, B (or a shared B: "shared V")
//   latent (MoLE): own A with a shared B (gate/up), or a shared A with own B (down)
// The forward runs it as two thin GEMMs, x·Bᵀ then ·Aᵀ (+ x·baseᵀ), never rebuilding W
// (runtime/weights.h).
#pragma once

#include <memory>

#include "core/encoding.h"
#include "core/tensor.h"

namespace moe::quant {

class LowRank final : public core::Encoding {
 public:
  using Part = std::shared_ptr<const core::Tensor>;
  // Throws Error::corruption when a part is not a rank-2 float tensor, the shapes do not chain
  // ([out, r]·[r, in], base [out, in]), or r > min(out, in).
  LowRank(Part a, Part b, Part base = nullptr, bool a_shared = false, bool b_shared = false, bool base_shared = false);

  std::string name() const override { return "lowrank"; }
  nlohmann::json params() const override { return {{"rank", rank()}}; }
  std::vector<core::EncodedPart> parts() const override;
  void dequantize_rows(int64_t r0, int64_t r1, float* dst) const override;
  std::shared_ptr<const core::Encoding> slice_rows(int64_t r0, int64_t r1) const override;
  // Rows of A (and of base); B is kept as it is (still shared when it was).
  std::shared_ptr<const core::Encoding> take_rows(const std::vector<int64_t>& rows) const override;
  DtypeRule dtype_rule() const override { return DtypeRule::ConvertParts; }

  int64_t rank() const { return a_->dim(1); }
  const core::Tensor& a() const { return *a_; }
  const core::Tensor& b() const { return *b_; }
  const core::Tensor* base() const { return base_.get(); }
  const Part& a_part() const { return a_; }
  const Part& b_part() const { return b_; }
  const Part& base_part() const { return base_; }

 private:
  Part a_, b_, base_;
  bool a_shared_, b_shared_, base_shared_;
};

}  // namespace moe::quant
