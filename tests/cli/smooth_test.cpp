// quantize --smooth and --align-router through the CLI on the trained mixtral-tiny fixture: the
// smoothed float model computes the input's logits, smoothing changes what int4 codes are
// written, router alignment raises the calibration tokens' top-k agreement where quantization
// lowered it and leaves the routers alone when nothing was quantized, and the refusals.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "model/model.h"
#include "runtime/forward.h"
#include "support/ckpt_util.h"
#include "support/cli_expect.h"
#include "support/paths.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

model::Model smooth_load(const io::Checkpoint& ck) { return model::Model::load(ck); }

std::vector<int32_t> smooth_tokens() {
  std::vector<int32_t> tokens(64);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 977 + 13) % 4000);
  return tokens;
}

RunResult smooth_quantize(const fs::path& out, std::vector<std::string> extra) {
  std::vector<std::string> args = {"-q", "quantize", kModel.string(), out.string(), "--text", kCalib.string(),
                                   "--ctx", "64", "--windows", "8"};
  args.insert(args.end(), extra.begin(), extra.end());
  return run_tool(args);
}

// Nothing quantized, every MoE layer smoothed: the norm weights and the readers' columns change,
// the logits do not (the scales are powers of two, so the bf16 fold is exact).
TEST(Smooth, SmoothedFloatModelComputesTheInputLogits) {
  TempDir tmp;
  const RunResult r = smooth_quantize(tmp / "s", {"--method", "rtn", "--experts", "keep", "--smooth"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto ci = io::Checkpoint::open(io::Env::posix(), kModel);
  const auto cs = io::Checkpoint::open(io::Env::posix(), tmp / "s");
  const model::Model in = smooth_load(ci), sm = smooth_load(cs);
  int changed_norms = 0;
  for (size_t l = 0; l < in.layers().size(); ++l) {
    const auto& a = in.layers()[l];
    const auto& b = sm.layers()[l];
    changed_norms += a.find("post_attn_norm")->to_f32() != b.find("post_attn_norm")->to_f32();
    EXPECT_EQ(a.find("post_attn_norm")->dtype(), b.find("post_attn_norm")->dtype());
    EXPECT_EQ(a.moe->router.dtype(), b.moe->router.dtype());
    EXPECT_EQ(a.moe->experts[0].up.encoding(), nullptr);
    EXPECT_EQ(b.moe->experts[0].up.encoding(), nullptr);
  }
  EXPECT_EQ(changed_norms, static_cast<int>(in.layers().size()));
  const json report = read_json(tmp / "s" / "moe_tool_report.json");
  const json& s0 = report.at("layers").at(0).at("passes").at(0).at("smooth");
  EXPECT_GT(s0.at("scaled_channels").get<int>(), 0);
  EXPECT_EQ(s0.at("readers").get<int>(), 8 + 1);  // 8 experts and the router

  const std::vector<int32_t> tokens = smooth_tokens();
  const runtime::MatrixRM li = runtime::Forward(in).run(tokens, 32);
  const runtime::MatrixRM ls = runtime::Forward(sm).run(tokens, 32);
  EXPECT_LE((li - ls).cwiseAbs().maxCoeff(), 1e-5f * li.cwiseAbs().maxCoeff());
}

// The families with a shared expert (and its gate row), a sigmoid router with a choice bias and
// dense first layers, and the other norms: the smoothed, unquantized synthetic model computes the
// input's logits, and its MoE layers' norms did change.
TEST(Smooth, FoldIsExactAcrossFamilies) {
  for (const std::string family : {"qwen2_moe", "deepseek_v3", "olmoe", "qwen3_moe", "deepseek_v2"}) {
    TempDir tmp;
    write_synth(make_synth(family), tmp / "in", {.tokenizer = true});
    const RunResult r = run_tool({"-q", "quantize", (tmp / "in").string(), (tmp / "out").string(), "--method", "rtn",
                                  "--experts", "keep", "--shared", "keep", "--dense", "keep", "--smooth", "--text",
                                  kCalib.string(), "--ctx", "16", "--windows", "4"});
    ASSERT_EQ(r.exit_code, 0) << family << ": " << r.describe();
    const auto ci = io::Checkpoint::open(io::Env::posix(), tmp / "in");
    const auto co = io::Checkpoint::open(io::Env::posix(), tmp / "out");
    const model::Model in = smooth_load(ci), out = smooth_load(co);
    int changed = 0;
    for (size_t l = 0; l < in.layers().size(); ++l) {
      const bool differs = in.layers()[l].find("post_attn_norm")->to_f32() != out.layers()[l].find("post_attn_norm")->to_f32();
      changed += differs;
      if (!in.layers()[l].moe) {
        EXPECT_FALSE(differs) << family << " dense layer " << l;
      }
    }
    EXPECT_GT(changed, 0) << family;
    std::vector<int32_t> tokens(32);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 37 + 5) % 64);
    const runtime::MatrixRM li = runtime::Forward(in).run(tokens, 16), lo = runtime::Forward(out).run(tokens, 16);
    EXPECT_LE((li - lo).cwiseAbs().maxCoeff(), 1e-5f * li.cwiseAbs().maxCoeff()) << family;
  }
}

