// Checkpoints from the field, through the built binary: MoE models with dense layers, per-layer
// buffers the family table does not describe, transformers v5 config spellings (dtype,
// rope_parameters), DeepSeek-V3 multi-token-prediction layers, special-token strings and invalid
// UTF-8 in texts, the tokenize default, and the exit codes scripts rely on (quality gates, batches
// of recipes). Every fixture is built by the test.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "io/checkpoint.h"
#include "support/paths.h"
#include "support/cli_expect.h"
#include "support/ckpt_util.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using core::DType;
using nlohmann::json;
namespace fs = std::filesystem;

const fs::path kSource = fs::path(MOE_SOURCE_DIR);


bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Exit 2, one line on stderr naming `parts`, nothing on stdout.
void expect_user_error(const RunResult& r, std::initializer_list<std::string> parts) {
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_EQ(r.out, "") << r.describe();
  ASSERT_EQ(r.err_lines().size(), 1u) << r.describe();
  EXPECT_EQ(r.err.rfind("moe-tool: error: ", 0), 0u) << r.err;
  for (const auto& p : parts) EXPECT_TRUE(contains(r.err, p)) << "'" << p << "' not in: " << r.err;
}

void expect_ok(const RunResult& r) {
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(r.err, "") << r.describe();
}

class Field : public ::testing::Test {
 protected:
  TempDir tmp{"moe-field"};
};

// ------------------------------------------------------------------ 1. dense layers

// qwen2_moe with mlp_only_layers [0]: layer 0 dense, layers 1 and 2 MoE. Every command that
// reads, compresses or summarises the model exits 0 and shows layer 0 as dense.
TEST_F(Field, DenseLayersQwen2MoeEveryCommand) {
  const fs::path in = tmp / "in";
  write_synth(make_synth("qwen2_moe", {.layers = 3, .config_patch = {{"mlp_only_layers", {0}}}}), in, {.tokenizer = true});

  RunResult r = run_tool({"inspect", in.string()});
  expect_ok(r);
  EXPECT_TRUE(contains(r.out, "dense layers            [0]")) << r.out;

  r = run_tool({"-q", "prune", in.string(), (tmp / "pruned").string(), "--method", "random", "--keep", "2"});
  expect_ok(r);
  EXPECT_TRUE(contains(r.out, "L0 dense  L1 4->2  L2 4->2")) << r.out;
  EXPECT_EQ(read_json(tmp / "pruned" / "config.json")["num_experts"], 2);
  const json report = read_json(tmp / "pruned" / "moe_tool_report.json");
  EXPECT_EQ(report.at("layers")[0].at("dense"), true);
  EXPECT_FALSE(report.at("layers")[0].contains("passes"));
  EXPECT_EQ(report.at("layers")[1].at("experts_after"), 2);
  expect_ok(run_tool({"inspect", (tmp / "pruned").string()}));

  r = run_tool({"-q", "prune", in.string(), (tmp / "dry").string(), "--method", "random", "--keep", "2", "--dry-run"});
  expect_ok(r);
  EXPECT_TRUE(contains(r.out, "L0 dense  L1 4->2  L2 4->2")) << r.out;
  EXPECT_FALSE(fs::exists(tmp / "dry"));

  r = run_tool({"-q", "prune", in.string(), (tmp / "pruned-json").string(), "--method", "random", "--keep", "3", "--json"});
  expect_ok(r);
  const json s = json::parse(r.out);
  EXPECT_EQ(s.at("layers")[0], (json{{"layer", 0}, {"dense", true}}));
  EXPECT_EQ(s.at("layers")[2].at("experts_after"), 3);

  r = run_tool({"-q", "merge", in.string(), (tmp / "merged").string(), "--method", "hcsmoe", "--experts", "2", "--text",
                kCalib, "--ctx", "32", "--windows", "4"});
  expect_ok(r);
  EXPECT_TRUE(contains(r.out, "L0 dense  L1 4->2  L2 4->2")) << r.out;

  // quantize runs on the dense MLP too (a pass that is not MoE-only): the summary still renders.
  r = run_tool({"-q", "quantize", in.string(), (tmp / "q4").string(), "--method", "rtn", "--codec", "int4"});
  expect_ok(r);
  EXPECT_TRUE(contains(r.out, "L0 dense  L1 4->4  L2 4->4")) << r.out;
  EXPECT_EQ(read_json(tmp / "q4" / "moe_tool_report.json").at("layers")[0].at("dense"), true);

  const fs::path recipe = tmp / "recipe.json";
  write_file(recipe, json{{"model", in.string()},
                          {"calibration", {{"text", kCalib}, {"ctx", 32}, {"windows", 4}}},
                          {"passes", {{{"pass", "prune"}, {"method", "reap"}, {"keep", 3}},
                                      {{"pass", "merge"}, {"method", "msmoe"}, {"experts", 2}}}},
                          {"output", {{"path", (tmp / "run-out").string()}}},
                          {"eval", {{"text", kCalib}, {"ctx", 32}, {"max_windows", 2}}}}
                         .dump());
  r = run_tool({"-q", "run", recipe.string()});
  expect_ok(r);
  EXPECT_TRUE(contains(r.out, "L0 dense  L1 4->2  L2 4->2")) << r.out;

  expect_ok(run_tool({"-q", "convert", in.string(), (tmp / "converted").string()}));
  r = run_tool({"-q", "eval", in.string(), "--text", kCalib, "--ctx", "32", "--max-windows", "2"});
  expect_ok(r);
  r = run_tool({"-q", "calibrate", in.string(), "--text", kCalib, "--ctx", "32", "--windows", "4", "-o",
                (tmp / "stats.safetensors").string()});
  expect_ok(r);
  r = run_tool({"stats", "show", (tmp / "stats.safetensors").string()});
  expect_ok(r);
  r = run_tool({"stats", "show", (tmp / "stats.safetensors").string(), "--json"});
  expect_ok(r);
  expect_ok(run_tool({"-q", "stats", "plot", (tmp / "stats.safetensors").string(), "-o", (tmp / "plots").string()}));
  r = run_tool({"-q", "prune", in.string(), (tmp / "from-stats").string(), "--method", "reap", "--keep", "2", "--stats",
                (tmp / "stats.safetensors").string()});
  expect_ok(r);
  EXPECT_TRUE(contains(r.out, "L0 dense")) << r.out;
}

