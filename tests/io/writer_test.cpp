// CheckpointWriter: round trip through the reader, file layout, shard cutting, index content,
// chunked out-of-order writes, misuse; parse_size.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/checkpoint_writer.h"
#include "support/ckpt_util.h"
#include "support/synth.h"

namespace moe::io {
namespace {

using core::DType;
using core::Error;
using core::ErrorKind;
using nlohmann::json;
using test::SynthTensor;

uint64_t read_u64(const std::string& s) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(s[i]);
  return n;
}

std::vector<SynthTensor> mixed_tensors() {
  std::vector<SynthTensor> v;
  const DType all[] = {DType::BF16, DType::F32, DType::F16, DType::F64, DType::F8_E4M3, DType::F8_E5M2,
                       DType::I64, DType::I32, DType::I16, DType::I8, DType::U8, DType::BOOL};
  int i = 0;
  for (DType t : all) v.push_back(test::synth_tensor("t" + std::to_string(i++) + "." + core::dtype_name(t), t, {3, 5}, 3));
  v.push_back(test::synth_tensor("empty", DType::F32, {0, 4}, 3));
  v.push_back(test::synth_tensor("scalar", DType::F32, {}, 3));
  return v;
}

void write_all(const fs::path& dir, const std::vector<SynthTensor>& ts, uint64_t max_shard) {
  std::vector<TensorSpec> plan;
  for (const auto& t : ts) plan.push_back({t.name, t.dtype, t.shape});
  CheckpointWriter w(Env::posix(), dir, plan, max_shard);
  for (const auto& t : ts) w.write(t.name, 0, t.data.data(), t.data.size());
  w.finish();
}

test::TensorMap as_map(const std::vector<SynthTensor>& ts) {
  test::SynthCheckpoint ck;
  ck.tensors = ts;
  return test::synth_tensors(ck);
}

TEST(CheckpointWriter, SingleFileRoundTripAndLayout) {
  test::TempDir tmp("moe-w");
  const auto ts = mixed_tensors();
  write_all(tmp.path(), ts, 5'000'000'000ull);
  EXPECT_EQ(test::list_dir(tmp.path()), (std::vector<std::string>{"model.safetensors"}));

  const std::string bytes = test::read_file(tmp / "model.safetensors");
  const uint64_t n = read_u64(bytes);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes[8], '{');
  const std::string header = bytes.substr(8, n);
  EXPECT_EQ(header.find_last_not_of(' ') + 1 + (8 - (header.find_last_not_of(' ') + 1) % 8) % 8, header.size())
      << "padding must be the minimum number of spaces";
  const json j = json::parse(header);
  EXPECT_EQ(j.at("__metadata__"), (json{{"format", "pt"}}));
  EXPECT_EQ(j.size(), ts.size() + 1);
  // Data in plan order, contiguous from 0.
  uint64_t off = 0;
  for (const auto& t : ts) {
    EXPECT_EQ(j.at(t.name).at("data_offsets"), (json{off, off + t.data.size()})) << t.name;
    EXPECT_EQ(j.at(t.name).at("dtype"), core::dtype_name(t.dtype));
    EXPECT_EQ(j.at(t.name).at("shape"), json(t.shape));
    EXPECT_EQ(bytes.compare(8 + n + off, t.data.size(), std::string(t.data.begin(), t.data.end())), 0) << t.name;
    off += t.data.size();
  }
  EXPECT_EQ(bytes.size(), 8 + n + off);
  EXPECT_EQ(test::first_difference(test::read_tensors(tmp.path()), as_map(ts)), "");
}

TEST(CheckpointWriter, ShardCuttingAndIndex) {
  // Sizes 100, 100, 100, 250, 50 with a 200-byte limit: [100,100] [100] [250] [50].
  test::TempDir tmp("moe-w");
  std::vector<SynthTensor> ts = {
      test::synth_tensor("a", DType::U8, {100}, 1), test::synth_tensor("b", DType::U8, {50}, 1),
      test::synth_tensor("c", DType::F32, {25}, 1), test::synth_tensor("big", DType::BF16, {125}, 1),
      test::synth_tensor("d", DType::I8, {50}, 1)};
  ts[1] = test::synth_tensor("b", DType::BF16, {50}, 1);
  write_all(tmp.path(), ts, 200);
  EXPECT_EQ(test::list_dir(tmp.path()),
            (std::vector<std::string>{"model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
                                      "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors",
                                      "model.safetensors.index.json"}));
  const json index = json::parse(test::read_file(tmp / "model.safetensors.index.json"));
  EXPECT_EQ(index, (json{{"metadata", {{"total_size", 600}}},
                         {"weight_map",
                          {{"a", "model-00001-of-00004.safetensors"},
                           {"b", "model-00001-of-00004.safetensors"},
                           {"c", "model-00002-of-00004.safetensors"},
                           {"big", "model-00003-of-00004.safetensors"},
                           {"d", "model-00004-of-00004.safetensors"}}}}));
  // weight_map keys are written sorted by name.
  const std::string text = test::read_file(tmp / "model.safetensors.index.json");
  EXPECT_LT(text.find("\"a\""), text.find("\"b\""));
  EXPECT_LT(text.find("\"big\""), text.find("\"c\""));
  // Each shard is a valid safetensors file with the format metadata.
  for (int s = 1; s <= 4; ++s) {
    const std::string bytes = test::read_file(tmp / ("model-0000" + std::to_string(s) + "-of-00004.safetensors"));
    EXPECT_EQ(read_u64(bytes) % 8, 0u);
    EXPECT_EQ(bytes[8], '{');
    EXPECT_EQ(json::parse(bytes.substr(8, read_u64(bytes))).at("__metadata__"), (json{{"format", "pt"}}));
  }
  EXPECT_EQ(test::first_difference(test::read_tensors(tmp.path()), as_map(ts)), "");
  test::write_file(tmp / "config.json", "{}");
  auto ck = Checkpoint::open(Env::posix(), tmp.path());
  EXPECT_EQ(ck.shards().size(), 4u);
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b", "c", "big", "d"}));
  EXPECT_EQ(ck.total_tensor_bytes(), 600u);
}

TEST(CheckpointWriter, OneShardPerTensorWhenLimitIsTiny) {
  test::TempDir tmp("moe-w");
  const auto ts = mixed_tensors();
  write_all(tmp.path(), ts, 1);
  test::write_file(tmp / "config.json", "{}");
  auto ck = Checkpoint::open(Env::posix(), tmp.path());
  // Every non-empty tensor gets a shard of its own; the empty tensor opens one that the scalar
  // after it joins (an open shard holding 0 bytes takes the next tensor whatever its size).
  EXPECT_EQ(ck.shards().size(), ts.size() - 1);
  EXPECT_EQ(test::first_difference(test::read_tensors(tmp.path()), as_map(ts)), "");
  const json index = json::parse(test::read_file(tmp / "model.safetensors.index.json"));
  EXPECT_EQ(index.at("weight_map").size(), ts.size());
  uint64_t total = 0;
  for (const auto& t : ts) total += t.data.size();
  EXPECT_EQ(index.at("metadata").at("total_size"), total);
}

TEST(CheckpointWriter, ChunkedWritesInAnyOrder) {
  test::TempDir tmp("moe-w");
  const auto ts = mixed_tensors();
  std::vector<TensorSpec> plan;
  for (const auto& t : ts) plan.push_back({t.name, t.dtype, t.shape});
  CheckpointWriter w(Env::posix(), tmp.path(), plan, 64);
  EXPECT_GT(w.shard_count(), 1u);
  EXPECT_EQ(w.shard_names().front(), "model-00001-of-" + std::string(5 - std::to_string(w.shard_count()).size(), '0') +
                                         std::to_string(w.shard_count()) + ".safetensors");
  for (auto it = ts.rbegin(); it != ts.rend(); ++it) {
    const auto& t = *it;
    // Second half first, then first half, in 7-byte pieces.
    const size_t half = t.data.size() / 2;
    for (size_t o = half; o < t.data.size(); o += 7) w.write(t.name, o, t.data.data() + o, std::min<size_t>(7, t.data.size() - o));
    for (size_t o = 0; o < half; o += 7) w.write(t.name, o, t.data.data() + o, std::min<size_t>(7, half - o));
  }
  w.finish();
  EXPECT_EQ(test::first_difference(test::read_tensors(tmp.path()), as_map(ts)), "");
}

TEST(CheckpointWriter, WholeTensorWriteChecksPlan) {
  test::TempDir tmp("moe-w");
  CheckpointWriter w(Env::posix(), tmp.path(), {{"x", DType::F32, {2}}}, 1000);
  core::Tensor wrong = core::Tensor::from_f32({1, 2, 3}, {3});
  EXPECT_THROW(w.write("x", wrong), Error);
  core::Tensor bf = core::Tensor::from_f32({1, 2}, {2}).converted(DType::BF16);
  EXPECT_THROW(w.write("x", bf), Error);
  w.write("x", core::Tensor::from_f32({1, 2}, {2}));
  w.finish();
  auto m = test::read_tensors(tmp.path());
  EXPECT_EQ(m.at("x").bytes, std::string("\x00\x00\x80\x3f\x00\x00\x00\x40", 8));
}

TEST(CheckpointWriter, Misuse) {
  test::TempDir tmp("moe-w");
  {
    CheckpointWriter w(Env::posix(), tmp.path(), {{"x", DType::F32, {2}}, {"y", DType::U8, {3}}}, 1000);
    EXPECT_THROW(w.write("nope", 0, "abcd", 4), Error);
    EXPECT_THROW(w.write("x", 4, "abcdefgh", 8), Error);  // past its 8 bytes
    w.write("x", 0, "abcdefgh", 8);
    try {
      w.finish();
      ADD_FAILURE() << "finish() with y unwritten";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Internal);
      EXPECT_NE(e.message().find("tensor y written 0 of 3 bytes"), std::string::npos) << e.message();
    }
  }
  EXPECT_THROW(CheckpointWriter(Env::posix(), tmp.path(), {{"x", DType::F32, {2}}}, 0), Error);
  EXPECT_THROW(CheckpointWriter(Env::posix(), tmp.path(), {{"x", DType::F32, {2}}, {"x", DType::F32, {2}}}, 100), Error);
}

