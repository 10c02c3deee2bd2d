// glm4_moe (GLM-4.5 / 4.6) forward against the independent NumPy reference
// data/scripts/glm4_moe_reference.py (written from transformers' modeling_glm4_moe.py) on
// data/glm4-moe-tiny (GQA with q/k/v biases, per-head q/k norms, partial rotary 0.5 with head_dim
// 24, DeepSeek-V3 routing with correction bias and groups, a shared expert, one dense layer, one
// multi-token-prediction layer), and the same weights with n_group 1 and with
// partial_rotary_factor 1: logits within 1e-4 of the largest |logit|, the same argmax, the same
// experts per token with the same weights. Plus the hyper-parameters read, the refusals, and the
// CLI on the fixture: eval, calibrate, prune --method reap, quantize, factorize and merge (the
// multi-token-prediction layer's MoE block calibrated and compressed like the others).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <numeric>
#include <vector>

#include "calib/calibrate.h"
#include "calib/stats.h"
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
TEST(Glm4Moe, CalibrateCountsEqualReference) { check_calibrate_counts("glm4_moe", glm_fixture(), 8, "glm4_moe-mtp"); }

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

// The experts each layer kept (the report's first pass), by layer.
std::map<int, std::vector<int>> kept_by_layer(const fs::path& out) {
  std::map<int, std::vector<int>> kept;
  const auto report = nlohmann::json::parse(read_file(out / "moe_tool_report.json"));
  for (const auto& L : report.at("layers"))
    if (L.contains("passes") && !L.at("passes").empty() && L.at("passes")[0].contains("kept"))
      kept[L.at("layer").get<int>()] = L.at("passes")[0].at("kept").get<std::vector<int>>();
  return kept;
}

// Row k of a 2-D tensor's bytes.
std::string row_bytes(const TensorBytes& t, int k) {
  const size_t n = t.bytes.size() / static_cast<size_t>(t.shape.at(0));
  return t.bytes.substr(static_cast<size_t>(k) * n, n);
}

// The commands that sit on the forward run on the fixture; prune writes the glm4_moe layout back.
// The multi-token-prediction layer (model.layers.3) is calibrated and pruned like the decoder's MoE
// layers: it keeps the experts its own REAP statistics rank first, which are not the last decoder
// layer's (the rule before the MTP forward existed), router rows, bias and experts following them.
TEST(Glm4MoeCli, EvalCalibrateAndReap) {
  TempDir tmp;
  const std::string model = glm_fixture().string();
  ASSERT_NO_FATAL_FAILURE(eval_calibrate_reap(model, tmp.path()));
  const fs::path out = tmp.path() / "reap";
  const auto cfg = nlohmann::json::parse(read_file(out / "config.json"));
  EXPECT_EQ(cfg.at("model_type"), "glm4_moe");
  EXPECT_EQ(cfg.at("num_nextn_predict_layers"), 1);
  const TensorMap in_t = read_tensors(glm_fixture()), out_t = read_tensors(out);
  for (const char* name : {"model.layers.1.mlp.experts.5.gate_proj.weight", "model.layers.2.self_attn.q_proj.bias",
                           "model.layers.2.self_attn.k_norm.weight", "model.layers.2.mlp.gate.e_score_correction_bias",
                           "model.layers.3.mlp.experts.5.down_proj.weight"})
    EXPECT_TRUE(out_t.count(name)) << name;
  EXPECT_FALSE(out_t.count("model.layers.1.mlp.experts.6.gate_proj.weight"));
  EXPECT_FALSE(out_t.count("model.layers.3.mlp.experts.6.gate_proj.weight"));
  EXPECT_EQ(out_t.at("model.layers.3.mlp.gate.weight").shape, (core::Shape{6, 64}));
  for (const char* name : {"model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight", "model.layers.3.shared_head.norm.weight",
                           "model.layers.3.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight"})
    EXPECT_EQ(out_t.at(name), in_t.at(name)) << name;

  const calib::Stats st = calib::Stats::load(tmp.path() / "calib.stats");
  ASSERT_TRUE(st.layers.count(3)) << "the MTP layer's statistics";
  const std::vector<double>& reap = st.layers.at(3).reap;
  std::vector<int> want(reap.size());
  std::iota(want.begin(), want.end(), 0);
  std::stable_sort(want.begin(), want.end(), [&](int a, int b) { return reap[a] > reap[b]; });
  want.resize(6);
  std::sort(want.begin(), want.end());
  auto kept = kept_by_layer(out);
  ASSERT_TRUE(kept.count(2) && kept.count(3));
  std::vector<int> got = kept.at(3);
  std::sort(got.begin(), got.end());
  EXPECT_EQ(got, want) << "the MTP layer's 6 largest REAP scores";
  EXPECT_NE(kept.at(3), kept.at(2)) << "the last decoder layer's keep-map (the former rule) would give the same";
  const TensorBytes &r_in = in_t.at("model.layers.3.mlp.gate.weight"), &r_out = out_t.at("model.layers.3.mlp.gate.weight");
  const TensorBytes &b_in = in_t.at("model.layers.3.mlp.gate.e_score_correction_bias"),
                    &b_out = out_t.at("model.layers.3.mlp.gate.e_score_correction_bias");
  const std::string gate = ".gate_proj.weight";
  for (int j = 0; j < 6; ++j) {
    const int k = kept.at(3)[static_cast<size_t>(j)];
    EXPECT_EQ(row_bytes(r_out, j), row_bytes(r_in, k)) << j;
    EXPECT_EQ(b_out.bytes.substr(4 * j, 4), b_in.bytes.substr(4 * k, 4)) << j;
    EXPECT_EQ(out_t.at("model.layers.3.mlp.experts." + std::to_string(j) + gate),
              in_t.at("model.layers.3.mlp.experts." + std::to_string(k) + gate)) << j;
  }
  // A stats file without the MTP layer's statistics (made before they were collected) is refused.
  calib::Stats old = st;
  old.layers.erase(3);
  old.save(tmp.path() / "old.stats");
  const RunResult r = run_tool({"-q", "prune", model, (tmp.path() / "o").string(), "--method", "reap", "--keep", "6", "--stats",
                                (tmp.path() / "old.stats").string()});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_NE(r.err.find("no statistics for the multi-token-prediction layer (model.layers.3)"), std::string::npos) << r.describe();
  EXPECT_FALSE(fs::exists(tmp.path() / "o"));
}

