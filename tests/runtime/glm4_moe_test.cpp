// glm4_moe (GLM-4.5 / 4.6) forward against the independent NumPy reference
// data/scripts/glm4_moe_reference.py (written from transformers' modeling_glm4_moe.py) on
// data/glm4-moe-tiny (GQA with q/k/v biases, per-head q/k norms, partial rotary 0.5 with head_dim
// 24, DeepSeek-V3 routing with correction bias and groups, a shared expert, one dense layer, one
// multi-token-prediction layer), and the same weights with n_group 1 and with
// partial_rotary_factor 1: logits within 1e-4 of the largest |logit|, the same argmax, the same
// experts per token with the same weights. Plus the hyper-parameters read, the refusals, and the
// CLI on the fixture: eval, calibrate, prune --method reap (MTP layer carried along).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "calib/calibrate.h"
#include "core/error.h"
#include "reference_golden.h"
#include "runtime/forward.h"
#include "runtime_test_util.h"
#include "support/ckpt_util.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

namespace fs = std::filesystem;

const fs::path& glm_fixture() {
  static const fs::path p = source_dir() / "data/glm4-moe-tiny";
  return p;
}

// The fixture's golden and two of the same weights under another config: n_group 1 / topk_group 1
// (no group limitation: other experts chosen), partial_rotary_factor 1 (RoPE over the whole
// head) and use_qk_norm false (the stored q/k norms unused, as transformers builds none).
TEST(Glm4Moe, MatchesReference) {
  for (const char* name : {"glm4_moe", "glm4_moe-nogroup", "glm4_moe-full-rotary", "glm4_moe-no-qk-norm"}) {
    SCOPED_TRACE(name);
    Checked c;
    check_against_reference(name, c);
    std::printf("[ %s ] max |logit diff| = %.3g (|logit| max %.3g)\n", name, c.max_logit_diff, c.logits_abs_max);
  }
}

// calibrate on the golden's window: each expert's routed-token count and summed routing weight
// equal the reference's (from its per-token choices and weights).
TEST(Glm4Moe, CalibrateCountsEqualReference) { check_calibrate_counts("glm4_moe", glm_fixture(), 8); }

// What is read from the fixture's config: head_dim from its key (not hidden/heads), the rotary
// width int(24 * 0.5), per-head q/k norms, DeepSeek-V3 routing with its groups and scale, layer 0
// dense, the MTP layer 3 with an MoE block.
TEST(Glm4Moe, SpecFromConfig) {
  auto lm = load_model(glm_fixture());
  const runtime::ForwardSpec s = runtime::ForwardSpec::from_model(lm->model);
  EXPECT_FALSE(s.mla.has_value());
  EXPECT_EQ(s.attn.head_dim, 24);
  EXPECT_EQ(s.attn.rope_dim(), 12);
  EXPECT_EQ(s.attn.heads, 4);
  EXPECT_EQ(s.attn.kv_heads, 2);
  EXPECT_EQ(s.attn.qk_norm, model::QKNorm::PerHead);
  EXPECT_DOUBLE_EQ(s.eps, 1e-5);
  EXPECT_EQ(s.routing.kind, model::Routing::DeepSeekV3);
  EXPECT_EQ(s.routing.n_group, 4);
  EXPECT_EQ(s.routing.topk_group, 2);
  EXPECT_TRUE(s.routing.renormalize);
  EXPECT_DOUBLE_EQ(s.routing.routed_scaling_factor, 1.5);
  const auto& layers = lm->model.layers();
  ASSERT_EQ(layers.size(), 3u);
  EXPECT_FALSE(layers[0].moe.has_value());
  ASSERT_TRUE(layers[1].moe.has_value());
  EXPECT_EQ(layers[1].moe->num_experts(), 8);
  EXPECT_TRUE(layers[1].tensors.count("q_bias"));
  EXPECT_FALSE(layers[1].tensors.count("o_bias"));
  EXPECT_EQ(lm->model.mtp_moe_layers(), std::vector<int>{3});
  // partial_rotary_factor absent: the family's default 0.5.
  TempDir dir;
  copy_with_config(glm_fixture(), dir.path(), {{"partial_rotary_factor", nullptr}});  // merge patch: removes the key
  ASSERT_FALSE(nlohmann::json::parse(read_file(dir.path() / "config.json")).contains("partial_rotary_factor"));
  auto def = load_model(dir.path());
  EXPECT_EQ(runtime::ForwardSpec::from_model(def->model).attn.rope_dim(), 12);
}

