// Checking the forward against a golden of an independent NumPy reference (data/scripts/
// deepseek_reference.py, glm4_moe_reference.py, gpt_oss_reference.py, granitemoe_reference.py):
// the golden names its fixture and the config patch its reference ran with; logits within 1e-4
// of the largest |logit|, the same argmax, the same experts per token in every MoE layer with the
// same weights. And the CLI commands that sit on the forward, run on such a fixture.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <string>
#include <vector>

#include "calib/calibrate.h"
#include "runtime/forward.h"
#include "runtime_test_util.h"
#include "support/ckpt_util.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {

struct RoutingRecorder : runtime::Observer {
  std::map<int, runtime::RoutingResult> routing;
  bool wants_moe_trace() const override { return true; }
  void on_moe(int l, const runtime::MoeTrace& t) override { routing[l] = t.routing; }
};

struct Checked {
  double max_logit_diff = 0, logits_abs_max = 0;
};

// A copy of fixture `src` (weights, generation config) into `dst` with `patch` merged into its config.
inline void copy_with_config(const std::filesystem::path& src, const std::filesystem::path& dst, const nlohmann::json& patch) {
  for (const char* f : {"model.safetensors", "generation_config.json"}) std::filesystem::copy_file(src / f, dst / f);
  nlohmann::json cfg = nlohmann::json::parse(read_file(src / "config.json"));
  cfg.merge_patch(patch);
  write_file(dst / "config.json", cfg.dump(2));
}

// The largest |logit - golden| over the golden's logits (ids 0, step, 2 step, ...) of the first
// `rows` rows, each row's argmax checked against the golden's.
inline double golden_logit_diff(const std::string& name, const nlohmann::json& g, const runtime::MatrixRM& logits, int64_t rows) {
  const int64_t step = g.at("logit_ids_step").get<int64_t>();
  double diff = 0;
  for (int64_t t = 0; t < rows; ++t) {
    const auto& ref = g.at("logits")[t];
    for (size_t j = 0; j < ref.size(); ++j) diff = std::max(diff, std::abs(double(logits(t, j * step)) - ref[j].get<double>()));
    Eigen::Index am;
    logits.row(t).maxCoeff(&am);
    EXPECT_EQ(am, g.at("argmax")[t].get<int64_t>()) << name << " position " << t;
  }
  return diff;
}

// The experts and weights routed for the first `rows` tokens against a golden's MoE layer entry L
// ({"layer", "topk_ids", "topk_weights"}).
inline void expect_routing_equal(const std::string& name, const nlohmann::json& L, const runtime::RoutingResult& r, int64_t rows) {
  const int l = L.at("layer").get<int>();
  for (int64_t t = 0; t < rows; ++t) {
    // The reference lists a token's experts ascending (torch.topk(sorted=False) has no order).
    std::vector<std::pair<int, float>> ours;
    for (int64_t j = 0; j < r.ids.cols(); ++j) ours.emplace_back(r.ids(t, j), r.weights(t, j));
    std::sort(ours.begin(), ours.end());
    const auto ids = L.at("topk_ids")[t].get<std::vector<int>>();
    ASSERT_EQ(ours.size(), ids.size());
    for (size_t j = 0; j < ids.size(); ++j) {
      EXPECT_EQ(ours[j].first, ids[j]) << name << " layer " << l << " token " << t;
      EXPECT_NEAR(ours[j].second, L.at("topk_weights")[t][j].get<double>(), 1e-5)
          << name << " layer " << l << " token " << t << " expert " << ids[j];
    }
  }
}

// Fills `out` (void: the ASSERTs below return early). The golden names its fixture and the config
// patch its reference ran with.
inline void check_against_reference(const std::string& name, Checked& out) {
  const nlohmann::json g = read_json_or_fail(source_dir() / "data" / "golden" / (name + ".json"));
  ASSERT_FALSE(g.is_null());
  TempDir patched;
  std::filesystem::path dir = source_dir() / g.at("model").get<std::string>();
  if (!g.at("config_patch").empty()) {
    copy_with_config(dir, patched.path(), g.at("config_patch"));
    dir = patched.path();
  }
  auto lm = load_model(dir);
  runtime::Forward fwd(lm->model);
  const int64_t T = g.at("T").get<int64_t>();
  const auto tokens = g.at("tokens").get<std::vector<int32_t>>();
  RoutingRecorder rec;
  runtime::Observer* obs[] = {&rec};
  const runtime::MatrixRM logits = fwd.run(tokens, T, obs);
  const int64_t V = logits.cols();
  out.logits_abs_max = g.at("logits_abs_max").get<double>();
  out.max_logit_diff = golden_logit_diff(name, g, logits, T);
  EXPECT_EQ(V, 4096);
  EXPECT_LE(out.max_logit_diff, 1e-4 * out.logits_abs_max) << name << ": max |logit diff| vs the reference";

  const auto& layers = g.at("moe_layers");
  EXPECT_EQ(rec.routing.size(), layers.size()) << name << ": MoE layers routed";
  for (const auto& L : layers) {
    const int l = L.at("layer").get<int>();
    ASSERT_TRUE(rec.routing.count(l)) << name << " layer " << l;
    expect_routing_equal(name, L, rec.routing.at(l), T);
  }
}

