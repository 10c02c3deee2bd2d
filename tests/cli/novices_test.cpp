// prune --novices (MoNE, passes/novices.h) end to end: the native checkpoint it writes, its round
// trip through the loader and the forward, the refusals of stock outputs and of later passes, and
// the loader's checks of a novice entry (docs/FORMAT.md "novice").
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>

#include "calib/stats.h"
#include "io/checkpoint.h"
#include "io/env.h"
#include "model/model.h"
#include "runtime/forward.h"
#include "support/paths.h"
#include "support/cli_expect.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;


RunResult prune_novices(const fs::path& model, const fs::path& out, const std::vector<std::string>& more = {}) {
  std::vector<std::string> a = {"-q", "prune", model.string(), out.string(), "--method", "frequency", "--keep", "6",
                                "--novices", "--text", kCalib.string(), "--ctx", "32", "--windows", "4"};
  a.insert(a.end(), more.begin(), more.end());
  return run_tool(a);
}

// The novice checkpoint of mixtral-tiny, written once for the tests of this file.
const fs::path& novice_model() {
  static TempDir* dir = new TempDir("moe-novices");
  static const fs::path out = [] {
    const fs::path p = dir->path() / "novices";
    const RunResult r = prune_novices(kModel, p);
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return p;
  }();
  return out;
}

runtime::MatrixRM novice_logits(const model::Model& m) {
  std::vector<int32_t> tokens(64);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 37 + 11) % 4000);
  return runtime::Forward(m).run(tokens, 32);
}

TEST(PruneNovices, WritesTheNativeFormatWithEveryRouterRow) {
  const fs::path& out = novice_model();
  const json cfg = read_json(out / "config.json");
  EXPECT_EQ(cfg.at("num_local_experts"), 8);  // every expert slot stays
  const json& q = cfg.at("quantization_config");
  EXPECT_EQ(q.at("quant_method"), "moe_tool");
  const json rep = read_json(out / "moe_tool_report.json");
  ASSERT_EQ(rep.at("layers").size(), 4u);
  auto ck = io::Checkpoint::open(io::Env::posix(), out);
  for (const auto& l : rep.at("layers")) {
    const json& p = l.at("passes").at(0);
    const int layer = l.at("layer").get<int>();
    ASSERT_EQ(p.at("novices").size(), 2u) << p.dump();
    EXPECT_EQ(p.at("experts").size(), 6u);
    EXPECT_FALSE(p.contains("kept"));
    const std::string pre = "model.layers." + std::to_string(layer) + ".block_sparse_moe.";
    EXPECT_EQ(ck.info(pre + "gate.weight").shape, (core::Shape{8, 128}));
    for (int e : p.at("novices").get<std::vector<int>>()) {
      const std::string down = pre + "experts." + std::to_string(e) + ".w2.weight";
      EXPECT_EQ(q.at("weights").at(down), (json{{"encoding", "novice"}, {"parts", {{"value", down + ".novice"}}}}));
      EXPECT_EQ(ck.info(down + ".novice").shape, (core::Shape{128}));
      EXPECT_EQ(ck.info(down + ".novice").dtype, core::DType::F32);
      EXPECT_FALSE(ck.has(down));
      EXPECT_FALSE(ck.has(pre + "experts." + std::to_string(e) + ".w1.weight"));
    }
  }
}

TEST(PruneNovices, LogitsEqualTheInputModelWithTheNovicesSubstituted) {
  const fs::path& out = novice_model();
  auto ck_out = io::Checkpoint::open(io::Env::posix(), out);
  const model::Model written = model::Model::load(ck_out);
  EXPECT_EQ(written.num_novices(), 8);
  // Reference: the input model, its pruned experts (from the report) replaced by the constants
  // the output stores; everything else is the input's own weights.
  auto ck_in = io::Checkpoint::open(io::Env::posix(), kModel);
  model::Model ref = model::Model::load(ck_in);
  const json rep = read_json(out / "moe_tool_report.json");
  for (const auto& l : rep.at("layers")) {
    const int layer = l.at("layer").get<int>();
    for (int e : l.at("passes").at(0).at("novices").get<std::vector<int>>()) {
      model::Mlp n;
      n.novice = ck_out.tensor("model.layers." + std::to_string(layer) + ".block_sparse_moe.experts." +
                               std::to_string(e) + ".w2.weight.novice");
      ref.layers().at(static_cast<size_t>(layer)).moe->experts.at(static_cast<size_t>(e)) = n;
    }
  }
  const runtime::MatrixRM a = novice_logits(written), b = novice_logits(ref);
  ASSERT_EQ(a.rows(), b.rows());
  EXPECT_EQ(a, b);
  // And the novices change the output (the constants are not the experts).
  auto ck_orig = io::Checkpoint::open(io::Env::posix(), kModel);
  EXPECT_NE(novice_logits(model::Model::load(ck_orig)), a);
}

