// `quantize` through the CLI on the trained mixtral-tiny fixture: the written codes and config
// entries, bits per parameter against the bytes in the file, --materialize against the native
// dequantization, every command reading the quantized checkpoint, GPTQ against RTN, an expert no
// calibration token reaches, per-class codecs and --tensor-type overrides, mixed precision by
// the integer program, and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "io/env.h"
#include "model/model.h"
#include "quant/codec.h"
#include "runtime/forward.h"
#include "support/paths.h"
#include "support/cli_expect.h"
#include "support/ckpt_util.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

const std::string kExpert = "model.layers.2.block_sparse_moe.experts.5.w2.weight";


// One RTN int4 checkpoint shared by the tests of this file (RTN needs no calibration).
const fs::path& rtn_model() {
  static TempDir tmp{"moe-quantize"};
  static const fs::path out = [] {
    const fs::path o = tmp / "rtn";
    const RunResult r = run_tool({"-q", "quantize", kModel.string(), o.string(), "--method", "rtn", "--codec", "int4",
                                  "--group", "64"});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return o;
  }();
  return out;
}

TEST(Quantize, WritesCodesAndExactBitsPerParameter) {
  const fs::path& out = rtn_model();
  const json cfg = read_json(out / "config.json");
  const json& q = cfg.at("quantization_config");
  EXPECT_EQ(q.at("quant_method"), "moe_tool");
  const json& w = q.at("weights");
  ASSERT_EQ(w.size(), 4u * 8u * 3u);  // experts only by default: no attention, router, embeddings
  const json& e = w.at(kExpert);
  EXPECT_EQ(e.at("encoding"), "intN");
  EXPECT_EQ(e.at("bits"), 4);
  EXPECT_EQ(e.at("group"), 64);
  EXPECT_EQ(e.at("symmetric"), false);  // the pass default: min-max with a zero point

  // w2 is [128, 256]: 4-bit codes 128 bytes per row, 4 groups of f16 scales and u8 zero points.
  const auto ck = io::Checkpoint::open(io::Env::posix(), out);
  uint64_t expert_bytes = 0;
  for (const auto& name : ck.names())
    if (name.find(".experts.") != std::string::npos) expert_bytes += ck.info(name).nbytes();
  const uint64_t per_w2 = 128 * (128 + 4 * 2 + 4), per_w13 = 256 * (64 + 2 * 2 + 2);
  EXPECT_EQ(expert_bytes, 4u * 8u * (per_w2 + 2 * per_w13));
  const int64_t expert_params = 4 * 8 * 3 * 256 * 128;
  const json report = read_json(out / "moe_tool_report.json");
  const json& after = report.at("tensor_classes").at("after").at("experts");
  EXPECT_EQ(after.at("bytes").get<uint64_t>(), expert_bytes);
  EXPECT_EQ(after.at("params").get<int64_t>(), expert_params);
  EXPECT_DOUBLE_EQ(report.at("expert_bits_per_param").at("after").get<double>(),
                   8.0 * static_cast<double>(expert_bytes) / static_cast<double>(expert_params));
  // The codec's own accounting agrees with the file.
  const auto spec = quant::parse_codec("int4:g64:asym");
  EXPECT_DOUBLE_EQ(quant::bits_per_param(spec, 128, 256), 8.0 * per_w2 / (128.0 * 256.0));
  // The per-matrix report.
  bool seen = false;
  for (const auto& m : report.at("layers").at(2).at("passes").at(0).at("matrices"))
    if (m.at("matrix") == "expert 5 down") {
      seen = true;
      EXPECT_EQ(m.at("codec"), "int4:g64:asym");
      EXPECT_DOUBLE_EQ(m.at("bits_per_param").get<double>(), 8.0 * per_w2 / (128.0 * 256.0));
    }
  EXPECT_TRUE(seen) << report.at("layers").at(2).dump();
  const RunResult ins = run_tool({"inspect", out.string(), "--json"});
  ASSERT_EQ(ins.exit_code, 0) << ins.describe();
  const json s = json::parse(ins.out);
  EXPECT_EQ(s.at("encodings").at("intN"), 96);
  EXPECT_EQ(s.at("tensor_classes").at("experts").at("bytes").get<uint64_t>(), expert_bytes);
}

