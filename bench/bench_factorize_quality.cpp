// Factorize quality and speed (issue: low-rank experts). Prints JSON, and a Markdown table on
// stderr.
//   bench_factorize_quality [--source-dir DIR] [--models mixtral-tiny,qwen2moe-tiny,validation-tiny]
//                           [--ctx 128]
//                           [--calib-windows 64] [--eval-windows 64] [--ratios 0.8,0.6,0.4]
//                           [--speed 1] [--speed-windows 4] [--speed-ctx 512] [--budget-only 0]
// Quality: per fixture, every method at each kept-parameter ratio of the expert weights
// (perplexity and KL against the original on the held-out text); svdllm with attention
// factorized too; --budget (model scope and layer scope) against the uniform ratio at the same
// size; delta with a shared V;
// merge (msmoe 8 -> 6) then svdllm at the size of factorize-only ratio 0.4 (6/8 * r' = 0.4).
// Speed: eval tokens/s of the synthetic d=1024 mixtral (bench_forward's model) dense against the
// same model factorized by svd at ratio 0.4 (experts as two thin GEMMs), same tokens, best of 2.
// --budget-only 1: per fixture and ratio only svdllm at the uniform ratio and svdllm --budget in
// both scopes (plus the model scope's planning seconds), no speed part.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <filesystem>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <unistd.h>
#include <vector>

#include "core/error.h"
#include "core/progress.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "pipeline/recipe.h"
#include "pipeline/runner.h"
#include "runtime/forward.h"
#include "runtime/ops.h"
#include "fixtures.h"
#include "synthetic_mixtral.h"

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> v;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');) v.push_back(x);
  return v;
}

double tokens_per_second(const fs::path& dir, int64_t windows, int64_t ctx, int repeat) {
  auto ckpt = moe::io::Checkpoint::open(moe::io::Env::posix(), dir);
  auto model = moe::model::Model::load(ckpt);
  moe::runtime::Forward fwd(model);
  std::vector<int32_t> tokens(static_cast<size_t>(windows * ctx));
  std::mt19937 g(5);
  for (auto& t : tokens) t = static_cast<int32_t>(g() % static_cast<uint32_t>(model.dims().vocab));
  double best = 1e30;
  for (int r = 0; r < repeat; ++r) {
    const auto t0 = Clock::now();
    (void)fwd.run(tokens, ctx);
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return static_cast<double>(windows * ctx) / best;
}

}  // namespace


