#include "io/compressed_tensors.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "core/error.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace moe::io {

namespace {

using core::DType;
using core::Error;

template <typename T>
std::vector<uint8_t> bytes_le(const std::vector<T>& v) {
  std::vector<uint8_t> out(v.size() * sizeof(T));
  for (size_t i = 0; i < v.size(); ++i)
    for (size_t b = 0; b < sizeof(T); ++b) out[i * sizeof(T) + b] = static_cast<uint8_t>(static_cast<uint64_t>(v[i]) >> (8 * b));
  return out;
}

// Values of `v` ([rows, cols], each < 2^bits) packed 32/bits per int32 along `dim` (0: rows, 1:
// cols), value k of a word in bits [k·bits, (k+1)·bits), the last word zero-padded: [ceil(rows/pf),
// cols] or [rows, ceil(cols/pf)], as pack_to_int32 does (after its unsigned offset).
std::vector<uint8_t> pack_words(const uint8_t* v, int64_t rows, int64_t cols, int bits, int dim, core::Shape& shape) {
  const int64_t pf = 32 / bits;
  const int64_t wr = dim == 0 ? (rows + pf - 1) / pf : rows, wc = dim == 1 ? (cols + pf - 1) / pf : cols;
  std::vector<uint32_t> w(static_cast<size_t>(wr * wc), 0);
  if (dim == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* src = v + r * cols;
      uint32_t* dst = w.data() + r * wc;
      for (int64_t j = 0; j < wc; ++j) {
        const int64_t n = std::min(pf, cols - j * pf);
        uint32_t word = 0;
        for (int64_t k = 0; k < n; ++k) word |= static_cast<uint32_t>(src[j * pf + k]) << (k * bits);
        dst[j] = word;
      }
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* src = v + r * cols;
      uint32_t* dst = w.data() + (r / pf) * wc;
      const int shift = static_cast<int>((r % pf) * bits);
      for (int64_t c = 0; c < cols; ++c) dst[c] |= static_cast<uint32_t>(src[c]) << shift;
    }
  }
  shape = {wr, wc};
  return bytes_le(w);
}

// AutoAWQ's packing order (WQLinear_GEMM.from_linear's order_map, packing_utils.py AWQ_ORDER):
// nibble k of a word holds output 8c + kAwqOrder[k].
constexpr int kAwqOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};

// The 8 codes of a row at inputs [8j, 8j + 8) as one word (code 8j + t in bits [4t, 4t+4)): the
// row stream's bytes [4j, 4j+4), those past the row's end (rb bytes) read as 0.
inline uint32_t awq_row_word(const uint8_t* row, int64_t rb, int64_t j) {
  uint32_t w = 0;
  if (4 * j + 4 <= rb) std::memcpy(&w, row + 4 * j, 4);  // little endian on every target
  else std::memcpy(&w, row + 4 * j, static_cast<size_t>(rb - 4 * j));
  return w;
}


// The bit operations on 32-bit lanes: one word (the edges), or 4 words side by side (SSE2).
struct Word {
  using V = uint32_t;
  static uint32_t mask(uint32_t m) { return m; }
  static uint32_t band(uint32_t a, uint32_t b) { return a & b; }
  static uint32_t bor(uint32_t a, uint32_t b) { return a | b; }
  template <int K>
  static uint32_t shl(uint32_t a) { return a << K; }
  template <int K>
  static uint32_t shr(uint32_t a) { return a >> K; }
};
#if defined(__SSE2__)
struct Words4 {
  using V = __m128i;
  static __m128i mask(uint32_t m) { return _mm_set1_epi32(static_cast<int>(m)); }
  static __m128i band(__m128i a, __m128i b) { return _mm_and_si128(a, b); }
  static __m128i bor(__m128i a, __m128i b) { return _mm_or_si128(a, b); }
  template <int K>
  static __m128i shl(__m128i a) { return _mm_slli_epi32(a, K); }
  template <int K>
  static __m128i shr(__m128i a) { return _mm_srli_epi32(a, K); }
};
#endif