TEST(CheckpointWriter, EmptyPlanWritesAnEmptyFile) {
  test::TempDir tmp("moe-w");
  CheckpointWriter w(Env::posix(), tmp.path(), {}, 1000);
  w.finish();
  EXPECT_EQ(w.shard_count(), 1u);
  auto hd = SafetensorsFile::open(Env::posix(), tmp / "model.safetensors");
  EXPECT_TRUE(hd->header().tensors.empty());
}

TEST(ParseSize, UnitsAsHuggingFace) {
  EXPECT_EQ(parse_size("5GB"), 5'000'000'000ull);
  EXPECT_EQ(parse_size("500MB"), 500'000'000ull);
  EXPECT_EQ(parse_size("2GiB"), 2147483648ull);
  EXPECT_EQ(parse_size("3MiB"), 3145728ull);
  EXPECT_EQ(parse_size("10KiB"), 10240ull);
  EXPECT_EQ(parse_size("10kb"), 10000ull);
  EXPECT_EQ(parse_size("1000000"), 1000000ull);
  EXPECT_EQ(parse_size("64B"), 64ull);
  EXPECT_EQ(parse_size("1.5GB"), 1'500'000'000ull);
  EXPECT_EQ(parse_size("2TB"), 2'000'000'000'000ull);
  // Sizes beyond 2^63 bytes (their conversion to an integer would be undefined) are refused too.
  for (const char* bad : {"", "GB", "abc", "5XB", "0", "0.1", "-5GB", "5 GB", "1.5.3GB", ".", "..GB", "10000000TB",
                          "99999999999999999999999999999999999999TB"}) {
    try {
      parse_size(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument) << bad;
      EXPECT_NE(e.message().find(std::string("'") + bad + "'"), std::string::npos) << e.message();
    }
  }
}

}  // namespace
}  // namespace moe::io