// DeepSeek-V3 with first_k_dense_replace 1: layer 0 dense.
TEST_F(Field, DenseLayersDeepSeekFirstKDense) {
  const fs::path in = tmp / "in";
  write_synth(make_synth("deepseek_v3"), in, {.tokenizer = true});
  const RunResult r = run_tool({"-q", "prune", in.string(), (tmp / "out").string(), "--method", "random", "--keep", "2"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_TRUE(contains(r.out, "L0 dense  L1 4->2  L2 4->2")) << r.out;
  EXPECT_EQ(read_json(tmp / "out" / "config.json")["n_routed_experts"], 2);
}

// The fixture named in the report: data/models/synthetic/qwen2moe-sparse (mlp_only_layers [0],
// decoder_sparse_step 2: layers 1 and 3 MoE).
TEST_F(Field, DenseLayersSparseFixture) {
  const RunResult r = run_tool({"-q", "prune", (kSource / "data/models/synthetic/qwen2moe-sparse").string(),
                                (tmp / "out").string(), "--method", "random", "--keep", "2"});
  expect_ok(r);
  EXPECT_TRUE(contains(r.out, "L0 dense  L1 4->2  L2 dense  L3 4->2")) << r.out;
  EXPECT_TRUE(fs::exists(tmp / "out" / "model.safetensors"));
}

// ------------------------------------------------------------------ 2. stray per-layer buffers

// Rotary-embedding buffers saved with the weights (older Llama-style checkpoints): passed through
// byte for byte by prune, merge, run and convert, whatever their dtype.
TEST_F(Field, RotaryBuffersPassThroughEveryWriter) {
  SynthSpec spec;
  spec.extra = {synth_tensor("model.layers.0.self_attn.rotary_emb.inv_freq", DType::F32, {4}, 7),
                synth_tensor("model.layers.1.self_attn.rotary_emb.inv_freq", DType::F32, {4}, 8),
                synth_tensor("model.layers.1.self_attn.rotary_emb.cos_cached", DType::BF16, {16, 8}, 9),
                synth_tensor("model.layers.0.self_attn.rotary_emb.position_ids", DType::I64, {16}, 10)};
  const SynthCheckpoint ck = make_synth("mixtral", spec);
  const fs::path in = tmp / "in";
  write_synth(ck, in, {.tokenizer = true});
  const TensorMap want = synth_tensors(ck);
  auto check = [&](const fs::path& out) {
    const TensorMap got = read_tensors(out);
    for (const auto& t : spec.extra) {
      ASSERT_TRUE(got.count(t.name)) << out << ": " << t.name;
      EXPECT_EQ(got.at(t.name), want.at(t.name)) << out << ": " << t.name;
    }
  };
  RunResult r = run_tool({"-q", "prune", in.string(), (tmp / "pruned").string(), "--method", "random", "--keep", "2"});
  expect_ok(r);
  check(tmp / "pruned");
  r = run_tool({"-q", "merge", in.string(), (tmp / "merged").string(), "--method", "msmoe", "--experts", "2", "--text",
                kCalib, "--ctx", "32", "--windows", "4"});
  expect_ok(r);
  check(tmp / "merged");
  expect_ok(run_tool({"-q", "convert", in.string(), (tmp / "converted").string()}));
  check(tmp / "converted");
  // With --dtype the float buffers convert as convert converts them; the integer one stays.
  r = run_tool({"-q", "prune", in.string(), (tmp / "f16").string(), "--method", "random", "--keep", "2", "--dtype", "f16"});
  expect_ok(r);
  const TensorMap f16 = read_tensors(tmp / "f16");
  EXPECT_EQ(f16.at("model.layers.0.self_attn.rotary_emb.inv_freq").dtype, DType::F16);
  EXPECT_EQ(f16.at("model.layers.0.self_attn.rotary_emb.position_ids"), want.at("model.layers.0.self_attn.rotary_emb.position_ids"));
  expect_ok(run_tool({"-q", "convert", in.string(), (tmp / "f16c").string(), "--dtype", "f16"}));
  EXPECT_EQ(read_tensors(tmp / "f16c").at("model.layers.1.self_attn.rotary_emb.cos_cached"),
            f16.at("model.layers.1.self_attn.rotary_emb.cos_cached"));
}

// ------------------------------------------------------------------ 4. dtype / torch_dtype

TEST_F(Field, DtypeKeyFollowsTheInput) {
  struct Case {
    json edit;
    bool dtype, torch_dtype;
  };
  for (const Case& c : {Case{{{"dtype", "bfloat16"}, {"torch_dtype", nullptr}}, true, false},
                        Case{{{"dtype", "bfloat16"}}, true, true}, Case{json::object(), false, true},
                        Case{{{"torch_dtype", nullptr}}, false, true}}) {
    SCOPED_TRACE(c.edit.dump());
    TempDir t;
    write_synth(make_synth("mixtral", {.config_edit = c.edit}), t / "in");
    const RunResult in = run_tool({"inspect", (t / "in").string(), "--json"});
    expect_ok(in);
    EXPECT_EQ(json::parse(in.out).contains("config_dtype"), c.dtype || c.edit.empty());  // read from either key
    expect_ok(run_tool({"-q", "convert", (t / "in").string(), (t / "out").string(), "--dtype", "f16"}));
    const json cfg = read_json(t / "out" / "config.json");
    EXPECT_EQ(cfg.contains("dtype"), c.dtype);
    if (c.dtype) { EXPECT_EQ(cfg.at("dtype"), "float16"); }
    EXPECT_EQ(cfg.contains("torch_dtype"), c.torch_dtype);
    if (c.torch_dtype) { EXPECT_EQ(cfg.at("torch_dtype"), "float16"); }
    expect_ok(run_tool({"-q", "prune", (t / "in").string(), (t / "pruned").string(), "--method", "random", "--keep", "2",
                        "--dtype", "f32"}));
    const json pc = read_json(t / "pruned" / "config.json");
    if (c.dtype) { EXPECT_EQ(pc.at("dtype"), "float32"); }
    if (c.torch_dtype) { EXPECT_EQ(pc.at("torch_dtype"), "float32"); }
    EXPECT_EQ(pc.contains("dtype"), c.dtype);
  }
}

// ------------------------------------------------------------------ 5. DeepSeek-V3 MTP layers

// The synthetic deepseek_v3 has 3 decoder layers (0 dense) and a full MTP layer 3 (enorm, hnorm,
// eh_proj, shared_head.norm and a decoder block with 4 experts of width 16).
std::string rows_of(const TensorBytes& t, int row, size_t row_bytes) { return t.bytes.substr(row * row_bytes, row_bytes); }

// The MTP layer's MoE block is pruned like any MoE layer, by its own choice (the report's layer 3),
// router rows, bias entries and experts following it; the rest of the layer passes through.
TEST_F(Field, MtpLayerPrunedLikeAnyMoeLayer) {
  const SynthCheckpoint ck = make_synth("deepseek_v3");
  write_synth(ck, tmp / "in", {.tokenizer = true});
  RunResult r = run_tool({"inspect", (tmp / "in").string()});
  expect_ok(r);
  EXPECT_TRUE(contains(r.out, "  MTP layers              [3] (multi-token prediction")) << r.out;
  r = run_tool({"-q", "prune", (tmp / "in").string(), (tmp / "out").string(), "--method", "random", "--keep",
                "2", "--seed", "3"});
  expect_ok(r);
  const json report = read_json(tmp / "out" / "moe_tool_report.json");
  ASSERT_EQ(report.at("layers").size(), 4u);
  EXPECT_EQ(report.at("layers")[3].at("layer"), 3);
  const auto kept = report.at("layers")[3].at("passes")[0].at("kept").get<std::vector<int>>();
  ASSERT_EQ(kept.size(), 2u);
  const TensorMap in = synth_tensors(ck), out = read_tensors(tmp / "out");
  const auto& router_in = in.at("model.layers.3.mlp.gate.weight");
  const auto& router_out = out.at("model.layers.3.mlp.gate.weight");
  EXPECT_EQ(router_out.shape, (core::Shape{2, 32}));
  const auto& bias_in = in.at("model.layers.3.mlp.gate.e_score_correction_bias");
  const auto& bias_out = out.at("model.layers.3.mlp.gate.e_score_correction_bias");
  EXPECT_EQ(bias_out.shape, (core::Shape{2}));
  EXPECT_EQ(bias_out.dtype, DType::F32);
  for (int j = 0; j < 2; ++j) {
    EXPECT_EQ(rows_of(router_out, j, 64), rows_of(router_in, kept[j], 64)) << j;
    EXPECT_EQ(rows_of(bias_out, j, 4), rows_of(bias_in, kept[j], 4)) << j;
    for (const char* part : {"gate_proj", "up_proj", "down_proj"})
      EXPECT_EQ(out.at("model.layers.3.mlp.experts." + std::to_string(j) + "." + part + ".weight"),
                in.at("model.layers.3.mlp.experts." + std::to_string(kept[j]) + "." + part + ".weight"))
          << j << " " << part;
  }
  EXPECT_EQ(out.count("model.layers.3.mlp.experts.2.gate_proj.weight"), 0u);
  for (const char* name : {"model.layers.3.eh_proj.weight", "model.layers.3.hnorm.weight", "model.layers.3.self_attn.kv_b_proj.weight",
                           "model.layers.3.mlp.shared_experts.up_proj.weight"})
    EXPECT_EQ(out.at(name), in.at(name)) << name;
  // The written checkpoint is consistent: inspect and convert accept it.
  expect_ok(run_tool({"inspect", (tmp / "out").string()}));
  expect_ok(run_tool({"-q", "convert", (tmp / "out").string(), (tmp / "conv").string()}));
  // The dry run plans the same shapes.
  r = run_tool({"-q", "prune", (tmp / "in").string(), (tmp / "dry").string(), "--method", "random", "--keep", "2",
                "--dry-run", "--json"});
  expect_ok(r);
  uint64_t written = 0;
  for (const auto& [name, t] : out) written += t.bytes.size();
  EXPECT_EQ(json::parse(r.out)["bytes"]["after"].get<uint64_t>(), written);
}

// Block-scaled FP8 MTP experts: prune keeps codes and scales of the kept experts together;
// convert --dtype dequantizes them like every other FP8 weight (no F8 left, no scales).
TEST_F(Field, MtpLayerFp8ExpertsFollowTheirScales) {
  SynthSpec spec{.config_patch = {{"quantization_config",
                                   {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"weight_block_size", {8, 8}}}}}};
  for (int64_t e = 0; e < 4; ++e)
    for (const char* part : {"gate_proj", "up_proj", "down_proj"}) {
      const std::string name = "model.layers.3.mlp.experts." + std::to_string(e) + "." + part + ".weight";
      const core::Shape shape = std::string(part) == "down_proj" ? core::Shape{32, 16} : core::Shape{16, 32};
      spec.dtypes[name] = DType::F8_E4M3;
      SynthTensor sc = synth_tensor(name + "_scale_inv", DType::F32, {shape[0] / 8, shape[1] / 8}, 50 + e);
      auto* f = reinterpret_cast<float*>(sc.data.data());
      for (int64_t i = 0; i < core::shape_numel(sc.shape); ++i) f[i] = 0.01f + std::fabs(f[i]);
      spec.extra.push_back(sc);
    }
  const SynthCheckpoint ck = make_synth("deepseek_v3", spec);
  write_synth(ck, tmp / "in", {.tokenizer = true});
  expect_ok(run_tool({"-q", "prune", (tmp / "in").string(), (tmp / "out").string(), "--method", "random", "--keep", "2",
                      "--seed", "5"}));
  const auto kept = read_json(tmp / "out" / "moe_tool_report.json")["layers"][3]["passes"][0]["kept"].get<std::vector<int>>();
  ASSERT_EQ(kept.size(), 2u);
  const TensorMap in = synth_tensors(ck), out = read_tensors(tmp / "out");
  for (int j = 0; j < 2; ++j)
    for (const char* suffix : {".weight", ".weight_scale_inv"}) {
      const std::string a = "model.layers.3.mlp.experts." + std::to_string(kept[j]) + ".up_proj" + suffix;
      const std::string b = "model.layers.3.mlp.experts." + std::to_string(j) + ".up_proj" + suffix;
      EXPECT_EQ(out.at(b), in.at(a)) << a << " -> " << b;
    }
  EXPECT_EQ(out.count("model.layers.3.mlp.experts.2.up_proj.weight_scale_inv"), 0u);
  expect_ok(run_tool({"-q", "convert", (tmp / "in").string(), (tmp / "bf16").string(), "--dtype", "bf16"}));
  const TensorMap deq = read_tensors(tmp / "bf16");
  for (const auto& [name, t] : deq) {
    EXPECT_NE(t.dtype, DType::F8_E4M3) << name;
    EXPECT_FALSE(name.ends_with("_scale_inv")) << name;
  }
  EXPECT_EQ(deq.at("model.layers.3.mlp.experts.1.down_proj.weight").dtype, DType::BF16);
  EXPECT_FALSE(read_json(tmp / "bf16" / "config.json").contains("quantization_config"));
}

// merge runs on the MTP layer too (one n_routed_experts for all MoE layers); counts decided per
// layer while the pass runs would leave the MTP layer's unlike the decoder layers': refused before
// any work; so is an MTP layer whose block is incomplete.
TEST_F(Field, MtpLayerMergedCountsKeptUniform) {
  write_synth(make_synth("deepseek_v3"), tmp / "in", {.tokenizer = true});
  expect_ok(run_tool({"-q", "merge", (tmp / "in").string(), (tmp / "out").string(), "--method", "msmoe", "--experts", "2",
                      "--text", kCalib, "--ctx", "16", "--windows", "2"}));
  EXPECT_EQ(read_json(tmp / "out" / "config.json").at("n_routed_experts"), 2);
  EXPECT_EQ(read_tensors(tmp / "out").at("model.layers.3.mlp.gate.weight").shape, (core::Shape{2, 32}));
  RunResult r = run_tool({"-q", "prune", (tmp / "in").string(), (tmp / "ragged").string(), "--method", "frequency",
                          "--keep-ratio", "0.5", "--no-uniform", "--text", kCalib, "--ctx", "16"});
  expect_user_error(r, {"prune frequency decides each layer's expert count while it runs",
                        "multi-token-prediction layer (model.layers.3)"});
  EXPECT_FALSE(fs::exists(tmp / "ragged"));
  write_synth(make_synth("deepseek_v3", {.drop = {"model.layers.3.self_attn.o_proj.weight"}}), tmp / "cut", {.tokenizer = true});
  r = run_tool({"-q", "prune", (tmp / "cut").string(), (tmp / "cut_out").string(), "--method", "random", "--keep", "2"});
  expect_user_error(r, {"tensor model.layers.3.self_attn.o_proj.weight: missing", "multi-token-prediction layer 3"});
  EXPECT_FALSE(fs::exists(tmp / "cut_out"));
}

// An MTP layer whose expert count disagrees with the config: refused by inspect, convert and the
// passes, naming the tensor.
TEST_F(Field, MtpLayerExpertCountChecked) {
  {
    TempDir t;
    SynthSpec spec{.reshape = {{"model.layers.3.mlp.gate.weight", {6, 32}}}};
    write_synth(make_synth("deepseek_v3", spec), t / "in");
    for (const std::vector<std::string>& cmd :
         {std::vector<std::string>{"inspect", (t / "in").string()},
          std::vector<std::string>{"convert", (t / "in").string(), (t / "out").string()},
          std::vector<std::string>{"prune", (t / "in").string(), (t / "out").string(), "--method", "random", "--keep", "2"}})
      expect_user_error(run_tool(cmd), {"tensor model.layers.3.mlp.gate.weight: shape [6, 32]",
                                        "n_routed_experts=4", "multi-token-prediction layer 3"});
    EXPECT_FALSE(fs::exists(t / "out"));
  }
  {
    TempDir t;
    SynthSpec spec;
    for (const char* part : {"gate_proj", "up_proj"})
      spec.extra.push_back(synth_tensor(std::string("model.layers.3.mlp.experts.4.") + part + ".weight", DType::BF16, {16, 32}, 7));
    spec.extra.push_back(synth_tensor("model.layers.3.mlp.experts.4.down_proj.weight", DType::BF16, {32, 16}, 7));
    write_synth(make_synth("deepseek_v3", spec), t / "in");
    expect_user_error(run_tool({"inspect", (t / "in").string()}),
                      {"tensor model.layers.3.mlp.experts.4.", "expert 4 but n_routed_experts is 4"});
  }
  {
    TempDir t;
    write_synth(make_synth("deepseek_v3", {.drop = {"model.layers.3.mlp.experts.2.up_proj.weight"}}), t / "in");
    expect_user_error(run_tool({"inspect", (t / "in").string()}),
                      {"tensor model.layers.3.mlp.experts.2.up_proj.weight: missing"});
  }
}

// ------------------------------------------------------------------ 6, 7, 8. texts and tokens

TEST_F(Field, TokenizeAddsSpecialTokensByDefault) {
  const fs::path text = tmp / "t.txt";
  write_file(text, "hello world");
  const std::string sp = (kSource / "data/tokenizer-sp").string();
  RunResult r = run_tool({"tokenize", sp, "--text", text.string(), "--json"});
  expect_ok(r);
  const auto with = json::parse(r.out)["ids"].get<std::vector<int>>();
  ASSERT_FALSE(with.empty());
  EXPECT_EQ(with.front(), 1);  // <s>: tokenizer_config add_bos_token true
  r = run_tool({"tokenize", sp, "--text", text.string(), "--json", "--no-add-special"});
  expect_ok(r);
  const auto without = json::parse(r.out)["ids"].get<std::vector<int>>();
  EXPECT_EQ(std::vector<int>(with.begin() + 1, with.end()), without);
  r = run_tool({"tokenize", sp, "--text", text.string(), "--json", "--add-special"});
  EXPECT_EQ(json::parse(r.out)["ids"].get<std::vector<int>>(), with);
  // A tokenizer that adds nothing (add_bos_token false) adds nothing by default either.
  r = run_tool({"tokenize", (kSource / "data/tokenizer").string(), "--text", text.string(), "--json"});
  const auto plain = json::parse(r.out)["ids"].get<std::vector<int>>();
  r = run_tool({"tokenize", (kSource / "data/tokenizer").string(), "--text", text.string(), "--json", "--no-add-special"});
  EXPECT_EQ(json::parse(r.out)["ids"].get<std::vector<int>>(), plain);
}

TEST_F(Field, SpecialTokenStringsInText) {
  const fs::path text = tmp / "t.txt";
  write_file(text, "one<|endoftext|>two");
  const std::string tok = (kSource / "data/tokenizer").string();
  RunResult r = run_tool({"tokenize", tok, "--text", text.string(), "--json"});
  expect_ok(r);
  auto ids = json::parse(r.out)["ids"].get<std::vector<int>>();
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 4095), 1);
  r = run_tool({"tokenize", tok, "--text", text.string(), "--json", "--no-parse-special"});
  expect_ok(r);
  ids = json::parse(r.out)["ids"].get<std::vector<int>>();
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 4095), 0);
  EXPECT_GT(ids.size(), 3u);
}

