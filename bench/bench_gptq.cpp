// Benchmark: RTN and GPTQ (quant/codec.h, quant/gptq.h) on expert-sized weights (default 2816x1024,
// the up/gate shape of the synthetic d=1024 bench model, and 1024x2816, its down projection), f32
// Gaussian weights and H = Xᵀ X from a random X [2n, n] with correlated, unevenly scaled channels
// (seeded). Prints JSON:
//   rtn      per codec: GB/s of f32 weights read (best of --repeat), and the same for a memcpy of
//            the same bytes (the bar: int4 g128 >= 1 GB/s on one core)
//   gptq     per shape and codec: seconds, parameters/s, and the time of the BLAS/LAPACK calls it
//            rests on, run alone on the same sizes: the factorisation (dpotrf and dtrtri of n×n,
//            with the copy of H before them), the block propagation SGEMMs, and the two proxy-loss DSYRKs; ratio = gptq time /
//            that BLAS time (the rest is the column loop: quantizing and the in-block updates)
//   bench_gptq [--threads 1] [--repeat 3] [--shape MxN]... [--block 128] [--only rtn|gptq]
#include <cblas.h>
#include <lapacke.h>
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "quant/codec.h"
#include "quant/gptq.h"
#include "runtime/ops.h"

using Clock = std::chrono::steady_clock;
using namespace moe::quant;

namespace {

double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + 1e-6 * double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

struct Time {
  double wall = 1e300, cpu = 1e300;
};
template <typename Fn>
Time best_of(int repeat, Fn&& fn) {
  Time t;
  for (int i = 0; i < repeat; ++i) {
    const double c0 = cpu_seconds();
    const auto w0 = Clock::now();
    fn();
    t.wall = std::min(t.wall, std::chrono::duration<double>(Clock::now() - w0).count());
    t.cpu = std::min(t.cpu, cpu_seconds() - c0);
  }
  return t;
}

std::vector<float> weights(int64_t m, int64_t n, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  std::vector<float> w(static_cast<size_t>(m * n));
  for (auto& x : w) x = nd(g);
  return w;
}

// H = Xᵀ X, X = Z M diag(s) [2n, n]: correlated channels of uneven scale.
std::vector<double> hessian(int64_t n, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.2, 3.0);
  const int64_t N = 2 * n;
  std::vector<double> Z(static_cast<size_t>(N * n)), M(static_cast<size_t>(n * n)), X(Z.size()), H(M.size());
  for (auto& z : Z) z = nd(g);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) M[i * n + j] = (i == j) + 0.1 * nd(g);
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(N), int(n), int(n), 1.0, Z.data(), int(n), M.data(), int(n),
              0.0, X.data(), int(n));
  for (int64_t j = 0; j < n; ++j) {
    const double s = ud(g);
    for (int64_t i = 0; i < N; ++i) X[i * n + j] *= s;
  }
  cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(n), int(n), int(N), 1.0, X.data(), int(n), X.data(), int(n),
              0.0, H.data(), int(n));
  return H;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 1, repeat = 3;
  int64_t block = 128;
  std::string only;
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
    else if (a == "--block") block = std::stoll(next());
    else if (a == "--only") only = next();
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
  out["benchmark"] = "gptq";
  out["threads"] = threads;
  out["repeat"] = repeat;

  // RTN on the first shape.
  if (only != "gptq") {
    const auto m = shapes[0].first, n = shapes[0].second;  // plain variables: lambdas capture them
    const auto W = weights(m, n, 1);
    const double gb = double(m * n) * 4 / 1e9;
    std::vector<float> dst(W.size());
    const Time mc = best_of(repeat, [&] { std::memcpy(dst.data(), W.data(), W.size() * 4); });
    nlohmann::ordered_json r;
    r["shape"] = {m, n};
    r["memcpy_gb_per_s"] = gb / mc.wall;
    for (const char* spec : {"int4:g128:sym", "int4:g128:asym", "int8:row:sym", "int3:g128:asym", "int2:g64:asym",
                             "ternary-minmax:row", "ternary-absmean:row", "ternary-tq", "ternary-minmax:row:refit"}) {
      const CodecSpec c = parse_codec(spec);
      const Time t = best_of(repeat, [&] { rtn(W.data(), m, n, c); });
      r["codecs"][spec] = {{"gb_per_s", gb / t.wall}, {"cpu_gb_per_s", gb / t.cpu}, {"seconds", t.wall}};
    }
    out["rtn"] = r;
  }

  for (const auto& shape : shapes) {
    const auto m = shape.first, n = shape.second;
    if (only == "rtn") break;
    const auto W = weights(m, n, 2);
    const auto H = hessian(n, 3);
    nlohmann::ordered_json s;
    s["shape"] = {m, n};
    // The BLAS/LAPACK calls alone.
    std::vector<double> A(H.size());
    const Time fac = best_of(repeat, [&] {
      A = H;
      for (int64_t i = 0; i < n; ++i) A[i * n + i] += 0.01 * H[i * n + i];
      LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', int(n), A.data(), int(n));
      LAPACKE_dtrtri(LAPACK_COL_MAJOR, 'U', 'N', int(n), A.data(), int(n));
    });
    std::vector<float> Wt(static_cast<size_t>(m * n), 0.0f), ub(static_cast<size_t>(block * n), 0.001f),
        err(static_cast<size_t>(block * m), 0.001f);
    const Time prop = best_of(repeat, [&] {
      for (int64_t i2 = block; i2 < n; i2 += block)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(n - i2), int(m), int(block), -1.0f, ub.data(),
                    int(n - i2), err.data(), int(m), 1.0f, Wt.data() + i2 * m, int(m));
    });
    std::vector<double> d(static_cast<size_t>(256 * n), 0.001), C(static_cast<size_t>(n * n));
    const Time proxy = best_of(repeat, [&] {
      for (int k = 0; k < 2; ++k)
        for (int64_t r0 = 0; r0 < m; r0 += 256)
          cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, int(n), int(std::min<int64_t>(256, m - r0)), 1.0, d.data(),
                      int(n), 1.0, C.data(), int(n));
    });
    s["blas_seconds"] = {{"factor", fac.wall}, {"propagation", prop.wall}, {"proxy_loss", proxy.wall}};
    const double blas = fac.wall + prop.wall + proxy.wall;
    for (const char* spec : {"int4:g128:sym", "int3:row:asym", "ternary-minmax:row"}) {
      const CodecSpec c = parse_codec(spec);
      GptqOptions o;
      o.block = block;
      o.damp = c.kind == CodecSpec::Kind::Ternary ? 0.1 : 0.01;
      GptqInfo info;
      const Time t = best_of(repeat, [&] { gptq(W.data(), m, n, H.data(), c, o, &info); });
      s["codecs"][spec] = {{"seconds", t.wall},
                           {"cpu_seconds", t.cpu},
                           {"params_per_s", double(m * n) / t.wall},
                           {"ratio_to_blas", t.wall / blas},
                           {"proxy_loss_gptq", info.proxy_loss_gptq},
                           {"proxy_loss_rtn", info.proxy_loss_rtn},
                           {"gain", info.proxy_loss_rtn / info.proxy_loss_gptq}};
    }
    out["gptq"].push_back(s);
  }
  std::cout << out.dump(2) << std::endl;
  return 0;
}