// check_against_reference on each golden in turn, printing its max |logit diff| and largest |logit|
// (the figures docs/families.md quotes).
inline void check_goldens(std::initializer_list<const char*> names) {
  for (const char* name : names) {
    SCOPED_TRACE(name);
    Checked c;
    check_against_reference(name, c);
    std::printf("[ %s ] max |logit diff| = %.3g (|logit| max %.3g)\n", name, c.max_logit_diff, c.logits_abs_max);
  }
}

// The message of the core::Error that building a Forward on the checkpoint in `dir` throws (a test
// failure, and "", when it builds).
inline std::string forward_error(const std::filesystem::path& dir) {
  auto lm = load_model(dir);
  try {
    runtime::Forward fwd(lm->model);
  } catch (const core::Error& e) {
    return e.message();
  }
  ADD_FAILURE() << dir.string() << ": the forward was built";
  return "";
}

// For each (config patch, text): building the forward on a copy of `fixture` with the patch merged
// into its config throws an error whose message contains the text.
inline void expect_forward_errors(const std::filesystem::path& fixture,
                                  const std::vector<std::pair<nlohmann::json, std::string>>& cases) {
  for (const auto& [patch, want] : cases) {
    TempDir dir;
    copy_with_config(fixture, dir.path(), patch);
    const std::string m = forward_error(dir.path());
    EXPECT_NE(m.find(want), std::string::npos) << patch.dump() << ": " << m;
  }
}

// Slab e of a tensor stacked over experts (its first dimension), as bytes.
inline std::string expert_slab(const TensorBytes& t, int e) {
  const size_t n = t.bytes.size() / static_cast<size_t>(t.shape.at(0));
  return t.bytes.substr(static_cast<size_t>(e) * n, n);
}

// A pruned layer written in a stacked layout: for each output expert, the input expert whose row
// of the `router` tensor has the same bytes (the fixtures' router rows are unique), and each of the
// `stacked` tensors' slabs equal to that input expert's. Returns the input ids (-1: none found,
// a failure).
inline std::vector<int> expect_kept_expert_slabs(const TensorMap& in, const TensorMap& got, const std::string& router,
                                                 const std::vector<std::string>& stacked) {
  std::vector<int> kept;
  const TensorBytes &r_in = in.at(router), &r_out = got.at(router);
  for (int k = 0; k < static_cast<int>(r_out.shape.at(0)); ++k) {
    int src = -1;
    for (int e = 0; e < static_cast<int>(r_in.shape.at(0)); ++e)
      if (expert_slab(r_in, e) == expert_slab(r_out, k)) src = e;
    kept.push_back(src);
    if (src < 0) {
      ADD_FAILURE() << router << ": output expert " << k << " has no input expert's router row";
      continue;
    }
    for (const std::string& name : stacked)
      EXPECT_EQ(expert_slab(got.at(name), k), expert_slab(in.at(name), src)) << name << " output expert " << k;
  }
  return kept;
}

