// Scale-out over MPI ranks (docs/mpi.md), through the built moe-tool under mpiexec on this
// machine: quantize gptq split over 2 and 3 ranks, factorize svdllm over 3 (a recipe) and
// calibrate over 2 and 3 (with and without --gram), write the bytes the single process writes
// (every file but the report; the report too once its "mpi" section and run-specific fields are
// removed), rank 0 alone prints and writes, and an error or a command that does not split ends
// every rank with exit 2 and one line of its own. Built only when CMake finds MPI, and not in the
// sanitizer configuration (tests/CMakeLists.txt).
#include <gtest/gtest.h>

#include <cstdlib>
#include <nlohmann/json.hpp>

#include "support/paths.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// mpiexec (OpenMPI) on localhost: more ranks than cores allowed, as root too (CI containers);
// shared memory without the single-copy mechanism, which container ptrace rules often forbid;
// waiting ranks yield the core. Each rank computes with one BLAS thread (determinism and 2 cores).
RunResult run_ranks(int ranks, const std::vector<std::string>& args) {
  std::vector<std::string> a = {"--oversubscribe", "--allow-run-as-root", "--mca", "btl_vader_single_copy_mechanism",
                                "none", "--mca", "mpi_yield_when_idle", "1", "-x", "OPENBLAS_NUM_THREADS", "-np",
                                std::to_string(ranks), tool_path()};
  a.insert(a.end(), args.begin(), args.end());
  return run_process(MOE_MPIEXEC, a);
}

// The report without what differs between two runs of the same work: the command line and
// output path, timings, the machine's memory budget, and the "mpi" sections.
json comparable_report(const fs::path& dir) {
  json r = json::parse(read_file(dir / "moe_tool_report.json"));
  std::function<void(json&)> strip = [&](json& j) {
    if (j.is_object()) {
      for (const char* k : {"mpi", "seconds", "command", "timings", "memory"}) j.erase(k);
      for (auto& [k, v] : j.items()) strip(v);
    } else if (j.is_array()) {
      for (auto& v : j) strip(v);
    }
  };
  strip(r);
  r["recipe"]["output"].erase("path");
  return r;
}

// Every file of `out` has the bytes of the same file in `one` (the report: once comparable).
void expect_same_output(const fs::path& one, const fs::path& out) {
  const std::vector<std::string> files = list_dir(one);
  ASSERT_NE(std::find(files.begin(), files.end(), "model.safetensors"), files.end());
  ASSERT_EQ(list_dir(out), files);
  for (const auto& f : files) {
    if (f == "moe_tool_report.json") continue;
    EXPECT_TRUE(read_file(one / f) == read_file(out / f)) << f << " differs from the single-process output";
  }
  EXPECT_EQ(comparable_report(out), comparable_report(one));
}

class MpiRun : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { setenv("OPENBLAS_NUM_THREADS", "1", 1); }
  TempDir tmp{"moe-mpi"};
  // qwen2_moe (routed experts, a shared expert and its gate), 8 routed experts: 3 ranks own 3, 3 and 2.
  fs::path model() {
    const fs::path m = tmp / "model";
    if (!fs::exists(m)) write_synth(make_synth("qwen2_moe", {.config_patch = {{"num_experts", 8}}}), m, {.tokenizer = true});
    return m;
  }
  // gptq int4 with the router quantized and few-token Hessians topped up (both computed on every
  // rank from the whole layer's Grams), on 16 windows of 32 tokens.
  std::vector<std::string> quantize_args(const fs::path& out) {
    return {"quantize", model().string(), out.string(), "--method", "gptq", "--codec", "int4", "--router", "int8",
            "--min-tokens", "48", "--text", kCalib.string(), "--ctx", "32", "--windows", "16"};
  }
};

