// Family descriptors: how a model_type's logical parts map to on-disk tensor names and config
// keys, as data. Adding a family is a table entry built from a shared base (see family.cpp);
// only where the math differs (routing, q/k norms, attention kind) does the runtime branch.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "family/config.h"

namespace moe::model {

// How router logits become per-token expert weights (docs/methods.md).
enum class Routing {
  None,            // dense model
  SoftmaxTopK,     // softmax(all) -> top-k -> renormalise iff norm_topk_prob (mixtral: always)
  DeepSeekV2,      // softmax, greedy or group-limited (group max), x routed_scaling_factor
  DeepSeekV3,      // sigmoid + bias for choice, group-limited top-2 sums, renorm, x scaling
  SparseMixer,     // phimoe top-2 sparsemixer
  TopKSoftmax,     // granitemoe: top-k of logits, softmax over the k
  SoftmaxBiasTopK, // ernie4_5_moe: softmax, + correction bias for the choice, renorm (sum >= moe_norm_min)
  TopKSigmoid,     // llama4: top-k of logits, sigmoid of each; the score scales the expert's input
};
const char* routing_name(Routing r);

enum class AttentionKind { Standard, MLA };
enum class QKNorm { None, PerHead, Full };  // qwen3: per head over d; olmoe: whole projection
// StartEndInterval (ernie4_5_moe): layer l is MoE iff (l + 1) % moe_layer_interval == 0 and
// moe_layer_start_index <= l <= moe_layer_end_index (-1: the last layer). Interleave: llama4
// moe_layers / interleave_moe_layer_step.
enum class MoeLayerRule { All, SparseStep, FirstKDense, StartEndInterval, Interleave };

// Whether a tensor must be present.
struct Presence {
  enum Kind { Required, Optional, IfConfig } kind = Required;
  const char* key = nullptr;  // IfConfig: config key
  bool fallback = false;      // IfConfig: value when the key is absent
  bool negate = false;        // IfConfig: required when the key is false
  bool required(const Config& c) const;
};
inline constexpr Presence kRequired{};
inline constexpr Presence kOptional{Presence::Optional};
inline constexpr Presence if_config(const char* key, bool fallback) { return {Presence::IfConfig, key, fallback, false}; }
inline constexpr Presence unless_config(const char* key, bool fallback) { return {Presence::IfConfig, key, fallback, true}; }

// A named part of a layer (relative to "model.layers.{l}.") or of the model (absolute).
struct RoleName {
  std::string role;  // logical name used by the runtime and passes, e.g. "q_proj"
  std::string name;  // on-disk name, e.g. "self_attn.q_proj.weight"
  Presence presence = kRequired;
};

// What llama.cpp calls a family and does with it, for the GGUF export and the GGUF input (llama.cpp's
// src/llama-arch.cpp names; convert_hf_to_gguf.py: which models permute q/k rows, which keys each
// writes). The tensor and hyper-parameter name tables shared by every architecture are in
// io/gguf_names.h.
struct GgufArch {
  std::string model_type;  // ours (the entry's model_type)
  std::string arch;        // general.architecture
  bool permute_qk = false;        // the converter permutes q/k rows for llama.cpp's non-NeoX RoPE (LlamaModel)
  bool renormalizes = false;      // llama.cpp's graph renormalizes the top-k routing weights (norm_w)
  bool expert_width_key = false;  // ARCH.expert_feed_forward_length written (else feed_forward_length is the expert width)
  bool shared_expert = false;     // ffn_*_shexp and ffn_gate_inp_shexp
  // DeepSeek-style MoE keys (glm4moe): llama.cpp's graph takes the routing from the metadata
  // (expert_gating_func, expert_weights_scale, expert_weights_norm, expert_group_count /
  // expert_group_used_count), the choice bias as blk.N.exp_probs_b.bias; `renormalizes` is then
  // not checked (expert_weights_norm says it).
  bool routing_keys = false;
  bool leading_dense = false;   // a prefix of dense layers: leading_dense_block_count, blk.N.ffn_{gate,up,down}
  bool shared_count = false;    // shared experts counted (expert_shared_count; width = count x expert width)
  bool post_attention_norm = false;  // post_attn_norm is blk.N.post_attention_norm (else ffn_norm)
  // The router bias as blk.N.exp_probs_b.bias without the routing keys (ernie4_5-moe: softmax
  // gating, the bias added for the choice only, the chosen weights renormalized).
  bool choice_bias = false;
  // Dense layers between the MoE ones, every interleave_moe_layer_step-th layer MoE (llama4:
  // blk.N.ffn_{gate,up,down} of feed_forward_length, the experts of expert_feed_forward_length).
  bool interleaved_dense = false;
  // llama3 RoPE scaling written as the per-frequency divisors rope_freqs.weight [head_dim / 2]
  // (LlamaModel.generate_extra_tensors), with rope.dimension_count; no rope.scaling.* keys.
  bool rope_freqs = false;
  // llama.cpp's llama4 graph, whose attention is fixed by its loader rather than by keys: RoPE on
  // pairs (2i, 2i+1) except every 4th layer (NoPE, full attention, q x the temperature of
  // floor_scale 8192 / attn_scale 0.1), the other layers chunked by 8192 tokens, weightless q/k
  // RMS norm after RoPE unless the model has 128 experts; the router's top-k logits through a
  // sigmoid scale each expert's input.
  bool llama4_graph = false;
  // Multi-head Latent Attention (deepseek2): attn_q_a / attn_q_a_norm / attn_q_b (or attn_q),
  // attn_kv_a_mqa, attn_kv_a_norm, kv_b_proj split into attn_k_b (transposed) and attn_v_b, the
  // MLA keys (q/kv_lora_rank, key/value_length(_mla), head_count_kv 1) and yarn RoPE keys.
  bool mla = false;
  // gpt-oss (llama.cpp's LLM_ARCH_OPENAI_MOE): the router bias as blk.N.ffn_gate_inp.bias (added to
  // the logits), the expert biases as blk.N.ffn_{gate,up,down}_exps.bias ([I, E], [H, E]), the
  // attention sinks as blk.N.attn_sinks.weight, output.weight required (tied embeddings written
  // twice), the clamped SwiGLU of the graph (alpha 1.702, limit 7 fixed in llama-graph.cpp).
  bool gate_inp_bias = false;
  bool expert_biases = false;
  bool output_required = false;
  bool swiglu_oai = false;
  // The loader's sliding-window layer pattern (llama_hparams::set_swa_pattern(n): layer l slides
  // when l % n < n - 1) with ARCH.attention.sliding_window; 0: no sliding window.
  int swa_pattern = 0;
  // yarn RoPE scaling written (rope.scaling.type/factor/original_context_length, yarn_beta_*).
  bool yarn = false;
  // phimoe (llama.cpp's phi3 graph): RMS norm plus bias where the model has LayerNorm with bias.
  // The export writes the residual stream's writers mean-centred (token_embd rows; attn_output
  // columns and bias; ffn_down_exps columns): every read of the stream is a LayerNorm, which
  // ignores its mean, so the model is the same, and on a stream of mean 0 LayerNorm is RMS norm.
  bool centre_residual = false;
  // phimoe: llama.cpp routes softmax over the experts, top-2, renormalized, where transformers'
  // PhiMoE runs sparsemixer (each of the two weighs its own masked softmax, often 1): written with a
  // warning that llama.cpp computes a different MoE block.
  bool sparsemixer_differs = false;
  // longrope RoPE scaling (Phi3MiniModel.generate_extra_tensors): rope_factors_long /
  // rope_factors_short [head_dim / 2], rope.scaling.attn_factor and original_context_length.
  bool longrope = false;
  // A dense architecture (llama.cpp's llama for llama/mistral, qwen2, qwen3): every layer a dense
  // MLP as blk.N.ffn_{gate,up,down} of feed_forward_length, no expert keys. llama.cpp's "llama"
  // holds both llama (dense) and mixtral (experts): the file's ARCH.expert_count tells them apart.
  bool dense = false;
  // The loader's limits on the attention (llama-model.cpp): no q/k/v/o biases (qwen3, qwen3moe);
  // attn_q fixed at [n_embd, n_embd], so num_attention_heads x head_dim must be the hidden size
  // (qwen2, qwen2moe).
  bool no_attention_bias = false;
  bool square_q = false;
};

struct FamilyDesc {
  std::string model_type;
  std::vector<std::string> architectures;
  bool moe = false;
  std::string expert_count_key;  // e.g. num_local_experts
  std::string expert_width_key;  // e.g. intermediate_size
  std::string topk_key = "num_experts_per_tok";
  Routing routing = Routing::None;
  bool norm_topk_default = false;  // value of norm_topk_prob when absent (mixtral: always true)
  bool norm_topk_forced = false;   // mixtral: renormalises regardless of config
  AttentionKind attention = AttentionKind::Standard;
  QKNorm qk_norm = QKNorm::None;
  bool layer_norm = false;  // phimoe: LayerNorm with bias instead of RMSNorm
  MoeLayerRule moe_layers = MoeLayerRule::All;
  bool extra_layers_allowed = false;  // deepseek_v3 / glm4_moe multi-token-prediction layers past L
  std::string qk_norm_key;            // glm4_moe: use_qk_norm; q/k norms only when this config key is true
  // Partial rotary (glm4_moe): RoPE on the first int(head_dim * partial_rotary_factor) elements of
  // each head. Families without it refuse a partial_rotary_factor other than 1.
  bool partial_rotary = false;
  double default_partial_rotary_factor = 1.0;  // when the key is absent

