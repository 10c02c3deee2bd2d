#include "core/fp8_block.h"

#include "core/error.h"

namespace moe::core {

Fp8Block::Fp8Block(Tensor codes, Tensor scale, int64_t block_rows, int64_t block_cols)
    : Encoding(codes.rank() == 2 ? codes.dim(0) : 0, codes.rank() == 2 ? codes.dim(1) : 0),
      block_rows_(block_rows), block_cols_(block_cols) {
  if (codes.dtype() != DType::F8_E4M3 || codes.rank() != 2 || codes.encoding())
    throw Error::corruption("a block-scaled weight must be a rank-2 F8_E4M3 tensor, found " +
                            std::string(dtype_name(codes.dtype())) + " " + shape_str(codes.shape()));
  if (block_rows < 1 || block_cols < 1) throw Error::corruption("weight_block_size must be two positive integers");
  if (scale.dtype() != DType::F32 && scale.dtype() != DType::BF16)
    throw Error::corruption("scale dtype " + std::string(dtype_name(scale.dtype())) + ", expected F32 or BF16");
  const Shape want = {(rows() + block_rows - 1) / block_rows, (cols() + block_cols - 1) / block_cols};
  if (scale.shape() != want)
    throw Error::corruption("scale shape " + shape_str(scale.shape()) + ", expected " + shape_str(want) + " for weight " +
                            shape_str(codes.shape()) + " in blocks of [" + std::to_string(block_rows) + ", " +
                            std::to_string(block_cols) + "]");
  codes_ = std::make_shared<const Tensor>(std::move(codes));
  scale_ = std::make_shared<const Tensor>(std::move(scale));
}

std::vector<EncodedPart> Fp8Block::parts() const {
  return {{"codes", "", codes_, false}, {"scale_inv", "_scale_inv", scale_, false}};
}

void Fp8Block::dequantize_rows(int64_t r0, int64_t r1, float* dst) const {
  check_rows(r0, r1);
  const int64_t cols = this->cols();
  core::to_f32(DType::F8_E4M3, codes_->data() + r0 * cols, dst, static_cast<size_t>((r1 - r0) * cols));
  const int64_t sc_cols = scale_->dim(1);
  const int64_t b0 = r0 / block_rows_, b1 = r1 == r0 ? b0 : (r1 - 1) / block_rows_ + 1;
  std::vector<float> sc(static_cast<size_t>((b1 - b0) * sc_cols));
  core::to_f32(scale_->dtype(), scale_->data() + b0 * sc_cols * dtype_size(scale_->dtype()), sc.data(), sc.size());
  for (int64_t i = r0; i < r1; ++i) {
    const float* srow = sc.data() + (i / block_rows_ - b0) * sc_cols;
    float* d = dst + (i - r0) * cols;
    for (int64_t j = 0; j < cols; ++j) d[j] *= srow[j / block_cols_];
  }
}

std::shared_ptr<const Encoding> Fp8Block::slice_rows(int64_t r0, int64_t r1) const {
  check_rows(r0, r1);
  if (r0 % block_rows_ != 0 || (r1 % block_rows_ != 0 && r1 != rows()))
    throw Error::internal("slice0 [" + std::to_string(r0) + ", " + std::to_string(r1) + ") cuts a scale block of " +
                          std::to_string(block_rows_) + " rows");
  return std::make_shared<Fp8Block>(codes_->slice0(r0, r1),
                                    scale_->slice0(r0 / block_rows_, (r1 + block_rows_ - 1) / block_rows_), block_rows_,
                                    block_cols_);
}

std::shared_ptr<const Encoding> Fp8Block::take_rows(const std::vector<int64_t>& rows) const {
  if (block_rows_ != 1) return Encoding::take_rows(rows);
  return std::make_shared<Fp8Block>(codes_->take_rows(rows), scale_->take_rows(rows), block_rows_, block_cols_);
}

}  // namespace moe::core
