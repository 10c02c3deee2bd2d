// libFuzzer target: arbitrary bytes as the parts of a ternary-dict weight (quant/ternary_dict.h),
// decoded as a checkpoint's config entry and parts are (quant::decode), then, when accepted,
// dequantized whole, trit by trit and as a row slice. Layout of an input (little endian; missing
// bytes read as 0): u8 rows (mod 16), u8 cols (mod 64), u16 dictionary entries K (mod 512), u16
// codes n (mod 1024), u8 counts type (mod 4: U8, U16, U32, or I32, which must be refused), then
// K u16 dictionary entries, rows counts, n u16 codes and rows·2 f16 levels. Errors must be moe::core::Error; a crash, a read out of bounds (ASan), UB or
// another exception type is a bug.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "quant/registry.h"
#include "quant/ternary_dict.h"

namespace {

struct Reader {
  const uint8_t* p;
  size_t n, at = 0;
  uint8_t byte() { return at < n ? p[at++] : 0; }
  void bytes(uint8_t* dst, size_t k) {
    for (size_t i = 0; i < k; ++i) dst[i] = byte();
  }
};

std::shared_ptr<const moe::core::Tensor> part(Reader& r, moe::core::DType d, moe::core::Shape shape) {
  auto t = std::make_shared<moe::core::Tensor>(moe::core::Tensor::zeros(d, shape));
  r.bytes(t->mutable_data(), t->nbytes());
  return t;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using moe::core::DType;
  Reader r{data, size};
  const int64_t rows = r.byte() % 16, cols = r.byte() % 64;
  const int64_t K = (r.byte() | (r.byte() << 8)) % 512, n = (r.byte() | (r.byte() << 8)) % 1024;
  const DType counts[] = {DType::U8, DType::U16, DType::U32, DType::I32};
  const DType ct = counts[r.byte() % 4];
  std::map<std::string, moe::quant::StoredPart> parts;
  parts["dictionary"] = {part(r, DType::U16, {K}), true};
  parts["counts"] = {part(r, ct, {rows}), false};
  parts["codes"] = {part(r, DType::U16, {n}), false};
  parts["levels"] = {part(r, DType::F16, {rows, 2}), false};
  try {
    const auto enc = moe::quant::decode({{"encoding", "ternary-dict"}, {"cols", cols}}, parts);
    std::vector<float> w(static_cast<size_t>(rows * cols));
    enc->dequantize_rows(0, rows, w.data());
    const auto* td = dynamic_cast<const moe::quant::TernaryDict*>(enc.get());
    if (!td || ct == DType::I32) std::abort();
    std::vector<uint8_t> t(static_cast<size_t>(cols));
    for (int64_t i = 0; i < rows; ++i) {
      td->trits_row(i, t.data());
      for (int64_t j = 0; j < cols; ++j) {
        if (t[static_cast<size_t>(j)] > 2) std::abort();
        if (t[static_cast<size_t>(j)] == 0 && w[static_cast<size_t>(i * cols + j)] != 0.0f) std::abort();
      }
    }
    const auto s = enc->slice_rows(rows / 2, rows);
    std::vector<float> w2(static_cast<size_t>((rows - rows / 2) * cols));
    s->dequantize_rows(0, s->rows(), w2.data());
    // (memcmp of zero bytes would still be passed the null data() of an empty vector: skip it)
    if (!w2.empty() && std::memcmp(w2.data(), w.data() + (rows / 2) * cols, w2.size() * sizeof(float)) != 0) {
      // NaN levels compare unequal bytewise only if the bytes differ: they must not.
      std::abort();
    }
  } catch (const moe::core::Error&) {
  }
  return 0;
}
