// Checkpoints that loaders read differently: tie_word_embeddings with a stored lm_head that is
// not the embeddings (transformers ties: followed, one warning line), and the expert-count and
// top-k keys given twice with different values (refused).
#include <gtest/gtest.h>

#include "io/checkpoint.h"
#include "model/model.h"
#include "support/expect_error.h"
#include "support/synth.h"

namespace moe::model {
namespace {

using core::ErrorKind;
using nlohmann::json;
using test::expect_error;

// A mixtral synth with tie_word_embeddings true and a stored lm_head.weight: the embeddings'
// bytes when `same`, other values otherwise.
test::SynthCheckpoint tied_with_head(bool same) {
  test::SynthSpec spec;
  spec.config_patch = {{"tie_word_embeddings", true}};
  auto ck = test::make_synth("mixtral", spec);
  test::SynthTensor head = ck.at("model.embed_tokens.weight");
  head.name = "lm_head.weight";
  if (!same) head = test::synth_tensor("lm_head.weight", head.dtype, head.shape, 99);
  ck.tensors.push_back(head);
  return ck;
}

struct Opened {
  test::TempDir tmp{"moe-conflicts"};
  std::optional<io::Checkpoint> ckpt;
};

std::unique_ptr<Opened> open_synth(const test::SynthCheckpoint& ck) {
  auto o = std::make_unique<Opened>();
  test::write_synth(ck, o->tmp.path());
  o->ckpt = io::Checkpoint::open(io::Env::posix(), o->tmp.path());
  return o;
}

TEST(LoaderConflicts, TiedConfigWithADifferentStoredHeadUsesTheEmbeddingsAndWarnsOnce) {
  auto o = open_synth(tied_with_head(false));
  testing::internal::CaptureStderr();
  const Model m = Model::load(*o->ckpt);
  const Model again = Model::load(*o->ckpt);  // the same checkpoint loaded twice in one run
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_TRUE(m.tied_embeddings());
  EXPECT_FALSE(m.globals().count("lm_head"));
  // One line, naming the file, the key and the tensor, said once.
  EXPECT_NE(err.find("config.json: tie_word_embeddings is true but lm_head.weight is stored and differs"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  // The stored head is neither used nor carried along as an unknown tensor.
  for (const auto& [name, t] : m.extras()) EXPECT_NE(name, "lm_head.weight");
  EXPECT_EQ(m.rewritten_config().at("tie_word_embeddings"), true);
}

TEST(LoaderConflicts, TiedConfigWithTheEmbeddingsStoredAsHeadIsSilent) {
  auto o = open_synth(tied_with_head(true));
  testing::internal::CaptureStderr();
  const Model m = Model::load(*o->ckpt);
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");
  EXPECT_TRUE(m.globals().count("lm_head"));  // as before: kept, equal to the embeddings
}

TEST(LoaderConflicts, UntiedHeadIsUsed) {
  auto o = open_synth(test::make_synth("mixtral"));
  const Model m = Model::load(*o->ckpt);
  EXPECT_FALSE(m.tied_embeddings());
}

TEST(LoaderConflicts, ExpertCountGivenTwiceWithDifferentValuesIsRefused) {
  for (const char* family : {"mixtral", "qwen2_moe", "deepseek_v3"}) {
    const auto base = test::make_synth(family);
    const FamilyDesc& f = family_for(Config(base.config, "config.json"));
    const int64_t E = base.config.at(f.expert_count_key).get<int64_t>();
    const std::string alias = f.expert_count_key == "num_experts" ? "num_local_experts" : "num_experts";
    test::SynthSpec spec;
    spec.config_edit = {{alias, E + 1}};
    auto bad = open_synth(test::make_synth(family, spec));
    expect_error([&] { Model::load(*bad->ckpt); }, ErrorKind::Corruption,
                 {"config.json: " + alias + " " + std::to_string(E + 1) + " disagrees with " + f.expert_count_key + " " +
                  std::to_string(E)});
    spec.config_edit = {{alias, E}};  // the same value twice: one model for every loader
    auto ok = open_synth(test::make_synth(family, spec));
    EXPECT_NO_THROW(Model::load(*ok->ckpt)) << family;
  }
}

TEST(LoaderConflicts, TopKGivenTwiceWithDifferentValuesIsRefused) {
  test::SynthSpec spec;
  spec.config_edit = {{"moe_topk", 1}};
  auto bad = open_synth(test::make_synth("mixtral", spec));
  expect_error([&] { Model::load(*bad->ckpt); }, ErrorKind::Corruption,
               {"moe_topk 1 disagrees with num_experts_per_tok 2"});
  spec.config_edit = {{"moe_topk", "two"}};
  auto text = open_synth(test::make_synth("mixtral", spec));
  expect_error([&] { Model::load(*text->ckpt); }, ErrorKind::Corruption, {"moe_topk \"two\" disagrees"});
}

TEST(LoaderConflicts, RewrittenConfigKeepsTheOtherSpellingInStep) {
  test::SynthSpec spec;
  spec.config_edit = {{"num_experts", 4}, {"moe_topk", 2}};
  auto o = open_synth(test::make_synth("mixtral", spec));
  Model m = Model::load(*o->ckpt);
  ASSERT_EQ(m.config().json().at("num_local_experts"), 4);
  for (auto& layer : m.layers())
    if (layer.moe) layer.moe->experts.resize(1);  // one expert left: top-k is clamped to 1 too
  const json c = m.rewritten_config();
  EXPECT_EQ(c.at("num_local_experts"), 1);
  EXPECT_EQ(c.at("num_experts"), 1);
  EXPECT_EQ(c.at("num_experts_per_tok"), 1);
  EXPECT_EQ(c.at("moe_topk"), 1);
}

TEST(LoaderConflicts, HeadDimIsFollowedAndTheShapesMustAgreeWithIt) {
  // head_dim 16 with hidden 32 / 4 heads (8): used, as transformers' attention uses it.
  test::SynthSpec spec;
  spec.config_patch = {{"head_dim", 16}};
  auto o = open_synth(test::make_synth("mixtral", spec));
  EXPECT_EQ(Model::load(*o->ckpt).dims().head_dim, 16);
  // The key says 16 but the tensors were made for 8: no loader can read it one way silently.
  spec.config_patch = nullptr;
  spec.config_edit = {{"head_dim", 16}};
  auto bad = open_synth(test::make_synth("mixtral", spec));
  expect_error([&] { Model::load(*bad->ckpt); }, ErrorKind::Corruption, {"self_attn.q_proj.weight", "head_dim=16"});
}

}  // namespace
}  // namespace moe::model
