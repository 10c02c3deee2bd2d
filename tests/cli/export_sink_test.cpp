// The recipe output formats (pipeline/sink.h): a recipe that prunes, quantizes and writes GGUF,
// compressed-tensors or GPTQ writes the same bytes as `export` of the same recipe's native output
// (the sink stages the native output beside its own and converts it), leaves no staging behind,
// and refuses an encoding the format cannot hold before any work (exit 2, one line naming the JSON
// path or flag and the way out, nothing written). Small synthetic mixtral (hidden 32, 4 experts
// of width 32, vocabulary of the fixtures' byte-level tokenizer).
#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "io/env.h"
#include "io/gguf.h"
#include "support/cli_expect.h"
#include "support/paths.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// The synthetic model with the fixtures' tokenizer (GGUF's tokenizer metadata needs one).
fs::path synth_model(const TempDir& dir) {
  const fs::path d = dir / "model";
  write_synth(make_synth("mixtral", {.config_patch = {{"vocab_size", 4096}, {"intermediate_size", 32}}}), d);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    fs::copy_file(kSrc / "data/models/mixtral-tiny" / f, d / f);
  return d;
}

// prune (frequency, 4 -> 3 experts) then quantize (RTN int4, symmetric groups of 32).
json recipe(const fs::path& model, const json& output) {
  return {{"model", model.string()},
          {"calibration", {{"text", (kSrc / "data/text/calib.txt").string()}, {"ctx", 32}, {"windows", 4}}},
          {"passes", json::array({{{"pass", "prune"}, {"method", "frequency"}, {"keep", 3}},
                                  {{"pass", "quantize"}, {"method", "rtn"}, {"codec", "int4:g32:sym"}}})},
          {"output", output}};
}

RunResult run_recipe(const TempDir& dir, const std::string& name, const json& r, const std::vector<std::string>& extra = {}) {
  const fs::path file = dir / (name + ".json");
  write_file(file, r.dump(2));
  std::vector<std::string> args = {"-q", "run", file.string()};
  args.insert(args.end(), extra.begin(), extra.end());
  return run_tool(args);
}

std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> v;
  for (const auto& e : fs::directory_iterator(dir)) v.push_back(e.path().filename().string());
  std::sort(v.begin(), v.end());
  return v;
}

