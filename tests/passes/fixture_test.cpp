// Passes on a real (synthetic, bf16) checkpoint loaded through Model::load: the family's own
// routing rule, a shared expert, and the Model's config rewriting and outputs after the change.
#include <gtest/gtest.h>

#include "io/checkpoint.h"
#include "pass_test_util.h"
#include "runtime/moe_block.h"

namespace moe::passes {
namespace {

using namespace testing;
using nlohmann::json;

struct Loaded {
  io::Checkpoint ckpt;
  model::Model model;
};

Loaded load(const char* name) {
  auto ck = io::Checkpoint::open(io::Env::posix(), std::string(MOE_SOURCE_DIR) + "/data/models/synthetic/" + name);
  auto m = model::Model::load(ck);
  return {std::move(ck), std::move(m)};
}

// Runs `spec` on every MoE layer of the model with made-up statistics and random block inputs.
json run_on_all_layers(model::Model& m, const json& spec) {
  auto pass = pipeline::make_pass(spec, "passes[0]");
  const runtime::RoutingRule rule = runtime::RoutingRule::from_model(m);
  json reports = json::object();
  for (auto& layer : m.layers()) {
    if (!layer.moe) continue;
    const int E = static_cast<int>(layer.moe->num_experts());
    const int H = static_cast<int>(layer.moe->router.dim(1));
    calib::LayerStats st = make_stats(E, H);
    for (int e = 0; e < E; ++e) {
      st.count[e] = 10.0 * ((e * 7 + layer.index) % E) + 1;
      st.out_mean.row(e).setConstant(static_cast<float>(e % 2));
    }
    std::mt19937_64 rng(layer.index);
    const MatrixRM x = random_matrix(128, H, rng);
    json report = json::object();
    pipeline::LayerContext ctx{layer.index, m, layer, &st, &x, rule, 1, report};
    pass->run_layer(ctx);
    // The changed block still runs.
    const MatrixRM out = runtime::moe_forward(runtime::convert_moe(*layer.moe), rule, x);
    EXPECT_TRUE(out.allFinite());
    reports[std::to_string(layer.index)] = report;
  }
  return reports;
}

TEST(PassesOnFixture, PruneQwen2MoeWithSharedExpert) {
  Loaded l = load("qwen2moe-sparse");
  const model::Layer before = l.model.layers()[1];
  ASSERT_TRUE(before.moe && before.moe->shared);
  const json rep = run_on_all_layers(l.model, {{"pass", "prune"}, {"method", "frequency"}, {"keep", 2}});
  EXPECT_EQ(rep.size(), 2u);  // layers 1 and 3 are MoE (decoder_sparse_step 2, mlp_only_layers [0])
  const model::MoeBlock& b = *l.model.layers()[1].moe;
  EXPECT_EQ(b.num_experts(), 2);
  EXPECT_EQ(b.router.dtype(), core::DType::BF16);
  EXPECT_EQ(b.shared->gate.data(), before.moe->shared->gate.data());
  const json cfg = l.model.rewritten_config();
  EXPECT_EQ(cfg.at("num_experts"), 2);
  EXPECT_LE(cfg.at("num_experts_per_tok").get<int>(), 2);
  // Every output tensor of the changed layer has the shape the config describes.
  for (const auto& t : l.model.layer_outputs(1)) {
    const core::Tensor v = t.make();
    EXPECT_EQ(v.shape(), t.shape) << t.name;
    EXPECT_EQ(v.dtype(), t.dtype) << t.name;
  }
}

TEST(PassesOnFixture, MergeQwen3MoeWithRefitRouter) {
  Loaded l = load("qwen3moe");
  const int64_t E = l.model.layers()[0].moe->num_experts();
  ASSERT_GE(E, 3);
  const json rep = run_on_all_layers(l.model, {{"pass", "merge"}, {"method", "hcsmoe"}, {"experts", E - 1}, {"router", "refit"}});
  for (const auto& [layer, r] : rep.items()) {
    EXPECT_EQ(r.at("groups").size(), static_cast<size_t>(E - 1));
    EXPECT_EQ(r.at("router"), "refit");
  }
  const model::MoeBlock& b = *l.model.layers()[0].moe;
  EXPECT_EQ(b.num_experts(), E - 1);
  EXPECT_EQ(b.experts[0].gate.dtype(), core::DType::BF16);
  EXPECT_EQ(l.model.rewritten_config()["num_experts"], E - 1);
  int64_t count = 0;
  for (const auto& t : l.model.layer_outputs(0)) {
    const core::Tensor v = t.make();
    EXPECT_EQ(v.shape(), t.shape) << t.name;
    ++count;
  }
  EXPECT_GT(count, 3 * (E - 1));
}

}  // namespace
}  // namespace moe::passes
