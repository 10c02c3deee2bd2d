#include "passes/experts.h"

#include <numeric>

#include "core/error.h"
#include "core/fp8_block.h"

namespace moe::passes {

using core::Error;

core::Tensor take_rows(const core::Tensor& t, const std::vector<int>& rows) {
  return t.take_rows(std::vector<int64_t>(rows.begin(), rows.end()));
}

core::Tensor to_tensor(const MatrixRM& m, core::DType dtype) {
  std::vector<float> v(m.data(), m.data() + m.size());
  return core::Tensor::from_f32(v, {m.rows(), m.cols()}).converted(dtype);
}

core::Tensor to_tensor_like(const MatrixRM& m, const core::Tensor& like, core::DType dense_dtype) {
  const auto* b = dynamic_cast<const core::Fp8Block*>(like.encoding());
  if (b) return core::Tensor::quantize_fp8_blocks(std::vector<float>(m.data(), m.data() + m.size()), m.rows(), m.cols(),
                                                  b->block_rows(), b->block_cols());
  const core::DType d = like.dtype();
  const bool plain_float = d == core::DType::F32 || d == core::DType::BF16 || d == core::DType::F16;
  return to_tensor(m, plain_float && !like.encoding() ? d : dense_dtype);
}

core::Tensor to_tensor(const std::vector<float>& v, core::DType dtype) {
  return core::Tensor::from_f32(v, {static_cast<int64_t>(v.size())}).converted(dtype);
}

void keep_experts(model::MoeBlock& block, const std::vector<int>& kept) {
  std::vector<model::Mlp> experts;
  experts.reserve(kept.size());
  for (int e : kept) experts.push_back(block.experts.at(e));
  block.experts = std::move(experts);
  block.router = take_rows(block.router, kept);
  if (block.router_bias) block.router_bias = take_rows(*block.router_bias, kept);
}

std::vector<double> importance_weights(const std::vector<double>& importance, const std::vector<int>& members) {
  std::vector<double> w(members.size());
  double total = 0;
  for (size_t i = 0; i < members.size(); ++i) total += (w[i] = importance.at(members[i]));
  for (double& x : w) x = total > 0 ? x / total : 1.0 / static_cast<double>(members.size());
  return w;
}

void check_stat_size(int64_t size, int64_t experts, const char* field, int layer) {
  if (size != experts)
    throw Error::invalid("layer " + std::to_string(layer) + ": statistics field '" + field + "' has " +
                         std::to_string(size) + " entries for " + std::to_string(experts) +
                         " experts (stats from another model or an earlier pass changed the layer; "
                         "run moe-tool calibrate on this model)");
}

void check_stats(const calib::LayerStats* stats, int layer, const std::string& pass) {
  if (!stats)
    throw Error::invalid("layer " + std::to_string(layer) + ": " + pass +
                         " needs routing statistics (run moe-tool calibrate first)");
}

const std::vector<bool>& super_flags(const calib::LayerStats& s, int64_t experts, int layer) {
  if (s.super_expert.empty())
    throw Error::invalid("layer " + std::to_string(layer) +
                         ": protect_super_experts needs super-expert flags (statistics with out_absmax)");
  check_stat_size(static_cast<int64_t>(s.super_expert.size()), experts, "super_expert", layer);
  return s.super_expert;
}

nlohmann::json ids_json(const std::vector<int>& ids) {
  nlohmann::json a = nlohmann::json::array();
  for (int i : ids) a.push_back(i);
  return a;
}

}  // namespace moe::passes
