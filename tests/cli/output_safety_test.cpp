// Outputs that lose nothing and every check before work, through the built moe-tool
// (docs/outputs.md): a run never deletes the files it reads (its recipe, every recipe of a batch)
// nor a folder it did not write; outputs through symbolic links; the current folder refused before
// any work; counts and sizes bounded and checked before the statistics (with the free space of the
// output's file system, which --dry-run prints); decoded NaN/Inf never written; messages in the
// user's words (flags for commands, JSON paths for recipes, no library ids).
#include <gtest/gtest.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "support/paths.h"
#include "support/ckpt_util.h"
#include "support/cli_expect.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;


void expect_user_error(const RunResult& r, std::initializer_list<std::string> parts) {
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_EQ(r.err_lines().size(), 1u) << r.describe();
  for (const auto& p : parts) EXPECT_NE(r.err.find(p), std::string::npos) << "'" << p << "' not in: " << r.err;
}

void expect_ok(const RunResult& r) { EXPECT_EQ(r.exit_code, 0) << r.describe(); }

class OutputSafetyCli : public ::testing::Test {
 protected:
  TempDir tmp{"moe-safety-cli"};
  // A one-pass recipe (prune random, no statistics) from `model` into `out`.
  json prune_recipe(const fs::path& out, bool force = false) const {
    return {{"model", kModel.string()},
            {"passes", json::array({{{"pass", "prune"}, {"method", "random"}, {"keep", 6}}})},
            {"output", {{"path", out.string()}, {"force", force}}}};
  }
};

// 29.2: a recipe inside its own output folder, with force: refused before any work; the recipe
// and the other files of the folder stay.
TEST_F(OutputSafetyCli, RunNeverDeletesItsRecipe) {
  const fs::path out = tmp / "out";
  write_file(tmp / "first.json", prune_recipe(out).dump());
  expect_ok(run_tool({"-q", "run", (tmp / "first.json").string()}));
  const fs::path recipe = out / "recipe.json";
  write_file(recipe, prune_recipe(out, true).dump());
  write_file(out / "notes.txt", "mine");
  for (const std::string dry : {"", "--dry-run"}) {
    std::vector<std::string> args = {"-q", "run", recipe.string()};
    if (!dry.empty()) args.push_back(dry);
    expect_user_error(run_tool(args), {out.string() + ": output contains the input " + recipe.string()});
  }
  // Moved out of the folder, the recipe still cannot have the unrelated file deleted.
  write_file(tmp / "r.json", prune_recipe(out, true).dump());
  fs::remove(recipe);
  expect_user_error(run_tool({"-q", "run", (tmp / "r.json").string()}),
                    {"output folder holds notes.txt, which moe-tool did not write there", "output.force would delete it"});
  EXPECT_EQ(read_file(out / "notes.txt"), "mine");
  // A command's --force: the same rule, named as the flag.
  expect_user_error(run_tool({"-q", "prune", kModel.string(), out.string(), "--method", "random", "--keep", "6", "--force"}),
                    {"notes.txt", "--force would delete it"});
  fs::remove(out / "notes.txt");
  expect_ok(run_tool({"-q", "run", (tmp / "r.json").string()}));
}

// Sibling: every recipe of a batch is an input of every run of the batch.
TEST_F(OutputSafetyCli, BatchRecipesAreInputs) {
  fs::create_directories(tmp / "b");
  write_file(tmp / "b" / "b.json", prune_recipe(tmp / "b-out").dump());
  write_file(tmp / "a.json", prune_recipe(tmp / "b", true).dump());  // a's output folder holds b's recipe
  const RunResult r = run_tool({"-q", "run", (tmp / "a.json").string(), (tmp / "b" / "b.json").string()});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_NE(r.err.find("output contains the input " + (tmp / "b" / "b.json").string()), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(tmp / "b" / "b.json"));
  EXPECT_TRUE(fs::exists(tmp / "b-out" / "model.safetensors"));  // b itself ran
}

