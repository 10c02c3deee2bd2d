// Multi-head Latent Attention (DeepSeek-V2/V3, Kimi-K2), as transformers' modeling_deepseek_v3.py
// (DeepseekV3Attention) and modeling_deepseek_v2.py (DeepseekV2Attention) compute it:
//   q      = q_proj x                      or q_b_proj(q_a_layernorm(q_a_proj x))   [N, nH*(dn+dr)]
//   [c|kr] = kv_a_proj_with_mqa x                                                    [N, r + dr]
//   [kn|v] = kv_b_proj(kv_a_layernorm c)   per head kn [dn], v [dv]                  [N, nH*(dn+dv)]
//   RoPE on the last dr columns of every q head and on kr (one rope key shared by all heads);
//   head h: softmax(scale * ([qn|qr] · [kn_h|kr])) v_h, causal; o_proj on [N, nH*dv].
// dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim, r = kv_lora_rank.
#pragma once

#include <cstdint>

#include "runtime/attention.h"
#include "runtime/ops.h"
#include "runtime/weights.h"

namespace moe::runtime {

struct MlaSpec {
  int64_t heads = 0;
  int64_t q_lora_rank = 0;  // 0: q_proj direct
  int64_t kv_lora_rank = 0, qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
  // qk_head_dim^-0.5, times yarn's get_mscale(factor, mscale_all_dim)^2 when rope_scaling is yarn
  // with mscale_all_dim set.
  double scale = 1.0;
  // RoPE pairs (2i, 2i+1) (transformers' apply_rotary_pos_emb_interleave for v3 with
  // rope_interleave, the complex product of v2), else rotate-half pairs (i, i + dr/2).
  bool interleaved = true;
  // q_a_layernorm and kv_a_layernorm: transformers builds them with the RMSNorm default eps 1e-6
  // (not rms_norm_eps).
  double lora_norm_eps = 1e-6;
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
};

// x: [N,H] input_layernorm output, N = windows * T, window-major; `rope` has d = qk_rope_head_dim.
// Throws Error::corruption when a projection's shape does not match the spec.
// AttnOutput::o_input is [N, heads*v_head_dim].
AttnOutput mla_attention(const MlaSpec& spec, const AttnWeights& w, const RopeTable& rope, const MatrixRM& x,
                         int64_t T);
// The same into `out`, the working matrices (q, q_a, ckv, c, kv) in `ws`: a caller running many
// layers or windows of one shape keeps both, so their storage is not allocated (and faulted in by
// the kernel) again on every call.
void mla_attention(const MlaSpec& spec, const AttnWeights& w, const RopeTable& rope, const MatrixRM& x, int64_t T,
                   AttnOutput& out, AttnWorkspace& ws);

}  // namespace moe::runtime
