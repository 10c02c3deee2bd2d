#include "core/tensor.h"

#include <cstring>
#include <limits>

#include "core/error.h"

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
  Shape s = shape_;
  s[0] = end - begin;
  const size_t row_bytes = shape_[0] ? nbytes() / static_cast<size_t>(shape_[0]) : 0;
  Tensor t(dtype_, std::move(s), data_ + static_cast<size_t>(begin) * row_bytes, owner_);
  t.owned_ = false;
  return t;
}

Tensor Tensor::reshaped(Shape shape) const {
  if (shape_numel(shape) != numel_)
    throw Error::internal("reshape " + shape_str(shape_) + " to " + shape_str(shape));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

std::vector<float> Tensor::to_f32() const {
  std::vector<float> out(static_cast<size_t>(numel_));
  to_f32(out.data());
  return out;
}

void Tensor::to_f32(float* dst) const { core::to_f32(dtype_, data_, dst, static_cast<size_t>(numel_)); }

Tensor Tensor::converted(DType to) const {
  if (to == dtype_) return *this;
  Tensor t = zeros(to, shape_);
  convert(dtype_, data_, to, t.mutable_data(), static_cast<size_t>(numel_));
  return t;
}

}  // namespace moe::core
