#include "runtime/ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "runtime/parallel.h"

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
  MatrixRM Y;
  linear_into(X, W, bias, Y);
  return Y;
}

void linear_into(const MatrixRM& X, const MatrixRM& W, const RowVector* bias, MatrixRM& Y) {
  if (X.cols() != W.cols())
    throw core::Error::internal("linear: input width " + std::to_string(X.cols()) + " vs weight " +
                                std::to_string(W.rows()) + "x" + std::to_string(W.cols()));
  Y.resize(X.rows(), W.rows());
  if (bias) {
    Y.rowwise() = *bias;
    gemm_nt(X.rows(), W.rows(), X.cols(), 1.0f, X.data(), X.cols(), W.data(), W.cols(), 1.0f, Y.data(), Y.cols());
  } else {
    gemm_nt(X.rows(), W.rows(), X.cols(), 1.0f, X.data(), X.cols(), W.data(), W.cols(), 0.0f, Y.data(), Y.cols());
  }
}

namespace {
// Rows per block below which a row-wise op is not worth spreading over threads.
constexpr int64_t kMinRows = 64;

inline void rms_row(const float* x, const float* w, int64_t n, double eps, float* out) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * double(x[i]);
  const float r = static_cast<float>(1.0 / std::sqrt(ss / double(n) + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}
}  // namespace

MatrixRM rms_norm(const MatrixRM& X, const RowVector& w, double eps) {
  MatrixRM Y;
  rms_norm_into(X.data(), X.rows(), X.cols(), X.cols(), w, eps, Y);
  return Y;
}

void rms_norm_into(const float* X, int64_t rows, int64_t cols, int64_t ldx, const RowVector& w, double eps,
                   MatrixRM& Y) {
  Y.resize(rows, cols);
  parallel_rows(rows, kMinRows, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) rms_row(X + n * ldx, w.data(), cols, eps, Y.data() + n * cols);
  });
}

MatrixRM layer_norm(const MatrixRM& X, const RowVector& w, const RowVector& b, double eps) {
  MatrixRM Y;
  layer_norm_into(X, w, b, eps, Y);
  return Y;
}

void layer_norm_into(const MatrixRM& X, const RowVector& w, const RowVector& b, double eps, MatrixRM& Y) {
  const int64_t H = X.cols();
  if (w.size() != H || b.size() != H) throw core::Error::internal("layer_norm: width mismatch");
  Y.resize(X.rows(), H);
  parallel_rows(X.rows(), kMinRows, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
      const float* x = X.data() + n * H;
      double sum = 0, ss = 0;
      for (int64_t i = 0; i < H; ++i) sum += x[i];
      const double mean = sum / double(H);
      for (int64_t i = 0; i < H; ++i) ss += (x[i] - mean) * (x[i] - mean);
      const double r = 1.0 / std::sqrt(ss / double(H) + eps);
      float* y = Y.data() + n * H;
      for (int64_t i = 0; i < H; ++i) y[i] = w[i] * static_cast<float>((x[i] - mean) * r) + b[i];
    }
  });
}

void rms_norm_groups_inplace(MatrixRM& X, const RowVector& w, double eps) {
  const int64_t g = w.size();
  if (g == 0 || X.cols() % g != 0) throw core::Error::internal("rms_norm_groups: width mismatch");
  const int64_t groups = X.cols() / g;
  parallel_rows(X.rows(), kMinRows, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n)
      for (int64_t h = 0; h < groups; ++h) {
        float* p = X.data() + n * X.cols() + h * g;
        rms_row(p, w.data(), g, eps, p);
      }
  });
}

void silu_mul_inplace(MatrixRM& G, const MatrixRM& U) {
  glu_inplace(G.data(), U.data(), G.size(), model::GluActivation{});
}

void glu_inplace(MatrixRM& G, const MatrixRM& U, const model::GluActivation& act) {
  if (G.rows() != U.rows() || G.cols() != U.cols()) throw core::Error::internal("glu: gate and up shapes differ");
  glu_inplace(G.data(), U.data(), G.size(), act);
}

void glu_inplace(float* gp, const float* up, int64_t size, const model::GluActivation& act) {
  // One linear pass over the values, as on a MatrixRM's array (the same packets and tail).
  Eigen::Map<Eigen::ArrayXf> g(gp, size);
  const Eigen::Map<const Eigen::ArrayXf> u(up, size);
  if (act.kind == model::GluActivation::Silu) {
    g = g / (1.0f + (-g).exp()) * u;
    return;
  }
  g = g.min(act.limit);
  g = g / (1.0f + (-act.alpha * g).exp()) * (u.max(-act.limit).min(act.limit) + 1.0f);
}

void set_blas_threads(int n) { openblas_set_num_threads(n); }
int blas_threads() { return openblas_get_num_threads(); }

double yarn_mscale(double scale, double mscale) { return scale <= 1 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0; }

double yarn_factor(const RopeScaling& s, int64_t max_positions) {
  return s.original_max_positions > 0 && max_positions > 0 ? double(max_positions) / double(s.original_max_positions)
                                                           : s.factor;
}