int main(int argc, char** argv) {
  fs::path src = MOE_BENCH_SOURCE_DIR;
  int64_t ctx = 128, calib_windows = 64, eval_windows = 64, speed_windows = 4, speed_ctx = 512;
  bool speed = true, budget_only = false;
  std::vector<std::string> models = {"mixtral-tiny", "qwen2moe-tiny", "validation-tiny"}, ratios = {"0.8", "0.6", "0.4"};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--source-dir") src = v;
    else if (k == "--models") models = split(v);
    else if (k == "--ratios") ratios = split(v);
    else if (k == "--ctx") ctx = std::stoll(v);
    else if (k == "--calib-windows") calib_windows = std::stoll(v);
    else if (k == "--eval-windows") eval_windows = std::stoll(v);
    else if (k == "--speed") speed = v != "0";
    else if (k == "--speed-windows") speed_windows = std::stoll(v);
    else if (k == "--speed-ctx") speed_ctx = std::stoll(v);
    else if (k == "--budget-only") budget_only = v != "0";
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  moe::core::Progress::global_quiet() = true;
  const fs::path tmp = fs::temp_directory_path() / ("moe-bench-factorize-" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  json out = {{"benchmark", "factorize_quality"}, {"ctx", ctx}, {"calib_windows", calib_windows},
              {"eval_windows", eval_windows}, {"rows", json::array()}};
  std::ostringstream md;
  md << "| model | method | options | expert bits/param | perplexity | vs original | KL | top-1 |\n|---|---|---|---|---|---|---|---|\n";
  int exit_code = 0;
  try {
    for (const auto& name : models) {
      const fs::path model_dir = src / "data/models" / name;
      const fs::path text_dir = moe::bench::fixture_text_dir(src, name);
      auto run = [&](const std::string& label, json passes) {
        json recipe = {{"model", model_dir.string()},
                       {"calibration", {{"text", (text_dir / "calib.txt").string()}, {"ctx", ctx}, {"windows", calib_windows}}},
                       {"passes", passes},
                       {"output", {{"path", (tmp / "out").string()}, {"force", true}}},
                       {"eval", {{"text", (text_dir / "heldout.txt").string()}, {"ctx", ctx}, {"max_windows", eval_windows},
                                 {"against_input", true}}}};
        auto r = moe::pipeline::parse_recipe(recipe, ".", "bench");
        moe::pipeline::RunOptions o;
        o.quiet = true;
        const auto t0 = Clock::now();
        const json s = moe::pipeline::run_recipe(r, o);
        const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
        const json report = json::parse(std::ifstream(tmp / "out" / "moe_tool_report.json"));
        const json& e = s.at("eval");
        const double ppl0 = e.at("perplexity_before").get<double>(), ppl = e.at("perplexity_after").get<double>();
        const double bits = report.at("expert_bits_per_param").at("after").get<double>();
        json row = {{"model", name}, {"label", label}, {"passes", passes}, {"expert_bits_per_param", bits},
                    {"bytes_after", s.at("bytes").at("after")}, {"perplexity", ppl}, {"perplexity_original", ppl0},
                    {"ppl_ratio", ppl / ppl0}, {"kl", e.at("kl_mean")}, {"top1", e.at("top1_agreement")}, {"seconds", secs}};
        if (report.contains("plans")) row["planning_seconds"] = report.at("plans")[0].at("seconds");
        out["rows"].push_back(row);
        char buf[256];
        std::snprintf(buf, sizeof buf, "| %s | %s | | %.2f | %.2f | %+.1f%% | %.4f | %.1f%% |\n", name.c_str(), label.c_str(), bits,
                      ppl, 100 * (ppl / ppl0 - 1), e.at("kl_mean").get<double>(), 100 * e.at("top1_agreement").get<double>());
        md << buf;
        std::cerr << buf;
      };
      auto f = [](const std::string& method, json extra) {
        json p = {{"pass", "factorize"}, {"method", method}};
        for (auto& [k, v] : extra.items()) p[k] = v;
        return json::array({p});
      };
      for (const auto& rs : ratios) {
        const double ratio = std::stod(rs);
        if (budget_only) {
          run("svdllm ratio " + rs, f("svdllm", {{"ratio", ratio}}));
        } else {
          for (const char* m : {"svd", "asvd", "svdllm", "delta", "latent"})
            run(std::string(m) + " ratio " + rs, f(m, {{"ratio", ratio}}));
        }
        run("svdllm budget " + rs + ", model scope", f("svdllm", {{"budget", ratio}, {"budget_scope", "model"}}));
        run("svdllm budget " + rs + ", layer scope", f("svdllm", {{"budget", ratio}, {"budget_scope", "layer"}}));
        if (!budget_only) run("delta shared_v ratio " + rs, f("delta", {{"ratio", ratio}, {"shared_v", true}}));
      }
      if (budget_only) continue;
      run("svdllm ratio 0.6, experts + attention", f("svdllm", {{"ratio", 0.6}, {"targets", {"experts", "attention"}}}));
      run("merge msmoe 8->6, then svdllm ratio 0.533 (= 0.4 of the experts)",
          json::array({{{"pass", "merge"}, {"method", "msmoe"}, {"experts", 6}},
                       {{"pass", "factorize"}, {"method", "svdllm"}, {"ratio", 0.5333}}}));
    }
    if (speed && !budget_only) {
      const moe::bench::Dims D;
      const fs::path dense = tmp / "synthetic-dense", fact = tmp / "synthetic-svd-0.4";
      moe::bench::write_model(dense, D);
      json recipe = {{"model", dense.string()},
                     {"passes", json::array({{{"pass", "factorize"}, {"method", "svd"}, {"ratio", 0.4}}})},
                     {"output", {{"path", fact.string()}}}};
      auto r = moe::pipeline::parse_recipe(recipe, ".", "bench");
      moe::pipeline::RunOptions o;
      o.quiet = true;
      const auto t0 = Clock::now();
      moe::pipeline::run_recipe(r, o);
      const double fsecs = std::chrono::duration<double>(Clock::now() - t0).count();
      moe::runtime::set_blas_threads(2);
      const double tps_dense = tokens_per_second(dense, speed_windows, speed_ctx, 2);
      const double tps_fact = tokens_per_second(fact, speed_windows, speed_ctx, 2);
      out["speed"] = {{"model", "synthetic mixtral d=1024, 8 experts top-2, width 2816, 4 layers"},
                      {"windows", speed_windows}, {"ctx", speed_ctx},
                      {"eval_tokens_per_second_dense", tps_dense}, {"eval_tokens_per_second_svd_ratio_0.4", tps_fact},
                      {"speedup", tps_fact / tps_dense}, {"factorize_seconds", fsecs}};
      std::cerr << "speed: dense " << tps_dense << " tokens/s, svd ratio 0.4 " << tps_fact << " tokens/s\n";
    }
  } catch (const moe::core::Error& e) {
    std::cerr << "bench_factorize_quality: " << e.what() << "\n";
    exit_code = 1;
  }
  fs::remove_all(tmp);
  out["markdown"] = md.str();
  std::cout << out.dump(2) << "\n";
  return exit_code;
}