// 29.7: an output of "." (or a folder holding the current folder) is refused before any work,
// as is a count the layers cannot take (before the statistics are collected).
TEST_F(OutputSafetyCli, ChecksBeforeWork) {
  fs::create_directories(tmp / "cwd");
  write_file(tmp / "cwd" / "keep.txt", "x");
  for (const std::string out : {".", ".."}) {
    SCOPED_TRACE(out);
    expect_user_error(run_tool({"prune", kModel.string(), out, "--method", "reap", "--keep", "6", "--text",
                                kCalib.string(), "--force"},
                               tmp / "cwd"),
                      {"the current folder"});
  }
  EXPECT_EQ(list_dir(tmp / "cwd"), std::vector<std::string>{"keep.txt"});
  // merge --experts 9 on 8 experts: refused before calibration (no progress line), naming the flag.
  const RunResult m = run_tool({"merge", kModel.string(), (tmp / "m").string(), "--method", "hcsmoe", "--experts", "9",
                                "--text", kCalib.string()});
  expect_user_error(m, {"--experts: layer 0: merge to 9 experts, but the layer has only 8"});
  EXPECT_EQ(m.err.find("calibrate"), std::string::npos) << m.err;
  EXPECT_EQ(m.err.find("passes[0]"), std::string::npos) << m.err;
  expect_user_error(run_tool({"prune", kModel.string(), (tmp / "p").string(), "--method", "reap", "--keep", "9", "--text",
                              kCalib.string(), "--dry-run"}),
                    {"--keep: layer 0: keep 9 exceeds"});
  // The recipe names the JSON path.
  json r = prune_recipe(tmp / "p");
  r["passes"][0]["keep"] = 9;
  write_file(tmp / "k.json", r.dump());
  expect_user_error(run_tool({"run", (tmp / "k.json").string()}), {"passes[0].keep: layer 0: keep 9 exceeds"});
  EXPECT_FALSE(fs::exists(tmp / "m"));
  EXPECT_FALSE(fs::exists(tmp / "p"));
}

// 29.3: counts bounded and the output's size checked against the free space, before any work;
// --dry-run prints the estimate.
TEST_F(OutputSafetyCli, SizesBoundedAndEstimated) {
  const fs::path up = tmp / "up";
  auto upcycle = [&](const std::string& experts, std::vector<std::string> extra = {}) {
    std::vector<std::string> a = {"upcycle", kLlama.string(), up.string(), "--to", "mixtral", "--experts", experts, "--top-k", "2"};
    a.insert(a.end(), extra.begin(), extra.end());
    return run_tool(a);
  };
  expect_user_error(upcycle("99999999999", {"--dry-run"}), {"--experts: expected an integer in [1, 2147483647], found 99999999999"});
  expect_user_error(upcycle("99999999999"), {"--experts: expected an integer in [1, 2147483647], found 99999999999"});
  // A million experts of llama-tiny: about 1.6 TB, beyond any test machine's free space.
  expect_user_error(upcycle("1000000", {"--dry-run"}), {"the output needs about", "TB", "free; nothing written"});
  expect_user_error(upcycle("1000000"), {"the output needs about"});
  EXPECT_FALSE(fs::exists(up));
  const RunResult dry = upcycle("8", {"--dry-run"});
  expect_ok(dry);
  EXPECT_NE(dry.out.find("the output needs about"), std::string::npos) << dry.out;
  // The estimate is the written size (tensor bytes) within the headers' few KB.
  const RunResult jd = upcycle("8", {"--dry-run", "--json"});
  expect_ok(jd);
  const uint64_t needs = json::parse(jd.out).at("disk").at("needs").get<uint64_t>();
  const RunResult real = upcycle("8", {"--json", "-q"});
  expect_ok(real);
  EXPECT_EQ(needs, json::parse(real.out).at("bytes").get<uint64_t>());
  // The recipe form names the JSON path.
  write_file(tmp / "u.json", json{{"model", kLlama.string()},
                                  {"upcycle", {{"to", "mixtral"}, {"experts", 99999999999}, {"top_k", 2}}},
                                  {"output", {{"path", (tmp / "u").string()}}}}
                                 .dump());
  expect_user_error(run_tool({"run", (tmp / "u.json").string()}), {"upcycle.experts: expected an integer in [1, 2147483647]"});
  // Pass runs print the estimate in the plan.
  const RunResult p = run_tool({"prune", kModel.string(), (tmp / "p").string(), "--method", "random", "--keep", "6", "--dry-run"});
  expect_ok(p);
  EXPECT_NE(p.out.find("disk     needs about 7.22 MB"), std::string::npos) << p.out;
}

// 29.6: a decoded weight that overflows (factors whose product is Inf) is refused by the writer
// with --materialize, naming the tensor; the stored (finite) factors still convert.
TEST_F(OutputSafetyCli, MaterializeRefusesDecodedNonFinite) {
  const fs::path in = synth_to(tmp / "in", "mixtral");
  const fs::path f = tmp / "f";
  expect_ok(run_tool({"-q", "factorize", in.string(), f.string(), "--method", "svd", "--rank", "2"}));
  const std::string w1 = "model.layers.0.block_sparse_moe.experts.0.w1.weight";
  const json cfg = read_json(f / "config.json");
  const json parts = cfg.at("quantization_config").at("weights").at(w1).at("parts");
  const fs::path shard = f / "model.safetensors";
  const std::string big("\x7f\x7f", 2);  // bf16 3.39e38: finite, but a * b overflows
  ASSERT_EQ(read_tensors(f).at(parts.at("a").get<std::string>()).dtype, core::DType::BF16);
  patch_tensor_bytes(shard, parts.at("a").get<std::string>(), 0, big);
  patch_tensor_bytes(shard, parts.at("b").get<std::string>(), 0, big);
  const RunResult r = run_tool({"-q", "convert", f.string(), (tmp / "dense").string(), "--materialize"});
  expect_user_error(r, {"output tensor " + w1 + ": non-finite value at index 0", "which the output would carry"});
  EXPECT_FALSE(fs::exists(tmp / "dense"));
  expect_ok(run_tool({"-q", "convert", f.string(), (tmp / "copy").string()}));
  // A NaN stored in a part: refused by convert as it is, too.
  patch_tensor_bytes(shard, parts.at("b").get<std::string>(), 2, std::string("\xc0\x7f", 2));
  expect_user_error(run_tool({"-q", "convert", f.string(), (tmp / "copy2").string()}),
                    {"output tensor " + parts.at("b").get<std::string>() + ": non-finite value at index 1"});
  EXPECT_FALSE(fs::exists(tmp / "copy2"));
}

