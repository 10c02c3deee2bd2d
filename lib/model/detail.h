// Internals shared by the files of lib/model (not a public header): the fused-expert strided
// views, the quantization_config readers and the key aliases.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/tensor.h"
#include "family/config.h"
#include "family/family.h"

namespace moe::model::detail {

using core::DType;
using core::Shape;
using core::Tensor;

// A float dtype outputs may convert (the FP8 types are stored codes, not converted).
inline bool is_float(DType t) { return core::dtype_info(t).is_float && t != DType::F8_E4M3 && t != DType::F8_E5M2; }

// Other spellings of the expert-count and top-k keys that loaders read (transformers'
// attribute_map aliases: mixtral and qwen3_moe map num_experts to num_local_experts, deepseek maps
// it to n_routed_experts, ernie maps num_experts_per_tok to moe_k; llama.cpp's converter takes the
// first of several it finds; gpt-oss's released config.json also carries experts_per_token, the
// name in OpenAI's own checkpoint format). A config that gives one of them besides the family's own key with
// another value means different models to different loaders: refused.
inline constexpr const char* kExpertCountKeys[] = {"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"};
inline constexpr const char* kTopKKeys[] = {"num_experts_per_tok", "moe_k", "moe_topk", "experts_per_token"};

// Element (i, j) of a rank-1 ([n]) or rank-2 ([n, m]) plain tensor at flat position
// offset + i * s0 + j * s1 of another tensor's elements: the strided views the gpt_oss fused
// expert layout needs (transposed, gate/up interleaved). gather copies out of `flat` into a new
// tensor of `shape`; scatter copies `t` into `flat` (same dtype) at those positions.
struct Strides {
  int64_t offset = 0, s0 = 1, s1 = 0;
};
Tensor gather(const Tensor& flat, const Shape& shape, Strides st);
void scatter(const Tensor& t, Tensor& flat, Strides st);

// The per-expert [out, in] views of gpt_oss's fused layout (transformers' GptOssExperts):
// gate_up [E,H,2I] with gate = [..., 0::2] and up = [..., 1::2], gate_up_bias [E,2I] the same
// way, down [E,I,H], down_bias [E,H]. Each returns the strides of expert e's tensor.
// `chunked` (llama4's Llama4TextExperts): gate = [..., :I], up = [..., I:] instead, no biases.
struct InterleavedLayout {
  int64_t H, I;
  bool chunked = false;
  Strides gate(int64_t e) const { return {e * H * 2 * I, chunked ? 1 : 2, 2 * I}; }                 // [I,H]
  Strides up(int64_t e) const { return {e * H * 2 * I + (chunked ? I : 1), chunked ? 1 : 2, 2 * I}; }  // [I,H]
  Strides down(int64_t e) const { return {e * I * H, 1, H}; }                  // [H,I]
  Strides gate_bias(int64_t e) const { return {e * 2 * I, 2, 0}; }             // [I]
  Strides up_bias(int64_t e) const { return {e * 2 * I + 1, 2, 0}; }           // [I]
  Strides down_bias(int64_t e) const { return {e * H, 1, 0}; }                 // [H]
};

// quantization_config {"quant_method": "fp8", "weight_block_size": [br, bc]}: the block size of
// the checkpoint's block-scaled FP8 weights, or nullopt when the config has no fp8 quantization.
std::optional<std::pair<int64_t, int64_t>> fp8_block_size(const Config& c);

// quantization_config {"quant_method": "moe_tool", "format_version": 1, "weights": {...}}: the
// encoded weights of a native moe-tool checkpoint (docs/FORMAT.md), or null.
const nlohmann::json* native_weights(const Config& c);

// quantization_config.experts_per_layer of a native checkpoint with ragged per-layer expert counts
// (docs/FORMAT.md): one integer per decoder layer, 0 for a dense layer, top_k..E for an MoE
// layer (E = the config's expert count, the largest). Empty when absent.
std::vector<int64_t> native_expert_counts(const Config& c, const FamilyDesc& f, int64_t layers, int64_t E, int64_t top_k);

}  // namespace moe::model::detail
