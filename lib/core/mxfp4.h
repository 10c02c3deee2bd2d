// MXFP4 as an encoding (core/encoding.h): the routed experts of the released gpt-oss checkpoints
// (config.json quantization_config {"quant_method": "mxfp4"}; transformers' integrations/mxfp4.py
// convert_moe_packed_tensors, OCP Microscaling Formats v1.0). A fused tensor `<name>_blocks`
// [E, R, G, 16] U8 holds two FP4 E2M1 codes per byte (low nibble first) and `<name>_scales`
// [E, R, G] U8 one E8M0 exponent per block of 32 values:
//   value(r, 32·g + 2·j + h) = fp4(nibble h of blocks[e, r, g, j]) · 2^(scales[e, r, g] − 127).
// Row r of expert e decoded is [G·32], the weight's input dim (the tensor transformers decodes is
// its transpose, [E, G·32, R]). gpt-oss interleaves gate and up: gate_up_proj rows 2k (gate) and
// 2k + 1 (up); down_proj's rows are the outputs.
//
// One weight [rows = n, cols = G·32] is the rows r0, r0 + step, … (n of them) of one expert's
// blocks [R, G·16] and scales [R, G] (views of the file: nothing is decoded or copied at load).
// Bits per weight: 4 + 8/32 = 4.25. FP4 values times a power of two are exact in f32 and BF16.
// Written as the fused blocks again by the gpt_oss output (model/outputs.cpp), byte for byte;
// everywhere else decoded (DtypeRule::Dequantize).
#pragma once

#include <cstdint>
#include <memory>

#include "core/encoding.h"
#include "core/tensor.h"

namespace moe::core {

class Mxfp4 final : public Encoding {
 public:
  // `blocks` U8 [R, G·16] and `scales` U8 [R, G] of one expert (shared by the weights taking
  // their rows from them, as gate and up do); rows r0 + i·step for i in [0, n). Throws
  // Error::internal when the shapes or the row range do not fit.
  Mxfp4(std::shared_ptr<const Tensor> blocks, std::shared_ptr<const Tensor> scales, int64_t r0, int64_t step, int64_t n);

  std::string name() const override { return "mxfp4"; }
  nlohmann::json params() const override { return {{"block", 32}}; }
  // "blocks" and "scales": the expert's views (shared when step > 1: gate and up split them).
  std::vector<EncodedPart> parts() const override;
  void dequantize_rows(int64_t r0, int64_t r1, float* dst) const override;
  std::shared_ptr<const Encoding> slice_rows(int64_t r0, int64_t r1) const override;
  // The rows' blocks and scales copied (never re-encoded).
  std::shared_ptr<const Encoding> take_rows(const std::vector<int64_t>& rows) const override;
  DtypeRule dtype_rule() const override { return DtypeRule::Dequantize; }

  // Row i's 16·G block bytes and G scale bytes.
  const uint8_t* row_blocks(int64_t i) const;
  const uint8_t* row_scales(int64_t i) const;
  int64_t groups() const { return cols() / 32; }

  // Error::corruption "<name>_scales: e8m0 scale 255 (NaN) in expert e" when a scale of the fused
  // `scales` [E, R, G] is 255 (the E8M0 NaN); `name` is the fused tensor's name.
  static void check_scales(const Tensor& scales, const std::string& name);

 private:
  std::shared_ptr<const Tensor> blocks_, scales_;
  int64_t r0_, step_;
};

}  // namespace moe::core
