// libFuzzer target: arbitrary bytes as the start of a safetensors file.
// moe::io::parse_safetensors_header must either return a header that satisfies every rule of the
// format or throw moe::core::Error; anything else (another exception, a crash, a sanitizer report,
// a read outside the buffer) is a bug.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "io/safetensors.h"

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

void validate(const moe::io::SafetensorsHeader& h, uint64_t file_size) {
  check(h.data_start >= 8 && h.data_start <= file_size);
  check(h.data_start - 8 <= moe::io::kMaxSafetensorsHeader);
  check(h.data_start + h.data_size == file_size);
  uint64_t expect = 0;
  for (const auto& t : h.tensors) {
    check(t.begin == expect);  // sorted, no holes, no overlaps
    check(t.end >= t.begin && t.end <= h.data_size);
    const int64_t n = moe::core::shape_numel(t.shape);
    check(n >= 0);
    check(t.nbytes() / moe::core::dtype_size(t.dtype) == static_cast<uint64_t>(n));
    check(t.nbytes() % moe::core::dtype_size(t.dtype) == 0);
    check(t.name != "__metadata__");
    expect = t.end;
  }
  check(expect == h.data_size);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Exact-size copy so ASan sees any read past the end.
  std::vector<uint8_t> buf(data, data + size);
  try {
    validate(moe::io::parse_safetensors_header(buf.data(), buf.size(), buf.size()), buf.size());
  } catch (const moe::core::Error&) {
  }
  // The same bytes as a prefix of a longer file (how a reader that maps only the header uses it).
  try {
    const uint64_t file_size = buf.size() + 4096;
    validate(moe::io::parse_safetensors_header(buf.data(), buf.size(), file_size), file_size);
  } catch (const moe::core::Error&) {
  }
  return 0;
}