  // What moe-tool does with the family beyond reading, inspecting and rewriting it:
  bool forward = false;         // runtime/forward.h runs it (eval, calibrate, passes that run the model)
  bool upcycle_source = false;  // `upcycle` takes it as the dense source
  bool upcycle_target = false;  // `upcycle --to` writes it (config keys: expert_count_key,
                                // expert_width_key, shared_width_key of this entry)
  std::optional<GgufArch> gguf;  // `export --format gguf` writes it and GGUF inputs of it are read

  // transformers' defaults for keys a config.json may leave out (the family's
  // configuration_<model_type>.py): the forward uses them when the key is absent or null.
  double default_rope_theta = 10000.0;
  double default_rms_norm_eps = 1e-6;
  int64_t default_head_dim = 0;        // 0: hidden_size / num_attention_heads
  int64_t default_sliding_window = 0;  // when the key is absent (a null value: no window); 0 none

  std::string layer_prefix = "model.layers.{l}.";
  std::vector<RoleName> layer_roles;  // attention and norms
  std::vector<RoleName> globals;      // embed, final norm, lm_head

  // MoE block, relative to the layer prefix; {e} is the expert index.
  std::string router;
  std::string router_bias;  // deepseek_v3 e_score_correction_bias, gpt_oss router bias ("" if none)
  std::string expert_gate, expert_up, expert_down;
  std::string fused_gate_up, fused_down;  // granitemoe: [E,2I,H] and [E,H,I]
  // gpt_oss: the fused tensors are [in, out] per expert with gate and up interleaved along the
  // last dim (gate_up [E,H,2I], gate = [..., 0::2], up = [..., 1::2]; down [E,I,H]), with expert
  // biases fused_gate_up_bias [E,2I] (interleaved the same way) and fused_down_bias [E,H].
  bool fused_in_out_interleaved = false;
  std::string fused_gate_up_bias, fused_down_bias;
  // gpt_oss: the router bias is added to the router logits (F.linear with bias), not only to the
  // choice scores as DeepSeek-V3's correction bias is.
  bool router_bias_in_logits = false;
  // gpt_oss: experts apply the clamped SwiGLU (swiglu_alpha, swiglu_limit) with expert biases.
  bool clamped_swiglu = false;
  // gpt_oss: per-head attention sinks (layer role "sinks") and per-layer attention kinds from
  // `layer_types` (sliding_attention / full_attention). yarn_rope: yarn RoPE outside the MLA
  // families (gpt_oss; qwen2, qwen3, qwen2_moe, qwen3_moe for their long-context configs).
  bool attention_sinks = false;
  bool per_layer_types = false;
  bool yarn_rope = false;
  // phimoe: longrope RoPE scaling (Phi-3.5-MoE's released config) with PhimoeRotaryEmbedding's
  // short_mscale / long_mscale on cos and sin.
  bool longrope_rope = false;
  // granitemoe: the scalar multipliers of configuration_granitemoe.py (a key left out is 1.0):
  // embeddings x embedding_multiplier, softmax scale attention_multiplier (instead of
  // head_dim^-0.5), each residual branch's output x residual_multiplier, logits / logits_scaling.
  bool scalar_multipliers = false;
  // granitemoe, phimoe: attention head_dim is hidden_size / num_attention_heads (no head_dim key;
  // a head_dim that says otherwise is refused by the forward).
  bool head_dim_from_hidden = false;
  // llama4: the fused experts are [in, out] as gpt_oss's but gate and up are the two halves of
  // gate_up [E,H,2I] (gate = [..., :I], up = [..., I:]), down [E,I,H], no expert biases.
  bool fused_in_out_chunked = false;
  // llama4 (Llama4TextAttention): RoPE as the complex product on pairs (2i, 2i+1), only on the
  // layers no_rope_layers marks; the weightless L2 norm of q/k after RoPE (use_qk_norm), the
  // temperature tuning of q on the NoPE layers, chunked attention (layer_types / attention_chunk_size).
  bool llama4_attention = false;
  // The RoPE parameters transformers' configuration fills in when the config gives none (null: none).
  nlohmann::json default_rope_parameters = nullptr;
  std::string shared_gate, shared_up, shared_down, shared_expert_gate;
  std::string shared_width_key;         // qwen2_moe: shared_expert_intermediate_size
  std::string shared_count_key;         // deepseek: n_shared_experts (width = count x expert width)
  int64_t default_shared_count = 0;     // shared_count_key absent (glm4_moe: 1, its config's default)
  // Dense MLP (dense families, dense layers of MoE families).
  std::string dense_gate = "mlp.gate_proj.weight";
  std::string dense_up = "mlp.up_proj.weight";
  std::string dense_down = "mlp.down_proj.weight";
  std::string dense_width_key = "intermediate_size";
  // ernie4_5_moe: RoPE on pairs (2i, 2i+1) of each head (transformers' interleaved rotate_half)
  // instead of rotate-half pairs (i, i + d/2).
  bool rope_interleaved = false;
  // ernie4_5_moe: the router bias is stored as [1, E] (Ernie4_5_MoeStatics); read as [E] ([1, E]
  // or [E] accepted) and written back as [1, E].
  bool router_bias_row = false;
  // The value of tie_word_embeddings when config.json leaves it out (ernie4_5_moe: true).
  bool default_tie_word_embeddings = false;
  // A boolean config key whose value true is refused on load (ernie4_5_moe: use_bias, which puts
  // biases on every expert, shared-expert and dense MLP projection), with what it turns on.
  std::string refused_true_key, refused_true_what;

