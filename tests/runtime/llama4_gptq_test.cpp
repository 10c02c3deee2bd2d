// quantize --method gptq on llama4_text, whose router scales each chosen expert's input
// (routed_in = x * sigmoid(router logit)): an expert's Hessians are of what it receives, and an
// expert below the token threshold is topped up from what it would receive if routed, x_t times
// sigmoid(router_e · x_t) over every calibration token t. Checked by recomputing those Hessians
// here from the forward's MoE traces on the calibration windows and running quant::gptq on them:
// the weights written are the same bits, and the unscaled inputs' Hessians would not give them.
// Plus the CLI end to end (int4, int3, int8; written back in the fused layout, and eval runs on it)
// and the passes still refused for this router, each with one line and nothing written.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"
#include "pipeline/calibration_text.h"
#include "quant/codec.h"
#include "quant/gptq.h"
#include "reference_golden.h"
#include "runtime/forward.h"
#include "runtime/moe_block.h"
#include "runtime_test_util.h"
#include "support/ckpt_util.h"
#include "support/cli_expect.h"
#include "support/run.h"

namespace moe::test {
namespace {
namespace llama4_gptq {  // (tests/runtime/*.cpp are compiled in unity batches: names apart from llama4_test.cpp's)

namespace fs = std::filesystem;
using runtime::MatrixRM;
using nlohmann::json;

const fs::path& llama4_fixture() {
  static const fs::path p = source_dir() / "data/llama4-tiny";
  return p;
}

constexpr int kExperts = 8, kHidden = 64, kWidth = 16;

// The MoE traces of every MoE layer: block inputs, router logits, the choice, each expert's
// routed tokens and intermediate activations.
struct TraceKeeper : runtime::Observer {
  struct Kept {
    MatrixRM x, logits;
    runtime::RoutingResult routing;
    std::vector<std::vector<int32_t>> tokens;
    std::vector<MatrixRM> h;
  };
  std::map<int, Kept> layers;
  bool wants_moe_trace() const override { return true; }
  void on_moe(int l, const runtime::MoeTrace& t) override { layers[l] = {t.x, t.logits, t.routing, t.tokens, t.h}; }
};

// G += factor · aᵀa in f64 (as the pass accumulates its Grams and top-ups).
void add_gram(Eigen::MatrixXd& g, const MatrixRM& a, double factor = 1.0) {
  const Eigen::MatrixXd ad = a.cast<double>();
  if (!g.size()) g = Eigen::MatrixXd::Zero(ad.cols(), ad.cols());
  if (factor == 1.0) g.noalias() += ad.transpose() * ad;
  else g.noalias() += factor * (ad.transpose() * ad);
}

// Expert e's matrices of a fused llama4 layer: gate [I,H] (the first half of gate_up_proj[e]'s
// columns, [in, out] stored), down [H,I] (down_proj[e] transposed), as f32.
MatrixRM fused_gate(const TensorBytes& gu, int e) {
  MatrixRM w(kWidth, kHidden);
  for (int r = 0; r < kWidth; ++r)
    for (int h = 0; h < kHidden; ++h) w(r, h) = bf16_at(gu.bytes, (int64_t{e} * kHidden + h) * 2 * kWidth + r);
  return w;
}
MatrixRM fused_down(const TensorBytes& dn, int e) {
  MatrixRM w(kHidden, kWidth);
  for (int h = 0; h < kHidden; ++h)
    for (int i = 0; i < kWidth; ++i) w(h, i) = bf16_at(dn.bytes, (int64_t{e} * kWidth + i) * kHidden + h);
  return w;
}

// GPTQ of w on H with the pass's defaults (damp 0.01, block 128, no act order), dequantized and
// rounded to bf16 as --materialize writes it.
MatrixRM gptq_bf16(const MatrixRM& w, const Eigen::MatrixXd& H, const std::string& codec) {
  quant::GptqOptions o;
  o.damp = 0.01;
  o.block = 128;
  o.act_order = false;
  auto enc = quant::gptq(w.data(), w.rows(), w.cols(), H.data(), quant::parse_codec(codec), o, nullptr);
  const std::vector<float> v = core::Tensor::encoded(std::move(enc), core::DType::BF16).to_f32();
  MatrixRM out(w.rows(), w.cols());
  for (int64_t i = 0; i < out.size(); ++i) out.data()[i] = core::bf16_to_f32(core::f32_to_bf16(v[static_cast<size_t>(i)]));
  return out;
}

// The report's entry of `what` ("expert 7 gate") in MoE layer l.
json matrix_entry(const json& rep, int l, const std::string& what) {
  for (const json& L : rep.at("layers"))
    if (L.value("layer", -1) == l)
      for (const json& m : L.at("passes").at(0).at("matrices"))
        if (m.at("matrix") == what) return m;
  ADD_FAILURE() << "no report entry for layer " << l << " " << what;
  return json::object();
}

// Router rows 6 and 7 of layer 1 made equal: the top-1 choice of the tie is the lower index, so
// no token reaches expert 7 there, and its Hessians are the top-up alone. quantize gptq int4 with
// --no-propagate (every layer's inputs are the input model's, which the forward here computes)
// and --materialize (the fused layout written dense). For each MoE layer and expert: the gate
// Hessian Σ_routed (x s)(x s)ᵀ + (64 − n)/N Σ_t (x_t s_te)(x_t s_te)ᵀ with s_te = sigmoid(logit_te)
// (threshold 64, the gate's input width), the down Hessian likewise of the intermediates
// (threshold 16), then GPTQ on them gives the bits written; GPTQ on the unscaled inputs' Hessians
// does not (for some expert). The router (--router int8) reads the unscaled inputs: its Hessian is
// Σ_t x_t x_tᵀ.
TEST(Llama4Gptq, HessiansAreOfTheScaledInputs) {
  TempDir tmp;
  const fs::path in = tmp.path() / "in", out = tmp.path() / "q";
  copy_folder(llama4_fixture(), in);
  const std::string router = "model.layers.1.feed_forward.router.weight";
  const std::string rb = read_tensors(llama4_fixture()).at(router).bytes;
  const size_t row = rb.size() / kExperts;
  patch_tensor_bytes(in / "model.safetensors", router, 7 * row, rb.substr(6 * row, row));
  const RunResult r = run_tool({"-q", "quantize", in.string(), out.string(), "--method", "gptq", "--codec", "int4", "--text",
                                heldout_text(), "--ctx", "32", "--windows", "2", "--no-propagate", "--materialize", "--router", "int8"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json rep = read_json(out / "moe_tool_report.json");

  pipeline::CalibrationSpec spec;
  spec.text = heldout_text();
  spec.ctx = 32;
  spec.windows = 2;
  const pipeline::CalibrationTokens ct = pipeline::calibration_tokens(in, spec);
  auto lm = load_model(in);
  runtime::Forward fwd(lm->model);
  TraceKeeper keep;
  runtime::Observer* obs[] = {&keep};
  fwd.run(ct.tokens, ct.ctx, obs);
  ASSERT_EQ(keep.layers.size(), 2u);

  const TensorMap src = read_tensors(in), got = read_tensors(out);
  int unscaled_differs = 0;
  for (const auto& [l, t] : keep.layers) {
    SCOPED_TRACE("layer " + std::to_string(l));
    const std::string p = "model.layers." + std::to_string(l) + ".feed_forward.experts.";
    const int64_t N = t.x.rows();
    ASSERT_EQ(N, 64);
    {
      Eigen::MatrixXd Hr;
      add_gram(Hr, t.x);
      const std::string name = "model.layers." + std::to_string(l) + ".feed_forward.router.weight";
      const std::string codec = matrix_entry(rep, l, "router").at("codec");
      EXPECT_EQ(codec, "int8:g128:asym");
      MatrixRM w(kExperts, kHidden), written(kExperts, kHidden);
      for (int64_t i = 0; i < w.size(); ++i) {
        w.data()[i] = bf16_at(src.at(name).bytes, i);
        written.data()[i] = bf16_at(got.at(name).bytes, i);
      }
      EXPECT_EQ(written, gptq_bf16(w, Hr, codec)) << "router";
    }
    for (int e = 0; e < kExperts; ++e) {
      SCOPED_TRACE("expert " + std::to_string(e));
      const int64_t n = static_cast<int64_t>(t.tokens[e].size());
      if (l == 1 && e == 7) ASSERT_EQ(n, 0);
      // What e receives on its routed tokens (scaled by their routing weight), and on every token.
      MatrixRM xr(n, kHidden), xr_plain(n, kHidden), xa = t.x;
      for (int64_t j = 0; j < n; ++j) {
        const int32_t tok = t.tokens[e][j];
        float w = 0;
        for (int64_t s = 0; s < t.routing.ids.cols(); ++s)
          if (t.routing.ids(tok, s) == e) w = t.routing.weights(tok, s);
        EXPECT_FLOAT_EQ(w, static_cast<float>(1.0 / (1.0 + std::exp(-double(t.logits(tok, e))))));
        xr_plain.row(j) = t.x.row(tok);
        xr.row(j) = t.x.row(tok) * w;
      }
      for (int64_t tok = 0; tok < N; ++tok)
        xa.row(tok) *= static_cast<float>(1.0 / (1.0 + std::exp(-double(t.logits(tok, e)))));
      const runtime::MlpWeights we = runtime::convert_mlp(lm->model.layers().at(l).moe->experts.at(e));
      Eigen::MatrixXd Hg, Hd, Hg_plain;
      add_gram(Hg, xr);
      add_gram(Hg_plain, xr_plain);
      add_gram(Hd, t.h[e]);
      if (n < kHidden) {
        add_gram(Hg, xa, double(kHidden - n) / double(N));
        add_gram(Hg_plain, t.x, double(kHidden - n) / double(N));
      }
      if (n < kWidth) add_gram(Hd, runtime::mlp_hidden(we, xa), double(kWidth - n) / double(N));
      const std::string who = "expert " + std::to_string(e);
      const json mg = matrix_entry(rep, l, who + " gate"), md = matrix_entry(rep, l, who + " down");
      EXPECT_EQ(mg.at("tokens"), n);
      EXPECT_EQ(mg.at("method"), "gptq");
      if (n < kHidden)
        EXPECT_NE(mg.at("hessian").get<std::string>().find("scaled by the expert's score"), std::string::npos) << mg.dump();
      const std::string codec = mg.at("codec");
      const MatrixRM want_gate = gptq_bf16(fused_gate(src.at(p + "gate_up_proj"), e), Hg, codec);
      const MatrixRM got_gate = fused_gate(got.at(p + "gate_up_proj"), e);
      EXPECT_EQ(got_gate, want_gate) << "gate: max |diff| " << (got_gate - want_gate).cwiseAbs().maxCoeff();
      const MatrixRM want_down = gptq_bf16(fused_down(src.at(p + "down_proj"), e), Hd, md.at("codec"));
      const MatrixRM got_down = fused_down(got.at(p + "down_proj"), e);
      EXPECT_EQ(got_down, want_down) << "down: max |diff| " << (got_down - want_down).cwiseAbs().maxCoeff();
      if (gptq_bf16(fused_gate(src.at(p + "gate_up_proj"), e), Hg_plain, codec) != got_gate) ++unscaled_differs;
    }
  }
  EXPECT_GT(unscaled_differs, 0) << "the unscaled inputs' Hessians give the same codes: the check cannot tell them apart";
  std::printf("[ llama4 gptq ] experts whose gate codes differ with the unscaled Hessians: %d of %d\n", unscaled_differs,
              2 * kExperts);
}

// int4, int3 (--min-tokens 4: only the experts under 4 routed tokens topped up) and int8 GPTQ
// run on the fixture with calibration text: the fused layout is written back dense
// (--materialize), its shapes unchanged and the experts' bytes changed, and eval runs.
TEST(Llama4Gptq, QuantizeWritesTheFusedLayoutAndRuns) {
  TempDir tmp;
  const TensorMap in = read_tensors(llama4_fixture());
  for (const std::string codec : {"int4", "int3", "int8"}) {
    SCOPED_TRACE(codec);
    const fs::path out = tmp.path() / codec;
    std::vector<std::string> more = {"--materialize"};
    if (codec == "int3") more.insert(more.end(), {"--min-tokens", "4"});
    const RunResult r = run_with_calibration(
        {"-q", "quantize", llama4_fixture().string(), out.string(), "--method", "gptq", "--codec", codec}, more);
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    const TensorMap got = read_tensors(out);
    for (const char* name : {"model.layers.1.feed_forward.experts.gate_up_proj", "model.layers.3.feed_forward.experts.down_proj"}) {
      EXPECT_EQ(got.at(name).shape, in.at(name).shape) << name;
      EXPECT_NE(got.at(name).bytes, in.at(name).bytes) << name;
    }
    expect_eval_runs(out);
  }
}

// The recipe form, after a pass that changes the experts (prune reap to 6, then gptq with
// min_tokens 8): the second pass's Grams and top-ups are of the 6 experts left, routed by the
// pruned router; the fused layout is written with 6 experts and runs.
TEST(Llama4Gptq, RecipeAfterPrune) {
  TempDir tmp;
  const fs::path recipe = tmp.path() / "r.json", out = tmp.path() / "out";
  const json j = {{"model", llama4_fixture().string()},
                  {"calibration", {{"text", heldout_text()}, {"ctx", 32}, {"windows", 2}, {"routed_only", true}}},
                  {"passes", {{{"pass", "prune"}, {"method", "reap"}, {"keep", 6}},
                              {{"pass", "quantize"}, {"method", "gptq"}, {"codec", "int4"}, {"min_tokens", 8}}}},
                  {"output", {{"path", out.string()}, {"materialize", true}}}};
  write_file(recipe, j.dump(2));
  const RunResult r = run_tool({"-q", "run", recipe.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(read_tensors(out).at("model.layers.3.feed_forward.experts.gate_up_proj").shape, (core::Shape{6, 64, 32}));
  int topped = 0;
  const json rep = read_json(out / "moe_tool_report.json");
  for (const json& L : rep.at("layers"))
    for (const json& p : L.at("passes"))
      for (const json& m : p.value("matrices", json::array()))
        if (m.value("hessian", std::string()).find("scaled by the expert's score") != std::string::npos) ++topped;
  EXPECT_GT(topped, 0) << "no expert under 8 routed tokens topped up with its scaled inputs";
  expect_eval_runs(out);
}

// What still runs the experts on the unscaled block inputs: refused with one line naming the
// pass and the family, before any work (nothing written). (prune --novices is refused earlier by
// the fused layout, which has no place for a constant expert.)
TEST(Llama4Gptq, PassesOnUnscaledBlockInputsRefused) {
  TempDir tmp;
  const std::string model = llama4_fixture().string();
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"quantize", "--method", "gptq", "--codec", "int4", "--avg-bits", "4"}, "quantize gptq with avg_bits"},
      {{"quantize", "--method", "gptq", "--codec", "int4", "--smooth"}, "quantize gptq with smooth"},
      {{"quantize", "--method", "rtn", "--codec", "int4", "--align-router"}, "quantize rtn with align_router"},
      {{"prune", "--method", "enumerate", "--keep", "6"}, "prune enumerate"},
      {{"prune", "--method", "search", "--keep", "6"}, "prune search"},
      {{"merge", "--method", "msmoe", "--experts", "6", "--router", "refit", "--routed-only"}, "merge msmoe with router refit"},
  };
  for (const auto& [args, what] : cases) {
    SCOPED_TRACE(what);
    const fs::path out = tmp.path() / "out";
    std::vector<std::string> a = {"-q", args[0], model, out.string()};
    a.insert(a.end(), args.begin() + 1, args.end());
    const RunResult r = run_with_calibration(a, args[0] == "quantize" ? std::vector<std::string>{"--materialize"} : std::vector<std::string>{});
    EXPECT_EQ(r.exit_code, 2) << r.describe();
    EXPECT_NE(r.err.find(what + " runs the experts on the MoE block's inputs, which llama4_text's router scales per expert"),
              std::string::npos)
        << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_FALSE(fs::exists(out));
  }
}

}  // namespace llama4_gptq
}  // namespace
}  // namespace moe::test
