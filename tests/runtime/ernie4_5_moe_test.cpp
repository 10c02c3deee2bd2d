// ernie4_5_moe (Ernie4_5_MoeForCausalLM, ERNIE-4.5 "-PT") forward against the independent NumPy
// reference data/scripts/ernie4_5_moe_reference.py (written from transformers'
// modeling_ernie4_5_moe.py) on data/ernie4_5_moe-tiny (layer 0 dense by moe_layer_start_index 1,
// GQA, RoPE on interleaved pairs, softmax routing with the [1, E] correction bias for the choice,
// top-2, one shared expert, tied embeddings), and the same weights with moe_norm_min 0.9 and with
// rope_theta left out (500000): logits within 1e-4 of the largest |logit|, the same argmax, the
// same experts per token with the same weights. Plus what is read, which layers are MoE, calibrate's
// counts, the refusals, and the CLI on the fixture: eval, calibrate, prune --method reap (the bias
// entries kept with their experts, written back as [1, E]), merge, quantize and factorize, and
// their outputs run.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/error.h"
#include "model/model.h"
#include "reference_golden.h"
#include "runtime/forward.h"
#include "runtime_test_util.h"
#include "support/ckpt_util.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

namespace fs = std::filesystem;

const fs::path& ernie_fixture() {
  static const fs::path p = source_dir() / "data/ernie4_5_moe-tiny";
  return p;
}

TEST(Ernie45Moe, MatchesReference) {
  check_goldens({"ernie4_5_moe", "ernie4_5_moe-norm-min", "ernie4_5_moe-default-theta"});
}

// What is read: interleaved RoPE, rope_theta, eps, the routing rule and moe_norm_min, layer 0 dense,
// the correction bias as [E], the shared expert's width, the tied head.
TEST(Ernie45Moe, ReadsConfigAndLayout) {
  auto lm = load_model(ernie_fixture());
  const runtime::ForwardSpec s = runtime::ForwardSpec::from_model(lm->model);
  EXPECT_TRUE(s.attn.rope_interleaved);
  EXPECT_DOUBLE_EQ(s.rope_theta, 10000.0);
  EXPECT_DOUBLE_EQ(s.eps, 1e-5);
  EXPECT_EQ(s.attn.head_dim, 16);
  EXPECT_EQ(s.routing.kind, model::Routing::SoftmaxBiasTopK);
  EXPECT_EQ(s.routing.top_k, 2);
  EXPECT_DOUBLE_EQ(s.routing.norm_min, 1e-12);
  const auto& layers = lm->model.layers();
  ASSERT_EQ(layers.size(), 3u);
  EXPECT_FALSE(layers[0].moe.has_value());
  ASSERT_TRUE(layers[1].moe && layers[2].moe);
  ASSERT_TRUE(layers[1].moe->router_bias);
  EXPECT_EQ(layers[1].moe->router_bias->shape(), core::Shape{8});
  ASSERT_TRUE(layers[1].moe->shared);
  EXPECT_EQ(layers[1].moe->shared->width(), 32);
  EXPECT_TRUE(lm->model.tied_embeddings());
}

// moe_layer_start_index / moe_layer_end_index (-1: the last layer) / moe_layer_interval as
// Ernie4_5_MoeDecoderLayer decides: (l + 1) % interval == 0 and start <= l <= end.
TEST(Ernie45Moe, MoeLayerRule) {
  model::Config base(nlohmann::json::parse(read_file(ernie_fixture() / "config.json")), "config.json");
  const model::FamilyDesc& f = model::family_for(base);
  auto moe_layers = [&](const nlohmann::json& patch, int layers) {
    nlohmann::json j = base.json();
    j["num_hidden_layers"] = layers;
    j.merge_patch(patch);
    const model::Config c(j, "config.json");
    std::vector<int> v;
    for (int l = 0; l < layers; ++l)
      if (model::is_moe_layer(f, c, l)) v.push_back(l);
    return v;
  };
  EXPECT_EQ(moe_layers(nlohmann::json::object(), 3), (std::vector<int>{1, 2}));
  EXPECT_EQ(moe_layers({{"moe_layer_start_index", nullptr}, {"moe_layer_end_index", nullptr}}, 4),
            (std::vector<int>{1, 2, 3}));
  EXPECT_EQ(moe_layers({{"moe_layer_start_index", 0}, {"moe_layer_interval", 2}}, 6), (std::vector<int>{1, 3, 5}));
  EXPECT_EQ(moe_layers({{"moe_layer_start_index", 2}, {"moe_layer_end_index", 4}}, 6), (std::vector<int>{2, 3, 4}));
}

