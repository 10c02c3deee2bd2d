// qwen3_next (Qwen3NextForCausalLM) forward against the independent NumPy reference
// data/scripts/qwen3_next_reference.py (written from transformers' modeling_qwen3_next.py) on
// data/qwen3_next-tiny: three Gated DeltaNet layers then a gated full-attention layer
// (full_attention_interval 4), zero-centred RMSNorm, per-head q/k norms, partial rotary 0.25, the
// MoE block with softmax top-2, norm_topk_prob and a gated shared expert. Goldens: the fixture, the
// same layer kinds from an explicit layer_types, and norm_topk_prob false: logits within 1e-4 of
// the largest |logit|, the same argmax, the same experts per token with the same weights. Plus what
// is read, windows that do not share the DeltaNet state, the loader's refusals, calibrate's counts,
// and the CLI on the fixture: eval, calibrate, prune --method reap, merge, quantize and factorize,
// written back in the qwen3_next layout (the linear-attention tensors as they were) and run again.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/error.h"
#include "reference_golden.h"
#include "runtime/forward.h"
#include "runtime_test_util.h"
#include "support/ckpt_util.h"
#include "support/expect_error.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

namespace fs = std::filesystem;

const fs::path& next_fixture() {
  static const fs::path p = source_dir() / "data/qwen3_next-tiny";
  return p;
}

TEST(Qwen3Next, MatchesReference) {
  check_goldens({"qwen3_next", "qwen3_next-layer-types", "qwen3_next-no-norm-topk"});
}

// What is read: layers 0-2 linear attention, layer 3 full; the DeltaNet sizes; the gated q_proj
// (heads x 2 x head_dim rows); rotary width int(16 x 0.25) = 4; softmax top-2 renormalised; the
// shared expert with its gate on every layer (decoder_sparse_step 1).
TEST(Qwen3Next, ReadsTheHybridLayers) {
  auto lm = load_model(next_fixture());
  const runtime::ForwardSpec s = runtime::ForwardSpec::from_model(lm->model);
  EXPECT_EQ(s.linear_layers, (std::vector<bool>{true, true, true, false}));
  ASSERT_TRUE(s.delta_net.has_value());
  EXPECT_EQ(s.delta_net->dims.k_heads, 2);
  EXPECT_EQ(s.delta_net->dims.v_heads, 4);
  EXPECT_EQ(s.delta_net->dims.conv_dim(), 2 * 16 + 32);
  EXPECT_TRUE(s.zero_centred_norm);
  EXPECT_TRUE(s.attn.output_gate);
  EXPECT_EQ(s.attn.rope_dim(), 4);
  EXPECT_DOUBLE_EQ(s.rope_theta, 1e7);
  EXPECT_EQ(s.routing.kind, model::Routing::SoftmaxTopK);
  EXPECT_TRUE(s.routing.renormalize);
  const auto& layers = lm->model.layers();
  for (int l = 0; l < 3; ++l) {
    EXPECT_TRUE(layers[l].find("in_proj_qkvz")) << l;
    EXPECT_FALSE(layers[l].find("q_proj")) << l;
  }
  ASSERT_TRUE(layers[3].find("q_proj"));
  EXPECT_EQ(layers[3].find("q_proj")->shape(), (core::Shape{128, 64}));
  EXPECT_FALSE(layers[3].find("conv1d"));
  EXPECT_EQ(layers[0].find("conv1d")->shape(), (core::Shape{64, 1, 4}));
  for (const auto& L : layers) {
    ASSERT_TRUE(L.moe.has_value());
    EXPECT_TRUE(L.moe->shared.has_value() && L.moe->shared_gate.has_value());
  }
}

// Each window starts from a zero convolution and recurrent state: two windows run together give
// each window's logits alone.
TEST(Qwen3Next, WindowsDoNotShareTheDeltaNetState) {
  auto lm = load_model(next_fixture());
  runtime::Forward fwd(lm->model);
  std::vector<int32_t> tokens(24);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 977 + 5) % 4096);
  const runtime::MatrixRM both = fwd.run(tokens, 12);
  const runtime::MatrixRM second = fwd.run(std::span<const int32_t>(tokens).subspan(12), 12);
  // (Not bit for bit: the batch's GEMMs may sum in another order.)
  EXPECT_LE((both.bottomRows(12) - second).cwiseAbs().maxCoeff(), 1e-5f * second.cwiseAbs().maxCoeff());
}