// calibrate (routed-only statistics) on golden `name`'s window of its fixture `dir`: each of the
// `experts` experts' routed-token count and summed routing weight equal the reference's (from its
// per-token choices and weights). `mtp_golden`: the golden of the fixture's multi-token-prediction
// layer on the same window (its MoE layer calibrated too, on the window's T-1 positions).
inline void check_calibrate_counts(const std::string& name, const std::filesystem::path& dir, int experts,
                                   const std::string& mtp_golden = "") {
  nlohmann::json g = read_json_or_fail(source_dir() / "data" / "golden" / (name + ".json"));
  ASSERT_FALSE(g.is_null());
  if (!mtp_golden.empty()) {
    const nlohmann::json m = read_json_or_fail(source_dir() / "data" / "golden" / (mtp_golden + ".json"));
    ASSERT_FALSE(m.is_null());
    ASSERT_EQ(m.at("tokens"), g.at("tokens"));
    for (const auto& L : m.at("moe_layers")) g["moe_layers"].push_back(L);
  }
  auto lm = load_model(dir);
  const auto tokens = g.at("tokens").get<std::vector<int32_t>>();
  calib::CalibrateOptions o;
  o.ctx = g.at("T").get<int64_t>();
  o.windows = 1;
  o.routed_only = true;
  o.quiet = true;
  TempDir tmp;
  const calib::CalibrateResult res = calib::calibrate(lm->ckpt, lm->model, tokens, "golden", o, tmp.path() / "s.stats");
  ASSERT_EQ(res.stats.layers.size(), g.at("moe_layers").size());
  for (const auto& L : g.at("moe_layers")) {
    const int l = L.at("layer").get<int>();
    std::vector<double> count(experts, 0.0), weight(experts, 0.0);
    for (size_t t = 0; t < L.at("topk_ids").size(); ++t)
      for (size_t j = 0; j < L.at("topk_ids")[t].size(); ++j) {
        const int e = L.at("topk_ids")[t][j].get<int>();
        count[e] += 1;
        weight[e] += L.at("topk_weights")[t][j].get<double>();
      }
    const calib::LayerStats& st = res.stats.layers.at(l);
    for (int e = 0; e < experts; ++e) {
      EXPECT_EQ(st.count[e], count[e]) << name << " layer " << l << " expert " << e;
      EXPECT_NEAR(st.weight_sum[e], weight[e], 1e-4) << name << " layer " << l << " expert " << e;
    }
  }
}

// The held-out text the CLI tests calibrate and evaluate on.
inline const std::string& heldout_text() {
  static const std::string t = (source_dir() / "data/text/heldout.txt").string();
  return t;
}

// eval of `model` on one window of 32 tokens of heldout_text() exits 0 with a finite perplexity > 1.
inline void expect_eval_runs(const std::filesystem::path& model) {
  const RunResult r = run_tool({"-q", "eval", model.string(), "--text", heldout_text(), "--ctx", "32", "--max-windows", "1", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const double ppl = nlohmann::json::parse(r.out).at("perplexity").get<double>();
  EXPECT_TRUE(std::isfinite(ppl) && ppl > 1.0) << model << r.out;
}

// A multi-token-prediction head stored outside model.layers. (qwen3_next's `mtp.*`, ERNIE-4.5's
// `model.mtp_*`): the two BF16 [2, 2] tensors `names` (the second an expert's) added to a copy of
// `fixture` in a second shard are written byte for byte by convert and quantize rtn; prune random
// to `keep` experts leaves every tensor under `prefix` out with one warning naming it, sets the
// config's num_nextn_predict_layers (1 in the input) to 0, and its output evaluates.
inline void expect_mtp_head_passed_through(const std::filesystem::path& fixture, const std::string& prefix,
                                           const std::vector<std::string>& names, const std::string& keep) {
  namespace fs = std::filesystem;
  ASSERT_EQ(names.size(), 2u);
  TempDir tmp;
  const fs::path in = tmp.path() / "in";
  copy_folder(fixture, in);
  std::string data(16, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i % 2 ? 0x3f : 0x10 + i);  // finite bf16
  write_file(in / "model-mtp.safetensors",
             raw_safetensors("{\"" + names[0] + R"(":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},")" + names[1] +
                                 R"(":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]}})",
                             data));
  nlohmann::json map;
  for (const auto& [name, t] : read_tensors(fixture)) map[name] = "model.safetensors";
  for (const auto& n : names) map[n] = "model-mtp.safetensors";
  write_file(in / "model.safetensors.index.json", nlohmann::json{{"metadata", nlohmann::json::object()}, {"weight_map", map}}.dump());
  nlohmann::json cfg = nlohmann::json::parse(read_file(in / "config.json"));
  cfg["num_nextn_predict_layers"] = 1;  // as the released configs say
  write_file(in / "config.json", cfg.dump(2));
  auto nextn = [](const fs::path& dir) {
    return nlohmann::json::parse(read_file(dir / "config.json")).at("num_nextn_predict_layers").get<int>();
  };
  const TensorMap input = read_tensors(in);
  for (const std::vector<std::string>& cmd : {std::vector<std::string>{"convert"},
                                              std::vector<std::string>{"quantize", "--method", "rtn", "--codec", "int4"}}) {
    const fs::path out = tmp.path() / cmd[0];
    std::vector<std::string> a = {"-q", cmd[0], in.string(), out.string()};
    a.insert(a.end(), cmd.begin() + 1, cmd.end());
    const RunResult r = run_tool(a);
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    const TensorMap got = read_tensors(out);
    for (const auto& name : names) {
      ASSERT_TRUE(got.count(name)) << cmd[0] << " " << name;
      EXPECT_TRUE(got.at(name) == input.at(name)) << cmd[0] << " " << name;
    }
    EXPECT_EQ(nextn(out), 1) << cmd[0];
  }
  const fs::path pruned = tmp.path() / "pruned";
  const RunResult r = run_tool({"prune", in.string(), pruned.string(), "--method", "random", "--keep", keep});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.err.find("multi-token-prediction head (" + prefix + "*, 2 tensors"), std::string::npos) << r.err;
  for (const auto& [name, t] : read_tensors(pruned)) EXPECT_NE(name.rfind(prefix, 0), 0u) << name;
  EXPECT_EQ(nextn(pruned), 0);
  expect_eval_runs(pruned);
}

