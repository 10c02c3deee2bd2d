// Benchmark: Multi-head Latent Attention (runtime/mla.h, the DeepSeek-V2/V3 attention) prefill
// throughput against the machine's measured sgemm peak. DeepSeek-V2-Lite-shaped layer with random
// f32 weights (no checkpoint): hidden 2048, 16 heads, q_proj direct, kv_lora_rank 512,
// qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128 (--q-lora R: q through q_a/q_b of
// rank R, as DeepSeek-V3). Runs windows of ctx tokens through mla_attention (its output and working
// matrices kept across repeats, as the forward keeps them across layers) and prints JSON:
//   sgemm peak (GFLOP/s, cblas_sgemm on square 1024..2048 matrices, best before and after),
//   seconds (best of --repeat), achieved GFLOP/s counting every matmul FLOP (q, kv_a, kv_b, o
//   projections; QK^T and AV over the causal triangle), and the ratio achieved / peak.
//   bench_mla [--windows 2] [--ctx 512] [--threads 2] [--repeat 3] [--q-lora 0]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "runtime/mla.h"
#include "sgemm_peak.h"

using Clock = std::chrono::steady_clock;
using moe::runtime::MatrixRM;

namespace {

MatrixRM random_matrix(int64_t rows, int64_t cols, float scale, std::mt19937& g) {
  std::normal_distribution<float> d(0.0f, scale);
  MatrixRM m(rows, cols);
  for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = d(g);
  return m;
}

double peak_gflops(nlohmann::json* by_size) {
  double peak = 0;
  for (int n : {1024, 1536, 2048}) {
    const double g = moe::bench::sgemm_gflops(n, 3);
    if (by_size) (*by_size)[std::to_string(n)] = g;
    peak = std::max(peak, g);
  }
  return peak;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t windows = 2, ctx = 512, repeat = 3, q_lora = 0;
  int threads = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--windows") windows = std::stoll(argv[i + 1]);
    else if (a == "--ctx") ctx = std::stoll(argv[i + 1]);
    else if (a == "--threads") threads = std::stoi(argv[i + 1]);
    else if (a == "--repeat") repeat = std::stoll(argv[i + 1]);
    else if (a == "--q-lora") q_lora = std::stoll(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  moe::runtime::set_blas_threads(threads);
  nlohmann::json out, by_size;
  out["threads"] = threads;
  double peak = peak_gflops(&by_size);
  out["sgemm_gflops_by_size"] = by_size;

  moe::runtime::MlaSpec s;
  s.heads = 16;
  s.q_lora_rank = q_lora;
  s.kv_lora_rank = 512;
  s.qk_nope_head_dim = 128;
  s.qk_rope_head_dim = 64;
  s.v_head_dim = 128;
  s.scale = 1.0 / std::sqrt(double(s.qk_head_dim()));
  const int64_t H = 2048, nH = s.heads, dqk = s.qk_head_dim(), r = s.kv_lora_rank;
  std::mt19937 g(7);
  moe::runtime::AttnWeights w;
  if (q_lora > 0) {
    w.q_a = random_matrix(q_lora, H, 0.02f, g);
    w.q_a_norm = moe::runtime::RowVector::Ones(q_lora);
    w.q_b = random_matrix(nH * dqk, q_lora, 0.05f, g);
  } else {
    w.q = random_matrix(nH * dqk, H, 0.02f, g);
  }
  w.kv_a = random_matrix(r + s.qk_rope_head_dim, H, 0.02f, g);
  w.kv_a_norm = moe::runtime::RowVector::Ones(r);
  w.kv_b = random_matrix(nH * (s.qk_nope_head_dim + s.v_head_dim), r, 0.05f, g);
  w.o = random_matrix(H, nH * s.v_head_dim, 0.02f, g);
  const MatrixRM x = random_matrix(windows * ctx, H, 1.0f, g);
  const auto rope = moe::runtime::RopeTable::make(ctx, s.qk_rope_head_dim, 10000.0, {}, 4096);

  double best = 1e30;
  std::vector<double> runs;
  // Output and working matrices kept across repeats, as runtime::Forward keeps them across layers.
  moe::runtime::AttnOutput a;
  moe::runtime::AttnWorkspace ws;
  for (int64_t i = 0; i < repeat; ++i) {
    const auto t0 = Clock::now();
    moe::runtime::mla_attention(s, w, rope, x, ctx, a, ws);
    const double sec = std::chrono::duration<double>(Clock::now() - t0).count();
    runs.push_back(sec);
    best = std::min(best, sec);
    if (!std::isfinite(a.out(0, 0))) return 1;
  }
  peak = std::max(peak, peak_gflops(nullptr));  // the machine may be shared: the higher of the two

  // Matmul FLOPs per window.
  const double T = double(ctx), causal = T * (T + 1) / 2.0;
  const double q_flops = q_lora > 0 ? 2.0 * T * (double(H) * q_lora + double(q_lora) * nH * dqk) : 2.0 * T * H * nH * dqk;
  const double proj = q_flops + 2.0 * T * H * double(r + s.qk_rope_head_dim) +
                      2.0 * T * r * double(nH * (s.qk_nope_head_dim + s.v_head_dim)) + 2.0 * T * double(nH * s.v_head_dim) * H;
  const double attn = 2.0 * double(nH) * causal * double(dqk + s.v_head_dim);
  const double flops = (proj + attn) * double(windows);
  out["shape"] = {{"hidden", H}, {"heads", nH}, {"q_lora_rank", q_lora}, {"kv_lora_rank", r},
                  {"qk_nope_head_dim", s.qk_nope_head_dim}, {"qk_rope_head_dim", s.qk_rope_head_dim},
                  {"v_head_dim", s.v_head_dim}};
  out["windows"] = windows;
  out["ctx"] = ctx;
  out["run_seconds"] = runs;
  out["seconds"] = best;
  out["sgemm_peak_gflops"] = peak;
  out["flop_count"] = "q (or q_a, q_b), kv_a, kv_b, o projections; QK^T and AV over the causal triangle";
  out["achieved_gflops"] = flops / best / 1e9;
  out["ratio_to_peak"] = flops / best / 1e9 / peak;
  std::cout << out.dump(2) << "\n";
  return 0;
}
