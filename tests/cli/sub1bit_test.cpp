// `quantize --sub1bit` through the CLI on mixtral-tiny: QMoE dictionary coding of ternary experts
// (quant/ternary_dict.h), one dictionary per checkpoint (--dict-scope model, the default) or per
// layer, lossless against the ternary checkpoint in both scopes (the same weights, the same
// logits, the same eval), GPTQ-ternary then coding in one run, every command reading it (prune
// moving coded experts included), and bad input (refused codecs and options, corrupted code
// streams, row counts and dictionaries) failing cleanly.
#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>

#include "io/checkpoint.h"
#include "model/model.h"
#include "pipeline/model_dictionary.h"
#include "quant/ternary_dict.h"
#include "runtime/forward.h"
#include "support/paths.h"
#include "support/cli_expect.h"
#include "support/ckpt_util.h"
#include "support/run.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

const std::string kExpert = "model.layers.2.block_sparse_moe.experts.5.w2.weight";


TempDir& dir() {
  static TempDir tmp{"moe-sub1bit"};
  return tmp;
}

// RTN ternary (QMoE grid, τ = 0.5): plain ("ternary"), and dictionary-coded with dict_scope
// "model" or "layer".
const fs::path& quantized(const std::string& mode) {
  static std::map<std::string, fs::path> done;
  if (!done.count(mode)) {
    const fs::path o = dir() / mode;
    std::vector<std::string> args = {"-q", "quantize", kModel.string(), o.string(), "--method", "rtn", "--codec", "ternary"};
    if (mode != "ternary") args.insert(args.end(), {"--sub1bit", "--dict-scope", mode});
    const RunResult r = run_tool(args);
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    done[mode] = o;
  }
  return done[mode];
}

// Every expert weight ternary-dict; returns the set of dictionary tensors they name.
std::set<std::string> coded_dictionaries(const fs::path& out) {
  const json cfg = read_json(out / "config.json");
  const json& w = cfg.at("quantization_config").at("weights");
  EXPECT_EQ(w.size(), 4u * 8u * 3u);
  std::set<std::string> dicts;
  for (const auto& [name, e] : w.items()) {
    EXPECT_EQ(e.at("encoding"), "ternary-dict") << name;
    EXPECT_EQ(e.at("parts").size(), 4u);
    EXPECT_EQ(e.at("parts").at("codes"), name + ".codes");
    dicts.insert(e.at("parts").at("dictionary").get<std::string>());
  }
  EXPECT_EQ(w.at(kExpert).at("cols"), 256);
  return dicts;
}

