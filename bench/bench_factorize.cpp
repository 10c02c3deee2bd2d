// Benchmark: the low-rank factorisation core (passes/lowrank.h) against the LAPACK/BLAS calls it
// rests on. Random f32 weights with a decaying spectrum (seeded) and Grams G = X Xᵀ from a random
// X [n, 2n] with uneven channel scales. Two sections:
//
// "per_expert" (the target: factorization time per expert against the LAPACK calls, overhead
// <= 20%): one expert of hidden size H and intermediate size I (default 1024 and 2816, the bench
// model): gate and up [I, H] reading one Gram [H, H], down [H, I] reading a Gram [I, I]. Per method,
// what the factorize pass runs for the expert (the three matrices truncated at rank_for_ratio):
//   svd      3 × (lowrank::svd + truncate)
//   asvd     3 × (lowrank::asvd + truncate)
//   svdllm   whiten(G_in) once for gate and up, whiten(G_mid) for down, 3 × (svdllm(w, Whitening)
//            + truncate): the pass's whitening reuse
//   svdllm_no_reuse  3 × (svdllm(w, G) + truncate): one Cholesky per matrix (its ratio is against
//            the same reference, one dpotrf per Gram: it shows what the reuse saves)
// against two references on the same shapes, timed alone:
//   dgesdd        the three LAPACKE_dgesdd (jobz 'S') calls, one per matrix (the SVD alone)
//   lapack_calls  what the method's arithmetic is: svd and asvd the three dgesdd; svdllm the three
//                 dgesdd + dpotrf of both Grams + dtrmm (W·S, per matrix) + dtrsm (the k kept rows
//                 of Vᵀ·S⁻¹, per matrix)
// overhead of our code = method time / lapack_calls time; ratio_vs_dgesdd says what whitening
// costs on top of the SVD.
//
// "shapes" (per matrix, --shape MxN..., default 2816x1024 and 1024x2816): dgesdd alone; svd; asvd;
// svdllm from the Gram (copied), with the Gram moved in, and with a precomputed whitening; the
// whitening alone.
//
// JSON on stdout: best-of-repeat wall and CPU seconds (runs interleaved, so a busy machine hurts
// every variant alike) and the ratios. On a shared machine read the CPU ratios of a --threads 1 run
// (wall time depends on the neighbours, and OpenBLAS threads spin while they wait).
//   bench_factorize [--threads 2] [--repeat 3] [--ratio 0.4] [--hidden 1024] [--intermediate 2816]
//                   [--shape MxN]... [--tokens-per-dim 2]
#include <cblas.h>
#include <lapacke.h>
#include <sys/resource.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "passes/lowrank.h"
#include "runtime/ops.h"

namespace lr = moe::passes::lowrank;
using moe::runtime::MatrixRM;
using Clock = std::chrono::steady_clock;