namespace {

// transformers' _compute_yarn_parameters: a per-frequency blend of interpolated (inv / factor) and
// extrapolated (inv) frequencies, the blend a linear ramp between the correction dimensions of
// beta_fast and beta_slow rotations over the original context.
void yarn_inv_freq(std::vector<float>& inv, int64_t d, double base, const RopeScaling& s, int64_t max_positions) {
  const double factor = yarn_factor(s, max_positions);
  const double orig = double(s.original_max_positions > 0 ? s.original_max_positions : max_positions);
  if (orig <= 0) throw core::Error::unsupported("yarn RoPE needs max_position_embeddings");
  auto correction_dim = [&](double rotations) {
    return double(d) * std::log(orig / (rotations * 2 * M_PI)) / (2 * std::log(base));
  };
  double low = correction_dim(s.beta_fast), high = correction_dim(s.beta_slow);
  if (s.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, double(d - 1));
  if (low == high) high += 0.001;
  for (size_t i = 0; i < inv.size(); ++i) {
    const float pos = static_cast<float>(std::pow(base, double(2 * i) / double(d)));  // fp32, as torch
    const float extra = 1.0f / pos, inter = static_cast<float>(1.0 / (factor * double(pos)));
    const float ramp = std::clamp(static_cast<float>((double(i) - low) / (high - low)), 0.0f, 1.0f);
    const float extra_w = 1.0f - ramp;
    inv[i] = inter * (1.0f - extra_w) + extra * extra_w;
  }
}

// yarn's attention factor on cos/sin: given, else get_mscale(factor, mscale) /
// get_mscale(factor, mscale_all_dim) when both are set, else get_mscale(factor).
double yarn_attention_factor(const RopeScaling& s, int64_t max_positions) {
  if (s.attention_factor) return *s.attention_factor;
  const double factor = yarn_factor(s, max_positions);
  if (s.mscale != 0 && s.mscale_all_dim != 0) return yarn_mscale(factor, s.mscale) / yarn_mscale(factor, s.mscale_all_dim);
  return yarn_mscale(factor, 1.0);
}

// longrope takes its long factors when the window (T positions) is longer than the original context.
int64_t longrope_original(const RopeScaling& s, int64_t max_positions) {
  return s.original_max_positions > 0 ? s.original_max_positions : max_positions;
}
bool longrope_long(const RopeScaling& s, int64_t T, int64_t max_positions) {
  return T > longrope_original(s, max_positions);
}

}  // namespace

double longrope_attention_factor(const RopeScaling& s, int64_t T, int64_t max_positions) {
  const bool long_window = longrope_long(s, T, max_positions);
  if (long_window && s.long_mscale) return *s.long_mscale;
  if (!long_window && s.short_mscale) return *s.short_mscale;
  if (s.attention_factor) return *s.attention_factor;
  const double orig = double(longrope_original(s, max_positions));
  const double factor = s.original_max_positions > 0 && max_positions > 0 ? double(max_positions) / orig : s.factor;
  return factor <= 1.0 ? 1.0 : std::sqrt(1.0 + std::log(factor) / std::log(orig));
}

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
  } else if (s.type == "yarn") {
    yarn_inv_freq(inv, d, theta, s, max_positions);
  } else if (s.type == "longrope") {
    // inv_freq = 1 / (ext_factors * base ** (arange(0, d, 2) / d)), in float32 as torch computes it.
    const auto& ext = longrope_long(s, T, max_positions) ? s.long_factor : s.short_factor;
    if (static_cast<int64_t>(ext.size()) != h)
      throw core::Error::corruption("longrope: " + std::to_string(ext.size()) + " factors for " + std::to_string(h) + " frequencies");
    for (int64_t i = 0; i < h; ++i) {
      const float expo = static_cast<float>(2 * i) / static_cast<float>(d);
      const float pos = static_cast<float>(std::pow(theta, double(expo)));
      inv[i] = 1.0f / (static_cast<float>(ext[i]) * pos);
    }
  } else if (s.type != "default" && s.type != "dynamic") {
    throw core::Error::unsupported("rope_scaling type '" + s.type + "' not implemented by the forward");
  }
  const float af = s.type == "yarn"       ? static_cast<float>(yarn_attention_factor(s, max_positions))
                   : s.type == "longrope" ? static_cast<float>(longrope_attention_factor(s, T, max_positions))
                                          : 1.0f;
  RopeTable r;
  r.T = T;
  r.d = d;
  r.cos.resize(T * h);
  r.sin.resize(T * h);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < h; ++i) {
      const float a = static_cast<float>(t) * inv[i];  // fp32 product, as transformers computes it
      r.cos[t * h + i] = static_cast<float>(std::cos(double(a))) * af;
      r.sin[t * h + i] = static_cast<float>(std::sin(double(a))) * af;
    }
  return r;
}

void RopeTable::apply(MatrixRM& X, int64_t heads) const { apply(X.data(), X.rows(), X.cols(), heads, d, 0, false); }

void RopeTable::apply(float* X, int64_t rows, int64_t ld, int64_t heads, int64_t stride, int64_t offset,
                      bool interleaved) const {
  const int64_t h = d / 2;
  // Element i of the pair (i, i + step) or (2i, 2i + 1).
  const int64_t first = interleaved ? 2 : 1, second = interleaved ? 1 : h;
  parallel_rows(rows, kMinRows, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t t = n % T;
      const float* c = cos.data() + t * h;
      const float* s = sin.data() + t * h;
      for (int64_t hd = 0; hd < heads; ++hd) {
        float* x = X + n * ld + offset + hd * stride;
        for (int64_t i = 0; i < h; ++i) {
          float* p1 = x + i * first;
          float* p2 = p1 + second;
          const float x1 = *p1, x2 = *p2;
          *p1 = x1 * c[i] - x2 * s[i];
          *p2 = x2 * c[i] + x1 * s[i];
        }
      }
    }
  });
}

}  // namespace moe::runtime