TEST_F(MpiRun, QuantizeGptqBytesEqualTheSingleProcess) {
  const fs::path one = tmp / "one";
  std::vector<std::string> args = quantize_args(one);
  args.insert(args.begin(), "-q");
  const RunResult r1 = run_tool(args);
  ASSERT_EQ(r1.exit_code, 0) << r1.describe();
  for (int ranks : {2, 3}) {
    SCOPED_TRACE(std::to_string(ranks) + " ranks");
    const fs::path out = tmp / ("ranks" + std::to_string(ranks));
    const RunResult r = run_ranks(ranks, quantize_args(out));
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    // One summary on stdout (rank 0's), no warning or error line from any rank.
    size_t done = 0;
    for (size_t i = r.out.find("done\n"); i != std::string::npos; i = r.out.find("done\n", i + 1)) ++done;
    EXPECT_EQ(done, 1u) << r.out;
    EXPECT_NE(r.out.find("  mpi      " + std::to_string(ranks) + " ranks split the routed experts; "), std::string::npos) << r.out;
    EXPECT_EQ(r.err.find("moe-tool:"), std::string::npos) << r.err;
    expect_same_output(one, out);
    const json rep = json::parse(read_file(out / "moe_tool_report.json"));
    ASSERT_TRUE(rep.contains("mpi")) << rep.dump();
    EXPECT_EQ(rep["mpi"]["ranks"], ranks);
    size_t moe_layers = 0;  // the synthetic model's first layer is dense
    for (const auto& l : rep["layers"]) moe_layers += l.contains("experts_before");
    ASSERT_EQ(rep["mpi"]["layers"].size(), moe_layers);
    ASSERT_EQ(moe_layers, 2u);
    const json& l0 = rep["layers"][1]["passes"][0]["mpi"];
    // Each rank's share of the encodings reaches the others: bytes sent = rank 0's share x (ranks - 1).
    EXPECT_EQ(l0["slots_encoded_here"], 3 * ((8 + ranks - 1) / ranks));  // gate, up, down of experts 0, ranks, ...
    EXPECT_GT(l0["bytes_sent"].get<uint64_t>(), 0u);
    EXPECT_EQ(l0["bytes_gathered"].get<uint64_t>() * (ranks - 1) > l0["bytes_sent"].get<uint64_t>(), true);
    // Nothing left beside the output by any rank.
    EXPECT_TRUE(temp_leftovers(tmp.path()).empty());
  }
}

// factorize svdllm by an energy rule, through a recipe (`run`): some matrices stay dense (their
// report entries and notes come from their owner rank), the rest are low-rank factors.
TEST_F(MpiRun, FactorizeSvdllmRecipeBytesEqualTheSingleProcess) {
  auto recipe = [&](const fs::path& out) {
    const json r = {{"model", model().string()},
                    {"calibration", {{"text", kCalib.string()}, {"ctx", 32}, {"windows", 16}}},
                    {"passes", json::array({{{"pass", "factorize"}, {"method", "svdllm"}, {"energy", 0.97}}})},
                    {"output", {{"path", out.string()}}}};
    const fs::path file = tmp / (out.filename().string() + ".json");
    write_file(file, r.dump());
    return file.string();
  };
  const fs::path one = tmp / "one", three = tmp / "three";
  const RunResult r1 = run_tool({"-q", "run", recipe(one)});
  ASSERT_EQ(r1.exit_code, 0) << r1.describe();
  const RunResult r3 = run_ranks(3, {"-q", "run", recipe(three)});
  ASSERT_EQ(r3.exit_code, 0) << r3.describe();
  expect_same_output(one, three);
  const json rep = json::parse(read_file(one / "moe_tool_report.json"));
  size_t dense = 0, lowrank = 0;
  for (const auto& l : rep["layers"])
    if (l.contains("passes"))
      for (const auto& m : l["passes"][0]["matrices"]) (m["rank"] == "dense" ? dense : lowrank) += 1;
  EXPECT_GT(dense, 0u) << "the energy rule should keep some matrix dense";
  EXPECT_GT(lowrank, 0u);
  EXPECT_EQ(json::parse(read_file(three / "moe_tool_report.json"))["mpi"]["ranks"], 3);
}

// calibrate splits each MoE layer's routed experts in the forward and in the statistics (the
// experts' outputs, out_mean's sums, out_cos's sampled outputs and the Grams exchanged): the
// stats file has the single process's bytes, over 2 ranks and over 3 (which own 3, 3 and 2 of the
// 8 experts), with --gram and every 4th token sampled.
TEST_F(MpiRun, CalibrateStatsBytesEqualTheSingleProcess) {
  for (const bool gram : {false, true}) {
    SCOPED_TRACE(gram ? "--gram" : "no --gram");
    auto args = [&](const fs::path& out) {
      std::vector<std::string> a = {"calibrate", model().string(), "--text", kCalib.string(), "--ctx", "32",
                                    "--windows", "16", "--batch-windows", "4", "--out-stride", "4", "-o", out.string()};
      if (gram) a.push_back("--gram");
      return a;
    };
    const fs::path one = tmp / (gram ? "one-gram.safetensors" : "one.safetensors");
    const RunResult r1 = run_tool(args(one));
    ASSERT_EQ(r1.exit_code, 0) << r1.describe();
    for (int ranks : {2, 3}) {
      SCOPED_TRACE(std::to_string(ranks) + " ranks");
      const fs::path out = tmp / ("ranks" + std::to_string(ranks) + (gram ? "-gram" : "") + ".safetensors");
      const RunResult r = run_ranks(ranks, args(out));
      ASSERT_EQ(r.exit_code, 0) << r.describe();
      EXPECT_TRUE(read_file(one) == read_file(out)) << "the stats file differs from the single-process one";
      // One summary (rank 0's), with what the split exchanged; no error line from any rank.
      size_t wrote = 0;
      for (size_t i = r.out.find("wrote "); i != std::string::npos; i = r.out.find("wrote ", i + 1)) ++wrote;
      EXPECT_EQ(wrote, 1u) << r.out;
      EXPECT_NE(r.out.find("mpi: " + std::to_string(ranks) + " ranks split the routed experts; "), std::string::npos) << r.out;
      EXPECT_EQ(r.err.find("moe-tool:"), std::string::npos) << r.err;
      EXPECT_TRUE(temp_leftovers(tmp.path()).empty());
    }
  }
}

