// The gpt_oss fused-expert strided views (lib/model/detail.h).
#include <algorithm>
#include <string>
#include <vector>

#include "core/error.h"
#include "model/detail.h"

namespace moe::model::detail {

using core::Error;

namespace {

// dst(i, j) = src(i, j) for i < n, j < m, each side addressed as base + (off + i·s0 + j·s1)
// elements of T. One side is the transposed [in, out] fused tensor, whose row stride is often a
// multiple of 4 KiB (2I bf16 values): walking it across rows one element at a time would keep
// dozens of lines of one cache set in flight. So each tile of 32 × 32 goes through a local
// buffer, read in the order the source is contiguous and written in the order the destination
// is: every line is used whole before the next.
template <class T>
void copy_2d(const uint8_t* src, Strides ss, uint8_t* dst, Strides ds, int64_t n, int64_t m) {
  constexpr int64_t kTile = 32;
  const T* s = reinterpret_cast<const T*>(src);
  T* d = reinterpret_cast<T*>(dst);
  const bool read_j_inner = ss.s1 <= ss.s0, write_j_inner = ds.s1 <= ds.s0;
  T buf[kTile][kTile];
  for (int64_t i0 = 0; i0 < n; i0 += kTile)
    for (int64_t j0 = 0; j0 < m; j0 += kTile) {
      const int64_t ni = std::min(kTile, n - i0), nj = std::min(kTile, m - j0);
      const T* sb = s + ss.offset + i0 * ss.s0 + j0 * ss.s1;
      T* db = d + ds.offset + i0 * ds.s0 + j0 * ds.s1;
      if (read_j_inner)
        for (int64_t i = 0; i < ni; ++i)
          for (int64_t j = 0; j < nj; ++j) buf[i][j] = sb[i * ss.s0 + j * ss.s1];
      else
        for (int64_t j = 0; j < nj; ++j)
          for (int64_t i = 0; i < ni; ++i) buf[i][j] = sb[i * ss.s0 + j * ss.s1];
      if (write_j_inner)
        for (int64_t i = 0; i < ni; ++i)
          for (int64_t j = 0; j < nj; ++j) db[i * ds.s0 + j * ds.s1] = buf[i][j];
      else
        for (int64_t j = 0; j < nj; ++j)
          for (int64_t i = 0; i < ni; ++i) db[i * ds.s0 + j * ds.s1] = buf[i][j];
    }
}

void copy_2d(size_t es, const uint8_t* src, Strides ss, uint8_t* dst, Strides ds, int64_t n, int64_t m) {
  switch (es) {
    case 1: return copy_2d<uint8_t>(src, ss, dst, ds, n, m);
    case 2: return copy_2d<uint16_t>(src, ss, dst, ds, n, m);
    case 4: return copy_2d<uint32_t>(src, ss, dst, ds, n, m);
    case 8: return copy_2d<uint64_t>(src, ss, dst, ds, n, m);
    default: throw Error::internal("gather/scatter: element size " + std::to_string(es));
  }
}

}  // namespace

Tensor gather(const Tensor& flat, const Shape& shape, Strides st) {
  if (flat.encoding()) throw Error::internal("gather: encoded tensor");
  Tensor out = Tensor::zeros(flat.dtype(), shape);
  const int64_t n = shape.at(0), m = shape.size() > 1 ? shape[1] : 1;
  copy_2d(core::dtype_size(flat.dtype()), flat.data(), st, out.mutable_data(), Strides{0, m, 1}, n, m);
  return out;
}
void scatter(const Tensor& t, Tensor& flat, Strides st) {
  const int64_t n = t.dim(0), m = t.rank() > 1 ? t.dim(1) : 1;
  copy_2d(core::dtype_size(flat.dtype()), t.data(), Strides{0, m, 1}, flat.mutable_data(), st, n, m);
}

}  // namespace moe::model::detail
