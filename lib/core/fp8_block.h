// Block-scaled FP8 as an encoding (core/encoding.h): DeepSeek-V3/R1, Kimi-K2 and Qwen3 "-FP8"
// checkpoints (config.json quantization_config {"quant_method": "fp8", "weight_block_size":
// [br, bc]}). Parts: the weight's own F8_E4M3 codes [rows, cols] (stored under the weight's name)
// and `weight_scale_inv` [ceil(rows/br), ceil(cols/bc)] (F32 or BF16, stored as
// `<name>_scale_inv`). value(i, j) = f8e4m3(code(i, j)) * scale(i / br, j / bc).
// Bits per weight: 8 + 32 (or 16) / (br * bc).
#pragma once

#include "core/encoding.h"
#include "core/tensor.h"

namespace moe::core {

class Fp8Block final : public Encoding {
 public:
  // Throws Error::corruption when codes are not rank-2 F8_E4M3, the block size is not positive,
  // or the scale's dtype or shape does not fit.
  Fp8Block(Tensor codes, Tensor scale, int64_t block_rows, int64_t block_cols);

  std::string name() const override { return "fp8-block"; }
  nlohmann::json params() const override { return {{"block", {block_rows_, block_cols_}}}; }
  std::vector<EncodedPart> parts() const override;
  DtypeRule dtype_rule() const override { return DtypeRule::Materialize; }
  void dequantize_rows(int64_t r0, int64_t r1, float* dst) const override;
  // Whole blocks of rows only (r0 a multiple of block_rows, r1 too or the last row).
  std::shared_ptr<const Encoding> slice_rows(int64_t r0, int64_t r1) const override;
  // Any rows when a block is one row high; otherwise Error::unsupported (a row's scale is shared
  // with the other rows of its block).
  std::shared_ptr<const Encoding> take_rows(const std::vector<int64_t>& rows) const override;

  const Tensor& codes() const { return *codes_; }
  const Tensor& scale() const { return *scale_; }
  int64_t block_rows() const { return block_rows_; }
  int64_t block_cols() const { return block_cols_; }

 private:
  std::shared_ptr<const Tensor> codes_, scale_;
  int64_t block_rows_, block_cols_;
};

}  // namespace moe::core
