#include "runtime/ops.h"

#include <cblas.h>

#include <cmath>

#include "core/error.h"

namespace moe::runtime {

void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
             int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(N), int(K), alpha, A, int(lda), B, int(ldb),
              beta, C, int(ldc));
}

void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
             int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(M), int(N), int(K), alpha, A, int(lda), B,
              int(ldb), beta, C, int(ldc));
}

MatrixRM linear(const MatrixRM& X, const MatrixRM& W, const RowVector* bias) {
  if (X.cols() != W.cols())
    throw core::Error::internal("linear: input width " + std::to_string(X.cols()) + " vs weight " +
                                std::to_string(W.rows()) + "x" + std::to_string(W.cols()));
  MatrixRM Y(X.rows(), W.rows());
  if (bias) {
    Y.rowwise() = *bias;
    gemm_nt(X.rows(), W.rows(), X.cols(), 1.0f, X.data(), X.cols(), W.data(), W.cols(), 1.0f, Y.data(), Y.cols());
  } else {
    gemm_nt(X.rows(), W.rows(), X.cols(), 1.0f, X.data(), X.cols(), W.data(), W.cols(), 0.0f, Y.data(), Y.cols());
  }
  return Y;
}

namespace {
inline void rms_row(const float* x, const float* w, int64_t n, double eps, float* out) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * double(x[i]);
  const float r = static_cast<float>(1.0 / std::sqrt(ss / double(n) + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}
}  // namespace

MatrixRM rms_norm(const MatrixRM& X, const RowVector& w, double eps) {
  MatrixRM Y(X.rows(), X.cols());
  for (int64_t n = 0; n < X.rows(); ++n)
    rms_row(X.data() + n * X.cols(), w.data(), X.cols(), eps, Y.data() + n * Y.cols());
  return Y;
}

void rms_norm_groups_inplace(MatrixRM& X, const RowVector& w, double eps) {
  const int64_t g = w.size();
  if (g == 0 || X.cols() % g != 0) throw core::Error::internal("rms_norm_groups: width mismatch");
  const int64_t groups = X.cols() / g;
  for (int64_t n = 0; n < X.rows(); ++n)
    for (int64_t h = 0; h < groups; ++h) {
      float* p = X.data() + n * X.cols() + h * g;
      rms_row(p, w.data(), g, eps, p);
    }
}

void silu_mul_inplace(MatrixRM& G, const MatrixRM& U) {
  auto g = G.array();
  g = g / (1.0f + (-g).exp()) * U.array();
}

void set_blas_threads(int n) { openblas_set_num_threads(n); }
int blas_threads() { return openblas_get_num_threads(); }

RopeTable RopeTable::make(int64_t T, int64_t d, double theta, const RopeScaling& s, int64_t max_positions) {
  if (d % 2 != 0) throw core::Error::unsupported("RoPE needs an even head_dim, got " + std::to_string(d));
  const int64_t h = d / 2;
  std::vector<float> inv(h);
  double base = theta;
  if (s.type == "dynamic") {
    // transformers' dynamic NTK: the base grows only past the trained length.
    const int64_t orig = s.original_max_positions > 0 ? s.original_max_positions : max_positions;
    if (T > orig)
      base = theta * std::pow(s.factor * double(T) / double(orig) - (s.factor - 1.0), double(d) / double(d - 2));
  }
  for (int64_t i = 0; i < h; ++i) inv[i] = static_cast<float>(1.0 / std::pow(base, double(2 * i) / double(d)));
  if (s.type == "linear") {
    for (auto& f : inv) f = static_cast<float>(f / s.factor);
  } else if (s.type == "llama3") {
    const double orig = double(s.original_max_positions);
    const double low_wl = orig / s.low_freq_factor, high_wl = orig / s.high_freq_factor;
    for (auto& f : inv) {
      const double wl = 2 * M_PI / f;
      if (wl > low_wl) {
        f = static_cast<float>(f / s.factor);
      } else if (wl >= high_wl) {
        const double smooth = (orig / wl - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        f = static_cast<float>((1 - smooth) * f / s.factor + smooth * f);
      }
    }
  } else if (s.type != "default" && s.type != "dynamic") {
    throw core::Error::unsupported("rope_scaling type '" + s.type + "' not implemented by the forward");
  }
  RopeTable r;
  r.T = T;
  r.d = d;
  r.cos.resize(T * h);
  r.sin.resize(T * h);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < h; ++i) {
      const float a = static_cast<float>(t) * inv[i];  // fp32 product, as transformers computes it
      r.cos[t * h + i] = static_cast<float>(std::cos(double(a)));
      r.sin[t * h + i] = static_cast<float>(std::sin(double(a)));
    }
  return r;
}

void RopeTable::apply(MatrixRM& X, int64_t heads) const {
  const int64_t h = d / 2;
  for (int64_t n = 0; n < X.rows(); ++n) {
    const int64_t t = n % T;
    const float* c = cos.data() + t * h;
    const float* s = sin.data() + t * h;
    for (int64_t hd = 0; hd < heads; ++hd) {
      float* x = X.data() + n * X.cols() + hd * d;
      for (int64_t i = 0; i < h; ++i) {
        const float x1 = x[i], x2 = x[i + h];
        x[i] = x1 * c[i] - x2 * s[i];
        x[i + h] = x2 * c[i] + x1 * s[i];
      }
    }
  }
}

}  // namespace moe::runtime