  // transformers v5's fused-expert layout of a per-expert family (conversion_mapping.py: what v5
  // writes with save_original_format=False and what checkpoints made for v5 hold): the routed
  // experts stacked as `v5_experts`gate_up_proj [E,2I,H] (each expert's gate rows, then its up
  // rows) and `v5_experts`down_proj [E,H,I], the router renamed where v5 renames it (mixtral:
  // block_sparse_moe.gate -> mlp.gate). Empty: the family has no such layout here.
  std::string v5_experts;  // e.g. "mlp.experts."
  std::string v5_router;   // the router's v5 name ("" : the same as `router`)
  // This entry is the v5 variant of its family (v5_fused_variant): fused_gate_up/fused_down are set
  // and the per-expert names are kept, for outputs whose experts are encoded (written per expert,
  // which v5 loads through the same conversion mapping).
  bool v5_layout = false;

  // qwen3_next (modeling_qwen3_next.py): Qwen3NextRMSNorm is zero-centred, x_normed * (1 + weight),
  // for the layer norms, the final norm and the q/k norms (the DeltaNet's gated norm is not).
  bool zero_centred_norm = false;
  // qwen3_next: hybrid decoder layers, "linear_attention" (Gated DeltaNet, runtime/gated_delta_net.h;
  // roles in_proj_qkvz, in_proj_ba, conv1d, dt_bias, A_log, linear_norm, out_proj) or "full_attention"
  // (family/hybrid_layers.h reads layer_types / full_attention_interval); the full-attention q_proj
  // gives query and output gate per head ([heads * 2 * head_dim, H]), o_proj reads attn * sigmoid(gate).
  bool hybrid_linear_attention = false;

