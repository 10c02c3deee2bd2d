// Integer group codes laid out as the three int4/int8 checkpoint layouts vLLM and transformers load
// (docs/compressed-tensors.md):
//
// compressed-tensors `pack-quantized` (read from vllm-project/compressed-tensors at commit
// 179cba93, src/compressed_tensors/compressors/quantized_compressors/pack_quantized.py,
// `pack_to_int32`): per quantized Linear
//   weight_packed     I32 [out, ceil(in / pf)]   pf = 32 / bits values per word; value j of a row
//                                                in bits [(j mod pf)·bits, …) of word j div pf;
//                                                stored unsigned = signed code + 2^(bits−1)
//   weight_scale      F16 [out, ngroups]
//   weight_shape      I64 [2] = {out, in}
//   weight_zero_point I32 [ceil(out / pf), ngroups]  (asymmetric only; packed along the OUTPUT
//                                                dim, packed_dim=0, same unsigned offset)
//   W = scale · (q − z) with q, z the signed values.
//
// GPTQ, checkpoint_format "gptq" (v1) (read from AutoGPTQ/AutoGPTQ,
// auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py, QuantLinear.pack and forward, v0.7 line):
//   qweight  I32 [in / pf, out]       code of input i, output o in bits [(i mod pf)·bits, …) of
//                                     word [i div pf, o]; codes unsigned in [0, 2^bits)
//   qzeros   I32 [ngroups, out / pf]  (zero point − 1) mod 2^bits, packed along the output dim
//   scales   F16 [ngroups, out]
//   g_idx    I32 [in] = i div group
//   W[o, i] = scales[g, o] · (q − (stored zero + 1)); a zero point of 0 cannot be stored (the
//   loader reads 2^bits), so such a group is refused.
//
// AWQ GEMM (read from casper-hansen/AutoAWQ, awq/modules/linear/gemm.py WQLinear_GEMM.from_linear
// at commit d9dc8e56 and awq/utils/packing_utils.py AWQ_ORDER / dequantize_gemm at 7ee28736),
// 4 bits only:
//   qweight  I32 [in, out / 8]        packed along OUT: word [i, c] holds in nibble k (bits
//                                     [4k, 4k+4)) the code of input i, output 8c + AWQ_ORDER[k],
//                                     AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
//   qzeros   I32 [in / G, out / 8]    the zero points, the same packing, stored as they are
//   scales   F16 [in / G, out]
//   no g_idx; a group size is required (no per-row form here); W[o, i] = scales[g, o] · (q − z).
//   Symmetric codes are written with their zero point 8 stored.
//
// Our intN codes (quant/intn.h: unsigned q in [0, 2^bits), W = scale · (q − z), z = 2^(bits−1)
// when symmetric) map onto all three without re-rounding: the unsigned values are our codes and zero
// points as they are.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"

namespace moe::io {

enum class PackedFormat { CompressedTensors, Gptq, Awq };

// "compressed-tensors" / "gptq" / "awq".
const char* packed_format_name(PackedFormat f);

// The codes the layout holds, for messages: "int4" (awq), "int4/int8" (the others).
const char* packed_codes_held(PackedFormat f);

// One quantized Linear's integer groups as moe-tool stores them (docs/FORMAT.md, intN): borrowed
// pointers, valid during pack_linear. Shapes [out, in] (HF orientation, y = W x).
struct GroupCodes {
  int bits = 4;  // 4 or 8
  int64_t out = 0, in = 0;
  int64_t group = 0;  // inputs per group; 0 = the whole row (compressed-tensors "channel", GPTQ -1)
  bool symmetric = true;
  // [out, ceil(in·bits/8)] bytes: each row an LSB-first stream of `in` codes (code j in stream bits
  // [j·bits, (j+1)·bits)), padded with 0 bits to whole bytes; each code < 2^bits.
  const uint8_t* codes = nullptr;
  const uint8_t* scales = nullptr;  // [out, ngroups] f16, little endian
  const uint8_t* zeros = nullptr;   // [out, ngroups] zero points; null when symmetric (2^(bits−1))
  int64_t ngroups() const { return group == 0 ? 1 : in / group; }
  int64_t group_len() const { return group == 0 ? in : group; }
  int64_t row_bytes() const { return (in * bits + 7) / 8; }
};

// One tensor of a packed Linear: stored as `<module><suffix>` (module = weight name without ".weight").
struct PackedTensor {
  std::string suffix;  // ".weight_packed", ".qweight", …
  core::DType dtype;
  core::Shape shape;
  std::vector<uint8_t> data;  // little endian
};

// Why the layout cannot hold codes of these dimensions ("" when it can): bits other than 4 or 8,
// a group that does not divide `in`, for GPTQ an `in` or `out` that is not a multiple of the
// values per int32 word, for AWQ 8-bit codes, one group per row (group 0) and an `out` that is not
// a multiple of 8.
std::string packed_shape_problem(PackedFormat f, int bits, int64_t group, int64_t out, int64_t in);

// The tensors written for a Linear of these dimensions, in write order, with empty data.
std::vector<PackedTensor> packed_specs(PackedFormat f, int bits, int64_t group, bool symmetric, int64_t out, int64_t in);

// The tensors of `c` packed (packed_specs order) into `out`, whose buffers are reused from an
// earlier call when their sizes allow. For 4 and 8 bits our LSB-first row stream is already the
// words' byte sequence (little endian): compressed-tensors' weight_packed is each row padded to
// whole words, GPTQ's qweight the transposed [out, in/pf] word matrix; AWQ's qweight interleaves
// the nibbles of 8 outputs per word (AWQ_ORDER). Throws Error::invalid naming
// row and group when the layout cannot hold a value (GPTQ: a zero point of 0), Error::internal
// when packed_shape_problem is not empty. `split`, when given, runs fn over [0, n) in blocks
// (fn(begin, end), the blocks possibly on other threads, e.g. runtime::parallel_rows): the rows of
// the large tensor (weight_packed, qweight) are packed that way; the bytes do not depend on it.
// With `leave_stored_rows` and packed_rows_are_codes(f, c), weight_packed's data is left empty:
// the caller writes the out · row_bytes() bytes at c.codes in its place.
using RowSplit = std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& fn)>;
void pack_linear(PackedFormat f, const GroupCodes& c, std::vector<PackedTensor>& out, const RowSplit& split = {},
                 bool leave_stored_rows = false);

// Whether compressed-tensors' weight_packed of `c` is the codes as stored, byte for byte (each row
// fills whole words: no padding); false for GPTQ and AWQ.
bool packed_rows_are_codes(PackedFormat f, const GroupCodes& c);

}  // namespace moe::io
