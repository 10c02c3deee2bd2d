// Family table, config accessors and template expansion.
#include <gtest/gtest.h>

#include <set>

#include "family/config.h"
#include "family/family.h"
#include "support/expect_error.h"

namespace moe::model {
namespace {

using core::ErrorKind;
using nlohmann::json;
using test::expect_error;

TEST(Family, FamiliesWithTheirArchitectures) {
  const std::map<std::string, std::string> expected = {
      {"llama", "LlamaForCausalLM"},          {"mistral", "MistralForCausalLM"},
      {"qwen2", "Qwen2ForCausalLM"},          {"qwen3", "Qwen3ForCausalLM"},
      {"mixtral", "MixtralForCausalLM"},      {"qwen2_moe", "Qwen2MoeForCausalLM"},
      {"qwen3_moe", "Qwen3MoeForCausalLM"},   {"olmoe", "OlmoeForCausalLM"},
      {"deepseek_v2", "DeepseekV2ForCausalLM"}, {"deepseek_v3", "DeepseekV3ForCausalLM"},
      {"phimoe", "PhiMoEForCausalLM"},        {"granitemoe", "GraniteMoeForCausalLM"},
      {"kimi_k2", "DeepseekV3ForCausalLM"},  // Kimi-K2: the deepseek_v3 layout
      {"glm4_moe", "Glm4MoeForCausalLM"},     {"gpt_oss", "GptOssForCausalLM"},
      {"ernie4_5_moe", "Ernie4_5_MoeForCausalLM"},
      {"qwen3_next", "Qwen3NextForCausalLM"},
      {"llama4_text", "Llama4ForCausalLM"},
      {"llama4", "Llama4ForConditionalGeneration"},  // the multimodal wrapper, read as its text model
  };
  std::map<std::string, std::string> got;
  for (const auto& f : all_families()) {
    ASSERT_EQ(f.architectures.size(), 1u) << f.model_type;
    got[f.model_type] = f.architectures[0];
  }
  EXPECT_EQ(got, expected);
  for (const auto& [type, arch] : expected) EXPECT_NE(supported_families().find(type), std::string::npos) << type;
}

TEST(Family, MoeKeysAndNames) {
  struct Row {
    const char* type;
    const char* count;
    const char* width;
    const char* router;
    Routing routing;
  };
  const Row rows[] = {
      {"mixtral", "num_local_experts", "intermediate_size", "block_sparse_moe.gate.weight", Routing::SoftmaxTopK},
      {"qwen2_moe", "num_experts", "moe_intermediate_size", "mlp.gate.weight", Routing::SoftmaxTopK},
      {"qwen3_moe", "num_experts", "moe_intermediate_size", "mlp.gate.weight", Routing::SoftmaxTopK},
      {"olmoe", "num_experts", "intermediate_size", "mlp.gate.weight", Routing::SoftmaxTopK},
      {"deepseek_v2", "n_routed_experts", "moe_intermediate_size", "mlp.gate.weight", Routing::DeepSeekV2},
      {"deepseek_v3", "n_routed_experts", "moe_intermediate_size", "mlp.gate.weight", Routing::DeepSeekV3},
      {"kimi_k2", "n_routed_experts", "moe_intermediate_size", "mlp.gate.weight", Routing::DeepSeekV3},
      {"glm4_moe", "n_routed_experts", "moe_intermediate_size", "mlp.gate.weight", Routing::DeepSeekV3},
      {"phimoe", "num_local_experts", "intermediate_size", "block_sparse_moe.gate.weight", Routing::SparseMixer},
      {"granitemoe", "num_local_experts", "intermediate_size", "block_sparse_moe.router.layer.weight", Routing::TopKSoftmax},
      {"gpt_oss", "num_local_experts", "intermediate_size", "mlp.router.weight", Routing::TopKSoftmax},
      {"qwen3_next", "num_experts", "moe_intermediate_size", "mlp.gate.weight", Routing::SoftmaxTopK},
      {"llama4_text", "num_local_experts", "intermediate_size", "feed_forward.router.weight", Routing::TopKSigmoid},
  };
  for (const auto& r : rows) {
    SCOPED_TRACE(r.type);
    const auto& f = family_for(Config(json{{"model_type", r.type}}, "config.json"));
    EXPECT_TRUE(f.moe);
    EXPECT_EQ(f.expert_count_key, r.count);
    EXPECT_EQ(f.expert_width_key, r.width);
    EXPECT_EQ(f.router, r.router);
    EXPECT_EQ(f.routing, r.routing);
    EXPECT_EQ(f.topk_key, "num_experts_per_tok");
  }
  for (const char* dense : {"llama", "mistral", "qwen2", "qwen3"}) {
    const auto& f = family_for(Config(json{{"model_type", dense}}, "config.json"));
    EXPECT_FALSE(f.moe) << dense;
    EXPECT_EQ(f.routing, Routing::None);
  }
  const auto& mixtral = family_for(Config(json{{"model_type", "mixtral"}}, "c"));
  EXPECT_EQ(mixtral.expert_gate, "block_sparse_moe.experts.{e}.w1.weight");
  EXPECT_EQ(mixtral.expert_up, "block_sparse_moe.experts.{e}.w3.weight");
  EXPECT_EQ(mixtral.expert_down, "block_sparse_moe.experts.{e}.w2.weight");
  const auto& granite = family_for(Config(json{{"model_type", "granitemoe"}}, "c"));
  EXPECT_TRUE(granite.fused());
  EXPECT_EQ(granite.fused_gate_up, "block_sparse_moe.input_linear.weight");
  EXPECT_EQ(granite.fused_down, "block_sparse_moe.output_linear.weight");
  // gpt_oss: fused [in, out] with gate/up interleaved and expert biases, a router bias in the logits.
  const auto& oss = family_for(Config(json{{"model_type", "gpt_oss"}}, "c"));
  EXPECT_TRUE(oss.fused() && oss.fused_in_out_interleaved && oss.router_bias_in_logits && oss.clamped_swiglu);
  EXPECT_EQ(oss.fused_gate_up, "mlp.experts.gate_up_proj");
  EXPECT_EQ(oss.fused_gate_up_bias, "mlp.experts.gate_up_proj_bias");
  EXPECT_EQ(oss.fused_down, "mlp.experts.down_proj");
  EXPECT_EQ(oss.fused_down_bias, "mlp.experts.down_proj_bias");
  EXPECT_EQ(oss.router_bias, "mlp.router.bias");
  // llama4_text: fused [in, out] with gate/up as the two halves, no biases; a shared expert; dense
  // layers of intermediate_size_mlp under feed_forward.
  const auto& l4 = family_for(Config(json{{"model_type", "llama4_text"}}, "c"));
  EXPECT_TRUE(l4.fused() && l4.fused_in_out_chunked && !l4.fused_in_out_interleaved && l4.llama4_attention);
  EXPECT_EQ(l4.fused_gate_up, "feed_forward.experts.gate_up_proj");
  EXPECT_EQ(l4.fused_down, "feed_forward.experts.down_proj");
  EXPECT_TRUE(l4.fused_gate_up_bias.empty());
  EXPECT_EQ(l4.shared_gate, "feed_forward.shared_expert.gate_proj.weight");
  EXPECT_EQ(l4.dense_down, "feed_forward.down_proj.weight");
  EXPECT_EQ(l4.dense_width_key, "intermediate_size_mlp");
  EXPECT_EQ(l4.moe_layers, MoeLayerRule::Interleave);
  // llama4 (Llama4ForConditionalGeneration): the same text model under language_model.
  const auto& mm = family_for(Config(json{{"model_type", "llama4"}}, "c"));
  EXPECT_EQ(mm.text_model_type, "llama4_text");
  EXPECT_TRUE(l4.text_model_type.empty());
  EXPECT_EQ(mm.layer_prefix, "language_model.model.layers.{l}.");
  EXPECT_EQ(mm.globals.at(0).name, "language_model.model.embed_tokens.weight");
  EXPECT_EQ(mm.globals.at(1).name, "language_model.model.norm.weight");
  EXPECT_EQ(mm.globals.at(2).name, "language_model.lm_head.weight");
  EXPECT_EQ(mm.fused_gate_up, l4.fused_gate_up);
  EXPECT_EQ(mm.routing, l4.routing);
  const auto& v3 = family_for(Config(json{{"model_type", "deepseek_v3"}}, "c"));
  EXPECT_EQ(v3.router_bias, "mlp.gate.e_score_correction_bias");
  EXPECT_EQ(v3.shared_gate, "mlp.shared_experts.gate_proj.weight");
  EXPECT_EQ(v3.attention, AttentionKind::MLA);
  EXPECT_TRUE(v3.extra_layers_allowed);
  EXPECT_FALSE(family_for(Config(json{{"model_type", "deepseek_v2"}}, "c")).extra_layers_allowed);
  EXPECT_EQ(family_for(Config(json{{"model_type", "olmoe"}}, "c")).qk_norm, QKNorm::Full);
  EXPECT_EQ(family_for(Config(json{{"model_type", "qwen3"}}, "c")).qk_norm, QKNorm::PerHead);
  EXPECT_TRUE(family_for(Config(json{{"model_type", "phimoe"}}, "c")).layer_norm);
  // ernie4_5_moe: its own count / width / top-k keys, the correction bias under mlp.moe_statics.
  const auto& ernie = family_for(Config(json{{"model_type", "ernie4_5_moe"}}, "c"));
  EXPECT_EQ(ernie.expert_count_key, "moe_num_experts");
  EXPECT_EQ(ernie.expert_width_key, "moe_intermediate_size");
  EXPECT_EQ(ernie.topk_key, "moe_k");
  EXPECT_EQ(ernie.routing, Routing::SoftmaxBiasTopK);
  EXPECT_EQ(ernie.router, "mlp.gate.weight");
  EXPECT_EQ(ernie.router_bias, "mlp.moe_statics.e_score_correction_bias");
  EXPECT_EQ(ernie.expert_gate, "mlp.experts.{e}.gate_proj.weight");
  EXPECT_EQ(ernie.shared_gate, "mlp.shared_experts.gate_proj.weight");
  EXPECT_EQ(ernie.shared_count_key, "moe_num_shared_experts");
  EXPECT_EQ(ernie.moe_layers, MoeLayerRule::StartEndInterval);
  EXPECT_TRUE(ernie.rope_interleaved && ernie.router_bias_row && ernie.default_tie_word_embeddings);
  // qwen3_next: hybrid layers, zero-centred norms, qwen2_moe's shared expert with its gate.
  const auto& next = family_for(Config(json{{"model_type", "qwen3_next"}}, "c"));
  EXPECT_TRUE(next.hybrid_linear_attention && next.zero_centred_norm && next.norm_topk_default);
  EXPECT_EQ(next.shared_expert_gate, "mlp.shared_expert_gate.weight");
  EXPECT_EQ(next.shared_width_key, "shared_expert_intermediate_size");
  EXPECT_EQ(next.moe_layers, MoeLayerRule::SparseStep);
}

TEST(Family, UnknownOrMissingModelType) {
  const std::string msg = expect_error(
      [] { family_for(Config(json{{"model_type", "made_up_moe"}, {"architectures", {"MadeUpMoeForCausalLM"}}}, "m/config.json")); },
      ErrorKind::NotSupported,
      {"m/config.json: model_type: unknown family 'made_up_moe'", "MadeUpMoeForCausalLM", "supported: "});
  for (const auto& f : all_families()) EXPECT_NE(msg.find(f.model_type), std::string::npos) << f.model_type;
  expect_error([] { family_for(Config(json::object(), "config.json")); }, ErrorKind::NotSupported,
               {"model_type: missing", "(architectures (none))", "supported: "});
  expect_error([] { family_for(Config(json{{"model_type", 3}}, "config.json")); }, ErrorKind::Corruption,
               {"config.json: model_type: expected a string, found 3"});
}

TEST(Family, Expand) {
  EXPECT_EQ(expand("model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight", 12, 7),
            "model.layers.12.block_sparse_moe.experts.7.w1.weight");
  EXPECT_EQ(expand("model.layers.{l}.", 0), "model.layers.0.");
  EXPECT_EQ(expand("{l}{e}{l}", 1, 2), "121");
  EXPECT_EQ(expand("no templates {x}", 1, 2), "no templates {x}");
  EXPECT_EQ(expand("", 1, 2), "");
}

TEST(Config, TypedAccessors) {
  Config c(json{{"a", 5}, {"z", 0}, {"neg", -1}, {"s", "8"}, {"f", 1.5}, {"b", true}, {"l", {1, 2}}, {"n", nullptr},
                {"bad_l", {1, "x"}}},
           "dir/config.json");
  EXPECT_EQ(c.get_int("a"), 5);
  expect_error([&] { c.get_int("missing"); }, ErrorKind::Corruption, {"dir/config.json: missing: missing (required)"});
  expect_error([&] { c.get_int("n"); }, ErrorKind::Corruption, {"n: missing (required)"});
  expect_error([&] { c.get_int("z"); }, ErrorKind::Corruption, {"dir/config.json: z: expected a positive integer, found 0"});
  expect_error([&] { c.get_int("s"); }, ErrorKind::Corruption, {"s: expected a positive integer, found \"8\""});
  expect_error([&] { c.get_int("f"); }, ErrorKind::Corruption, {"f: expected a positive integer, found 1.5"});
  EXPECT_EQ(c.get_int_or("z", 7), 0);
  EXPECT_EQ(c.get_int_or("missing", 7), 7);
  EXPECT_EQ(c.get_int_or("n", 7), 7);
  expect_error([&] { c.get_int_or("z", 7, false); }, ErrorKind::Corruption, {"z: expected a positive integer"});
  expect_error([&] { c.get_int_or("neg", 7); }, ErrorKind::Corruption, {"neg: expected a non-negative integer, found -1"});
  EXPECT_EQ(c.get_double_or("f", 0), 1.5);
  EXPECT_EQ(c.get_double_or("a", 0), 5.0);
  expect_error([&] { c.get_double_or("s", 0); }, ErrorKind::Corruption, {"s: expected a number"});
  EXPECT_TRUE(c.get_bool_or("b", false));
  EXPECT_FALSE(c.get_bool_or("missing", false));
  expect_error([&] { c.get_bool_or("a", false); }, ErrorKind::Corruption, {"a: expected true or false, found 5"});
  EXPECT_EQ(c.get_string_or("s", ""), "8");
  expect_error([&] { c.get_string_or("a", ""); }, ErrorKind::Corruption, {"a: expected a string"});
  EXPECT_EQ(c.get_int_list_or("l", {}), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(c.get_int_list_or("missing", {9}), (std::vector<int64_t>{9}));
  expect_error([&] { c.get_int_list_or("bad_l", {}); }, ErrorKind::Corruption, {"bad_l: expected a list of integers"});
  expect_error([&] { c.get_int_list_or("a", {}); }, ErrorKind::Corruption, {"a: expected a list of integers"});
  Config limits(json{{"max", 2147483647}, {"over", 2147483648LL}, {"u", 18446744073709551615ULL}}, "c");
  EXPECT_EQ(limits.get_int("max"), 2147483647);
  EXPECT_EQ(limits.get_int_or("max", 1), 2147483647);
  expect_error([&] { limits.get_int("over"); }, ErrorKind::Corruption, {"over: expected at most 2147483647, found 2147483648"});
  expect_error([&] { limits.get_int_or("over", 1); }, ErrorKind::Corruption, {"over: expected at most 2147483647"});
  expect_error([&] { limits.get_int("u"); }, ErrorKind::Corruption, {"u: expected a positive integer, found 18446744073709551615"});
  // Long values are shortened in messages.
  Config big(json{{"k", std::string(200, 'x')}}, "c");
  const std::string m = expect_error([&] { big.get_int("k"); }, ErrorKind::Corruption, {"..."});
  EXPECT_LT(m.size(), 120u);
}

TEST(Family, PresenceRules) {
  Config tied(json{{"tie_word_embeddings", true}, {"attention_bias", true}}, "c");
  Config untied(json{{"tie_word_embeddings", false}}, "c");
  Config none(json::object(), "c");
  EXPECT_TRUE(kRequired.required(none));
  EXPECT_FALSE(kOptional.required(none));
  EXPECT_FALSE(unless_config("tie_word_embeddings", false).required(tied));
  EXPECT_TRUE(unless_config("tie_word_embeddings", false).required(untied));
  EXPECT_TRUE(unless_config("tie_word_embeddings", false).required(none));
  EXPECT_TRUE(if_config("attention_bias", false).required(tied));
  EXPECT_FALSE(if_config("attention_bias", false).required(none));
}

}  // namespace
}  // namespace moe::model

namespace moe::model {
namespace {

// glm4_moe as configuration_glm4_moe.py / modeling_glm4_moe.py define it: q/k/v biases iff
// attention_bias and no o_proj bias; q/k norms iff use_qk_norm; partial rotary 0.5 by default;
// DeepSeek-V3 routing with the correction bias; shared experts counted by n_shared_experts
// (default 1); first_k_dense_replace dense layers; MTP layers allowed past the decoder layers.
TEST(Family, Glm4MoeRow) {
  const auto& f = family_for(Config(json{{"model_type", "glm4_moe"}}, "c"));
  auto role = [&](const std::string& r) -> const RoleName* {
    for (const auto& x : f.layer_roles)
      if (x.role == r) return &x;
    return nullptr;
  };
  ASSERT_TRUE(role("q_bias") && role("q_norm") && role("k_norm"));
  EXPECT_EQ(role("o_bias"), nullptr);
  const Config with(json{{"attention_bias", true}, {"use_qk_norm", true}}, "c"), without(json::object(), "c");
  EXPECT_TRUE(role("q_bias")->presence.required(with));
  EXPECT_FALSE(role("q_bias")->presence.required(without));
  EXPECT_TRUE(role("k_norm")->presence.required(with));
  EXPECT_FALSE(role("k_norm")->presence.required(without));
  EXPECT_EQ(role("q_norm")->name, "self_attn.q_norm.weight");
  EXPECT_EQ(f.qk_norm, QKNorm::PerHead);
  EXPECT_EQ(f.qk_norm_key, "use_qk_norm");
  EXPECT_TRUE(f.partial_rotary);
  EXPECT_EQ(f.default_partial_rotary_factor, 0.5);
  EXPECT_EQ(f.default_rms_norm_eps, 1e-5);
  EXPECT_TRUE(f.norm_topk_default);
  EXPECT_EQ(f.router_bias, "mlp.gate.e_score_correction_bias");
  EXPECT_EQ(f.shared_gate, "mlp.shared_experts.gate_proj.weight");
  EXPECT_EQ(f.shared_count_key, "n_shared_experts");
  EXPECT_EQ(f.default_shared_count, 1);
  EXPECT_EQ(f.moe_layers, MoeLayerRule::FirstKDense);
  EXPECT_TRUE(f.extra_layers_allowed);
  EXPECT_EQ(families_with(&FamilyDesc::partial_rotary), (std::vector<std::string>{"glm4_moe", "qwen3_next"}));
}

TEST(Family, ForwardAndUpcycleSupportAreFieldsOfTheTable) {
  using V = std::vector<std::string>;
  EXPECT_EQ(families_with(&FamilyDesc::forward),
            (V{"llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
               "deepseek_v3", "phimoe", "granitemoe", "kimi_k2", "glm4_moe", "gpt_oss", "ernie4_5_moe", "qwen3_next", "llama4_text",
               "llama4"}));
  EXPECT_EQ(families_with(&FamilyDesc::upcycle_source), (V{"llama", "mistral", "qwen2", "qwen3"}));
  EXPECT_EQ(families_with(&FamilyDesc::upcycle_target), (V{"mixtral", "qwen2_moe", "qwen3_moe"}));
  EXPECT_EQ(family_list(&FamilyDesc::upcycle_target), "mixtral, qwen2_moe, qwen3_moe");
  for (const auto& f : all_families()) {
    // upcycle writes a target's config from its entry's keys and runs the source's forward.
    if (f.upcycle_target) {
      EXPECT_TRUE(f.moe && !f.expert_count_key.empty() && !f.expert_width_key.empty()) << f.model_type;
    }
    if (f.upcycle_source) {
      EXPECT_TRUE(!f.moe && f.forward) << f.model_type;
    }
    if (f.upcycle_target && f.has_shared()) {
      EXPECT_FALSE(f.shared_width_key.empty()) << f.model_type;
    }
  }
}

}  // namespace
}  // namespace moe::model