// a[r] nibble c becomes a[c] nibble r (an 8 x 8 matrix of nibbles transposed, in each 32-bit lane):
// the 4 x 4 blocks of 16-bit halves swapped, then the 2 x 2 blocks of bytes inside them, then
// single nibbles. Each step exchanges the bits `lo` does not select of a[r] with those it selects
// of a[r + d], K bits apart.
template <class L>
void transpose_nibbles(typename L::V a[8]) {
  using V = typename L::V;
  auto step = [&](auto k, int r, int d, uint32_t lo) {
    constexpr int K = decltype(k)::value;
    const V x = a[r], y = a[r + d], m = L::mask(lo), h = L::mask(~lo);
    a[r] = L::bor(L::band(x, m), L::template shl<K>(L::band(y, m)));
    a[r + d] = L::bor(L::band(L::template shr<K>(x), m), L::band(y, h));
  };
  for (int r = 0; r < 4; ++r) step(std::integral_constant<int, 16>{}, r, 4, 0x0000FFFFu);
  for (int r : {0, 1, 4, 5}) step(std::integral_constant<int, 8>{}, r, 2, 0x00FF00FFu);
  for (int r : {0, 2, 4, 6}) step(std::integral_constant<int, 4>{}, r, 1, 0x0F0F0F0Fu);
}

#if defined(__SSE2__)

// The words [8j + 8m + u, col + c] of AWQ's qweight (m < 4 whole words of inputs, c < 4 columns):
// for each column the 8 source rows' words j..j+3 side by side, transposed nibble-wise
// (transpose_nibbles), then for each u the 4 columns' vectors transposed 4 x 4 so that each
// store is 4 consecutive words of one row of qweight.
inline void awq_quad(const uint8_t* codes, int64_t rb, int64_t cols, int64_t col, int64_t j, uint8_t* qw) {
  __m128i a[4][8];
  for (int c = 0; c < 4; ++c) {
    for (int k = 0; k < 8; ++k)
      a[c][k] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + (8 * (col + c) + kAwqOrder[k]) * rb + 4 * j));
    transpose_nibbles<Words4>(a[c]);
  }
  for (int u = 0; u < 8; ++u) {
    const __m128i t0 = _mm_unpacklo_epi32(a[0][u], a[1][u]), t1 = _mm_unpacklo_epi32(a[2][u], a[3][u]);
    const __m128i t2 = _mm_unpackhi_epi32(a[0][u], a[1][u]), t3 = _mm_unpackhi_epi32(a[2][u], a[3][u]);
    const __m128i m[4] = {_mm_unpacklo_epi64(t0, t1), _mm_unpackhi_epi64(t0, t1), _mm_unpacklo_epi64(t2, t3),
                          _mm_unpackhi_epi64(t2, t3)};
    for (int r = 0; r < 4; ++r)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qw + ((8 * (j + r) + u) * cols + col) * 4), m[r]);
  }
}
#endif

