// Self-attention of one layer over a batch of windows: q/k/v projections (+ qwen2 biases),
// q/k norms (qwen3 per head, olmoe over the whole projection + clip_qkv), RoPE, GQA, causal
// (optionally sliding-window) softmax attention per window, o_proj.
#pragma once

#include <cstdint>
#include <optional>

#include "model/family.h"
#include "runtime/ops.h"
#include "runtime/weights.h"

namespace moe::runtime {

struct AttnSpec {
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  double eps = 1e-6;
  model::QKNorm qk_norm = model::QKNorm::None;
  std::optional<float> clip_qkv;  // olmoe
  int64_t sliding_window = 0;     // 0: none; else key j visible from query i iff i - j < window
};

struct AttnOutput {
  MatrixRM o_input;  // [N, heads*head_dim] attention output before o_proj
  MatrixRM out;      // [N, H] o_proj output
};

// x: [N,H] input_layernorm output, N = windows * T, window-major; positions restart per window.
AttnOutput attention(const AttnSpec& spec, const AttnWeights& w, const RopeTable& rope, const MatrixRM& x,
                     int64_t T);

}  // namespace moe::runtime
