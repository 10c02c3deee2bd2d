// The cases of docs/encodings.md one by one: an encoded router through prune (the segfault), merge
// keeping the experts it does not change, warnings for dequantizing passes and outputs larger than
// their inputs, --tensor-type rules (repeated, comma lists, rules that match nothing), --group that
// no codec takes, factorize options that would change nothing, and reports that echo what was
// written.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "support/paths.h"
#include "support/cli_expect.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

const fs::path kMixtral = fs::path(MOE_SOURCE_DIR) / "data/models/mixtral-tiny";  // not from kSrc: support/paths.h

class Encodings : public ::testing::Test {
 protected:
  TempDir tmp{"moe-encodings"};

  // Synthetic models with a tokenizer: qwen2_moe (shared expert, dense layer 0), mixtral.
  fs::path qwen() {
    const fs::path p = tmp / "qwen";
    if (!fs::exists(p)) write_synth(make_synth("qwen2_moe"), p, {.tokenizer = true});
    return p;
  }
  fs::path mixtral() {
    const fs::path p = tmp / "mixtral";
    if (!fs::exists(p)) write_synth(make_synth("mixtral"), p, {.tokenizer = true});
    return p;
  }
  RunResult tool(std::vector<std::string> args) {
    args.insert(args.begin(), "-q");
    return run_tool(args);
  }
};

json qweights(const fs::path& model) {
  const json c = read_json(model / "config.json");
  return c.contains("quantization_config") ? c["quantization_config"].value("weights", json::object()) : json::object();
}

// Layer `layer`'s router, decoded.
std::vector<float> router_of(const fs::path& model, int layer) {
  const auto ck = io::Checkpoint::open(io::Env::posix(), model);
  const auto m = model::Model::load(ck);
  return m.layers().at(static_cast<size_t>(layer)).moe->router.to_f32();
}

