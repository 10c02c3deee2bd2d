// Model::load on every family (layer kinds, experts, shared experts, fused views), outputs()
// reproducing the input names and bytes, rewritten_config, parameter counts, and the errors of
// checkpoints that disagree with their config.
#include <gtest/gtest.h>

#include <set>
#include <vector>

#include "io/checkpoint.h"
#include "model/model.h"
#include "model/summary.h"
#include "runtime/mtp.h"
#include "support/expect_error.h"
#include "support/synth.h"

namespace moe::model {
namespace {

using core::DType;
using core::ErrorKind;
using nlohmann::json;
using test::expect_error;

std::string bytes(const core::Tensor& t) { return std::string(reinterpret_cast<const char*>(t.data()), t.nbytes()); }
std::string bytes(const test::SynthTensor& t) { return std::string(t.data.begin(), t.data.end()); }

struct Loaded {
  test::TempDir tmp{"moe-model"};
  test::SynthCheckpoint synth;
  std::optional<io::Checkpoint> ckpt;
  std::optional<Model> model;
};

std::unique_ptr<Loaded> load(const std::string& family, const test::SynthSpec& spec = {}) {
  auto l = std::make_unique<Loaded>();
  l->synth = test::make_synth(family, spec);
  test::write_synth(l->synth, l->tmp.path());
  l->ckpt = io::Checkpoint::open(io::Env::posix(), l->tmp.path());
  l->model = Model::load(*l->ckpt);
  return l;
}

// Loads and expects an error; returns its message.
std::string load_error(const std::string& family, const test::SynthSpec& spec, std::initializer_list<std::string> parts,
                       std::optional<ErrorKind> kind = ErrorKind::Corruption) {
  test::TempDir tmp("moe-model");
  test::synth_to(tmp.path(), family, spec);
  return expect_error([&] {
    auto ck = io::Checkpoint::open(io::Env::posix(), tmp.path());
    Model::load(ck);
  }, kind, parts);
}

struct Expect {
  std::string family;
  int layers;
  std::set<int> dense;
  int64_t shared_width;  // 0: none
  bool shared_gate;
  bool router_bias;
  bool tied;
  size_t extras;
  int64_t kv_heads;
};

void PrintTo(const Expect& x, std::ostream* os) { *os << x.family; }

const std::vector<Expect>& expectations() {
  static const std::vector<Expect> v = {
      {"mixtral", 2, {}, 0, false, false, false, 0, 2},
      {"qwen2_moe", 3, {0}, 32, true, false, false, 0, 2},
      {"qwen3_moe", 2, {}, 0, false, false, false, 0, 2},
      {"olmoe", 2, {}, 0, false, false, false, 0, 2},
      {"deepseek_v2", 3, {0}, 16, false, false, false, 0, 4},
      {"deepseek_v3", 3, {0}, 16, false, true, false, 30, 4},
      {"phimoe", 2, {}, 0, false, false, false, 0, 2},
      {"granitemoe", 2, {}, 0, false, false, true, 0, 2},
      {"llama", 2, {0, 1}, 0, false, false, false, 0, 2},
      {"mistral", 2, {0, 1}, 0, false, false, false, 0, 2},
      {"qwen2", 2, {0, 1}, 0, false, false, true, 0, 2},
      {"qwen3", 2, {0, 1}, 0, false, false, true, 0, 2},
  };
  return v;
}

class EveryFamily : public ::testing::TestWithParam<Expect> {};

TEST_P(EveryFamily, LoadsWithTheRightStructure) {
  const Expect& x = GetParam();
  auto l = load(x.family);
  const Model& m = *l->model;
  const FamilyDesc& f = m.family();
  EXPECT_EQ(f.model_type, x.family);
  const Dims& d = m.dims();
  EXPECT_EQ(d.layers, x.layers);
  EXPECT_EQ(d.hidden, 32);
  EXPECT_EQ(d.heads, 4);
  EXPECT_EQ(d.kv_heads, x.kv_heads);
  EXPECT_EQ(d.head_dim, 8);
  EXPECT_EQ(d.vocab, 64);
  EXPECT_EQ(d.top_k, test::synth_is_moe(x.family) ? 2 : 0);
  EXPECT_EQ(m.tied_embeddings(), x.tied);
  EXPECT_EQ(m.extras().size(), x.extras);
  ASSERT_EQ(m.layers().size(), static_cast<size_t>(x.layers));

  for (const Layer& layer : m.layers()) {
    SCOPED_TRACE("layer " + std::to_string(layer.index));
    const std::string prefix = "model.layers." + std::to_string(layer.index) + ".";
    // Attention and norm tensors are views of exactly the named on-disk tensors.
    for (const auto& role : f.layer_roles) {
      auto it = layer.tensors.find(role.role);
      const test::SynthTensor* st = l->synth.find(prefix + role.name);
      EXPECT_EQ(it != layer.tensors.end(), st != nullptr) << role.role;
      if (it != layer.tensors.end() && st) {
        EXPECT_EQ(bytes(it->second), bytes(*st)) << role.role;
      }
    }
    if (x.dense.count(layer.index)) {
      EXPECT_FALSE(layer.moe.has_value());
      ASSERT_TRUE(layer.mlp.has_value());
      EXPECT_EQ(layer.mlp->width(), 64);
      EXPECT_EQ(bytes(layer.mlp->gate), bytes(l->synth.at(prefix + "mlp.gate_proj.weight")));
      EXPECT_EQ(bytes(layer.mlp->up), bytes(l->synth.at(prefix + "mlp.up_proj.weight")));
      EXPECT_EQ(bytes(layer.mlp->down), bytes(l->synth.at(prefix + "mlp.down_proj.weight")));
      continue;
    }
    EXPECT_FALSE(layer.mlp.has_value());
    ASSERT_TRUE(layer.moe.has_value());
    const MoeBlock& b = *layer.moe;
    EXPECT_EQ(b.num_experts(), 4);
    EXPECT_EQ(b.router.shape(), (core::Shape{4, 32}));
    EXPECT_EQ(bytes(b.router), bytes(l->synth.at(prefix + f.router)));
    EXPECT_EQ(b.router_bias.has_value(), x.router_bias);
    if (b.router_bias) {
      EXPECT_EQ(b.router_bias->dtype(), DType::F32);
      EXPECT_EQ(b.router_bias->shape(), (core::Shape{4}));
    }
    for (int e = 0; e < 4; ++e) {
      const Mlp& ex = b.experts[e];
      EXPECT_EQ(ex.width(), 16);
      EXPECT_EQ(ex.gate.shape(), (core::Shape{16, 32}));
      EXPECT_EQ(ex.up.shape(), (core::Shape{16, 32}));
      EXPECT_EQ(ex.down.shape(), (core::Shape{32, 16}));
      if (!f.fused()) {
        EXPECT_EQ(bytes(ex.gate), bytes(l->synth.at(prefix + expand(f.expert_gate, layer.index, e)))) << e;
        EXPECT_EQ(bytes(ex.up), bytes(l->synth.at(prefix + expand(f.expert_up, layer.index, e)))) << e;
        EXPECT_EQ(bytes(ex.down), bytes(l->synth.at(prefix + expand(f.expert_down, layer.index, e)))) << e;
      }
    }
    EXPECT_EQ(b.shared.has_value(), x.shared_width > 0);
    if (b.shared) {
      EXPECT_EQ(b.shared->width(), x.shared_width);
    }
    EXPECT_EQ(b.shared_gate.has_value(), x.shared_gate);
  }
}

TEST_P(EveryFamily, OutputsReproduceTheInputExactly) {
  const Expect& x = GetParam();
  auto l = load(x.family);
  const auto outs = l->model->outputs();
  ASSERT_FALSE(outs.empty());
  EXPECT_EQ(outs.front().name, "model.embed_tokens.weight");
  std::set<std::string> names;
  for (const auto& o : outs) {
    EXPECT_TRUE(names.insert(o.name).second) << "duplicate output " << o.name;
    const test::SynthTensor* st = l->synth.find(o.name);
    ASSERT_NE(st, nullptr) << "output " << o.name << " is not an input tensor";
    EXPECT_EQ(o.dtype, st->dtype) << o.name;
    EXPECT_EQ(o.shape, st->shape) << o.name;
    const core::Tensor t = o.make();
    EXPECT_EQ(t.dtype(), o.dtype);
    EXPECT_EQ(t.shape(), o.shape);
    EXPECT_EQ(bytes(t), bytes(*st)) << o.name;
  }
  const auto in = l->synth.names();
  EXPECT_EQ(names, std::set<std::string>(in.begin(), in.end()));
  EXPECT_EQ(outs.size(), in.size());
}

TEST_P(EveryFamily, OutputsConvertFloatTensors) {
  const Expect& x = GetParam();
  auto l = load(x.family);
  for (const auto& o : l->model->outputs(DType::F32)) {
    EXPECT_EQ(o.dtype, DType::F32) << o.name;
    const core::Tensor t = o.make();
    ASSERT_EQ(t.nbytes(), static_cast<size_t>(core::shape_numel(o.shape)) * core::dtype_size(t.dtype())) << o.name;
    // The values are the same as the input's.
    const auto& st = l->synth.at(o.name);
    core::Tensor src(st.dtype, st.shape, st.data.data(), nullptr);
    EXPECT_EQ(t.converted(DType::F32).to_f32(), src.to_f32()) << o.name;
  }
}

TEST_P(EveryFamily, RewrittenConfigIsTheInputWhenUnchanged) {
  const Expect& x = GetParam();
  auto l = load(x.family);
  EXPECT_EQ(l->model->rewritten_config(), l->synth.config);
  json bf = l->model->rewritten_config(DType::F16);
  EXPECT_EQ(bf["torch_dtype"], "float16");
  bf["torch_dtype"] = "bfloat16";
  EXPECT_EQ(bf, l->synth.config);
  EXPECT_EQ(l->model->rewritten_config(DType::F32)["torch_dtype"], "float32");
  EXPECT_EQ(l->model->rewritten_config(DType::BF16)["torch_dtype"], "bfloat16");
}

TEST_P(EveryFamily, ParameterCounts) {
  const Expect& x = GetParam();
  auto l = load(x.family);
  int64_t total = 0;
  for (const auto& t : l->synth.tensors) total += core::shape_numel(t.shape);
  EXPECT_EQ(l->model->total_params(), total);
  int64_t moe_layers = 0;
  for (const auto& layer : l->model->layers()) moe_layers += layer.moe ? 1 : 0;
  const int64_t per_expert = 3 * 16 * 32;
  int64_t extras = 0;  // passed through (deepseek_v3's multi-token-prediction layer): not active
  for (const auto& [name, t] : l->model->extras()) extras += t.numel();
  EXPECT_EQ(extras > 0, x.family == "deepseek_v3") << x.family;
  EXPECT_EQ(l->model->active_params(), total - extras - moe_layers * (4 - 2) * per_expert);
}

INSTANTIATE_TEST_SUITE_P(Model, EveryFamily, ::testing::ValuesIn(expectations()),
                         [](const auto& info) { return info.param.family; });

// ------------------------------------------------------------------ family specifics

TEST(ModelFamilies, GraniteFusedViewsSliceTheRightRows) {
  auto l = load("granitemoe");
  for (const Layer& layer : l->model->layers()) {
    const std::string p = "model.layers." + std::to_string(layer.index) + ".block_sparse_moe.";
    const std::string in = bytes(l->synth.at(p + "input_linear.weight"));    // [4, 32, 32]
    const std::string out = bytes(l->synth.at(p + "output_linear.weight"));  // [4, 32, 16]
    const size_t mat = 16 * 32 * 2;  // one [16,32] (or [32,16]) bf16 matrix
    for (int e = 0; e < 4; ++e) {
      const Mlp& ex = layer.moe->experts[e];
      EXPECT_EQ(bytes(ex.gate), in.substr((2 * e) * mat, mat)) << "gate of expert " << e;
      EXPECT_EQ(bytes(ex.up), in.substr((2 * e + 1) * mat, mat)) << "up of expert " << e;
      EXPECT_EQ(bytes(ex.down), out.substr(e * mat, mat)) << "down of expert " << e;
      EXPECT_FALSE(ex.gate.owns_data());  // zero-copy views
    }
  }
}

TEST(ModelFamilies, GraniteRestacksEditedExperts) {
  auto l = load("granitemoe");
  Model& m = *l->model;
  // Swap experts 0 and 3 of layer 1: the fused outputs must follow.
  auto& ex = m.layers()[1].moe->experts;
  std::swap(ex[0], ex[3]);
  const std::string p = "model.layers.1.block_sparse_moe.";
  const std::string in = bytes(l->synth.at(p + "input_linear.weight"));
  const size_t mat = 16 * 32 * 2;
  for (const auto& o : m.layer_outputs(1)) {
    if (o.name != p + "input_linear.weight") continue;
    const std::string got = bytes(o.make());
    EXPECT_EQ(got.substr(0, 2 * mat), in.substr(6 * mat, 2 * mat));
    EXPECT_EQ(got.substr(6 * mat, 2 * mat), in.substr(0, 2 * mat));
    EXPECT_EQ(got.substr(2 * mat, 4 * mat), in.substr(2 * mat, 4 * mat));
  }
}

TEST(ModelFamilies, Qwen2MoeSparseStepAndMlpOnlyLayers) {
  {
    auto l = load("qwen2_moe", {.layers = 4, .config_patch = {{"decoder_sparse_step", 2}, {"mlp_only_layers", json::array()}}});
    std::vector<bool> moe;
    for (const auto& layer : l->model->layers()) moe.push_back(layer.moe.has_value());
    EXPECT_EQ(moe, (std::vector<bool>{false, true, false, true}));
  }
  {
    auto l = load("qwen2_moe", {.layers = 4, .config_patch = {{"decoder_sparse_step", 1}, {"mlp_only_layers", {1, 3}}}});
    std::vector<bool> moe;
    for (const auto& layer : l->model->layers()) moe.push_back(layer.moe.has_value());
    EXPECT_EQ(moe, (std::vector<bool>{true, false, true, false}));
    EXPECT_EQ(l->model->layers()[1].mlp->width(), 64);
  }
  {  // no shared expert when its width is 0
    auto l = load("qwen2_moe", {.config_patch = {{"shared_expert_intermediate_size", 0}}});
    EXPECT_FALSE(l->model->layers()[1].moe->shared.has_value());
    EXPECT_FALSE(l->model->layers()[1].moe->shared_gate.has_value());
  }
  const auto& f = family_for(Config(json{{"model_type", "qwen3_moe"}}, "c"));
  Config c(json{{"decoder_sparse_step", 3}, {"mlp_only_layers", {5}}}, "c");
  std::vector<int> moe;
  for (int i = 0; i < 9; ++i)
    if (is_moe_layer(f, c, i)) moe.push_back(i);
  EXPECT_EQ(moe, (std::vector<int>{2, 8}));
}

TEST(ModelFamilies, DeepSeekFirstKDenseAndLayerFreq) {
  {
    auto l = load("deepseek_v2", {.layers = 4, .config_patch = {{"first_k_dense_replace", 2}}});
    std::vector<bool> moe;
    for (const auto& layer : l->model->layers()) moe.push_back(layer.moe.has_value());
    EXPECT_EQ(moe, (std::vector<bool>{false, false, true, true}));
  }
  {
    auto l = load("deepseek_v3", {.layers = 5, .config_patch = {{"first_k_dense_replace", 1}, {"moe_layer_freq", 2}}});
    std::vector<bool> moe;
    for (const auto& layer : l->model->layers()) moe.push_back(layer.moe.has_value());
    EXPECT_EQ(moe, (std::vector<bool>{false, false, true, false, true}));
  }
  {  // q_proj variant of MLA (q_lora_rank null) on v3 and the low-rank one on v2
    auto l = load("deepseek_v3", {.config_patch = {{"q_lora_rank", nullptr}}});
    EXPECT_NE(l->model->layers()[0].find("q_proj"), nullptr);
    EXPECT_EQ(l->model->layers()[0].find("q_a_proj"), nullptr);
    auto l2 = load("deepseek_v2", {.config_patch = {{"q_lora_rank", 12}}});
    EXPECT_EQ(l2->model->layers()[0].find("q_proj"), nullptr);
    ASSERT_NE(l2->model->layers()[0].find("q_a_norm"), nullptr);
    EXPECT_EQ(l2->model->layers()[0].find("q_a_norm")->shape(), (core::Shape{12}));
  }
  {  // shared experts: width = n_shared_experts x moe_intermediate_size
    auto l = load("deepseek_v3", {.config_patch = {{"n_shared_experts", 2}}});
    EXPECT_EQ(l->model->layers()[1].moe->shared->width(), 32);
  }
}

// The synthetic v3's multi-token-prediction layer 3 (its own tensors and a full decoder block) is
// read as extras; adopt_mtp_layer moves the block into the layers as layer 3, its own tensors stay.
TEST(ModelFamilies, DeepSeekV3MtpLayersPassThrough) {
  auto l = load("deepseek_v3");
  EXPECT_EQ(l->model->extras().size(), 30u);
  EXPECT_EQ(l->model->mtp_moe_layers(), (std::vector<int>{3}));
  model::Model m = *l->model;
  EXPECT_EQ(runtime::adopt_mtp_layer(m), 3);
  EXPECT_EQ(runtime::adopted_mtp_layer(m), 3);
  std::set<std::string> extras;
  for (const auto& [name, t] : m.extras()) extras.insert(name);
  EXPECT_EQ(extras, (std::set<std::string>{"model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight",
                                           "model.layers.3.hnorm.weight", "model.layers.3.shared_head.norm.weight"}));
  ASSERT_EQ(m.layers().size(), 4u);
  ASSERT_TRUE(m.layers()[3].moe);
  EXPECT_EQ(m.layers()[3].moe->num_experts(), 4);
  EXPECT_TRUE(m.layers()[3].moe->router_bias && m.layers()[3].moe->shared);
  EXPECT_NE(m.layers()[3].find("kv_b_proj"), nullptr);
  EXPECT_EQ(runtime::adopt_mtp_layer(m), -1);  // once
}

// DeepSeek-V3 keeps e_score_correction_bias in F32 whatever --dtype says: in the decoder layers and
// in the multi-token-prediction layer alike.
TEST(ModelFamilies, DeepSeekV3CorrectionBiasStaysF32InEveryLayer) {
  auto l = load("deepseek_v3");
  int seen = 0;
  for (const auto& o : l->model->outputs(DType::BF16)) {
    if (o.name.find("e_score_correction_bias") == std::string::npos) continue;
    ++seen;
    EXPECT_EQ(o.dtype, DType::F32) << o.name;
  }
  EXPECT_EQ(seen, 3);  // layers 1, 2 and the MTP layer 3
}

TEST(ModelFamilies, PhimoeBiasesAndLayerNorms) {
  auto l = load("phimoe");
  const Model& m = *l->model;
  EXPECT_EQ(m.globals().count("final_norm_bias"), 1u);
  EXPECT_EQ(m.globals().count("lm_head_bias"), 1u);
  for (const char* role : {"q_bias", "k_bias", "v_bias", "o_bias", "input_norm_bias", "post_attn_norm_bias"})
    EXPECT_NE(m.layers()[0].find(role), nullptr) << role;
  // lm_head.bias only when lm_head_bias says so.
  auto l2 = load("phimoe", {.config_patch = {{"lm_head_bias", false}}});
  EXPECT_EQ(l2->model->globals().count("lm_head_bias"), 0u);
}

TEST(ModelFamilies, QkNormsAndBiases) {
  auto olmoe = load("olmoe");
  EXPECT_EQ(olmoe->model->layers()[0].find("q_norm")->shape(), (core::Shape{32}));
  EXPECT_EQ(olmoe->model->layers()[0].find("k_norm")->shape(), (core::Shape{16}));
  auto q3 = load("qwen3_moe");
  EXPECT_EQ(q3->model->layers()[0].find("q_norm")->shape(), (core::Shape{8}));
  auto q2 = load("qwen2");
  EXPECT_EQ(q2->model->layers()[0].find("q_bias")->shape(), (core::Shape{32}));
  EXPECT_EQ(q2->model->layers()[0].find("k_bias")->shape(), (core::Shape{16}));
  EXPECT_EQ(q2->model->layers()[0].find("o_bias"), nullptr);
  auto llama = load("llama", {.config_patch = {{"attention_bias", true}}});
  EXPECT_NE(llama->model->layers()[1].find("o_bias"), nullptr);
}

// ------------------------------------------------------------------ rewritten config

TEST(RewrittenConfig, ExpertCountFollowsTheModel) {
  for (const std::string fam : {"mixtral", "qwen2_moe", "deepseek_v3", "granitemoe"}) {
    SCOPED_TRACE(fam);
    auto l = load(fam);
    Model& m = *l->model;
    const std::string count_key = m.family().expert_count_key;
    for (auto& layer : m.layers()) {
      if (!layer.moe) continue;
      layer.moe->experts.resize(3);
      layer.moe->router = layer.moe->router.slice0(0, 3);
    }
    json c = m.rewritten_config();
    EXPECT_EQ(c[count_key], 3);
    EXPECT_EQ(c["num_experts_per_tok"], 2);
    for (auto& layer : m.layers())
      if (layer.moe) layer.moe->experts.resize(1);
    c = m.rewritten_config();
    EXPECT_EQ(c[count_key], 1);
    EXPECT_EQ(c["num_experts_per_tok"], 1) << "top-k must be clamped to the expert count";
    // deepseek_v3's expert groups are gone once the count changes: plain top-k.
    if (fam == "deepseek_v3") {
      EXPECT_EQ(l->synth.config["n_group"], 2);
      EXPECT_EQ(c["n_group"], 1);
      EXPECT_EQ(c["topk_group"], 1);
    }
    // Everything else unchanged.
    json rest = c, orig = l->synth.config;
    for (const char* k : {"num_experts_per_tok", "n_group", "topk_group"}) {
      rest.erase(k);
      orig.erase(k);
    }
    rest.erase(count_key);
    orig.erase(count_key);
    EXPECT_EQ(rest, orig);
  }
}

TEST(RewrittenConfig, WidthKeyFollowsTheExperts) {
  auto l = load("qwen3_moe");
  for (auto& layer : l->model->layers())
    for (auto& e : layer.moe->experts) {
      e.gate = e.gate.slice0(0, 8);
      e.up = e.up.slice0(0, 8);
    }
  json c = l->model->rewritten_config();
  EXPECT_EQ(c["moe_intermediate_size"], 8);
  EXPECT_EQ(c["intermediate_size"], 64);  // dense width untouched
}

TEST(RewrittenConfig, LayersThatDisagreeAreRefusedOrNative) {
  auto l = load("mixtral");
  l->model->layers()[1].moe->experts.resize(3);
  l->model->layers()[1].moe->router = l->model->layers()[1].moe->router.slice0(0, 3);
  // Ragged counts: refused for a stock output, written in the native format otherwise.
  expect_error([&] { l->model->rewritten_config(model::OutputOptions{std::nullopt, /*materialize=*/true}); },
               ErrorKind::NotSupported, {"layer 1 has 3 experts but layer 0 has 4", "same expert count in every MoE layer"});
  const auto cfg = l->model->rewritten_config();
  EXPECT_EQ(cfg.at("num_local_experts"), 4);
  EXPECT_EQ(cfg.at("quantization_config").at("quant_method"), "moe_tool");
  EXPECT_EQ(cfg.at("quantization_config").at("experts_per_layer"), nlohmann::json({4, 3}));
  auto l2 = load("olmoe");
  auto& e0 = l2->model->layers()[0].moe->experts[0];
  e0.gate = e0.gate.slice0(0, 8);
  expect_error([&] { l2->model->rewritten_config(); }, ErrorKind::NotSupported, {"layer 0", "experts of different widths"});
}

// ------------------------------------------------------------------ errors

TEST(ModelErrors, MissingExpert) {
  load_error("mixtral", {.drop = {"model.layers.1.block_sparse_moe.experts.3.w2.weight"}},
             {"tensor model.layers.1.block_sparse_moe.experts.3.w2.weight: missing (expert 3)"});
  load_error("qwen3_moe", {.drop = {"model.layers.0.mlp.experts.2.up_proj.weight"}},
             {"model.layers.0.mlp.experts.2.up_proj.weight: missing (expert 2)"});
}

TEST(ModelErrors, ExtraExpertsOrConfigSaysFewer) {
  load_error("mixtral", {.config_edit = {{"num_local_experts", 3}}},
             {"model.layers.0.block_sparse_moe.gate.weight: shape [4, 32] but config (num_local_experts=3, hidden_size) implies [3, 32]"});
  auto extra = test::synth_tensor("model.layers.0.mlp.experts.4.gate_proj.weight", DType::BF16, {16, 32}, 1);
  load_error("olmoe", {.extra = {extra}},
             {"tensor model.layers.0.mlp.experts.4.gate_proj.weight: not expected for olmoe with this config.json (num_experts=4)"});
  load_error("mixtral", {.config_edit = {{"num_local_experts", 5}}}, {"implies [5, 32]"});
}

TEST(ModelErrors, ShapesDisagreeWithConfig) {
  load_error("mixtral", {.config_edit = {{"hidden_size", 48}}},
             {"model.embed_tokens.weight: shape [64, 32] but config (vocab_size, hidden_size) implies [64, 48]"});
  load_error("mixtral", {.config_edit = {{"vocab_size", 100}}}, {"model.embed_tokens.weight", "implies [100, 32]"});
  load_error("mixtral", {.config_edit = {{"intermediate_size", 17}}},
             {"tensor model.layers.0.block_sparse_moe.experts.0.w1.weight: shape [16, 32]", "implies [17, 32]"});
  load_error("llama", {.reshape = {{"model.layers.1.self_attn.k_proj.weight", {8, 32}}}},
             {"model.layers.1.self_attn.k_proj.weight: shape [8, 32]", "implies [16, 32]", "num_key_value_heads=2"});
  load_error("qwen2", {.reshape = {{"model.layers.0.self_attn.v_proj.bias", {15}}}},
             {"model.layers.0.self_attn.v_proj.bias: shape [15]", "implies [16]"});
  load_error("granitemoe", {.config_edit = {{"intermediate_size", 8}}},
             {"block_sparse_moe.input_linear.weight: shape [4, 32, 32]", "implies [4, 16, 32]"});
  load_error("qwen2_moe", {.config_edit = {{"shared_expert_intermediate_size", 16}}},
             {"mlp.shared_expert.gate_proj.weight: shape [32, 32]", "implies [16, 32]"});
  load_error("deepseek_v3", {.reshape = {{"model.layers.2.mlp.gate.e_score_correction_bias", {5}}}},
             {"model.layers.2.mlp.gate.e_score_correction_bias: shape [5]", "implies [4]"});
  load_error("deepseek_v2", {.reshape = {{"model.layers.1.self_attn.kv_a_proj_with_mqa.weight", {20, 16}}}},
             {"layer 1 kv_a_proj", "[20, 16]", "hidden_size 32"});
  load_error("qwen3", {.reshape = {{"model.norm.weight", {33}}}}, {"model.norm.weight: shape [33]", "implies [32]"});
  // phimoe's final LayerNorm bias and lm_head bias (read past their end before).
  load_error("phimoe", {.reshape = {{"model.norm.bias", {16}}}}, {"model.norm.bias: shape [16] but hidden_size implies [32]"});
  load_error("phimoe", {.reshape = {{"lm_head.bias", {1}}}}, {"lm_head.bias: shape [1] but vocab_size implies"});
}

TEST(ModelErrors, MissingTensors) {
  load_error("llama", {.drop = {"lm_head.weight"}}, {"tensor lm_head.weight: missing (required by llama)"});
  load_error("qwen2", {.config_patch = {{"tie_word_embeddings", false}}, .drop = {"lm_head.weight"}}, {"lm_head.weight: missing"});
  load_error("qwen2_moe", {.drop = {"model.layers.2.mlp.shared_expert_gate.weight"}},
             {"model.layers.2.mlp.shared_expert_gate.weight: missing (shared expert gate)"});
  load_error("deepseek_v3", {.drop = {"model.layers.1.mlp.gate.e_score_correction_bias"}},
             {"model.layers.1.mlp.gate.e_score_correction_bias: missing"});
  load_error("deepseek_v2", {.drop = {"model.layers.0.self_attn.q_proj.weight"}},
             {"model.layers.0.self_attn.q_proj.weight: missing (neither q_proj nor q_a_proj/q_a_layernorm/q_b_proj)"});
  load_error("qwen2_moe", {.drop = {"model.layers.0.mlp.down_proj.weight"}},
             {"model.layers.0.mlp.down_proj.weight: missing (dense MLP)"});
  load_error("phimoe", {.drop = {"model.layers.1.post_attention_layernorm.bias"}},
             {"model.layers.1.post_attention_layernorm.bias: missing (required by phimoe)"});
  load_error("mixtral", {.rename = {{"model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.block_sparse_moe.router.weight"}}},
             {"model.layers.0.block_sparse_moe.gate.weight: missing (router of MoE layer 0)"});
}

TEST(ModelErrors, LayerCounts) {
  load_error("mixtral", {.config_edit = {{"num_hidden_layers", 3}}}, {"tensor model.layers.2.", "missing"});
  load_error("mixtral", {.config_edit = {{"num_hidden_layers", 1}}},
             {"tensor model.layers.1.", "layer 1 but num_hidden_layers is 1"});
  // DeepSeek-V2 has no MTP layers: a layer past num_hidden_layers is an error.
  auto mtp = test::synth_tensor("model.layers.3.enorm.weight", DType::BF16, {32}, 1);
  load_error("deepseek_v2", {.extra = {mtp}}, {"model.layers.3.enorm.weight: layer 3 but num_hidden_layers is 3"});
}

TEST(ModelErrors, ConfigValues) {
  load_error("mixtral", {.config_edit = {{"num_hidden_layers", nullptr}}}, {"config.json: num_hidden_layers: missing (required)"});
  load_error("mixtral", {.config_edit = {{"num_experts_per_tok", 5}}}, {"num_experts_per_tok: 5 exceeds num_local_experts 4"});
  load_error("mixtral", {.config_edit = {{"num_key_value_heads", 3}}}, {"num_key_value_heads: 3 does not divide num_attention_heads 4"});
  load_error("llama", {.config_edit = {{"head_dim", nullptr}, {"hidden_size", 30}}},
             {"hidden_size 30 is not a multiple of num_attention_heads 4"});
  load_error("qwen2_moe", {.config_edit = {{"num_experts", "4"}}}, {"num_experts: expected a positive integer, found \"4\""});
  load_error("mixtral", {.config_edit = {{"model_type", "mixtral2"}}}, {"unknown family 'mixtral2'", "supported: "},
             ErrorKind::NotSupported);
  load_error("qwen2_moe", {.config_edit = {{"decoder_sparse_step", 0}}}, {"decoder_sparse_step: expected a positive integer, found 0"});
  load_error("deepseek_v3", {.config_edit = {{"moe_layer_freq", 0}}}, {"moe_layer_freq: expected a positive integer, found 0"});
}

// Config values large enough to overflow int64 products (heads x head_dim, n_shared_experts x
// width, 2 x width) must be refused, not multiplied (found by fuzz_config under UBSan).
TEST(ModelErrors, HugeConfigValuesAreRefused) {
  const int64_t huge = int64_t{1} << 62;
  load_error("mixtral", {.config_edit = {{"head_dim", huge}}}, {"head_dim: expected at most 2147483647, found 4611686018427387904"});
  load_error("deepseek_v3", {.config_edit = {{"n_shared_experts", huge}}}, {"n_shared_experts: expected at most 2147483647"});
  load_error("granitemoe", {.config_edit = {{"intermediate_size", huge}}}, {"intermediate_size: expected at most 2147483647"});
  load_error("llama", {.config_edit = {{"num_attention_heads", huge}, {"num_key_value_heads", huge}}},
             {"num_attention_heads: expected at most 2147483647"});
  // 2^31 - 1 itself is a valid value (it then disagrees with the tensors).
  load_error("mixtral", {.config_edit = {{"vocab_size", 2147483647}}}, {"model.embed_tokens.weight", "implies [2147483647, 32]"});
}

// ------------------------------------------------------------------ summary

TEST(Summary, MixtralAndQwen2Moe) {
  auto l = load("mixtral");
  json s = summarize(*l->ckpt, *l->model, false);
  EXPECT_EQ(s["family"], "mixtral");
  EXPECT_EQ(s["architectures"], json({"MixtralForCausalLM"}));
  EXPECT_EQ(s["layers"], 2);
  EXPECT_EQ(s["hidden_size"], 32);
  EXPECT_EQ(s["attention_heads"], 4);
  EXPECT_EQ(s["kv_heads"], 2);
  EXPECT_EQ(s["head_dim"], 8);
  EXPECT_EQ(s["vocab_size"], 64);
  EXPECT_EQ(s["moe"], true);
  EXPECT_EQ(s["experts_per_layer"], 4);
  EXPECT_EQ(s["experts_per_token"], 2);
  EXPECT_EQ(s["expert_width"], 16);
  EXPECT_EQ(s["shared_experts"], 0);
  EXPECT_EQ(s["moe_layers"], 2);
  EXPECT_EQ(s["dense_layers"], json::array());
  EXPECT_EQ(s["tensors"], l->synth.tensors.size());
  EXPECT_EQ(s["shards"], 1);
  EXPECT_FALSE(s.contains("tensor_list"));
  int64_t params = 0;
  for (const auto& t : l->synth.tensors) params += core::shape_numel(t.shape);
  EXPECT_EQ(s["params_total"], params);
  EXPECT_EQ(s["bytes_total"], 2 * params);
  EXPECT_EQ(s["bytes_by_dtype"], (json{{"BF16", 2 * params}}));

  auto q = load("qwen2_moe");
  json t = summarize(*q->ckpt, *q->model, true);
  EXPECT_EQ(t["family"], "qwen2_moe");
  EXPECT_EQ(t["layers"], 3);
  EXPECT_EQ(t["dense_layers"], json::array({0}));
  EXPECT_EQ(t["moe_layers"], 2);
  EXPECT_EQ(t["shared_experts"], 1);
  EXPECT_EQ(t["shared_expert_width"], 32);
  ASSERT_EQ(t["tensor_list"].size(), q->synth.tensors.size());
  EXPECT_EQ(t["tensor_list"][0], (json{{"name", "model.embed_tokens.weight"}, {"dtype", "BF16"}, {"shape", {64, 32}},
                                       {"shard", "model.safetensors"}}));
  const std::string text = render_summary(t);
  EXPECT_NE(text.find("qwen2_moe"), std::string::npos);
  EXPECT_NE(text.find("model.layers.2.mlp.shared_expert_gate.weight  BF16 [1,32]  model.safetensors"), std::string::npos) << text;
}


// A tensor that config.json turns off (a bias under "attention_bias": false, the lm_head bias
// under "lm_head_bias": false) but the files store is ignored, as transformers ignores an
// unexpected key: not loaded (so the forward does not use it) and not written by any output.
TEST(ModelFamilies, TensorsTheConfigTurnsOffAreIgnored) {
  for (const auto& [family, key] : std::vector<std::pair<std::string, std::string>>{
           {"mixtral", "attention_bias"}, {"phimoe", "attention_bias"}, {"phimoe", "lm_head_bias"}}) {
    const auto l = load(family, {.config_patch = {{key, true}}, .config_edit = {{key, false}}});
    const std::string stored = key == "lm_head_bias" ? "lm_head.bias" : "model.layers.0.self_attn.q_proj.bias";
    ASSERT_TRUE(l->synth.find(stored)) << family << " " << key;
    const auto& layer = l->model->layers().at(0);
    if (key == "attention_bias") EXPECT_EQ(layer.tensors.count("q_bias"), 0u) << family;
    else EXPECT_EQ(l->model->globals().count("lm_head_bias"), 0u) << family;
    for (const auto& o : l->model->outputs()) EXPECT_NE(o.name, stored) << family << " " << key;
    // With the key true the same files load the tensor.
    const auto on = load(family, {.config_patch = {{key, true}}});
    if (key == "attention_bias") EXPECT_EQ(on->model->layers().at(0).tensors.count("q_bias"), 1u) << family;
  }
}

}  // namespace
}  // namespace moe::model
