// phimoe (PhiMoEForCausalLM, Phi-3.5-MoE) forward against the independent NumPy reference
// data/scripts/phimoe_reference.py (written from transformers' modeling_phimoe.py) on
// data/phimoe-tiny (LayerNorm with bias, q/k/v/o biases, GQA, a sliding window of 8 < T,
// sparsemixer top-2 routing with router_jitter_noise 0.2, an lm_head bias), and the same weights
// with Phi-3.5-MoE's router_jitter_noise 0.01 and with no window: logits within 1e-4 of the
// largest |logit|, the same argmax, the same experts per token with the same weights. Plus what is
// read, calibrate's counts, the refusals, and the CLI on the fixture: eval, calibrate, prune
// --method reap, merge, quantize and factorize, and their outputs run.
#include <gtest/gtest.h>

#include <cmath>
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

const fs::path& phimoe_fixture() {
  static const fs::path p = source_dir() / "data/phimoe-tiny";
  return p;
}

TEST(PhiMoe, MatchesReference) {
  check_goldens({"phimoe", "phimoe-jitter-0.01", "phimoe-no-window", "phimoe-longrope", "phimoe-longrope-long"});
}

// What is read: LayerNorm (eps 1e-5) with the norms' biases, the window, sparsemixer with its
// jitter, the lm_head bias.
TEST(PhiMoe, ReadsLayerNormWindowAndSparseMixer) {
  auto lm = load_model(phimoe_fixture());
  const runtime::ForwardSpec s = runtime::ForwardSpec::from_model(lm->model);
  EXPECT_TRUE(s.layer_norm);
  EXPECT_DOUBLE_EQ(s.eps, 1e-5);
  EXPECT_EQ(s.attn.sliding_window, 8);
  EXPECT_EQ(s.attn.head_dim, 16);
  EXPECT_EQ(s.routing.kind, model::Routing::SparseMixer);
  EXPECT_EQ(s.routing.top_k, 2);
  EXPECT_DOUBLE_EQ(s.routing.jitter_eps, 0.2);
  EXPECT_TRUE(lm->model.globals().count("lm_head_bias"));
  EXPECT_TRUE(lm->model.globals().count("final_norm_bias"));
  EXPECT_TRUE(lm->model.layers().at(1).tensors.count("post_attn_norm_bias"));
}

// top-k other than 2, a rope_scaling other than longrope (with short/long mscale), longrope
// factors that do not fit the rotary dimension or are not positive numbers, a negative jitter: one
// error naming the key.
TEST(PhiMoe, Refusals) {
  const nlohmann::json longrope = {{"rope_type", "longrope"}, {"short_factor", {1.0}}, {"long_factor", {1.0}},
                                   {"short_mscale", 1.0}, {"long_mscale", 1.2}, {"original_max_position_embeddings", 64}};
  nlohmann::json negative = longrope;
  negative["short_factor"] = {1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0};
  nlohmann::json missing = longrope;
  missing.erase("long_factor");
  expect_forward_errors(
      phimoe_fixture(),
      {{{{"num_experts_per_tok", 3}}, "num_experts_per_tok 3: phimoe's sparsemixer routing chooses 2 experts"},
       {{{"rope_scaling", {{"rope_type", "linear"}, {"factor", 2.0}, {"short_mscale", 1.0}, {"long_mscale", 1.0}}}},
        "rope_scaling 'linear' with phimoe not implemented"},
       {{{"rope_scaling", longrope}}, "rope_scaling.short_factor: 1 values, but the rotary dimension 16 has 8 frequencies"},
       {{{"rope_scaling", negative}}, "rope_scaling.short_factor: expected positive numbers, found -1.0"},
       {{{"rope_scaling", missing}}, "rope_scaling.long_factor: expected a list of numbers (longrope), found nothing"},
       {{{"router_jitter_noise", -0.5}}, "router_jitter_noise: expected a finite number >= 0"}});
}

// calibrate on the golden's window: each expert's routed-token count and summed routing weight
// equal the reference's.
TEST(PhiMoe, CalibrateCountsEqualReference) { check_calibrate_counts("phimoe", phimoe_fixture(), 8); }

// eval, calibrate, prune --method reap --keep 6 (the per-expert layout renumbered), merge
// (M-SMoE), quantize (GPTQ int4, native) and factorize (SVD-LLM): each runs and its output runs.
TEST(PhiMoeCli, EvalCalibrateAndEveryPass) {
  TempDir tmp;
  const std::string model = phimoe_fixture().string();
  ASSERT_NO_FATAL_FAILURE(eval_calibrate_reap(model, tmp.path(), "num_local_experts"));
  const TensorMap got = read_tensors(tmp.path() / "reap");
  EXPECT_TRUE(got.count("model.layers.1.block_sparse_moe.experts.5.w2.weight"));
  EXPECT_FALSE(got.count("model.layers.1.block_sparse_moe.experts.6.w2.weight"));
  EXPECT_TRUE(got.count("lm_head.bias") && got.count("model.layers.0.input_layernorm.bias"));
  merge_quantize_factorize_run(model, tmp.path());
}

}  // namespace
}  // namespace moe::test