// int4 RTN with and without smoothing: different codes (smoothing is not a no-op), and both
// models stay close to the input.
TEST(Smooth, SmoothingChangesTheQuantizedWeights) {
  TempDir tmp;
  ASSERT_EQ(smooth_quantize(tmp / "plain", {"--method", "rtn", "--codec", "int4"}).exit_code, 0);
  const RunResult r = smooth_quantize(tmp / "smooth", {"--method", "rtn", "--codec", "int4", "--smooth", "--smooth-alpha", "0.5"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto cp = io::Checkpoint::open(io::Env::posix(), tmp / "plain");
  const auto cs = io::Checkpoint::open(io::Env::posix(), tmp / "smooth");
  const model::Model p = smooth_load(cp), s = smooth_load(cs);
  const auto& ep = p.layers()[1].moe->experts[3];
  const auto& es = s.layers()[1].moe->experts[3];
  ASSERT_NE(es.gate.encoding(), nullptr);
  EXPECT_NE(ep.gate.to_f32(), es.gate.to_f32());
  EXPECT_EQ(ep.down.to_f32(), es.down.to_f32());  // down reads the expert's own intermediate: untouched
  const json params = read_json(tmp / "smooth" / "moe_tool_report.json").at("passes").at(0).at("params");
  EXPECT_EQ(params.at("smooth"), true);
  EXPECT_EQ(params.at("smooth_alpha"), 0.5);
}

// Ternary RTN experts change the later layers' inputs enough to move some tokens' top-2: the
// re-fitted router wins back agreement in at least one layer, and every accepted layer reports a
// rise. With nothing quantized, agreement is already 1 and no router changes.
TEST(Smooth, AlignRouterRaisesAgreementOnlyWhereQuantizationLoweredIt) {
  TempDir tmp;
  const RunResult r = smooth_quantize(tmp / "a", {"--method", "rtn", "--codec", "ternary", "--align-router"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json report = read_json(tmp / "a" / "moe_tool_report.json");
  int accepted = 0;
  for (const auto& l : report.at("layers")) {
    const json& a = l.at("passes").at(0).at("align_router");
    const double before = a.at("topk_agreement_before"), after = a.at("topk_agreement_after");
    EXPECT_EQ(a.at("tokens").get<int64_t>(), 8 * 64);
    if (a.at("accepted").get<bool>()) {
      ++accepted;
      EXPECT_GT(after, before);
    }
    if (l.at("layer") == 0) {
      EXPECT_EQ(before, 1.0);  // nothing before layer 0 was quantized
    }
  }
  EXPECT_GE(accepted, 1);

  const RunResult k = smooth_quantize(tmp / "k", {"--method", "rtn", "--experts", "keep", "--align-router"});
  ASSERT_EQ(k.exit_code, 0) << k.describe();
  const auto ci = io::Checkpoint::open(io::Env::posix(), kModel);
  const auto ck = io::Checkpoint::open(io::Env::posix(), tmp / "k");
  const model::Model in = smooth_load(ci), kept = smooth_load(ck);
  for (size_t l = 0; l < in.layers().size(); ++l)
    EXPECT_EQ(in.layers()[l].moe->router.to_f32(), kept.layers()[l].moe->router.to_f32()) << "layer " << l;
  const json k_report = read_json(tmp / "k" / "moe_tool_report.json");  // named: the loop must not outlive it
  ASSERT_FALSE(k_report.at("layers").empty());
  for (const auto& l : k_report.at("layers")) {
    EXPECT_EQ(l.at("passes").at(0).at("align_router").at("topk_agreement_before").get<double>(), 1.0);
    EXPECT_FALSE(l.at("passes").at(0).at("align_router").at("accepted").get<bool>());
  }
}

TEST(Smooth, DryRunShowsTheOptionsAndTheReferenceStream) {
  TempDir tmp;
  const RunResult r = smooth_quantize(tmp / "d", {"--method", "gptq", "--smooth", "--align-router", "--dry-run", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_FALSE(fs::exists(tmp / "d"));
  const json s = json::parse(r.out);
  EXPECT_EQ(s.at("passes").at(0).at("params").at("smooth"), true);
  EXPECT_EQ(s.at("passes").at(0).at("params").at("align_router"), true);
  EXPECT_NE(s.at("computes").dump().find("through the input model too"), std::string::npos) << s.at("computes").dump();
}

TEST(Smooth, BadInputFailsCleanly) {
  TempDir tmp;
  const std::string m = kModel.string(), c = kCalib.string();
  expect_clean_failure(run_tool({"quantize", m, (tmp / "a").string(), "--method", "rtn", "--smooth-alpha", "0.3", "--text", c}),
                       "--smooth-alpha: applies to smooth");
  expect_clean_failure(run_tool({"quantize", m, (tmp / "b").string(), "--method", "rtn", "--smooth", "--smooth-alpha", "1.5",
                                 "--text", c}),
                       "--smooth-alpha");
  expect_clean_failure(run_tool({"quantize", m, (tmp / "c").string(), "--method", "rtn", "--smooth"}), "text");
  expect_clean_failure(run_tool({"quantize", m, (tmp / "d").string(), "--method", "rtn", "--align-router", "--router", "int8",
                                 "--text", c}),
                       "give router keep");
  // The setting named as the user gave it: the flag alone, or the recipe key with its value.
  expect_clean_failure(run_tool({"quantize", m, (tmp / "e").string(), "--method", "rtn", "--align-router", "--no-propagate",
                                 "--text", c}),
                       "the same without propagation (--no-propagate): run with propagation");
  const fs::path recipe = tmp / "no-propagate.json";
  write_file(recipe, nlohmann::json{{"model", m},
                                    {"calibration", {{"text", c}, {"propagate", false}}},
                                    {"passes", {{{"pass", "quantize"}, {"method", "rtn"}, {"align_router", true}}}},
                                    {"output", {{"path", (tmp / "e2").string()}}}}
                         .dump());
  expect_clean_failure(run_tool({"run", recipe.string()}),
                       "no-propagate.json: passes[0]: quantize rtn compares each layer on the compressed model's inputs "
                       "with the input model's, which are the same without propagation (calibration.propagate: false)");
  EXPECT_FALSE(fs::exists(tmp / "e2"));
  expect_clean_failure(run_tool({"quantize", m, (tmp / "f").string(), "--method", "rtn", "--align-router", "--tensor-type",
                                 "\\.gate\\.weight=int8", "--text", c}),
                       "keep the router");
  // Experts already stored as int4 codes and kept: scaling their columns would write them dense.
  ASSERT_EQ(run_tool({"-q", "quantize", m, (tmp / "int4").string(), "--method", "rtn"}).exit_code, 0);
  expect_clean_failure(run_tool({"quantize", (tmp / "int4").string(), (tmp / "g").string(), "--method", "rtn", "--smooth",
                                 "--experts", "keep", "--text", c}),
                       "is stored encoded (intN) and kept");
  for (const char* d : {"a", "b", "c", "d", "e", "f", "g"}) EXPECT_FALSE(fs::exists(tmp / d)) << d;
}

}  // namespace
}  // namespace moe::test