TEST(PruneNovices, ConvertCopiesThemAndEvalIsUnchanged) {
  TempDir tmp;
  const fs::path& out = novice_model();
  const RunResult c = run_tool({"-q", "convert", out.string(), (tmp.path() / "copy").string()});
  ASSERT_EQ(c.exit_code, 0) << c.describe();
  const std::vector<std::string> ev = {"--text", (kSrc / "data/text/heldout.txt").string(), "--ctx", "64",
                                       "--max-windows", "4", "--json"};
  std::vector<std::string> a1 = {"-q", "eval", out.string()}, a2 = {"-q", "eval", (tmp.path() / "copy").string()};
  a1.insert(a1.end(), ev.begin(), ev.end());
  a2.insert(a2.end(), ev.begin(), ev.end());
  const RunResult e1 = run_tool(a1), e2 = run_tool(a2);
  ASSERT_EQ(e1.exit_code, 0) << e1.describe();
  ASSERT_EQ(e2.exit_code, 0) << e2.describe();
  EXPECT_EQ(json::parse(e1.out).at("perplexity"), json::parse(e2.out).at("perplexity"));
  const RunResult in = run_tool({"-q", "inspect", out.string(), "--json"});
  ASSERT_EQ(in.exit_code, 0) << in.describe();
  const json s = json::parse(in.out);
  EXPECT_EQ(s.at("novices").at("count"), 8);
  EXPECT_EQ(s.at("novices").at("per_layer"), json({2, 2, 2, 2}));
  EXPECT_EQ(s.at("novices").at("params"), 8 * 128);
  EXPECT_EQ(s.at("novices").at("bytes"), 8 * 128 * 4);
}

// The run's parameter counts are those of the written folder: a novice counts H (what it stores),
// active counts top_k real experts per layer.
TEST(PruneNovices, ReportParamsEqualInspect) {
  const fs::path& out = novice_model();
  const json rep = read_json(out / "moe_tool_report.json");
  const RunResult in = run_tool({"-q", "inspect", out.string(), "--json"});
  ASSERT_EQ(in.exit_code, 0) << in.describe();
  const json s = json::parse(in.out);
  EXPECT_EQ(rep.at("params").at("after"), s.at("params_total"));
  EXPECT_EQ(rep.at("params").at("active_after"), s.at("params_active_per_token"));
  EXPECT_LT(rep.at("params").at("after").get<int64_t>(), rep.at("params").at("before").get<int64_t>());
  // A dry run cannot know them: it says so rather than printing the input's counts.
  TempDir tmp;
  const RunResult d = prune_novices(kModel, tmp.path() / "dry", {"--dry-run"});
  ASSERT_EQ(d.exit_code, 0) << d.describe();
  EXPECT_NE(d.out.find("decided while the pass runs"), std::string::npos) << d.out;
  EXPECT_EQ(d.out.find("8->8"), std::string::npos) << d.out;
}