// Issue case 29.1: quantize --router int8, then prune --method random: exit 0, the router keeps its
// int8 codes (the kept rows, bit for bit: the decoded rows equal the input's decoded rows).
TEST_F(Encodings, PruneKeepsAnInt8RouterRowByRow) {
  const fs::path q = tmp / "q", out = tmp / "pruned";
  ASSERT_EQ(tool({"quantize", kMixtral.string(), q.string(), "--method", "rtn", "--router", "int8"}).exit_code, 0);
  const RunResult r = tool({"prune", q.string(), out.string(), "--method", "random", "--keep", "6"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json w = qweights(out);
  const std::string router = "model.layers.1.block_sparse_moe.gate.weight";
  ASSERT_TRUE(w.contains(router)) << w.dump();
  EXPECT_EQ(w[router].at("encoding"), "intN");
  EXPECT_EQ(w[router].at("bits"), 8);
  const json rep = read_json(out / "moe_tool_report.json");
  const json kept = rep.at("layers")[1].at("passes")[0].at("kept");
  const std::vector<float> before = router_of(q, 1), after = router_of(out, 1);
  const size_t H = before.size() / 8;
  ASSERT_EQ(after.size(), 6 * H);
  for (size_t k = 0; k < kept.size(); ++k)
    for (size_t j = 0; j < H; ++j)
      ASSERT_EQ(after[k * H + j], before[kept[k].get<size_t>() * H + j]) << "row " << k << " col " << j;
}

// The same through a recipe [quantize router, prune] on one run.
TEST_F(Encodings, RecipeQuantizeRouterThenPrune) {
  const fs::path recipe = tmp / "r.json", out = tmp / "out";
  write_file(recipe, json{{"model", mixtral().string()},
                          {"passes", {{{"pass", "quantize"}, {"method", "rtn"}, {"router", "int8"}, {"experts", "keep"}},
                                      {{"pass", "prune"}, {"method", "random"}, {"keep", 2}}}},
                          {"output", {{"path", out.string()}}}}
                         .dump());
  const RunResult r = tool({"run", recipe.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json w = qweights(out).at("model.layers.0.block_sparse_moe.gate.weight");
  EXPECT_EQ(w.at("encoding"), "intN");
  EXPECT_EQ(router_of(out, 0).size(), 2u * 32u);
}

// Issue case 29.1 (merge): "cannot convert F32 to U8" on an encoded router; now the merged router is
// written dense and the plan says so.
TEST_F(Encodings, MergeOfAnEncodedRouterWritesItDenseAndSaysSo) {
  const fs::path q = tmp / "q", out = tmp / "merged";
  ASSERT_EQ(tool({"quantize", mixtral().string(), q.string(), "--method", "rtn", "--router", "int8", "--experts", "keep"}).exit_code, 0);
  const RunResult dry = tool({"merge", q.string(), out.string(), "--method", "hcsmoe", "--experts", "2", "--text", kCalib,
                              "--ctx", "16", "--windows", "2", "--dry-run"});
  ASSERT_EQ(dry.exit_code, 0) << dry.describe();
  EXPECT_NE(dry.out.find("warning  merge: the router stored as intN is dequantized"), std::string::npos) << dry.out;
  const RunResult r = tool({"merge", q.string(), out.string(), "--method", "hcsmoe", "--experts", "2", "--text", kCalib,
                            "--ctx", "16", "--windows", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("warning  merge: the router stored as intN is dequantized"), std::string::npos) << r.out;
  EXPECT_FALSE(qweights(out).contains("model.layers.0.block_sparse_moe.gate.weight"));
}

// Issue case 29.4: merge of an int4 model keeps the experts it leaves alone (groups of one) as int4
// and dequantizes only the merged ones; the summary says so.
TEST_F(Encodings, MergeKeepsTheEncodingOfExpertsItLeavesAlone) {
  const fs::path q = tmp / "q", out = tmp / "merged";
  ASSERT_EQ(tool({"quantize", mixtral().string(), q.string(), "--method", "rtn", "--codec", "int4"}).exit_code, 0);
  const RunResult r = tool({"merge", q.string(), out.string(), "--method", "hcsmoe", "--experts", "3", "--text", kCalib,
                            "--ctx", "16", "--windows", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("warning  merge: experts stored as intN are dequantized to merge them"), std::string::npos) << r.out;
  const json rep = read_json(out / "moe_tool_report.json"), w = qweights(out);
  int singles = 0, merged = 0;
  for (int l = 0; l < 2; ++l) {
    const json groups = rep.at("layers")[l].at("passes")[0].at("groups");
    ASSERT_EQ(groups.size(), 3u);
    for (size_t g = 0; g < groups.size(); ++g) {
      const std::string name = "model.layers." + std::to_string(l) + ".block_sparse_moe.experts." + std::to_string(g) + ".w1.weight";
      if (groups[g].size() == 1) {
        ++singles;
        ASSERT_TRUE(w.contains(name)) << name;
        EXPECT_EQ(w[name].at("encoding"), "intN");
      } else {
        ++merged;
        EXPECT_FALSE(w.contains(name)) << name;  // dense
      }
    }
  }
  EXPECT_GT(singles, 0);
  EXPECT_GT(merged, 0);
  // A recipe [quantize int4 + router int8, merge] keeps a quantization_config for what stays encoded.
  const fs::path recipe = tmp / "r.json";
  write_file(recipe, json{{"model", mixtral().string()},
                          {"calibration", {{"text", kCalib}, {"ctx", 16}, {"windows", 2}}},
                          {"passes", {{{"pass", "quantize"}, {"method", "rtn"}, {"codec", "int4"}, {"router", "ternary"}},
                                      {{"pass", "merge"}, {"method", "hcsmoe"}, {"experts", 3}}}},
                          {"output", {{"path", (tmp / "recipe-out").string()}}}}
                         .dump());
  const RunResult rr = tool({"run", recipe.string()});
  ASSERT_EQ(rr.exit_code, 0) << rr.describe();
  EXPECT_NE(rr.out.find("passes[1] (merge): experts stored as intN"), std::string::npos) << rr.out;
  EXPECT_FALSE(qweights(tmp / "recipe-out").empty());
}

// Issue case 29.4: int2 in groups of 1 stores 26 bits per weight: the output is larger than the
// bf16 input, and the summary says so with both sizes.
TEST_F(Encodings, LargerOutputIsAWarningWithBothSizes) {
  const RunResult r = tool({"quantize", mixtral().string(), (tmp / "q").string(), "--method", "rtn", "--codec", "int2",
                            "--group", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto w = r.out.find("warning  the output (");
  ASSERT_NE(w, std::string::npos) << r.out;
  EXPECT_NE(r.out.find(") is larger than its input (", w), std::string::npos) << r.out;
  EXPECT_TRUE(read_json(tmp / "q" / "moe_tool_report.json").contains("warnings"));
  // int4 in groups of 128 is smaller: no warning.
  const RunResult s = tool({"quantize", mixtral().string(), (tmp / "q4").string(), "--method", "rtn"});
  ASSERT_EQ(s.exit_code, 0) << s.describe();
  EXPECT_EQ(s.out.find("warning"), std::string::npos) << s.out;
}

// Issue 27 edge 4: factorize of a quantized model says that it dequantizes the experts.
TEST_F(Encodings, FactorizeOfAQuantizedModelSaysItDequantizes) {
  const fs::path q = tmp / "q";
  ASSERT_EQ(tool({"quantize", mixtral().string(), q.string(), "--method", "rtn", "--codec", "int4"}).exit_code, 0);
  const RunResult r = tool({"factorize", q.string(), (tmp / "f").string(), "--method", "svd", "--ratio", "0.5", "--dry-run"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("warning  factorize: experts stored as intN are dequantized and factorized"), std::string::npos) << r.out;
}

// Issue case 29.11: the report echoes the codec as written; a --group no codec takes is refused.
TEST_F(Encodings, GroupThatNoCodecTakesIsRefusedAndReportsEchoTheWrittenGroup) {
  expect_clean_failure(tool({"quantize", mixtral().string(), (tmp / "q").string(), "--method", "rtn", "--codec", "int4:g64",
                             "--group", "32"}),
                       "--group: 32 applies to integer codecs that name no group");
  EXPECT_FALSE(fs::exists(tmp / "q"));
  expect_clean_failure(tool({"quantize", mixtral().string(), (tmp / "q").string(), "--method", "rtn", "--codec", "ternary",
                             "--sym"}),
                       "--sym: applies to integer codecs that name no symmetry");
  const RunResult r = tool({"quantize", mixtral().string(), (tmp / "q").string(), "--method", "rtn", "--codec", "int4:g16"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("\"experts\":\"int4:g16:asym\""), std::string::npos) << r.out;
  const json m = read_json(tmp / "q" / "moe_tool_report.json").at("layers")[0].at("passes")[0].at("matrices")[0];
  EXPECT_EQ(m.at("written").at("group"), 16);
  EXPECT_EQ(m.at("written").at("encoding"), "intN");
  EXPECT_EQ(qweights(tmp / "q").at("model.layers.0.block_sparse_moe.experts.0.w1.weight").at("group"), 16);
}

// Issue case 29.5: --tensor-type repeated and comma lists apply every rule; a rule that matches no
// tensor, only norms, or only tensors an earlier rule takes is refused naming it; the shared-expert
// gate can be quantized; any other flag given twice gets one line naming it.
TEST_F(Encodings, TensorTypeRules) {
  const std::string gate = "model.layers.1.mlp.shared_expert_gate.weight", q0 = "model.layers.1.self_attn.q_proj.weight",
                    o0 = "model.layers.1.self_attn.o_proj.weight";
  auto quant = [&](const std::string& out, std::vector<std::string> rules) {
    std::vector<std::string> a = {"quantize", qwen().string(), (tmp / out).string(), "--method", "rtn"};
    a.insert(a.end(), rules.begin(), rules.end());
    return tool(a);
  };
  RunResult r = quant("twice", {"--tensor-type", "mlp\\.shared_expert_gate\\.weight=int8", "--tensor-type", "q_proj=int4"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  json w = qweights(tmp / "twice");
  ASSERT_TRUE(w.contains(gate)) << w.dump();
  EXPECT_EQ(w[gate].at("bits"), 8);
  ASSERT_TRUE(w.contains(q0));
  EXPECT_EQ(w[q0].at("bits"), 4);
  EXPECT_FALSE(w.contains(o0));

  r = quant("commas", {"--tensor-type", "o_proj=int8,layers\\.[0-9]{1,2}\\.self_attn\\.q_proj=int2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  w = qweights(tmp / "commas");
  EXPECT_EQ(w.at(o0).at("bits"), 8);
  EXPECT_EQ(w.at(q0).at("bits"), 2);

  expect_clean_failure(quant("none", {"--tensor-type", "no_such_tensor=int8"}),
                       "--tensor-type: rule \"no_such_tensor=int8\" matches no tensor of the model");
  expect_clean_failure(quant("norm", {"--tensor-type", "input_layernorm=int8"}),
                       "--tensor-type: rule \"input_layernorm=int8\" matches only tensors quantize never encodes");
  expect_clean_failure(quant("shadow", {"--tensor-type", "self_attn=int8", "--tensor-type", "q_proj=int4"}),
                       "--tensor-type #2: rule \"q_proj=int4\" matches only tensors an earlier rule takes");
  for (const char* out : {"none", "norm", "shadow"}) EXPECT_FALSE(fs::exists(tmp / out)) << out;
  expect_clean_failure(quant("ctx", {"--ctx", "16", "--ctx", "32"}), "--ctx: given 2 times");
}

// Issue case 29.8: factorize options that change nothing are refused before any work (known from
// the shapes) or, when decided by the spectra, the summary says the output is a copy.
TEST_F(Encodings, FactorizeNoOpsAreRefusedOrSaid) {
  auto fac = [&](std::vector<std::string> extra) {
    std::vector<std::string> a = {"factorize", mixtral().string(), (tmp / "f").string(), "--method", "svd"};
    a.insert(a.end(), extra.begin(), extra.end());
    return tool(a);
  };
  expect_clean_failure(fac({"--ratio", "0.5", "--targets", "shared"}), "--targets: shared: the model has no shared experts");
  expect_clean_failure(fac({"--ratio", "0.5", "--targets", "dense"}), "--targets: dense: the model has no dense");
  expect_clean_failure(fac({"--rank", "1000"}), "--rank: 1000 saves memory on no targeted matrix");
  expect_clean_failure(fac({"--ratio", "1"}), "--ratio: 1 keeps every parameter");
  EXPECT_FALSE(fs::exists(tmp / "f"));
  RunResult r = fac({"--energy", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("warning  factorize changed no matrix"), std::string::npos) << r.out;
  fs::remove_all(tmp / "f");
  r = fac({"--ratio", "0.5"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(r.out.find("changed no matrix"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace moe::test