// The loader: layer kinds against the stored tensors, layer_types values, the head grouping.
TEST(Qwen3Next, LoaderRefusals) {
  auto load_patched = [](const nlohmann::json& patch) {
    TempDir dir;
    copy_with_config(next_fixture(), dir.path(), patch);
    auto lm = load_model(dir.path());
  };
  expect_error([&] { load_patched({{"full_attention_interval", 2}}); }, core::ErrorKind::Corruption,
               {"model.layers.1.self_attn.q_proj.weight: missing (layer 1 is full_attention)"});
  expect_error([&] { load_patched({{"layer_types", {"linear_attention", "linear_attention", "sliding_attention", "full_attention"}}}); },
               core::ErrorKind::Corruption, {"layer_types[2]: expected \"linear_attention\" or \"full_attention\""});
  expect_error([&] { load_patched({{"layer_types", {"linear_attention"}}}); }, core::ErrorKind::Corruption,
               {"layer_types: expected a list of 4 entries"});
  expect_error([&] { load_patched({{"linear_num_value_heads", 3}}); }, core::ErrorKind::Corruption,
               {"linear_num_value_heads 3 is not a multiple of linear_num_key_heads 2"});
  expect_error([&] { load_patched({{"attention_bias", true}}); }, core::ErrorKind::Corruption,
               {"model.layers.3.self_attn.q_proj.bias: missing (layer 3 is full_attention)"});
  expect_error([&] { load_patched({{"linear_conv_kernel_dim", 3}}); }, core::ErrorKind::Corruption,
               {"model.layers.0.linear_attn.conv1d.weight: shape [64, 1, 4]"});
}

// The released checkpoint's multi-token-prediction head (mtp.*, here in a second shard): ignored as
// transformers ignores it, with one warning, and not written by convert.
// The multi-token-prediction head (mtp.*, in a second shard here) is passed through by convert and
// by passes that keep the expert counts, byte for byte; a pass that changes them (prune) leaves it
// out with a warning naming it, since its MoE block would keep the input's count.
TEST(Qwen3NextCli, MtpHeadPassedThroughUnlessTheCountsChange) {
  expect_mtp_head_passed_through(next_fixture(), "mtp.", {"mtp.fc.weight", "mtp.layers.0.mlp.experts.0.down_proj.weight"}, "6");
}

// calibrate on the golden's window: each expert's routed-token count and summed routing weight
// equal the reference's.
TEST(Qwen3Next, CalibrateCountsEqualReference) { check_calibrate_counts("qwen3_next", next_fixture(), 8); }

const std::string& next_text() {
  static const std::string t = (source_dir() / "data/text/heldout.txt").string();
  return t;
}

