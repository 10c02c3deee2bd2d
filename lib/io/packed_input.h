// Checkpoints quantized by other tools, read as encodings (core/encoding.h): each quantized Linear
// stays in its stored tensors and decodes rows on demand, so a command holds one layer's weights
// at a time and every command (eval, calibrate, prune, merge, quantize, convert) reads them. The
// layouts (docs/compressed-tensors.md, "Inputs"), as their published sources write and read them:
//
// compressed-tensors `pack-quantized` (vllm-project/compressed-tensors,
// src/compressed_tensors/compressors/quantized_compressors/pack_quantized.py: pack_to_int32,
// unpack_from_int32, PackedQuantizationCompressor.compress_module), per module M, N = 4 or 8,
// pf = 32 / N values per int32:
//   M.weight_packed     I32 [out, ceil(in / pf)]  value j of a row in bits [(j mod pf)·N, …) of
//                                                 word j div pf, stored unsigned = signed + 2^(N−1)
//   M.weight_scale      F16/BF16/F32 [out, ngroups]  (ngroups = 1 for strategy "channel")
//   M.weight_shape      I64 [2] = {out, in}
//   M.weight_zero_point I32 [ceil(out / pf), ngroups]  asymmetric only, packed along OUT (dim 0)
//   M.weight_g_idx      I32 [in]  optional (actorder): the group of each input
//   W[o, i] = scale[o, g] · (q − z), q and z the stored unsigned values (z = 2^(N−1) symmetric).
// compressed-tensors `float-quantized` FP8 E4M3: M.weight F8_E4M3 [out, in] and M.weight_scale
//   (strategy "tensor": one value; "channel": [out, 1]; "block": [ceil(out/br), ceil(in/bc)]),
//   W = f8(code) · scale; read as a core::Fp8Block with the block [out, in], [1, in] or [br, bc].
//   M.input_scale (static activation scales) is consumed and not applied: activations are
//   evaluated unquantized.
// GPTQ (AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py, QuantLinear.pack / forward;
// GPTQModel checkpoint_format "gptq" = v1, "gptq_v2"), N = 4 or 8:
//   M.qweight I32 [in / pf, out]   code of input i, output o in bits [(i mod pf)·N, …) of word
//                                  [i div pf, o]
//   M.qzeros  I32 [ngroups, out / pf]  packed along OUT; v1 stores z − 1 (read back as stored + 1,
//                                  unmasked, as the v1 loaders do), v2 stores z
//   M.scales  F16 [ngroups, out]
//   M.g_idx   I32 [in]             the group of each input; required with desc_act, else i div G
//                                  when absent. Checked: every value in [0, ngroups) and every
//                                  group holding exactly G inputs.
//   W[o, i] = scales[g_idx[i], o] · (q − z[g_idx[i], o]).
// AWQ GEMM (casper-hansen/AutoAWQ awq/utils/packing_utils.py: AWQ_ORDER, AWQ_REVERSE_ORDER,
// unpack_awq, reverse_awq_order, dequantize_gemm), N = 4 only:
//   M.qweight I32 [in, out / 8]    packed along OUT: output 8c + p in bits [4·R[p], …) of word
//                                  [i, c], R = AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
//                                  (the inverse of the packing order (0, 2, 4, 6, 1, 3, 5, 7))
//   M.qzeros  I32 [in / G, out / 8]  the same order, z stored as is
//   M.scales  F16 [in / G, out]
//   W[o, i] = scales[i div G, o] · (q − z).
// Values are computed in f32 as scale · (q − z) (exact: an f16 scale times an integer of at most
// 9 bits), the product moe-tool's intN encoding computes, so a moe-tool export read back decodes
// to the native weights bit for bit.
//
// Which modules are quantized is read from the tensors present (M.weight_packed, M.qweight, an
// F8_E4M3 M.weight with M.weight_scale); everything else is read dense as before.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "core/encoding.h"
#include "core/tensor.h"
#include "io/checkpoint.h"

namespace moe::io {

enum class PackedLayout { CompressedTensors, Gptq, Awq };

// One integer-quantized Linear in one of the three layouts above. Parts are the stored tensors
// as they are (bits per parameter count every stored byte). Written dequantized to checkpoint
// folders (DtypeRule::Dequantize): none of our folder formats stores these layouts.
class PackedIntLinear final : public core::Encoding {
 public:
  struct Layout {
    PackedLayout layout = PackedLayout::CompressedTensors;
    int bits = 4;            // 4 or 8 (AWQ: 4)
    int64_t group = 0;       // inputs per group; 0 = the whole row (channel / group_size −1)
    bool zero_plus_one = false;  // GPTQ v1: stored zero point + 1
  };
  // Parts by role: "packed" (weight_packed / qweight), "scales", "zeros" (absent for a symmetric
  // compressed-tensors weight), "g_idx" (optional), "shape" (compressed-tensors weight_shape).
  // Throws Error::corruption naming the part and the problem when a dtype, shape or value
  // (weight_shape, g_idx) does not fit [out, in].
  PackedIntLinear(const Layout& layout, int64_t out, int64_t in, std::map<std::string, core::Tensor> parts);