  // llama4 (Llama4ForConditionalGeneration, the multimodal wrapper): the text model's
  // hyper-parameters are config.json's text_config (whose model_type must be this), its tensors
  // under this entry's "language_model." names; the vision tower and projector are extras, passed
  // through; outputs write the changed keys back inside text_config (model/wrapped_config.h).
  std::string text_model_type;  // "" : not a wrapper

  bool fused() const { return !fused_gate_up.empty(); }
  // Fused with no per-expert spelling to fall back on (granitemoe, gpt_oss).
  bool fused_only() const { return fused() && !v5_layout; }
  bool has_shared() const { return !shared_gate.empty(); }
};

// The family for a config (by model_type); throws NotSupported naming the model_type, the
// architectures value and the supported list.
const FamilyDesc& family_for(const Config& config);
// The v5 fused-expert variant of `f` (same model_type; see FamilyDesc::v5_experts), or nullptr
// when the family has none. The loader takes it when a layer holds `v5_experts`gate_up_proj.
const FamilyDesc* v5_fused_variant(const FamilyDesc& f);
// The family's per-expert entry: `f` itself, or for a v5 variant the table entry it was made from.
const FamilyDesc& per_expert_layout(const FamilyDesc& f);
const std::vector<FamilyDesc>& all_families();
std::string supported_families();
// The model_types whose entry has `flag` set, in table order, e.g. families_with(&FamilyDesc::forward).
std::vector<std::string> families_with(bool FamilyDesc::*flag);
// The same joined with ", ".
std::string family_list(bool FamilyDesc::*flag);

// Replaces {l} and {e} in a template.
std::string expand(const std::string& tmpl, int layer, int expert = -1);

}  // namespace moe::model
