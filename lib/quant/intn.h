// Integer codes in groups (core/encoding.h), encoding "intN": N = 2, 3, 4 or 8 bits per weight,
// one f16 scale (and, asymmetric, one u8 zero point) per group of `group` consecutive inputs of a
// row (group 0: the whole row). A group size that does not divide the row leaves the last group
// of every row shorter: ngroups = ceil(in / group). docs/FORMAT.md gives the layout.
//
// The quantizer is the GPTQ reference implementation's `Quantizer` (IST-DASLab/gptq, quant.py),
// with maxq = 2^bits − 1, per group of x:
//   asymmetric  lo = min(min x, 0), hi = max(max x, 0); scale = (hi − lo) / maxq,
//               zero = round(−lo / scale)
//   symmetric   a = max|x|; scale = 2a / maxq, zero = (maxq + 1) / 2 (implied, not stored)
//   all zero    lo = −1, hi = +1 (then every code is the zero point and the group decodes to 0)
//   q = clamp(round(x / scale) + zero, 0, maxq),   value = scale · (q − zero)
// round = to nearest, ties to even (torch.round). Two deliberate differences from the reference:
// the scale is rounded to f16 *before* the zero point and the codes are computed, so the stored
// scale is the one the codes were chosen for (dequantisation is exact and consistent); and the
// symmetric scale is 2a / maxq also for a group without negative values (the reference keeps
// lo = 0 there, which halves the scale and clips the upper half of such a group). A scale that
// rounds to 0 in f16 becomes the smallest f16 subnormal (2^−24); a group whose scale overflows
// f16 is refused (Error::invalid).
#pragma once

#include <cstdint>
#include <memory>

#include "core/encoding.h"
#include "core/tensor.h"

namespace moe::quant {

// Quantizer parameters of one group: `scale` is exactly representable in f16, `zero` in [0, maxq].
struct IntParams {
  float scale = 1.0f;
  int zero = 0;
};

// Parameters for n values x[0], x[stride], ... (throws Error::invalid on a non-finite value or an
// f16 overflow of the scale).
IntParams int_params(const float* x, int64_t n, int64_t stride, int bits, bool symmetric);
// The code of x: clamp(round(x / scale) + zero, 0, maxq).
int int_code(float x, const IntParams& p, int maxq);

class IntN final : public core::Encoding {
 public:
  using Part = std::shared_ptr<const core::Tensor>;
  // Parts as stored: codes U8 [rows, row_bytes(bits, cols)], scales F16 [rows, ngroups], zeros U8
  // [rows, ngroups] exactly when asymmetric. Throws Error::corruption naming the part or
  // parameter that does not fit (bits not in {2, 3, 4, 8}, group < 0, shapes, dtypes, a zero
  // point above maxq).
  IntN(int bits, int64_t group, bool symmetric, int64_t cols, Part codes, Part scales, Part zeros = nullptr);

  // From unpacked codes [rows, cols] (each < 2^bits), scales [rows, ngroups] (f16 values) and,
  // asymmetric, zero points [rows, ngroups].
  static std::shared_ptr<const IntN> pack(int bits, int64_t group, bool symmetric, int64_t rows, int64_t cols,
                                          const uint8_t* codes, const float* scales, const uint8_t* zeros);

  static int64_t row_bytes(int bits, int64_t cols) { return (cols * bits + 7) / 8; }
  static int64_t num_groups(int64_t group, int64_t cols) { return group == 0 || cols == 0 ? 1 : (cols + group - 1) / group; }

  std::string name() const override { return "intN"; }
  nlohmann::json params() const override;
  std::vector<core::EncodedPart> parts() const override;
  void dequantize_rows(int64_t r0, int64_t r1, float* dst) const override;
  std::shared_ptr<const core::Encoding> slice_rows(int64_t r0, int64_t r1) const override;
  std::shared_ptr<const core::Encoding> take_rows(const std::vector<int64_t>& rows) const override;
  DtypeRule dtype_rule() const override { return DtypeRule::Keep; }

  int bits() const { return bits_; }
  int64_t group() const { return group_; }       // 0 = whole row
  int64_t group_len() const { return group_ == 0 ? cols() : group_; }
  int64_t ngroups() const { return num_groups(group_, cols()); }
  bool symmetric() const { return symmetric_; }
  // Unpacked codes of row r into dst[cols()].
  void codes_row(int64_t r, uint8_t* dst) const;
  float scale(int64_t r, int64_t g) const;
  int zero(int64_t r, int64_t g) const;

 private:
  int bits_;
  int64_t group_;
  bool symmetric_;
  Part codes_, scales_, zeros_;
};

}  // namespace moe::quant
