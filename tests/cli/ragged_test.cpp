// prune --keep-ratio R --no-uniform: ragged per-layer expert counts written in the native format
// (docs/FORMAT.md "Ragged per-layer expert counts"), read back by the loader and the forward, and
// refused for stock outputs.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <tuple>

#include "io/checkpoint.h"
#include "io/env.h"
#include "model/model.h"
#include "passes/experts.h"
#include "runtime/forward.h"
#include "support/paths.h"
#include "support/cli_expect.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;


std::vector<std::string> ragged_args(const fs::path& out) {
  return {"-q", "prune", kModel.string(), out.string(), "--method", "reap", "--keep-ratio", "0.6", "--no-uniform",
          "--text", kCalib.string(), "--ctx", "32", "--windows", "4"};
}

const fs::path& ragged_model() {
  static TempDir* dir = new TempDir("moe-ragged");
  static const fs::path out = [] {
    const fs::path p = dir->path() / "ragged";
    const RunResult r = run_tool(ragged_args(p));
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return p;
  }();
  return out;
}

runtime::MatrixRM ragged_logits(const model::Model& m) {
  std::vector<int32_t> tokens(64);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 53 + 7) % 4000);
  return runtime::Forward(m).run(tokens, 32);
}

TEST(RaggedCounts, WrittenNativeAndEqualToThePrunedModelInMemory) {
  const fs::path& out = ragged_model();
  const json rep = read_json(out / "moe_tool_report.json");
  std::vector<std::vector<int>> kept;
  std::vector<int64_t> counts;
  for (const auto& l : rep.at("layers")) {
    kept.push_back(l.at("passes").at(0).at("kept").get<std::vector<int>>());
    counts.push_back(static_cast<int64_t>(kept.back().size()));
  }
  ASSERT_EQ(counts.size(), 4u);
  ASSERT_NE(*std::min_element(counts.begin(), counts.end()), *std::max_element(counts.begin(), counts.end()))
      << "the plan is uniform on this fixture: the test needs ragged counts";
  const json cfg = read_json(out / "config.json");
  const json& q = cfg.at("quantization_config");
  EXPECT_EQ(q.at("quant_method"), "moe_tool");
  EXPECT_EQ(q.at("experts_per_layer"), json(counts));
  EXPECT_EQ(q.at("keep_map"), json(kept));
  EXPECT_EQ(cfg.at("num_local_experts"), *std::max_element(counts.begin(), counts.end()));

  // The pruned model in memory: the input's kept experts and router rows, nothing else changed.
  auto ck_in = io::Checkpoint::open(io::Env::posix(), kModel);
  model::Model ref = model::Model::load(ck_in);
  for (size_t l = 0; l < kept.size(); ++l) passes::keep_experts(*ref.layers()[l].moe, kept[l]);
  auto ck_out = io::Checkpoint::open(io::Env::posix(), out);
  const model::Model written = model::Model::load(ck_out);
  for (size_t l = 0; l < kept.size(); ++l) EXPECT_EQ(written.layers()[l].moe->num_experts(), counts[l]);
  EXPECT_EQ(ragged_logits(written), ragged_logits(ref));

  const RunResult in = run_tool({"-q", "inspect", out.string(), "--json"});
  ASSERT_EQ(in.exit_code, 0) << in.describe();
  EXPECT_EQ(json::parse(in.out).at("experts_per_layer"), json(counts));
  const RunResult ev = run_tool({"-q", "eval", out.string(), "--text", (kSrc / "data/text/heldout.txt").string(),
                                 "--ctx", "64", "--max-windows", "2"});
  EXPECT_EQ(ev.exit_code, 0) << ev.describe();
}

TEST(RaggedCounts, StockOutputsRefuse) {
  TempDir tmp;
  expect_clean_failure(run_tool({"-q", "convert", ragged_model().string(), (tmp / "m").string(), "--materialize"}),
                       "stock loaders need the same expert count in every MoE layer");
  EXPECT_FALSE(fs::exists(tmp / "m"));
  // A recipe asking for a stock output: refused before any work.
  const fs::path recipe = tmp / "r.json";
  write_file(recipe, json{{"model", kModel.string()},
                          {"output", {{"path", (tmp / "r").string()}, {"materialize", true}}},
                          {"calibration", {{"text", kCalib.string()}, {"ctx", 32}, {"windows", 4}}},
                          {"passes", {{{"pass", "prune"}, {"method", "reap"}, {"keep_ratio", 0.6}, {"uniform", false}}}}}
                         .dump());
  expect_clean_failure(run_tool({"-q", "run", recipe.string()}), "stock loaders need the same expert count");
  EXPECT_FALSE(fs::exists(tmp / "r"));
}