TEST(Quantize, MaterializedCheckpointIsTheDequantization) {
  const fs::path& out = rtn_model();
  TempDir tmp;
  const RunResult m = run_tool({"-q", "convert", out.string(), (tmp / "dense").string(), "--materialize", "--dtype", "f32"});
  ASSERT_EQ(m.exit_code, 0) << m.describe();
  EXPECT_FALSE(read_json(tmp / "dense" / "config.json").contains("quantization_config"));
  const auto ck_n = io::Checkpoint::open(io::Env::posix(), out);
  const auto ck_d = io::Checkpoint::open(io::Env::posix(), tmp / "dense");
  const model::Model native = model::Model::load(ck_n), dense = model::Model::load(ck_d);
  for (int l : {0, 3}) {
    const auto& a = native.layers()[l].moe->experts[4];
    const auto& b = dense.layers()[l].moe->experts[4];
    ASSERT_NE(a.down.encoding(), nullptr);
    EXPECT_EQ(b.down.encoding(), nullptr);
    EXPECT_EQ(a.down.to_f32(), b.down.to_f32());
    EXPECT_EQ(a.up.to_f32(), b.up.to_f32());
  }
  // The forward of the native checkpoint dequantizes layer by layer: the same logits, bit for bit.
  std::vector<int32_t> tokens(48);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 977 + 13) % 4000);
  const runtime::MatrixRM ln = runtime::Forward(native).run(tokens, 24);
  const runtime::MatrixRM ld = runtime::Forward(dense).run(tokens, 24);
  EXPECT_EQ((ln - ld).cwiseAbs().maxCoeff(), 0.0f);
}

TEST(Quantize, EveryCommandReadsTheQuantizedCheckpoint) {
  const fs::path& out = rtn_model();
  TempDir tmp;
  const RunResult ev = run_tool({"-q", "eval", out.string(), "--text", kHeldout, "--ctx", "128", "--max-windows", "4",
                                 "--against", kModel.string(), "--json"});
  ASSERT_EQ(ev.exit_code, 0) << ev.describe();
  const json e = json::parse(ev.out);
  EXPECT_GT(e.at("kl_mean").get<double>(), 0.0);
  EXPECT_LT(e.at("kl_mean").get<double>(), 0.1);  // int4 keeps the model close
  const RunResult cal = run_tool({"-q", "calibrate", out.string(), "--text", kCalib, "--ctx", "64", "--windows", "2",
                                  "--routed-only", "-o", (tmp / "stats.safetensors").string()});
  EXPECT_EQ(cal.exit_code, 0) << cal.describe();
  // A later pass takes the encoded experts: prune keeps the codes of the experts it keeps.
  const RunResult pr = run_tool({"-q", "prune", out.string(), (tmp / "p").string(), "--method", "frequency", "--keep",
                                 "6", "--text", kCalib, "--ctx", "64", "--windows", "2"});
  ASSERT_EQ(pr.exit_code, 0) << pr.describe();
  EXPECT_EQ(read_json(tmp / "p" / "config.json").at("quantization_config").at("weights").size(), 4u * 6u * 3u);
}

// GPTQ against RTN at 3 and 2 bits, judged by KL on held-out text: GPTQ must win clearly.
TEST(Quantize, GptqBeatsRtnAtLowBits) {
  MOE_SKIP_UNDER_SANITIZERS();
  TempDir tmp;
  auto kl = [&](const std::string& method, const std::string& codec) {
    const fs::path o = tmp / (method + codec);
    const RunResult r = run_tool({"-q", "quantize", kModel.string(), o.string(), "--method", method, "--codec", codec,
                                  "--text", kCalib, "--ctx", "128", "--windows", "32"});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    const RunResult ev = run_tool({"-q", "eval", o.string(), "--text", kHeldout, "--ctx", "128", "--max-windows", "16",
                                   "--against", kModel.string(), "--json"});
    EXPECT_EQ(ev.exit_code, 0) << ev.describe();
    return ev.exit_code == 0 ? json::parse(ev.out).at("kl_mean").get<double>() : 1e9;
  };
  for (const std::string codec : {"int3", "int2", "ternary"}) {
    const double r = kl("rtn", codec), g = kl("gptq", codec);
    EXPECT_LT(g, 0.8 * r) << codec << ": gptq KL " << g << ", rtn KL " << r;
  }
}

