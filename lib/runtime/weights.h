// fp32 copies of one layer's weights, converted from the (lazy, possibly encoded) model tensors.
// The driver converts a layer once, applies it to every window of the batch and releases it,
// so at most one layer is resident in f32 at a time. Orientation is HF's: [out, in], row-major.
#pragma once

#include <Eigen/Core>
#include <optional>
#include <vector>

#include "model/model.h"

namespace moe::runtime {

using MatrixRM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowVector = Eigen::Matrix<float, 1, Eigen::Dynamic>;

struct MlpWeights {  // down(silu(gate x) * up x)
  MatrixRM gate;  // [I,H]
  MatrixRM up;    // [I,H]
  MatrixRM down;  // [H,I]
  int64_t width() const { return gate.rows(); }
};

struct MoeWeights {
  MatrixRM router;                      // [E,H]
  std::optional<RowVector> router_bias; // [E] (deepseek_v3; not used by the forward)
  std::vector<MlpWeights> experts;      // E
  std::optional<MlpWeights> shared;     // qwen2_moe shared expert
  std::optional<RowVector> shared_gate; // [H] (the [1,H] sigmoid gate row)
  int64_t num_experts() const { return static_cast<int64_t>(experts.size()); }
};

struct AttnWeights {
  MatrixRM q, k, v, o;                     // [nH*d,H], [nKV*d,H], [nKV*d,H], [H,nH*d]
  std::optional<RowVector> q_bias, k_bias, v_bias, o_bias;
  std::optional<RowVector> q_norm, k_norm; // [d] (per head) or [nH*d]/[nKV*d] (full)
};

struct LayerWeights {
  int index = 0;
  RowVector input_norm, post_attn_norm;  // [H]
  AttnWeights attn;
  std::optional<MoeWeights> moe;
  std::optional<MlpWeights> mlp;
};

// Converts a tensor [rows, cols] (any float dtype) to an f32 row-major matrix.
MatrixRM to_matrix(const core::Tensor& t);
RowVector to_row(const core::Tensor& t);
MlpWeights convert_mlp(const model::Mlp& m);
MoeWeights convert_moe(const model::MoeBlock& b);
// Converts every tensor of layer `l` the forward needs (errors name the layer and role).
LayerWeights convert_layer(const model::Layer& l);
// The same into `w`, reusing its buffers where shapes match (no allocation, no page faults when
// consecutive layers have the same shapes: what the layer-sequential driver does).
void convert_layer_into(const model::Layer& l, LayerWeights& w);

}  // namespace moe::runtime
