// DeepSeek-V2/V3 forward (Multi-head Latent Attention, DeepSeek routing) against the independent
// NumPy reference data/scripts/deepseek_reference.py (written from transformers'
// modeling_deepseek_v3.py / modeling_deepseek_v2.py) on data/deepseek-v3-tiny (q_lora_rank, yarn,
// sigmoid + bias routing, groups) and data/deepseek-v2-tiny (q_proj, default RoPE, softmax
// group-limited greedy), and the same weights with v3 rope_interleave false and v2 greedy top-k:
// logits within 1e-4 of the largest |logit|, the same argmax, the same
// experts per token in every MoE layer with the same weights. Plus the CLI on the fixture: eval,
// calibrate and prune --method reap run.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <vector>

#include "core/error.h"
#include "runtime/forward.h"
#include "runtime/mla.h"
#include "reference_golden.h"
#include "runtime_test_util.h"
#include "support/ckpt_util.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

namespace fs = std::filesystem;
using runtime::MatrixRM;

TEST(DeepSeek, V3MatchesReference) {
  Checked c;
  check_against_reference("deepseek-v3-tiny", c);
  std::printf("[ deepseek-v3-tiny ] max |logit diff| = %.3g (|logit| max %.3g)\n", c.max_logit_diff, c.logits_abs_max);
}

TEST(DeepSeek, V2MatchesReference) {
  Checked c;
  check_against_reference("deepseek-v2-tiny", c);
  std::printf("[ deepseek-v2-tiny ] max |logit diff| = %.3g (|logit| max %.3g)\n", c.max_logit_diff, c.logits_abs_max);
}

// The same weights with rope_interleave false (rotate-half pairs): another golden.
TEST(DeepSeek, V3RotateHalfMatchesReference) {
  Checked c;
  check_against_reference("deepseek-v3-tiny-rotate-half", c);
  std::printf("[ deepseek-v3-tiny-rotate-half ] max |logit diff| = %.3g\n", c.max_logit_diff);
}

// The same weights with topk_method greedy.
TEST(DeepSeek, V2GreedyMatchesReference) {
  Checked c;
  check_against_reference("deepseek-v2-tiny-greedy", c);
  std::printf("[ deepseek-v2-tiny-greedy ] max |logit diff| = %.3g\n", c.max_logit_diff);
}

// The hyper-parameters read from the v3 fixture's config: yarn's mscale_all_dim on the softmax
// scale, q through q_a/q_b, interleaved RoPE.
TEST(DeepSeek, SpecFromConfig) {
  auto lm = load_model(source_dir() / "data/deepseek-v3-tiny");
  const runtime::ForwardSpec s = runtime::ForwardSpec::from_model(lm->model);
  ASSERT_TRUE(s.mla.has_value());
  EXPECT_EQ(s.mla->q_lora_rank, 32);
  EXPECT_EQ(s.mla->qk_head_dim(), 32);
  EXPECT_TRUE(s.mla->interleaved);
  const double m = 0.1 * 0.8 * std::log(4.0) + 1.0;
  EXPECT_NEAR(s.mla->scale, m * m / std::sqrt(32.0), 1e-12);
  EXPECT_EQ(s.attn.head_dim, 16);  // the RoPE width: qk_rope_head_dim
  EXPECT_EQ(s.rope_scaling.type, "yarn");
  auto v2 = load_model(source_dir() / "data/deepseek-v2-tiny");
  const runtime::ForwardSpec s2 = runtime::ForwardSpec::from_model(v2->model);
  EXPECT_EQ(s2.mla->q_lora_rank, 0);
  EXPECT_NEAR(s2.mla->scale, 1 / std::sqrt(32.0), 1e-12);
}

