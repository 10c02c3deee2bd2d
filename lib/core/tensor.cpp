#include "core/tensor.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/error.h"
#include "core/fp8_block.h"
#include "core/tensor_arena.h"

namespace moe::core {

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) throw Error::corruption("negative dimension in shape " + shape_str(shape));
    if (d != 0 && n > (int64_t{1} << 62) / d)
      throw Error::corruption("shape " + shape_str(shape) + " has too many elements");
    n *= d;
  }
  return n;
}

std::string shape_str(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

Tensor::Tensor(DType dtype, Shape shape, const uint8_t* data, std::shared_ptr<const void> owner)
    : dtype_(dtype), shape_(std::move(shape)), numel_(shape_numel(shape_)), data_(data),
      owner_(std::move(owner)) {}

Tensor Tensor::zeros(DType dtype, Shape shape) {
  const int64_t n = shape_numel(shape);
  const size_t bytes = static_cast<size_t>(n) * dtype_size(dtype);
  if (TensorArena* arena = installed_arena(); arena && bytes >= arena->min_bytes()) {
    TensorArena::Block b = arena->allocate(bytes);
    Tensor t(dtype, std::move(shape), b.data, std::move(b.owner));
    t.owned_ = true;
    return t;
  }
  auto buf = std::shared_ptr<uint8_t[]>(new uint8_t[bytes > 0 ? bytes : 1]());
  Tensor t(dtype, std::move(shape), buf.get(), std::shared_ptr<const void>(buf, buf.get()));
  t.owned_ = true;
  return t;
}

Tensor Tensor::from_f32(const std::vector<float>& values, Shape shape) {
  Tensor t = zeros(DType::F32, std::move(shape));
  if (static_cast<int64_t>(values.size()) != t.numel())
    throw Error::internal("Tensor::from_f32: " + std::to_string(values.size()) + " values for shape " +
                          shape_str(t.shape()));
  std::memcpy(t.mutable_data(), values.data(), values.size() * 4);
  return t;
}

uint8_t* Tensor::mutable_data() {
  if (!owned_) throw Error::internal("mutable_data() on a tensor view");
  return const_cast<uint8_t*>(data_);
}

Tensor Tensor::slice0(int64_t begin, int64_t end) const {
  if (shape_.empty() || begin < 0 || end < begin || end > shape_[0])
    throw Error::internal("slice0 [" + std::to_string(begin) + ", " + std::to_string(end) +
                          ") out of range for shape " + shape_str(shape_));
  if (enc_) return encoded(enc_->slice_rows(begin, end), dtype_);
  Shape s = shape_;
  s[0] = end - begin;
  const size_t row_bytes = shape_[0] ? nbytes() / static_cast<size_t>(shape_[0]) : 0;
  Tensor t(dtype_, std::move(s), data_ + static_cast<size_t>(begin) * row_bytes, owner_);
  t.owned_ = false;
  return t;
}

Tensor Tensor::take_rows(const std::vector<int64_t>& rows) const {
  if (shape_.empty()) throw Error::internal("take_rows: scalar tensor");
  for (int64_t r : rows)
    if (r < 0 || r >= shape_[0])
      throw Error::internal("take_rows: row " + std::to_string(r) + " of " + std::to_string(shape_[0]));
  if (enc_) return encoded(enc_->take_rows(rows), dtype_);
  Shape s = shape_;
  s[0] = static_cast<int64_t>(rows.size());
  const size_t row_bytes = shape_[0] ? nbytes() / static_cast<size_t>(shape_[0]) : 0;
  Tensor out = zeros(dtype_, std::move(s));
  uint8_t* dst = out.mutable_data();
  for (size_t i = 0; i < rows.size(); ++i)
    std::memcpy(dst + i * row_bytes, data_ + static_cast<size_t>(rows[i]) * row_bytes, row_bytes);
  return out;
}

Tensor Tensor::reshaped(Shape shape) const {
  if (shape_numel(shape) != numel_)
    throw Error::internal("reshape " + shape_str(shape_) + " to " + shape_str(shape));
  if (enc_ && shape != shape_) throw Error::internal("reshape of an encoded (" + enc_->name() + ") tensor " + shape_str(shape_));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

std::vector<float> Tensor::to_f32() const {
  std::vector<float> out(static_cast<size_t>(numel_));
  to_f32(out.data());
  return out;
}

void Tensor::to_f32(float* dst) const {
  if (enc_) {
    enc_->dequantize_rows(0, enc_->rows(), dst);
    return;
  }
  core::to_f32(dtype_, data_, dst, static_cast<size_t>(numel_));
}

void Tensor::rows_to_f32(int64_t r0, int64_t r1, float* dst) const {
  if (shape_.empty() || r0 < 0 || r1 < r0 || r1 > shape_[0])
    throw Error::internal("rows_to_f32 [" + std::to_string(r0) + ", " + std::to_string(r1) + ") out of range for shape " +
                          shape_str(shape_));
  if (enc_) {
    enc_->dequantize_rows(r0, r1, dst);
    return;
  }
  const size_t row_values = shape_[0] ? static_cast<size_t>(numel_ / shape_[0]) : 0;
  const size_t row_bytes = shape_[0] ? nbytes() / static_cast<size_t>(shape_[0]) : 0;
  core::to_f32(dtype_, data_ + static_cast<size_t>(r0) * row_bytes, dst, static_cast<size_t>(r1 - r0) * row_values);
}

Tensor Tensor::converted(DType to) const {
  if (!enc_) {
    if (to == dtype_) return *this;
    Tensor t = zeros(to, shape_);
    convert(dtype_, data_, to, t.mutable_data(), static_cast<size_t>(numel_));
    return t;
  }
  const std::vector<float> v = to_f32();
  Tensor t = zeros(to, shape_);
  convert(DType::F32, v.data(), to, t.mutable_data(), v.size());
  return t;
}

Tensor Tensor::encoded(std::shared_ptr<const Encoding> enc, DType dtype) {
  if (!enc) throw Error::internal("Tensor::encoded: no encoding");
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = {enc->rows(), enc->cols()};
  t.numel_ = shape_numel(t.shape_);
  t.enc_ = std::move(enc);
  return t;
}

size_t Tensor::nbytes() const {
  if (!enc_) return static_cast<size_t>(numel_) * dtype_size(dtype_);
  size_t n = 0;
  for (const auto& p : enc_->parts()) n += p.tensor->nbytes();
  return n;
}

std::vector<const Tensor*> Tensor::stored_tensors() const {
  if (!enc_) return {this};
  std::vector<const Tensor*> out;
  // The parts are owned by the encoding, which this tensor keeps alive.
  for (const auto& p : enc_->parts()) out.push_back(p.tensor.get());
  return out;
}

Tensor Tensor::with_block_scale(const Tensor& scale, int64_t block_rows, int64_t block_cols) const {
  return encoded(std::make_shared<Fp8Block>(*this, scale, block_rows, block_cols), DType::F8_E4M3);
}

Tensor Tensor::quantize_fp8_blocks(const std::vector<float>& values, int64_t rows, int64_t cols, int64_t br, int64_t bc) {
  if (static_cast<int64_t>(values.size()) != rows * cols || br < 1 || bc < 1)
    throw Error::internal("quantize_fp8_blocks: bad arguments");
  const int64_t sr = (rows + br - 1) / br, scn = (cols + bc - 1) / bc;
  std::vector<float> scales(static_cast<size_t>(sr * scn), 0.0f);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      float& m = scales[(i / br) * scn + j / bc];
      m = std::max(m, std::fabs(values[i * cols + j]));
    }
  for (float& m : scales) m = m > 0 ? m / 448.0f : 1.0f;
  std::vector<float> scaled(values.size());
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) scaled[i * cols + j] = values[i * cols + j] / scales[(i / br) * scn + j / bc];
  Tensor q = zeros(DType::F8_E4M3, {rows, cols});
  convert(DType::F32, scaled.data(), DType::F8_E4M3, q.mutable_data(), scaled.size());
  return q.with_block_scale(from_f32(scales, {sr, scn}), br, bc);
}

}  // namespace moe::core
