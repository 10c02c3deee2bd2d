// `factorize` and the native checkpoint format (docs/FORMAT.md) through the CLI on the trained
// mixtral-tiny fixture: the written parts and config entries, bits per parameter against the
// bytes in the file, --materialize against the native forward, every command reading the
// native checkpoint (inspect, eval, calibrate, prune, convert), and malformed native checkpoints.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "quant/lowrank.h"
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



// One factorized checkpoint shared by the tests of this file (svd needs no calibration).
const fs::path& svd_model() {
  static TempDir tmp{"moe-factorize"};
  static const fs::path out = [] {
    const fs::path o = tmp / "svd";
    const RunResult r = run_tool({"-q", "factorize", kModel.string(), o.string(), "--method", "svd", "--ratio", "0.5"});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return o;
  }();
  return out;
}

TEST(Factorize, WritesLowRankPartsAndExactBitsPerParameter) {
  const fs::path& out = svd_model();
  const json cfg = read_json(out / "config.json");
  const json& q = cfg.at("quantization_config");
  EXPECT_EQ(q.at("quant_method"), "moe_tool");
  EXPECT_EQ(q.at("format_version"), 1);
  const json& w = q.at("weights");
  ASSERT_EQ(w.size(), 4u * 8u * 3u);  // every expert projection of the 4 layers
  // Ratio 0.5 of [256, 128]: rank floor(0.5 * 256 * 128 / 384) = 42.
  const json& e = w.at("model.layers.2.block_sparse_moe.experts.5.w2.weight");
  EXPECT_EQ(e.at("encoding"), "lowrank");
  EXPECT_EQ(e.at("rank"), 42);
  EXPECT_EQ(e.at("parts").at("a"), "model.layers.2.block_sparse_moe.experts.5.w2.weight.lr_a");

  // The file: no dense expert weight, factors of the declared shapes, expert bytes as reported.
  const auto ck = io::Checkpoint::open(io::Env::posix(), out);
  EXPECT_FALSE(ck.has("model.layers.2.block_sparse_moe.experts.5.w2.weight"));
  EXPECT_EQ(ck.info("model.layers.2.block_sparse_moe.experts.5.w2.weight.lr_a").shape, (core::Shape{128, 42}));
  EXPECT_EQ(ck.info("model.layers.2.block_sparse_moe.experts.5.w2.weight.lr_b").shape, (core::Shape{42, 256}));
  uint64_t expert_bytes = 0;
  for (const auto& name : ck.names())
    if (name.find(".experts.") != std::string::npos) expert_bytes += ck.info(name).nbytes();
  EXPECT_EQ(expert_bytes, 4u * 8u * 3u * 42u * (256u + 128u) * 2u);  // bf16 factors
  const int64_t expert_params = 4 * 8 * 3 * 256 * 128;
  const json report = read_json(out / "moe_tool_report.json");
  const json& after = report.at("tensor_classes").at("after").at("experts");
  EXPECT_EQ(after.at("bytes").get<uint64_t>(), expert_bytes);
  EXPECT_EQ(after.at("params").get<int64_t>(), expert_params);
  EXPECT_DOUBLE_EQ(report.at("expert_bits_per_param").at("after").get<double>(),
                   8.0 * static_cast<double>(expert_bytes) / static_cast<double>(expert_params));
  // inspect reads the same numbers from the checkpoint.
  const RunResult ins = run_tool({"inspect", out.string(), "--json"});
  ASSERT_EQ(ins.exit_code, 0) << ins.describe();
  const json s = json::parse(ins.out);
  EXPECT_EQ(s.at("encodings").at("lowrank"), 96);
  EXPECT_EQ(s.at("tensor_classes").at("experts").at("bytes").get<uint64_t>(), expert_bytes);
  EXPECT_EQ(s.at("params_total"), read_json(out / "moe_tool_report.json").at("params").at("before"));
}