// eval: specials are plain text by default and always with --llama-cpp-compatible; the
// convention line says so; --parse-special reads them as special ids.
TEST_F(Field, EvalSpecialTokenConvention) {
  std::string doc = read_file(kCalib).substr(0, 6000);
  const fs::path text = tmp / "joined.txt";
  write_file(text, doc.substr(0, 3000) + "<|endoftext|>" + doc.substr(3000) + "<|endoftext|>");
  const std::string model = (kSource / "data/models/qwen2moe-tiny").string();
  RunResult r = run_tool({"-q", "eval", model, "--text", text.string(), "--ctx", "32", "--max-windows", "2", "--json"});
  expect_ok(r);
  const json plain = json::parse(r.out);
  EXPECT_TRUE(contains(plain.at("convention"), "2 special-token strings in the text read as plain text")) << plain.dump();
  r = run_tool({"-q", "eval", model, "--text", text.string(), "--ctx", "32", "--max-windows", "2", "--json", "--parse-special"});
  expect_ok(r);
  EXPECT_TRUE(contains(json::parse(r.out)["convention"], "2 special-token strings in the text read as special ids"));
  r = run_tool({"-q", "eval", model, "--text", text.string(), "--ctx", "32", "--max-windows", "2", "--json",
                "--llama-cpp-compatible"});
  expect_ok(r);
  EXPECT_TRUE(contains(json::parse(r.out)["convention"], "read as plain text (as llama-perplexity does)"));
  expect_user_error(run_tool({"-q", "eval", model, "--text", text.string(), "--ctx", "32", "--llama-cpp-compatible",
                              "--parse-special"}),
                    {"--parse-special contradicts --llama-cpp-compatible"});
}