// A negative moe_norm_min: one error naming the key; use_bias true (biases on every projection,
// experts included): refused on load with exit 2 naming the key and the family.
TEST(Ernie45Moe, Refusals) {
  expect_forward_errors(ernie_fixture(),
                        {{{{"moe_norm_min", -1.0}}, "moe_norm_min: expected a finite number >= 0"}});
  TempDir tmp;
  copy_with_config(ernie_fixture(), tmp.path(), {{"use_bias", true}});
  const RunResult r = run_tool({"-q", "inspect", tmp.path().string()});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  ASSERT_EQ(r.err_lines().size(), 1u) << r.describe();
  EXPECT_NE(r.err.find("use_bias true with ernie4_5_moe"), std::string::npos) << r.err;
}

// calibrate on the golden's window: each expert's routed-token count and summed routing weight
// equal the reference's.
TEST(Ernie45Moe, CalibrateCountsEqualReference) { check_calibrate_counts("ernie4_5_moe", ernie_fixture(), 8); }

// eval, calibrate, prune --method reap --keep 6 (experts renumbered, each kept expert's correction
// bias entry with it, written as [1, 6]), merge (M-SMoE), quantize (GPTQ int4, native) and
// factorize (SVD-LLM): each runs and its output runs.
// The released checkpoints' MTP weights (model.mtp_block.N..., model.mtp_linear_proj.N..., as
// vLLM's ernie_mtp reads them) are extras: passed through unless a pass changes the counts.
TEST(Ernie45MoeCli, MtpWeightsPassedThroughUnlessTheCountsChange) {
  expect_mtp_head_passed_through(ernie_fixture(), "model.mtp_",
                                 {"model.mtp_linear_proj.0.weight", "model.mtp_block.0.mlp.experts.0.down_proj.weight"}, "6");
}

TEST(Ernie45MoeCli, EvalCalibrateAndEveryPass) {
  TempDir tmp;
  const std::string model = ernie_fixture().string();
  ASSERT_NO_FATAL_FAILURE(eval_calibrate_reap(model, tmp.path(), "moe_num_experts"));
  const TensorMap in = read_tensors(ernie_fixture()), got = read_tensors(tmp.path() / "reap");
  for (int l : {1, 2}) {
    const std::string p = "model.layers." + std::to_string(l) + ".mlp.";
    const std::string bias = p + "moe_statics.e_score_correction_bias";
    ASSERT_TRUE(got.count(bias));
    EXPECT_EQ(got.at(bias).shape, (core::Shape{1, 6}));
    EXPECT_EQ(got.at(bias).dtype, core::DType::F32);
    EXPECT_FALSE(got.count(p + "experts.6.down_proj.weight"));
    // Each output expert: the input expert with the same router row (F32, 64 wide); its bias entry
    // and weights follow it.
    for (int k = 0; k < 6; ++k) {
      const std::string row = got.at(p + "gate.weight").bytes.substr(k * 64 * 4, 64 * 4);
      int src = -1;
      for (int e = 0; e < 8; ++e)
        if (in.at(p + "gate.weight").bytes.substr(e * 64 * 4, 64 * 4) == row) src = e;
      ASSERT_GE(src, 0) << p << " output expert " << k;
      EXPECT_EQ(got.at(bias).bytes.substr(k * 4, 4), in.at(bias).bytes.substr(src * 4, 4)) << p << " expert " << k;
      EXPECT_EQ(got.at(p + "experts." + std::to_string(k) + ".down_proj.weight").bytes,
                in.at(p + "experts." + std::to_string(src) + ".down_proj.weight").bytes);
    }
  }
  EXPECT_FALSE(got.count("lm_head.weight"));
  merge_quantize_factorize_run(model, tmp.path());
  const TensorMap merged = read_tensors(tmp.path() / "merged");
  EXPECT_EQ(merged.at("model.layers.1.mlp.moe_statics.e_score_correction_bias").shape, (core::Shape{1, 6}));
}

}  // namespace
}  // namespace moe::test
