// Small operations shared by the expert passes: selecting experts of a block, writing f32 results
// back as tensors of the checkpoint's dtype, frequency weights, and checks on statistics.
#pragma once

#include <string>
#include <vector>

#include "calib/stats.h"
#include "core/tensor.h"
#include "model/model.h"
#include "runtime/weights.h"

namespace moe::passes {

using runtime::MatrixRM;

// Rows `rows` of t (along dim 0, in the given order) as a new tensor of t's dtype (byte copy:
// exact for every dtype; an encoded tensor keeps its encoding, core::Tensor::take_rows). Works for
// 1-D tensors (one element per row).
core::Tensor take_rows(const core::Tensor& t, const std::vector<int>& rows);

// An f32 result stored as `dtype` (round to nearest even), shape [rows, cols].
core::Tensor to_tensor(const MatrixRM& m, core::DType dtype);
// An f32 weight stored like `like`: its dtype, or for a block-scaled FP8 weight FP8 codes with
// new block scales of the same block size (core::Tensor::quantize_fp8_blocks); a weight of any
// other encoding (low-rank, integer or ternary codes, ...) gives a dense tensor of `dense_dtype`
// (the model's materialize dtype, model::Model::materialize_dtype()).
core::Tensor to_tensor_like(const MatrixRM& m, const core::Tensor& like, core::DType dense_dtype);
// A vector result stored as `dtype`, shape [n].
core::Tensor to_tensor(const std::vector<float>& v, core::DType dtype);

// Keeps the experts `kept` (ascending original ids) of a block: their tensors unchanged (views
// stay lazy), router rows and router_bias entries sliced in the same order.
void keep_experts(model::MoeBlock& block, const std::vector<int>& kept);

// f_e / Σ f over `members` (f = a per-expert importance: count, weight_sum, saliency); equal
// weights when every member's importance is 0.
std::vector<double> importance_weights(const std::vector<double>& importance, const std::vector<int>& members);

// Statistics checks: a field with one entry (or row) per expert. Error::invalid naming the layer
// and field, and how to produce it, when the stats do not match the layer.
void check_stat_size(int64_t size, int64_t experts, const char* field, int layer);
void check_stats(const calib::LayerStats* stats, int layer, const std::string& pass);

// Super-expert flags of a layer (size E), or Error::invalid when the stats carry none.
const std::vector<bool>& super_flags(const calib::LayerStats& s, int64_t experts, int layer);

// JSON array of ints.
nlohmann::json ids_json(const std::vector<int>& ids);

}  // namespace moe::passes