// 27.1 through the CLI: an output that is a link to a folder on another disk keeps its link.
TEST_F(OutputSafetyCli, OutputThroughLink) {
  const fs::path in = synth_to(tmp / "in", "mixtral");
  fs::create_directories(tmp / "disk2" / "out");
  fs::create_directory_symlink(tmp / "disk2" / "out", tmp / "out");
  expect_ok(run_tool({"-q", "convert", in.string(), (tmp / "out").string()}));
  expect_ok(run_tool({"-q", "convert", in.string(), (tmp / "out").string(), "--force"}));
  EXPECT_TRUE(fs::is_symlink(tmp / "out"));
  EXPECT_TRUE(fs::exists(tmp / "disk2" / "out" / "model.safetensors"));
  EXPECT_EQ(first_difference(read_tensors(tmp / "out"), read_tensors(in)), "");
}

// 29.10: messages in the user's words.
TEST_F(OutputSafetyCli, MessagesInTheUsersWords) {
  // A command names its flags, not the recipe paths it builds.
  const RunResult m = run_tool({"prune", kModel.string(), (tmp / "o").string(), "--method", "nosuch", "--keep", "6"});
  expect_user_error(m, {"--method: unknown method \"nosuch\""});
  EXPECT_EQ(m.err.find("passes[0]"), std::string::npos) << m.err;
  // JSON errors: position and cause, no library id.
  write_file(tmp / "bad.json", "{\"model\": 1");
  const RunResult j = run_tool({"run", (tmp / "bad.json").string()});
  expect_user_error(j, {"bad.json: not valid JSON: parse error at line 1, column 12"});
  EXPECT_EQ(j.err.find("json.exception"), std::string::npos) << j.err;
  // Upcycle: a recipe names JSON paths, the command its flags.
  write_file(tmp / "u.json", json{{"model", kLlama.string()},
                                  {"upcycle", {{"to", "mixtral"}, {"experts", 2}, {"top_k", 3}}},
                                  {"output", {{"path", (tmp / "u").string()}}}}
                                 .dump());
  expect_user_error(run_tool({"run", (tmp / "u.json").string(), "--dry-run"}),
                    {"u.json: upcycle.top_k 3 exceeds upcycle.experts 2"});
  const RunResult c = run_tool({"upcycle", kLlama.string(), (tmp / "u").string(), "--to", "mixtral", "--experts", "2",
                                "--top-k", "3", "--dry-run"});
  expect_user_error(c, {"--top-k 3 exceeds --experts 2"});
  EXPECT_EQ(c.err.find("upcycle."), std::string::npos) << c.err;
  write_file(tmp / "s.json", json{{"model", kLlama.string()},
                                  {"upcycle", {{"to", "mixtral"}, {"experts", 2}, {"top_k", 1}, {"shared_expert", true}}},
                                  {"output", {{"path", (tmp / "u").string()}}}}
                                 .dump());
  expect_user_error(run_tool({"run", (tmp / "s.json").string(), "--dry-run"}),
                    {"upcycle.shared_expert: only qwen2_moe has a gated shared expert"});
  // A checkpoint quantized by another tool: the quantization is named, not a "missing" weight.
  const fs::path g = synth_to(tmp / "bnb", "mixtral");
  json cfg = read_json(g / "config.json");
  cfg["quantization_config"] = {{"quant_method", "bitsandbytes"}, {"load_in_4bit", true}};
  write_file(g / "config.json", cfg.dump());
  for (const std::string cmd : {"inspect", "convert"}) {
    std::vector<std::string> args = {cmd, g.string()};
    if (cmd == "convert") args.push_back((tmp / "g-out").string());
    const RunResult q = run_tool(args);
    expect_user_error(q, {"quantization_config.quant_method \"bitsandbytes\": weights quantized by another tool are not read"});
    EXPECT_EQ(q.err.find("not found"), std::string::npos) << q.err;
  }
}

}  // namespace
}  // namespace moe::test