// yarn's blend against values computed by hand from _compute_yarn_parameters for d 16, base 1e4,
// original context 64, factor 4: correction range [0, 3], so frequency 0 is kept, 1 and 2 are
// blended (weights 2/3 and 1/3 of the original), 3.. are divided by the factor; cos/sin carry
// the attention factor mscale(4, 0.9) / mscale(4, 0.8).
TEST(DeepSeek, YarnRopeTable) {
  runtime::RopeScaling s;
  s.type = "yarn";
  s.factor = 4;
  s.original_max_positions = 64;
  s.mscale = 0.9;
  s.mscale_all_dim = 0.8;
  const runtime::RopeTable r = runtime::RopeTable::make(2, 16, 1e4, s, 256);
  const double af = (0.09 * std::log(4.0) + 1) / (0.08 * std::log(4.0) + 1);
  auto inv = [](int i) { return 1.0 / std::pow(1e4, 2.0 * i / 16.0); };
  const double expect[8] = {inv(0), inv(1) * (2.0 / 3 + 1.0 / 12), inv(2) * (1.0 / 3 + 2.0 / 12), inv(3) / 4,
                            inv(4) / 4, inv(5) / 4,  inv(6) / 4, inv(7) / 4};
  for (int i = 0; i < 8; ++i) {
    // position 1: angle = inv_freq
    EXPECT_NEAR(r.sin[8 + i], std::sin(expect[i]) * af, 1e-6) << i;
    EXPECT_NEAR(r.cos[8 + i], std::cos(expect[i]) * af, 1e-6) << i;
  }
  EXPECT_NEAR(r.cos[0], af, 1e-6);  // position 0
}

// A DeepSeek config the forward does not implement is refused naming the key.
TEST(DeepSeek, UnsupportedSettingsSayWhich) {
  TempDir dir;
  synth_to(dir.path(), "deepseek_v3", {.config_patch = {{"num_key_value_heads", 2}}});
  const std::string m = forward_refusal(dir.path());
  EXPECT_NE(m.find("num_key_value_heads 2 != num_attention_heads 4"), std::string::npos) << m;
}

// Config values transformers would refuse: topk_group above n_group, a non-positive norm epsilon.
TEST(DeepSeek, OutOfRangeConfigValuesRefused) {
  expect_forward_errors(source_dir() / "data/deepseek-v3-tiny",
                        {{{{"topk_group", 5}}, "config.json: topk_group 5 exceeds n_group 4"},
                         {{{"rms_norm_eps", -1}}, "config.json: rms_norm_eps: expected a finite number > 0, found -1"}});
}

// A layer stored after the decoder layers that the config does not declare (num_hidden_layers
// lowered, no num_nextn_predict_layers): refused, not passed through beside a rewritten config.
TEST(DeepSeek, UndeclaredLayerPastTheDecoderRefused) {
  TempDir dir;
  copy_with_config(source_dir() / "data/deepseek-v3-tiny", dir.path(), {{"num_hidden_layers", 2}});
  const RunResult r = run_tool({"-q", "inspect", dir.path().string()});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_NE(r.err.find(": layer 2 but num_hidden_layers is 2 and num_nextn_predict_layers 0"), std::string::npos) << r.err;
}

