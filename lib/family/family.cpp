#include "family/family.h"

#include <algorithm>

#include "core/error.h"

namespace moe::model {

using core::Error;

const char* routing_name(Routing r) {
  switch (r) {
    case Routing::None: return "none (dense)";
    case Routing::SoftmaxTopK: return "softmax -> top-k";
    case Routing::DeepSeekV2: return "deepseek-v2 (softmax, group-limited, scaled)";
    case Routing::DeepSeekV3: return "deepseek-v3 (sigmoid + bias, group-limited, scaled)";
    case Routing::SparseMixer: return "sparsemixer top-2";
    case Routing::TopKSoftmax: return "top-k -> softmax";
    case Routing::SoftmaxBiasTopK: return "softmax + bias for choice -> top-k, renormalised";
    case Routing::TopKSigmoid: return "top-k -> sigmoid (scales the expert input)";
  }
  return "?";
}

bool Presence::required(const Config& c) const {
  switch (kind) {
    case Required: return true;
    case Optional: return false;
    case IfConfig: return c.get_bool_or(key, fallback) != negate;
  }
  return true;
}

std::string expand(const std::string& tmpl, int layer, int expert) {
  std::string out;
  out.reserve(tmpl.size() + 8);
  for (size_t i = 0; i < tmpl.size(); ++i) {
    if (tmpl.compare(i, 3, "{l}") == 0) {
      out += std::to_string(layer);
      i += 2;
    } else if (tmpl.compare(i, 3, "{e}") == 0) {
      out += std::to_string(expert);
      i += 2;
    } else {
      out += tmpl[i];
    }
  }
  return out;
}

namespace {

// The llama layout every family starts from.
FamilyDesc llama_base(const std::string& type, const std::string& arch) {
  FamilyDesc f;
  f.model_type = type;
  f.architectures = {arch};
  f.layer_roles = {
      {"q_proj", "self_attn.q_proj.weight"},
      {"k_proj", "self_attn.k_proj.weight"},
      {"v_proj", "self_attn.v_proj.weight"},
      {"o_proj", "self_attn.o_proj.weight"},
      {"q_bias", "self_attn.q_proj.bias", if_config("attention_bias", false)},
      {"k_bias", "self_attn.k_proj.bias", if_config("attention_bias", false)},
      {"v_bias", "self_attn.v_proj.bias", if_config("attention_bias", false)},
      {"o_bias", "self_attn.o_proj.bias", if_config("attention_bias", false)},
      {"input_norm", "input_layernorm.weight"},
      {"post_attn_norm", "post_attention_layernorm.weight"},
  };
  f.globals = {
      {"embed", "model.embed_tokens.weight"},
      {"final_norm", "model.norm.weight"},
      {"lm_head", "lm_head.weight", unless_config("tie_word_embeddings", false)},
  };
  return f;
}

void set_role(FamilyDesc& f, const std::string& role, const std::string& name, Presence p) {
  for (auto& r : f.layer_roles)
    if (r.role == role) {
      r.name = name;
      r.presence = p;
      return;
    }
  f.layer_roles.push_back({role, name, p});
}

void qkv_bias_always(FamilyDesc& f) {
  set_role(f, "q_bias", "self_attn.q_proj.bias", kRequired);
  set_role(f, "k_bias", "self_attn.k_proj.bias", kRequired);
  set_role(f, "v_bias", "self_attn.v_proj.bias", kRequired);
  std::erase_if(f.layer_roles, [](const RoleName& r) { return r.role == "o_bias"; });
}

void qk_norm(FamilyDesc& f, QKNorm kind) {
  f.qk_norm = kind;
  set_role(f, "q_norm", "self_attn.q_norm.weight", kRequired);
  set_role(f, "k_norm", "self_attn.k_norm.weight", kRequired);
}

// Per-expert split tensors under mlp.experts.{e}.{gate,up,down}_proj with router mlp.gate.
void qwen_style_experts(FamilyDesc& f, const std::string& count_key, const std::string& width_key) {
  f.moe = true;
  f.expert_count_key = count_key;
  f.expert_width_key = width_key;
  f.routing = Routing::SoftmaxTopK;
  f.router = "mlp.gate.weight";
  f.expert_gate = "mlp.experts.{e}.gate_proj.weight";
  f.expert_up = "mlp.experts.{e}.up_proj.weight";
  f.expert_down = "mlp.experts.{e}.down_proj.weight";
  f.v5_experts = "mlp.experts.";
}

// Per-expert split tensors under block_sparse_moe.experts.{e}.{w1,w3,w2} (gate, up, down) with
// router block_sparse_moe.gate (mixtral, phimoe): num_local_experts of width intermediate_size.
void mixtral_style_experts(FamilyDesc& f, Routing routing) {
  f.moe = true;
  f.expert_count_key = "num_local_experts";
  f.expert_width_key = "intermediate_size";
  f.routing = routing;
  f.router = "block_sparse_moe.gate.weight";
  f.expert_gate = "block_sparse_moe.experts.{e}.w1.weight";
  f.expert_up = "block_sparse_moe.experts.{e}.w3.weight";
  f.expert_down = "block_sparse_moe.experts.{e}.w2.weight";
}

// The entry's GGUF architecture (GgufArch).
void gguf_arch(FamilyDesc& f, const char* arch, bool permute_qk, bool renormalizes, bool expert_width_key, bool shared_expert) {
  f.gguf = GgufArch{f.model_type, arch, permute_qk, renormalizes, expert_width_key, shared_expert};
}

// A dense family's GGUF architecture (GgufArch::dense).
void dense_gguf_arch(FamilyDesc& f, const char* arch, bool permute_qk) {
  gguf_arch(f, arch, permute_qk, false, false, false);
  f.gguf->dense = true;
}

// The shared expert's projections under `prefix` (per layer, e.g. "mlp.shared_expert").
void shared_mlp_names(FamilyDesc& f, const std::string& prefix) {
  f.shared_gate = prefix + ".gate_proj.weight";
  f.shared_up = prefix + ".up_proj.weight";
  f.shared_down = prefix + ".down_proj.weight";
}

// DeepSeek's MoE layout (deepseek_v2/v3, kimi_k2, glm4_moe): routed experts counted by
// n_routed_experts, shared experts mlp.shared_experts.* of n_shared_experts x the expert width,
// the first first_k_dense_replace layers dense.
void deepseek_style_moe(FamilyDesc& f) {
  qwen_style_experts(f, "n_routed_experts", "moe_intermediate_size");
  f.moe_layers = MoeLayerRule::FirstKDense;
  shared_mlp_names(f, "mlp.shared_experts");
  f.shared_count_key = "n_shared_experts";
}

// Experts fused on disk (granitemoe, gpt_oss): num_local_experts of width intermediate_size, the
// gate/up and down projections stacked in one tensor each, top-k of the router logits then a
// softmax over the k.
void fused_topk_experts(FamilyDesc& f, const std::string& router, const std::string& gate_up, const std::string& down) {
  f.moe = true;
  f.expert_count_key = "num_local_experts";
  f.expert_width_key = "intermediate_size";
  f.routing = Routing::TopKSoftmax;
  f.router = router;
  f.fused_gate_up = gate_up;
  f.fused_down = down;
}

std::vector<FamilyDesc> build_families() {
  std::vector<FamilyDesc> v;

  // Defaults below are those of transformers' configuration_<model_type>.py: rope_theta 10000
  // and rms_norm_eps 1e-6 unless said otherwise.
  {
    FamilyDesc f = llama_base("llama", "LlamaForCausalLM");
    f.forward = f.upcycle_source = true;
    dense_gguf_arch(f, "llama", true);
    f.gguf->rope_freqs = true;  // llama3 RoPE scaling as rope_freqs.weight (LlamaModel.generate_extra_tensors)
    v.push_back(f);
  }
  {
    FamilyDesc f = llama_base("mistral", "MistralForCausalLM");
    f.default_sliding_window = 4096;
    f.forward = f.upcycle_source = true;
    // convert_hf_to_gguf.py's LlamaModel (read back as llama: the file does not tell them apart).
    // A sliding window shorter than the context is refused: llama.cpp's llama graph has none.
    dense_gguf_arch(f, "llama", true);
    f.gguf->rope_freqs = true;
    v.push_back(f);
  }
  {
    FamilyDesc f = llama_base("qwen2", "Qwen2ForCausalLM");
    qkv_bias_always(f);
    f.forward = f.upcycle_source = true;
    dense_gguf_arch(f, "qwen2", false);  // Qwen2Model: NeoX RoPE, no q/k permutation
    f.gguf->yarn = true;                  // Qwen2.5's long-context yarn (rope.scaling.*)
    f.gguf->square_q = true;
    f.yarn_rope = true;
    v.push_back(f);
  }
  {
    FamilyDesc f = llama_base("qwen3", "Qwen3ForCausalLM");
    qk_norm(f, QKNorm::PerHead);
    f.default_head_dim = 128;
    f.forward = f.upcycle_source = true;
    dense_gguf_arch(f, "qwen3", false);  // Qwen3Model: NeoX RoPE, q/k RMS norms as attn_{q,k}_norm
    f.gguf->yarn = true;                  // Qwen3's long-context yarn (rope.scaling.*)
    f.gguf->no_attention_bias = true;
    f.yarn_rope = true;
    v.push_back(f);
  }
  {
    FamilyDesc f = llama_base("mixtral", "MixtralForCausalLM");
    mixtral_style_experts(f, Routing::SoftmaxTopK);
    f.norm_topk_default = true;
    f.norm_topk_forced = true;
    f.v5_experts = "mlp.experts.";
    f.v5_router = "mlp.gate.weight";
    f.default_rope_theta = 1e6;
    f.default_rms_norm_eps = 1e-5;
    f.forward = f.upcycle_target = true;
    gguf_arch(f, "llama", true, true, false, false);
    f.gguf->rope_freqs = true;  // llama.cpp's llama graph applies rope_freqs.weight with or without experts
    v.push_back(f);
  }
  {
    FamilyDesc f = llama_base("qwen2_moe", "Qwen2MoeForCausalLM");
    qkv_bias_always(f);
    qwen_style_experts(f, "num_experts", "moe_intermediate_size");
    f.moe_layers = MoeLayerRule::SparseStep;
    shared_mlp_names(f, "mlp.shared_expert");
    f.shared_expert_gate = "mlp.shared_expert_gate.weight";
    f.shared_width_key = "shared_expert_intermediate_size";
    f.forward = f.upcycle_target = true;
    gguf_arch(f, "qwen2moe", false, false, true, true);
    f.gguf->yarn = f.yarn_rope = true;
    f.gguf->square_q = true;
    v.push_back(f);
  }
  {
    FamilyDesc f = llama_base("qwen3_moe", "Qwen3MoeForCausalLM");
    qk_norm(f, QKNorm::PerHead);
    qwen_style_experts(f, "num_experts", "moe_intermediate_size");
    f.moe_layers = MoeLayerRule::SparseStep;
    f.forward = f.upcycle_target = true;
    gguf_arch(f, "qwen3moe", false, true, true, false);
    f.gguf->yarn = f.yarn_rope = true;  // Qwen3-MoE's long-context yarn
    f.gguf->no_attention_bias = true;
    v.push_back(f);
  }
  {
    FamilyDesc f = llama_base("olmoe", "OlmoeForCausalLM");
    qk_norm(f, QKNorm::Full);
    qwen_style_experts(f, "num_experts", "intermediate_size");
    f.default_rms_norm_eps = 1e-5;
    f.forward = true;
    gguf_arch(f, "olmoe", false, false, false, false);
    v.push_back(f);
  }
  for (const char* type : {"deepseek_v2", "deepseek_v3"}) {
    const bool v3 = std::string(type) == "deepseek_v3";
    FamilyDesc f = llama_base(type, v3 ? "DeepseekV3ForCausalLM" : "DeepseekV2ForCausalLM");
    f.attention = AttentionKind::MLA;
    // MLA: q is either one projection (q_lora_rank null) or a low-rank pair with a norm.
    f.layer_roles = {
        {"q_proj", "self_attn.q_proj.weight", kOptional},
        {"q_a_proj", "self_attn.q_a_proj.weight", kOptional},
        {"q_a_norm", "self_attn.q_a_layernorm.weight", kOptional},
        {"q_b_proj", "self_attn.q_b_proj.weight", kOptional},
        {"kv_a_proj", "self_attn.kv_a_proj_with_mqa.weight"},
        {"kv_a_norm", "self_attn.kv_a_layernorm.weight"},
        {"kv_b_proj", "self_attn.kv_b_proj.weight"},
        {"o_proj", "self_attn.o_proj.weight"},
        {"input_norm", "input_layernorm.weight"},
        {"post_attn_norm", "post_attention_layernorm.weight"},
    };
    deepseek_style_moe(f);
    f.routing = v3 ? Routing::DeepSeekV3 : Routing::DeepSeekV2;
    if (v3) f.router_bias = "mlp.gate.e_score_correction_bias";
    f.extra_layers_allowed = v3;  // multi-token-prediction layers follow the decoder layers
    f.forward = true;             // runtime/mla.h attention, routing.h DeepSeek routing
    // llama.cpp's deepseek2: interleaved (normal) RoPE on the qk_rope_head_dim part, as
    // transformers' v2 and v3 (rope_interleave) rotate it, so nothing is permuted; the routing
    // from the metadata (expert_gating_func softmax for v2, sigmoid for v3).
    gguf_arch(f, "deepseek2", false, false, true, true);
    f.gguf->routing_keys = f.gguf->leading_dense = f.gguf->shared_count = f.gguf->mla = true;
    v.push_back(f);
  }
  {
    // phimoe (Phi-3.5-MoE), as transformers' configuration_phimoe.py and modeling_phimoe.py define
    // it: nn.LayerNorm with bias (eps rms_norm_eps, default 1e-5) for both layer norms and the
    // final norm; attention with q/k/v/o biases iff attention_bias, head_dim = hidden_size /
    // num_attention_heads, the sliding window of its causal mask (sliding_window, default none);
    // sparsemixer top-2 routing as it runs in inference (router_jitter_noise, default 0.01); an
    // lm_head bias iff lm_head_bias; rope_theta 1e6.
    FamilyDesc f = llama_base("phimoe", "PhiMoEForCausalLM");
    mixtral_style_experts(f, Routing::SparseMixer);
    f.layer_norm = true;
    set_role(f, "input_norm_bias", "input_layernorm.bias", kRequired);
    set_role(f, "post_attn_norm_bias", "post_attention_layernorm.bias", kRequired);
    f.globals.push_back({"final_norm_bias", "model.norm.bias"});
    f.globals.push_back({"lm_head_bias", "lm_head.bias", if_config("lm_head_bias", false)});
    f.head_dim_from_hidden = true;
    f.longrope_rope = true;
    f.default_rope_theta = 1e6;
    f.default_rms_norm_eps = 1e-5;
    f.forward = true;
    // llama.cpp's phimoe (the phi3 graph): NeoX RoPE (nothing permuted), softmax -> top-2 ->
    // renormalized, the expert width as feed_forward_length; GgufArch::centre_residual makes its
    // RMS norm + bias compute the LayerNorm; the routing differs (sparsemixer_differs).
    gguf_arch(f, "phimoe", false, true, false, false);
    f.gguf->centre_residual = f.gguf->sparsemixer_differs = f.gguf->longrope = true;
    // Its loader requires output.weight; tied embeddings are written twice, output uncentred.
    f.gguf->output_required = true;
    v.push_back(f);
  }
  {
    // granitemoe, as transformers' configuration_granitemoe.py and modeling_granitemoe.py define
    // it: llama attention with q/k/v/o biases iff attention_bias (default false), head_dim =
    // hidden_size / num_attention_heads; GraniteMoeTopKGating (router.layer [E,H], no bias: top-k
    // of the logits, softmax over the k); GraniteMoeParallelExperts input_linear [E,2I,H] whose
    // first half is activated (silu(first) * second, chunk(2, dim=-1)) and output_linear [E,H,I];
    // the scalar multipliers (scalar_multipliers). rope_theta 10000, rms_norm_eps 1e-6.
    FamilyDesc f = llama_base("granitemoe", "GraniteMoeForCausalLM");
    fused_topk_experts(f, "block_sparse_moe.router.layer.weight", "block_sparse_moe.input_linear.weight",
                       "block_sparse_moe.output_linear.weight");
    f.scalar_multipliers = true;
    f.head_dim_from_hidden = true;
    f.forward = true;
    // llama.cpp's granitemoe: LlamaModel's q/k permutation (interleaved RoPE), softmax over all
    // experts then the top-k renormalized (= the softmax over the k logits), the expert width as
    // feed_forward_length.
    gguf_arch(f, "granitemoe", true, true, false, false);
    v.push_back(f);
  }
  {
    // kimi_k2 (Kimi-K2's released config): the deepseek_v3 layout and architecture under another
    // model_type. Last in the table, so the supported list other messages quote keeps its order.
    auto v3 = std::find_if(v.begin(), v.end(), [](const FamilyDesc& f) { return f.model_type == "deepseek_v3"; });
    FamilyDesc f = *v3;
    f.model_type = "kimi_k2";
    f.gguf->model_type = "kimi_k2";  // exported as deepseek2, read back as deepseek_v3 (the file does not tell them apart)
    v.push_back(f);
  }
  {
    // glm4_moe (GLM-4.5 / 4.6; after kimi_k2 for the same reason), as transformers' configuration_glm4_moe.py and
    // modeling_glm4_moe.py define it: standard GQA attention with q/k/v biases iff attention_bias
    // (o_proj never has one), per-head q/k RMSNorm iff use_qk_norm, partial rotary (default 0.5),
    // Glm4MoeTopkRouter = DeepSeek-V3 routing (sigmoid, e_score_correction_bias for the choice,
    // n_group/topk_group, norm_topk_prob default true, routed_scaling_factor), shared experts of
    // width n_shared_experts x moe_intermediate_size, the first first_k_dense_replace layers dense
    // (intermediate_size), num_nextn_predict_layers MTP layers after the decoder layers.
    FamilyDesc f = llama_base("glm4_moe", "Glm4MoeForCausalLM");
    std::erase_if(f.layer_roles, [](const RoleName& r) { return r.role == "o_bias"; });
    f.qk_norm = QKNorm::PerHead;
    f.qk_norm_key = "use_qk_norm";
    set_role(f, "q_norm", "self_attn.q_norm.weight", if_config("use_qk_norm", false));
    set_role(f, "k_norm", "self_attn.k_norm.weight", if_config("use_qk_norm", false));
    f.partial_rotary = true;
    f.default_partial_rotary_factor = 0.5;
    f.default_rms_norm_eps = 1e-5;
    deepseek_style_moe(f);
    f.routing = Routing::DeepSeekV3;
    f.norm_topk_default = true;
    f.router_bias = "mlp.gate.e_score_correction_bias";
    f.default_shared_count = 1;
    f.extra_layers_allowed = true;
    f.forward = true;
    // llama.cpp's glm4moe: NeoX RoPE (no q/k permutation) on rope.dimension_count elements.
    gguf_arch(f, "glm4moe", false, true, true, true);
    f.gguf->routing_keys = f.gguf->leading_dense = f.gguf->shared_count = f.gguf->post_attention_norm = true;
    v.push_back(f);
  }
  {
    // gpt_oss (gpt-oss-20b / 120b, after glm4_moe), as transformers' configuration_gpt_oss.py and
    // modeling_gpt_oss.py define it: attention with q/k/v/o biases (attention_bias, default true),
    // GQA, per-head sinks (self_attn.sinks [heads], an extra softmax logit dropped after), layer_types
    // alternating sliding_attention (sliding_window, default 128) and full_attention, yarn RoPE
    // (default factor 32, original 4096, truncate false), RMSNorm eps 1e-5; GptOssTopKRouter
    // (mlp.router.weight [E,H] + mlp.router.bias [E] added to the logits, top-k of the logits, softmax
    // over the k); GptOssExperts stored fused as [in, out] with gate/up interleaved and expert biases;
    // the clamped SwiGLU (swiglu_alpha 1.702, swiglu_limit 7.0).
    FamilyDesc f = llama_base("gpt_oss", "GptOssForCausalLM");
    for (const char* r : {"q_bias", "k_bias", "v_bias", "o_bias"})
      for (auto& role : f.layer_roles)
        if (role.role == r) role.presence = if_config("attention_bias", true);
    set_role(f, "sinks", "self_attn.sinks", kRequired);
    fused_topk_experts(f, "mlp.router.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj");
    f.router_bias = "mlp.router.bias";
    f.router_bias_in_logits = true;
    f.fused_gate_up_bias = "mlp.experts.gate_up_proj_bias";
    f.fused_down_bias = "mlp.experts.down_proj_bias";
    f.fused_in_out_interleaved = true;
    f.clamped_swiglu = true;
    f.attention_sinks = true;
    f.per_layer_types = true;
    f.yarn_rope = true;
    f.default_rope_theta = 150000.0;
    f.default_rms_norm_eps = 1e-5;
    f.default_head_dim = 64;
    f.default_sliding_window = 128;
    f.default_rope_parameters = {{"rope_type", "yarn"}, {"factor", 32.0}, {"beta_fast", 32.0}, {"beta_slow", 1.0},
                                 {"truncate", false}, {"original_max_position_embeddings", 4096}};
    f.forward = true;
    // llama.cpp's gpt-oss (LLM_ARCH_OPENAI_MOE, convert_hf_to_gguf.py GptOssModel): no q/k
    // permutation, softmax over the top-k biased logits (the weights sum to 1), the expert width as
    // expert_feed_forward_length, post_attention_norm, every other layer sliding.
    gguf_arch(f, "gpt-oss", false, true, true, false);
    f.gguf->post_attention_norm = true;
    f.gguf->gate_inp_bias = f.gguf->expert_biases = f.gguf->output_required = f.gguf->swiglu_oai = true;
    f.gguf->swa_pattern = 2;
    f.gguf->yarn = true;
    v.push_back(f);
  }
  {
    // ernie4_5_moe (ERNIE-4.5-21B-A3B / 300B-A47B "-PT"), as transformers' configuration_ernie4_5_moe.py
    // and modeling_ernie4_5_moe.py define it: llama attention (GQA, head_dim key or hidden_size /
    // num_attention_heads), RoPE on interleaved pairs (rope_theta 500000), RMSNorm eps 1e-5;
    // Ernie4_5_MoeSparseMoeBlock: softmax over mlp.gate (f32), mlp.moe_statics.e_score_correction_bias
    // [1,E] added for the choice only, top-k (moe_k), weights renormalised by max(sum, moe_norm_min);
    // shared experts of moe_num_shared_experts x moe_intermediate_size (default 2) added unweighted;
    // MoE layers by moe_layer_start_index / moe_layer_end_index / moe_layer_interval, the others dense
    // (intermediate_size); tie_word_embeddings default true. use_bias (biases on every projection)
    // is refused on load.
    FamilyDesc f = llama_base("ernie4_5_moe", "Ernie4_5_MoeForCausalLM");
    for (const char* r : {"q_bias", "k_bias", "v_bias", "o_bias"})
      for (auto& role : f.layer_roles)
        if (role.role == r) role.presence = if_config("use_bias", false);
    for (auto& g : f.globals)
      if (g.role == "lm_head") g.presence = unless_config("tie_word_embeddings", true);
    qwen_style_experts(f, "moe_num_experts", "moe_intermediate_size");
    f.topk_key = "moe_k";
    f.routing = Routing::SoftmaxBiasTopK;
    f.router_bias = "mlp.moe_statics.e_score_correction_bias";
    f.router_bias_row = true;
    f.moe_layers = MoeLayerRule::StartEndInterval;
    shared_mlp_names(f, "mlp.shared_experts");
    f.shared_count_key = "moe_num_shared_experts";
    f.default_shared_count = 2;
    f.rope_interleaved = true;
    f.default_rope_theta = 500000.0;
    f.default_rms_norm_eps = 1e-5;
    f.default_tie_word_embeddings = true;
    f.refused_true_key = "use_bias";
    // transformers v4's Ernie4_5_MoeMLP puts the biases on the routed experts too; v5's
    // Ernie4_5_MoeExperts (MixtralExperts) has none: the two disagree (the configuration's default is false).
    f.refused_true_what = "biases on every projection; transformers v4 gives the routed experts biases, v5 does not";
    f.forward = true;
    // llama.cpp's ernie4_5-moe: RoPE on adjacent pairs (LLAMA_ROPE_TYPE_NORM) as ours, so q/k rows
    // are not permuted (convert_hf_to_gguf.py's Ernie4_5Model does not); the softmax top-k weights
    // renormalized; leading dense layers; shared experts sized by expert_shared_feed_forward_length.
    gguf_arch(f, "ernie4_5-moe", false, true, true, true);
    f.gguf->leading_dense = f.gguf->choice_bias = true;
    v.push_back(f);
  }
  {
    // qwen3_next (Qwen3-Next-80B-A3B, after gpt_oss), as transformers' configuration_qwen3_next.py and
    // modeling_qwen3_next.py define it: layer_types (else full_attention_interval, default 4: every
    // 4th layer full) of "linear_attention" layers (Qwen3NextGatedDeltaNet) and "full_attention"
    // layers (Qwen3NextAttention: q_proj gives query and gate per head, per-head q/k norms, partial
    // rotary default 0.25, output x sigmoid(gate)); zero-centred RMSNorm x (1 + weight); the
    // qwen2_moe MoE block (softmax top-k, norm_topk_prob default true, shared expert with a sigmoid
    // gate), decoder_sparse_step / mlp_only_layers. head_dim default 256. mtp.* tensors (the
    // multi-token-prediction head) are ignored as transformers ignores them (family/hybrid_layers.h).
    FamilyDesc f = llama_base("qwen3_next", "Qwen3NextForCausalLM");
    qk_norm(f, QKNorm::PerHead);
    for (auto& r : f.layer_roles)
      if (r.role != "input_norm" && r.role != "post_attn_norm") r.presence = kOptional;  // per kind: hybrid_layers.h
    for (const auto& [role, name] : std::vector<std::pair<std::string, std::string>>{
             {"in_proj_qkvz", "linear_attn.in_proj_qkvz.weight"},
             {"in_proj_ba", "linear_attn.in_proj_ba.weight"},
             {"conv1d", "linear_attn.conv1d.weight"},
             {"dt_bias", "linear_attn.dt_bias"},
             {"A_log", "linear_attn.A_log"},
             {"linear_norm", "linear_attn.norm.weight"},
             {"out_proj", "linear_attn.out_proj.weight"}})
      set_role(f, role, name, kOptional);
    qwen_style_experts(f, "num_experts", "moe_intermediate_size");
    f.moe_layers = MoeLayerRule::SparseStep;
    f.norm_topk_default = true;
    shared_mlp_names(f, "mlp.shared_expert");
    f.shared_expert_gate = "mlp.shared_expert_gate.weight";
    f.shared_width_key = "shared_expert_intermediate_size";
    f.partial_rotary = true;
    f.default_partial_rotary_factor = 0.25;
    f.default_head_dim = 256;
    f.zero_centred_norm = true;
    f.hybrid_linear_attention = true;
    f.forward = true;
    // llama.cpp's qwen3next: NeoX RoPE (no q/k permutation), softmax top-k renormalized, expert and
    // shared-expert widths as expert_(shared_)feed_forward_length, the post-attention norm as
    // post_attention_norm; the DeltaNet as ssm_* (io/gguf_names.h), the zero-centred norms stored as
    // 1 + w and A_log as -exp(A_log) (gguf_value_map).
    gguf_arch(f, "qwen3next", false, true, true, true);
    f.gguf->post_attention_norm = true;
    v.push_back(f);
  }
  {
    // llama4_text (Llama4ForCausalLM; after gpt_oss), as transformers' configuration_llama4.py and
    // modeling_llama4.py define it: llama attention (biases iff attention_bias) with the llama4
    // features (llama4_attention); Llama4TextMoe on the moe_layers (default every
    // interleave_moe_layer_step-th): Llama4Router feed_forward.router [E,H] (top-k of the logits,
    // sigmoid of each, the score multiplying the expert's input), Llama4TextExperts fused
    // gate_up_proj [E,H,2I] / down_proj [E,I,H] (fused_in_out_chunked), the shared expert
    // (intermediate_size) added; the other layers a dense MLP of intermediate_size_mlp.
    // rope_theta 500000, rms_norm_eps 1e-5, head_dim 128.
    FamilyDesc f = llama_base("llama4_text", "Llama4ForCausalLM");
    fused_topk_experts(f, "feed_forward.router.weight", "feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj");
    f.routing = Routing::TopKSigmoid;
    f.fused_in_out_chunked = true;
    f.moe_layers = MoeLayerRule::Interleave;
    shared_mlp_names(f, "feed_forward.shared_expert");
    f.shared_width_key = "intermediate_size";
    f.dense_gate = "feed_forward.gate_proj.weight";
    f.dense_up = "feed_forward.up_proj.weight";
    f.dense_down = "feed_forward.down_proj.weight";
    f.dense_width_key = "intermediate_size_mlp";
    f.llama4_attention = true;
    f.default_rope_theta = 500000.0;
    f.default_rms_norm_eps = 1e-5;
    f.default_head_dim = 128;
    f.forward = true;
    // llama.cpp's llama4 (convert_hf_to_gguf.py's Llama4Model, a LlamaModel with undo_permute
    // False): RoPE on adjacent pairs as ours, so no q/k permutation; no renormalization (sigmoid
    // weights, build_moe_ffn norm_w false); expert_feed_forward_length the expert and shared width,
    // feed_forward_length the dense layers' (intermediate_size_mlp).
    gguf_arch(f, "llama4", false, false, true, true);
    f.gguf->interleaved_dense = f.gguf->rope_freqs = f.gguf->llama4_graph = true;
    v.push_back(f);
    // llama4 (Llama4ForConditionalGeneration: every released Llama-4 checkpoint), as transformers'
    // modeling_llama4.py holds it: vision_model, multi_modal_projector and language_model (the
    // Llama4ForCausalLM above), no conversion mapping; the text model read and run as llama4_text.
    f.model_type = "llama4";
    f.architectures = {"Llama4ForConditionalGeneration"};
    f.text_model_type = "llama4_text";
    f.layer_prefix = "language_model." + f.layer_prefix;
    for (auto& g : f.globals) g.name = "language_model." + g.name;
    v.push_back(f);
  }
  return v;
}

}  // namespace

const std::vector<FamilyDesc>& all_families() {
  static const std::vector<FamilyDesc> families = build_families();
  return families;
}

std::string supported_families() {
  std::string s;
  for (const auto& f : all_families()) {
    if (!s.empty()) s += ", ";
    s += f.model_type;
  }
  return s;
}

std::vector<std::string> families_with(bool FamilyDesc::*flag) {
  std::vector<std::string> v;
  for (const auto& f : all_families())
    if (f.*flag) v.push_back(f.model_type);
  return v;
}

std::string family_list(bool FamilyDesc::*flag) {
  std::string s;
  for (const auto& t : families_with(flag)) s += (s.empty() ? "" : ", ") + t;
  return s;
}

const FamilyDesc* v5_fused_variant(const FamilyDesc& f) {
  static const std::vector<FamilyDesc> variants = [] {
    std::vector<FamilyDesc> v;
    for (FamilyDesc x : all_families()) {
      if (x.v5_experts.empty()) continue;
      x.fused_gate_up = x.v5_experts + "gate_up_proj";
      x.fused_down = x.v5_experts + "down_proj";
      if (!x.v5_router.empty()) x.router = x.v5_router;
      x.v5_layout = true;
      v.push_back(std::move(x));
    }
    return v;
  }();
  if (f.v5_layout) return &f;
  for (const auto& v : variants)
    if (v.model_type == f.model_type) return &v;
  return nullptr;
}

const FamilyDesc& per_expert_layout(const FamilyDesc& f) {
  if (!f.v5_layout) return f;
  for (const auto& x : all_families())
    if (x.model_type == f.model_type) return x;
  throw Error::internal("per_expert_layout: no table entry for " + f.model_type);
}

const FamilyDesc& family_for(const Config& config) {
  const std::string type = config.get_string_or("model_type", "");
  for (const auto& f : all_families())
    if (f.model_type == type) return f;
  std::string arch = config.has("architectures") ? config.json().at("architectures").dump() : "(none)";
  if (type.empty())
    throw Error::unsupported(config.source() + ": model_type: missing (architectures " + arch +
                             "); supported: " + supported_families());
  throw Error::unsupported(config.source() + ": model_type: unknown family '" + type + "' (architectures " + arch +
                           "); supported: " + supported_families());
}

}  // namespace moe::model