namespace {

double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + 1e-6 * double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

// W = L R with L [m, p] Gaussian columns scaled by 0.97^i + 0.01 and R [p, n] Gaussian: a spectrum
// decaying over the first ~150 directions onto a floor, as trained weights roughly have.
MatrixRM random_weight(int64_t m, int64_t n, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t p = std::min(m, n);
  MatrixRM L(m, p), R(p, n);
  for (int64_t i = 0; i < L.size(); ++i) L.data()[i] = nd(g);
  for (int64_t i = 0; i < R.size(); ++i) R.data()[i] = nd(g) / std::sqrt(static_cast<float>(n));
  for (int64_t j = 0; j < p; ++j) L.col(j) *= static_cast<float>(std::pow(0.97, double(j)) + 0.01);
  return L * R;
}

lr::MatrixD random_gram(int64_t n, int64_t N, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> u(0.2, 3.0);
  lr::MatrixD x(n, N);
  for (int64_t i = 0; i < n; ++i) {
    const double s = u(g);
    for (int64_t t = 0; t < N; ++t) x(i, t) = s * nd(g);
  }
  lr::MatrixD G = lr::MatrixD::Zero(n, n);
  cblas_dsyrk(CblasRowMajor, CblasLower, CblasNoTrans, static_cast<int>(n), static_cast<int>(N), 1.0, x.data(),
              static_cast<int>(N), 0.0, G.data(), static_cast<int>(n));
  G.triangularView<Eigen::StrictlyUpper>() = G.transpose().triangularView<Eigen::StrictlyUpper>();
  return G;
}

// The reference calls, as lowrank.cpp makes them (column-major on the row-major buffers: no
// transposed copies); each on a fresh copy of its input (the copy is inside the timer, ~1%).
double dgesdd_alone(const lr::MatrixD& wd) {
  const int64_t m = wd.rows(), n = wd.cols(), p = std::min(m, n);
  lr::MatrixD a = wd, u(m, p), vt(p, n);
  std::vector<double> s(static_cast<size_t>(p));
  const lapack_int info = LAPACKE_dgesdd(LAPACK_COL_MAJOR, 'S', static_cast<lapack_int>(n), static_cast<lapack_int>(m),
                                         a.data(), static_cast<lapack_int>(n), s.data(), vt.data(),
                                         static_cast<lapack_int>(n), u.data(), static_cast<lapack_int>(p));
  if (info != 0) throw std::runtime_error("dgesdd failed");
  return s[0];
}
double dpotrf_alone(const lr::MatrixD& g) {
  lr::MatrixD a = g;
  const lapack_int n = static_cast<lapack_int>(a.rows());
  if (LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', n, a.data(), n) != 0) throw std::runtime_error("dpotrf failed");
  return a(0, 0);
}
// W·S (dtrmm, W [m, n] in f64) and the solve of k rows against S (dtrsm), S lower triangular.
double trmm_trsm_alone(const lr::MatrixD& wd, const lr::MatrixD& s, int k) {
  const int64_t m = wd.rows(), n = wd.cols();
  lr::MatrixD x = wd;
  cblas_dtrmm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, static_cast<int>(m),
              static_cast<int>(n), 1.0, s.data(), static_cast<int>(n), x.data(), static_cast<int>(n));
  lr::MatrixD r = x.topRows(k);
  cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, k, static_cast<int>(n), 1.0,
              s.data(), static_cast<int>(n), r.data(), static_cast<int>(n));
  return r(0, 0);
}

