// Delta-compressed experts (core/encoding.h), encoding "delta-ternary": an expert weight stored as
// a base shared by the experts of its layer plus its own sparse ternary delta (ComPEFT, Yadav et al.
// 2023, "ComPEFT: Compression for Communicating Parameter Efficient Updates via Sparsification and
// Quantization": keep the largest-magnitude share of a fine-tuning delta, store its signs and one
// scale per tensor).
//   W[i, j] = base[i, j] + scale · sign[i, j]   at the kept positions,
//   W[i, j] = base[i, j]                       elsewhere.
// Parts (docs/FORMAT.md "delta-ternary"):
//   base    [out, in]  F32, BF16 or F16, shared by the layer's experts of one matrix type
//                      (stored once, under its first user's name + ".delta_base")
//   stream  U8 [bytes] the kept positions and signs, Golomb-Rice coded (below), own
//   scale   F32 [1]    the scale s (>= 0), own
// Parameters: "nnz" (kept positions), "rice_k" (Rice parameter k, 0..30).
// Stream: positions p are row-major flat indices i·in + j, ascending. For each kept position in
// order, the gap g = p − p_prev − 1 (p_prev = −1 for the first) as q = g >> k one-bits, a zero
// bit, the k low bits of g (least significant first), then the sign bit (1 = −s, 0 = +s). Bits are
// packed least significant bit first into bytes; the stream holds max(1, ceil(bits / 8)) bytes and
// every bit after the last entry is 0.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/encoding.h"
#include "core/tensor.h"

namespace moe::quant {

class DeltaTernary final : public core::Encoding {
 public:
  using Part = std::shared_ptr<const core::Tensor>;
  // Throws Error::corruption naming the part when base is not a rank-2 float tensor, stream is not
  // a non-empty rank-1 U8 tensor, scale is not an F32 [1] tensor holding a finite value >= 0, nnz
  // exceeds out·in, rice_k is outside [0, 30], or the stream has fewer bits than nnz entries need at
  // the least (k + 2 each). What only decoding finds (a stream that ends early, a position past the
  // weight) is thrown when it is decoded, prefixed with `origin` ("FILE: weight NAME", given by the
  // checkpoint reader, quant::decode) so the message names the file and tensor wherever the
  // weight is read.
  DeltaTernary(Part base, Part stream, Part scale, int64_t nnz, int rice_k, bool base_shared = true,
               std::string origin = {});

  // Encodes kept positions (ascending flat indices) and their signs (true = negative) with the
  // Rice parameter that gives the fewest bits.
  static std::shared_ptr<const DeltaTernary> pack(Part base, const std::vector<int64_t>& positions,
                                                  const std::vector<bool>& negative, float scale);
  // Stored bits of nnz gaps under Rice parameter k (signs included), and the best k for them.
  static int64_t stream_bits(const std::vector<int64_t>& positions, int k);
  static int best_rice_k(const std::vector<int64_t>& positions);

  std::string name() const override { return "delta-ternary"; }
  nlohmann::json params() const override { return {{"nnz", nnz_}, {"rice_k", rice_k_}}; }
  std::vector<core::EncodedPart> parts() const override;
  void dequantize_rows(int64_t r0, int64_t r1, float* dst) const override;
  // Any row range decodes the whole Rice-coded stream of positions first.
  bool decodes_row_ranges_alone() const override { return false; }
  DtypeRule dtype_rule() const override { return DtypeRule::Keep; }

  int64_t nnz() const { return nnz_; }
  int rice_k() const { return rice_k_; }
  float scale() const;
  const Part& base_part() const { return base_; }
  // The kept positions (ascending flat indices) and signs (true = negative), decoded from the
  // stream. Throws Error::corruption (origin: ...) when the stream ends early or a position is out
  // of range.
  void decode(std::vector<int64_t>& positions, std::vector<bool>& negative) const;

 private:
  Part base_, stream_, scale_;
  int64_t nnz_;
  int rice_k_;
  bool base_shared_;
  std::string origin_;
};

}  // namespace moe::quant
