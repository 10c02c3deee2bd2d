// Block-scaled FP8 checkpoints (DeepSeek-V3 / Qwen3 "fp8": X.weight F8_E4M3 + X.weight_scale_inv,
// quantization_config.weight_block_size) through the CLI on a synthetic qwen3_moe: every
// projection stored as FP8 codes with F32 scales in ragged [3, 5] blocks. Dequantization is
// checked against the hand-computed code * scale; the forward must see the dequantized weights;
// passes keep FP8 (prune: bytes, merge: re-quantized blocks); malformed scales fail cleanly.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/tensor.h"
#include "io/checkpoint.h"
#include "support/cli_expect.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using core::DType;
using nlohmann::json;
namespace fs = std::filesystem;

constexpr int64_t kBr = 3, kBc = 5;

bool is_projection(const std::string& name) {
  return name.ends_with("_proj.weight") && name.rfind("model.layers.", 0) == 0;
}

std::vector<float> f32_of(const SynthTensor& t) {
  std::vector<float> v(static_cast<size_t>(core::shape_numel(t.shape)));
  core::to_f32(t.dtype, t.data.data(), v.data(), v.size());
  return v;
}

// The synthetic qwen3_moe with every projection as FP8 codes + positive F32 block scales.
SynthCheckpoint fp8_checkpoint(const json& block_size = json::array({kBr, kBc})) {
  SynthSpec spec;
  spec.config_patch = {{"quantization_config",
                        {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                         {"weight_block_size", block_size}}}};
  SynthCheckpoint ck = make_synth("qwen3_moe", spec);
  std::vector<SynthTensor> scales;
  for (auto& t : ck.tensors) {
    if (!is_projection(t.name)) continue;
    const core::Shape shape = t.shape;
    t = synth_tensor(t.name, DType::F8_E4M3, shape, 7);
    SynthTensor s = synth_tensor(t.name + "_scale_inv", DType::F32,
                                 {(shape[0] + kBr - 1) / kBr, (shape[1] + kBc - 1) / kBc}, 8);
    auto* f = reinterpret_cast<float*>(s.data.data());
    for (int64_t i = 0; i < core::shape_numel(s.shape); ++i) f[i] = 0.01f + std::fabs(f[i]);
    scales.push_back(std::move(s));
  }
  for (auto& s : scales) ck.tensors.push_back(std::move(s));
  return ck;
}


void expect_clean_failure(const RunResult& r, const std::string& needle, const fs::path& out) {
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  ASSERT_EQ(r.err_lines().size(), 1u) << r.describe();
  EXPECT_NE(r.err.find(needle), std::string::npos) << r.describe();
  EXPECT_FALSE(fs::exists(out));
}

