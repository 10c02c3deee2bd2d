// `upcycle` through the CLI: copy-upcycled models reproduce the dense logits through our own
// forward (each target family, top-k 1 and 2, and where they cannot: norm_topk_prob false),
// split at init (k = E, down scale) equals dense and "cube" does not, drop re-draws the share of
// neurons it says, the qwen2_moe shared expert, routers from prompts route each expert's own
// prompts to it, several sources, recipes, and bad input (exit 2, one line, nothing written).
#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "model/model.h"
#include "runtime/forward.h"
#include "tokenizer/tokenizer.h"
#include "support/paths.h"
#include "support/cli_expect.h"
#include "support/ckpt_util.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

const fs::path kSynth = fs::path(MOE_SOURCE_DIR) / "data/models/synthetic";  // not from kSrc: support/paths.h


// Logits of a model folder on fixed token ids (2 windows of 32).
runtime::MatrixRM logits_of(const fs::path& dir) {
  auto ck = io::Checkpoint::open(io::Env::posix(), dir);
  auto m = model::Model::load(ck);
  runtime::Forward f(m);
  std::vector<int32_t> ids;
  for (int i = 0; i < 64; ++i) ids.push_back(static_cast<int32_t>((i * 37 + 11) % m.dims().vocab));
  return f.run(ids, 32);
}

double max_abs_diff(const runtime::MatrixRM& a, const runtime::MatrixRM& b) {
  EXPECT_EQ(a.rows(), b.rows());
  EXPECT_EQ(a.cols(), b.cols());
  return (a - b).cwiseAbs().maxCoeff();
}

double max_abs(const runtime::MatrixRM& a) { return a.cwiseAbs().maxCoeff(); }

RunResult upcycle(const fs::path& dense, const fs::path& out, std::vector<std::string> extra) {
  std::vector<std::string> args = {"-q", "upcycle", dense.string(), out.string()};
  args.insert(args.end(), extra.begin(), extra.end());
  return run_tool(args);
}

void expect_clean_failure(const RunResult& r, const std::string& needle, const fs::path& out) {
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_EQ(r.err_lines().size(), 1u) << r.describe();
  EXPECT_NE(r.err.find(needle), std::string::npos) << r.describe();
  EXPECT_FALSE(fs::exists(out)) << out;
  for (const auto& e : fs::directory_iterator(out.parent_path()))
    EXPECT_EQ(e.path().filename().string().find("moe-tool-tmp"), std::string::npos) << e.path();
}

struct Case {
  std::string name;
  fs::path dense;
  std::string to;
  std::string k;
};

