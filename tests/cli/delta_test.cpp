// `quantize --method delta-ternary` (passes/delta_ternary.h) through the CLI on a synthetic
// mixtral: each layer's base stored once per matrix type, eval of the native output equal to eval
// of its `convert --materialize` copy (logits bit for bit), inspect's expert bytes equal to the
// stored parts' bytes, the dry-run figure, export refused with the way out, and bad input refused
// in one line with nothing written.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <set>

#include "io/checkpoint.h"
#include "support/ckpt_util.h"
#include "support/cli_expect.h"
#include "support/paths.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;

class Delta : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = new TempDir("delta");
    write_synth(make_synth("mixtral"), *tmp_ / "in", {.tokenizer = true});
  }
  static void TearDownTestSuite() { delete tmp_; }
  static fs::path in() { return *tmp_ / "in"; }
  static TempDir* tmp_;
};
TempDir* Delta::tmp_ = nullptr;

TEST_F(Delta, BaseStoredOnceMaterializeEqualsNativeAndInspectCountsTheStoredBytes) {
  const fs::path out = *tmp_ / "d", mat = *tmp_ / "d-mat";
  RunResult r = run_tool({"-q", "quantize", in().string(), out.string(), "--method", "delta-ternary", "--density", "0.25"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json w = read_json(out / "config.json")["quantization_config"]["weights"];
  std::set<std::string> bases;
  int n = 0;
  for (const auto& [name, e] : w.items()) {
    ASSERT_EQ(e["encoding"], "delta-ternary") << name;
    bases.insert(e["parts"]["base"].get<std::string>());
    // density 0.25 of a [16, 32] or [32, 16] matrix: round(0.25 · 512) = 128 kept.
    EXPECT_EQ(e["nnz"], 128) << name;
    ++n;
  }
  const int64_t layers = read_json(in() / "config.json")["num_hidden_layers"].get<int64_t>();
  EXPECT_EQ(n, layers * 4 * 3);                         // every expert matrix
  EXPECT_EQ(static_cast<int64_t>(bases.size()), layers * 3);  // one base per layer and matrix type

  // inspect's expert bytes are the bytes of the expert tensors stored in the files.
  auto& env = io::Env::posix();
  const auto ck = io::Checkpoint::open(env, out);
  uint64_t stored = 0;
  for (const auto& name : ck.names())
    if (name.find(".experts.") != std::string::npos) stored += ck.info(name).nbytes();
  RunResult ins = run_tool({"-q", "inspect", out.string(), "--json"});
  ASSERT_EQ(ins.exit_code, 0) << ins.describe();
  const json cls = json::parse(ins.out)["tensor_classes"]["experts"];
  EXPECT_EQ(cls["bytes"].get<uint64_t>(), stored);
  EXPECT_EQ(cls["params"].get<int64_t>(), layers * 4 * 3 * 16 * 32);
  // The run's report says the same bits per parameter, matrix by matrix, as the parts hold.
  const json rep = read_json(out / "moe_tool_report.json");
  double sum_bits = 0;
  int64_t matrices = 0;
  for (const auto& l : rep["layers"])
    for (const auto& m : l["passes"][0]["matrices"]) sum_bits += m["bits_per_param"].get<double>(), ++matrices;
  ASSERT_EQ(matrices, n);
  EXPECT_NEAR(sum_bits * 512 / 8, static_cast<double>(stored), 0.01 * n);

  r = run_tool({"-q", "eval", out.string(), "--text", kHeldout.string(), "--ctx", "32", "--max-windows", "2", "--against",
                in().string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  // f32: the decoded weights (base + s in f32) are exactly what the forward of the native model uses.
  r = run_tool({"-q", "convert", out.string(), mat.string(), "--materialize", "--dtype", "f32"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_FALSE(read_json(mat / "config.json").contains("quantization_config"));
  const runtime::MatrixRM a = fixed_logits(out), b = fixed_logits(mat), orig = fixed_logits(in());
  EXPECT_TRUE(a == b) << "max |diff| " << (a - b).cwiseAbs().maxCoeff();
  EXPECT_FALSE(a == orig);

  // export: refused before any work, naming the way out.
  const fs::path gg = *tmp_ / "d.gguf";
  r = run_tool({"-q", "export", out.string(), gg.string(), "--type", "q8_0"});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_EQ(r.err_lines().size(), 1u) << r.describe();
  EXPECT_NE(r.err.find("--materialize`, then export"), std::string::npos) << r.describe();
  EXPECT_FALSE(fs::exists(gg));
}

TEST_F(Delta, DryRunGivesTheEstimatedBits) {
  const fs::path out = *tmp_ / "dry";
  const RunResult r = run_tool({"quantize", in().string(), out.string(), "--method", "delta-ternary", "--dry-run", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json j = json::parse(r.out);
  const json p = j["passes"][0]["params"];
  ASSERT_TRUE(p.contains("estimated_bits_per_expert_param")) << j.dump();
  // bf16 base over 4 experts (4 bits) + 0.1 · Rice bits per kept entry (about 5.3) + the scale.
  const double est = p["estimated_bits_per_expert_param"].get<double>();
  EXPECT_GT(est, 4.4);
  EXPECT_LT(est, 5.2);
  EXPECT_FALSE(fs::exists(out));
}

TEST_F(Delta, ParentAsBase) {
  // Copy-upcycled experts equal their parent: with the parent as base every delta is 0 (nothing
  // kept) and the model computes exactly what the upcycled one does.
  const fs::path dense = *tmp_ / "llama", up = *tmp_ / "up", out = *tmp_ / "par", bad = *tmp_ / "par-bad";
  write_synth(make_synth("llama"), dense, {.tokenizer = true});
  RunResult r = run_tool({"-q", "upcycle", dense.string(), up.string(), "--to", "mixtral", "--experts", "4", "--top-k", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  r = run_tool({"-q", "quantize", up.string(), out.string(), "--method", "delta-ternary", "--parent", dense.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json w = read_json(out / "config.json")["quantization_config"]["weights"];
  ASSERT_FALSE(w.empty());
  for (const auto& [name, e] : w.items()) EXPECT_EQ(e["nnz"], 0) << name;
  EXPECT_TRUE(fixed_logits(out) == fixed_logits(up));
  // The report names the base.
  EXPECT_EQ(read_json(out / "moe_tool_report.json")["passes"][0]["params"]["base"], "parent's MLP");
  // In a recipe the parent's path is relative to the recipe's folder, as every recipe path is.
  fs::create_directories(*tmp_ / "recipes");
  write_file(*tmp_ / "recipes" / "delta.json",
             json{{"model", "../up"},
                  {"passes", json::array({{{"pass", "quantize"}, {"method", "delta-ternary"}, {"parent", "../llama"}}})},
                  {"output", {{"path", "../par-recipe"}}}}
                 .dump());
  r = run_tool({"-q", "run", (*tmp_ / "recipes" / "delta.json").string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_TRUE(fixed_logits(*tmp_ / "par-recipe") == fixed_logits(up));
  expect_clean_failure(run_tool({"-q", "quantize", up.string(), bad.string(), "--method", "delta-ternary", "--parent",
                                 (*tmp_ / "nowhere").string()}),
                       "--parent: ");
  // A parent that is not one: refused before any work, naming the key and the layer.
  expect_clean_failure(run_tool({"-q", "quantize", up.string(), bad.string(), "--method", "delta-ternary", "--parent", up.string()}),
                       "--parent: layer 0 of");
  EXPECT_FALSE(fs::exists(bad));
}

TEST(DeltaList, ListShowsTheMethodAndItsKeys) {  // a method name longer than the list's column
  const RunResult r = run_tool({"list"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("quantize delta-ternary delta-compressed experts"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("--max-error"), std::string::npos) << r.out;
}

TEST_F(Delta, BadInputIsRefusedInOneLineWithNothingWritten) {
  const fs::path out = *tmp_ / "bad";
  auto q = [&](std::vector<std::string> extra, const fs::path& model) {
    std::vector<std::string> args = {"-q", "quantize", model.string(), out.string(), "--method", "delta-ternary"};
    args.insert(args.end(), extra.begin(), extra.end());
    return run_tool(args);
  };
  expect_clean_failure(q({"--density", "0"}, in()), "density");
  expect_clean_failure(q({"--density", "1.5"}, in()), "density");
  for (const char* v : {"1", "0", "2"}) expect_clean_failure(q({"--max-error", v}, in()), "--max-error: expected a number in (0, 1),");
  expect_clean_failure(q({"--density", "0.2", "--max-error", "0.1"}, in()), "give density or max_error, not both");
  expect_clean_failure(q({"--codec", "int4"}, in()), "--codec");
  EXPECT_FALSE(fs::exists(out));
  // A NaN in an expert weight.
  const fs::path nan_in = *tmp_ / "nan";
  auto ck = make_synth("mixtral");
  for (auto& t : ck.tensors)
    if (t.name == "model.layers.1.block_sparse_moe.experts.2.w3.weight") {
      t.data[6] = 0xc0, t.data[7] = 0x7f;  // bf16 NaN at element 3
    }
  write_synth(ck, nan_in, {.writer = Writer::HandRolled, .tokenizer = true});  // the project writer refuses NaN
  const RunResult r = q({}, nan_in);
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_EQ(r.err_lines().size(), 1u) << r.describe();
  EXPECT_NE(r.err.find("expert 2 up: non-finite value nan"), std::string::npos) << r.describe();
  EXPECT_FALSE(fs::exists(out));
}

// Experts stored in a format every writer dequantizes (GGUF blocks, compressed-tensors codes) are
// read dequantized by delta-ternary, and the plan says so as it does for the other passes (the
// runner saw no encoding there: no warning at all for these inputs, whichever pass).
TEST_F(Delta, DequantizedInputsAreWarnedAbout) {
  // GGUF needs a tokenizer it can store: the fixtures' byte-level one (and its vocabulary), rows of 32.
  const fs::path src = *tmp_ / "in-bpe", gguf = *tmp_ / "in-q8.gguf", native = *tmp_ / "in-int4", ct = *tmp_ / "in-ct";
  write_synth(make_synth("mixtral", {.config_patch = {{"vocab_size", 4096}, {"intermediate_size", 32}}}), src);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) fs::copy_file(kSrc / "data/models/mixtral-tiny" / f, src / f);
  ASSERT_EQ(run_tool({"-q", "export", src.string(), gguf.string(), "--type", "q8_0"}).exit_code, 0);
  ASSERT_EQ(run_tool({"-q", "quantize", src.string(), native.string(), "--method", "rtn", "--codec", "int4:g16:sym"}).exit_code, 0);
  ASSERT_EQ(run_tool({"-q", "export", native.string(), ct.string(), "--format", "compressed-tensors"}).exit_code, 0);
  for (const auto& [model, enc] : {std::pair<fs::path, std::string>{gguf, "gguf-q8_0"}, {ct, "compressed-tensors-int4"}}) {
    SCOPED_TRACE(enc);
    for (const std::string method : {"delta-ternary", "rtn"}) {
      const RunResult r = run_tool({"quantize", model.string(), (*tmp_ / "none").string(), "--method", method, "--dry-run", "--json"});
      ASSERT_EQ(r.exit_code, 0) << r.describe();
      const std::string warnings = json::parse(r.out).at("warnings").dump();
      EXPECT_NE(warnings.find("quantize: experts stored as " + enc + " are dequantized and "), std::string::npos) << warnings;
      if (method == "delta-ternary") {
        EXPECT_NE(warnings.find("written delta-ternary"), std::string::npos) << warnings;
      }
    }
  }
  EXPECT_FALSE(fs::exists(*tmp_ / "none"));
}

// A written delta-ternary checkpoint, corrupted: every refusal is one line naming the file and the
// weight, whether the load finds it (a NaN scale; a stream too short for its nnz entries, so
// inspect refuses it too) or only the decode does (a stream that ends before its last entry, a
// position past the weight: eval and convert read it).
TEST_F(Delta, CorruptStreamOrScaleNamesTheFileAndWeight) {
  const fs::path good = *tmp_ / "to-corrupt";
  ASSERT_EQ(run_tool({"-q", "quantize", in().string(), good.string(), "--method", "delta-ternary", "--density", "0.25"}).exit_code, 0);
  const std::string w = "model.layers.1.block_sparse_moe.experts.2.w3.weight";
  const fs::path file = good / "model.safetensors";
  const json entry = read_json(good / "config.json")["quantization_config"]["weights"][w];
  const int64_t nnz = entry["nnz"].get<int64_t>(), k = entry["rice_k"].get<int64_t>();
  const auto ck = io::Checkpoint::open(io::Env::posix(), good);
  const int64_t stream_bytes = ck.info(w + ".delta_stream").shape.at(0);
  // nnz and rice_k of the weight changed in a copy's config.json; returns the copy.
  int copies = 0;
  auto corrupt = [&](int64_t n, int64_t rice_k, const std::function<void(const fs::path&)>& patch) {
    const fs::path d = *tmp_ / ("corrupt" + std::to_string(copies++));
    copy_folder(good, d);
    json cfg = read_json(d / "config.json");
    cfg["quantization_config"]["weights"][w]["nnz"] = n;
    cfg["quantization_config"]["weights"][w]["rice_k"] = rice_k;
    write_file(d / "config.json", cfg.dump());
    if (patch) patch(d / "model.safetensors");
    return d;
  };
  auto refused = [&](const fs::path& d, const std::string& cmd, const std::string& needle) {
    SCOPED_TRACE(d.filename().string() + " " + cmd);
    std::vector<std::string> args = {"-q", cmd, d.string()};
    if (cmd == "eval") args.insert(args.end(), {"--text", kHeldout.string(), "--ctx", "32", "--max-windows", "1"});
    if (cmd == "convert") args.insert(args.end(), {(d.string() + "-out"), "--materialize"});
    const RunResult r = run_tool(args);
    expect_clean_failure(r, (d / "model.safetensors").string() + ": weight " + w + ": delta-ternary part " + needle);
    EXPECT_FALSE(fs::exists(d.string() + "-out"));
  };
  const fs::path nan = corrupt(nnz, k, [&](const fs::path& f) { patch_tensor_bytes(f, w + ".delta_scale", 0, std::string("\x00\x00\xc0\x7f", 4)); });
  const fs::path short_stream = corrupt(stream_bytes * 8 / (k + 2) + 1, k, nullptr);  // fewer bits than the entries' least
  // Enough bits for nnz entries at their least, fewer than the gaps take: found while decoding.
  ASSERT_GT(stream_bytes * 8 / (k + 2), nnz + 8);
  const fs::path ends_early = corrupt(stream_bytes * 8 / (k + 2), k, nullptr);
  // One entry, Rice k 30: end bit 0, then 30 one-bits: position 2^30 - 1.
  const fs::path past = corrupt(1, 30, [&](const fs::path& f) { patch_tensor_bytes(f, w + ".delta_stream", 0, "\xfe\xff\xff\x7f"); });
  for (const char* cmd : {"inspect", "eval", "convert"}) {
    refused(nan, cmd, "scale: expected a finite value >= 0, found nan");
    refused(short_stream, cmd, "stream: " + std::to_string(stream_bytes) + " bytes cannot hold nnz");
  }
  for (const char* cmd : {"eval", "convert"}) {
    refused(ends_early, cmd, "stream: ends before its entries");
    refused(past, cmd, "stream: entry 0 at position 1073741823, past the weight's 512 elements");
  }
}

}  // namespace
}  // namespace moe::test