TEST(PruneNovices, CalibrateSeesTheConstant) {
  // Every token through every expert (out_stride 1): a novice's mean output is its constant.
  TempDir tmp;
  const fs::path& out = novice_model();
  const fs::path stats = tmp / "stats.safetensors";
  const RunResult r = run_tool({"-q", "calibrate", out.string(), "--text", kCalib.string(), "--ctx", "32", "--windows",
                                "2", "--out-stride", "1", "-o", stats.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const calib::Stats st = calib::Stats::load(stats);
  auto ck = io::Checkpoint::open(io::Env::posix(), out);
  const json rep = read_json(out / "moe_tool_report.json");
  int checked = 0;
  for (const auto& l : rep.at("layers")) {
    const int layer = l.at("layer").get<int>();
    const calib::LayerStats& ls = st.layer(layer, "out_mean");
    for (int e : l.at("passes").at(0).at("novices").get<std::vector<int>>()) {
      const std::vector<float> n = ck.tensor("model.layers." + std::to_string(layer) + ".block_sparse_moe.experts." +
                                             std::to_string(e) + ".w2.weight.novice")
                                       .to_f32();
      for (size_t i = 0; i < n.size(); ++i) EXPECT_NEAR(ls.out_mean(e, static_cast<int64_t>(i)), n[i], 1e-5 + 1e-5 * std::abs(n[i]));
      ++checked;
    }
  }
  EXPECT_EQ(checked, 8);
}

TEST(PruneNovices, StockOutputsAndLaterPassesRefuse) {
  TempDir tmp;
  const fs::path& out = novice_model();
  expect_clean_failure(run_tool({"-q", "convert", out.string(), (tmp.path() / "m").string(), "--materialize"}),
                       "stock loaders cannot express a constant expert");
  EXPECT_FALSE(fs::exists(tmp.path() / "m"));
  expect_clean_failure(run_tool({"-q", "prune", out.string(), (tmp.path() / "p").string(), "--method", "random",
                                 "--keep", "4"}),
                       "no pass reads novices");
  EXPECT_FALSE(fs::exists(tmp.path() / "p"));
  // A recipe whose output is stock, and a pass after the novices: refused before any work.
  const fs::path recipe = tmp.path() / "r.json";
  write_file(recipe, json{{"model", kModel.string()},
                          {"output", {{"path", (tmp.path() / "r").string()}, {"materialize", true}}},
                          {"calibration", {{"text", kCalib.string()}, {"ctx", 32}, {"windows", 4}}},
                          {"passes", {{{"pass", "prune"}, {"method", "frequency"}, {"keep", 6}, {"novices", true}}}}}
                         .dump());
  expect_clean_failure(run_tool({"-q", "run", recipe.string()}), "stock loaders cannot express a constant expert");
  EXPECT_FALSE(fs::exists(tmp.path() / "r"));
  write_file(recipe, json{{"model", kModel.string()},
                          {"output", {{"path", (tmp.path() / "r").string()}}},
                          {"calibration", {{"text", kCalib.string()}, {"ctx", 32}, {"windows", 4}}},
                          {"passes", {{{"pass", "prune"}, {"method", "frequency"}, {"keep", 6}, {"novices", true}},
                                      {{"pass", "prune"}, {"method", "frequency"}, {"keep", 4}}}}}
                         .dump());
  expect_clean_failure(run_tool({"-q", "run", recipe.string()}), "make it the last pass");
  EXPECT_FALSE(fs::exists(tmp.path() / "r"));
}

// A synthetic mixtral checkpoint whose layer 0 expert 1 is a novice with `value`.
fs::path synth_novice(const fs::path& dir, const std::vector<float>& value, const core::Shape& shape,
                      const std::string& part_name = "") {
  const std::string pre = "model.layers.0.block_sparse_moe.experts.1.";
  SynthSpec spec;
  spec.drop = {pre + "w1.weight", pre + "w2.weight", pre + "w3.weight"};
  SynthTensor t{pre + "w2.weight.novice", core::DType::F32, shape, {}};
  t.data.resize(value.size() * 4);
  std::memcpy(t.data.data(), value.data(), t.data.size());
  spec.extra = {t};
  spec.config_edit = {{"quantization_config",
                       {{"quant_method", "moe_tool"},
                        {"format_version", 1},
                        {"weights",
                         {{pre + "w2.weight",
                           {{"encoding", "novice"},
                            {"parts", {{"value", part_name.empty() ? pre + "w2.weight.novice" : part_name}}}}}}}}}};
  // Hand-rolled: the tool's own writer refuses the NaN fixture below (io::CheckpointWriter).
  return synth_to(dir, "mixtral", spec, {.writer = Writer::HandRolled});
}

TEST(PruneNovices, TheLoaderChecksTheNoviceEntry) {
  TempDir tmp;
  const std::vector<float> ok(32, 0.125f);
  const RunResult good = run_tool({"-q", "inspect", synth_novice(tmp / "ok", ok, {32}).string(), "--json"});
  ASSERT_EQ(good.exit_code, 0) << good.describe();
  EXPECT_EQ(json::parse(good.out).at("novices").at("count"), 1);
  expect_clean_failure(run_tool({"-q", "inspect", synth_novice(tmp / "shape", std::vector<float>(16, 0.f), {16}).string()}),
                       "experts.1.w2.weight.novice: novice value must be a float tensor of shape [32]");
  std::vector<float> nan = ok;
  nan[5] = std::numeric_limits<float>::quiet_NaN();
  expect_clean_failure(run_tool({"-q", "inspect", synth_novice(tmp / "nan", nan, {32}).string()}),
                       "experts.1.w2.weight.novice: novice value has a non-finite element at index 5");
  expect_clean_failure(run_tool({"-q", "inspect", synth_novice(tmp / "missing", ok, {32}, "no.such.tensor").string()}),
                       "tensor no.such.tensor: missing (part \"value\" of novice");
}

}  // namespace
}  // namespace moe::test