TEST(Sub1bit, WritesOneDictionaryPerCheckpointByDefault) {
  // The default scope is the model's: quantize without --dict-scope writes the same checkpoint.
  const fs::path d = dir() / "default";
  const RunResult r = run_tool({"-q", "quantize", kModel.string(), d.string(), "--method", "rtn", "--codec", "ternary", "--sub1bit"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(read_json(d / "config.json"), read_json(quantized("model") / "config.json"));

  const fs::path& out = quantized("model");
  EXPECT_EQ(coded_dictionaries(out), std::set<std::string>{pipeline::kModelDictionaryTensor});
  const json report = read_json(out / "moe_tool_report.json");
  const double bits = report.at("expert_bits_per_param").at("after").get<double>();
  // The run's report: one dictionary, its bits split over the 96 weights; it agrees with the file.
  const json& s = report.at("sub1bit");
  EXPECT_EQ(s.at("dict_scope"), "model");
  EXPECT_EQ(s.at("weights"), 96);
  EXPECT_EQ(s.at("dictionary_bits").get<int64_t>() % 16, 0);
  EXPECT_LE(s.at("dictionary_codewords").get<int64_t>(), 65536);
  const json& c = s.at("classes").at("experts");
  EXPECT_GT(c.at("zero_fraction").get<double>(), 0.5);
  EXPECT_LT(c.at("zero_fraction").get<double>(), 1.0);
  EXPECT_NEAR(c.at("bits_per_param").get<double>(), bits, 1e-9);
  // Layers report their zero fractions; the bits come with the model's dictionary.
  for (const json& layer : report.at("layers"))
    for (const json& p : layer.at("passes"))
      EXPECT_EQ(p.at("sub1bit").at("dict_scope"), "model") << layer.dump();
  // inspect counts the one dictionary once, as the run does.
  const RunResult in = run_tool({"-q", "inspect", out.string(), "--json"});
  ASSERT_EQ(in.exit_code, 0) << in.describe();
  EXPECT_NEAR(json::parse(in.out).at("tensor_classes").at("experts").at("bits_per_param").get<double>(), bits, 1e-12);
  // Smaller than one dictionary per layer on this fixture (the measurement behind the default).
  const double layer_bits = read_json(quantized("layer") / "moe_tool_report.json").at("expert_bits_per_param").at("after");
  EXPECT_LT(bits, layer_bits);
}

TEST(Sub1bit, WritesOneDictionaryPerLayerWithLayerScope) {
  const fs::path& out = quantized("layer");
  EXPECT_EQ(coded_dictionaries(out).size(), 4u);  // shared by the layer's 24 expert matrices
  const json report = read_json(out / "moe_tool_report.json");
  const json ternary_report = read_json(quantized("ternary") / "moe_tool_report.json");
  const double bits = report.at("expert_bits_per_param").at("after").get<double>();
  EXPECT_LT(bits, ternary_report.at("expert_bits_per_param").at("after").get<double>());
  EXPECT_FALSE(report.contains("sub1bit"));
  // The layer report's per-class figures; the sum over layers agrees with the file's bytes.
  double layer_bits = 0, params = 0;
  for (const json& layer : report.at("layers")) {
    const json* s = nullptr;
    for (const json& p : layer.at("passes"))
      if (p.contains("sub1bit")) s = &p.at("sub1bit");
    ASSERT_NE(s, nullptr) << layer.dump();
    const json& c = s->at("classes").at("experts");
    EXPECT_GT(c.at("zero_fraction").get<double>(), 0.5);
    EXPECT_LT(c.at("zero_fraction").get<double>(), 1.0);
    layer_bits += c.at("bits_per_param").get<double>() * c.at("params").get<double>();
    params += c.at("params").get<double>();
  }
  EXPECT_NEAR(layer_bits / params, bits, 1e-9);
}

void expect_lossless(const std::string& scope) {
  const auto ck_s = io::Checkpoint::open(io::Env::posix(), quantized(scope));
  const auto ck_t = io::Checkpoint::open(io::Env::posix(), quantized("ternary"));
  const model::Model s = model::Model::load(ck_s), t = model::Model::load(ck_t);
  int n = 0;
  for (size_t l = 0; l < s.layers().size(); ++l)
    for (size_t e = 0; e < s.layers()[l].moe->experts.size(); ++e) {
      const auto& a = s.layers()[l].moe->experts[e];
      const auto& b = t.layers()[l].moe->experts[e];
      for (auto [x, y] : {std::pair{&a.gate, &b.gate}, {&a.up, &b.up}, {&a.down, &b.down}}) {
        ASSERT_NE(dynamic_cast<const quant::TernaryDict*>(x->encoding()), nullptr);
        EXPECT_EQ(x->to_f32(), y->to_f32());
        ++n;
      }
    }
  EXPECT_EQ(n, 96);
  std::vector<int32_t> tokens(48);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 977 + 13) % 4000);
  const runtime::MatrixRM ls = runtime::Forward(s).run(tokens, 24);
  const runtime::MatrixRM lt = runtime::Forward(t).run(tokens, 24);
  EXPECT_EQ((ls - lt).cwiseAbs().maxCoeff(), 0.0f);

  // eval: the same perplexity, bit for bit, and zero KL against the ternary checkpoint.
  auto eval = [&](const fs::path& m, bool against) {
    std::vector<std::string> a = {"-q", "eval", m.string(), "--text", kHeldout, "--ctx", "128", "--max-windows", "3", "--json"};
    if (against) a.insert(a.end(), {"--against", quantized("ternary").string()});
    const RunResult r = run_tool(a);
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return json::parse(r.out);
  };
  const json against = eval(quantized(scope), true);
  EXPECT_EQ(against.at("kl_mean").get<double>(), 0.0);
  EXPECT_EQ(against.at("top1_agreement").get<double>(), 1.0);
  const json es = eval(quantized(scope), false), et = eval(quantized("ternary"), false);
  EXPECT_EQ(es.at("nll_sum").get<double>(), et.at("nll_sum").get<double>());
  EXPECT_EQ(es.at("perplexity").get<double>(), et.at("perplexity").get<double>());
}

