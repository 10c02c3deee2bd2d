// Ternary codes (core/encoding.h), encoding "ternary": every weight is 0 or one of two levels of
// its group, lo <= 0 <= hi. Trit t: 0 = zero, 1 = lo, 2 = hi (QMoE's convention). Codes are
// packed base 3, five trits per byte (1.6 bits per weight); levels are f16, one per group when
// symmetric (the scale s: lo = −s, hi = s), two (lo, hi) otherwise. Groups are `group`
// consecutive inputs of a row (0 = the whole row; ngroups = ceil(in / group), the last shorter).
//
// Grids (how the levels and trits of a group x are chosen; τ = the threshold, 0.5 by default):
//   absmean  BitNet b1.58: γ = mean|x|, levels ±γ; t = hi if x > γτ, lo if x < −γτ, else 0
//            (τ = 0.5 is clip(round(x / γ), −1, 1) with ties to even)
//   minmax   QMoE: lo = min(min x, 0), hi = max(max x, 0) (both 0: −1, +1);
//            t = hi if x > hi·τ, lo if x < lo·τ, else 0. Symmetric: ±max(−lo, hi)
//   tq       llama.cpp TQ1_0/TQ2_0 (ggml-quants.c, quantize_row_tq1_0_ref / tq2_0_ref): groups of
//            256, d = max|x|, t = lroundf(x · (1/d)) ∈ {−1, 0, 1} with 1/d in f32 of the unrounded
//            d (0 when d = 0; lroundf: ties away from zero), stored d = f16(d). Always symmetric.
//            Our trits map to TQ's stored values by 0 → 1, 1 → 0, 2 → 2 (TQ stores t + 1).
// Levels are rounded to f16 before the trits are chosen (absmean, minmax), so the stored levels
// are the ones the trits were chosen for; tq keeps llama.cpp's rule exactly.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/encoding.h"
#include "core/tensor.h"

namespace moe::quant {

enum class TernaryGrid { AbsMean, MinMax, TQ };
const char* grid_name(TernaryGrid g);  // "absmean", "minmax", "tq"

// Levels of one group (f16 values) and, for tq, the reciprocal the trits are rounded with.
struct TernaryLevels {
  float lo = 0.0f, hi = 0.0f;
  float inv = 0.0f;  // tq: 1 / d (f32, unrounded d); others unused
};
// Levels for n values x[0], x[stride], ... (Error::invalid when a level overflows f16).
TernaryLevels ternary_levels(const float* x, int64_t n, int64_t stride, TernaryGrid grid, bool symmetric);
// The trit of x under the grid's rule (threshold τ for absmean and minmax).
int ternary_code(float x, const TernaryLevels& l, TernaryGrid grid, double threshold);
// t[j] = ternary_code(x[j], l, grid, threshold) for j < n (vectorized).
void ternary_codes(const float* x, int64_t n, const TernaryLevels& l, TernaryGrid grid, double threshold, uint8_t* t);
// Levels for given (lo, hi) under the grid (f16-rounded; tq: inv = 1 / hi), used by refits.
TernaryLevels ternary_fixed(double lo, double hi, TernaryGrid grid, bool symmetric);

class Ternary final : public core::Encoding {
 public:
  using Part = std::shared_ptr<const core::Tensor>;
  // Parts as stored: codes U8 [rows, ceil(cols / 5)] (every byte <= 242), scales F16 [rows,
  // ngroups] (symmetric) or [rows, ngroups, 2] (lo, hi). Throws Error::corruption naming the part
  // or parameter that does not fit (tq needs group 256 and symmetric).
  Ternary(TernaryGrid grid, int64_t group, bool symmetric, int64_t cols, Part codes, Part scales);

  // From trits [rows, cols] and levels lo, hi [rows, ngroups] (f16 values; symmetric: lo = −hi).
  static std::shared_ptr<const Ternary> pack(TernaryGrid grid, int64_t group, bool symmetric, int64_t rows,
                                             int64_t cols, const uint8_t* trits, const float* lo, const float* hi);

  static int64_t row_bytes(int64_t cols) { return (cols + 4) / 5; }
  static int64_t num_groups(int64_t group, int64_t cols) { return group == 0 || cols == 0 ? 1 : (cols + group - 1) / group; }

  std::string name() const override { return "ternary"; }
  nlohmann::json params() const override;
  std::vector<core::EncodedPart> parts() const override;
  void dequantize_rows(int64_t r0, int64_t r1, float* dst) const override;
  std::shared_ptr<const core::Encoding> slice_rows(int64_t r0, int64_t r1) const override;
  std::shared_ptr<const core::Encoding> take_rows(const std::vector<int64_t>& rows) const override;
  DtypeRule dtype_rule() const override { return DtypeRule::Keep; }

  TernaryGrid grid() const { return grid_; }
  int64_t group() const { return group_; }
  int64_t group_len() const { return group_ == 0 ? cols() : group_; }
  int64_t ngroups() const { return num_groups(group_, cols()); }
  bool symmetric() const { return symmetric_; }
  void trits_row(int64_t r, uint8_t* dst) const;  // dst[cols()]
  float lo(int64_t r, int64_t g) const;
  float hi(int64_t r, int64_t g) const;

 private:
  TernaryGrid grid_;
  int64_t group_;
  bool symmetric_;
  Part codes_, scales_;
};

}  // namespace moe::quant