void expect_next_runs(const fs::path& model) {
  const RunResult r = run_tool({"-q", "eval", model.string(), "--text", next_text(), "--ctx", "32", "--max-windows", "1", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  if (r.exit_code == 0) {
    EXPECT_TRUE(std::isfinite(nlohmann::json::parse(r.out).at("perplexity").get<double>())) << r.out;
  }
}

// The tensors of the token mixers and norms, written back byte for byte.
void expect_mixers_unchanged(const TensorMap& in, const TensorMap& got) {
  for (const auto& [name, t] : in)
    if (name.find("linear_attn.") != std::string::npos || name.find("self_attn.") != std::string::npos ||
        name.find("layernorm") != std::string::npos) {
      ASSERT_TRUE(got.count(name)) << name;
      EXPECT_EQ(got.at(name), t) << name;
    }
}

// eval, calibrate, prune --method reap --keep 6 (eval_calibrate_reap): num_experts 6, the kept
// experts' tensors, the mixers unchanged, and it runs.
TEST(Qwen3NextCli, EvalCalibrateReapWriteBack) {
  TempDir tmp;
  eval_calibrate_reap(next_fixture().string(), tmp.path(), "num_experts");
  const fs::path out = tmp.path() / "reap";
  const auto cfg = nlohmann::json::parse(read_file(out / "config.json"));
  EXPECT_EQ(cfg.at("model_type"), "qwen3_next");
  EXPECT_EQ(cfg.at("full_attention_interval"), 4);
  const TensorMap in = read_tensors(next_fixture()), got = read_tensors(out);
  EXPECT_EQ(got.at("model.layers.2.mlp.gate.weight").shape, (core::Shape{6, 64}));
  EXPECT_FALSE(got.count("model.layers.2.mlp.experts.6.up_proj.weight"));
  EXPECT_EQ(got.at("model.layers.2.mlp.shared_expert_gate.weight"), in.at("model.layers.2.mlp.shared_expert_gate.weight"));
  expect_mixers_unchanged(in, got);
}

// calibrate --gram: the attention Gram of a linear-attention layer is over out_proj's input (its
// value width), that of a full-attention layer over o_proj's (the stats file is planned with
// each; a plan from o_proj alone refused the linear layers' Grams).
TEST(Qwen3NextCli, CalibrateGramsOfBothMixers) {
  TempDir tmp;
  const fs::path out = tmp.path() / "stats";
  fs::create_directories(out);
  const RunResult r = run_tool({"-q", "calibrate", next_fixture().string(), "--text", next_text(), "--ctx", "32",
                                "--windows", "4", "--gram", "-o", (out / "model.safetensors").string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const TensorMap in = read_tensors(next_fixture()), st = read_tensors(out);
  const int64_t v = in.at("model.layers.0.linear_attn.out_proj.weight").shape[1];
  const int64_t o = in.at("model.layers.3.self_attn.o_proj.weight").shape[1];
  ASSERT_NE(v, o) << "the fixture should have different widths";
  EXPECT_EQ(st.at("layers.0.attn.gram_o").shape, (core::Shape{v, v}));
  EXPECT_EQ(st.at("layers.3.attn.gram_o").shape, (core::Shape{o, o}));
}

RunResult next_command(std::vector<std::string> a, const std::vector<std::string>& more) {
  const std::vector<std::string> calib = {"--text", next_text(), "--ctx", "32", "--windows", "2"};
  a.insert(a.end(), calib.begin(), calib.end());
  a.insert(a.end(), more.begin(), more.end());
  return run_tool(a);
}

// merge (M-SMoE) to 6 experts, quantize (GPTQ int4) and factorize (SVD-LLM): outputs in the
// qwen3_next layout with the mixers unchanged, and they run.
TEST(Qwen3NextCli, MergeQuantizeFactorize) {
  TempDir tmp;
  const std::string model = next_fixture().string();
  const TensorMap in = read_tensors(next_fixture());
  for (const auto& [dir, args] : std::vector<std::pair<std::string, std::vector<std::string>>>{
           {"m", {"merge", "--method", "msmoe", "--experts", "6"}},
           {"q", {"quantize", "--method", "gptq", "--codec", "int4"}},
           {"f", {"factorize", "--method", "svdllm", "--ratio", "0.5"}}}) {
    SCOPED_TRACE(dir);
    const fs::path out = tmp.path() / dir;
    std::vector<std::string> a = {"-q", args[0], model, out.string()};
    a.insert(a.end(), args.begin() + 1, args.end());
    const RunResult r = next_command(a, {});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    const auto cfg = nlohmann::json::parse(read_file(out / "config.json"));
    EXPECT_EQ(cfg.at("num_experts"), dir == "m" ? 6 : 8);
    expect_mixers_unchanged(in, read_tensors(out));
    expect_next_runs(out);
  }
  // Smoothing would fold into the zero-centred post-attention norm: refused before any work.
  const RunResult r = next_command({"-q", "quantize", model, (tmp.path() / "s").string(), "--method", "rtn", "--smooth"}, {});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_NE(r.err.find("smoothing into qwen3_next's zero-centred post-attention norm is not implemented"), std::string::npos)
      << r.err;
  EXPECT_FALSE(fs::exists(tmp.path() / "s"));
}

// mlp_only_layers naming a layer the model does not have: refused naming the key.
TEST(Qwen3NextCli, MlpOnlyLayersOutOfRangeRefused) {
  TempDir dir;
  copy_with_config(next_fixture(), dir.path(), {{"mlp_only_layers", nlohmann::json::array({7})}});
  const RunResult r = run_tool({"-q", "inspect", dir.path().string()});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_NE(r.err.find("config.json: mlp_only_layers: layer 7 not in [0, num_hidden_layers 4)"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace moe::test