// AWQ GEMM: qweight [in, out/8], qzeros [ngroups, out/8] (zero points as they are; symmetric: 8),
// scales [ngroups, out]. qweight is built 8 inputs by 8 outputs at a time: the words of the
// outputs 8c + kAwqOrder[k] (k = 0..7) holding inputs [8j, 8j+8), transposed nibble-wise, are the
// words [8j + u, c]. The j are split into ranges (possibly on other threads), each done in
// blocks of 16 (one 64-byte line of each source row; 128 rows of qweight); with SSE2, 4 words of 4
// columns at a time (awq_quad) in tiles of 16 columns, the edges one word at a time.
void pack_awq(const GroupCodes& c, std::vector<PackedTensor>& t,
              const std::function<void(int64_t, const std::function<void(int64_t, int64_t)>&)>& run) {
  const int64_t out = c.out, in = c.in, ng = c.ngroups(), rb = c.row_bytes(), cols = out / 8, nj = (in + 7) / 8;
  constexpr int64_t kBlock = 16;
  const uint8_t* codes = c.codes;
  uint8_t* qw = t[0].data.data();
  // One word (8 inputs) of 8 outputs: the scalar path, for the edges.
  auto one = [&](int64_t col, int64_t j) {
    uint32_t a[8];
    for (int k = 0; k < 8; ++k) a[k] = awq_row_word(codes + (8 * col + kAwqOrder[k]) * rb, rb, j);
    transpose_nibbles<Word>(a);
    const int64_t n = std::min<int64_t>(8, in - 8 * j);  // inputs in this word (the last may hold fewer)
    for (int64_t u = 0; u < n; ++u) std::memcpy(qw + ((8 * j + u) * cols + col) * 4, &a[u], 4);
  };
  run(nj, [&](int64_t j0, int64_t j1) {
    for (int64_t jb = j0; jb < j1; jb += kBlock) {
      const int64_t je = std::min(j1, jb + kBlock);
      int64_t jv = jb;  // [jb, jv): whole quads of whole words, done 4 columns at a time
#if defined(__SSE2__)
      jv = jb + std::max<int64_t>(0, std::min(je, in / 8) - jb) / 4 * 4;
      const int64_t cv = cols / 4 * 4;
      // Columns in tiles of 16 (one 64-byte line of each of the 128 rows of qweight the block writes).
      for (int64_t c0 = 0; c0 < cv; c0 += 16) {
        const int64_t ce = std::min(cv, c0 + 16);
        for (int64_t j = jb; j < jv; j += 4)
          for (int64_t col = c0; col < ce; col += 4) awq_quad(codes, rb, cols, col, j, qw);
      }
      for (int64_t col = cv; col < cols; ++col)
        for (int64_t j = jb; j < jv; ++j) one(col, j);
#endif
      for (int64_t col = 0; col < cols; ++col)
        for (int64_t j = jv; j < je; ++j) one(col, j);
    }
  });
  uint8_t* qz = t[1].data.data();
  uint8_t* scales_t = t[2].data.data();
  for (int64_t g = 0; g < ng; ++g) {
    for (int64_t col = 0; col < cols; ++col) {
      uint32_t w = 0;
      for (int k = 0; k < 8; ++k) {
        const int64_t o = 8 * col + kAwqOrder[k];
        const uint32_t z = c.symmetric ? 8u : c.zeros[o * ng + g];
        w |= (z & 15u) << (4 * k);
      }
      std::memcpy(qz + (g * cols + col) * 4, &w, 4);
    }
    for (int64_t o = 0; o < out; ++o) std::memcpy(scales_t + (g * out + o) * 2, c.scales + (o * ng + g) * 2, 2);
  }
}

}  // namespace

const char* packed_format_name(PackedFormat f) {
  return f == PackedFormat::Gptq ? "gptq" : f == PackedFormat::Awq ? "awq" : "compressed-tensors";
}

const char* packed_codes_held(PackedFormat f) { return f == PackedFormat::Awq ? "int4" : "int4/int8"; }

std::string packed_shape_problem(PackedFormat f, int bits, int64_t group, int64_t out, int64_t in) {
  if (bits != 4 && bits != 8) return std::to_string(bits) + "-bit codes (the layout holds 4 and 8 bits)";
  if (f == PackedFormat::Awq && bits != 4) return std::to_string(bits) + "-bit codes (AWQ GEMM packs 4 bits only)";
  if (f == PackedFormat::Awq && group == 0)
    return "one group per row (group 0): AWQ's layout and config need a group size (e.g. 128, 64 or 32 inputs)";
  if (group != 0 && in % group != 0)
    return "groups of " + std::to_string(group) + ", which do not divide the " + std::to_string(in) + " inputs";
  const int64_t pf = 32 / bits;
  if (f == PackedFormat::Gptq && (in % pf != 0 || out % pf != 0))
    return "shape [" + std::to_string(out) + ", " + std::to_string(in) + "]: GPTQ packs " + std::to_string(pf) +
           " values per int32 along both dims and needs multiples of " + std::to_string(pf);
  if (f == PackedFormat::Awq && out % 8 != 0)
    return "shape [" + std::to_string(out) + ", " + std::to_string(in) + "]: AWQ packs 8 outputs per int32 and needs a " +
           "multiple of 8 outputs";
  return "";
}

