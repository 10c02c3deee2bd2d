// GGML tensor element types as GGUF files store them (ggml-common.h block structs; type ids and
// block sizes as gguf-py's constants.py lists them), with our own round-to-nearest encoders and
// decoders for the types the GGUF writer produces.
//
// A row of n values (n a multiple of the type's block size) is stored as n / block blocks of
// type_size bytes each, little-endian. Layouts of the types with a codec here (x = value, d/m
// f16 scale/min, q the stored integer):
//   F32, F16, BF16   one value per element
//   Q8_0   {f16 d; i8 qs[32]}                 x = d * qs[j]
//   Q4_0   {f16 d; u8 qs[16]}                 x = d * (q - 8), q of element j < 16 in the low
//                                             nibble of qs[j], of element j + 16 in the high one
//   Q4_1   {f16 d; f16 m; u8 qs[16]}          x = d * q + m (nibbles as Q4_0)
//   Q5_0   {f16 d; u8 qh[4]; u8 qs[16]}       x = d * (q - 16); low 4 bits as Q4_0, bit 4 of
//                                             element j in bit j of the little-endian u32 qh
//   Q5_1   {f16 d; f16 m; u8 qh[4]; u8 qs[16]} x = d * q + m (bits as Q5_0)
//   TQ2_0  {u8 qs[64]; f16 d}, 256 values     x = d * (t - 1), t in 0..2; element 128h + 32l + m
//                                             in bits 2l..2l+1 of qs[32h + m]
//   TQ1_0  {u8 qs[48]; u8 qh[4]; f16 d}, 256  x = d * (t - 1); five trits a byte (four in qh),
//                                             byte = ceil(sum t_k 3^(4-k) * 256 / 243)
//   MXFP4  {u8 e; u8 qs[16]}, 32 values       x = fp4(q) * 2^(e - 127) (OCP MX: E8M0 scale, E2M1
//                                             codes, q of element j < 16 in the low nibble of qs[j],
//                                             of j + 16 in the high one); e = 255 (the E8M0 NaN)
//                                             decodes to NaN. Encoded with the OCP MX scale
//                                             (floor(log2 amax) - 2) and the nearest E2M1 value
//                                             (ties to even, beyond 6 saturated).
// K-quants: super-blocks of 256 values in sub-blocks of 16 or 32, each with an integer sub-scale
// sc (and sub-min m) against the f16 super-block scale d (and dmin); decode computes
// x = (d * sc) * q - (dmin * m) in float, in that order, as llama.cpp's dequantize_row_q*_K.
// "plane2" below: element 128h + 32k + l in bits 2k..2k+1 of byte 32h + l of a 64-byte plane.
//   Q2_K   {u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}   16 x 16; scales[j] = sc | m << 4 (4 bits
//                                             each); q in 0..3 as plane2
//   Q3_K   {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}  16 x 16, no min; q = u - 4, u in 0..7:
//                                             low 2 bits plane2 in qs, bit 2 of element 128h+32k+l
//                                             in bit 4h+k of hmask[l]; sc = s - 32, s six bits:
//                                             low nibble of scales[j % 8] (high nibble for j >= 8),
//                                             bits 4..5 at bit 2(j/4) of scales[8 + j % 4]
//   Q4_K   {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}  8 x 32; six-bit sc and m packed as
//                                             get_scale_min_k4; element 64c + 32h + l in nibble h
//                                             of qs[32c + l], q in 0..15
//   Q5_K   {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}  as Q4_K plus bit 4 of
//                                             element e in bit e / 32 of qh[e % 32], q in 0..31
//   Q6_K   {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}  16 x 16, no min; q = u - 32, u in 0..63:
//                                             low nibble of element 128h + 32k + l in
//                                             ql[64h + 32(k % 2) + l] (high nibble for k >= 2),
//                                             bits 4..5 plane2 in qh; sc a signed byte
// The K-quant encoders choose each super-block's scales first (per sub-block a least-squares fit
// of the codes, then d and dmin from the largest, rounded to f16, then each integer sub-scale and
// sub-min among its rounded value, its neighbours and the one covering the sub-block's range, by
// the squared error on the grid decode reconstructs), then round every value to its nearest point
// of that grid. Every value stays within one step d * |sc| of its sub-block.
// Every other known type (IQ, Q8_K, integers) is listed with its sizes so a GGUF file holding it
// can be parsed, but has no codec yet: encode/decode throw Error::unsupported naming it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/encoding.h"
#include "core/tensor.h"

namespace moe::quant {

// ggml_type ids (stable: they are stored in files).
enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23,
  I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30, TQ1_0 = 34, TQ2_0 = 35, MXFP4 = 39,
};

struct GgmlTypeInfo {
  GgmlType type;
  const char* name;   // lower case, llama-quantize's spelling ("q4_0", "bf16")
  int64_t block;      // values per block
  size_t type_size;   // bytes per block
  bool codec;         // decode_row implemented (and encode_row, unless decode_only)
  bool decode_only = false;  // read from GGUF files, never written (iq4_nl, iq4_xs)

  bool encodes() const { return codec && !decode_only; }  // encode_row implemented
};

// The type with this id, or null when the id is not a ggml type we know.
const GgmlTypeInfo* ggml_type_info(uint32_t id);
const GgmlTypeInfo& ggml_type_info(GgmlType t);
// By name, case-insensitive ("Q4_0", "q4_0"); null when unknown.
const GgmlTypeInfo* parse_ggml_type(std::string_view name);
// The names of the types decode_row reads, comma separated (for messages and --help).
std::string ggml_codec_names();
// The names of the types encode_row writes, comma separated.
std::string ggml_encoder_names();

