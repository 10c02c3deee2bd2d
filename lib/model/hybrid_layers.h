// qwen3_next's hybrid decoder layers (transformers' configuration_qwen3_next.py and
// modeling_qwen3_next.py): each layer is either "linear_attention" (Qwen3NextGatedDeltaNet) or
// "full_attention" (Qwen3NextAttention), by layer_types or, absent, full_attention_interval
// (default 4: layers 3, 7, 11, ... full). What the loader checks and the forward reads.
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "family/config.h"
#include "family/family.h"

namespace moe::io {
class Checkpoint;
}

namespace moe::model {

struct Layer;
struct Dims;

// true for each "linear_attention" layer of `layers`. Error::corruption naming the key for a
// layer_types of another length or with another value, a full_attention_interval < 1.
std::vector<bool> linear_attention_layers(const Config& c, int64_t layers);

// The Gated DeltaNet's sizes (config keys linear_num_key_heads, linear_num_value_heads,
// linear_key_head_dim, linear_value_head_dim, linear_conv_kernel_dim; transformers' defaults 16,
// 32, 128, 128, 4). Error::corruption when num_v_heads is not a multiple of num_k_heads.
struct DeltaNetDims {
  int64_t k_heads = 16, v_heads = 32, k_dim = 128, v_dim = 128, conv_kernel = 4;
  int64_t key_dim() const { return k_heads * k_dim; }     // q and k width
  int64_t value_dim() const { return v_heads * v_dim; }   // v and z width
  int64_t conv_dim() const { return 2 * key_dim() + value_dim(); }
};
DeltaNetDims delta_net_dims(const Config& c);

// The roles of a linear-attention layer (family roles in_proj_qkvz ... out_proj) and of a
// full-attention one (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm).
const std::vector<std::string>& linear_attention_roles();
const std::vector<std::string>& full_attention_roles();

// Checks that `layer` (its roles read as optional) has exactly the tensors of its type (a
// full-attention layer's q/k/v/o biases iff attention_bias), with the
// shapes the config implies: in_proj_qkvz [2*key_dim + 2*value_dim, H], in_proj_ba [2*v_heads, H],
// conv1d [conv_dim, 1, conv_kernel], dt_bias and A_log [v_heads], linear_norm [v_dim],
// out_proj [H, value_dim]. Error::corruption naming the tensor.
void check_hybrid_layer(const io::Checkpoint& ckpt, const FamilyDesc& f, const Config& c, const Dims& d,
                        const Layer& layer, bool linear);

}  // namespace moe::model