TEST(Fp8, ConvertDequantizesWithTheBlockScales) {
  TempDir tmp;
  const SynthCheckpoint ck = fp8_checkpoint();
  write_synth(ck, tmp / "in", {.tokenizer = true});
  const RunResult ins = run_tool({"inspect", (tmp / "in").string(), "--json"});
  ASSERT_EQ(ins.exit_code, 0) << ins.describe();
  const json q = json::parse(ins.out)["quantization"];
  int64_t n = 0, weights = 0, scales = 0;
  for (const auto& t : ck.tensors)
    if (is_projection(t.name)) {
      ++n;
      weights += core::shape_numel(t.shape);
      scales += core::shape_numel(ck.at(t.name + "_scale_inv").shape);
    }
  EXPECT_EQ(q["weights"], n);
  EXPECT_EQ(q["block"], json::array({kBr, kBc}));
  EXPECT_DOUBLE_EQ(q["bits_per_weight"].get<double>(), 8.0 + 32.0 * static_cast<double>(scales) / static_cast<double>(weights));
  const RunResult text = run_tool({"inspect", (tmp / "in").string()});
  EXPECT_NE(text.out.find("fp8 block-scaled"), std::string::npos) << text.out;

  // --dtype f32: value(i, j) = code(i, j) * scale(i / 3, j / 5), scales and quantization_config gone.
  const RunResult r = run_tool({"-q", "convert", (tmp / "in").string(), (tmp / "f32").string(), "--dtype", "f32"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto out = io::Checkpoint::open(io::Env::posix(), tmp / "f32");
  int checked = 0;
  for (const auto& t : ck.tensors) {
    if (t.name.ends_with("_scale_inv")) {
      EXPECT_FALSE(out.has(t.name)) << t.name;
      continue;
    }
    if (!is_projection(t.name)) continue;
    const std::vector<float> code = f32_of(t), scale = f32_of(ck.at(t.name + "_scale_inv"));
    const core::Tensor got = out.tensor(t.name);
    ASSERT_EQ(got.dtype(), DType::F32);
    const float* g = reinterpret_cast<const float*>(got.data());
    const int64_t rows = t.shape[0], cols = t.shape[1], scols = (cols + kBc - 1) / kBc;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j)
        ASSERT_EQ(g[i * cols + j], code[i * cols + j] * scale[(i / kBr) * scols + j / kBc]) << t.name << " " << i << "," << j;
    ++checked;
  }
  EXPECT_GT(checked, 10);
  const json cfg = read_json(tmp / "f32" / "config.json");
  EXPECT_FALSE(cfg.contains("quantization_config"));
  EXPECT_EQ(cfg["torch_dtype"], "float32");

  // No --dtype: FP8 codes and scales copied bit for bit, config unchanged.
  const RunResult same = run_tool({"-q", "convert", (tmp / "in").string(), (tmp / "same").string()});
  ASSERT_EQ(same.exit_code, 0) << same.describe();
  const auto copy = io::Checkpoint::open(io::Env::posix(), tmp / "same");
  for (const auto& t : ck.tensors) {
    ASSERT_TRUE(copy.has(t.name)) << t.name;
    const core::Tensor c = copy.tensor(t.name);
    ASSERT_EQ(c.nbytes(), t.data.size());
    EXPECT_EQ(0, std::memcmp(c.data(), t.data.data(), t.data.size())) << t.name;
  }
  EXPECT_EQ(read_json(tmp / "same" / "config.json")["quantization_config"], ck.config["quantization_config"]);
}

TEST(Fp8, ForwardUsesTheDequantizedWeights) {
  // The FP8 model and its f32 dequantization are the same model: KL 0, top-1 agreement 1.
  TempDir tmp;
  write_synth(fp8_checkpoint(), tmp / "in", {.tokenizer = true});
  ASSERT_EQ(run_tool({"-q", "convert", (tmp / "in").string(), (tmp / "f32").string(), "--dtype", "f32"}).exit_code, 0);
  const fs::path text = fs::path(MOE_SOURCE_DIR) / "data/text/heldout.txt";
  const RunResult r = run_tool({"eval", (tmp / "in").string(), "--against", (tmp / "f32").string(), "--text",
                                text.string(), "--ctx", "32", "--max-windows", "4", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json j = json::parse(r.out);
  EXPECT_LT(j["kl_mean"].get<double>(), 1e-9) << r.out;
  EXPECT_EQ(j["top1_agreement"].get<double>(), 1.0);
  // And the same perplexity as the f32 model on its own (ignoring the scales, 0.01 ... 0.51, would
  // give another model: the convert test pins the dequantized values).
  const RunResult plain = run_tool({"eval", (tmp / "f32").string(), "--text", text.string(), "--ctx", "32",
                                    "--max-windows", "4", "--json"});
  ASSERT_EQ(plain.exit_code, 0) << plain.describe();
  const double ppl = j["perplexity"].get<double>();
  EXPECT_NEAR(json::parse(plain.out)["perplexity"].get<double>(), ppl, 1e-6 * ppl);
}

TEST(Fp8, PruneKeepsAndMergeRequantizesFp8) {
  TempDir tmp;
  const SynthCheckpoint ck = fp8_checkpoint();
  write_synth(ck, tmp / "in", {.tokenizer = true});
  // Prune: the kept experts' codes and scales byte for byte, still an fp8 checkpoint.
  RunResult r = run_tool({"-q", "prune", (tmp / "in").string(), (tmp / "pruned").string(), "--method", "random",
                          "--keep", "3"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json report = read_json(tmp / "pruned" / "moe_tool_report.json");
  const auto kept = report["layers"][0]["passes"][0]["kept"].get<std::vector<int>>();
  const auto pruned = io::Checkpoint::open(io::Env::posix(), tmp / "pruned");
  for (size_t j = 0; j < kept.size(); ++j)
    for (const char* suffix : {".weight", ".weight_scale_inv"}) {
      const std::string a = "model.layers.0.mlp.experts." + std::to_string(kept[j]) + ".down_proj" + suffix;
      const std::string b = "model.layers.0.mlp.experts." + std::to_string(j) + ".down_proj" + suffix;
      const core::Tensor t = pruned.tensor(b);
      ASSERT_EQ(t.nbytes(), ck.at(a).data.size());
      EXPECT_EQ(0, std::memcmp(t.data(), ck.at(a).data.data(), t.nbytes())) << a << " -> " << b;
    }
  EXPECT_TRUE(read_json(tmp / "pruned" / "config.json").contains("quantization_config"));

  // Merge: new experts are FP8 with new block scales; dequantized, they are the weighted average
  // of the dequantized members to FP8 precision (3 mantissa bits: 1/16 of the block's max).
  r = run_tool({"-q", "merge", (tmp / "in").string(), (tmp / "merged").string(), "--method", "hcsmoe", "--experts", "2",
                "--no-align", "--text", (fs::path(MOE_SOURCE_DIR) / "data/text/calib.txt").string(), "--ctx", "32",
                "--windows", "4"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json mreport = read_json(tmp / "merged" / "moe_tool_report.json");
  const json& p = mreport["layers"][0]["passes"][0];
  const auto in = io::Checkpoint::open(io::Env::posix(), tmp / "in");
  const auto merged = io::Checkpoint::open(io::Env::posix(), tmp / "merged");
  auto dequant = [](const io::Checkpoint& c, const std::string& name) {
    const core::Tensor w = c.tensor(name).with_block_scale(c.tensor(name + "_scale_inv"), kBr, kBc);
    return w.to_f32();
  };
  for (size_t g = 0; g < p["groups"].size(); ++g) {
    const std::string name = "model.layers.0.mlp.experts." + std::to_string(g) + ".up_proj.weight";
    ASSERT_EQ(merged.tensor(name).dtype(), DType::F8_E4M3);
    const std::vector<float> got = dequant(merged, name);
    std::vector<float> want(got.size(), 0.0f);
    for (size_t i = 0; i < p["groups"][g].size(); ++i) {
      const int e = p["groups"][g][i].get<int>();
      const std::vector<float> m = dequant(in, "model.layers.0.mlp.experts." + std::to_string(e) + ".up_proj.weight");
      for (size_t k = 0; k < m.size(); ++k) want[k] += static_cast<float>(p["weights"][g][i].get<double>()) * m[k];
    }
    float maxabs = 0;
    for (float v : want) maxabs = std::max(maxabs, std::fabs(v));
    for (size_t k = 0; k < got.size(); ++k) ASSERT_NEAR(got[k], want[k], maxabs / 16 + 1e-6) << name << " " << k;
  }
  EXPECT_TRUE(read_json(tmp / "merged" / "config.json").contains("quantization_config"));
}

TEST(Fp8, MalformedScalesFailCleanly) {
  struct Case {
    const char* what;
    std::function<void(SynthCheckpoint&)> edit;
    const char* needle;
  };
  const std::string w = "model.layers.0.mlp.experts.1.gate_proj.weight";
  auto find = [](SynthCheckpoint& ck, const std::string& n) -> SynthTensor& {
    for (auto& t : ck.tensors)
      if (t.name == n) return t;
    throw std::runtime_error("no tensor " + n);
  };
  const std::vector<Case> cases = {
      {"scale missing",
       [&](SynthCheckpoint& ck) { std::erase_if(ck.tensors, [&](const SynthTensor& t) { return t.name == w + "_scale_inv"; }); },
       "gate_proj.weight: F8_E4M3 weight without model.layers.0.mlp.experts.1.gate_proj.weight_scale_inv"},
      {"scale shape",
       [&](SynthCheckpoint& ck) { find(ck, w + "_scale_inv") = synth_tensor(w + "_scale_inv", DType::F32, {2, 2}, 1); },
       "gate_proj.weight_scale_inv: scale shape [2, 2], expected [6, 7] for weight [16, 32] in blocks of [3, 5]"},
      {"scale dtype",
       [&](SynthCheckpoint& ck) { find(ck, w + "_scale_inv") = synth_tensor(w + "_scale_inv", DType::I32, {6, 7}, 1); },
       "gate_proj.weight_scale_inv: scale dtype I32, expected F32 or BF16"},
      {"scale of a bf16 weight",
       [&](SynthCheckpoint& ck) {
         ck.tensors.push_back(synth_tensor("model.layers.0.mlp.gate.weight_scale_inv", DType::F32, {2, 7}, 1));
       },
       "a block-scaled weight must be a rank-2 F8_E4M3 tensor, found BF16"},
      {"scale without weight",
       [&](SynthCheckpoint& ck) {
         ck.tensors.push_back(synth_tensor("model.layers.0.mlp.experts.9.up_proj.weight_scale_inv", DType::F32, {6, 7}, 1));
       },
       "experts.9.up_proj.weight_scale_inv: a block scale without the weight"},
      {"no quantization_config", [&](SynthCheckpoint& ck) { ck.config.erase("quantization_config"); },
       "a block scale, but config.json has no quantization_config"},
      {"bad block size",
       [&](SynthCheckpoint& ck) { ck.config["quantization_config"]["weight_block_size"] = json::array({0, 5}); },
       "quantization_config.weight_block_size: expected two positive integers, found [0,5]"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    TempDir tmp;
    SynthCheckpoint ck = fp8_checkpoint();
    c.edit(ck);
    write_synth(ck, tmp / "in");
    expect_clean_failure(run_tool({"convert", (tmp / "in").string(), (tmp / "out").string(), "--dtype", "bf16"}),
                         c.needle, tmp / "out");
  }
}

}  // namespace
}  // namespace moe::test
