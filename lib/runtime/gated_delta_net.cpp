#include "runtime/gated_delta_net.h"

#include <cmath>
#include <vector>

#include "core/error.h"
#include "runtime/ops.h"
#include "runtime/parallel.h"

namespace moe::runtime {

namespace {

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
float silu(float x) { return x * sigmoid(x); }
// torch.nn.functional.softplus (beta 1, threshold 20: linear above).
float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

// x / sqrt(Σx² + 1e-6) over n elements in place (l2norm of modeling_qwen3_next.py), times `scale`.
void l2_normalize(float* x, int64_t n, float scale) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float r = static_cast<float>(1.0 / std::sqrt(ss + 1e-6)) * scale;
  for (int64_t i = 0; i < n; ++i) x[i] *= r;
}

}  // namespace

DeltaNetOutput gated_delta_net(const DeltaNetSpec& spec, const DeltaNetWeights& w, const MatrixRM& x, int64_t T) {
  const model::DeltaNetDims& d = spec.dims;
  const int64_t N = x.rows(), nk = d.k_heads, nv = d.v_heads, dk = d.k_dim, dv = d.v_dim, r = nv / nk;
  const int64_t K = d.key_dim(), V = d.value_dim(), C = d.conv_dim(), ck = d.conv_kernel;
  if (T <= 0 || N % T != 0) throw core::Error::internal("gated_delta_net: rows not a multiple of the window");
  if (w.in_proj_qkvz.rows() != 2 * K + 2 * V || w.in_proj_ba.rows() != 2 * nv || w.conv1d.rows() != C ||
      w.conv1d.cols() != ck || w.dt_bias.size() != nv || w.A_log.size() != nv || w.norm.size() != dv ||
      w.out_proj.cols() != V)
    throw core::Error::internal("gated_delta_net: weight shapes do not match the linear_* sizes");
  const MatrixRM qkvz = linear(x, w.in_proj_qkvz);
  const MatrixRM ba = linear(x, w.in_proj_ba);

  // Ungrouped: mixed = [q (K) | k (K) | v (V)], z [N, V], beta and g [N, nv].
  MatrixRM mixed(N, C), z(N, V), beta(N, nv), g(N, nv);
  const int64_t per = 2 * dk + 2 * r * dv;
  parallel_rows(N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n)
      for (int64_t kh = 0; kh < nk; ++kh) {
        const float* src = qkvz.data() + n * qkvz.cols() + kh * per;
        float* m = mixed.data() + n * C;
        std::copy(src, src + dk, m + kh * dk);
        std::copy(src + dk, src + 2 * dk, m + K + kh * dk);
        std::copy(src + 2 * dk, src + 2 * dk + r * dv, m + 2 * K + kh * r * dv);
        std::copy(src + 2 * dk + r * dv, src + per, z.data() + n * V + kh * r * dv);
        const float* bag = ba.data() + n * ba.cols() + kh * 2 * r;
        for (int64_t j = 0; j < r; ++j) {
          const int64_t h = kh * r + j;
          beta(n, h) = sigmoid(bag[j]);
          g(n, h) = -std::exp(w.A_log[h]) * softplus(bag[r + j] + w.dt_bias[h]);
        }
      }
  });

  // Causal depthwise convolution within each window, then SiLU; q and k l2-normalised per key head.
  MatrixRM conv(N, C);
  const float qscale = static_cast<float>(1.0 / std::sqrt(double(dk)));
  parallel_rows(N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
      const int64_t t = n % T;
      float* out = conv.data() + n * C;
      for (int64_t c = 0; c < C; ++c) {
        float acc = 0;
        for (int64_t j = 0; j < ck; ++j) {
          const int64_t s = t - (ck - 1) + j;
          if (s >= 0) acc += w.conv1d(c, j) * mixed(n - t + s, c);
        }
        out[c] = silu(acc);
      }
      for (int64_t kh = 0; kh < nk; ++kh) {
        l2_normalize(out + kh * dk, dk, qscale);
        l2_normalize(out + K + kh * dk, dk, 1.0f);
      }
    }
  });

  // The gated delta rule per (window, value head).
  MatrixRM core(N, V);
  const int64_t windows = N / T;
  parallel_for(windows * nv, [&](int64_t task) {
    const int64_t wi = task / nv, h = task % nv, kh = h / r;
    std::vector<float> S(static_cast<size_t>(dk * dv), 0.0f), kv(static_cast<size_t>(dv));
    for (int64_t t = 0; t < T; ++t) {
      const int64_t n = wi * T + t;
      const float* q = conv.data() + n * C + kh * dk;
      const float* k = conv.data() + n * C + K + kh * dk;
      const float* v = conv.data() + n * C + 2 * K + h * dv;
      const float decay = std::exp(g(n, h)), b = beta(n, h);
      for (auto& s : S) s *= decay;
      std::fill(kv.begin(), kv.end(), 0.0f);
      for (int64_t i = 0; i < dk; ++i)
        for (int64_t j = 0; j < dv; ++j) kv[j] += S[i * dv + j] * k[i];
      for (int64_t j = 0; j < dv; ++j) kv[j] = (v[j] - kv[j]) * b;  // delta
      for (int64_t i = 0; i < dk; ++i)
        for (int64_t j = 0; j < dv; ++j) S[i * dv + j] += k[i] * kv[j];
      float* o = core.data() + n * V + h * dv;
      for (int64_t j = 0; j < dv; ++j) o[j] = 0.0f;
      for (int64_t i = 0; i < dk; ++i)
        for (int64_t j = 0; j < dv; ++j) o[j] += S[i * dv + j] * q[i];
    }
  });

  // Gated RMSNorm per value head: rms(o) * weight * silu(z).
  DeltaNetOutput res;
  res.o_input.resize(N, V);
  parallel_rows(N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n)
      for (int64_t h = 0; h < nv; ++h) {
        const float* o = core.data() + n * V + h * dv;
        const float* zz = z.data() + n * V + h * dv;
        float* y = res.o_input.data() + n * V + h * dv;
        double ss = 0;
        for (int64_t j = 0; j < dv; ++j) ss += double(o[j]) * o[j];
        const float rr = static_cast<float>(1.0 / std::sqrt(ss / double(dv) + spec.eps));
        for (int64_t j = 0; j < dv; ++j) y[j] = w.norm[j] * (o[j] * rr) * silu(zz[j]);
      }
  });
  res.out = linear(res.o_input, w.out_proj);
  return res;
}

}  // namespace moe::runtime