TEST(Factorize, MaterializedCheckpointEqualsTheNativeForward) {
  const fs::path& out = svd_model();
  TempDir tmp;
  const RunResult m = run_tool({"-q", "convert", out.string(), (tmp / "dense").string(), "--materialize", "--dtype", "f32"});
  ASSERT_EQ(m.exit_code, 0) << m.describe();
  EXPECT_FALSE(read_json(tmp / "dense" / "config.json").contains("quantization_config"));
  const auto ck_n = io::Checkpoint::open(io::Env::posix(), out);
  const auto ck_d = io::Checkpoint::open(io::Env::posix(), tmp / "dense");
  const model::Model native = model::Model::load(ck_n), dense = model::Model::load(ck_d);
  // Every expert weight: the stored dense f32 is the encoding's dequantization, bit for bit.
  for (int l : {0, 3}) {
    const auto& a = native.layers()[l].moe->experts[4];
    const auto& b = dense.layers()[l].moe->experts[4];
    ASSERT_NE(dynamic_cast<const quant::LowRank*>(a.down.encoding()), nullptr);
    EXPECT_EQ(b.down.encoding(), nullptr);
    EXPECT_EQ(a.down.to_f32(), b.down.to_f32());
    EXPECT_EQ(a.gate.to_f32(), b.gate.to_f32());
  }
  // The forward runs the factors as two thin GEMMs; the dense one runs W: the same logits up to
  // f32 summation order.
  std::vector<int32_t> tokens(64);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 977 + 13) % 4000);
  const runtime::MatrixRM ln = runtime::Forward(native).run(tokens, 32);
  const runtime::MatrixRM ld = runtime::Forward(dense).run(tokens, 32);
  ASSERT_EQ(ln.rows(), ld.rows());
  const float scale = ld.cwiseAbs().maxCoeff();
  EXPECT_LT((ln - ld).cwiseAbs().maxCoeff(), 1e-4f * scale);
}

TEST(Factorize, EveryCommandReadsTheNativeCheckpoint) {
  const fs::path& out = svd_model();
  TempDir tmp;
  // eval against the input: a factorized model differs but stays close.
  const RunResult ev = run_tool({"-q", "eval", out.string(), "--text", (kSrc / "data/text/heldout.txt").string(), "--ctx",
                                 "128", "--max-windows", "8", "--against", kModel.string(), "--json"});
  ASSERT_EQ(ev.exit_code, 0) << ev.describe();
  const json e = json::parse(ev.out);
  EXPECT_GT(e.at("kl_mean").get<double>(), 0.0);
  EXPECT_LT(e.at("kl_mean").get<double>(), 0.5);
  // calibrate runs the low-rank forward.
  const RunResult cal = run_tool({"-q", "calibrate", out.string(), "--text", kCalib, "--ctx", "64", "--windows", "4", "-o",
                                  (tmp / "stats.safetensors").string()});
  EXPECT_EQ(cal.exit_code, 0) << cal.describe();
  // prune keeps the kept experts' encodings; the output is native too.
  const RunResult pr = run_tool({"-q", "prune", out.string(), (tmp / "pruned").string(), "--method", "random", "--keep", "6"});
  ASSERT_EQ(pr.exit_code, 0) << pr.describe();
  const json pc = read_json(tmp / "pruned" / "config.json");
  EXPECT_EQ(pc.at("num_local_experts"), 6);
  EXPECT_EQ(pc.at("quantization_config").at("weights").size(), 4u * 6u * 3u);
  // convert without --materialize keeps the encoding, bit for bit.
  const RunResult cv = run_tool({"-q", "convert", out.string(), (tmp / "copy").string()});
  ASSERT_EQ(cv.exit_code, 0) << cv.describe();
  EXPECT_EQ(read_json(tmp / "copy" / "config.json").at("quantization_config"),
            read_json(out / "config.json").at("quantization_config"));
  const std::string diff = first_difference(read_tensors(tmp / "copy"), read_tensors(out));
  EXPECT_TRUE(diff.empty()) << diff;
}