std::vector<PackedTensor> packed_specs(PackedFormat f, int bits, int64_t group, bool symmetric, int64_t out, int64_t in) {
  const int64_t pf = 32 / bits, ng = group == 0 ? 1 : in / group;
  if (f == PackedFormat::CompressedTensors) {
    std::vector<PackedTensor> s = {{".weight_packed", DType::I32, {out, (in + pf - 1) / pf}, {}},
                                   {".weight_scale", DType::F16, {out, ng}, {}},
                                   {".weight_shape", DType::I64, {2}, {}}};
    if (!symmetric) s.push_back({".weight_zero_point", DType::I32, {(out + pf - 1) / pf, ng}, {}});
    return s;
  }
  if (f == PackedFormat::Awq)
    return {{".qweight", DType::I32, {in, out / 8}, {}}, {".qzeros", DType::I32, {ng, out / 8}, {}}, {".scales", DType::F16, {ng, out}, {}}};
  return {{".qweight", DType::I32, {in / pf, out}, {}},
          {".qzeros", DType::I32, {ng, out / pf}, {}},
          {".scales", DType::F16, {ng, out}, {}},
          {".g_idx", DType::I32, {in}, {}}};
}

bool packed_rows_are_codes(PackedFormat f, const GroupCodes& c) {
  return f == PackedFormat::CompressedTensors && c.row_bytes() % 4 == 0;
}