// The command `a` with heldout_text() as calibration text (2 windows of 32), then `more`.
inline RunResult run_with_calibration(std::vector<std::string> a, const std::vector<std::string>& more) {
  const std::vector<std::string> calib = {"--text", heldout_text(), "--ctx", "32", "--windows", "2"};
  a.insert(a.end(), calib.begin(), calib.end());
  a.insert(a.end(), more.begin(), more.end());
  return run_tool(a);
}

// Element i of a little-endian BF16 tensor's bytes, as f32.
inline float bf16_at(const std::string& bytes, int64_t i) {
  uint32_t b = static_cast<uint32_t>(static_cast<uint8_t>(bytes[2 * i])) |
               static_cast<uint32_t>(static_cast<uint8_t>(bytes[2 * i + 1])) << 8;
  b <<= 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// eval (2 windows of 32: a finite perplexity > 1), calibrate (2 windows) and prune --method reap
// --keep 6 with those statistics on the checkpoint `model` (the config's `count_key`, default
// n_routed_experts, becomes 6), into `tmp`/reap; the pruned model's eval runs.
inline void eval_calibrate_reap(const std::string& model, const std::filesystem::path& tmp,
                                const std::string& count_key = "n_routed_experts") {
  namespace fs = std::filesystem;
  const std::string& text = heldout_text();
  RunResult r = run_tool({"-q", "eval", model, "--text", text, "--ctx", "32", "--max-windows", "2", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("windows"), 2);
  EXPECT_TRUE(std::isfinite(j.at("perplexity").get<double>())) << r.out;
  EXPECT_GT(j.at("perplexity").get<double>(), 1.0) << r.out;

  const fs::path stats = tmp / "calib.stats";
  r = run_tool({"-q", "calibrate", model, "--text", text, "-o", stats.string(), "--ctx", "32", "--windows", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_TRUE(fs::exists(stats));

  const fs::path out = tmp / "reap";
  r = run_tool({"-q", "prune", model, out.string(), "--method", "reap", "--keep", "6", "--stats", stats.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto cfg = nlohmann::json::parse(read_file(out / "config.json"));
  EXPECT_EQ(cfg.at(count_key), 6);
  // The pruned model runs too.
  r = run_tool({"-q", "eval", out.string(), "--text", text, "--ctx", "32", "--max-windows", "1", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
}

// merge (M-SMoE, 6 experts), quantize (GPTQ int4, native) and factorize (SVD-LLM, ratio 0.5) of
// the checkpoint `model`, calibrated on 2 windows of 32, into `tmp`/merged, q and f: each exits 0
// and its output evaluates (expect_eval_runs).
inline void merge_quantize_factorize_run(const std::string& model, const std::filesystem::path& tmp) {
  const std::string& text = heldout_text();
  for (const auto& [dir, args] : std::vector<std::pair<std::string, std::vector<std::string>>>{
           {"merged", {"merge", "--method", "msmoe", "--experts", "6"}},
           {"q", {"quantize", "--method", "gptq", "--codec", "int4"}},
           {"f", {"factorize", "--method", "svdllm", "--ratio", "0.5"}}}) {
    std::vector<std::string> a = {"-q", args[0], model, (tmp / dir).string()};
    a.insert(a.end(), args.begin() + 1, args.end());
    a.insert(a.end(), {"--text", text, "--ctx", "32", "--windows", "2"});
    const RunResult r = run_tool(a);
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    expect_eval_runs(tmp / dir);
  }
}

}  // namespace moe::test