TEST_F(MpiRun, ErrorEndsEveryRankWithOneLine) {
  const fs::path out = tmp / "out";
  std::vector<std::string> args = quantize_args(out);
  args[1] = (tmp / "missing").string();
  const RunResult r = run_ranks(2, args);
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  size_t lines = 0;
  for (const auto& l : r.err_lines()) lines += l.rfind("moe-tool: error:", 0) == 0;
  EXPECT_EQ(lines, 1u) << r.err;
  EXPECT_NE(r.err.find((tmp / "missing").string()), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(out));
  EXPECT_TRUE(temp_leftovers(tmp.path()).empty());
}

// A NaN in an expert that rank 1 owns (expert 1 of 8 over 2 ranks; expert 4 over 3 ranks is rank
// 1's too): only that rank converts the expert, so only it meets the NaN. Every rank stops with its
// message: exit 2, one error line, the single process's wording (no "rank 1:"), and nothing left
// beside the output, for calibrate (a stats file) and prune (a folder).
TEST_F(MpiRun, ErrorMetByOneRankEndsEveryRankWithTheSingleProcessMessage) {
  const fs::path bad = tmp / "nan-model";
  auto ck = make_synth("qwen2_moe", {.config_patch = {{"num_experts", 8}}});
  bool planted = false;
  for (auto& t : ck.tensors)
    if (t.name == "model.layers.1.mlp.experts.1.up_proj.weight" || t.name == "model.layers.2.mlp.experts.4.up_proj.weight") {
      t.data[6] = 0xc0, t.data[7] = 0x7f;  // bf16 NaN at element 3
      planted = true;
    }
  ASSERT_TRUE(planted);
  write_synth(ck, bad, {.writer = Writer::HandRolled, .tokenizer = true});  // the project writer refuses NaN
  const std::vector<std::vector<std::string>> commands = {
      {"-q", "calibrate", bad.string(), "--text", kCalib.string(), "--ctx", "32", "--windows", "8", "-o",
       (tmp / "out" / "s.st").string()},
      {"-q", "prune", bad.string(), (tmp / "out" / "pruned").string(), "--method", "reap", "--keep", "4", "--text", kCalib.string(),
       "--ctx", "32", "--windows", "8"}};
  for (const auto& args : commands) {
    fs::create_directories(tmp / "out");
    const RunResult one = run_tool(args);
    ASSERT_EQ(one.exit_code, 2) << one.describe();
    ASSERT_EQ(one.err_lines().size(), 1u) << one.describe();
    EXPECT_NE(one.err.find("non-finite value nan"), std::string::npos) << one.describe();
    for (int ranks : {2, 3}) {
      SCOPED_TRACE(args[1] + " over " + std::to_string(ranks) + " ranks");
      const RunResult r = run_ranks(ranks, args);
      EXPECT_EQ(r.exit_code, 2) << r.describe();
      std::vector<std::string> lines;
      for (const auto& l : r.err_lines())
        if (l.rfind("moe-tool: error:", 0) == 0) lines.push_back(l);
      ASSERT_EQ(lines.size(), 1u) << r.err;
      EXPECT_EQ(lines[0], one.err_lines()[0]) << r.err;
      EXPECT_TRUE(list_dir(tmp / "out").empty()) << "left beside the output";
    }
    fs::remove_all(tmp / "out");
  }
}

TEST_F(MpiRun, CommandThatDoesNotSplitIsRefused) {
  const RunResult r = run_ranks(2, {"inspect", model().string()});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  size_t lines = 0;
  for (const auto& l : r.err_lines()) lines += l.rfind("moe-tool: error: inspect does not run over MPI ranks", 0) == 0;
  EXPECT_EQ(lines, 1u) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
}

}  // namespace
}  // namespace moe::test