// A copy of the factorized checkpoint with its config.json edited.
fs::path broken_copy(const fs::path& dir, const std::function<void(json&)>& edit) {
  const fs::path& src = svd_model();
  fs::create_directories(dir);
  for (const auto& f : fs::directory_iterator(src)) fs::copy_file(f.path(), dir / f.path().filename());
  json cfg = read_json(dir / "config.json");
  edit(cfg["quantization_config"]["weights"]);
  write_file(dir / "config.json", cfg.dump(2));
  return dir;
}

TEST(Factorize, MalformedNativeCheckpointsFailCleanly) {
  TempDir tmp;
  const std::string w = "model.layers.1.block_sparse_moe.experts.3.w1.weight";
  struct Case {
    const char* name;
    std::function<void(json&)> edit;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {"missing-factor", [&](json& ws) { ws[w]["parts"]["b"] = w + ".lr_x"; }, "tensor " + w + ".lr_x: missing (part \"b\""},
      {"wrong-shape", [&](json& ws) { ws[w]["parts"]["b"] = "model.layers.1.block_sparse_moe.experts.3.w2.weight.lr_b"; },
       "shape [256, 256]"},
      {"unknown-encoding", [&](json& ws) { ws[w]["encoding"] = "lowrnk"; }, "unknown encoding \"lowrnk\""},
      {"rank-disagrees", [&](json& ws) { ws[w]["rank"] = 200; }, "rank 200 but the factors have rank 42"},
      {"missing-part-role", [&](json& ws) { ws[w]["parts"].erase("a"); }, "part \"a\" missing"},
      {"not-a-weight", [&](json& ws) { ws["model.layers.1.block_sparse_moe.experts.9.w1.weight"] = ws[w]; },
       "is not a weight of this model"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const fs::path dir = broken_copy(tmp / c.name, c.edit);
    expect_clean_failure(run_tool({"inspect", dir.string()}), c.needle);
    const fs::path out = tmp / (std::string(c.name) + "-out");
    expect_clean_failure(run_tool({"-q", "convert", dir.string(), out.string(), "--materialize"}), c.needle);
    EXPECT_FALSE(fs::exists(out));
  }
}

TEST(Factorize, OptionsAreCheckedBeforeAnyWork) {
  TempDir tmp;
  const fs::path out = tmp / "o";
  expect_clean_failure(run_tool({"-q", "factorize", kModel.string(), out.string(), "--method", "svdllm", "--ratio", "0.4"}),
                       "give --text");
  expect_clean_failure(run_tool({"-q", "factorize", kModel.string(), out.string(), "--method", "svd"}),
                       "give one of --ratio");
  expect_clean_failure(run_tool({"-q", "factorize", kModel.string(), out.string(), "--method", "svd", "--ratio", "1.5"}),
                       "ratio");
  expect_clean_failure(run_tool({"-q", "factorize", kModel.string(), out.string(), "--method", "svd", "--ratio", "0.5",
                                 "--targets", "attn"}),
                       "unknown target \"attn\"");
  expect_clean_failure(run_tool({"-q", "factorize", kModel.string(), out.string(), "--method", "svdlm", "--ratio", "0.5"}),
                       "did you mean \"svdllm\"");
  EXPECT_FALSE(fs::exists(out));
}

TEST(Factorize, EachMethodRunsAndSvdllmBeatsSvd) {
  MOE_SKIP_UNDER_SANITIZERS();
  // On calibration text: svdllm (whitened by each expert's routed-token Gram) keeps the output
  // closer than plain SVD at the same size (with enough calibration tokens: on 8 windows of 128
  // it overfits and loses); delta and latent run and write shared parts once.
  TempDir tmp;
  auto run = [&](const std::string& method, std::vector<std::string> extra) {
    std::vector<std::string> args = {"-q", "factorize", kModel.string(), (tmp / method).string(), "--method", method,
                                     "--text", kCalib, "--ctx", "128", "--windows", "64", "--json"};
    args.insert(args.end(), extra.begin(), extra.end());
    const RunResult r = run_tool(args);
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return r.exit_code == 0 ? json::parse(r.out) : json();
  };
  auto kl = [&](const std::string& method) {
    const RunResult r = run_tool({"-q", "eval", (tmp / method).string(), "--text", (kSrc / "data/text/heldout.txt").string(),
                                  "--ctx", "128", "--max-windows", "24", "--against", kModel.string(), "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return r.exit_code == 0 ? json::parse(r.out).at("kl_mean").get<double>() : 1e9;
  };
  const json svd = run("svd", {"--ratio", "0.3"});
  const json svdllm = run("svdllm", {"--ratio", "0.3"});
  EXPECT_LT(kl("svdllm"), kl("svd"));
  EXPECT_EQ(svd["bytes"]["after"], svdllm["bytes"]["after"]);

  const json delta = run("delta", {"--ratio", "0.4"});
  const json latent = run("latent", {"--ratio", "0.4"});
  for (const char* m : {"delta", "latent"}) {
    const auto ck = io::Checkpoint::open(io::Env::posix(), tmp / m);
    const json ws = read_json(tmp / m / "config.json")["quantization_config"]["weights"];
    // Each shared part is named by all 8 experts of its layer and stored once.
    std::map<std::string, int> users;
    for (const auto& [name, e] : ws.items())
      for (const auto& [role, t] : e["parts"].items()) ++users[t.get<std::string>()];
    int shared = 0;
    for (const auto& [t, n] : users) {
      EXPECT_TRUE(ck.has(t)) << t;
      if (n > 1) {
        EXPECT_EQ(n, 8) << t;
        ++shared;
      }
    }
    EXPECT_EQ(shared, 4 * 3) << m;  // one per layer and matrix type
  }
  // Within the ratio: stored expert bytes <= 0.4 of the dense experts' (bf16).
  for (const json* j : {&delta, &latent}) {
    const json rep = read_json(fs::path((*j)["report"].get<std::string>()));
    EXPECT_LE(rep["tensor_classes"]["after"]["experts"]["bytes"].get<double>(),
              0.4 * rep["tensor_classes"]["before"]["experts"]["bytes"].get<double>() + 1);
  }
}


// --budget over the whole model (budget_scope "model", the default) against one budget per layer,
// svdllm on the same calibration Grams (--no-propagate: the planning sweep and the layer loop then
// see the same inputs, so the planned losses are the written ones). The model-wide allocation is
// the optimum over a larger set (every per-layer allocation fits the model budget; all expert
// matrices here cost m + n = 384 per rank, where the greedy is exact), so its total loss is at most
// the per-layer total; the stored parameters, counted from the written file, are what the plan
// reports and within the budget.
TEST(Factorize, ModelScopeBudgetPlansAcrossLayers) {
  MOE_SKIP_UNDER_SANITIZERS();  // SVD-LLM on 16 windows per rank plan; the refusals below it run there
  TempDir tmp;
  auto run = [&](const std::string& name, const std::string& scope) {
    const RunResult r = run_tool({"-q", "factorize", kModel.string(), (tmp / name).string(), "--method", "svdllm",
                                  "--budget", "0.4", "--budget-scope", scope, "--no-propagate", "--text", kCalib,
                                  "--ctx", "128", "--windows", "16", "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return read_json(tmp / name / "moe_tool_report.json");
  };
  const json model = run("model", "model"), layer = run("layer", "layer");
  const int64_t dense = 4 * 8 * 3 * 256 * 128;  // the targeted expert parameters

  // The plan: one budget, ranks for all 96 matrices, what the layers then wrote.
  ASSERT_EQ(model.at("plans").size(), 1u);
  const json& plan = model.at("plans")[0];
  EXPECT_EQ(plan.at("scope"), "model");
  EXPECT_GT(plan.at("seconds").get<double>(), 0);
  EXPECT_EQ(plan.at("budget").at("dense_params").get<int64_t>(), dense);
  const int64_t budget = static_cast<int64_t>(std::floor(0.4 * static_cast<double>(dense)));
  EXPECT_EQ(plan.at("budget").at("params").get<int64_t>(), budget);
  ASSERT_EQ(plan.at("ranks").size(), 96u);
  std::map<std::pair<int, std::string>, json> planned;
  for (const auto& r : plan.at("ranks")) planned[{r.at("layer").get<int>(), r.at("matrix").get<std::string>()}] = r.at("rank");
  double written_loss = 0;
  std::set<int> distinct;
  for (const auto& l : model.at("layers")) {
    const json& pr = l.at("passes")[0];
    EXPECT_EQ(pr.at("budget").at("scope"), "model");
    for (const auto& m : pr.at("matrices")) {
      EXPECT_EQ(m.at("rank"), (planned[{l.at("layer").get<int>(), m.at("matrix").get<std::string>()}])) << m.dump();
      written_loss += m.at("loss").get<double>();
      if (m.at("rank").is_number()) distinct.insert(m.at("rank").get<int>());
    }
  }
  EXPECT_GT(distinct.size(), 4u);  // ranks differ across matrices and layers
  const double plan_loss = plan.at("budget").at("weighted_loss").get<double>();
  EXPECT_NEAR(written_loss, plan_loss, 1e-6 * plan_loss);

  // Stored parameters, from the file: rank·(m + n) per factorized matrix, m·n per dense one.
  const auto ck = io::Checkpoint::open(io::Env::posix(), tmp / "model");
  int64_t stored = 0;
  for (const auto& name : ck.names())
    if (name.find(".experts.") != std::string::npos) stored += core::shape_numel(ck.info(name).shape);
  EXPECT_EQ(stored, plan.at("budget").at("allocated_params").get<int64_t>());
  EXPECT_LE(stored, budget);

  // Per layer: each layer within its own budget, and no better in total than the model-wide plan.
  double layer_loss = 0;
  for (const auto& l : layer.at("layers")) {
    const json& b = l.at("passes")[0].at("budget");
    EXPECT_EQ(b.at("scope"), "layer");
    EXPECT_LE(b.at("allocated_params").get<int64_t>(), b.at("params").get<int64_t>());
    EXPECT_EQ(b.at("params").get<int64_t>(), static_cast<int64_t>(std::floor(0.4 * (dense / 4.0))));
    layer_loss += b.at("weighted_loss").get<double>();
  }
  EXPECT_FALSE(layer.contains("plans"));
  EXPECT_LE(plan_loss, layer_loss * (1 + 1e-9));
  EXPECT_LT(plan_loss, layer_loss);  // the layers' Grams differ in scale: one budget moves ranks between them
}

TEST(Factorize, ModelScopeBudgetOnlyAsTheFirstPass) {
  TempDir tmp;
  const fs::path recipe = tmp / "r.json";
  write_file(recipe, json{{"model", kModel.string()}, {"output", {{"path", (tmp / "o").string()}}},
                          {"calibration", {{"text", kCalib}, {"ctx", 128}, {"windows", 4}}},
                          {"passes", {{{"pass", "prune"}, {"method", "frequency"}, {"keep", 6}},
                                      {{"pass", "factorize"}, {"method", "svdllm"}, {"budget", 0.5}}}}}.dump());
  expect_clean_failure(run_tool({"-q", "run", recipe.string()}), "budget_scope \"layer\"");
  EXPECT_FALSE(fs::exists(tmp / "o"));
  expect_clean_failure(run_tool({"-q", "factorize", kModel.string(), (tmp / "o").string(), "--method", "svd", "--ratio",
                                 "0.5", "--budget-scope", "layer"}),
                       "applies to budget only");
}

}  // namespace
}  // namespace moe::test
