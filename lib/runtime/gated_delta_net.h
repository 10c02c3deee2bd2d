// qwen3_next's Gated DeltaNet (transformers' Qwen3NextGatedDeltaNet, modeling_qwen3_next.py), the
// token mixer of its "linear_attention" layers, on a batch of windows; each window starts from a
// zero convolution and recurrent state. With nk key heads of width dk, nv value heads of width dv
// (r = nv / nk value heads per key head), K = nk*dk, V = nv*dv:
//   qkvz = x in_proj_qkvzᵀ [N, 2K+2V] and ba = x in_proj_baᵀ [N, 2nv], grouped per key head g as
//     [q_g (dk), k_g (dk), v_g (r*dv), z_g (r*dv)] and [b_g (r), a_g (r)] (fix_query_key_value_ordering);
//   [q | k | v] [N, 2K+V] through the causal depthwise conv1d (kernel c: out_t = Σ_j w[j] in_{t-c+1+j})
//     and SiLU; q and k l2-normalised per head (x / sqrt(Σx² + 1e-6)), q times dk^-0.5;
//   beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias) per value head;
//   per value head h (key head h / r), state S [dk, dv] from 0, for each position t
//     S = exp(g_t) S;  S += k_t ⊗ beta_t (v_t - Sᵀk_t);  o_t = Sᵀ q_t
//   (torch_recurrent_gated_delta_rule, in f32; transformers' chunked form is equal in exact arithmetic);
//   o per head through the gated RMSNorm rms(o) * norm * silu(z) (eps), then out_proj.
#pragma once

#include <cstdint>

#include "model/hybrid_layers.h"
#include "runtime/weights.h"

namespace moe::runtime {

struct DeltaNetSpec {
  model::DeltaNetDims dims;
  double eps = 1e-6;  // the gated norm's (rms_norm_eps)
};

struct DeltaNetOutput {
  MatrixRM o_input;  // [N, V] gated-norm output, the input of out_proj
  MatrixRM out;      // [N, H]
};

// x: [N, H] (input_layernorm output), N = windows * T, window-major. Error::internal on weight
// shapes that do not match the spec (the loader checks them against the config).
DeltaNetOutput gated_delta_net(const DeltaNetSpec& spec, const DeltaNetWeights& w, const MatrixRM& x, int64_t T);

}  // namespace moe::runtime
