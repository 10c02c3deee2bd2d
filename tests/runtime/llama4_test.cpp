// llama4_text (Llama4ForCausalLM) forward against the independent NumPy reference
// data/scripts/llama4_reference.py (written from transformers' modeling_llama4.py) on
// data/llama4-tiny (4 layers alternating dense / MoE, layer 3 NoPE, chunked attention of 8 on the
// RoPE layers, q/k L2 norm, temperature tuning on the NoPE layer, llama3 RoPE scaling, 8 experts
// top-1 with the sigmoid score on the expert's input, a shared expert, fused [in, out] experts):
// logits within 1e-4 of the largest |logit|, the same argmax, the same expert per token with the
// same score. Plus what is read, calibrate's counts, the refusals, and the CLI on the fixture:
// eval, calibrate, prune --method reap, quantize and factorize, written back in the fused layout
// and run again; the passes that run the experts on the block inputs themselves refused.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "reference_golden.h"
#include "runtime/forward.h"
#include "runtime_test_util.h"
#include "support/ckpt_util.h"
#include "support/run.h"

namespace moe::test {
namespace {

namespace fs = std::filesystem;

const fs::path& llama4_fixture() {
  static const fs::path p = source_dir() / "data/llama4-tiny";
  return p;
}

TEST(Llama4, MatchesReference) { check_goldens({"llama4", "llama4-no-qk-norm-no-tuning", "llama4-full-attention"}); }

// What is read: layers 0 and 2 dense (intermediate_size_mlp 32), 1 and 3 MoE with a shared expert;
// expert 3's gate row 5 is column 5 of gate_up_proj[3] ([in, out], gate the first half), its up
// row 5 column 16 + 5, its down column h row 5 of down_proj[3]; per layer: RoPE on pairs with the
// L2 norm and chunks of 8 on layers 0-2, layer 3 NoPE with the temperature tuning and full
// attention; the router's top-1 sigmoid score scales the expert's input.
TEST(Llama4, ReadsTheLayoutAndTheLayers) {
  auto lm = load_model(llama4_fixture());
  const auto& layers = lm->model.layers();
  ASSERT_EQ(layers.size(), 4u);
  for (int l : {0, 2}) {
    ASSERT_TRUE(layers[l].mlp.has_value()) << l;
    EXPECT_EQ(layers[l].mlp->gate.shape(), (core::Shape{32, 64}));
  }
  const model::Layer& L = layers.at(1);
  ASSERT_TRUE(L.moe.has_value() && L.moe->shared.has_value());
  EXPECT_EQ(L.moe->shared->gate.shape(), (core::Shape{16, 64}));
  const model::Mlp& e3 = L.moe->experts.at(3);
  EXPECT_EQ(e3.gate.shape(), (core::Shape{16, 64}));
  EXPECT_EQ(e3.down.shape(), (core::Shape{64, 16}));
  const TensorMap raw = read_tensors(llama4_fixture());
  const std::string& gu = raw.at("model.layers.1.feed_forward.experts.gate_up_proj").bytes;  // [8, 64, 32]
  const std::string& dn = raw.at("model.layers.1.feed_forward.experts.down_proj").bytes;     // [8, 16, 64]
  const std::vector<float> gate = e3.gate.to_f32(), up = e3.up.to_f32(), down = e3.down.to_f32();
  for (int64_t h : {0, 9, 63}) {
    EXPECT_EQ(gate[5 * 64 + h], bf16_at(gu, (3 * 64 + h) * 32 + 5)) << h;
    EXPECT_EQ(up[5 * 64 + h], bf16_at(gu, (3 * 64 + h) * 32 + 16 + 5)) << h;
    EXPECT_EQ(down[h * 16 + 5], bf16_at(dn, (3 * 16 + 5) * 64 + h)) << h;
  }
  const runtime::ForwardSpec s = runtime::ForwardSpec::from_model(lm->model);
  EXPECT_EQ(s.routing.kind, model::Routing::TopKSigmoid);
  EXPECT_TRUE(s.routing.scales_input);
  EXPECT_EQ(s.routing.top_k, 1);
  EXPECT_EQ(s.rope_scaling.type, "llama3");
  EXPECT_EQ(s.attn.head_dim, 16);
  for (int l = 0; l < 3; ++l) {
    const runtime::AttnSpec a = s.layer_attn(l);
    EXPECT_TRUE(a.use_rope && a.rope_interleaved && a.l2_qk_norm) << l;
    EXPECT_EQ(a.chunk, 8) << l;
    EXPECT_EQ(a.floor_scale, 0) << l;
  }
  const runtime::AttnSpec nope = s.layer_attn(3);
  EXPECT_FALSE(nope.use_rope || nope.l2_qk_norm);
  EXPECT_EQ(nope.chunk, 0);
  EXPECT_EQ(nope.floor_scale, 4);
  EXPECT_EQ(nope.attn_scale, 0.2);
}

// Llama4Router on hand-computed logits: the top-k of the logits, each weighing sigmoid(logit); a
// masked expert is never chosen.
TEST(Llama4, RouterTopKSigmoidOnHandLogits) {
  runtime::RoutingRule rule;
  rule.family = "llama4_text";
  rule.kind = model::Routing::TopKSigmoid;
  rule.top_k = 2;
  rule.num_experts = 4;
  runtime::MatrixRM logits(1, 4);
  logits << 0.5f, 2.0f, -1.0f, 1.9f;
  runtime::RoutingResult r = runtime::route(rule, logits);
  EXPECT_EQ(r.ids(0, 0), 1);
  EXPECT_EQ(r.ids(0, 1), 3);
  EXPECT_NEAR(r.weights(0, 0), 1.0 / (1.0 + std::exp(-2.0)), 1e-6);
  EXPECT_NEAR(r.weights(0, 1), 1.0 / (1.0 + std::exp(-1.9)), 1e-6);
  const std::vector<bool> active = {true, false, true, true};
  r = runtime::route(rule, logits, nullptr, &active);
  EXPECT_EQ(r.ids(0, 0), 3);
  EXPECT_EQ(r.ids(0, 1), 0);
  EXPECT_NEAR(r.weights(0, 1), 1.0 / (1.0 + std::exp(-0.5)), 1e-6);
}

// Malformed llama4 keys: one error naming the key (the multimodal wrapper: llama4_mm_test.cpp).
TEST(Llama4, Refusals) {
  expect_forward_errors(llama4_fixture(),
                        {{{{"no_rope_layers", {1, 0}}}, "no_rope_layers: 2 entries for 4 layers"},
                         {{{"layer_types", {"chunked_attention", "sliding_attention", "full_attention", "full_attention"}}},
                          "layer_types[1]: expected \"chunked_attention\" or \"full_attention\""},
                         {{{"floor_scale", 0}}, "floor_scale: expected a positive number"},
                         {{{"hidden_act", "gelu"}}, "hidden_act 'gelu' not implemented"}});
  {  // (a merge patch cannot set a null: the config written whole)
    TempDir nul;
    copy_with_config(llama4_fixture(), nul.path(), nlohmann::json::object());
    nlohmann::json cfg = nlohmann::json::parse(read_file(nul.path() / "config.json"));
    cfg["attention_chunk_size"] = nullptr;
    write_file(nul.path() / "config.json", cfg.dump(2));
    const std::string m = forward_error(nul.path());
    EXPECT_NE(m.find("attention_chunk_size: null with chunked_attention layers (layer 0)"), std::string::npos) << m;
  }
}

// calibrate on the golden's window: each expert's routed-token count and summed router score equal
// the reference's.
TEST(Llama4, CalibrateCountsEqualReference) { check_calibrate_counts("llama4", llama4_fixture(), 8); }

// eval, calibrate (routed-token statistics only, with or without --routed-only: all-token ones are
// not defined for an expert's input off its routed tokens), prune --method reap --keep 6: the output is the fused layout with 6
// experts whose router rows and gate_up_proj / down_proj slabs are the kept input experts' bytes,
// and it runs.
TEST(Llama4Cli, EvalCalibrateReapWriteBack) {
  TempDir tmp;
  const std::string model = llama4_fixture().string();
  expect_eval_runs(model);
  RunResult r;
  const fs::path stats = tmp.path() / "calib.stats", out = tmp.path() / "reap";
  std::vector<std::string> calib = {"-q", "calibrate", model, "--text", heldout_text(), "-o", stats.string(), "--ctx", "32", "--windows", "2"};
  std::vector<std::string> routed = calib;
  routed.push_back("--routed-only");
  r = run_tool(routed);
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const std::string with_flag = read_file(stats);
  calib.erase(calib.begin());  // without -q: the note is printed
  r = run_tool(calib);
  ASSERT_EQ(r.exit_code, 2) << r.describe();  // the stats file exists: --force asked
  calib.push_back("--force");
  r = run_tool(calib);
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.err.find("routed-token statistics only"), std::string::npos) << r.err;
  EXPECT_EQ(read_file(stats), with_flag);  // the same statistics as with --routed-only
  r = run_tool({"-q", "prune", model, out.string(), "--method", "reap", "--keep", "6", "--stats", stats.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto cfg = nlohmann::json::parse(read_file(out / "config.json"));
  EXPECT_EQ(cfg.at("num_local_experts"), 6);
  EXPECT_EQ(cfg.at("model_type"), "llama4_text");
  const TensorMap in = read_tensors(llama4_fixture()), got = read_tensors(out);
  for (int l : {1, 3}) {
    const std::string p = "model.layers." + std::to_string(l) + ".feed_forward.";
    EXPECT_EQ(got.at(p + "experts.gate_up_proj").shape, (core::Shape{6, 64, 32}));
    EXPECT_EQ(got.at(p + "experts.down_proj").shape, (core::Shape{6, 16, 64}));
    EXPECT_EQ(got.at(p + "router.weight").shape, (core::Shape{6, 64}));
    EXPECT_EQ(got.at(p + "shared_expert.up_proj.weight").bytes, in.at(p + "shared_expert.up_proj.weight").bytes);
    const std::vector<int> kept =
        expect_kept_expert_slabs(in, got, p + "router.weight", {p + "experts.gate_up_proj", p + "experts.down_proj"});
    EXPECT_TRUE(std::is_sorted(kept.begin(), kept.end())) << "layer " << l;
  }
  EXPECT_EQ(got.at("model.layers.2.feed_forward.gate_proj.weight").bytes, in.at("model.layers.2.feed_forward.gate_proj.weight").bytes);
  expect_eval_runs(out);
}

// merge (M-SMoE) writes the fused layout with 6 experts and runs: a run on this router collects
// the routed-token statistics only, without --routed-only; HC-SMoE, which reads out_mean (every
// expert on every sampled token), is refused with one line saying it cannot apply; a sweep
// calibrates the same way, its prune cell computed.
TEST(Llama4Cli, MergeWritesTheFusedLayout) {
  TempDir tmp;
  const fs::path merged = tmp.path() / "merged", hc = tmp.path() / "hc";
  RunResult r = run_with_calibration({"-q", "merge", llama4_fixture().string(), hc.string(), "--method", "hcsmoe", "--experts", "6"}, {});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_NE(r.err.find("merge hcsmoe reads out_mean (every expert run on every sampled token), which llama4_text's router "
                       "does not define"),
            std::string::npos)
      << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_FALSE(fs::exists(hc));
  r = run_with_calibration({"-q", "merge", llama4_fixture().string(), merged.string(), "--method", "msmoe", "--experts", "6"}, {});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const TensorMap got = read_tensors(merged);
  EXPECT_EQ(got.at("model.layers.1.feed_forward.experts.gate_up_proj").shape, (core::Shape{6, 64, 32}));
  EXPECT_EQ(got.at("model.layers.3.feed_forward.experts.down_proj").shape, (core::Shape{6, 16, 64}));
  EXPECT_EQ(nlohmann::json::parse(read_file(merged / "config.json")).at("num_local_experts"), 6);
  expect_eval_runs(merged);
  const fs::path sweep = tmp.path() / "sweep";
  r = run_tool({"-q", "sweep", llama4_fixture().string(), "--text", heldout_text(), "--eval", heldout_text(), "--ctx", "32",
                "--windows", "2", "--eval-ctx", "32", "--eval-max-windows", "1", "-o", sweep.string(), "--methods",
                "prune:reap:0.75"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const nlohmann::json cells = nlohmann::json::parse(read_file(sweep / "sweep.json")).at("cells");
  ASSERT_EQ(cells.size(), 1u) << cells.dump();
  EXPECT_FALSE(cells.at(0).contains("error")) << cells.dump();
}

// quantize (RTN int4) and factorize (SVD-LLM, from the Grams of what each expert receives) with
// --materialize write the fused layout dense and run; mixed precision (which runs the experts on
// the block inputs itself) is refused with one line, nothing written (GPTQ: llama4_gptq_test.cpp).
TEST(Llama4Cli, QuantizeFactorizeMaterializedAvgBitsRefused) {
  TempDir tmp;
  const std::string model = llama4_fixture().string();
  RunResult r = run_with_calibration(
      {"-q", "quantize", model, (tmp.path() / "g").string(), "--method", "gptq", "--codec", "int4", "--avg-bits", "4"},
      {"--materialize"});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_NE(r.err.find("runs the experts on the MoE block's inputs, which llama4_text's router scales per expert"),
            std::string::npos)
      << r.err;
  EXPECT_FALSE(fs::exists(tmp.path() / "g"));
  const TensorMap in = read_tensors(llama4_fixture());
  for (const auto& [dir, args] : std::vector<std::pair<std::string, std::vector<std::string>>>{
           {"q", {"quantize", "--method", "rtn", "--codec", "int4"}}, {"f", {"factorize", "--method", "svdllm", "--ratio", "0.5"}}}) {
    const fs::path out = tmp.path() / dir;
    std::vector<std::string> a = {"-q", args[0], model, out.string()};
    a.insert(a.end(), args.begin() + 1, args.end());
    r = run_with_calibration(a, {"--materialize"});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    const TensorMap got = read_tensors(out);
    const std::string name = "model.layers.1.feed_forward.experts.gate_up_proj";
    EXPECT_EQ(got.at(name).shape, (core::Shape{8, 64, 32})) << dir;
    EXPECT_NE(got.at(name).bytes, in.at(name).bytes) << dir;
    expect_eval_runs(out);
  }
}

// A --tensor-type rule on the fused layout goes by the fused tensor's name (as on disk): a rule on
// layer 1's gate_up_proj changes gate and up of layer 1's experts only.
TEST(Llama4Cli, TensorTypeRuleMatchesTheFusedTensorsName) {
  TempDir tmp;
  const std::string model = llama4_fixture().string();
  const fs::path plain = tmp.path() / "plain", ruled = tmp.path() / "ruled";
  const std::vector<std::string> q = {"-q", "quantize", model, "", "--method", "rtn", "--codec", "int4", "--materialize"};
  std::vector<std::string> a = q;
  a[3] = plain.string();
  RunResult r = run_tool(a);
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  a[3] = ruled.string();
  a.insert(a.end(), {"--tensor-type", "layers\\.1\\..*experts\\.gate_up_proj=int8"});
  r = run_tool(a);
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const TensorMap p = read_tensors(plain), g = read_tensors(ruled), in = read_tensors(llama4_fixture());
  const std::string l1 = "model.layers.1.feed_forward.experts.", l3 = "model.layers.3.feed_forward.experts.";
  EXPECT_NE(g.at(l1 + "gate_up_proj").bytes, p.at(l1 + "gate_up_proj").bytes);
  EXPECT_NE(g.at(l1 + "gate_up_proj").bytes, in.at(l1 + "gate_up_proj").bytes);
  EXPECT_EQ(g.at(l1 + "down_proj").bytes, p.at(l1 + "down_proj").bytes);
  EXPECT_EQ(g.at(l3 + "gate_up_proj").bytes, p.at(l3 + "gate_up_proj").bytes);
}

// convert writes the fused layout back byte for byte.
TEST(Llama4Cli, ConvertRoundTrip) {
  TempDir tmp;
  const fs::path out = tmp.path() / "c";
  const RunResult r = run_tool({"-q", "convert", llama4_fixture().string(), out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const TensorMap in = read_tensors(llama4_fixture()), got = read_tensors(out);
  EXPECT_EQ(got.size(), in.size());
  for (const auto& [name, t] : in) {
    ASSERT_TRUE(got.count(name)) << name;
    EXPECT_EQ(got.at(name).bytes, t.bytes) << name;
  }
}

}  // namespace
}  // namespace moe::test
