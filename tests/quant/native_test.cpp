// intN and ternary weights in a native checkpoint (docs/FORMAT.md): parts written as plain
// safetensors tensors with their config.json entries load as the encodings, decode to what RTN
// produced, and `convert --materialize` writes exactly that dequantization.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "model/model.h"
#include "quant/codec.h"
#include "quant/intn.h"
#include "quant/ternary.h"
#include "support/ckpt_util.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;

std::vector<float> values_f32(const SynthTensor& t) {
  std::vector<float> v(static_cast<size_t>(core::shape_numel(t.shape)));
  core::to_f32(t.dtype, t.data.data(), v.data(), v.size());
  return v;
}

TEST(QuantNative, IntNAndTernaryWeightsLoadFromACheckpointAndMaterialize) {
  const SynthCheckpoint base = make_synth("mixtral");
  const std::string p = "model.layers.0.block_sparse_moe.experts.";
  const std::vector<std::pair<std::string, std::string>> plan = {
      {p + "1.w1.weight", "int4:g16:asym"}, {p + "1.w2.weight", "int3:row:sym"}, {p + "0.w3.weight", "ternary-minmax:row"},
      {p + "0.w2.weight", "ternary-absmean:g16:asym:refit"}};
  SynthSpec spec;
  json weights = json::object();
  std::map<std::string, std::vector<float>> want;
  for (const auto& [name, codec] : plan) {
    const SynthTensor& t = base.at(name);
    const std::vector<float> w = values_f32(t);
    const auto enc = quant::rtn(w.data(), t.shape[0], t.shape[1], quant::parse_codec(codec));
    std::vector<float> dq(w.size());
    enc->dequantize_rows(0, enc->rows(), dq.data());
    want[name] = dq;
    json entry = enc->params();
    entry["encoding"] = enc->name();
    for (const auto& part : enc->parts()) {
      const core::Tensor& pt = *part.tensor;
      spec.extra.push_back({name + part.suffix, pt.dtype(), pt.shape(),
                            std::vector<uint8_t>(pt.data(), pt.data() + pt.nbytes())});
      entry["parts"][part.role] = name + part.suffix;
    }
    weights[name] = entry;
    spec.drop.insert(name);
  }
  spec.config_edit = {{"quantization_config", {{"quant_method", "moe_tool"}, {"format_version", 1}, {"weights", weights}}}};
  TempDir tmp;
  write_synth(make_synth("mixtral", spec), tmp / "native");

  const model::Model m = model::Model::load(io::Checkpoint::open(io::Env::posix(), tmp / "native"));
  const auto& e0 = m.layers()[0].moe->experts[0];
  const auto& e1 = m.layers()[0].moe->experts[1];
  ASSERT_NE(dynamic_cast<const quant::IntN*>(e1.gate.encoding()), nullptr);
  ASSERT_NE(dynamic_cast<const quant::IntN*>(e1.down.encoding()), nullptr);
  ASSERT_NE(dynamic_cast<const quant::Ternary*>(e0.up.encoding()), nullptr);
  ASSERT_NE(dynamic_cast<const quant::Ternary*>(e0.down.encoding()), nullptr);
  EXPECT_EQ(e1.gate.to_f32(), want[p + "1.w1.weight"]);
  EXPECT_EQ(e1.down.to_f32(), want[p + "1.w2.weight"]);
  EXPECT_EQ(e0.up.to_f32(), want[p + "0.w3.weight"]);
  EXPECT_EQ(e0.down.to_f32(), want[p + "0.w2.weight"]);

  const RunResult r = run_tool({"-q", "convert", (tmp / "native").string(), (tmp / "dense").string(), "--materialize",
                                "--dtype", "f32"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const TensorMap dense = read_tensors(tmp / "dense");
  for (const auto& [name, v] : want) {
    ASSERT_TRUE(dense.count(name)) << name;
    std::vector<float> got(v.size());
    ASSERT_EQ(dense.at(name).bytes.size(), got.size() * 4) << name;
    core::to_f32(dense.at(name).dtype, dense.at(name).bytes.data(), got.data(), got.size());
    EXPECT_EQ(got, v) << name;
  }
}

}  // namespace
}  // namespace moe::test