// A config whose MLA shapes disagree with the stored tensors (q_lora_rank set, q_proj stored): an
// error naming the layer and the projection, not a wrong answer.
TEST(DeepSeek, ConfigDisagreeingWithTheTensorsIsAnError) {
  TempDir dir;
  synth_to(dir.path(), "deepseek_v2", {.config_edit = {{"q_lora_rank", 12}}});
  auto lm = load_model(dir.path());
  runtime::Forward fwd(lm->model);
  try {
    fwd.run(std::vector<int32_t>{1, 2, 3, 4}, 4);
    FAIL() << "expected Error::corruption";
  } catch (const core::Error& e) {
    EXPECT_EQ(e.kind(), core::ErrorKind::Corruption) << e.what();
    EXPECT_NE(std::string(e.what()).find("layer 0"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("q_a_proj is [0, 0], the config implies [12, 32]"), std::string::npos) << e.what();
  }
}

// kimi_k2 is the deepseek_v3 layout under its own model_type: the same logits.
TEST(DeepSeek, KimiK2IsTheV3Layout) {
  TempDir dir;
  const fs::path src = source_dir() / "data/deepseek-v3-tiny";
  copy_with_config(src, dir.path(), {{"model_type", "kimi_k2"}});
  auto v3 = load_model(src);
  auto k2 = load_model(dir.path());
  EXPECT_EQ(k2->model.family().model_type, "kimi_k2");
  const std::vector<int32_t> tokens = {5, 77, 1024, 9, 3000, 12, 400, 8};
  const MatrixRM a = runtime::Forward(v3->model).run(tokens, 8);
  const MatrixRM b = runtime::Forward(k2->model).run(tokens, 8);
  EXPECT_EQ((a - b).cwiseAbs().maxCoeff(), 0.0f);
}

// The commands that sit on the forward run on the fixture.
TEST(DeepSeekCli, EvalCalibrateAndReap) {
  TempDir tmp;
  const std::string model = (source_dir() / "data/deepseek-v3-tiny").string();
  eval_calibrate_reap(model, tmp.path());
}

// Group-limited routing (n_group 4) on a layer a pass of the same run pruned: enumerate runs its
// candidates, and a second pass runs the pruned layers; both route plain top-k over the remaining
// experts (as the written config, n_group 1, will) instead of reading past them as 4 groups of 2.
TEST(DeepSeekCli, PrunedLayerRoutesWithoutGroupsInTheSameRun) {
  TempDir tmp;
  const std::string model = (source_dir() / "data/deepseek-v3-tiny").string();
  RunResult r = run_with_calibration({"-q", "prune", model, (tmp.path() / "e").string(), "--method", "enumerate", "--keep", "6"}, {});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  expect_eval_runs(tmp.path() / "e");
  const fs::path recipe = tmp.path() / "r.json";
  write_file(recipe, nlohmann::json{{"model", model},
                                    {"calibration", {{"text", heldout_text()}, {"ctx", 32}, {"windows", 2}}},
                                    {"passes", {{{"pass", "prune"}, {"method", "reap"}, {"keep", 5}},
                                                {{"pass", "quantize"}, {"method", "gptq"}, {"codec", "int4"}}}},
                                    {"output", {{"path", (tmp.path() / "pq").string()}}}}
                         .dump());
  r = run_tool({"-q", "run", recipe.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  expect_eval_runs(tmp.path() / "pq");
  // The same routing on hand logits: 6 experts under a rule of 8 in 4 groups is plain top-k.
  auto lm = load_model(source_dir() / "data/deepseek-v3-tiny");
  const runtime::RoutingRule rule = runtime::RoutingRule::from_model(lm->model);
  ASSERT_EQ(rule.n_group, 4);
  runtime::MatrixRM logits(1, 6);
  logits << 0.1f, 2.0f, 1.9f, -1.0f, 0.5f, 0.4f;
  const runtime::RoutingResult got = runtime::route(rule, logits);
  runtime::RoutingRule plain = rule;
  plain.n_group = plain.topk_group = 1;
  plain.num_experts = 6;
  const runtime::RoutingResult want = runtime::route(plain, logits);
  EXPECT_TRUE(got.ids == want.ids);
  EXPECT_TRUE(got.weights == want.weights);
}

// A DeepSeek-V3 checkpoint with a multi-token-prediction layer (the synthetic v3: 3 decoder layers,
// MTP layer 3 with an MLA decoder block and 4 experts of width 16): quantize and merge run on its
// MoE block like on the decoder layers' (its experts re-encoded, merged 4 -> 2 on its own inputs).
TEST(DeepSeekCli, MtpLayerQuantizedAndMerged) {
  TempDir tmp;
  const fs::path in = tmp.path() / "in";
  write_synth(make_synth("deepseek_v3"), in, {.tokenizer = true});
  const std::string text = (source_dir() / "data/text/calib.txt").string();
  RunResult r = run_tool({"-q", "quantize", in.string(), (tmp.path() / "q").string(), "--method", "rtn", "--text", text,
                          "--ctx", "16", "--windows", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const std::string name = "model.layers.3.mlp.experts.2.up_proj.weight";
  const TensorMap q = read_tensors(tmp.path() / "q");
  EXPECT_FALSE(q.count(name) && q.at(name) == read_tensors(in).at(name)) << name << ": re-encoded";
  EXPECT_EQ(q.at("model.layers.3.eh_proj.weight"), read_tensors(in).at("model.layers.3.eh_proj.weight"));
  r = run_tool({"-q", "merge", in.string(), (tmp.path() / "m").string(), "--method", "msmoe", "--experts", "2", "--text",
                text, "--ctx", "16", "--windows", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const TensorMap m = read_tensors(tmp.path() / "m");
  EXPECT_EQ(m.at("model.layers.3.mlp.gate.weight").shape, (core::Shape{2, 32}));
  EXPECT_FALSE(m.count("model.layers.3.mlp.experts.2.up_proj.weight"));
}

}  // namespace
}  // namespace moe::test
