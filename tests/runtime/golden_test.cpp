// Forward vs. the PyTorch reference (data/scripts/reference.py) on the fixture checkpoints:
// logits at chosen positions (max abs diff <= 1e-3), argmax at every position, residual stream
// after every layer, routing ids/weights/logits of the first tokens, perplexity within 0.1%.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "runtime/forward.h"
#include "runtime_test_util.h"

namespace moe::test {
namespace {

using runtime::MatrixRM;

// Records the residual stream after each layer and the MoE routing.
struct Recorder : runtime::Observer {
  std::vector<MatrixRM> residual;  // [0] = embedding output, [l+1] = after layer l
  std::map<int, runtime::RoutingResult> routing;
  std::map<int, MatrixRM> router_logits;
  bool wants_moe_trace() const override { return true; }
  void on_layer_input(int l, const MatrixRM& X) override {
    if (l == 0) residual.push_back(X);
  }
  void on_layer_output(int, const MatrixRM& X) override { residual.push_back(X); }
  void on_moe(int l, const runtime::MoeTrace& t) override {
    routing[l] = t.routing;
    router_logits[l] = t.logits;
  }
};

double max_abs_diff(const float* a, const nlohmann::json& b) {
  double m = 0;
  for (size_t i = 0; i < b.size(); ++i) m = std::max(m, std::abs(double(a[i]) - b[i].get<double>()));
  return m;
}

void check_model(const std::string& rel_dir, const std::string& golden_name) {
  const auto gpath = source_dir() / "data" / "golden" / golden_name;
  nlohmann::json g = read_json_or_fail(gpath);
  ASSERT_FALSE(g.is_null());
  auto lm = load_model(source_dir() / rel_dir);
  runtime::Forward fwd(lm->model);

  const auto& L = g["logits"];
  const int64_t T = L.at("ctx").get<int64_t>();
  std::vector<int32_t> tokens;
  for (const auto& row : L.at("tokens"))
    for (const auto& t : row) tokens.push_back(t.get<int32_t>());
  Recorder rec;
  runtime::Observer* obs[] = {&rec};
  MatrixRM logits = fwd.run(tokens, T, obs);
  const int64_t V = logits.cols();

  // Logits at the chosen positions.
  double worst = 0;
  for (size_t w = 0; w < L.at("values").size(); ++w)
    for (size_t pi = 0; pi < L.at("positions").size(); ++pi) {
      const int64_t p = L.at("positions")[pi].get<int64_t>();
      const auto& ref = L.at("values")[w][pi];
      ASSERT_EQ(static_cast<int64_t>(ref.size()), V);
      worst = std::max(worst, max_abs_diff(logits.data() + (w * T + p) * V, ref));
    }
  EXPECT_LE(worst, 1e-3) << golden_name << ": max abs logit difference";
  std::printf("[ %s ] max |logit diff| = %.3g\n", golden_name.c_str(), worst);

  // Argmax and logsumexp at every position.
  int argmax_mismatch = 0;
  double lse_worst = 0;
  for (size_t w = 0; w < L.at("argmax_all_positions").size(); ++w)
    for (int64_t p = 0; p < T; ++p) {
      const float* row = logits.data() + (w * T + p) * V;
      int64_t best = 0;
      for (int64_t v = 1; v < V; ++v)
        if (row[v] > row[best]) best = v;
      if (best != L.at("argmax_all_positions")[w][p].get<int64_t>()) ++argmax_mismatch;
      double m = row[best], s = 0;
      for (int64_t v = 0; v < V; ++v) s += std::exp(double(row[v]) - m);
      lse_worst = std::max(lse_worst, std::abs(m + std::log(s) - L.at("logsumexp_all_positions")[w][p].get<double>()));
    }
  EXPECT_EQ(argmax_mismatch, 0) << golden_name;
  EXPECT_LE(lse_worst, 1e-3) << golden_name;

  // Residual stream after each layer (window 0).
  const auto& hs = g["hidden_states"];
  ASSERT_EQ(rec.residual.size(), hs.at("residual").size());
  for (size_t l = 0; l < rec.residual.size(); ++l)
    for (size_t pi = 0; pi < hs.at("positions").size(); ++pi) {
      const int64_t p = hs.at("positions")[pi].get<int64_t>();
      const auto& ref = hs.at("residual")[l][pi];
      const double tol = 1e-3 * std::max(1.0, double(rec.residual[l].row(p).cwiseAbs().maxCoeff()));
      EXPECT_LE(max_abs_diff(rec.residual[l].data() + p * rec.residual[l].cols(), ref), tol)
          << golden_name << ": residual " << l << " position " << p;
    }

  // Routing of the first tokens.
  if (g.contains("routing")) {
    const auto& R = g["routing"];
    const int64_t n = R.at("n_tokens").get<int64_t>();
    ASSERT_EQ(rec.routing.size(), R.at("layers").size()) << golden_name << ": MoE layer count";
    for (const auto& [key, ref] : R.at("layers").items()) {
      const int l = std::stoi(key);
      ASSERT_TRUE(rec.routing.count(l)) << "layer " << l << " not routed";
      const auto& r = rec.routing[l];
      for (int64_t t = 0; t < n; ++t) {
        for (size_t j = 0; j < ref.at("topk_ids")[t].size(); ++j) {
          EXPECT_EQ(r.ids(t, j), ref.at("topk_ids")[t][j].get<int>()) << golden_name << " layer " << l << " token " << t;
          EXPECT_NEAR(r.weights(t, j), ref.at("topk_weights")[t][j].get<double>(), 1e-4);
        }
        EXPECT_LE(max_abs_diff(rec.router_logits[l].data() + t * rec.router_logits[l].cols(), ref.at("router_logits")[t]),
                  1e-3);
      }
    }
  }

  // Perplexity over the first windows (T-1 predictions per window) when the golden uses the
  // logits windows' tokens (synthetic goldens: ctx and windows equal).
  const auto& P = g["perplexity"];
  if (P.at("ctx") == L.at("ctx") && P.at("n_windows").get<size_t>() <= L.at("tokens").size()) {
    double nll = 0;
    int64_t count = 0;
    for (int64_t w = 0; w < P.at("n_windows").get<int64_t>(); ++w)
      for (int64_t p = 0; p + 1 < T; ++p) {
        const float* row = logits.data() + (w * T + p) * V;
        double m = row[0];
        for (int64_t v = 1; v < V; ++v) m = std::max(m, double(row[v]));
        double s = 0;
        for (int64_t v = 0; v < V; ++v) s += std::exp(double(row[v]) - m);
        nll += m + std::log(s) - row[tokens[w * T + p + 1]];
        ++count;
      }
    EXPECT_EQ(count, P.at("token_count").get<int64_t>());
    const double ppl = std::exp(nll / count), ref = P.at("ppl").get<double>();
    EXPECT_LE(std::abs(ppl - ref) / ref, 1e-3) << golden_name << ": perplexity " << ppl << " vs " << ref;
  }
}

TEST(GoldenSynthetic, Qwen3Moe) { check_model("data/models/synthetic/qwen3moe", "synthetic-qwen3moe.json"); }
TEST(GoldenSynthetic, Olmoe) { check_model("data/models/synthetic/olmoe", "synthetic-olmoe.json"); }
TEST(GoldenSynthetic, Mistral) { check_model("data/models/synthetic/mistral", "synthetic-mistral.json"); }
TEST(GoldenSynthetic, Qwen2) { check_model("data/models/synthetic/qwen2", "synthetic-qwen2.json"); }
TEST(GoldenSynthetic, Qwen3) { check_model("data/models/synthetic/qwen3", "synthetic-qwen3.json"); }
TEST(GoldenSynthetic, Qwen2MoeSparse) {
  check_model("data/models/synthetic/qwen2moe-sparse", "synthetic-qwen2moe-sparse.json");
}

// Trained fixtures: logits of 2 windows at ctx 64 and routing (perplexity at ctx 128 over 8
// windows is checked through the eval library in eval_test.cpp). Missing files FAIL.
TEST(GoldenTrained, MixtralTiny) { check_model("data/models/mixtral-tiny", "mixtral-tiny.json"); }
TEST(GoldenTrained, Qwen2MoeTiny) { check_model("data/models/qwen2moe-tiny", "qwen2moe-tiny.json"); }
TEST(GoldenTrained, LlamaTiny) { check_model("data/models/llama-tiny", "llama-tiny.json"); }
// The validation fixture (qwen3_moe layout, its own corpus and tokenizer; data/README.md).
TEST(GoldenTrained, ValidationTiny) { check_model("data/models/validation-tiny", "validation-tiny.json"); }
TEST(GoldenTrained, Validation256) { check_model("data/models/validation-256", "validation-256.json"); }

}  // namespace
}  // namespace moe::test
