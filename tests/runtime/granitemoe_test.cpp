// granitemoe (GraniteMoeForCausalLM) forward against the independent NumPy reference
// data/scripts/granitemoe_reference.py (written from transformers' modeling_granitemoe.py) on
// data/granitemoe-tiny (q/k/v/o biases, GQA, tied embeddings, top-3 of the router logits with a
// softmax over the 3, fused experts input_linear [E,2I,H] / output_linear [E,H,I], and every
// multiplier != 1: embedding_multiplier, attention_multiplier as the softmax scale,
// residual_multiplier, logits_scaling), and the same weights with the four multiplier keys removed
// (each then 1.0): logits within 1e-4 of the largest |logit|, the same argmax, the same experts
// per token with the same weights. Plus what is read, calibrate's counts, the refusals, and the CLI
// on the fixture: eval, calibrate, prune --method reap, merge, quantize and factorize, written back
// in the fused layout and run again.
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
#include "support/synth.h"

namespace moe::test {
namespace {

namespace fs = std::filesystem;

const fs::path& granite_fixture() {
  static const fs::path p = source_dir() / "data/granitemoe-tiny";
  return p;
}

TEST(GraniteMoe, MatchesReference) { check_goldens({"granitemoe", "granitemoe-default-multipliers"}); }

// What is read: the four multipliers (absent: 1), head_dim 16 = hidden / heads, top-3 of the
// router logits then a softmax, no router bias; expert 3's gate row 5 is row 5 of
// input_linear[3] (the activated first half), its up row 5 is row 16 + 5, its down is
// output_linear[3].
TEST(GraniteMoe, ReadsMultipliersAndTheFusedLayout) {
  auto lm = load_model(granite_fixture());
  const runtime::ForwardSpec s = runtime::ForwardSpec::from_model(lm->model);
  EXPECT_DOUBLE_EQ(s.embedding_multiplier, 6.0);
  ASSERT_TRUE(s.attn.scale.has_value());
  EXPECT_DOUBLE_EQ(*s.attn.scale, 0.09);
  EXPECT_DOUBLE_EQ(s.residual_multiplier, 0.35);
  EXPECT_DOUBLE_EQ(s.logits_scaling, 2.5);
  EXPECT_EQ(s.attn.head_dim, 16);
  EXPECT_EQ(s.attn.kv_heads, 2);
  EXPECT_EQ(s.routing.kind, model::Routing::TopKSoftmax);
  EXPECT_EQ(s.routing.top_k, 3);
  EXPECT_FALSE(s.routing.logit_bias);
  const model::Layer& L = lm->model.layers().at(1);
  ASSERT_TRUE(L.moe.has_value());
  EXPECT_FALSE(L.moe->router_bias.has_value());
  EXPECT_TRUE(L.tensors.count("o_bias"));
  const model::Mlp& e3 = L.moe->experts.at(3);
  EXPECT_EQ(e3.gate.shape(), (core::Shape{16, 64}));
  EXPECT_EQ(e3.down.shape(), (core::Shape{64, 16}));
  const TensorMap raw = read_tensors(granite_fixture());
  const std::string& in = raw.at("model.layers.1.block_sparse_moe.input_linear.weight").bytes;    // [8, 32, 64]
  const std::string& out = raw.at("model.layers.1.block_sparse_moe.output_linear.weight").bytes;  // [8, 64, 16]
  const std::vector<float> gate = e3.gate.to_f32(), up = e3.up.to_f32(), down = e3.down.to_f32();
  for (int64_t h : {0, 9, 63}) {
    EXPECT_EQ(gate[5 * 64 + h], bf16_at(in, (3 * 32 + 5) * 64 + h)) << h;
    EXPECT_EQ(up[5 * 64 + h], bf16_at(in, (3 * 32 + 16 + 5) * 64 + h)) << h;
    EXPECT_EQ(down[h * 16 + 5], bf16_at(out, (3 * 64 + h) * 16 + 5)) << h;
  }
  // The multiplier keys left out: 1.0 each, and the softmax scale 1.0 (not head_dim^-0.5).
  TempDir dir;
  copy_with_config(granite_fixture(), dir.path(),
                   {{"embedding_multiplier", nullptr}, {"attention_multiplier", nullptr}, {"residual_multiplier", nullptr},
                    {"logits_scaling", nullptr}});
  auto plain = load_model(dir.path());
  const runtime::ForwardSpec d = runtime::ForwardSpec::from_model(plain->model);
  EXPECT_EQ(d.embedding_multiplier, 1.0);
  EXPECT_EQ(d.attn.scale, std::optional<double>(1.0));
  EXPECT_EQ(d.residual_multiplier, 1.0);
  EXPECT_EQ(d.logits_scaling, 1.0);
}

// A zero or non-numeric multiplier, a head_dim other than hidden / heads (GraniteMoeAttention has
// no head_dim key), a position_embedding_type other than rope: one error naming the key.
TEST(GraniteMoe, Refusals) {
  expect_forward_errors(granite_fixture(),
                        {{{{"logits_scaling", 0}}, "logits_scaling: expected a finite non-zero number, found 0"},
                         {{{"residual_multiplier", "0.2"}}, "residual_multiplier: expected a number"},
                         {{{"position_embedding_type", "nope"}}, "position_embedding_type 'nope' not implemented"}});
  // The synthetic checkpoint's projections are written for head_dim 16 (hidden 32, 4 heads).
  TempDir dir;
  synth_to(dir.path(), "granitemoe", {.config_patch = {{"head_dim", 16}}});
  const std::string m = forward_error(dir.path());
  EXPECT_NE(m.find("head_dim 16: granitemoe uses hidden_size / num_attention_heads (32 / 4)"), std::string::npos) << m;
}

// calibrate on the golden's window: each expert's routed-token count and summed routing weight
// equal the reference's.
TEST(GraniteMoe, CalibrateCountsEqualReference) { check_calibrate_counts("granitemoe", granite_fixture(), 8); }

// eval, calibrate, prune --method reap --keep 6: the output is the fused layout with 6 experts
// whose router rows, input_linear and output_linear slabs are the kept input experts' bytes, and
// it runs.
TEST(GraniteMoeCli, EvalCalibrateReapWriteBack) {
  TempDir tmp;
  const std::string model = granite_fixture().string();
  expect_eval_runs(model);
  RunResult r;
  const fs::path stats = tmp.path() / "calib.stats", out = tmp.path() / "reap";
  r = run_tool({"-q", "calibrate", model, "--text", heldout_text(), "-o", stats.string(), "--ctx", "32", "--windows", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  r = run_tool({"-q", "prune", model, out.string(), "--method", "reap", "--keep", "6", "--stats", stats.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto cfg = nlohmann::json::parse(read_file(out / "config.json"));
  EXPECT_EQ(cfg.at("num_local_experts"), 6);
  EXPECT_EQ(cfg.at("model_type"), "granitemoe");
  EXPECT_EQ(cfg.at("embedding_multiplier"), 6.0);
  const TensorMap in = read_tensors(granite_fixture()), got = read_tensors(out);
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".block_sparse_moe.";
    EXPECT_EQ(got.at(p + "input_linear.weight").shape, (core::Shape{6, 32, 64}));
    EXPECT_EQ(got.at(p + "output_linear.weight").shape, (core::Shape{6, 64, 16}));
    EXPECT_EQ(got.at(p + "router.layer.weight").shape, (core::Shape{6, 64}));
    const std::vector<int> kept =
        expect_kept_expert_slabs(in, got, p + "router.layer.weight", {p + "input_linear.weight", p + "output_linear.weight"});
    EXPECT_TRUE(std::is_sorted(kept.begin(), kept.end())) << "layer " << l;  // in the input's order
  }
  expect_eval_runs(out);
}

// merge (M-SMoE) writes the fused layout with 6 experts, and it runs.
TEST(GraniteMoeCli, MergeWritesTheFusedLayout) {
  TempDir tmp;
  const fs::path merged = tmp.path() / "merged";
  const RunResult r =
      run_with_calibration({"-q", "merge", granite_fixture().string(), merged.string(), "--method", "msmoe", "--experts", "6"}, {});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const TensorMap got = read_tensors(merged);
  EXPECT_EQ(got.at("model.layers.0.block_sparse_moe.input_linear.weight").shape, (core::Shape{6, 32, 64}));
  EXPECT_EQ(got.at("model.layers.1.block_sparse_moe.output_linear.weight").shape, (core::Shape{6, 64, 16}));
  expect_eval_runs(merged);
}

// quantize (GPTQ int4) and factorize (SVD-LLM) with --materialize write the fused layout dense and
// run; without --materialize the encoded experts are refused with one line and nothing is written.
TEST(GraniteMoeCli, QuantizeFactorizeMaterialized) {
  TempDir tmp;
  const std::string model = granite_fixture().string();
  RunResult r = run_with_calibration({"-q", "quantize", model, (tmp.path() / "q0").string(), "--method", "gptq", "--codec", "int4"}, {});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_NE(r.err.find("which the fused granitemoe expert layout cannot hold: --materialize writes them dense"), std::string::npos)
      << r.err;
  EXPECT_FALSE(fs::exists(tmp.path() / "q0"));
  for (const std::vector<std::string>& dry : {std::vector<std::string>{"-q", "quantize", model, (tmp.path() / "q0").string(), "--method", "rtn", "--dry-run"},
                                             {"-q", "factorize", model, (tmp.path() / "q0").string(), "--method", "svd", "--ratio", "0.5", "--dry-run"}}) {
    r = run_with_calibration(dry, {});  // refused by the plan, before any work
    EXPECT_EQ(r.exit_code, 2) << r.describe();
    EXPECT_NE(r.err.find("which the fused granitemoe expert layout cannot hold"), std::string::npos) << r.err;
  }
  const TensorMap in = read_tensors(granite_fixture());
  for (const auto& [dir, args] : std::vector<std::pair<std::string, std::vector<std::string>>>{
           {"q", {"quantize", "--method", "gptq", "--codec", "int4"}}, {"f", {"factorize", "--method", "svdllm", "--ratio", "0.5"}}}) {
    const fs::path out = tmp.path() / dir;
    std::vector<std::string> a = {"-q", args[0], model, out.string()};
    a.insert(a.end(), args.begin() + 1, args.end());
    r = run_with_calibration(a, {"--materialize"});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    const TensorMap got = read_tensors(out);
    const std::string name = "model.layers.1.block_sparse_moe.input_linear.weight";
    EXPECT_EQ(got.at(name).shape, (core::Shape{8, 32, 64})) << dir;
    EXPECT_NE(got.at(name).bytes, in.at(name).bytes) << dir;
    expect_eval_runs(out);
  }
}

}  // namespace
}  // namespace moe::test
