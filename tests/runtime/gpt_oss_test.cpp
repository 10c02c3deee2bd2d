// gpt_oss (gpt-oss-20b / 120b) forward against the independent NumPy reference
// data/scripts/gpt_oss_reference.py (written from transformers' modeling_gpt_oss.py) on
// data/gpt-oss-tiny (attention with q/k/v/o biases and per-head sinks, GQA, layer 0 sliding with a
// window of 8 < T, layer 1 full, yarn RoPE with truncate false, router bias, fused experts stored
// [in, out] with gate/up interleaved and expert biases, the clamped SwiGLU acting on part of the
// values), and the same weights with every layer full: logits within 1e-4 of the largest |logit|,
// the same argmax, the same experts per token with the same weights. Plus what is read, calibrate's
// counts, and the CLI on the fixture: eval, calibrate, prune --method reap, merge, quantize and
// factorize, each written back in gpt_oss's fused layout and read again; the MXFP4 experts of the
// released checkpoints (data/gpt-oss-tiny-mxfp4, golden gpt_oss-mxfp4) decoded on load.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "calib/calibrate.h"
#include "core/error.h"
#include "reference_golden.h"
#include "support/cli_expect.h"
#include "runtime/forward.h"
#include "runtime/moe_block.h"
#include "runtime_test_util.h"
#include "support/ckpt_util.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

namespace fs = std::filesystem;

const fs::path& fixture() {
  static const fs::path p = source_dir() / "data/gpt-oss-tiny";
  return p;
}

TEST(GptOss, MatchesReference) {
  for (const char* name : {"gpt_oss", "gpt_oss-all-full", "gpt_oss-mxfp4"}) {
    SCOPED_TRACE(name);
    Checked c;
    check_against_reference(name, c);
    std::printf("[ %s ] max |logit diff| = %.3g (|logit| max %.3g)\n", name, c.max_logit_diff, c.logits_abs_max);
  }
}

// What is read: per-layer windows from layer_types, sinks, yarn (truncate false), top-k-then-softmax
// routing with the router bias in the logits, the experts unfused into [out, in] with their biases
// and the clamped SwiGLU; expert 3's gate row 5 is column 2*5 of gate_up_proj[3] (interleaved).
TEST(GptOss, ReadsTheFusedLayout) {
  auto lm = load_model(fixture());
  const runtime::ForwardSpec s = runtime::ForwardSpec::from_model(lm->model);
  EXPECT_EQ(s.layer_window, (std::vector<int64_t>{8, 0}));
  EXPECT_EQ(s.layer_attn(0).sliding_window, 8);
  EXPECT_EQ(s.layer_attn(1).sliding_window, 0);
  EXPECT_TRUE(s.attn.sinks);
  EXPECT_EQ(s.attn.head_dim, 24);
  EXPECT_EQ(s.rope_scaling.type, "yarn");
  EXPECT_FALSE(s.rope_scaling.truncate);
  EXPECT_DOUBLE_EQ(s.rope_theta, 150000.0);
  EXPECT_EQ(s.routing.kind, model::Routing::TopKSoftmax);
  EXPECT_TRUE(s.routing.logit_bias);
  EXPECT_EQ(s.routing.top_k, 4);
  const model::Layer& L = lm->model.layers().at(1);
  ASSERT_TRUE(L.moe.has_value());
  ASSERT_EQ(L.moe->num_experts(), 8);
  ASSERT_TRUE(L.moe->router_bias.has_value());
  EXPECT_TRUE(L.tensors.count("sinks"));
  EXPECT_TRUE(L.tensors.count("o_bias"));
  const model::Mlp& e3 = L.moe->experts.at(3);
  EXPECT_EQ(e3.gate.shape(), (core::Shape{16, 64}));
  EXPECT_EQ(e3.down.shape(), (core::Shape{64, 16}));
  ASSERT_TRUE(e3.gate_bias && e3.up_bias && e3.down_bias);
  EXPECT_EQ(e3.act.kind, model::GluActivation::ClampedSwiGlu);
  EXPECT_FLOAT_EQ(e3.act.alpha, 1.702f);
  EXPECT_FLOAT_EQ(e3.act.limit, 7.0f);
  const TensorMap raw = read_tensors(fixture());
  const auto bf16 = bf16_at;
  const std::string& gu = raw.at("model.layers.1.mlp.experts.gate_up_proj").bytes;      // [8, 64, 32]
  const std::string& dn = raw.at("model.layers.1.mlp.experts.down_proj").bytes;         // [8, 16, 64]
  const std::string& gub = raw.at("model.layers.1.mlp.experts.gate_up_proj_bias").bytes;  // [8, 32]
  const std::vector<float> gate = e3.gate.to_f32(), up = e3.up.to_f32(), down = e3.down.to_f32();
  for (int64_t h : {0, 7, 63}) {
    EXPECT_EQ(gate[5 * 64 + h], bf16(gu, 3 * 64 * 32 + h * 32 + 2 * 5)) << h;
    EXPECT_EQ(up[5 * 64 + h], bf16(gu, 3 * 64 * 32 + h * 32 + 2 * 5 + 1)) << h;
    EXPECT_EQ(down[h * 16 + 5], bf16(dn, 3 * 16 * 64 + 5 * 64 + h)) << h;
  }
  EXPECT_EQ(e3.gate_bias->to_f32()[5], bf16(gub, 3 * 32 + 10));
  EXPECT_EQ(e3.up_bias->to_f32()[5], bf16(gub, 3 * 32 + 11));
}