TEST(RaggedCounts, TheLoaderChecksTheCountList) {
  TempDir tmp;
  // Copy the ragged checkpoint with a broken experts_per_layer.
  for (const auto& [edit, needle] : std::vector<std::pair<json, std::string>>{
           {json::array({6, 6}), "quantization_config.experts_per_layer: expected a list of 4 integers"},
           {json::array({1, 6, 6, 6}), "quantization_config.experts_per_layer[0]: expected an integer in [2, "}}) {
    const fs::path d = tmp / ("bad" + std::to_string(edit.size()));
    fs::create_directories(d);
    for (const auto& f : fs::directory_iterator(ragged_model())) fs::copy(f.path(), d / f.path().filename());
    json cfg = read_json(d / "config.json");
    cfg["quantization_config"]["experts_per_layer"] = edit;
    write_file(d / "config.json", cfg.dump());
    expect_clean_failure(run_tool({"-q", "inspect", d.string()}), needle);
  }
}

// keep_map and input_experts_per_layer are checked at load (docs/FORMAT.md): one line naming
// config.json and the JSON path, exit 2.
TEST(RaggedCounts, TheLoaderChecksTheKeepMap) {
  TempDir tmp;
  const json cfg0 = read_json(ragged_model() / "config.json");
  ASSERT_EQ(cfg0.at("quantization_config").at("input_experts_per_layer"), json({8, 8, 8, 8}));
  const json row0 = cfg0.at("quantization_config").at("keep_map")[0];  // valid ids of layer 0
  ASSERT_GE(row0.size(), 3u);
  auto with_first = [&](std::vector<json> first) {  // layer 0's row with its first entries replaced
    json r = row0;
    for (size_t i = 0; i < first.size(); ++i) r[i] = first[i];
    return r;
  };
  json shorter = row0;
  shorter.erase(shorter.size() - 1);
  const std::vector<std::tuple<std::string, json, std::string>> cases = {
      {"row", with_first({99}), "config.json: quantization_config.keep_map[0][0]: expected an input expert id in [0, 8)"},
      {"row", with_first({-1}), "config.json: quantization_config.keep_map[0][0]: expected an input expert id in [0, 8)"},
      {"row", shorter, "quantization_config.keep_map[0]: expected null or a list of " + std::to_string(row0.size())},
      {"row", with_first({json::array({4})}), "quantization_config.keep_map[0][0][0]: expected a member [id, weight]"},
      {"row", with_first({row0[1]}), "quantization_config.keep_map[0][1]: input expert " + row0[1].dump() + " appears twice"},
      {"keep_map", json::array({row0, row0, row0}), "quantization_config.keep_map: expected a list of 4 entries"},
      {"input_experts_per_layer", json::array({1, 8, 8, 8}), "quantization_config.input_experts_per_layer[0]: expected"}};
  int n = 0;
  for (const auto& [key, edit, needle] : cases) {
    const fs::path d = tmp / ("bad" + std::to_string(n++));
    fs::create_directories(d);
    for (const auto& f : fs::directory_iterator(ragged_model())) fs::copy(f.path(), d / f.path().filename());
    json cfg = cfg0;
    if (key == "row") cfg["quantization_config"]["keep_map"][0] = edit;
    else cfg["quantization_config"][key] = edit;
    write_file(d / "config.json", cfg.dump());
    expect_clean_failure(run_tool({"-q", "inspect", d.string()}), needle);
  }
  // Null (not recorded) for an MoE layer and a merged expert's members are accepted.
  json cfg = cfg0;
  cfg["quantization_config"]["keep_map"][1] = nullptr;
  cfg["quantization_config"]["keep_map"][0][0] = json::array({json::array({row0[0], 0.5}), json::array({row0[1], 0.5})});
  const fs::path ok = tmp / "ok";
  fs::create_directories(ok);
  for (const auto& f : fs::directory_iterator(ragged_model())) fs::copy(f.path(), ok / f.path().filename());
  write_file(ok / "config.json", cfg.dump());
  const RunResult r = run_tool({"-q", "inspect", ok.string()});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
}

}  // namespace
}  // namespace moe::test