// partial_rotary_factor is implemented for glm4_moe only; a width that is not even is an error.
TEST(Glm4Moe, PartialRotaryRefusals) {
  TempDir q;
  synth_to(q.path(), "qwen3_moe", {.config_patch = {{"partial_rotary_factor", 0.5}}});
  const std::string m = forward_refusal(q.path());
  EXPECT_NE(m.find("partial_rotary_factor != 1 not implemented by the forward for qwen3_moe (implemented: glm4_moe, qwen3_next)"),
            std::string::npos)
      << m;
  // Bad values: an error naming the key and the value, the forward not built.
  const std::vector<std::pair<nlohmann::json, std::string>> bad = {
      {{{"partial_rotary_factor", 0.125}}, "partial_rotary_factor 0.125 x head_dim 24 gives a rotary width of 3"},
      {{{"partial_rotary_factor", 1.5}}, "partial_rotary_factor: expected a number in (0, 1], found 1.5"},
      {{{"partial_rotary_factor", "half"}}, "partial_rotary_factor: expected a number in (0, 1], found \"half\""},
      {{{"rope_parameters", {{"rope_type", "default"}, {"partial_rotary_factor", 0.25}}}},
       "rope_parameters.partial_rotary_factor 0.25 disagrees with partial_rotary_factor 0.5"},
  };
  for (const auto& [patch, want] : bad) {
    SCOPED_TRACE(patch.dump());
    TempDir dir;
    copy_with_config(glm_fixture(), dir.path(), patch);
    auto lm = load_model(dir.path());
    try {
      runtime::Forward fwd(lm->model);
      ADD_FAILURE() << "expected Error::corruption";
    } catch (const core::Error& e) {
      EXPECT_EQ(e.kind(), core::ErrorKind::Corruption) << e.what();
      EXPECT_NE(e.message().find(want), std::string::npos) << e.what();
    }
  }
}

// The commands that sit on the forward run on the fixture; prune writes the glm4_moe layout back
// and carries the last decoder layer's keep-map to the MTP layer.
TEST(Glm4MoeCli, EvalCalibrateAndReap) {
  TempDir tmp;
  const std::string model = glm_fixture().string();
  ASSERT_NO_FATAL_FAILURE(eval_calibrate_reap(model, tmp.path()));
  const fs::path out = tmp.path() / "reap";
  const auto cfg = nlohmann::json::parse(read_file(out / "config.json"));
  EXPECT_EQ(cfg.at("model_type"), "glm4_moe");
  const TensorMap in_t = read_tensors(glm_fixture()), out_t = read_tensors(out);
  for (const char* name : {"model.layers.1.mlp.experts.5.gate_proj.weight", "model.layers.2.self_attn.q_proj.bias",
                           "model.layers.2.self_attn.k_norm.weight", "model.layers.2.mlp.gate.e_score_correction_bias",
                           "model.layers.3.mlp.experts.5.down_proj.weight"})
    EXPECT_TRUE(out_t.count(name)) << name;
  EXPECT_FALSE(out_t.count("model.layers.1.mlp.experts.6.gate_proj.weight"));
  EXPECT_FALSE(out_t.count("model.layers.3.mlp.experts.6.gate_proj.weight"));
  EXPECT_EQ(out_t.at("model.layers.3.mlp.gate.weight").shape, (core::Shape{6, 64}));
  EXPECT_EQ(out_t.at("model.layers.3.eh_proj.weight"), in_t.at("model.layers.3.eh_proj.weight"));
  EXPECT_EQ(out_t.at("model.layers.0.mlp.gate_proj.weight"), in_t.at("model.layers.0.mlp.gate_proj.weight"));
}

