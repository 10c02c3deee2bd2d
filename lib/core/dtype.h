// Element types of safetensors files and their conversion to and from fp32.
// bf16/f16/f8 -> f32 is exact; f32 -> bf16/f16/f8 rounds to nearest, ties to even.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace moe::core {

enum class DType : uint8_t {
  F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U8, BOOL, U16, U32,
  kCount
};

struct DTypeInfo {
  DType dtype;
  const char* name;  // safetensors spelling
  size_t size;       // bytes per element
  bool is_float;
};

const DTypeInfo& dtype_info(DType t);
inline size_t dtype_size(DType t) { return dtype_info(t).size; }
inline const char* dtype_name(DType t) { return dtype_info(t).name; }
std::optional<DType> parse_dtype(std::string_view safetensors_name);
// Accepts user spellings: bf16, f16, fp16, f32, fp32, float32, bfloat16, float16.
std::optional<DType> parse_user_dtype(std::string_view s);

// Scalar conversions.
float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
float f8e4m3_to_f32(uint8_t v);
uint8_t f32_to_f8e4m3(float f);
float f8e5m2_to_f32(uint8_t v);
uint8_t f32_to_f8e5m2(float f);

// Converts n elements of type `from` at src to f32 at dst. Integer and bool types convert by value.
void to_f32(DType from, const void* src, float* dst, size_t n);
// Converts n f32 values to type `to` (float types only; round to nearest even).
void from_f32(DType to, const float* src, void* dst, size_t n);
// Converts n elements between two dtypes. Same dtype: memcpy. Float<->float via f32 (f64 direct).
void convert(DType from, const void* src, DType to, void* dst, size_t n);
// Index of the first NaN or Inf among n elements of a float dtype (from the bit patterns, no
// conversion), or -1 when all are finite or the dtype is not a float type.
int64_t first_non_finite(DType t, const void* src, size_t n);

}  // namespace moe::core
