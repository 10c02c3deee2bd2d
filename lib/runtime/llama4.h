// llama4_text's attention features (transformers' modeling_llama4.py Llama4TextAttention and
// configuration_llama4.py Llama4TextConfig), as per-layer attention specs and the q/k steps that
// follow RoPE.
#pragma once

#include <cstdint>
#include <vector>

#include "family/config.h"
#include "runtime/attention.h"

namespace moe::runtime {

// One AttnSpec per decoder layer from `base` and the config:
// - no_rope_layers[l] (1: RoPE, 0: NoPE; null or empty: NoPE every no_rope_layer_interval-th layer,
//   default 4), RoPE on pairs (2i, 2i+1) (apply_rotary_emb's complex product);
// - use_qk_norm (default true): the weightless L2 norm with rms_norm_eps, on the RoPE layers only;
// - attn_temperature_tuning (default true; a number counts as its truth value), floor_scale
//   (default 8192), attn_scale (default 0.1): on the NoPE layers only;
// - layer_types (default: chunked_attention on RoPE layers, full_attention on NoPE layers) and
//   attention_chunk_size (default 8192) for the chunked layers.
// Throws Error::corruption naming the key for a malformed value (a list shorter than
// num_hidden_layers, an unknown layer type, a floor_scale <= 0) and Error::unsupported for a
// chunked layer without an attention_chunk_size (null).
std::vector<AttnSpec> llama4_layer_attention(const model::Config& c, const AttnSpec& base, int64_t layers);

// After RoPE, on q [N, heads*d] and k [N, kv_heads*d] of windows of T rows: the L2 norm of each
// head (spec.l2_qk_norm on a RoPE layer), then q's temperature tuning (spec.floor_scale > 0 on a
// NoPE layer; position n % T). Nothing for other families.
void llama4_qk_after_rope(const AttnSpec& spec, MatrixRM& q, MatrixRM& k, int64_t T);

}  // namespace moe::runtime
