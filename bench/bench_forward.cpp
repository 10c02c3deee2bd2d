// Benchmark: fp32 CPU forward (prefill) throughput against the machine's measured sgemm peak.
// Builds a synthetic mixtral-layout MoE (random bf16 weights written with the project's
// checkpoint writer into a temp folder): hidden 1024, 8 experts top-2, expert width 2816,
// 4 layers, 16 heads / 4 kv heads (head_dim 64), vocab 32000; runs windows of ctx 512 through
// runtime::Forward (layer-sequential: per layer dequantise, attention, routed experts) and
// prints JSON:
//   sgemm peak (GFLOP/s, cblas_sgemm on square 1024..2048 matrices, OpenBLAS threads = 2),
//   prefill tokens/s and achieved GFLOP/s counting every matmul FLOP (q/k/v/o projections,
//   QK^T and AV over the causal triangle, router, routed experts (top-k only), lm head),
//   and the ratio achieved / peak.
//   bench_forward [--windows 4] [--ctx 512] [--threads 2] [--dir /tmp] [--repeat 2]
#include <cblas.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "sgemm_peak.h"
#include "synthetic_mixtral.h"
#include "io/checkpoint_writer.h"
#include "io/env.h"
#include "model/model.h"
#include "runtime/forward.h"

namespace fs = std::filesystem;
using moe::core::DType;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

using moe::bench::sgemm_gflops;
using moe::bench::Dims;
using moe::bench::write_model;

// Matmul FLOPs of one window of T tokens.
double flops_per_window(const Dims& D, int64_t T) {
  const double t = double(T), H = double(D.H), d = double(D.d());
  const double proj = 2.0 * t * H * double(2 * D.heads * D.d() + 2 * D.kv * D.d());
  const double causal = t * (t + 1) / 2.0;  // query-key pairs actually needed
  const double attn = 2.0 * 2.0 * double(D.heads) * d * causal;  // QK^T and AV
  const double router = 2.0 * t * H * double(D.E);
  const double experts = t * double(D.k) * 3.0 * 2.0 * H * double(D.I);
  const double per_layer = proj + attn + router + experts;
  const double head = 2.0 * t * H * double(D.V);
  return double(D.L) * per_layer + head;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t windows = 4, ctx = 512, repeat = 2;
  int threads = 2;
  fs::path base = fs::temp_directory_path();
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--windows") windows = std::stoll(argv[i + 1]);
    else if (a == "--ctx") ctx = std::stoll(argv[i + 1]);
    else if (a == "--threads") threads = std::stoi(argv[i + 1]);
    else if (a == "--repeat") repeat = std::stoll(argv[i + 1]);
    else if (a == "--dir") base = argv[i + 1];
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  moe::runtime::set_blas_threads(threads);
  nlohmann::json out;
  out["threads"] = threads;
  nlohmann::json by_size;
  double peak = 0;
  for (int n : {1024, 1536, 2048}) {
    const double g = sgemm_gflops(n, 3);
    by_size[std::to_string(n)] = g;
    peak = std::max(peak, g);
  }
  out["sgemm_gflops_by_size"] = by_size;
  out["sgemm_peak_gflops"] = peak;

  const Dims D;
  const fs::path dir = base / ("moe-bench-forward-" + std::to_string(::getpid()));
  auto t0 = Clock::now();
  write_model(dir, D);
  out["model_write_seconds"] = seconds_since(t0);
  try {
    auto ckpt = moe::io::Checkpoint::open(moe::io::Env::posix(), dir);
    auto model = moe::model::Model::load(ckpt);
    moe::runtime::Forward fwd(model);
    std::vector<int32_t> tokens(size_t(windows * ctx));
    std::mt19937 g(5);
    for (auto& t : tokens) t = static_cast<int32_t>(g() % D.V);
    // The same steps as Forward::run, timed: dequantise each layer, attention, MoE block, head.
    struct Timer : moe::runtime::Observer {
      Clock::time_point t;
      double attn = 0, moe = 0;
      bool wants_attention_trace() const override { return true; }
      void on_layer_input(int, const moe::runtime::MatrixRM&) override { t = Clock::now(); }
      void on_attention(int, const moe::runtime::AttnTrace&) override {
        attn += seconds_since(t);
        t = Clock::now();
      }
      void on_layer_output(int, const moe::runtime::MatrixRM&) override { moe += seconds_since(t); }
    };
    double best = 1e30;
    std::vector<double> runs;
    nlohmann::json breakdown;
    for (int64_t r = 0; r < repeat; ++r) {
      Timer timer;
      moe::runtime::Observer* obs[] = {&timer};
      auto t1 = Clock::now();
      moe::runtime::MatrixRM X = fwd.embed(tokens);
      double load = 0;
      moe::runtime::LayerWeights w;
      for (int l = 0; l < static_cast<int>(D.L); ++l) {
        auto t2 = Clock::now();
        fwd.load_layer_into(l, w);
        load += seconds_since(t2);
        fwd.apply_layer(w, X, ctx, obs);
      }
      auto t3 = Clock::now();
      auto logits = fwd.logits(X);
      const double head = seconds_since(t3);
      const double s = seconds_since(t1);
      runs.push_back(s);
      if (s < best) {
        best = s;
        breakdown = {{"dequantise_layers", load}, {"attention", timer.attn}, {"moe_blocks", timer.moe},
                     {"final_norm_lm_head", head}};
      }
    }
    out["breakdown_seconds"] = breakdown;
    // Peak again after the run (the machine may be shared): the higher of the two is the peak.
    for (int n : {1024, 1536, 2048}) peak = std::max(peak, sgemm_gflops(n, 3));
    out["sgemm_peak_gflops"] = peak;
    const double flops = flops_per_window(D, ctx) * double(windows);
    out["model"] = {{"family", "mixtral"}, {"hidden", D.H}, {"experts", D.E}, {"top_k", D.k},
                    {"expert_width", D.I}, {"layers", D.L}, {"heads", D.heads}, {"kv_heads", D.kv},
                    {"vocab", D.V}, {"weights", "bf16 (dequantised per layer to f32)"}};
    out["windows"] = windows;
    out["ctx"] = ctx;
    out["tokens"] = windows * ctx;
    out["run_seconds"] = runs;
    out["seconds"] = best;
    out["tokens_per_second"] = double(windows * ctx) / best;
    out["gflop_per_token"] = flops / double(windows * ctx) / 1e9;
    out["flop_count"] = "q/k/v/o projections, QK^T and AV over the causal triangle, router, top-k experts, lm head";
    out["achieved_gflops"] = flops / best / 1e9;
    out["ratio_to_peak"] = flops / best / 1e9 / peak;
  } catch (const std::exception& e) {
    fs::remove_all(dir);
    std::fprintf(stderr, "bench_forward: %s\n", e.what());
    return 1;
  }
  fs::remove_all(dir);
  std::cout << out.dump(2) << "\n";
  return 0;
}