  std::string name() const override;  // "compressed-tensors-int4", "gptq-int8", "awq-int4"
  nlohmann::json params() const override;
  std::vector<core::EncodedPart> parts() const override;
  void dequantize_rows(int64_t r0, int64_t r1, float* dst) const override;
  DtypeRule dtype_rule() const override { return DtypeRule::Dequantize; }
  // moe-tool's intN with the same codes, zero points and scales, so a writer that keeps codes
  // (a prune of such an input written as gptq / compressed-tensors) writes them unchanged:
  // symmetric when every zero point is 2^(N−1). nullopt with act-order (a g_idx that is not
  // i div G: intN groups are runs of consecutive inputs), a scale that f16 does not hold exactly
  // (compressed-tensors bf16/f32 scales), or a zero point outside [0, 2^N − 1] (GPTQ v1's stored
  // 15 + 1). Reads the scales and zero points (not the codes) to decide.
  std::optional<core::NativeForm> native_form() const override;
  // Why native_form() is nullopt ("act-order: ...", "row 3, group 1: scale 0.1 is not exact in
  // f16", "row 0, group 2: zero point 16 is outside [0, 15]"), "" when it is not; `symmetric`
  // (optional) is set when it is not.
  std::string native_form_problem(bool* symmetric = nullptr) const;

  const Layout& layout() const { return layout_; }
  int64_t ngroups() const { return ngroups_; }

 private:
  // Codes of rows [r0, r1) (unsigned, row-major [r1 − r0, cols]) into q.
  void codes(int64_t r0, int64_t r1, uint8_t* q) const;
  int zero(int64_t o, int64_t g) const;
  float scale(int64_t o, int64_t g) const;

  Layout layout_;
  int64_t ngroups_ = 1;
  std::map<std::string, std::shared_ptr<const core::Tensor>> parts_;
  std::vector<int32_t> g_idx_;  // empty: input i in group i / group
};

// A KV-cache scale's name by compressed-tensors' rule: it ends in ".k_scale" or ".v_scale"
// (e.g. model.layers.3.self_attn.k_scale).
inline bool is_kv_cache_scale(const std::string& name) {
  return name.ends_with(".k_scale") || name.ends_with(".v_scale");
}

// The quantization of a checkpoint whose config.json quantization_config.quant_method is
// "compressed-tensors", "gptq" or "awq".
class PackedInput {
 public:
  // True for the quant_method values this reader takes.
  static bool reads(const std::string& quant_method);
  // Parses config.json's quantization_config and finds the quantized modules of `ckpt`. Null when
  // the quant_method is not one of reads(). Throws Error::unsupported (one line naming config.json
  // and the key) for a format, bits, strategy, checkpoint_format or version not read here, and
  // Error::corruption for a config that contradicts itself or the tensors (a module named by a
  // target but not stored, a module whose scales are stored without its packed codes (the missing
  // tensor and the file of its scales named), GPTQ/AWQ without bits, a quantized module in `ignore`, a quantized module no config group
  // targets, act-order without g_idx).
  static std::unique_ptr<PackedInput> open(const Checkpoint& ckpt);

  // The weight `name` ("<module>.weight") decoded from its stored tensors, whose names are added
  // to `used`; nullopt when the module is not quantized (read it dense). Throws Error::corruption
  // "<file>: tensor <name>: <problem>" when a stored tensor does not fit the layout or a scale is
  // not finite.
  std::optional<core::Tensor> weight(const std::string& name, std::set<std::string>& used) const;

  const std::string& quant_method() const { return method_; }
  // compressed-tensors with a kv_cache_scheme (8-bit float or int, strategy tensor): the stored
  // KV-cache scales (every tensor is_kv_cache_scale names, e.g.
  // model.layers.3.self_attn.k_scale), each checked at open: F32/BF16/F16, one value ([1] or a
  // scalar), finite and positive. A scale stored without a kv_cache_scheme, a scheme without
  // scales, or another strategy is refused at open. model::Model::load then takes each attention
  // module's k_scale and v_scale (both required, consumed and not applied: the forward keeps its
  // KV cache in f32) and refuses any other (a stray module or layer); a prune that writes
  // compressed-tensors FP8 again copies them as stored.
  const std::vector<std::string>& kv_cache_scales() const { return kv_scales_; }

 private:
  struct Module {
    enum Kind { Int, Fp8 } kind = Int;
    PackedIntLinear::Layout layout;
    bool symmetric = true;      // compressed-tensors int: no zero point decoded (2^(N−1))
    std::string fp8_strategy;   // "tensor", "channel", "block"
    // The config group's `input_activations` key when they are static (an object whose `dynamic` is
    // false or absent, compressed-tensors' default): every FP8 module of it stores `input_scale`.
    std::string static_inputs;
    int64_t block_rows = 0, block_cols = 0;
  };
  PackedInput(const Checkpoint& ckpt, std::string method) : ckpt_(ckpt), method_(std::move(method)) {}
  void open_compressed_tensors(const nlohmann::json& q);
  void open_gptq_awq(const nlohmann::json& q);
  void open_kv_cache_scheme(const nlohmann::json& q, const std::string& where);
  core::Tensor int_weight(const std::string& module, const Module& m, std::set<std::string>& used) const;
  // Throws Error::corruption "<file>: tensor <name>: non-finite value at index i" for a NaN or
  // infinite scale (float dtypes; other dtypes are refused later by the encoding).
  void check_finite_scale(const std::string& name, const core::Tensor& s) const;
  core::Tensor fp8_weight(const std::string& module, const Module& m, std::set<std::string>& used) const;

  const Checkpoint& ckpt_;
  std::string method_;
  std::map<std::string, Module> modules_;
  std::vector<std::string> kv_scales_;
};

}  // namespace moe::io