// quantize (gptq) and factorize (svdllm) keep every expert count: they run on the decoder layers,
// write the glm4_moe names back and pass the MTP layer through as stored; the outputs run. merge
// changes the counts, which the MTP layer's MoE block cannot follow: refused, nothing written.
TEST(Glm4MoeCli, QuantizeFactorizeRunMergeRefused) {
  TempDir tmp;
  const std::string model = glm_fixture().string();
  const std::string text = (source_dir() / "data/text/calib.txt").string();
  const TensorMap in_t = read_tensors(glm_fixture());
  const std::vector<std::vector<std::string>> passes = {{"quantize", "--method", "gptq"},
                                                        {"factorize", "--method", "svdllm", "--ratio", "0.5"}};
  for (const auto& pass : passes) {
    SCOPED_TRACE(pass[0]);
    const fs::path out = tmp.path() / pass[0];
    std::vector<std::string> args = {"-q", pass[0], model, out.string()};
    args.insert(args.end(), pass.begin() + 1, pass.end());
    for (const char* a : {"--text", text.c_str(), "--ctx", "16", "--windows", "2"}) args.emplace_back(a);
    RunResult r = run_tool(args);
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    const TensorMap out_t = read_tensors(out);
    for (const char* name : {"model.layers.3.mlp.experts.7.up_proj.weight", "model.layers.3.self_attn.q_norm.weight",
                             "model.layers.3.mlp.gate.e_score_correction_bias", "model.layers.2.self_attn.v_proj.bias"})
      EXPECT_EQ(out_t.at(name), in_t.at(name)) << name;
    const std::string expert = "model.layers.2.mlp.experts.7.up_proj.weight";  // compressed: re-encoded or gone
    EXPECT_FALSE(out_t.count(expert) && out_t.at(expert) == in_t.at(expert));
    r = run_tool({"-q", "eval", out.string(), "--text", text, "--ctx", "16", "--max-windows", "1", "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
  }
  RunResult r = run_tool({"-q", "merge", model, (tmp.path() / "m").string(), "--method", "msmoe", "--experts", "4",
                          "--text", text, "--ctx", "16", "--windows", "2"});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_NE(r.err.find("multi-token-prediction layer (model.layers.3)"), std::string::npos) << r.describe();
  EXPECT_FALSE(fs::exists(tmp.path() / "m"));
}

// Without an MTP layer (the fixture with model.layers.3.* left out and num_nextn_predict_layers 0)
// merge runs on glm4_moe: 8 -> 4 experts per MoE layer, the glm4_moe names written, the output runs.
TEST(Glm4MoeCli, MergeWithoutMtpLayer) {
  TempDir tmp;
  const fs::path in = tmp.path() / "in";
  fs::create_directories(in);
  std::vector<SynthTensor> kept;
  for (const auto& [name, t] : read_tensors(glm_fixture()))
    if (!name.starts_with("model.layers.3."))
      kept.push_back({name, t.dtype, t.shape, std::vector<uint8_t>(t.bytes.begin(), t.bytes.end())});
  write_file(in / "model.safetensors", safetensors_bytes(kept));
  nlohmann::json cfg = nlohmann::json::parse(read_file(glm_fixture() / "config.json"));
  cfg["num_nextn_predict_layers"] = 0;
  write_file(in / "config.json", cfg.dump(2));
  for (const char* f : {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})
    fs::copy_file(glm_fixture() / f, in / f);
  const std::string text = (source_dir() / "data/text/calib.txt").string();
  const fs::path out = tmp.path() / "m";
  RunResult r = run_tool({"-q", "merge", in.string(), out.string(), "--method", "msmoe", "--experts", "4", "--text", text,
                          "--ctx", "16", "--windows", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(nlohmann::json::parse(read_file(out / "config.json")).at("n_routed_experts"), 4);
  const TensorMap out_t = read_tensors(out);
  EXPECT_TRUE(out_t.count("model.layers.2.mlp.experts.3.down_proj.weight"));
  EXPECT_FALSE(out_t.count("model.layers.2.mlp.experts.4.down_proj.weight"));
  EXPECT_EQ(out_t.at("model.layers.2.mlp.gate.e_score_correction_bias").shape, (core::Shape{4}));
  r = run_tool({"-q", "eval", out.string(), "--text", text, "--ctx", "16", "--max-windows", "1", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
}

}  // namespace
}  // namespace moe::test