// quantize (gptq) and factorize (svdllm) run on every MoE layer, the MTP layer's included (its
// experts re-encoded, its other tensors as stored); merge (msmoe, 8 -> 4) merges the MTP layer's
// experts on its own calibration inputs, one n_routed_experts for all. The outputs run. A run that
// would leave the MTP layer's count unlike the decoder layers' is refused before any work.
TEST(Glm4MoeCli, QuantizeFactorizeMergeRunOnTheMtpLayer) {
  TempDir tmp;
  const std::string model = glm_fixture().string();
  const std::string text = (source_dir() / "data/text/calib.txt").string();
  const TensorMap in_t = read_tensors(glm_fixture());
  const std::vector<std::vector<std::string>> passes = {{"quantize", "--method", "gptq"},
                                                        {"factorize", "--method", "svdllm", "--ratio", "0.5"},
                                                        {"merge", "--method", "msmoe", "--experts", "4"}};
  for (const auto& pass : passes) {
    SCOPED_TRACE(pass[0]);
    const fs::path out = tmp.path() / pass[0];
    std::vector<std::string> args = {"-q", pass[0], model, out.string()};
    args.insert(args.end(), pass.begin() + 1, pass.end());
    for (const char* a : {"--text", text.c_str(), "--ctx", "16", "--windows", "2"}) args.emplace_back(a);
    RunResult r = run_tool(args);
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    const TensorMap out_t = read_tensors(out);
    for (const char* name : {"model.layers.3.self_attn.q_norm.weight", "model.layers.3.eh_proj.weight",
                             "model.layers.3.hnorm.weight", "model.layers.2.self_attn.v_proj.bias"})
      EXPECT_EQ(out_t.at(name), in_t.at(name)) << name;
    const auto cfg = nlohmann::json::parse(read_file(out / "config.json"));
    EXPECT_EQ(cfg.at("num_nextn_predict_layers"), 1);
    if (pass[0] == "merge") {
      EXPECT_EQ(cfg.at("n_routed_experts"), 4);
      EXPECT_TRUE(out_t.count("model.layers.3.mlp.experts.3.down_proj.weight"));
      EXPECT_FALSE(out_t.count("model.layers.3.mlp.experts.4.down_proj.weight"));
      EXPECT_EQ(out_t.at("model.layers.3.mlp.gate.e_score_correction_bias").shape, (core::Shape{4}));
      EXPECT_EQ(out_t.at("model.layers.3.mlp.gate.weight").shape, (core::Shape{4, 64}));
    } else {
      for (const char* expert : {"model.layers.2.mlp.experts.7.up_proj.weight", "model.layers.3.mlp.experts.7.up_proj.weight"})
        EXPECT_FALSE(out_t.count(expert) && out_t.at(expert) == in_t.at(expert)) << expert << ": compressed (re-encoded or gone)";
      EXPECT_EQ(out_t.at("model.layers.3.mlp.gate.e_score_correction_bias"), in_t.at("model.layers.3.mlp.gate.e_score_correction_bias"));
    }
    if (pass[0] == "quantize")
      EXPECT_TRUE(cfg.at("quantization_config").at("weights").contains("model.layers.3.mlp.experts.7.up_proj.weight")) << cfg.dump();
    r = run_tool({"-q", "eval", out.string(), "--text", text, "--ctx", "16", "--max-windows", "1", "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
  }
  const RunResult r = run_tool({"-q", "prune", model, (tmp.path() / "p").string(), "--method", "frequency", "--keep-ratio",
                                "0.5", "--no-uniform", "--text", text, "--ctx", "16", "--windows", "2"});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_NE(r.err.find("the multi-token-prediction layer (model.layers.3) must end with the decoder layers' count"),
            std::string::npos) << r.describe();
  EXPECT_FALSE(fs::exists(tmp.path() / "p"));
}

}  // namespace
}  // namespace moe::test