// convert writes the fused layout back byte for byte.
TEST(GptOss, ConvertWritesTheSameTensors) {
  TempDir tmp;
  const RunResult r = run_tool({"-q", "convert", fixture().string(), (tmp.path() / "out").string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(first_difference(read_tensors(fixture()), read_tensors(tmp.path() / "out")), "");
}

// calibrate on the golden's window: each expert's routed-token count and summed routing weight
// equal the reference's.
TEST(GptOss, CalibrateCountsEqualReference) { check_calibrate_counts("gpt_oss", fixture(), 8); }

// eval, calibrate, prune --method reap --keep 6: the output is gpt_oss's fused layout with 6
// experts whose tensors are the kept input experts' bytes (weights and biases), and it runs.
TEST(GptOss, EvalCalibrateReapWriteBack) {
  TempDir tmp;
  const std::string model = fixture().string(), text = (source_dir() / "data/text/heldout.txt").string();
  RunResult r = run_tool({"-q", "eval", model, "--text", text, "--ctx", "32", "--max-windows", "2", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_TRUE(std::isfinite(j.at("perplexity").get<double>())) << r.out;
  EXPECT_GT(j.at("perplexity").get<double>(), 1.0) << r.out;
  const fs::path stats = tmp.path() / "calib.stats", out = tmp.path() / "reap";
  r = run_tool({"-q", "calibrate", model, "--text", text, "-o", stats.string(), "--ctx", "32", "--windows", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  r = run_tool({"-q", "prune", model, out.string(), "--method", "reap", "--keep", "6", "--stats", stats.string(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto cfg = nlohmann::json::parse(read_file(out / "config.json"));
  EXPECT_EQ(cfg.at("num_local_experts"), 6);
  EXPECT_EQ(cfg.at("model_type"), "gpt_oss");
  const TensorMap in = read_tensors(fixture()), got = read_tensors(out);
  // The kept experts of each layer, from the output's router rows (unique in the input).
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".mlp.";
    ASSERT_TRUE(got.count(p + "experts.gate_up_proj"));
    EXPECT_FALSE(got.count(p + "experts.0.gate_proj.weight"));
    EXPECT_EQ(got.at(p + "experts.gate_up_proj").shape, (core::Shape{6, 64, 32}));
    EXPECT_EQ(got.at(p + "experts.gate_up_proj_bias").shape, (core::Shape{6, 32}));
    EXPECT_EQ(got.at(p + "experts.down_proj").shape, (core::Shape{6, 16, 64}));
    EXPECT_EQ(got.at(p + "experts.down_proj_bias").shape, (core::Shape{6, 64}));
    EXPECT_EQ(got.at(p + "router.bias").shape, (core::Shape{6}));
    expect_kept_expert_slabs(in, got, p + "router.weight",
                             {p + "experts.gate_up_proj", p + "experts.gate_up_proj_bias", p + "experts.down_proj",
                              p + "experts.down_proj_bias", p + "router.bias"});
  }
  r = run_tool({"-q", "eval", out.string(), "--text", text, "--ctx", "32", "--max-windows", "1", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
}

// merge (M-SMoE with frequency-weighted averaging): merged experts keep biases (the members'
// weighted average), the output is the fused layout with 6 experts and runs.
TEST(GptOss, MergeKeepsBiases) {
  TempDir tmp;
  const std::string model = fixture().string(), text = (source_dir() / "data/text/heldout.txt").string();
  const fs::path out = tmp.path() / "merged";
  RunResult r = run_tool({"-q", "merge", model, out.string(), "--method", "msmoe", "--experts", "6", "--text", text,
                          "--ctx", "32", "--windows", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const TensorMap got = read_tensors(out);
  EXPECT_EQ(got.at("model.layers.0.mlp.experts.gate_up_proj_bias").shape, (core::Shape{6, 32}));
  EXPECT_EQ(got.at("model.layers.0.mlp.experts.down_proj_bias").shape, (core::Shape{6, 64}));
  r = run_tool({"-q", "eval", out.string(), "--text", text, "--ctx", "32", "--max-windows", "1", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
}

// quantize (GPTQ int4) and factorize (SVD-LLM) with --materialize: the fused layout written dense
// with its biases, and the outputs run. Without --materialize the encoded experts are refused with
// one line (the fused layout has no place for codes).
TEST(GptOss, QuantizeFactorizeMaterialized) {
  TempDir tmp;
  const std::string model = fixture().string(), text = (source_dir() / "data/text/heldout.txt").string();
  const std::vector<std::string> calib = {"--text", text, "--ctx", "32", "--windows", "2"};
  auto with = [&](std::vector<std::string> a, const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  RunResult r = run_tool(with({"-q", "quantize", model, (tmp.path() / "q0").string(), "--method", "gptq", "--codec", "int4"}, calib));
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_NE(r.err.find("which the fused gpt_oss expert layout cannot hold: --materialize writes them dense"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(tmp.path() / "q0" / "model.safetensors"));
  for (const auto& [dir, args] : std::vector<std::pair<std::string, std::vector<std::string>>>{
           {"q", {"quantize", "--method", "gptq", "--codec", "int4"}}, {"f", {"factorize", "--method", "svdllm", "--ratio", "0.5"}}}) {
    const fs::path out = tmp.path() / dir;
    std::vector<std::string> a = {"-q", args[0], model, out.string()};
    a.insert(a.end(), args.begin() + 1, args.end());
    r = run_tool(with(with(a, calib), {"--materialize"}));
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    const TensorMap got = read_tensors(out), in = read_tensors(fixture());
    EXPECT_EQ(got.at("model.layers.1.mlp.experts.gate_up_proj").shape, (core::Shape{8, 64, 32})) << dir;
    EXPECT_NE(got.at("model.layers.1.mlp.experts.gate_up_proj").bytes, in.at("model.layers.1.mlp.experts.gate_up_proj").bytes) << dir;
    EXPECT_EQ(got.at("model.layers.1.mlp.experts.down_proj_bias"), in.at("model.layers.1.mlp.experts.down_proj_bias")) << dir;
    r = run_tool({"-q", "eval", out.string(), "--text", text, "--ctx", "32", "--max-windows", "1", "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
  }
}

// MXFP4 experts (the released checkpoints' encoding, core/mxfp4.h): read as encodings that decode
// on use (expert 2's gate row 3 = row 6 of gate_up_proj_blocks[2], low nibble first, times
// 2^(scale - 127)). convert without options writes them back as they are (blocks and scales byte
// for byte, quantization_config kept); with --dtype bf16 the dense fused layout in bf16 without
// quantization_config, which reads back to the same values.
TEST(GptOss, Mxfp4ExpertsKeptOrDecoded) {
  const fs::path dir = source_dir() / "data/gpt-oss-tiny-mxfp4";
  auto lm = load_model(dir);
  const TensorMap raw = read_tensors(dir);
  const std::string& blocks = raw.at("model.layers.0.mlp.experts.gate_up_proj_blocks").bytes;  // [8, 64, 2, 16]
  const std::string& scales = raw.at("model.layers.0.mlp.experts.gate_up_proj_scales").bytes;  // [8, 64, 2]
  static const float fp4[16] = {0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6};
  const model::Mlp& e2 = lm->model.layers().at(0).moe->experts.at(2);
  EXPECT_EQ(e2.gate.shape(), (core::Shape{32, 64}));
  ASSERT_TRUE(e2.gate.encoding());
  EXPECT_EQ(e2.gate.encoding()->name(), "mxfp4");
  const std::vector<float> gate = e2.gate.to_f32(), up = e2.up.to_f32();
  for (int64_t col : {0, 1, 33, 63}) {
    const int64_t g = col / 32, j = col % 32;
    auto value = [&](int64_t row) {
      const auto byte = static_cast<uint8_t>(blocks[static_cast<size_t>(((2 * 64 + row) * 2 + g) * 16 + j / 2)]);
      const int code = j % 2 ? byte >> 4 : byte & 0x0F;
      return std::ldexp(fp4[code], static_cast<uint8_t>(scales[static_cast<size_t>((2 * 64 + row) * 2 + g)]) - 127);
    };
    EXPECT_EQ(gate[3 * 64 + col], value(6)) << col;
    EXPECT_EQ(up[3 * 64 + col], value(7)) << col;
  }
  TempDir tmp;
  // As stored: every tensor byte for byte, the input's quantization_config.
  RunResult r = run_tool({"-q", "convert", dir.string(), (tmp.path() / "kept").string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const TensorMap kept = read_tensors(tmp.path() / "kept");
  EXPECT_EQ(kept.size(), raw.size());
  for (const auto& [name, t] : raw) {
    ASSERT_TRUE(kept.count(name)) << name;
    EXPECT_TRUE(kept.at(name).bytes == t.bytes && kept.at(name).shape == t.shape) << name;
  }
  EXPECT_EQ(read_json(tmp.path() / "kept" / "config.json").at("quantization_config"),
            read_json(dir / "config.json").at("quantization_config"));
  // Decoded: bf16, no quantization_config, the same values.
  r = run_tool({"-q", "convert", dir.string(), (tmp.path() / "out").string(), "--dtype", "bf16"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto cfg = nlohmann::json::parse(read_file(tmp.path() / "out" / "config.json"));
  EXPECT_FALSE(cfg.contains("quantization_config")) << cfg.dump();
  const TensorMap got = read_tensors(tmp.path() / "out");
  EXPECT_FALSE(got.count("model.layers.0.mlp.experts.gate_up_proj_blocks"));
  EXPECT_EQ(got.at("model.layers.0.mlp.experts.gate_up_proj").dtype, core::DType::BF16);
  auto back = load_model(tmp.path() / "out");
  EXPECT_EQ(back->model.layers().at(0).moe->experts.at(2).gate.to_f32(), gate);
  EXPECT_EQ(back->model.layers().at(1).moe->experts.at(5).down.to_f32(), lm->model.layers().at(1).moe->experts.at(5).down.to_f32());
}

// prune of the MXFP4 checkpoint writes MXFP4 (no --format: hf is the input's format): the kept
// experts' blocks, scales and biases are the input's bytes, the config keeps quant_method mxfp4
// with 6 experts, bits per weight stay 4.25, and the output evaluates as the input's decoded
// experts do (eval equal to the same prune written in bf16). A merge writes the merged experts
// dense (bf16), each layer's experts listed in modules_to_not_convert.
TEST(GptOss, Mxfp4PruneKeepsBlocks) {
  const fs::path dir = source_dir() / "data/gpt-oss-tiny-mxfp4";
  const std::string text = (source_dir() / "data/text/heldout.txt").string();
  TempDir tmp;
  const fs::path out = tmp.path() / "pruned", bf16 = tmp.path() / "pruned-bf16";
  RunResult r = run_tool({"-q", "prune", dir.string(), out.string(), "--method", "random", "--keep", "6"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  r = run_tool({"-q", "prune", dir.string(), bf16.string(), "--method", "random", "--keep", "6", "--dtype", "bf16"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const TensorMap in = read_tensors(dir), got = read_tensors(out);
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".mlp.";
    EXPECT_FALSE(got.count(p + "experts.gate_up_proj"));
    EXPECT_EQ(got.at(p + "experts.gate_up_proj_blocks").shape, (core::Shape{6, 64, 2, 16}));
    EXPECT_EQ(got.at(p + "experts.down_proj_scales").shape, (core::Shape{6, 64, 1}));
    const auto kept = expect_kept_expert_slabs(in, got, p + "router.weight",
                                               {p + "experts.gate_up_proj_blocks", p + "experts.gate_up_proj_scales",
                                                p + "experts.down_proj_blocks", p + "experts.down_proj_scales",
                                                p + "experts.gate_up_proj_bias", p + "experts.down_proj_bias"});
    EXPECT_EQ(kept.size(), 6u);
  }
  const auto cfg = read_json(out / "config.json");
  EXPECT_EQ(cfg.at("num_local_experts"), 6);
  EXPECT_EQ(cfg.at("quantization_config"), read_json(dir / "config.json").at("quantization_config"));
  r = run_tool({"inspect", out.string(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto q = nlohmann::json::parse(r.out).at("quantization");
  EXPECT_EQ(q.at("bits_per_weight"), 4.25) << q;
  EXPECT_EQ(q.at("weights"), 4) << q;
  auto ppl = [&](const fs::path& m) {
    const RunResult e = run_tool({"-q", "eval", m.string(), "--text", text, "--ctx", "32", "--max-windows", "2", "--json"});
    EXPECT_EQ(e.exit_code, 0) << e.describe();
    return nlohmann::json::parse(e.out).at("perplexity").get<double>();
  };
  EXPECT_EQ(ppl(out), ppl(bf16));
  // merge: the merged experts are dense, so the experts are written in bf16, without
  // quantization_config.
  const fs::path merged = tmp.path() / "merged";
  r = run_tool({"-q", "merge", dir.string(), merged.string(), "--method", "msmoe", "--experts", "6", "--text", text, "--ctx",
                "32", "--windows", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const TensorMap m = read_tensors(merged);
  EXPECT_EQ(m.at("model.layers.0.mlp.experts.gate_up_proj").dtype, core::DType::BF16);
  EXPECT_FALSE(m.count("model.layers.0.mlp.experts.gate_up_proj_blocks"));
  EXPECT_FALSE(read_json(merged / "config.json").contains("quantization_config"));
  // One layer's experts dense, the other's MXFP4: the dense layer's experts module is added to
  // modules_to_not_convert (transformers then loads it unquantized), once, also when the input's
  // config lists it already (an output of such a model read again).
  const std::string layer1 = "model.layers.1.mlp.experts";
  auto skip = read_json(dir / "config.json").at("quantization_config").at("modules_to_not_convert");
  nlohmann::json listed = skip;
  listed.push_back(layer1);
  const fs::path relisted = tmp.path() / "relisted";
  fs::create_directories(relisted);
  copy_with_config(dir, relisted, {{"quantization_config", {{"quant_method", "mxfp4"}, {"modules_to_not_convert", listed}}}});
  for (const fs::path& src : {dir, relisted}) {
    auto lm = load_model(src);
    for (auto& x : lm->model.layers().at(1).moe->experts) {
      x.gate = x.gate.converted(core::DType::BF16);
      x.up = x.up.converted(core::DType::BF16);
      x.down = x.down.converted(core::DType::BF16);
    }
    nlohmann::json manifest = nlohmann::json::object();
    const auto outs = lm->model.outputs(model::OutputOptions{}, &manifest);
    const auto has = [&](const std::string& n) {
      return std::any_of(outs.begin(), outs.end(), [&](const model::OutTensor& o) { return o.name == n; });
    };
    EXPECT_TRUE(has("model.layers.0.mlp.experts.gate_up_proj_blocks"));
    EXPECT_TRUE(has("model.layers.1.mlp.experts.gate_up_proj"));
    EXPECT_FALSE(has("model.layers.1.mlp.experts.gate_up_proj_blocks"));
    const auto qc = lm->model.rewritten_config(model::OutputOptions{}, &manifest).at("quantization_config");
    EXPECT_EQ(qc.at("quant_method"), "mxfp4");
    EXPECT_EQ(qc.at("modules_to_not_convert"), listed) << qc;
  }
  // The report's expert bits: the blocks and scales (gate and up counted once) and the bf16 biases,
  // before and after alike: (6 · 6144 · 4.25 / 8 + 6 · 128 · 2) · 8 / (6 · 6144 + 6 · 128).
  const auto report = read_json(out / "moe_tool_report.json");
  const double expected = (6 * 6144 * 4.25 / 8 + 6 * 128 * 2) * 8 / (6 * 6144 + 6 * 128);
  EXPECT_DOUBLE_EQ(report.at("expert_bits_per_param").at("before").get<double>(), expected) << report.dump();
  EXPECT_DOUBLE_EQ(report.at("expert_bits_per_param").at("after").get<double>(), expected) << report.dump();
  // The per-Linear formats have no place for the fused experts: refused before anything is written.
  for (const char* format : {"gptq", "awq", "compressed-tensors"}) {
    const fs::path ex = tmp.path() / (std::string("export-") + format);
    r = run_tool({"export", dir.string(), ex.string(), "--format", format});
    EXPECT_EQ(r.exit_code, 2) << r.describe();
    EXPECT_NE(r.err.find("stores each layer's routed experts fused"), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(ex));
  }
}

// Bad MXFP4 and config input: one error naming the tensor or key, exit 2 from the CLI.
TEST(GptOss, Mxfp4AndTopKRefusals) {
  const fs::path src = source_dir() / "data/gpt-oss-tiny-mxfp4";
  {
    TempDir dir;
    copy_folder(src, dir.path());
    // Expert 1's first scale of layer 1's down projection: 255, the e8m0 NaN.
    patch_tensor_bytes(dir.path() / "model.safetensors", "model.layers.1.mlp.experts.down_proj_scales", 64 * 1, "\xff");
    const RunResult r = run_tool({"inspect", dir.path().string()});
    EXPECT_EQ(r.exit_code, 2) << r.describe();
    EXPECT_NE(r.err.find("model.layers.1.mlp.experts.down_proj_scales: e8m0 scale 255 (NaN) in expert 1"), std::string::npos)
        << r.err;
  }
  {
    // experts_per_token (the released config's spelling) disagreeing with num_experts_per_tok.
    TempDir dir;
    copy_with_config(fixture(), dir.path(), {{"experts_per_token", 2}});
    const RunResult r = run_tool({"inspect", dir.path().string()});
    EXPECT_EQ(r.exit_code, 2) << r.describe();
    EXPECT_NE(r.err.find("experts_per_token"), std::string::npos) << r.err;
  }
}

// An expert's MLP: the clamped SwiGLU with biases on hand-computed values (limit 1, alpha 2).
TEST(GptOss, ClampedSwiGluWithBiases) {
  runtime::MlpWeights w;
  w.gate = runtime::MatrixRM::Identity(2, 2);
  w.up = runtime::MatrixRM::Identity(2, 2);
  w.down = runtime::MatrixRM::Identity(2, 2);
  w.gate_bias = runtime::RowVector::Constant(2, 0.5f);
  w.up_bias = runtime::RowVector::Constant(2, -0.25f);
  w.down_bias = runtime::RowVector::Constant(2, 0.125f);
  w.act = {model::GluActivation::ClampedSwiGlu, 2.0f, 1.0f};
  runtime::MatrixRM x(1, 2);
  x << 3.0f, -0.5f;
  const runtime::MatrixRM y = runtime::mlp_forward(w, x);
  auto expect = [](double g, double u) {  // g, u before the clamps
    g = std::min(g, 1.0);
    u = std::clamp(u, -1.0, 1.0);
    return (u + 1) * g / (1 + std::exp(-2 * g)) + 0.125;
  };
  EXPECT_NEAR(y(0, 0), expect(3.5, 2.75), 1e-6);   // gate clamped to 1, up to 1
  EXPECT_NEAR(y(0, 1), expect(0.0, -0.75), 1e-6);  // neither clamped
}

// layer_types of the wrong length or with an unknown kind: one line naming the key.
TEST(GptOss, LayerTypesRefusals) {
  for (const auto& [patch, want] : std::vector<std::pair<nlohmann::json, std::string>>{
           {{{"layer_types", {"full_attention"}}}, "layer_types: expected a list of 2 entries"},
           {{{"layer_types", {"full_attention", "chunked_attention"}}}, "layer_types[1]: expected"}}) {
    TempDir dir;
    copy_with_config(fixture(), dir.path(), patch);
    auto lm = load_model(dir.path());
    try {
      runtime::Forward fwd(lm->model);
      ADD_FAILURE() << patch.dump() << ": the forward was built";
    } catch (const core::Error& e) {
      EXPECT_EQ(e.kind(), core::ErrorKind::Corruption) << e.message();
      EXPECT_NE(e.message().find(want), std::string::npos) << e.message();
    }
  }
}

}  // namespace
}  // namespace moe::test
