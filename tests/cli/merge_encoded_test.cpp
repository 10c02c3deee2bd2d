// `merge` on encoded checkpoints read from disk (factorized, int4 codes, sub-1-bit ternary-dict)
// through the CLI on the trained mixtral-tiny fixture: the members are dequantized and the merged
// experts written dense (experts left alone keep their encoding), in the model's materialize dtype (config dtype, else bf16) unless
// --dtype says otherwise; the merged model loads and evaluates close to the input.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
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


// The encoded inputs, written once for this file.
TempDir& inputs() {
  static TempDir tmp{"moe-merge-encoded"};
  return tmp;
}

fs::path encoded(const std::string& name, const std::vector<std::string>& args) {
  const fs::path o = inputs() / name;
  if (fs::exists(o / "config.json")) return o;
  std::vector<std::string> all = {"-q"};
  all.insert(all.end(), args.begin(), args.end());
  all.insert(all.begin() + 3, o.string());  // -q <command> <model> <output> ...
  const RunResult r = run_tool(all);
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  return o;
}

const fs::path& factorized() {
  static const fs::path p =
      encoded("svd", {"factorize", kModel.string(), "--method", "svd", "--ratio", "0.5"});
  return p;
}
const fs::path& int4() {
  static const fs::path p =
      encoded("int4", {"quantize", kModel.string(), "--method", "rtn", "--codec", "int4"});
  return p;
}
const fs::path& sub1bit() {
  static const fs::path p = encoded("s1", {"quantize", kModel.string(), "--method", "rtn", "--codec", "ternary", "--sub1bit"});
  return p;
}

RunResult merge(const fs::path& in, const fs::path& out, const std::string& method,
                const std::vector<std::string>& extra = {}) {
  std::vector<std::string> args = {"-q",      "merge",  in.string(), out.string(), "--method", method, "--experts", "6",
                                   "--text",  kCalib,   "--ctx",     "32",         "--windows", "4"};
  args.insert(args.end(), extra.begin(), extra.end());
  return run_tool(args);
}

// The merged checkpoint: 6 experts per layer, every merged expert weight dense in `dtype` (an
// expert the merge left alone, a group of one, keeps its encoding: docs/encodings.md; with
// `all_dense`, a stock output, none does), loads and evaluates close to the input model.
void expect_merged_dense(const fs::path& out, core::DType dtype, bool all_dense = false) {
  const json config = read_json(out / "config.json");
  EXPECT_EQ(config.at("num_local_experts"), 6);
  const json kept = config.contains("quantization_config") ? config["quantization_config"].value("weights", json::object())
                                                           : json::object();
  const auto ck = io::Checkpoint::open(io::Env::posix(), out);
  int dense = 0;
  for (int l = 0; l < 4; ++l)
    for (int e = 0; e < 6; ++e)
      for (const char* w : {"w1", "w2", "w3"}) {
        const std::string name =
            "model.layers." + std::to_string(l) + ".block_sparse_moe.experts." + std::to_string(e) + "." + w + ".weight";
        if (!all_dense && kept.contains(name)) continue;  // left alone: still encoded
        ++dense;
        ASSERT_TRUE(ck.has(name)) << name;
        EXPECT_EQ(ck.info(name).dtype, dtype) << name;
        EXPECT_EQ(ck.info(name).shape, (std::string(w) == "w2" ? core::Shape{128, 256} : core::Shape{256, 128})) << name;
      }
  EXPECT_GT(dense, 0);
  EXPECT_FALSE(ck.has("model.layers.0.block_sparse_moe.experts.6.w1.weight"));
  const model::Model m = model::Model::load(ck);
  for (const auto& layer : m.layers()) {
    ASSERT_TRUE(layer.moe);
    EXPECT_EQ(layer.moe->num_experts(), 6);
  }
  const RunResult ev = run_tool({"-q", "eval", out.string(), "--text", kHeldout, "--ctx", "32", "--max-windows", "4",
                                 "--against", kModel.string(), "--json"});
  ASSERT_EQ(ev.exit_code, 0) << ev.describe();
  const double kl = json::parse(ev.out).at("kl_mean").get<double>();
  EXPECT_TRUE(std::isfinite(kl));
  EXPECT_GT(kl, 0.0);
  EXPECT_LT(kl, 2.0);
}

TEST(MergeEncoded, FactorizedCheckpointFromDiskMergesDense) {
  TempDir tmp;
  // Under the sanitizers two of the four methods (msmoe runs below, with --materialize): the
  // others read the same encoded members through the same code.
  const std::vector<std::string> methods =
      under_sanitizers() ? std::vector<std::string>{"hcsmoe", "submoe"} : std::vector<std::string>{"msmoe", "hcsmoe", "dern", "submoe"};
  for (const std::string& method : methods) {
    SCOPED_TRACE(method);
    const RunResult r = merge(factorized(), tmp / method, method);
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    expect_merged_dense(tmp / method, core::DType::BF16);
  }
  // A stock output too (it was planned from the input's encodings).
  const RunResult m = merge(factorized(), tmp / "stock", "msmoe", {"--materialize"});
  ASSERT_EQ(m.exit_code, 0) << m.describe();
  EXPECT_FALSE(read_json(tmp / "stock" / "config.json").contains("quantization_config"));
  expect_merged_dense(tmp / "stock", core::DType::BF16, /*all_dense=*/true);
}

TEST(MergeEncoded, Int4CheckpointFromDiskMergesDense) {
  TempDir tmp;
  const RunResult r = merge(int4(), tmp / "m", "msmoe");
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  expect_merged_dense(tmp / "m", core::DType::BF16);
  // prune keeps the kept experts' codes.
  const RunResult p = run_tool({"-q", "prune", int4().string(), (tmp / "p").string(), "--method", "random", "--keep", "6"});
  ASSERT_EQ(p.exit_code, 0) << p.describe();
  EXPECT_EQ(read_json(tmp / "p" / "config.json").at("quantization_config").at("weights").size(), 4u * 6u * 3u);
}

TEST(MergeEncoded, Sub1bitMembersMergeInTheMaterializeDtype) {
  TempDir tmp;
  const RunResult r = merge(sub1bit(), tmp / "m", "msmoe");
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  expect_merged_dense(tmp / "m", core::DType::BF16);  // the config's torch_dtype, not f32
  // Smaller than the input: 6 of 8 experts in bf16 plus the same non-expert tensors.
  EXPECT_LT(read_json(tmp / "m" / "moe_tool_report.json").at("bytes").at("after").get<uint64_t>(),
            fs::file_size(kModel / "model.safetensors"));
  const RunResult f = merge(sub1bit(), tmp / "f32", "msmoe", {"--dtype", "f32"});
  ASSERT_EQ(f.exit_code, 0) << f.describe();
  // A merged expert (a group of two or more) of layer 1 is written in f32.
  const json groups = read_json(tmp / "f32" / "moe_tool_report.json").at("layers")[1].at("passes")[0].at("groups");
  size_t g = 0;
  while (g < groups.size() && groups[g].size() < 2) ++g;
  ASSERT_LT(g, groups.size());
  const auto ck = io::Checkpoint::open(io::Env::posix(), tmp / "f32");
  EXPECT_EQ(ck.info("model.layers.1.block_sparse_moe.experts." + std::to_string(g) + ".w2.weight").dtype, core::DType::F32);
}

}  // namespace
}  // namespace moe::test
