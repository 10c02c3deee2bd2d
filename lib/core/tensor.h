// A tensor: dtype, shape (row-major, HF orientation [out, in] for weights) and a byte range.
// The bytes are either a zero-copy view into a mapped file or an owned buffer; `owner` keeps
// whichever it is alive. Tensors are cheap to copy (shared ownership of the bytes).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/encoding.h"

namespace moe::core {

using Shape = std::vector<int64_t>;

// Product of dims; throws Error::corruption on negative dims or overflow past 2^62.
int64_t shape_numel(const Shape& shape);
std::string shape_str(const Shape& shape);  // "[8, 128]"

class Tensor {
 public:
  Tensor() = default;
  // A view of `nbytes` at `data`, kept alive by `owner`.
  Tensor(DType dtype, Shape shape, const uint8_t* data, std::shared_ptr<const void> owner);
  // A new zero-filled tensor owning its bytes.
  static Tensor zeros(DType dtype, Shape shape);
  // A new F32 tensor holding a copy of `values` (size must equal numel(shape)).
  static Tensor from_f32(const std::vector<float>& values, Shape shape);

  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int64_t dim(size_t i) const { return shape_.at(i); }
  size_t rank() const { return shape_.size(); }
  int64_t numel() const { return numel_; }
  size_t nbytes() const;
  const uint8_t* data() const { return data_; }
  // Writable bytes; only valid for tensors created by zeros()/from_f32()/converted().
  uint8_t* mutable_data();
  bool valid() const { return data_ != nullptr || enc_ != nullptr || numel_ == 0; }
  bool owns_data() const { return owned_; }

  // Rows [begin, end) along dimension 0, zero-copy, shape [end-begin, rest...].
  Tensor slice0(int64_t begin, int64_t end) const;
  // Rows `rows` along dimension 0 (in that order, repeats allowed) as a new tensor owning its
  // bytes, shape [rows.size(), rest...]: a byte copy for a plain tensor (exact for every dtype), for
  // an encoded one the encoding's own rows (Encoding::take_rows: Error::unsupported where the
  // encoding cannot give them without decoding). Error::internal for a row out of range.
  Tensor take_rows(const std::vector<int64_t>& rows) const;
  // Same bytes seen with another shape of equal numel.
  Tensor reshaped(Shape shape) const;
  // All elements as f32 (exact for bf16/f16/f8).
  std::vector<float> to_f32() const;
  void to_f32(float* dst) const;
  // Rows [r0, r1) along dimension 0 as f32 into dst ((r1 - r0) · numel/dim(0) values): the same
  // values to_f32() gives for those rows (an encoded tensor decodes only them:
  // Encoding::dequantize_rows). Error::internal for a range out of bounds.
  void rows_to_f32(int64_t r0, int64_t r1, float* dst) const;
  // A new tensor of dtype `to` (round to nearest even); returns *this when dtype matches (an
  // encoded tensor is always dequantized into a new plain tensor).
  Tensor converted(DType to) const;

  // Encoded weights (core/encoding.h): a tensor may stand for an encoded weight instead of
  // holding bytes. Then shape() is the logical [out, in], dtype() the dtype of its main stored
  // values (the factors' dtype, F8_E4M3 for FP8 codes), data() is null, nbytes() counts every
  // byte of its parts (shared parts whole), to_f32() and converted() dequantize (converted()
  // always returns a plain tensor, even for dtype()), slice0() asks the encoding for a row range
  // (Error::unsupported where it cannot), and reshaped() refuses any other shape.
  static Tensor encoded(std::shared_ptr<const Encoding> enc, DType dtype);
  const Encoding* encoding() const { return enc_.get(); }
  const std::shared_ptr<const Encoding>& encoding_ptr() const { return enc_; }
  // The plain tensors behind this one: itself, or each stored part of its encoding.
  std::vector<const Tensor*> stored_tensors() const;

  // Block-scaled FP8 (DeepSeek-V3, Qwen3 "fp8": `X.weight` F8_E4M3 with `X.weight_scale_inv`
  // [ceil(rows/br), ceil(cols/bc)]): this rank-2 F8 tensor encoded with `scale`
  // (core/fp8_block.h); throws Error::corruption when the scale's dtype or shape does not fit
  // (the caller adds the file and tensor names as context).
  Tensor with_block_scale(const Tensor& scale, int64_t block_rows, int64_t block_cols) const;
  // FP8 E4M3 codes and scales for f32 values [rows, cols] in blocks of [br, bc]: each block's
  // scale = max|x| / 448 (1 for an all-zero block), codes = round(x / scale).
  static Tensor quantize_fp8_blocks(const std::vector<float>& values, int64_t rows, int64_t cols, int64_t br, int64_t bc);

 private:
  DType dtype_ = DType::F32;
  Shape shape_;
  int64_t numel_ = 0;
  const uint8_t* data_ = nullptr;
  std::shared_ptr<const void> owner_;
  bool owned_ = false;
  std::shared_ptr<const Encoding> enc_;
};

}  // namespace moe::core
