// Checkpoint::open: single file and sharded folders, the index checked against the shards, side
// files, fingerprint; errors name the file and the problem.
#include <gtest/gtest.h>

#include <algorithm>

#include <nlohmann/json.hpp>
#include <set>

#include "io/checkpoint.h"
#include "support/ckpt_util.h"
#include "support/expect_error.h"
#include "support/synth.h"

namespace moe::io {
namespace {

using core::ErrorKind;
using nlohmann::json;
using test::expect_error;

class CheckpointTest : public ::testing::Test {
 protected:
  test::TempDir tmp{"moe-ck"};
  fs::path dir() const { return tmp / "m"; }
  test::SynthCheckpoint ck = test::make_synth("mixtral");
  void write(uint64_t shard, test::Writer w = test::Writer::HandRolled) {
    test::write_synth(ck, dir(), {.max_shard_bytes = shard, .writer = w, .tokenizer = true});
  }
  json index() const { return json::parse(test::read_file(dir() / "model.safetensors.index.json")); }
  // Shard file names from the index, sorted.
  std::vector<std::string> shards() const {
    std::set<std::string> s;
    const json ix = index();
    for (const auto& [k, v] : ix.at("weight_map").items()) s.insert(v.get<std::string>());
    return {s.begin(), s.end()};
  }
  void set_index(const json& j) { test::write_file(dir() / "model.safetensors.index.json", j.dump(2)); }
  Checkpoint open() const { return Checkpoint::open(Env::posix(), dir()); }
};

TEST_F(CheckpointTest, SingleFile) {
  write(0);
  auto c = open();
  EXPECT_EQ(c.dir(), dir());
  EXPECT_EQ(c.shards().size(), 1u);
  EXPECT_EQ(c.config().at("model_type"), "mixtral");
  EXPECT_EQ(c.config(), ck.config);
  EXPECT_EQ(c.config_text(), test::read_file(dir() / "config.json"));
  // Storage order: the hand-rolled writer lays data out in the synth order.
  EXPECT_EQ(c.names(), ck.names());
  EXPECT_TRUE(c.has("model.embed_tokens.weight"));
  EXPECT_FALSE(c.has("model.embed_tokens"));
  EXPECT_EQ(c.info("lm_head.weight").shape, (core::Shape{64, 32}));
  EXPECT_EQ(c.shard_path("lm_head.weight"), dir() / "model.safetensors");
  EXPECT_EQ(test::first_difference(test::read_tensors(dir()), test::synth_tensors(ck)), "");
  std::vector<std::string> side;
  for (const auto& p : c.side_files()) side.push_back(p.filename().string());
  EXPECT_EQ(side, (std::vector<std::string>{"config.json", "generation_config.json", "tokenizer.json",
                                            "tokenizer_config.json"}));
  uint64_t total = 0;
  for (const auto& t : ck.tensors) total += t.data.size();
  EXPECT_EQ(c.total_tensor_bytes(), total);
  expect_error([&] { c.tensor("nope"); }, ErrorKind::NotFound, {"tensor nope not found"});
  expect_error([&] { c.info("nope"); }, ErrorKind::NotFound, {"tensor nope not found"});
}

TEST_F(CheckpointTest, ShardedHandRolledAndProject) {
  for (auto w : {test::Writer::HandRolled, test::Writer::Project}) {
    std::filesystem::remove_all(dir());
    write(8000, w);
    auto c = open();
    EXPECT_GT(c.shards().size(), 2u);
    EXPECT_EQ(c.names(), ck.names());  // shard by shard, each by offset: the synth order
    EXPECT_EQ(test::first_difference(test::read_tensors(dir()), test::synth_tensors(ck)), "");
    for (const auto& p : c.side_files()) {
      EXPECT_NE(p.extension(), ".safetensors");
      EXPECT_NE(p.filename(), "model.safetensors.index.json");
    }
    const json ix = index();
    for (const auto& name : c.names()) EXPECT_EQ(c.shard_path(name).filename(), ix.at("weight_map").at(name).get<std::string>());
  }
}

TEST_F(CheckpointTest, StraySafetensorsFilesAreNotSideFiles) {
  write(0);
  test::write_file(dir() / "consolidated.safetensors", "junk");
  auto c = open();
  for (const auto& p : c.side_files()) EXPECT_NE(p.filename(), "consolidated.safetensors");
}

TEST_F(CheckpointTest, FingerprintDependsOnConfigAndHeadersOnly) {
  write(0);
  const std::string f1 = open().fingerprint();
  EXPECT_EQ(f1.size(), 16u);
  EXPECT_EQ(open().fingerprint(), f1);
  // Same headers, different data bytes: same fingerprint.
  ck = test::make_synth("mixtral", {.seed = 99});
  write(0);
  EXPECT_EQ(open().fingerprint(), f1);
  ck.config["rope_theta"] = 1.0;
  write(0);
  EXPECT_NE(open().fingerprint(), f1);
}

// The fingerprint names the model, not its storage: header order, sharding, config formatting
// and bookkeeping keys do not change it; a config value, a tensor's dtype, shape or name does.
TEST_F(CheckpointTest, FingerprintIgnoresStorageButNotTheModel) {
  auto rewrite = [&](uint64_t shard) {  // a fresh folder each time (no shards left from before)
    fs::remove_all(dir());
    write(shard);
  };
  rewrite(0);
  const std::string f1 = open().fingerprint();
  // Tensors in the reverse header order (a bit-identical convert may reorder them).
  const auto orig = ck;
  std::reverse(ck.tensors.begin(), ck.tensors.end());
  rewrite(0);
  EXPECT_NE(open().names(), orig.names());
  EXPECT_EQ(open().fingerprint(), f1);
  // Sharded.
  ck = orig;
  rewrite(4096);
  EXPECT_GT(open().shards().size(), 1u);
  EXPECT_EQ(open().fingerprint(), f1);
  // config.json reformatted (indent, a trailing newline, reordered keys) and bookkeeping keys.
  ck = orig;
  rewrite(0);
  {
    nlohmann::ordered_json reordered;
    const auto cfg = nlohmann::json::parse(test::read_file(dir() / "config.json"));
    for (auto it = cfg.rbegin(); it != cfg.rend(); ++it) reordered[it.key()] = *it;
    reordered["_name_or_path"] = "/somewhere/else";
    reordered["transformers_version"] = "9.9.9";
    test::write_file(dir() / "config.json", reordered.dump(7) + "\n\n");
  }
  EXPECT_EQ(open().fingerprint(), f1);
  // A different value, dtype, shape or name: another model.
  ck = orig;
  ck.config["rms_norm_eps"] = 1e-3;
  rewrite(0);
  EXPECT_NE(open().fingerprint(), f1);
  for (int what = 0; what < 3; ++what) {
    ck = orig;
    auto& t = ck.tensors.back();
    if (what == 0) t.dtype = core::DType::F16;
    if (what == 1) t.name += "_x";
    if (what == 2) {
      ASSERT_EQ(t.shape.size(), 2u);
      t.shape = {t.shape[0] / 2, t.shape[1] * 2};  // same bytes, another shape
    }
    rewrite(0);
    const std::string f = Checkpoint::open(Env::posix(), dir()).fingerprint();
    EXPECT_NE(f, f1) << what;
  }
}

TEST_F(CheckpointTest, MissingFolderConfigOrWeights) {
  expect_error([&] { open(); }, ErrorKind::NotFound, {dir().string(), "no such checkpoint folder"});
  test::write_file(tmp / "file", "x");
  expect_error([&] { Checkpoint::open(Env::posix(), tmp / "file"); }, ErrorKind::InvalidArgument, {"not a folder"});
  write(0);
  std::filesystem::remove(dir() / "config.json");
  expect_error([&] { open(); }, ErrorKind::NotFound, {(dir() / "config.json").string(), "no such file"});
  write(0);
  std::filesystem::remove(dir() / "model.safetensors");
  expect_error([&] { open(); }, ErrorKind::NotFound, {"no model.safetensors or model.safetensors.index.json"});
}

TEST_F(CheckpointTest, ConfigNotJsonOrNotObject) {
  write(0);
  test::write_file(dir() / "config.json", "{\"model_type\": \"mixtral\",");
  expect_error([&] { open(); }, ErrorKind::Corruption, {"config.json: not valid JSON"});
  test::write_file(dir() / "config.json", "[1, 2]");
  expect_error([&] { open(); }, ErrorKind::Corruption, {"config.json: top level is not a JSON object"});
}

TEST_F(CheckpointTest, ConfigOrWeightsAreFolders) {
  write(0);
  std::filesystem::remove(dir() / "config.json");
  std::filesystem::create_directory(dir() / "config.json");
  expect_error([&] { open(); }, std::nullopt, {"config.json", "is a directory"});
  std::filesystem::remove_all(dir() / "config.json");
  write(0);
  std::filesystem::remove(dir() / "model.safetensors");
  std::filesystem::create_directory(dir() / "model.safetensors");
  expect_error([&] { open(); }, std::nullopt, {"model.safetensors", "not a regular file"});
}

TEST_F(CheckpointTest, IndexNamesMissingShard) {
  write(8000);
  const std::string s2 = shards().at(1);
  std::filesystem::remove(dir() / s2);
  ASSERT_EQ(index()["weight_map"].size(), ck.tensors.size());
  expect_error([&] { open(); }, ErrorKind::NotFound, {s2, "no such file"});
}

TEST_F(CheckpointTest, IndexNamesTensorAbsentFromItsShard) {
  write(8000);
  json ix = index();
  ix["weight_map"]["model.layers.9.ghost.weight"] = shards().at(0);
  set_index(ix);
  expect_error([&] { open(); }, ErrorKind::Corruption,
               {"model.safetensors.index.json", "weight_map.model.layers.9.ghost.weight", "tensor not found in " + shards().at(0)});
}

TEST_F(CheckpointTest, ShardTensorMissingFromIndex) {
  write(8000);
  json ix = index();
  ix["weight_map"].erase("model.norm.weight");
  set_index(ix);
  expect_error([&] { open(); }, ErrorKind::Corruption, {"tensor model.norm.weight is missing from model.safetensors.index.json"});
}

TEST_F(CheckpointTest, IndexPointsAtTheWrongShard) {
  write(8000);
  json ix = index();
  const std::string real = ix["weight_map"]["model.norm.weight"];
  const std::string first = shards().at(0);
  ix["weight_map"]["model.norm.weight"] = first;
  ASSERT_NE(real, first);
  set_index(ix);
  expect_error([&] { open(); }, ErrorKind::Corruption,
               {"weight_map.model.norm.weight", "says " + first + " but the tensor is in " + real});
}

TEST_F(CheckpointTest, BadIndexShapes) {
  write(8000);
  const json good = index();
  const std::string shard0 = shards().at(0);
  set_index(json{{"metadata", {{"total_size", 1}}}, {"weight_map", json::array()}});
  expect_error([&] { open(); }, ErrorKind::Corruption, {"model.safetensors.index.json", "weight_map: missing or not an object"});
  set_index(json{{"metadata", {{"total_size", 1}}}});
  expect_error([&] { open(); }, ErrorKind::Corruption, {"weight_map: missing or not an object"});
  set_index(json::array({good}));
  expect_error([&] { open(); }, ErrorKind::Corruption, {"weight_map: missing or not an object"});
  set_index(json{{"weight_map", json::object()}});
  expect_error([&] { open(); }, ErrorKind::Corruption, {"weight_map is empty"});
  json ix = good;
  ix["weight_map"]["model.norm.weight"] = 3;
  set_index(ix);
  expect_error([&] { open(); }, ErrorKind::Corruption, {"weight_map.model.norm.weight: not a string"});
  for (const std::string& bad : {std::string(""), "../" + shard0, std::string("sub/x.safetensors"), std::string(".."), std::string(".")}) {
    ix = good;
    ix["weight_map"]["model.norm.weight"] = bad;
    set_index(ix);
    expect_error([&] { open(); }, ErrorKind::Corruption, {"weight_map.model.norm.weight: bad shard file name '" + bad + "'"});
  }
  test::write_file(dir() / "model.safetensors.index.json", "{\"weight_map\": {");
  expect_error([&] { open(); }, ErrorKind::Corruption, {"model.safetensors.index.json: not valid JSON"});
}

TEST_F(CheckpointTest, TensorStoredInTwoShards) {
  write(8000);
  // Copy the first tensor into the last shard as well.
  std::vector<test::SynthTensor> part;
  {
    auto c = open();
    for (const auto& info : c.shards().back()->header().tensors) part.push_back(*ck.find(info.name));
  }
  part.push_back(ck.at("model.embed_tokens.weight"));
  const std::string last = shards().back();
  test::write_file(dir() / last, test::safetensors_bytes(part));
  expect_error([&] { open(); }, ErrorKind::Corruption,
               {last + ": tensor model.embed_tokens.weight also stored in", shards().at(0)});
}

TEST_F(CheckpointTest, BrokenShardHeaderNamesTheShard) {
  write(8000);
  const std::string third = shards().at(2);
  test::write_file(dir() / third, test::raw_safetensors("[]", ""));
  expect_error([&] { open(); }, ErrorKind::Corruption, {third + ": header does not start with '{'"});
}

}  // namespace
}  // namespace moe::io
