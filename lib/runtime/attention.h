// Self-attention of one layer over a batch of windows: q/k/v projections (+ qwen2 / glm4_moe
// biases), q/k norms (qwen3 and glm4_moe per head, olmoe over the whole projection + clip_qkv),
// RoPE (whole head, or its first rotary_dim elements), GQA, causal
// (optionally sliding-window) softmax attention per window (gpt_oss: with per-head sinks), o_proj.
#pragma once

#include <cstdint>
#include <optional>

#include "family/family.h"
#include "runtime/ops.h"
#include "runtime/weights.h"

namespace moe::runtime {

struct AttnSpec {
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  // RoPE width per head: the first rotary_dim elements of each head are rotated (rotate-half pairs
  // (i, i + rotary_dim/2)), the rest pass through (glm4_moe's partial rotary); 0: the whole head.
  int64_t rotary_dim = 0;
  int64_t rope_dim() const { return rotary_dim > 0 ? rotary_dim : head_dim; }
  double eps = 1e-6;
  model::QKNorm qk_norm = model::QKNorm::None;
  std::optional<float> clip_qkv;  // olmoe
  int64_t sliding_window = 0;     // 0: none; else key j visible from query i iff i - j < window
  bool sinks = false;             // gpt_oss: AttnWeights::sinks [heads], one extra softmax logit per head
  std::optional<double> scale;    // softmax scale on q·k; absent: head_dim^-0.5 (granitemoe: attention_multiplier)
  // qwen3_next: q_proj gives [heads, 2 * head_dim] per row, query then output gate per head; the
  // attention output is multiplied by sigmoid(gate) before o_proj (AttnOutput::o_input is the product).
  bool output_gate = false;
  // ernie4_5_moe and llama4 (runtime/llama4.h): RoPE on pairs (2i, 2i+1) instead of rotate-half
  // (i, i + rotary_dim/2) (rope_interleaved). llama4: no RoPE at all on a
  // NoPE layer (use_rope false); after RoPE, q and k of each head times rsqrt(mean(x²) + eps)
  // (l2_qk_norm, no weight); on a NoPE layer q times log1p(floor((pos + 1) / floor_scale)) *
  // attn_scale + 1 (floor_scale > 0); key j seen from query i iff j / chunk == i / chunk (chunk > 0).
  bool rope_interleaved = false, use_rope = true, l2_qk_norm = false;
  double floor_scale = 0, attn_scale = 0;
  int64_t chunk = 0;
};

struct AttnOutput {
  MatrixRM o_input;  // [N, heads*head_dim] attention output before o_proj
  MatrixRM out;      // [N, H] o_proj output
};

// The attention's working matrices (projections, their norms), kept by a caller that runs many
// layers or calls of one shape (runtime::Forward), so that their storage is allocated, and its
// pages faulted in and zeroed by the kernel, once rather than on every call. Each is resized to the
// call's shape (kept when the size is unchanged): one layer's working set, whatever the layer count.
struct AttnWorkspace {
  MatrixRM q, k, v;     // [N, heads*head_dim], [N, kv_heads*head_dim] x2 (MLA: q [N, heads*qk_head_dim])
  MatrixRM q_gate, gate;  // qwen3_next: q_proj's output [N, heads*2*head_dim], the gates [N, heads*head_dim]
  MatrixRM q_a, ckv, c, kv;  // MLA: q_a_proj [N, q_lora_rank], kv_a_proj [N, r+dr], its norm [N, r], kv_b_proj
};

// The shape of one causal attention over a batch of windows (what standard attention and MLA share).
struct CausalShape {
  int64_t rows = 0, T = 0;          // rows = windows * T, window-major; positions restart per window
  int64_t heads = 0, kv_heads = 0;  // query heads; key/value heads (heads % kv_heads == 0)
  int64_t dqk = 0, dv = 0;          // query/key width and value width per head
  float scale = 1.0f;               // softmax scale on q·k
  int64_t window = 0;               // sliding window (0: none)
  // [heads] or null: per head an extra logit in each query's softmax (not scaled), its probability
  // dropped (gpt_oss's attention sinks, eager_attention_forward in modeling_gpt_oss.py).
  const float* sinks = nullptr;
  int64_t chunk = 0;                // llama4 chunked attention (0: none): keys of the query's chunk only
  // A second key part (Multi-head Latent Attention's shared rope key), or null: q·k is then the
  // first dqk query columns against the keys plus the next `dqk2` query columns against k2 (row
  // stride ldk2; every head reads the same k2 row), so the keys need not be assembled per head.
  const float* k2 = nullptr;
  int64_t ldk2 = 0, dqk2 = 0;
};
// Causal softmax attention: head h reads its query at q + h*q_stride and key/value group
// g = h / (heads/kv_heads) at k + g*k_stride, v + g*v_stride (row strides ldq, ldk, ldv), and
// writes dv outputs at o + h*dv (row stride ldo). Matrix products through BLAS.
void causal_attention(const CausalShape& shape, const float* q, int64_t ldq, int64_t q_stride, const float* k,
                      int64_t ldk, int64_t k_stride, const float* v, int64_t ldv, int64_t v_stride, float* o,
                      int64_t ldo);

// x: [N,H] input_layernorm output, N = windows * T, window-major; positions restart per window.
AttnOutput attention(const AttnSpec& spec, const AttnWeights& w, const RopeTable& rope, const MatrixRM& x,
                     int64_t T);
// The same into `out`, the working matrices in `ws` (both keep their storage across calls of one shape).
void attention(const AttnSpec& spec, const AttnWeights& w, const RopeTable& rope, const MatrixRM& x, int64_t T,
               AttnOutput& out, AttnWorkspace& ws);

}  // namespace moe::runtime