void pack_linear(PackedFormat f, const GroupCodes& c, std::vector<PackedTensor>& t, const RowSplit& split,
                 bool leave_stored_rows) {
  if (const std::string p = packed_shape_problem(f, c.bits, c.group, c.out, c.in); !p.empty())
    throw Error::internal("pack_linear: " + p);
  if (!c.codes || !c.scales || (!c.symmetric && !c.zeros)) throw Error::internal("pack_linear: missing codes, scales or zeros");
  std::vector<PackedTensor> specs = packed_specs(f, c.bits, c.group, c.symmetric, c.out, c.in);
  const bool leave = leave_stored_rows && packed_rows_are_codes(f, c);  // weight_packed: t[0]
  t.resize(specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    t[i].suffix = specs[i].suffix, t[i].dtype = specs[i].dtype, t[i].shape = specs[i].shape;
    if (i == 0 && leave) t[i].data.clear();
    else t[i].data.resize(static_cast<size_t>(core::dtype_size(t[i].dtype) * core::shape_numel(t[i].shape)));
  }
  auto run = [&](int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    if (split) split(n, fn);
    else fn(0, n);
  };
  // Locals: the compiler cannot keep c's fields in registers across the byte stores.
  const int64_t out = c.out, ng = c.ngroups(), rb = c.row_bytes(), pf = 32 / c.bits;
  const uint8_t* codes = c.codes;
  core::Shape shape;
  if (f == PackedFormat::CompressedTensors) {
    // weight_packed: the row stream, each row zero-padded to whole words.
    const int64_t wb = t[0].shape[1] * 4;
    uint8_t* packed = t[0].data.data();
    if (!leave) run(out, [&](int64_t o0, int64_t o1) {
      if (wb == rb) {
        std::memcpy(packed + o0 * wb, codes + o0 * rb, static_cast<size_t>((o1 - o0) * rb));
        return;
      }
      for (int64_t o = o0; o < o1; ++o) {
        std::memcpy(packed + o * wb, codes + o * rb, static_cast<size_t>(rb));
        std::memset(packed + o * wb + rb, 0, static_cast<size_t>(wb - rb));
      }
    });
    std::memcpy(t[1].data.data(), c.scales, t[1].data.size());
    t[2].data = bytes_le(std::vector<int64_t>{c.out, c.in});
    if (!c.symmetric) t[3].data = pack_words(c.zeros, c.out, ng, c.bits, 0, shape);
    return;
  }
  if (f == PackedFormat::Awq) {
    pack_awq(c, t, run);
    return;
  }
  // GPTQ. A zero point of 0 is refused first, the first in row order.
  if (!c.symmetric)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t g = 0; g < ng; ++g)
        if (c.zeros[o * ng + g] == 0)
          throw Error::invalid("row " + std::to_string(o) + ", group " + std::to_string(g) +
                               ": zero point 0, which GPTQ's v1 layout (stored as zero − 1) cannot hold");
  // qweight [in/pf, out]: word (j, o) is bytes [4j, 4j+4) of row o (in is a multiple of pf). Written
  // in rows of qweight, 16 outputs (one 64-byte line of a row) at a time: each line is complete
  // before the next, and the 16 source rows are read forward (a row of qweight lies out·4 bytes
  // from the next, a multiple of 4 KiB for many widths: lines written one word at a time across
  // the rows would share a few cache sets).
  const int64_t words = c.in / pf;
  uint8_t* qw = t[0].data.data();
  constexpr int64_t kLine = 16;
  run(words, [&](int64_t j0, int64_t j1) {
    for (int64_t o0 = 0; o0 < out; o0 += kLine) {
      const int64_t n = std::min(kLine, out - o0);
      const uint8_t* src = codes + o0 * rb;
      int64_t j = j0;
#if defined(__SSE2__)
      // 4 words of 4 rows at a time, a 4 x 4 transpose in registers (out is a multiple of 4: pf).
      for (; j + 4 <= j1; j += 4) {
        uint8_t* dst = qw + (j * out + o0) * 4;
        for (int64_t k = 0; k < n; k += 4) {
          const uint8_t* s = src + k * rb + 4 * j;
          const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
          const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + rb));
          const __m128i r2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 2 * rb));
          const __m128i r3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 3 * rb));
          const __m128i t0 = _mm_unpacklo_epi32(r0, r1), t1 = _mm_unpacklo_epi32(r2, r3);
          const __m128i t2 = _mm_unpackhi_epi32(r0, r1), t3 = _mm_unpackhi_epi32(r2, r3);
          uint8_t* d = dst + 4 * k;
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm_unpacklo_epi64(t0, t1));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d + out * 4), _mm_unpackhi_epi64(t0, t1));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * out * 4), _mm_unpacklo_epi64(t2, t3));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 3 * out * 4), _mm_unpackhi_epi64(t2, t3));
        }
      }
#endif
      for (; j < j1; ++j) {
        uint8_t* dst = qw + (j * out + o0) * 4;
        for (int64_t k = 0; k < n; ++k) std::memcpy(dst + 4 * k, src + k * rb + 4 * j, 4);
      }
    }
  });
  // qzeros: zero − 1, [ngroups, out] packed along out; scales transposed.
  const int64_t offset = int64_t{1} << (c.bits - 1);
  std::vector<uint8_t> zeros_t(static_cast<size_t>(ng * out));
  uint8_t* scales_t = t[2].data.data();
  for (int64_t g = 0; g < ng; ++g)
    for (int64_t o = 0; o < out; ++o) {
      zeros_t[g * out + o] = static_cast<uint8_t>((c.symmetric ? offset : c.zeros[o * ng + g]) - 1);
      std::memcpy(scales_t + (g * out + o) * 2, c.scales + (o * ng + g) * 2, 2);
    }
  t[1].data = pack_words(zeros_t.data(), ng, out, c.bits, 1, shape);
  std::vector<int32_t> g_idx(static_cast<size_t>(c.in));
  for (int64_t i = 0; i < c.in; ++i) g_idx[i] = static_cast<int32_t>(i / c.group_len());
  t[3].data = bytes_le(g_idx);
}

}  // namespace moe::io