struct Best {
  double wall = 1e30, cpu = 1e30;
  void add(const std::function<void()>& f) {
    const auto t0 = Clock::now();
    const double c0 = cpu_seconds();
    f();
    wall = std::min(wall, std::chrono::duration<double>(Clock::now() - t0).count());
    cpu = std::min(cpu, cpu_seconds() - c0);
  }
};

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, repeat = 3;
  int64_t hidden = 1024, intermediate = 2816;
  double ratio = 0.4, tokens_per_dim = 2;
  std::vector<std::pair<int64_t, int64_t>> shapes;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--threads") threads = std::stoi(next());
    else if (a == "--repeat") repeat = std::stoi(next());
    else if (a == "--ratio") ratio = std::stod(next());
    else if (a == "--tokens-per-dim") tokens_per_dim = std::stod(next());
    else if (a == "--hidden") hidden = std::stoll(next());
    else if (a == "--intermediate") intermediate = std::stoll(next());
    else if (a == "--shape") {
      const std::string s = next();
      const auto x = s.find('x');
      if (x == std::string::npos) {
        std::fprintf(stderr, "--shape wants MxN, got %s\n", s.c_str());
        return 2;
      }
      shapes.emplace_back(std::stoll(s.substr(0, x)), std::stoll(s.substr(x + 1)));
    } else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (shapes.empty()) shapes = {{2816, 1024}, {1024, 2816}};
  moe::runtime::set_blas_threads(threads);
  nlohmann::ordered_json out;
  out["benchmark"] = "factorize";
  out["threads"] = threads;
  out["repeat"] = repeat;
  out["ratio"] = ratio;
  out["bar"] = "per expert: method time / its LAPACK calls' time <= 1.2 (overhead of our code <= 20%)";
  try {
    {
      // One expert: gate, up [I, H] on G_in [H, H]; down [H, I] on G_mid [I, I].
      const int64_t H = hidden, I = intermediate;
      const MatrixRM gate = random_weight(I, H, 21), up = random_weight(I, H, 22), down = random_weight(H, I, 23);
      const lr::MatrixD g_in = random_gram(H, static_cast<int64_t>(tokens_per_dim * double(H)), 24);
      const lr::MatrixD g_mid = random_gram(I, static_cast<int64_t>(tokens_per_dim * double(I)), 25);
      const std::vector<const MatrixRM*> ws = {&gate, &up, &down};
      const std::vector<const lr::MatrixD*> gs = {&g_in, &g_in, &g_mid};
      std::vector<lr::MatrixD> wds;
      std::vector<int> ks;
      std::vector<std::vector<double>> acts;
      for (size_t j = 0; j < 3; ++j) {
        wds.push_back(ws[j]->cast<double>());
        ks.push_back(lr::rank_for_ratio(ws[j]->rows(), ws[j]->cols(), ratio));
        const lr::MatrixD& g = *gs[j];
        const double N = tokens_per_dim * double(g.rows());
        std::vector<double> act(static_cast<size_t>(g.rows()));
        for (int64_t c = 0; c < g.rows(); ++c) act[static_cast<size_t>(c)] = std::sqrt(g(c, c) / N);
        acts.push_back(act);
      }
      // The Cholesky factors the reference trmm/trsm use (not timed).
      const lr::Whitening w_in = lr::whiten(g_in), w_mid = lr::whiten(g_mid);
      const std::vector<const lr::MatrixD*> ss = {w_in.s.get(), w_in.s.get(), w_mid.s.get()};
      Best b_gesdd, b_calls_llm, b_svd, b_asvd, b_llm, b_llm_noreuse;
      double checksum = 0;
      for (int r = 0; r < repeat; ++r) {
        b_gesdd.add([&] {
          for (size_t j = 0; j < 3; ++j) checksum += dgesdd_alone(wds[j]);
        });
        b_calls_llm.add([&] {
          checksum += dpotrf_alone(g_in) + dpotrf_alone(g_mid);
          for (size_t j = 0; j < 3; ++j) checksum += dgesdd_alone(wds[j]) + trmm_trsm_alone(wds[j], *ss[j], ks[j]);
        });
        b_svd.add([&] {
          for (size_t j = 0; j < 3; ++j) checksum += lr::truncate(lr::svd(*ws[j]), ks[j]).a(0, 0);
        });
        b_asvd.add([&] {
          for (size_t j = 0; j < 3; ++j) checksum += lr::truncate(lr::asvd(*ws[j], acts[j]), ks[j]).a(0, 0);
        });
        b_llm.add([&] {  // as the factorize pass runs an expert: one whitening per Gram
          const lr::Whitening wi = lr::whiten(g_in);
          checksum += lr::truncate(lr::svdllm(gate, wi), ks[0]).a(0, 0);
          checksum += lr::truncate(lr::svdllm(up, wi), ks[1]).a(0, 0);
          const lr::Whitening wm = lr::whiten(g_mid);
          checksum += lr::truncate(lr::svdllm(down, wm), ks[2]).a(0, 0);
        });
        b_llm_noreuse.add([&] {
          for (size_t j = 0; j < 3; ++j) checksum += lr::truncate(lr::svdllm(*ws[j], *gs[j]), ks[j]).a(0, 0);
        });
      }
      auto row = [&](const Best& b, const Best& calls) {
        return nlohmann::ordered_json{{"seconds", b.wall},
                                      {"cpu_seconds", b.cpu},
                                      {"cpu_ratio_vs_dgesdd", b.cpu / b_gesdd.cpu},
                                      {"cpu_ratio_vs_lapack_calls", b.cpu / calls.cpu},
                                      {"ratio_vs_lapack_calls", b.wall / calls.wall}};
      };
      nlohmann::ordered_json e;
      e["hidden"] = H;
      e["intermediate"] = I;
      e["ranks"] = ks;
      e["dgesdd"] = {{"seconds", b_gesdd.wall}, {"cpu_seconds", b_gesdd.cpu}, {"calls", "3 dgesdd"}};
      e["lapack_calls_svdllm"] = {{"seconds", b_calls_llm.wall}, {"cpu_seconds", b_calls_llm.cpu},
                                  {"calls", "3 dgesdd + dpotrf [H,H] + dpotrf [I,I] + 3 dtrmm + 3 dtrsm (k rows)"}};
      e["svd"] = row(b_svd, b_gesdd);
      e["asvd"] = row(b_asvd, b_gesdd);
      e["svdllm"] = row(b_llm, b_calls_llm);
      e["svdllm_no_reuse"] = row(b_llm_noreuse, b_calls_llm);
      e["checksum"] = checksum;
      out["per_expert"] = e;
    }
    for (const auto& shape : shapes) {
      const auto m = shape.first, n = shape.second;  // plain variables: lambdas below capture them
      const MatrixRM w = random_weight(m, n, 11);
      const int64_t N = static_cast<int64_t>(tokens_per_dim * double(n));
      const lr::MatrixD G = random_gram(n, N, 12);
      std::vector<double> act(static_cast<size_t>(n));
      for (int64_t j = 0; j < n; ++j) act[static_cast<size_t>(j)] = std::sqrt(G(j, j) / double(N));
      const int k = lr::rank_for_ratio(m, n, ratio);
      const lr::Whitening white = lr::whiten(G);
      const lr::MatrixD wd = w.cast<double>();
      const int64_t p = std::min(m, n);
      Best base, b_svd, b_asvd, b_llm, b_moved, b_reuse, b_white;
      double checksum = 0;
      for (int r = 0; r < repeat; ++r) {
        base.add([&] {
          lr::MatrixD a = wd, u(m, p), vt(p, n);
          std::vector<double> s(static_cast<size_t>(p));
          const lapack_int info = LAPACKE_dgesdd(LAPACK_COL_MAJOR, 'S', static_cast<lapack_int>(n),
                                                 static_cast<lapack_int>(m), a.data(), static_cast<lapack_int>(n),
                                                 s.data(), vt.data(), static_cast<lapack_int>(n), u.data(),
                                                 static_cast<lapack_int>(p));
          if (info != 0) throw std::runtime_error("dgesdd failed");
          checksum += s[0];
        });
        b_svd.add([&] { checksum += lr::truncate(lr::svd(w), k).a(0, 0); });
        b_asvd.add([&] { checksum += lr::truncate(lr::asvd(w, act), k).a(0, 0); });
        b_llm.add([&] { checksum += lr::truncate(lr::svdllm(w, G), k).a(0, 0); });
        {
          lr::MatrixD g = G;  // the caller's Gram, resident (as when read from the stats file)
          b_moved.add([&] { checksum += lr::truncate(lr::svdllm(w, std::move(g)), k).a(0, 0); });
        }
        b_reuse.add([&] { checksum += lr::truncate(lr::svdllm(w, white), k).a(0, 0); });
        b_white.add([&] { checksum += lr::whiten(G).shift; });
      }
      // The baseline's timer includes its input copy (m·n doubles, ~1% of the SVD); the methods'
      // include their f32 -> f64 conversion, scaling/whitening and truncation.
      auto row = [&](const Best& b) {
        return nlohmann::ordered_json{{"seconds", b.wall},
                                      {"cpu_seconds", b.cpu},
                                      {"ratio_vs_dgesdd", b.wall / base.wall},
                                      {"cpu_ratio_vs_dgesdd", b.cpu / base.cpu}};
      };
      nlohmann::ordered_json s;
      s["shape"] = std::to_string(m) + "x" + std::to_string(n);
      s["rank"] = k;
      s["gram_tokens"] = N;
      s["dgesdd"] = {{"seconds", base.wall}, {"cpu_seconds", base.cpu}};
      s["svd"] = row(b_svd);
      s["asvd"] = row(b_asvd);
      s["svdllm"] = row(b_llm);
      s["svdllm_moved_gram"] = row(b_moved);
      s["svdllm_reuse_whitening"] = row(b_reuse);
      s["whiten_alone"] = {{"seconds", b_white.wall}, {"cpu_seconds", b_white.cpu}};
      s["checksum"] = checksum;
      out["shapes"].push_back(s);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_factorize: %s\n", e.what());
    return 1;
  }
  std::cout << out.dump(2) << "\n";
  return 0;
}