// The central test: copy (every expert = the dense MLP, random router) reproduces the dense
// logits within fp32 rounding, for every source/target pair the families can express, k 1 and 2.
TEST(Upcycle, CopyEqualsDenseForEveryTarget) {
  TempDir tmp("moe-upcycle");
  const std::vector<Case> cases = {
      {"llama-mixtral-k1", kLlama, "mixtral", "1"},    {"llama-mixtral-k2", kLlama, "mixtral", "2"},
      {"llama-qwen2moe-k1", kLlama, "qwen2_moe", "1"}, {"llama-qwen2moe-k2", kLlama, "qwen2_moe", "2"},
      {"mistral-mixtral-k2", kSynth / "mistral", "mixtral", "2"},
      {"qwen2-qwen2moe-k2", kSynth / "qwen2", "qwen2_moe", "2"},
      {"qwen3-qwen3moe-k1", kSynth / "qwen3", "qwen3_moe", "1"}, {"qwen3-qwen3moe-k2", kSynth / "qwen3", "qwen3_moe", "2"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const fs::path out = tmp / c.name;
    const RunResult r = upcycle(c.dense, out, {"--to", c.to, "--experts", "4", "--top-k", c.k, "--seed", "3"});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    const json cfg = read_json(out / "config.json");
    EXPECT_EQ(cfg.at("model_type"), c.to);
    EXPECT_EQ(cfg.at("num_experts_per_tok"), std::stoi(c.k));
    const auto dense = logits_of(c.dense), moe = logits_of(out);
    const double d = max_abs_diff(dense, moe);
    // fp32 rounding of the weighted sum of k equal expert outputs (weights summing to 1).
    EXPECT_LT(d, 2e-5 * std::max(1.0, max_abs(dense))) << "max |diff| " << d;
    std::printf("[upcycle] copy %s: max |logit diff| %.3g (max |logit| %.3g)\n", c.name.c_str(), d, max_abs(dense));
  }
}

TEST(Upcycle, ConfigKeysPerFamily) {
  TempDir tmp("moe-upcycle");
  ASSERT_EQ(upcycle(kLlama, tmp / "mx", {"--to", "mixtral", "--experts", "8", "--top-k", "2"}).exit_code, 0);
  const json mx = read_json(tmp / "mx/config.json");
  EXPECT_EQ(mx.at("architectures"), json::array({"MixtralForCausalLM"}));
  EXPECT_EQ(mx.at("num_local_experts"), 8);
  EXPECT_EQ(mx.at("intermediate_size"), 512);
  EXPECT_EQ(mx.at("rope_theta"), 10000.0);  // the source's, not mixtral's default 1e6
  EXPECT_EQ(mx.at("rms_norm_eps"), 1e-5);
  EXPECT_TRUE(mx.contains("router_aux_loss_coef"));
  EXPECT_EQ(mx.at("output_router_logits"), false);
  ASSERT_EQ(upcycle(kLlama, tmp / "q2", {"--to", "qwen2_moe", "--experts", "4", "--top-k", "2", "--shared-expert"}).exit_code, 0);
  const json q2 = read_json(tmp / "q2/config.json");
  EXPECT_EQ(q2.at("num_experts"), 4);
  EXPECT_EQ(q2.at("moe_intermediate_size"), 512);
  EXPECT_EQ(q2.at("shared_expert_intermediate_size"), 512);
  EXPECT_EQ(q2.at("decoder_sparse_step"), 1);
  EXPECT_EQ(q2.at("mlp_only_layers"), json::array());
  EXPECT_EQ(q2.at("norm_topk_prob"), true);
  // llama has no q/k/v biases; qwen2_moe needs them: zeros.
  const TensorMap t = read_tensors(tmp / "q2");
  ASSERT_TRUE(t.count("model.layers.0.self_attn.q_proj.bias"));
  for (char c : t.at("model.layers.0.self_attn.q_proj.bias").bytes) EXPECT_EQ(c, 0);
  EXPECT_TRUE(t.count("model.layers.3.mlp.shared_expert_gate.weight"));
  EXPECT_TRUE(t.count("model.layers.3.mlp.experts.3.down_proj.weight"));
  // Experts of copy are the dense bytes.
  const TensorMap d = read_tensors(kLlama);
  EXPECT_EQ(read_tensors(tmp / "mx").at("model.layers.2.block_sparse_moe.experts.7.w1.weight").bytes,
            d.at("model.layers.2.mlp.gate_proj.weight").bytes);
  // The report says what was done and that the model needs training.
  const json rep = read_json(tmp / "mx/moe_tool_report.json");
  EXPECT_EQ(rep.at("upcycle").at("method"), "copy");
  // Parameters: 8 experts of 3 x 128 x 512 per layer where the dense model had one MLP.
  EXPECT_EQ(rep.at("params").at("after").get<int64_t>() - rep.at("params").at("before").get<int64_t>(),
            4 * (7 * 3 * 128 * 512 + 8 * 128));
  EXPECT_EQ(rep.at("params").at("after").get<int64_t>() - rep.at("params").at("active_after").get<int64_t>(),
            4 * 6 * 3 * 128 * 512);
  EXPECT_NE(rep.at("upcycle").at("next").get<std::string>().find("continued training"), std::string::npos);
  EXPECT_EQ(rep.at("upcycle").at("equals_dense_at_init").get<std::string>().rfind("yes", 0), 0u);
}

// Without renormalisation the output is (sum of the top-k probabilities) x dense MLP: not dense.
TEST(Upcycle, NoRenormalisationDoesNotReproduce) {
  TempDir tmp("moe-upcycle");
  const fs::path out = tmp / "nonorm";
  ASSERT_EQ(upcycle(kLlama, out, {"--to", "qwen2_moe", "--experts", "4", "--top-k", "2", "--no-norm-topk"}).exit_code, 0);
  EXPECT_EQ(read_json(out / "config.json").at("norm_topk_prob"), false);
  const double d = max_abs_diff(logits_of(kLlama), logits_of(out));
  std::printf("[upcycle] copy llama->qwen2_moe k=2 norm_topk_prob false: max |logit diff| %.3g\n", d);
  EXPECT_GT(d, 1e-2);
  // k = E: the probabilities of all experts sum to 1, so it reproduces again.
  const fs::path all = tmp / "nonorm-all";
  ASSERT_EQ(upcycle(kLlama, all, {"--to", "qwen2_moe", "--experts", "4", "--top-k", "4", "--no-norm-topk"}).exit_code, 0);
  const double d2 = max_abs_diff(logits_of(kLlama), logits_of(all));
  std::printf("[upcycle] copy llama->qwen2_moe k=E=4 norm_topk_prob false: max |logit diff| %.3g\n", d2);
  EXPECT_LT(d2, 1e-4);
}

TEST(Upcycle, SharedExpertKeepsTheDenseOutput) {
  TempDir tmp("moe-upcycle");
  const fs::path out = tmp / "shared";
  ASSERT_EQ(upcycle(kLlama, out, {"--to", "qwen2_moe", "--experts", "4", "--top-k", "1", "--shared-expert"}).exit_code, 0);
  const double d = max_abs_diff(logits_of(kLlama), logits_of(out));
  std::printf("[upcycle] copy + shared expert llama->qwen2_moe: max |logit diff| %.3g\n", d);
  EXPECT_LT(d, 1e-4);
}

// split: E = copies x G; with equal router logits (--router-std 0), k = G or k = E and
// down_proj x G the MoE is the dense model; with a random router (unequal segment weights), or
// the docs/methods.md "cube" scale (s^(1/3) through silu), it is not.
TEST(Upcycle, SplitAtInitEqualsDenseWhereTheMathSaysSo) {
  TempDir tmp("moe-upcycle");
  const auto dense = logits_of(kLlama);
  const std::string calib = (kSrc / "data/text/calib.txt").string();
  for (const std::string seg : {"random", "kmeans", "coact"}) {
    for (const std::string g : {"2", "4"}) {
      if (under_sanitizers() && g == "4") continue;  // the G = 2 cases reach the same code there
      const fs::path out = tmp / ("split-" + seg + g);
      std::vector<std::string> args = {"--to", "mixtral", "--experts", g, "--top-k", g, "--method", "split",
                                       "--segments", g, "--segmenting", seg, "--router-std", "0"};
      if (seg == "coact") args.insert(args.end(), {"--text", calib});
      const RunResult r = upcycle(kLlama, out, args);
      ASSERT_EQ(r.exit_code, 0) << r.describe();
      EXPECT_EQ(read_json(out / "config.json").at("intermediate_size"), 512 / std::stoi(g));
      const double d = max_abs_diff(dense, logits_of(out));
      std::printf("[upcycle] split G=%s %s k=E: max |logit diff| %.3g\n", g.c_str(), seg.c_str(), d);
      EXPECT_LT(d, 1e-4);
    }
  }
  // Four copies of G = 2 segments, k = G = 2 (ties: copy 0's segments): still exact.
  const fs::path two = tmp / "split-copies";
  ASSERT_EQ(upcycle(kLlama, two, {"--to", "mixtral", "--experts", "8", "--top-k", "2", "--method", "split", "--segments", "2",
                                  "--router-std", "0"}).exit_code, 0);
  EXPECT_LT(max_abs_diff(dense, logits_of(two)), 1e-4);
  EXPECT_EQ(read_json(two / "moe_tool_report.json").at("upcycle").at("equals_dense_at_init").get<std::string>().rfind("yes", 0), 0u);
  // A random router weights the segments unequally: close, not equal.
  const fs::path rnd = tmp / "split-random-router";
  ASSERT_EQ(upcycle(kLlama, rnd, {"--to", "mixtral", "--experts", "2", "--top-k", "2", "--method", "split", "--segments", "2"}).exit_code, 0);
  const double dr = max_abs_diff(dense, logits_of(rnd));
  std::printf("[upcycle] split G=2 k=E random router: max |logit diff| %.3g\n", dr);
  EXPECT_GT(dr, 1e-3);
  const fs::path cube = tmp / "split-cube";
  ASSERT_EQ(upcycle(kLlama, cube, {"--to", "mixtral", "--experts", "2", "--top-k", "2", "--method", "split",
                                   "--segments", "2", "--split-scale", "cube", "--router-std", "0"}).exit_code, 0);
  const double dc = max_abs_diff(dense, logits_of(cube));
  std::printf("[upcycle] split G=2 cube scale: max |logit diff| %.3g\n", dc);
  EXPECT_GT(dc, 1e-3);
  // k < E: not every segment is selected, not exact.
  const fs::path part = tmp / "split-k1";
  ASSERT_EQ(upcycle(kLlama, part, {"--to", "mixtral", "--experts", "2", "--top-k", "1", "--method", "split", "--segments", "2"}).exit_code, 0);
  EXPECT_GT(max_abs_diff(dense, logits_of(part)), 1e-3);
}

// drop: each expert re-draws round(r * I) neurons (rows of w1/w3, columns of w2), the rest are
// the dense ones; experts differ; same seed, same bytes.
TEST(Upcycle, DropRedrawsTheRatioOfNeurons) {
  TempDir tmp("moe-upcycle");
  const fs::path a = tmp / "drop-a", b = tmp / "drop-b";
  for (const auto& o : {a, b})
    ASSERT_EQ(upcycle(kLlama, o, {"--to", "mixtral", "--experts", "4", "--top-k", "2", "--method", "drop", "--drop-ratio", "0.25", "--seed", "5"}).exit_code, 0);
  const TensorMap ta = read_tensors(a), tb = read_tensors(b), d = read_tensors(kLlama);
  EXPECT_EQ(first_difference(ta, tb), "");
  const std::string& dense = d.at("model.layers.1.mlp.gate_proj.weight").bytes;
  const size_t row = 128 * 2;  // H = 128 bf16
  std::vector<std::string> experts;
  for (int e = 0; e < 4; ++e) {
    const std::string& x = ta.at("model.layers.1.block_sparse_moe.experts." + std::to_string(e) + ".w1.weight").bytes;
    int changed = 0;
    for (size_t r = 0; r < 512; ++r) changed += x.compare(r * row, row, dense, r * row, row) != 0;
    EXPECT_EQ(changed, 128) << "expert " << e;  // 0.25 x 512
    experts.push_back(x);
  }
  EXPECT_NE(experts[0], experts[1]);
}

TEST(Upcycle, SeveralSources) {
  TempDir tmp("moe-upcycle");
  // A second "fine-tune": the dense fixture with one MLP weight changed.
  const fs::path ft = tmp / "ft";
  copy_folder(kLlama, ft);
  patch_tensor_bytes(ft / "model.safetensors", "model.layers.0.mlp.up_proj.weight", 0, std::string("\x40\x40\x40\x40", 4));
  const fs::path out = tmp / "two";
  const RunResult r = upcycle(kLlama, out, {"--to", "mixtral", "--experts", "4", "--top-k", "2", "--sources", ft.string(),
                                            "--attention-from", "mean"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const TensorMap t = read_tensors(out), d = read_tensors(kLlama), f = read_tensors(ft);
  EXPECT_EQ(t.at("model.layers.0.block_sparse_moe.experts.0.w3.weight").bytes, d.at("model.layers.0.mlp.up_proj.weight").bytes);
  EXPECT_EQ(t.at("model.layers.0.block_sparse_moe.experts.1.w3.weight").bytes, f.at("model.layers.0.mlp.up_proj.weight").bytes);
  EXPECT_EQ(t.at("model.layers.0.block_sparse_moe.experts.2.w3.weight").bytes, d.at("model.layers.0.mlp.up_proj.weight").bytes);
  // Mismatched sources are refused.
  expect_clean_failure(upcycle(kLlama, tmp / "bad", {"--to", "mixtral", "--experts", "4", "--top-k", "2", "--sources",
                                                     (kSynth / "mistral").string()}),
                       "--sources", tmp / "bad");
}

// mergekit-moe's hidden router and DUME's ridge router: each expert's own prompts go to it.
TEST(Upcycle, PromptRoutersRouteEachExpertsPromptsToIt) {
  TempDir tmp("moe-upcycle");
  const json prompts = {
      {"0", {{"positive", {"The court ruled that the contract was void and the defendant must pay damages.",
                           "The judge and the jury heard the lawyer argue the appeal."}},
             {"negative", {"She baked bread and a cake in the warm kitchen."}}}},
      {"1", {{"positive", {"She baked bread and a cake in the warm kitchen.", "Add the flour, sugar and butter, then stir."}},
             {"negative", {"The judge and the jury heard the lawyer argue the appeal."}}}},
  };
  write_file(tmp / "prompts.json", prompts.dump());
  for (const std::string router : {"hidden", "ridge"}) {
    SCOPED_TRACE(router);
    const fs::path out = tmp / router;
    const RunResult r = upcycle(kLlama, out, {"--to", "mixtral", "--experts", "2", "--top-k", "1", "--router", router,
                                              "--prompts", (tmp / "prompts.json").string()});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    // Copy experts: still exactly dense.
    EXPECT_LT(max_abs_diff(logits_of(kLlama), logits_of(out)), 1e-4);
    const json rep = read_json(out / "moe_tool_report.json");
    EXPECT_EQ(rep.at("upcycle").at("router"), router);
    // Mean router logits over each expert's positive prompts' tokens: highest for that expert,
    // in every layer (run the MoE and look at the router's input).
    auto ck = io::Checkpoint::open(io::Env::posix(), out);
    auto m = model::Model::load(ck);
    runtime::Forward f(m);
    struct Obs : runtime::Observer {
      bool wants_moe_trace() const override { return true; }
      void on_moe(int layer, const runtime::MoeTrace& t) override {
        if (mean.size() <= static_cast<size_t>(layer)) mean.resize(layer + 1, Eigen::VectorXd::Zero(t.logits.cols()));
        mean[layer] = t.logits.cast<double>().colwise().mean().transpose();
      }
      std::vector<Eigen::VectorXd> mean;
    };
    const auto tok = tokenizer::Tokenizer::load(out);
    // ridge (a least-squares classifier of the tokens): every prompt on its own; hidden (a mean
    // direction, mergekit-moe): each expert's prompts pooled, as the router row was built.
    for (int e = 0; e < 2; ++e) {
      std::vector<Eigen::VectorXd> pooled;
      int n = 0;
      for (const auto& text : prompts.at(std::to_string(e)).at("positive")) {
        const std::vector<int32_t> ids = tok.encode(text.get<std::string>(), false, false);
        ASSERT_FALSE(ids.empty());
        Obs obs;
        runtime::Observer* ob[] = {&obs};
        f.run(ids, static_cast<int64_t>(ids.size()), ob);
        pooled.resize(obs.mean.size(), Eigen::VectorXd::Zero(2));
        for (size_t l = 0; l < obs.mean.size(); ++l) {
          pooled[l] += obs.mean[l] * static_cast<double>(ids.size());
          Eigen::Index best = 0;
          obs.mean[l].maxCoeff(&best);
          if (router == "ridge") {
            EXPECT_EQ(best, e) << "layer " << l << " prompt " << text;
          }
        }
        n += static_cast<int>(ids.size());
      }
      ASSERT_EQ(pooled.size(), 4u);
      for (size_t l = 0; l < pooled.size(); ++l) {
        Eigen::Index best = 0;
        pooled[l].maxCoeff(&best);
        EXPECT_EQ(best, e) << "layer " << l << " expert " << e << " (" << n << " tokens)";
      }
    }
  }
}

TEST(Upcycle, BadInputExitsTwoWithOneLine) {
  TempDir tmp("moe-upcycle");
  const fs::path out = tmp / "out";
  expect_clean_failure(upcycle(kSrc / "data/models/mixtral-tiny", out, {"--to", "mixtral", "--experts", "4", "--top-k", "2"}),
                       "already a Mixture-of-Experts", out);
  expect_clean_failure(upcycle(kLlama, out, {"--to", "mixtral", "--experts", "2", "--top-k", "3"}), "--top-k 3 exceeds --experts 2", out);
  expect_clean_failure(upcycle(kLlama, out, {"--to", "mixtrl", "--experts", "2", "--top-k", "1"}), "did you mean \"mixtral\"", out);
  expect_clean_failure(upcycle(kSynth / "qwen2", out, {"--to", "mixtral", "--experts", "2", "--top-k", "1"}), "mixtral attention has no bias", out);
  expect_clean_failure(upcycle(kSynth / "qwen3", out, {"--to", "qwen2_moe", "--experts", "2", "--top-k", "1"}), "q/k norms", out);
  expect_clean_failure(upcycle(kLlama, out, {"--to", "qwen3_moe", "--experts", "2", "--top-k", "1"}), "no q/k norms", out);
  expect_clean_failure(upcycle(kLlama, out, {"--to", "mixtral", "--experts", "3", "--top-k", "1", "--method", "split", "--segments", "2"}),
                       "not a multiple", out);
  expect_clean_failure(upcycle(kLlama, out, {"--to", "mixtral", "--experts", "2", "--top-k", "1", "--router", "hidden"}), "--prompts", out);
  expect_clean_failure(upcycle(kLlama, out, {"--to", "mixtral", "--experts", "2", "--top-k", "1", "--method", "split", "--segmenting", "coact"}),
                       "--text", out);
  write_file(tmp / "empty.json", R"({"0": {"positive": []}, "1": ["x"]})");
  expect_clean_failure(upcycle(kLlama, out, {"--to", "mixtral", "--experts", "2", "--top-k", "1", "--router", "hidden", "--prompts",
                                             (tmp / "empty.json").string()}),
                       "empty prompt list", out);
  write_file(tmp / "nothing.json", R"({"0": [""], "1": ["x"]})");
  expect_clean_failure(upcycle(kLlama, out, {"--to", "mixtral", "--experts", "2", "--top-k", "1", "--router", "ridge", "--prompts",
                                             (tmp / "nothing.json").string()}),
                       "tokenizes to no tokens", out);
  write_file(tmp / "missing.json", R"({"0": ["law"]})");
  expect_clean_failure(upcycle(kLlama, out, {"--to", "mixtral", "--experts", "2", "--top-k", "1", "--router", "hidden", "--prompts",
                                             (tmp / "missing.json").string()}),
                       "no prompts for expert 1", out);
  expect_clean_failure(upcycle(kLlama, out, {"--experts", "2", "--top-k", "1"}), "--to", out);
  // A NaN in the dense MLP would be copied into every expert: refused, naming the tensor.
  const fs::path poisoned = tmp / "poisoned";
  copy_folder(kLlama, poisoned);
  patch_tensor_bytes(poisoned / "model.safetensors", "model.layers.1.mlp.down_proj.weight", 64, std::string("\xC0\x7F", 2));
  expect_clean_failure(upcycle(poisoned, out, {"--to", "mixtral", "--experts", "2", "--top-k", "1"}),
                       "model.layers.1.block_sparse_moe.experts.0.w2.weight: non-finite value at index 32", out);
  // Never into an input.
  const RunResult r = upcycle(kLlama, kLlama, {"--to", "mixtral", "--experts", "2", "--top-k", "1"});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
}

TEST(Upcycle, RecipeRunsAsTheCommandDoes) {
  TempDir tmp("moe-upcycle");
  const json recipe = {{"model", kLlama.string()},
                       {"seed", 3},
                       {"upcycle", {{"to", "mixtral"}, {"experts", 4}, {"top_k", 2}, {"method", "copy"}}},
                       {"output", {{"path", (tmp / "from-recipe").string()}}}};
  write_file(tmp / "r.json", recipe.dump());
  const RunResult r = run_tool({"-q", "run", (tmp / "r.json").string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  ASSERT_EQ(upcycle(kLlama, tmp / "from-cli", {"--to", "mixtral", "--experts", "4", "--top-k", "2", "--seed", "3"}).exit_code, 0);
  EXPECT_EQ(first_difference(read_tensors(tmp / "from-recipe"), read_tensors(tmp / "from-cli")), "");
  // Unknown keys of the section are named.
  json bad = recipe;
  bad["upcycle"]["expertz"] = 4;
  write_file(tmp / "bad.json", bad.dump());
  const RunResult rb = run_tool({"-q", "run", (tmp / "bad.json").string()});
  EXPECT_EQ(rb.exit_code, 2) << rb.describe();
  EXPECT_NE(rb.err.find("expertz"), std::string::npos) << rb.describe();
  // In a batch with a pass recipe, and sharded with a dtype change.
  const RunResult rbatch = run_tool({"-q", "run", (tmp / "r.json").string(), (kSrc / "recipes/prune-random.json").string(),
                                     "--dry-run", "--set", "output.path=" + (tmp / "batch").string()});
  EXPECT_EQ(rbatch.exit_code, 0) << rbatch.describe();
  const fs::path sharded = tmp / "sharded";
  ASSERT_EQ(upcycle(kLlama, sharded, {"--to", "mixtral", "--experts", "4", "--top-k", "2", "--dtype", "f32", "--max-shard-size", "3MB"}).exit_code, 0);
  EXPECT_TRUE(fs::exists(sharded / "model.safetensors.index.json"));
  EXPECT_EQ(read_json(sharded / "config.json").at("torch_dtype"), "float32");
  EXPECT_LT(max_abs_diff(logits_of(kLlama), logits_of(sharded)), 1e-4);
  // The shipped recipes validate (--dry-run).
  for (const char* f : {"upcycle-copy-mixtral.json", "upcycle-drop-mixtral.json"}) {
    const RunResult rd = run_tool({"-q", "run", (kSrc / "recipes" / f).string(), "--dry-run", "--set",
                                   "output.path=" + (tmp / (std::string("dry-") + f)).string()});
    EXPECT_EQ(rd.exit_code, 0) << f << ": " << rd.describe();
  }
}

// An upcycle recipe writing GGUF (output.format gguf): the upcycled checkpoint staged beside the
// file and converted as `moe-tool export` converts it, so the file is the export of the recipe's
// folder output, byte for byte, and nothing else is left. A dense GGUF as the source. Refused
// before any work: a main type whose blocks the dense model's rows do not fill (checked on the
// dense model), a format other than hf and gguf, gguf without output.type; refused once staged,
// nothing written: a rule for the experts' rows (hidden 128) that they do not fill.
TEST(Upcycle, RecipeWritesGguf) {
  TempDir tmp("moe-upcycle-gguf");
  const json up = {{"to", "mixtral"}, {"experts", 4}, {"top_k", 2}, {"method", "copy"}};
  auto recipe = [&](const json& model, const json& output) {
    return json{{"model", model}, {"seed", 3}, {"upcycle", up}, {"output", output}};
  };
  auto run = [&](const std::string& name, const json& r) {
    write_file(tmp / (name + ".json"), r.dump());
    return run_tool({"-q", "run", (tmp / (name + ".json")).string()});
  };
  const fs::path file = tmp / "u.gguf", folder = tmp / "u", again = tmp / "again.gguf";
  const RunResult r = run("g", recipe(kLlama.string(), {{"path", file.string()}, {"format", "gguf"}, {"type", "q8_0"}}));
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  ASSERT_EQ(run("f", recipe(kLlama.string(), {{"path", folder.string()}})).exit_code, 0);
  ASSERT_EQ(run_tool({"-q", "export", folder.string(), again.string(), "--type", "q8_0"}).exit_code, 0);
  EXPECT_EQ(read_file(file), read_file(again)) << "not the export of the recipe's folder output";
  std::set<std::string> left;
  for (const auto& e : fs::directory_iterator(tmp.path())) left.insert(e.path().filename().string());
  EXPECT_EQ(left, (std::set<std::string>{"again.gguf", "f.json", "g.json", "u", "u.gguf"}));
  // From the dense model's GGUF export: the same upcycled model.
  const fs::path dense = tmp / "dense.gguf", from_gguf = tmp / "from-gguf.gguf";
  ASSERT_EQ(run_tool({"-q", "export", kLlama.string(), dense.string(), "--type", "f32"}).exit_code, 0);
  ASSERT_EQ(run("d", recipe(dense.string(), {{"path", from_gguf.string()}, {"format", "gguf"}, {"type", "f32"}})).exit_code, 0);
  EXPECT_LT(max_abs_diff(logits_of(kLlama), logits_of(from_gguf)), 1e-4);
  // Co-activation segments from a GGUF source: its tokenizer rebuilt from the file's keys, the same
  // segments as from the folder.
  const std::vector<std::string> coact = {"--to", "mixtral", "--experts", "4", "--top-k", "4", "--method", "split",
                                          "--segments", "2", "--segmenting", "coact", "--router-std", "0",
                                          "--text", (kSrc / "data/text/heldout.txt").string()};
  ASSERT_EQ(upcycle(dense, tmp / "coact-gguf", coact).exit_code, 0);
  ASSERT_EQ(upcycle(kLlama, tmp / "coact-folder", coact).exit_code, 0);
  EXPECT_LT(max_abs_diff(logits_of(tmp / "coact-folder"), logits_of(tmp / "coact-gguf")), 1e-4);
  // A quantized dense GGUF: its blocks are not float weights to copy: refused, also by --dry-run.
  const fs::path q8 = tmp / "q8.gguf";
  ASSERT_EQ(run_tool({"-q", "export", kLlama.string(), q8.string(), "--type", "q8_0"}).exit_code, 0);
  for (const std::vector<std::string>& extra : {std::vector<std::string>{}, std::vector<std::string>{"--dry-run"}})
    expect_clean_failure(upcycle(q8, tmp / "q8-up", [&] {
                           std::vector<std::string> a = {"--to", "mixtral", "--experts", "4", "--top-k", "2"};
                           a.insert(a.end(), extra.begin(), extra.end());
                           return a;
                         }()),
                         "is stored as codes ('gguf-q8_0'): upcycle takes float weights: write the model dense first with `moe-tool convert",
                         tmp / "q8-up");
  // Refusals: one line, exit 2, nothing written.
  const fs::path bad = tmp / "bad.gguf";
  const std::vector<std::pair<json, std::string>> cases = {
      {{{"path", bad.string()}, {"format", "gguf"}, {"type", "q4_k"}},
       "output.format gguf: " + kLlama.string() + ": blk.0.attn_k.weight: rows of 128 values are not a multiple of the q4_k block size 256"},
      {{{"path", bad.string()}, {"format", "gguf"}}, "output.type: missing (required with output.format gguf"},
      {{{"path", bad.string()}, {"format", "gptq"}}, "output.format: 'gptq': an upcycle recipe writes hf or gguf"},
      {{{"path", bad.string()}, {"format", "gguf"}, {"type", "q8_0"}, {"tensor_type", "ffn_up_exps=q4_k"}},
       "the upcycled model staged for " + bad.string() + ": blk.0.ffn_up_exps.weight: rows of 128 values are not a multiple of the q4_k block size 256"},
  };
  for (const auto& [output, message] : cases) {
    SCOPED_TRACE(output.dump());
    write_file(tmp / "bad.json", recipe(kLlama.string(), output).dump());
    ::moe::test::expect_clean_failure(run_tool({"-q", "run", (tmp / "bad.json").string()}), message);
    EXPECT_FALSE(fs::exists(bad));
    for (const auto& e : fs::directory_iterator(tmp.path()))
      EXPECT_EQ(e.path().filename().string().find("moe-tool-tmp"), std::string::npos) << e.path();
  }
}

}  // namespace
}  // namespace moe::test