// Bytes of a row of n values; Error::invalid when n is not a multiple of the block size.
uint64_t ggml_row_bytes(GgmlType t, int64_t n);

// Encodes n values (n a multiple of the block size) into ggml_row_bytes(t, n) bytes at dst,
// rounding each value to the nearest point of its block's grid (scales chosen per block as the
// layout comment above says; the scale is rounded to f16 before the codes are chosen, so decode
// uses exactly the scale the codes were rounded against). Error::unsupported for types without a
// codec, Error::invalid for non-finite input, for a block scale that overflows f16, and for F16/BF16
// when a value is beyond the type's range (it would be written as inf; f16: 65520 and above).
void encode_row(GgmlType t, const float* x, int64_t n, uint8_t* dst);
// Decodes n values from src (ggml_row_bytes(t, n) bytes).
void decode_row(GgmlType t, const uint8_t* src, int64_t n, float* dst);

// Rounding within a block type's grid, value by value, for GPTQ (quant/gptq.h: the scales of a
// block are chosen first, as encode_row chooses them; then each value is rounded on that grid with
// the error of the values before it fed back). Every block type but TQ1_0/TQ2_0 (GPTQ's trits for
// those are the ternary-tq codec) has one. A block of `block` values is split into sub-blocks of
// `sub` values (32-blocks: one); in sub-block j the code q in [qmin, qmax] stands for
// step[j] * q - offset[j], computed in float as decode computes it:
//   Q8_0 q in [-127, 127], x = d·q;  Q4_0 / Q5_0 q = stored − 8 / − 16, x = d·q;
//   Q4_1 / Q5_1 x = d·q + m (offset −m);  K-quants step d·sc, offset dmin·m (0 without mins),
//   q as gguf_blocks.h's layout comment applies it (Q3_K / Q6_K: stored − 4 / − 32).
struct GgmlGridInfo {
  int sub = 0, qmin = 0, qmax = 0;
};
// The grid of type t, or nullopt for a type without one.
std::optional<GgmlGridInfo> ggml_grid_info(GgmlType t);
// The types with a grid, and their names comma separated.
std::vector<GgmlType> ggml_grid_types();
std::string ggml_grid_names();
// Per sub-block j of an encoded block, step[j] and offset[j]. Error::unsupported without a grid.
void ggml_block_grid(GgmlType t, const uint8_t* block, float* step, float* offset);
// The code nearest to x on one sub-block's grid (the rounded quotient and its neighbours compared
// on the decoded values), its value in *value.
int ggml_grid_code(float step, float offset, const GgmlGridInfo& g, float x, float* value);
// Replaces the `block` codes of an encoded block (numbered as the grid numbers them), keeping its
// scales. Error::internal for a code outside [qmin, qmax].
void ggml_set_block_codes(GgmlType t, uint8_t* block, const int* codes);

// Stores integer codes already on a 32-block grid, without rounding anything: n unsigned codes
// with an implied zero point (Q4_0: 0..15, x = d * (q - 8); Q8_0: 0..255, x = d * (q - 128)) and
// one f16-exact scale per 32 values, as moe-tool's symmetric int4 / int8 groups of 32 store them
// (quant/intn.h); or, for TQ1_0 / TQ2_0, n trits in moe-tool's convention (0 zero, 1 = −d, 2 = +d)
// and one f16-exact d per 256 values, as the ternary-tq codec stores them (quant/ternary.h).
// Error::invalid for another type, a code out of range or a scale not exact in f16.
void pack_codes_row(GgmlType t, const uint8_t* codes, const float* scales, int64_t n, uint8_t* dst);

// A weight [rows = out, cols = in] stored as blocks of one ggml type: `bytes` is a U8 tensor
// [rows, ggml_row_bytes(type, cols)]. Dequantizes rows with decode_row; rows are sliced and taken
// as bytes (never re-encoded). Two origins:
//   - a GGUF file's tensor (io/gguf_model.h: a view of the file, or a row copy for un-permuted
//     q/k): written dequantized to checkpoint folders (DtypeRule::Dequantize), copied by GGUF
//     outputs;
//   - the block codecs of quant/codec.h (`--codec q4_k`, RTN or GPTQ; `stored` true): kept in
//     native folders as the encoding "gguf-TYPE" (docs/FORMAT.md, part "blocks", stored under the
//     weight's own name) and copied by GGUF exports as blocks of that type.
class GgufBlocks final : public core::Encoding {
 public:
  // Error::internal when bytes is not U8 [rows, row bytes of cols values].
  GgufBlocks(GgmlType type, int64_t cols, core::Tensor bytes, bool stored = false);

  std::string name() const override;  // "gguf-q8_0"
  nlohmann::json params() const override;  // {"type": "q8_0", "cols": 256}
  std::vector<core::EncodedPart> parts() const override;
  void dequantize_rows(int64_t r0, int64_t r1, float* dst) const override;
  std::shared_ptr<const Encoding> slice_rows(int64_t r0, int64_t r1) const override;
  std::shared_ptr<const Encoding> take_rows(const std::vector<int64_t>& rows) const override;
  DtypeRule dtype_rule() const override { return stored_ ? DtypeRule::Keep : DtypeRule::Dequantize; }

  GgmlType type() const { return type_; }
  const core::Tensor& bytes() const { return *bytes_; }

 private:
  GgmlType type_;
  std::shared_ptr<const core::Tensor> bytes_;
  bool stored_;
};

}  // namespace moe::quant