TEST_F(Field, InvalidUtf8IsSaidOrRefused) {
  const fs::path text = tmp / "bad.txt";
  write_file(text, std::string("abc\xff\xfe def"));
  const std::string tok = (kSource / "data/tokenizer").string();
  RunResult r = run_tool({"tokenize", tok, "--text", text.string()});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  ASSERT_EQ(r.err_lines().size(), 1u) << r.err;
  EXPECT_TRUE(contains(r.err, "moe-tool: warning: " + text.string() + ": not valid UTF-8 (first bad byte sequence at byte offset 3)"))
      << r.err;
  expect_user_error(run_tool({"tokenize", tok, "--text", text.string(), "--strict-utf8"}),
                    {text.string() + ": not valid UTF-8 (first bad byte sequence at byte offset 3)", "--strict-utf8"});
  expect_user_error(run_tool({"eval", (kSource / "data/models/qwen2moe-tiny").string(), "--text", text.string(), "--strict-utf8"}),
                    {"byte offset 3"});
}

TEST_F(Field, LlamaCppShortTextSaysWhatHappens) {
  const std::string model = (kSource / "data/models/qwen2moe-tiny").string();
  const fs::path text = tmp / "short.txt";
  write_file(text, read_file(kCalib).substr(0, 400));
  const RunResult t = run_tool({"tokenize", model, "--text", text.string(), "--json", "--no-parse-special"});
  const int64_t n = json::parse(t.out)["count"].get<int64_t>();
  const int64_t ctx = n * 2 / 3;  // one window fits, two do not
  ASSERT_GE(ctx, 8);
  RunResult r = run_tool({"-q", "eval", model, "--text", text.string(), "--ctx", std::to_string(ctx),
                          "--llama-cpp-compatible", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(json::parse(r.out)["windows"], 1);
  EXPECT_EQ(r.err, "moe-tool: warning: --llama-cpp-compatible: the text has " + std::to_string(n) +
                       " tokens, fewer than 2 x --ctx (" + std::to_string(2 * ctx) +
                       "); llama-perplexity refuses such a text, this run scores its 1 complete window(s)\n");
  // Enough text for two windows: no warning.
  r = run_tool({"-q", "eval", model, "--text", text.string(), "--ctx", std::to_string(n / 2), "--llama-cpp-compatible"});
  expect_ok(r);
}

TEST_F(Field, StatsShowMissingFileNamesItOnce) {
  const std::string path = (tmp / "nope.safetensors").string();
  const RunResult r = run_tool({"stats", "show", path});
  expect_user_error(r, {path});
  const size_t first = r.err.find(path);
  EXPECT_EQ(r.err.find(path, first + 1), std::string::npos) << r.err;
}

// ------------------------------------------------------------------ exit codes: gates, batches

json gate_recipe(const fs::path& in, const fs::path& out, const json& gates) {
  json ev = {{"text", kCalib}, {"ctx", 32}, {"max_windows", 2}};
  ev.update(gates);
  return {{"model", in.string()},
          {"passes", {{{"pass", "prune"}, {"method", "random"}, {"keep", 2}}}},
          {"output", {{"path", out.string()}}},
          {"eval", ev}};
}

TEST_F(Field, QualityGateFailsWithExit3AndKeepsTheCheckpoint) {
  write_synth(make_synth("mixtral"), tmp / "in", {.tokenizer = true});
  const fs::path recipe = tmp / "r.json";
  write_file(recipe, gate_recipe(tmp / "in", tmp / "out", {{"max_kl", 0.0}, {"max_ppl_ratio", 100.0}}).dump());
  RunResult r = run_tool({"-q", "run", recipe.string()});
  EXPECT_EQ(r.exit_code, 3) << r.describe();
  ASSERT_EQ(r.err_lines().size(), 1u) << r.err;
  EXPECT_EQ(r.err.rfind("moe-tool: quality gate failed: eval.max_kl 0: mean KL ", 0), 0u) << r.err;
  EXPECT_TRUE(contains(r.err, "checkpoint kept: " + (tmp / "out").string())) << r.err;
  EXPECT_TRUE(contains(r.out, "gate     FAILED eval.max_kl")) << r.out;
  const json report = read_json(tmp / "out" / "moe_tool_report.json");
  EXPECT_EQ(report.at("quality_gate").at("passed"), false);
  ASSERT_EQ(report.at("quality_gate").at("failed").size(), 1u);  // the ratio bound held
  EXPECT_GT(report.at("eval").at("kl_mean").get<double>(), 0.0);
  expect_ok(run_tool({"inspect", (tmp / "out").string()}));

  write_file(recipe, gate_recipe(tmp / "in", tmp / "out2", {{"max_kl", 1e9}, {"min_top1", 0.0}, {"max_ppl_ratio", 1e9}}).dump());
  r = run_tool({"-q", "run", recipe.string(), "--json"});
  expect_ok(r);
  EXPECT_EQ(json::parse(r.out)["quality_gate"]["passed"], true);

  write_file(recipe, gate_recipe(tmp / "in", tmp / "out3", {{"min_top1", 0.5}, {"against_input", false}}).dump());
  expect_user_error(run_tool({"-q", "run", recipe.string()}), {"eval.min_top1", "against_input"});
  EXPECT_FALSE(fs::exists(tmp / "out3"));
  write_file(recipe, gate_recipe(tmp / "in", tmp / "out3", {{"min_top1", 1.5}}).dump());
  expect_user_error(run_tool({"-q", "run", recipe.string()}), {"eval.min_top1"});
}

TEST_F(Field, BatchOfRecipes) {
  write_synth(make_synth("mixtral"), tmp / "in", {.tokenizer = true});
  const fs::path a = tmp / "a.json", b = tmp / "b.json", c = tmp / "c.json";
  write_file(a, gate_recipe(tmp / "in", tmp / "out-a", json::object()).dump());
  json bad = gate_recipe(tmp / "in", tmp / "out-b", json::object());
  bad["passes"][0]["keep"] = "two";
  write_file(b, bad.dump());
  write_file(c, gate_recipe(tmp / "in", tmp / "out-c", {{"max_kl", 0.0}}).dump());
  RunResult r = run_tool({"-q", "run", a.string(), b.string(), c.string(), "--json"});
  EXPECT_EQ(r.exit_code, 2) << r.describe();  // the worst: bad input (2) over quality gate (3)
  std::vector<json> lines;
  size_t pos = 0;
  for (size_t nl; (nl = r.out.find('\n', pos)) != std::string::npos; pos = nl + 1) lines.push_back(json::parse(r.out.substr(pos, nl - pos)));
  ASSERT_EQ(lines.size(), 3u) << r.out;
  EXPECT_EQ(lines[0]["recipe"], a.string());
  EXPECT_EQ(lines[0]["exit"], 0);
  EXPECT_EQ(lines[1]["exit"], 2);
  EXPECT_TRUE(contains(lines[1]["error"], "passes[0].keep"));
  EXPECT_EQ(lines[2]["exit"], 3);
  EXPECT_EQ(lines[2]["summary"]["quality_gate"]["passed"], false);
  EXPECT_TRUE(fs::exists(tmp / "out-a" / "model.safetensors"));
  EXPECT_FALSE(fs::exists(tmp / "out-b"));
  EXPECT_TRUE(fs::exists(tmp / "out-c" / "model.safetensors"));
  EXPECT_EQ(r.err_lines().size(), 2u) << r.err;  // b's error, c's gate

  // Text mode: each run under a header; all good: exit 0.
  r = run_tool({"-q", "run", a.string(), a.string(), "--set", "output.force=true"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_TRUE(contains(r.out, "== " + a.string() + "\ndone\n")) << r.out;
}

}  // namespace
}  // namespace moe::test