// The recipe's GGUF equals, byte for byte, `export` of the recipe's native output (the general.name
// is the output's name without .gguf, here the native folder's name); int4 groups of 32 are q4_0
// blocks; the staged native output is gone.
TEST(RecipeSink, GgufEqualsExportOfTheNativeOutput) {
  TempDir dir{"moe-sink"};
  const fs::path model = synth_model(dir);
  const fs::path native = dir / "a" / "m", exported = dir / "a" / "m.gguf", direct = dir / "b" / "m.gguf";
  ASSERT_EQ(run_recipe(dir, "hf", recipe(model, {{"path", native.string()}})).exit_code, 0);
  ASSERT_EQ(run_tool({"-q", "export", native.string(), exported.string(), "--type", "q8_0"}).exit_code, 0);
  const RunResult r = run_recipe(dir, "gguf", recipe(model, {{"path", direct.string()}, {"format", "gguf"}, {"type", "q8_0"}}),
                                 {"--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(read_file(direct), read_file(exported));
  EXPECT_EQ(entries(direct.parent_path()), std::vector<std::string>{"m.gguf"});  // no staging left
  const auto f = io::GgufFile::open(io::Env::posix(), direct);
  EXPECT_EQ(f.find_tensor("blk.0.ffn_up_exps.weight")->type, quant::GgmlType::Q4_0);
  EXPECT_EQ(f.find_tensor("blk.0.ffn_up_exps.weight")->ne.back(), 3);  // pruned to 3 experts
  EXPECT_EQ(f.find_tensor("blk.0.attn_q.weight")->type, quant::GgmlType::Q8_0);
  // The summary's output section: the GGUF's accounting, not the staged folder's.
  const json s = json::parse(r.out);
  EXPECT_EQ(s.at("output_format").at("format"), "gguf");
  EXPECT_EQ(s.at("output_format").at("tensors").get<size_t>(), f.tensors().size());
  EXPECT_EQ(s.at("output_format").at("file_bytes").get<uint64_t>(), fs::file_size(direct));
  EXPECT_TRUE(s.at("report").is_null());
}

// The same for the packed folders: tensors and config.json equal those of `export`.
class RecipePackedSink : public ::testing::TestWithParam<std::string> {};

TEST_P(RecipePackedSink, EqualsExportOfTheNativeOutput) {
  const std::string format = GetParam();
  TempDir dir{"moe-sink"};
  const fs::path model = synth_model(dir);
  const fs::path native = dir / "a" / "m", exported = dir / "a" / "x", direct = dir / "b" / "x";
  ASSERT_EQ(run_recipe(dir, "hf", recipe(model, {{"path", native.string()}})).exit_code, 0);
  ASSERT_EQ(run_tool({"-q", "export", native.string(), exported.string(), "--format", format}).exit_code, 0);
  const RunResult r = run_recipe(dir, "packed", recipe(model, {{"path", direct.string()}, {"format", format}}));
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  for (const char* f : {"model.safetensors", "config.json", "tokenizer.json"})
    EXPECT_EQ(read_file(direct / f), read_file(exported / f)) << f;
  EXPECT_EQ(read_json(direct / "config.json").at("quantization_config").at("quant_method"),
            format == "gptq" ? "gptq" : "compressed-tensors");
  // The report is in the folder, its output section the packed one.
  const json rep = read_json(direct / "moe_tool_report.json");
  EXPECT_EQ(rep.at("output").at("format"), format);
  EXPECT_EQ(rep.at("output").at("bits"), 4);
  EXPECT_EQ(rep.at("bytes").at("after").get<uint64_t>(), rep.at("output").at("tensor_bytes").get<uint64_t>());
  EXPECT_EQ(entries(direct.parent_path()), std::vector<std::string>{"x"});  // no staging left
}

INSTANTIATE_TEST_SUITE_P(Formats, RecipePackedSink, ::testing::Values("compressed-tensors", "gptq"));

// Ternary experts cannot be held by compressed-tensors: refused by the checks (a dry run, which
// computes nothing, refuses it too), one line naming the format key and the codec key, nothing written.
TEST(RecipeSink, TernaryToCompressedTensorsIsRefusedBeforeAnyWork) {
  TempDir dir{"moe-sink"};
  const fs::path model = synth_model(dir);
  const fs::path out = dir / "out" / "ct";
  json r = recipe(model, {{"path", out.string()}, {"format", "compressed-tensors"}});
  r["passes"][1]["codec"] = "ternary";
  for (const std::vector<std::string>& extra : {std::vector<std::string>{}, {"--dry-run"}}) {
    const RunResult res = run_recipe(dir, "ternary", r, extra);
    expect_clean_failure(res, "output.format compressed-tensors: passes[1].codec writes experts as ternary");
    EXPECT_NE(res.err.find("or write output.format hf"), std::string::npos) << res.err;
    EXPECT_FALSE(fs::exists(out.parent_path()));
  }
  // The one-pass commands name their flags.
  const RunResult q = run_tool({"-q", "quantize", model.string(), out.string(), "--method", "rtn", "--codec", "ternary",
                                "--format", "gguf", "--gguf-type", "q8_0"});
  expect_clean_failure(q, "--format gguf: --codec writes experts as ternary");
  EXPECT_NE(q.err.find("let --gguf-type round it"), std::string::npos) << q.err;
  EXPECT_FALSE(fs::exists(out.parent_path()));
}

// GGUF copies only symmetric groups of 32; other groups, and rows that are not whole blocks,
// are refused in the checks; the GGUF-only keys are refused for other formats.
TEST(RecipeSink, GgufRefusalsNameTheKey) {
  TempDir dir{"moe-sink"};
  const fs::path model = synth_model(dir);
  const fs::path out = dir / "out" / "m.gguf";
  json r = recipe(model, {{"path", out.string()}, {"format", "gguf"}, {"type", "q8_0"}});
  r["passes"][1]["codec"] = "int4:g16:sym";
  expect_clean_failure(run_recipe(dir, "g16", r), "passes[1].codec writes experts as int4:g16:sym, which has no GGUF block type");
  r["passes"][1]["codec"] = "int4:g32:sym";
  r["passes"][1]["tensor_type"] = json::array({"w2=int8:g32:sym"});  // down: [32, 32] rows of 32, fine
  r["passes"][1]["attention"] = "int4:g32:sym";
  r["output"].erase("type");
  expect_clean_failure(run_recipe(dir, "notype", r), "output.type: required for output.format gguf");
  r["output"] = {{"path", (dir / "out" / "m").string()}, {"type", "q8_0"}};
  expect_clean_failure(run_recipe(dir, "hftype", r), "output.type: GGUF only");
  EXPECT_FALSE(fs::exists(out.parent_path()));
}

}  // namespace
}  // namespace moe::test
