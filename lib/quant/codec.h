// Codecs: what a quantizer produces (an IntN or Ternary encoding, quant/intn.h, quant/ternary.h),
// spelled as the CLI and recipes spell it, with its exact storage cost, and round-to-nearest
// (RTN) quantization. GPTQ is quant/gptq.h.
//
// Spelling: NAME[:gN|:row][:sym|:asym][:refit[K]][:tX]
//   NAME   int8, int4, int3, int2; ternary (= ternary-minmax, QMoE's grid), ternary-absmean,
//          ternary-minmax, ternary-tq
//   gN     groups of N inputs (N >= 1; a group that does not divide the row leaves the last group
//          shorter), row = one group per row. Defaults: int 128, ternary-tq 256 (the only size
//          it allows), other ternary grids row
//   sym / asym   defaults: int sym, ternary-absmean and ternary-tq sym (tq allows only sym),
//          ternary-minmax asym
//   refit[K]     ternary only: least-squares levels for the chosen trits, alternated with
//          re-rounding, K rounds (default 4)
//   tX     ternary absmean/minmax only: the threshold τ (default 0.5)
// Or the name of a ggml block type with a rounding grid (quant/gguf_blocks.h: q8_0, q4_0, q4_1,
// q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k), no options: the codes and scales llama.cpp stores,
// as GGUF blocks (GgufBlocks), RTN as `export --type` rounds them, GPTQ within the grid of scales
// chosen first (quant/gptq.h); `export` copies them (docs/gguf.md).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "core/encoding.h"
#include "quant/gguf_blocks.h"
#include "quant/ternary.h"

namespace moe::quant {

struct CodecSpec {
  enum class Kind { Int, Ternary, Ggml };
  using Grid = TernaryGrid;
  Kind kind = Kind::Int;
  int bits = 4;             // Int: 2, 3, 4, 8; Ternary: 0 (log2(3) ≈ 1.58 per trit, 1.6 stored)
  int64_t group = 128;      // inputs per group, 0 = whole row
  bool symmetric = true;
  Grid grid = Grid::MinMax;  // Ternary only
  double threshold = 0.5;    // Ternary absmean/minmax: τ
  int refit_iters = 0;       // Ternary: rounds of least-squares refit (0 = none)
  GgmlType ggml = GgmlType::Q4_K;  // Ggml only: the block type (group: its block size; symmetric:
                                   // no mins; bits 0: bits_per_param gives the stored cost)
};

constexpr int kDefaultRefitIters = 4;

// Error::invalid naming what is wrong: an unknown name ("did you mean"), an unknown or repeated
// option, a group < 1, tq with a group other than 256 or asymmetric, refit or a threshold on an
// integer codec.
CodecSpec parse_codec(std::string_view s);
// The canonical spelling, every option explicit ("int4:g128:sym", "ternary-minmax:row:asym");
// parse_codec(to_string(c)) == c.
std::string to_string(const CodecSpec& c);
bool operator==(const CodecSpec& a, const CodecSpec& b);

// Stored bits of a [rows, cols] weight under c divided by rows·cols: every byte of its parts
// (codes with row padding, f16 scales, u8 zero points). Equals the parts' bytes · 8 / (rows·cols).
// Ggml: the type's bytes per block · 8 / block; Error::invalid when cols is not a multiple of the
// block size.
double bits_per_param(const CodecSpec& c, int64_t rows, int64_t cols);

// Round-to-nearest quantization of W [rows, cols] (row-major f32) under c, with c.refit_iters
// rounds of least-squares refit for ternary codecs (per group: hi = mean of x where t = hi,
// lo = mean where t = lo; symmetric: s = (Σ_{t=hi} x − Σ_{t=lo} x) / #nonzero; then re-rounding;
// the best round of each group by squared error is kept, so a refit is never worse). Throws
// Error::invalid on a non-finite weight.
std::shared_ptr<const core::Encoding> rtn(const float* W, int64_t rows, int64_t cols, const CodecSpec& c);

}  // namespace moe::quant
