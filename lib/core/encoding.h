// Encoded weights: a weight [out, in] stored as something other than one dense array — low-rank
// factors, block-scaled FP8 codes, quantized codes with scales, ternary codes, dictionary-coded
// sub-1-bit streams. Every encoding
//   - has the logical shape [rows = out, cols = in] of the weight it stands for,
//   - lists its stored parts (plain tensors), each stored in a checkpoint as
//     `<weight name><suffix>` (or, for a part shared by several weights such as a layer's basis,
//     once, under the name its first user gives it; docs/FORMAT.md),
//   - dequantizes itself into f32, whole or by row ranges, exactly as docs/FORMAT.md says,
// so every command (eval, calibrate, later passes, convert --materialize) reads every encoding.
// A core::Tensor carries an encoding (Tensor::encoded); its to_f32()/converted() dequantize.
//
// Bits per parameter are counted from the parts: every stored byte, a shared part's bytes split
// equally over the weights that use it (model/encoding_stats.h).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace moe::core {

class Tensor;
class Encoding;

// An encoding of the native format (docs/FORMAT.md) that decodes to exactly the same values as
// another encoding (the same codes and scales), described without computing it: the manifest
// entry's name and parameters and each part's name suffix, dtype and shape. `make()` computes it
// (each call anew). What a writer that keeps codes writes in place of an input's layout that no
// folder format stores (model::OutputOptions::keep_codes).
struct NativeForm {
  struct Part {
    std::string role, suffix;
    DType dtype;
    std::vector<int64_t> shape;
  };
  std::string name;
  nlohmann::json params;
  std::vector<Part> parts;
  std::function<std::shared_ptr<const Encoding>()> make;
};

// One stored part of an encoded weight (always a plain tensor).
struct EncodedPart {
  std::string role;    // key of the part in docs/FORMAT.md ("a", "b", "base", "codes", "scale_inv", ...)
  std::string suffix;  // on-disk name = weight name + suffix (".lr_a", "_scale_inv"; "" = the weight's own name)
  std::shared_ptr<const Tensor> tensor;
  bool shared = false;  // used by several weights (identity = this pointer): stored once
};

class Encoding {
 public:
  Encoding(int64_t rows, int64_t cols) : rows_(rows), cols_(cols) {}
  virtual ~Encoding() = default;
  Encoding(const Encoding&) = delete;
  Encoding& operator=(const Encoding&) = delete;

  int64_t rows() const { return rows_; }  // out
  int64_t cols() const { return cols_; }  // in
  // The encoding's name in config.json and docs/FORMAT.md ("lowrank", "fp8-block", ...).
  virtual std::string name() const = 0;
  // Its parameters as recorded in config.json ({"rank": 12}); enough, with the parts' shapes, to
  // decode it.
  virtual nlohmann::json params() const = 0;
  virtual std::vector<EncodedPart> parts() const = 0;
  // Rows [r0, r1) as f32, row-major, into dst[(r1 - r0) * cols()]. Exact: the same values a
  // decoder following docs/FORMAT.md computes (up to f32 summation order for products).
  virtual void dequantize_rows(int64_t r0, int64_t r1, float* dst) const = 0;
  // Whether dequantize_rows(r0, r1) costs about r1 − r0 rows' work (true by default). False where
  // any range first decodes a stream of the whole weight (DeltaTernary's Rice-coded positions): a
  // caller that would decode the weight a few rows at a time (runtime::project_in_tiles) decodes
  // it whole instead.
  virtual bool decodes_row_ranges_alone() const { return true; }
  // Rows [r0, r1) as an encoding of its own (zero-copy where the layout allows). Default: throws
  // Error::unsupported naming the encoding.
  virtual std::shared_ptr<const Encoding> slice_rows(int64_t r0, int64_t r1) const;
  // Rows `rows` (each in [0, rows()), in the given order, repeats allowed) as an encoding of its
  // own with the same parameters: the stored values of those rows, copied, nothing re-encoded
  // (what prune does to a router). Default: throws Error::unsupported naming the encoding.
  virtual std::shared_ptr<const Encoding> take_rows(const std::vector<int64_t>& rows) const;
  // What an output dtype (`convert --dtype`, a recipe's output.dtype) does to this encoding:
  //   Materialize     the weight is written dequantized in that dtype (block-scaled FP8: what
  //                   stock loaders expect of a bf16 checkpoint)
  //   ConvertParts    its floating-point parts (factors) are written in that dtype
  //   Keep            written as it is (codes and scales have the types the format fixes)
  //   Dequantize      always written dequantized (in the output dtype, else the model's
  //                   materialize dtype): no checkpoint folder format stores its parts (GGUF
  //                   blocks read from a .gguf input, io/gguf_model.h)
  enum class DtypeRule { Materialize, ConvertParts, Keep, Dequantize };
  virtual DtypeRule dtype_rule() const = 0;
  // The native encoding holding exactly these values (NativeForm), when there is one; nullopt by
  // default. make() must be called while this encoding is alive.
  virtual std::optional<NativeForm> native_form() const { return std::nullopt; }

 protected:
  void check_rows(int64_t r0, int64_t r1) const;  // Error::internal outside [0, rows]

 private:
  int64_t rows_, cols_;
};

}  // namespace moe::core