TEST(Sub1bit, LosslessAgainstTheTernaryCheckpointWithTheModelDictionary) { expect_lossless("model"); }
TEST(Sub1bit, LosslessAgainstTheTernaryCheckpointWithLayerDictionaries) { expect_lossless("layer"); }

TEST(Sub1bit, GptqTernaryThenCodingInOneRunAndEveryCommandReadsIt) {
  const fs::path o = dir() / "gptq";
  const RunResult r = run_tool({"-q", "quantize", kModel.string(), o.string(), "--method", "gptq", "--codec", "ternary:t0.7",
                                "--sub1bit", "--text", kCalib, "--ctx", "64", "--windows", "4"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(read_json(o / "config.json").at("quantization_config").at("weights").at(kExpert).at("encoding"), "ternary-dict");
  const RunResult in = run_tool({"-q", "inspect", o.string(), "--json"});
  ASSERT_EQ(in.exit_code, 0) << in.describe();
  EXPECT_NE(in.out.find("ternary-dict"), std::string::npos);
  const RunResult m = run_tool({"-q", "convert", o.string(), (dir() / "gptq-dense").string(), "--materialize"});
  ASSERT_EQ(m.exit_code, 0) << m.describe();
  EXPECT_FALSE(read_json(dir() / "gptq-dense" / "config.json").contains("quantization_config"));
  const RunResult cal = run_tool({"-q", "calibrate", o.string(), "--text", kCalib, "--ctx", "64", "--windows", "2",
                                  "--routed-only", "-o", (dir() / "stats.safetensors").string()});
  EXPECT_EQ(cal.exit_code, 0) << cal.describe();
  // A later pass moves coded experts (their code streams differ in length): prune keeps them coded.
  const RunResult pr = run_tool({"-q", "prune", o.string(), (dir() / "gptq-pruned").string(), "--method", "frequency",
                                 "--keep", "6", "--text", kCalib, "--ctx", "64", "--windows", "2"});
  ASSERT_EQ(pr.exit_code, 0) << pr.describe();
  const json pw = read_json(dir() / "gptq-pruned" / "config.json").at("quantization_config").at("weights");
  EXPECT_EQ(pw.size(), 4u * 6u * 3u);
  std::set<std::string> dicts;
  for (const auto& [name, e] : pw.items()) {
    EXPECT_EQ(e.at("encoding"), "ternary-dict") << name;
    dicts.insert(e.at("parts").at("dictionary").get<std::string>());
  }
  // The checkpoint's dictionary stays one tensor (under its first user's name in the new output).
  EXPECT_EQ(dicts, std::set<std::string>{"model.layers.0.block_sparse_moe.experts.0.w1.weight.dict"});
}

TEST(Sub1bit, ThresholdScaledByImportanceFollowsTheRuleAndZerosRarelyUsedExperts) {
  const fs::path o = dir() / "importance";
  const RunResult r = run_tool({"-q", "quantize", kModel.string(), o.string(), "--method", "rtn", "--codec", "ternary:t0.5",
                                "--sub1bit", "--threshold-scale", "importance", "--threshold-gamma", "1", "--text", kCalib,
                                "--ctx", "64", "--windows", "4"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json report = read_json(o / "moe_tool_report.json");
  int layers = 0;
  for (const json& layer : report.at("layers")) {
    const json& ts = layer.at("passes").at(0).at("threshold_scale");
    EXPECT_EQ(ts.at("gamma"), 1.0);
    double mean = 0;
    for (const json& e : ts.at("experts")) mean += e.at("tokens").get<double>();
    mean /= static_cast<double>(ts.at("experts").size());
    const json* busiest = nullptr;
    const json* rarest = nullptr;
    for (const json& e : ts.at("experts")) {
      const double f = e.at("tokens").get<double>();
      const double want = f > 0 ? std::min(1.0, 0.5 * std::clamp(mean / f, 0.5, 2.0)) : 1.0;
      EXPECT_NEAR(e.at("threshold").get<double>(), want, 1e-12) << e.dump();
      if (!busiest || f > busiest->at("tokens").get<double>()) busiest = &e;
      if (!rarest || f < rarest->at("tokens").get<double>()) rarest = &e;
    }
    ASSERT_NE(busiest, rarest);
    EXPECT_GT(rarest->at("zero_fraction").get<double>(), busiest->at("zero_fraction").get<double>()) << ts.dump();
    ++layers;
  }
  EXPECT_EQ(layers, 4);
  // Lossless still: coded with the checkpoint's dictionary.
  EXPECT_EQ(read_json(o / "config.json").at("quantization_config").at("weights").at(kExpert).at("encoding"), "ternary-dict");
}

// A model with dense layers (deepseek-v2-tiny: layer 0 dense) whose dense MLPs take the ternary
// codec too: the thresholds are scaled in the MoE layers only (no routing statistics elsewhere).
TEST(Sub1bit, ThresholdScaleWithDenseLayers) {
  const fs::path o = dir() / "importance-dense";
  const RunResult r = run_tool({"-q", "quantize", (fs::path(MOE_SOURCE_DIR) / "data/deepseek-v2-tiny").string(), o.string(),
                                "--method", "rtn", "--codec", "ternary", "--threshold-scale", "importance", "--text", kCalib,
                                "--ctx", "32", "--windows", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json report = read_json(o / "moe_tool_report.json");
  ASSERT_EQ(report.at("layers").size(), 3u);
  for (const json& layer : report.at("layers")) {
    const json& pass = layer.at("passes").at(0);
    EXPECT_EQ(pass.contains("threshold_scale"), layer.at("layer").get<int>() > 0) << layer.at("layer");
  }
}

TEST(Sub1bit, BadInputFailsCleanly) {
  TempDir tmp;
  const std::string m = kModel.string();
  expect_clean_failure(run_tool({"quantize", m, (tmp / "a").string(), "--method", "rtn", "--codec", "int4", "--sub1bit"}),
                       "ternary-minmax row codecs");
  expect_clean_failure(run_tool({"quantize", m, (tmp / "b").string(), "--method", "rtn", "--codec", "ternary-absmean",
                                 "--sub1bit"}),
                       "found ternary-absmean");
  expect_clean_failure(run_tool({"quantize", m, (tmp / "c").string(), "--method", "rtn", "--codec", "ternary:g64",
                                 "--sub1bit"}),
                       "ternary-minmax:g64");
  expect_clean_failure(run_tool({"quantize", m, (tmp / "d").string(), "--method", "rtn", "--codec", "ternary",
                                 "--dict-scope", "layer"}),
                       "--dict-scope: applies to sub1bit");
  expect_clean_failure(run_tool({"quantize", m, (tmp / "e").string(), "--method", "rtn", "--codec", "ternary", "--sub1bit",
                                 "--dict-scope", "tensor"}),
                       "--dict-scope: unknown value \"tensor\"");
  expect_clean_failure(run_tool({"quantize", m, (tmp / "f").string(), "--method", "rtn", "--codec", "int4",
                                 "--threshold-scale", "importance", "--text", kCalib}),
                       "--threshold-scale: scales the ternary zero threshold of the routed experts, whose codec is int4");
  expect_clean_failure(run_tool({"quantize", m, (tmp / "g").string(), "--method", "rtn", "--codec", "ternary",
                                 "--threshold-gamma", "2"}),
                       "--threshold-gamma: applies to threshold_scale importance");
  for (const char* d : {"a", "b", "c", "d", "e", "f", "g"}) EXPECT_FALSE(fs::exists(tmp / d)) << d;

  // Corrupted code streams: exit 2, one line naming the tensor and the part.
  auto broken = [&](const std::string& what, const std::string& part, uint64_t at, const std::string& bytes) {
    const fs::path d = tmp / what;
    copy_folder(quantized("model"), d);
    patch_tensor_bytes(d / "model.safetensors", kExpert + part, at, bytes);
    return d;
  };
  const fs::path beyond = broken("beyond", ".codes", 0, std::string("\xff\xff", 2));
  const RunResult e1 = run_tool({"eval", beyond.string(), "--text", kHeldout, "--ctx", "64", "--max-windows", "1"});
  expect_clean_failure(e1, "beyond the dictionary");
  EXPECT_NE(e1.err.find(kExpert), std::string::npos) << e1.describe();
  // Row 0's code count raised to 255: the counts no longer sum to the stream's length.
  const fs::path counts = broken("counts", ".counts", 0, std::string("\xff", 1));
  const RunResult e2 = run_tool({"convert", counts.string(), (tmp / "o-dense").string(), "--materialize"});
  expect_clean_failure(e2, "part \"counts\": rows 0..");
  EXPECT_NE(e2.err.find(kExpert), std::string::npos) << e2.describe();
  // A NaN row level: the forward refuses it, naming the file and the encoded weight (not a part).
  const fs::path nan_level = broken("nan-level", ".levels", 0, std::string("\x00\x7e", 2));  // f16 NaN
  const RunResult e3 = run_tool({"eval", nan_level.string(), "--text", kHeldout, "--ctx", "64", "--max-windows", "1"});
  expect_clean_failure(e3, "non-finite value nan");
  EXPECT_NE(e3.err.find(nan_level.string() + ": tensor " + kExpert + ":"), std::string::npos) << e3.describe();
  // A layer's dictionary is stored under its first user's name, the model's under its own; entry
  // 1 naming a codeword not created yet.
  for (const auto& [scope, tensor] : {std::pair<std::string, std::string>{"layer", "model.layers.2.block_sparse_moe.experts.0.w1.weight.dict"},
                                      {"model", pipeline::kModelDictionaryTensor}}) {
    const fs::path cap = tmp / ("cap-" + scope);
    copy_folder(quantized(scope), cap);
    patch_tensor_bytes(cap / "model.safetensors", tensor, 2, std::string("\xf0\xff", 2));
    expect_clean_failure(run_tool({"eval", cap.string(), "--text", kHeldout, "--ctx", "64", "--max-windows", "1"}),
                         "part \"dictionary\": entry 1 expands codeword 65519, not created");
  }
}

// A codec sub-1-bit coding cannot take is named by the flag that set it and the classes it covers.
TEST(Sub1bit, RefusalNamesTheFlagThatSetTheCodec) {
  TempDir tmp;
  const fs::path model = fs::path(MOE_SOURCE_DIR) / "data/models/mixtral-tiny";
  const RunResult a = run_tool({"quantize", model.string(), (tmp.path() / "o").string(), "--method", "rtn", "--codec",
                                "int4", "--sub1bit"});
  EXPECT_EQ(a.exit_code, 2) << a.describe();
  EXPECT_NE(a.err.find("--sub1bit: "), std::string::npos) << a.err;
  EXPECT_NE(a.err.find("from --codec (experts, shared, dense)"), std::string::npos) << a.err;
  const RunResult b = run_tool({"quantize", model.string(), (tmp.path() / "o").string(), "--method", "rtn", "--codec",
                                "ternary", "--attention", "int8", "--sub1bit"});
  EXPECT_EQ(b.exit_code, 2) << b.describe();
  EXPECT_NE(b.err.find("from --attention (attention)"), std::string::npos) << b.err;
  EXPECT_FALSE(fs::exists(tmp.path() / "o"));
}

}  // namespace
}  // namespace moe::test