// An expert that no calibration token reaches: router rows 5, 6, 7 of layer 1 made equal, so
// expert 7 always ties with two lower-numbered experts and top-2 never picks it. GPTQ quantizes
// it with the layer's all-token Hessian and says so.
TEST(Quantize, ExpertWithoutRoutedTokensUsesTheAllTokenHessian) {
  TempDir tmp;
  const fs::path in = tmp / "in";
  copy_folder(kModel, in);
  const std::string router = "model.layers.1.block_sparse_moe.gate.weight";
  const TensorMap t = read_tensors(kModel);
  const std::string& bytes = t.at(router).bytes;
  const size_t row = bytes.size() / 8;
  patch_tensor_bytes(in / "model.safetensors", router, 6 * row, bytes.substr(5 * row, row));
  patch_tensor_bytes(in / "model.safetensors", router, 7 * row, bytes.substr(5 * row, row));
  const fs::path out = tmp / "q";
  const RunResult r = run_tool({"-q", "quantize", in.string(), out.string(), "--method", "gptq", "--codec", "int4",
                                "--text", kCalib, "--ctx", "128", "--windows", "8"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json rep = read_json(out / "moe_tool_report.json");
  int seen = 0;
  for (const auto& m : rep.at("layers").at(1).at("passes").at(0).at("matrices")) {
    const std::string what = m.at("matrix");
    if (what.rfind("expert 7 ", 0) == 0) {
      ++seen;
      EXPECT_EQ(m.at("tokens"), 0) << m.dump();
      EXPECT_NE(m.at("hessian").get<std::string>().find("all tokens (no routed token)"), std::string::npos) << m.dump();
      EXPECT_EQ(m.at("method"), "gptq") << m.dump();
      EXPECT_LE(m.at("proxy_loss").get<double>(), m.at("rtn_proxy_loss").get<double>()) << m.dump();
    }
    if (what.rfind("expert 0 ", 0) == 0) {
      EXPECT_EQ(m.at("hessian"), "routed tokens") << m.dump();
    }
  }
  EXPECT_EQ(seen, 3);
  const RunResult ev = run_tool({"-q", "eval", out.string(), "--text", kHeldout, "--ctx", "128", "--max-windows", "2", "--json"});
  EXPECT_EQ(ev.exit_code, 0) << ev.describe();
}

// GPTQ's act-order: unset, on for the K-quants and off for the other codecs; given (--act-order,
// --act-order=false), for every codec. The report says which per matrix; the codes of the default
// equal those of --act-order for a K-quant and those of --act-order=false for q4_0.
TEST(Quantize, ActOrderIsTheDefaultForTheKQuants) {
  TempDir tmp;
  const std::vector<std::string> rules = {"layers\\.0\\..*experts\\.0\\.w2=q4_k", "layers\\.0\\..*experts\\.1\\.w2=q4_0",
                                          "layers\\.0\\.self_attn\\.o_proj=int4"};
  const std::string k_weight = "model.layers.0.block_sparse_moe.experts.0.w2.weight";
  auto quantize = [&](const std::string& name, const std::vector<std::string>& extra) {
    std::vector<std::string> a = {"-q", "quantize", kModel.string(), (tmp / name).string(), "--method", "gptq",
                                  "--experts", "keep", "--text", kCalib.string(), "--ctx", "64", "--windows", "4",
                                  "--tensor-type"};
    a.insert(a.end(), rules.begin(), rules.end());
    a.insert(a.end(), extra.begin(), extra.end());
    const RunResult r = run_tool(a);
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    const json rep = read_json(tmp / name / "moe_tool_report.json");
    std::map<std::string, bool> by_matrix;
    for (const auto& m : rep.at("layers").at(0).at("passes").at(0).at("matrices"))
      by_matrix[m.at("matrix").get<std::string>()] = m.at("act_order").get<bool>();
    return std::make_pair(by_matrix, rep.at("passes").at(0).at("params").at("act_order"));
  };
  const auto [dflt, dflt_param] = quantize("default", {});
  const auto [on, on_param] = quantize("on", {"--act-order"});
  const auto [off, off_param] = quantize("off", {"--act-order=false"});
  EXPECT_EQ(dflt_param, "auto");
  EXPECT_EQ(on_param, true);
  EXPECT_EQ(off_param, false);
  ASSERT_EQ(dflt.size(), 3u);
  for (const auto& [matrix, ao] : dflt) {
    EXPECT_EQ(ao, matrix.rfind("expert 0 ", 0) == 0) << matrix;  // q4_k on; q4_0 and the int4 o_proj off
    EXPECT_TRUE(on.at(matrix)) << matrix;
    EXPECT_FALSE(off.at(matrix)) << matrix;
  }
  const TensorMap td = read_tensors(tmp / "default"), ton = read_tensors(tmp / "on"), toff = read_tensors(tmp / "off");
  int seen = 0;
  for (const auto& [name, t] : td) {
    const bool k = name.rfind(k_weight, 0) == 0;
    const bool q40 = name.rfind("model.layers.0.block_sparse_moe.experts.1.w2.weight", 0) == 0;
    if (!k && !q40) continue;
    ++seen;
    EXPECT_EQ(t.bytes, (k ? ton : toff).at(name).bytes) << name;
    EXPECT_NE(t.bytes, (k ? toff : ton).at(name).bytes) << name;
  }
  EXPECT_EQ(seen, 2);
  // A recipe says the same with "auto" (the report's echo), and refuses anything else.
  for (const std::string v : {"auto", "on"}) {
    const fs::path recipe = tmp / "r.json";
    const json passes = json::array({{{"pass", "quantize"}, {"method", "gptq"}, {"experts", "keep"},
                                      {"tensor_type", rules}, {"act_order", v}}});
    write_file(recipe, json{{"model", kModel.string()},
                            {"calibration", {{"text", kCalib.string()}, {"ctx", 64}, {"windows", 4}}},
                            {"passes", passes},
                            {"output", {{"path", (tmp / "recipe").string()}}}}
                           .dump());
    const RunResult r = run_tool({"-q", "run", recipe.string()});
    if (v == "on") {
      EXPECT_EQ(r.exit_code, 2) << r.describe();
      EXPECT_NE(r.err.find("passes[0].act_order: expected true, false or \"auto\""), std::string::npos) << r.err;
      continue;
    }
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    const TensorMap tr = read_tensors(tmp / "recipe");
    int compared = 0;
    for (const auto& [name, t] : tr)
      if (name.rfind(k_weight, 0) == 0) {
        EXPECT_EQ(t.bytes, ton.at(name).bytes) << name;
        ++compared;
      }
    EXPECT_EQ(compared, 1);
  }
}

TEST(Quantize, ClassesAndTensorTypeOverrides) {
  TempDir tmp;
  const fs::path out = tmp / "q";
  // Experts ternary, attention int8, layer 3's experts kept by an override, lm_head int8 (RTN).
  const RunResult r = run_tool({"-q", "quantize", kModel.string(), out.string(), "--method", "rtn", "--codec",
                                "ternary-tq", "--attention", "int8", "--lm-head", "int8", "--tensor-type",
                                "layers\\.3\\..*experts=keep"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json w = read_json(out / "config.json").at("quantization_config").at("weights");
  EXPECT_EQ(w.at("model.layers.0.block_sparse_moe.experts.0.w1.weight").at("encoding"), "ternary");
  EXPECT_EQ(w.at("model.layers.0.block_sparse_moe.experts.0.w1.weight").at("grid"), "tq");
  EXPECT_EQ(w.at("model.layers.0.self_attn.o_proj.weight").at("encoding"), "intN");
  EXPECT_EQ(w.at("lm_head.weight").at("encoding"), "intN");
  EXPECT_FALSE(w.contains("model.layers.3.block_sparse_moe.experts.0.w1.weight"));
  EXPECT_FALSE(w.contains("model.layers.0.block_sparse_moe.gate.weight"));  // routers kept by default
  EXPECT_FALSE(w.contains("model.embed_tokens.weight"));
  const json rep = read_json(out / "moe_tool_report.json");
  ASSERT_TRUE(rep.contains("globals")) << rep.dump();
  EXPECT_EQ(rep.at("globals").at(0).at("matrices").at(0).at("matrix"), "lm_head");
  const RunResult ev = run_tool({"-q", "eval", out.string(), "--text", kHeldout, "--ctx", "128", "--max-windows", "2", "--json"});
  EXPECT_EQ(ev.exit_code, 0) << ev.describe();
}

TEST(Quantize, MixedPrecisionMeetsTheBudget) {
  TempDir tmp;
  const fs::path out = tmp / "q";
  const RunResult r = run_tool({"-q", "quantize", kModel.string(), out.string(), "--method", "gptq", "--avg-bits",
                                "2.5", "--text", kCalib, "--ctx", "128", "--windows", "8"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json rep = read_json(out / "moe_tool_report.json");
  for (int l = 0; l < 4; ++l) {
    const json& mp = rep.at("layers").at(l).at("passes").at(0).at("mixed_precision");
    EXPECT_LE(mp.at("achieved_avg_bits").get<double>(), 2.5 + 1e-9) << mp.dump();
    EXPECT_EQ(mp.at("status"), "optimal");
    std::set<std::string> codecs;
    for (const auto& e : mp.at("experts")) codecs.insert(e.at("codec").get<std::string>());
    EXPECT_GE(codecs.size(), 2u) << "a 2.5-bit budget over widths 1.6..8 mixes widths: " << mp.dump();
  }
  // The file's expert bits per parameter are within the budget too.
  EXPECT_LE(rep.at("expert_bits_per_param").at("after").get<double>(), 2.5 + 1e-9);
}

// avg_bits over the whole model (budget_scope model): one integer program over every routed
// expert, planned in a sweep before the layer loop, each layer's losses weighed by the MoE block's
// share of the residual stream. Without propagation both scopes measure the same losses on the
// same inputs, so the per-layer optima are one feasible plan of the model-wide program: its
// objective is no worse than theirs weighed the same way. The layers follow the plan.
TEST(Quantize, ModelWideMixedPrecisionIsNoWorseThanPerLayer) {
  TempDir tmp;
  auto run = [&](const std::string& scope) {
    const fs::path out = tmp / scope;
    const RunResult r = run_tool({"-q", "quantize", kModel.string(), out.string(), "--method", "rtn", "--avg-bits", "2.5",
                                  "--widths", "int2,int3,int4", "--budget-scope", scope, "--no-propagate", "--text", kCalib,
                                  "--ctx", "128", "--windows", "4"});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return read_json(out / "moe_tool_report.json");
  };
  const json layer = run("layer"), model = run("model");
  const json plan = model.at("plans").at(0);
  double per_layer = 0;
  for (int l = 0; l < 4; ++l) {
    const double w = plan.at("layers").at(l).at("weight").get<double>();
    EXPECT_TRUE(w > 0.0 && std::isfinite(w)) << "||MoE output||² / ||residual||² of layer " << l << ": " << w;
    // The block's share of the stream leaving the layer, which contains it: about 1 at most. (Against
    // the stream entering layer 0, the embeddings alone, it was 10⁴ and more.)
    EXPECT_LT(w, 2.0) << "layer " << l;
    per_layer += w * layer.at("layers").at(l).at("passes").at(0).at("mixed_precision").at("objective").get<double>();
  }
  EXPECT_EQ(plan.at("scope"), "model");
  EXPECT_LE(plan.at("objective").get<double>(), per_layer * (1 + 1e-4)) << plan.dump();
  EXPECT_LE(plan.at("achieved_avg_bits").get<double>(), 2.5 + 1e-9);
  EXPECT_LE(model.at("expert_bits_per_param").at("after").get<double>(), 2.5 + 1e-9);
  ASSERT_EQ(plan.at("layers").size(), 4u);
  for (int l = 0; l < 4; ++l) {  // each layer writes the widths the plan gave it
    const json& mp = model.at("layers").at(l).at("passes").at(0).at("mixed_precision");
    EXPECT_EQ(mp.at("scope"), "model");
    std::map<std::string, int> counts;
    for (const auto& e : mp.at("experts")) ++counts[e.at("codec").get<std::string>()];
    for (const auto& [codec, n] : plan.at("layers").at(l).at("experts_per_codec").items())
      EXPECT_EQ(counts[codec], n.get<int>()) << "layer " << l << " " << codec;
    EXPECT_NEAR(mp.at("layer_avg_bits").get<double>(), plan.at("layers").at(l).at("avg_bits").get<double>(), 1e-9);
  }
  const std::string m = kModel.string();
  expect_clean_failure(run_tool({"quantize", m, (tmp / "a").string(), "--method", "rtn", "--budget-scope", "model"}),
                       "--budget-scope: applies to mixed precision");
  expect_clean_failure(run_tool({"quantize", m, (tmp / "b").string(), "--method", "rtn", "--avg-bits", "3", "--budget-scope",
                                 "model", "--smooth", "--text", kCalib}),
                       "give budget_scope layer with it");
  EXPECT_FALSE(fs::exists(tmp / "a"));
  EXPECT_FALSE(fs::exists(tmp / "b"));
}

// The MoTE layout (recipes/mote/): a dense model upcycled with the dense MLP as full-precision
// shared expert, then only the routed experts quantized ternary by GPTQ.
TEST(Quantize, MoteLayoutUpcycleThenTernaryExperts) {
  TempDir tmp;
  const fs::path up = tmp / "up", q = tmp / "q";
  const RunResult u = run_tool({"-q", "upcycle", (kSrc / "data/models/llama-tiny").string(), up.string(), "--to",
                                "qwen2_moe", "--experts", "4", "--top-k", "2", "--method", "copy", "--shared-expert"});
  ASSERT_EQ(u.exit_code, 0) << u.describe();
  const RunResult r = run_tool({"-q", "quantize", up.string(), q.string(), "--method", "gptq", "--experts", "ternary",
                                "--shared", "keep", "--text", kCalib, "--ctx", "128", "--windows", "8"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json w = read_json(q / "config.json").at("quantization_config").at("weights");
  EXPECT_EQ(w.size(), 4u * 4u * 3u);  // routed experts only
  for (const auto& [name, entry] : w.items()) {
    EXPECT_NE(name.find(".experts."), std::string::npos) << name;
    EXPECT_EQ(entry.at("encoding"), "ternary") << name;
  }
  const TensorMap before = read_tensors(up), after = read_tensors(q);
  const std::string shared = "model.layers.1.mlp.shared_expert.down_proj.weight";
  ASSERT_TRUE(after.count(shared));
  EXPECT_EQ(after.at(shared), before.at(shared));  // the shared expert is bit for bit the dense MLP
  const RunResult ev = run_tool({"-q", "eval", q.string(), "--text", kHeldout, "--ctx", "128", "--max-windows", "4",
                                 "--against", up.string(), "--json"});
  ASSERT_EQ(ev.exit_code, 0) << ev.describe();
  EXPECT_LT(json::parse(ev.out).at("kl_mean").get<double>(), 0.05);
}

// A budget above the widest width is spent on the widest width everywhere, and the run says so.
TEST(Quantize, AvgBitsAboveTheWidestWidthSaysSo) {
  TempDir tmp;
  const RunResult r = run_tool({"quantize", kModel.string(), (tmp / "q").string(), "--method", "rtn", "--avg-bits", "17",
                                "--text", kCalib, "--ctx", "32", "--windows", "2", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json w = json::parse(r.out).at("warnings");
  EXPECT_NE(w.dump().find("avg_bits 17 is above the widest width, int8:g128:asym"), std::string::npos) << w;
}

// A group at least as wide as the row (docs/commands/quantize.md) is one group per row: the
// codes, scales and zero points of --group 0, byte for byte (mixtral-tiny: rows of 128 and 256
// inputs, --group 512), one scale per row; the config records the group as given.
TEST(Quantize, GroupWiderThanTheRowIsOneGroupPerRow) {
  TempDir tmp{"moe-quantize"};
  const fs::path wide = tmp / "wide", row = tmp / "row";
  for (const auto& [out, g] : {std::pair{wide, "512"}, {row, "0"}})
    ASSERT_EQ(run_tool({"-q", "quantize", kModel.string(), out.string(), "--method", "rtn", "--codec", "int4", "--group", g})
                  .exit_code,
              0);
  auto& env = io::Env::posix();
  const auto a = io::Checkpoint::open(env, wide), b = io::Checkpoint::open(env, row);
  ASSERT_EQ(a.names(), b.names());
  size_t compared = 0;
  for (const auto& name : a.names()) {
    const core::Tensor x = a.tensor(name), y = b.tensor(name);
    ASSERT_EQ(x.shape(), y.shape()) << name;
    EXPECT_TRUE(std::equal(x.data(), x.data() + x.nbytes(), y.data())) << name;
    ++compared;
  }
  EXPECT_GT(compared, 96u);
  EXPECT_EQ(a.info(kExpert + ".scales").shape, (core::Shape{128, 1}));  // w2: [128, 256]
  const json wa = a.config().at("quantization_config").at("weights").at(kExpert);
  EXPECT_EQ(wa.at("group"), 512);
  EXPECT_EQ(wa.at("cols"), 256);
  EXPECT_EQ(b.config().at("quantization_config").at("weights").at(kExpert).at("group"), 0);
}

TEST(Quantize, BadInputFailsCleanly) {
  TempDir tmp;
  const std::string m = kModel.string();
  expect_clean_failure(run_tool({"quantize", m, (tmp / "a").string(), "--method", "rtn", "--codec", "int5"}), "did you mean");
  expect_clean_failure(run_tool({"quantize", m, (tmp / "b").string(), "--method", "gptq", "--codec", "int4"}), "text");
  expect_clean_failure(run_tool({"quantize", m, (tmp / "c").string(), "--method", "rtn", "--avg-bits", "1.2", "--text", kCalib}),
                       "below the narrowest width");
  expect_clean_failure(run_tool({"quantize", m, (tmp / "d").string(), "--method", "rtn", "--tensor-type", "experts"}),
                       "REGEX=CODEC");
  expect_clean_failure(run_tool({"quantize", m, (tmp / "e").string(), "--method", "rtn", "--tensor-type", "(=int4"}),
                       "regular expression");
  expect_clean_failure(run_tool({"quantize", m, (tmp / "f").string(), "--method", "rtn", "--experts", "int4:g0"}), "--experts");
  for (const char* d : {"a", "b", "c", "d", "e", "f"}) EXPECT_FALSE(fs::exists(tmp / d)) << d;
}

// The routed experts' Grams are computed one expert at a time from the layer's activations; a
// budget that forces the activations (and what the pass makes) into spill files gives the same bytes (GPTQ with top-ups and
// the router's all-token Hessian; factorize svdllm), says so in the report, and leaves no file
// behind. A budget that is not a size is refused naming the flag.
TEST(Quantize, MemoryBudgetSpillsTheActivationsWithTheSameBytes) {
  MOE_SKIP_UNDER_SANITIZERS();  // four GPTQ/SVD-LLM runs; the spill file's code runs under them in InputGrams.*
  TempDir tmp;
  const std::string m = kModel.string();
  auto run = [&](const std::vector<std::string>& cmd, const std::string& name, const std::vector<std::string>& extra) {
    std::vector<std::string> args = {"-q", cmd.front(), m, (tmp / name).string(), "--text", kCalib.string(),
                                     "--ctx", "128", "--windows", "2"};
    args.insert(args.end(), cmd.begin() + 1, cmd.end());
    args.insert(args.end(), extra.begin(), extra.end());
    const RunResult r = run_tool(args);
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return read_json(tmp / name / "moe_tool_report.json");
  };
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"quantize", "--method", "gptq", "--codec", "int3", "--min-tokens", "512", "--router", "int8"}, "gptq"},
      {{"factorize", "--method", "svdllm", "--ratio", "0.5"}, "svdllm"}};
  for (const auto& [cmd, name] : cases) {
    const json ram = run(cmd, name + "-ram", {}), spill = run(cmd, name + "-spill", {"--memory-budget", "1KB"});
    EXPECT_EQ(read_tensors(tmp / (name + "-ram")), read_tensors(tmp / (name + "-spill"))) << name;
    EXPECT_EQ(ram.at("memory").at("layers_spilled"), 0) << name;
    EXPECT_NE(ram.at("memory").at("source").get<std::string>().find("auto"), std::string::npos) << name;
    EXPECT_EQ(spill.at("memory").at("layers_spilled"), 4) << name;
    // What the pass made (codes, scales, factors) went through the temporary file too.
    EXPECT_GT(spill.at("memory").at("pass_output_bytes_spilled").get<int64_t>(), 0) << name;
    EXPECT_EQ(spill.at("memory").at("activation_budget"), 1000) << name;
    // x [256, H] and h of the 256·2 routed rows [512, I], as f32
    const json cfg = read_json(kModel / "config.json");
    const int64_t H = cfg.at("hidden_size"), I = cfg.at("intermediate_size");
    EXPECT_EQ(spill.at("memory").at("largest_layer_activation_bytes"), 4 * (256 * H + 256 * 2 * I)) << name;
  }
  for (const auto& e : fs::directory_iterator(tmp.path()))
    EXPECT_EQ(e.path().filename().string().find("moe-tool-tmp"), std::string::npos) << e.path();
  expect_clean_failure(run_tool({"quantize", m, (tmp / "bad").string(), "--method", "gptq", "--text", kCalib,
                                 "--memory-budget", "lots"}),
                       "--memory-budget");
  EXPECT_FALSE(fs::exists(tmp / "bad"));
  // A budget where nothing computes Grams is said to be unused.
  const RunResult rtn = run_tool({"quantize", m, (tmp / "rtn").string(), "--method", "rtn", "--memory-budget", "1GB", "--json"});
  ASSERT_EQ(rtn.exit_code, 0) << rtn.describe();
  EXPECT_NE(rtn.out.find("--memory-budget: no pass of this run computes Gram matrices"), std::string::npos) << rtn.out;
}

// gpt-oss stores its experts fused (one tensor per layer), which has no place for codes: the
// refusal names the flag that works on this very command, and that flag does work.
TEST(Quantize, FusedExpertsRefusalNamesMaterializeOnTheCommand) {
  TempDir tmp;
  const std::string model = (kSrc / "data/gpt-oss-tiny").string();
  const std::vector<std::string> args = {"-q", "quantize", model, (tmp / "q").string(), "--method", "rtn", "--codec", "int4"};
  expect_clean_failure(run_tool(args), "passes[0]: quantize rtn writes the routed experts encoded, which the fused gpt_oss "
                                       "expert layout cannot hold: --materialize writes them dense");
  EXPECT_FALSE(fs::exists(tmp / "q"));
  std::vector<std::string> dry = args;  // refused by the plan, not when the first layer is written
  dry.push_back("--dry-run");
  expect_clean_failure(run_tool(dry), "which the fused gpt_oss expert layout cannot hold");
  std::vector<std::string> with = args;
  with.push_back("--materialize");
  const RunResult r = run_tool(with);
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_TRUE(fs::exists(tmp / "q" / "model.safetensors"));
}

}  // namespace
}  // namespace moe::test
