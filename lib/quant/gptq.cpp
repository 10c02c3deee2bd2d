#include "quant/gptq.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "core/error.h"
#include "quant/intn.h"
#include "quant/ternary.h"

namespace moe::quant {

using core::Error;

namespace {

// proxy_loss with a caller's n×n workspace C (contents ignored: the first DSYRK has beta 0).
double proxy_into(const float* W, int64_t rows, int64_t cols, const double* H, const core::Encoding& enc, double* C) {
  // tr(D H Dᵀ) = Σ_ij H_ij (DᵀD)_ij: one DSYRK (rows·cols² flops, half a GEMM D·H), D = W − Q in
  // chunks of rows, then an n² sum over the upper triangle.
  if (enc.rows() != rows || enc.cols() != cols) throw Error::internal("proxy_loss: shape mismatch");
  if (rows == 0 || cols == 0) return 0.0;
  const int64_t chunk = 256, n = cols;
  std::vector<float> q(static_cast<size_t>(std::min(chunk, rows) * n));
  std::vector<double> d(q.size());
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t m = std::min(chunk, rows - r0);
    enc.dequantize_rows(r0, r0 + m, q.data());
    for (int64_t i = 0; i < m * n; ++i) d[i] = static_cast<double>(W[r0 * n + i]) - q[i];
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, int(n), int(m), 1.0, d.data(), int(n), r0 == 0 ? 0.0 : 1.0, C,
                int(n));
  }
  double loss = 0;
  for (int64_t i = 0; i < n; ++i) {
    double row = 0;
    for (int64_t j = i + 1; j < n; ++j) row += H[i * n + j] * C[i * n + j];
    loss += H[i * n + i] * C[i * n + i] + 2 * row;  // H symmetric
  }
  return loss;
}

}  // namespace

double proxy_loss(const float* W, int64_t rows, int64_t cols, const double* H, const core::Encoding& enc) {
  auto C = std::make_unique_for_overwrite<double[]>(static_cast<size_t>(cols * cols));
  return proxy_into(W, rows, cols, H, enc, C.get());
}

namespace {

// U (row-major upper: U[i][j] = A[i * n + j] for j >= i; the other triangle is garbage) with
// UᵀU = (H + λI)⁻¹, for H permuted by perm with the diagonal `diag` (dead columns 1).
// The reference takes chol(H), cholesky_inverse, then the upper chol of H⁻¹ (4n³/3 flops). The
// same U (the Cholesky factor is unique) in 2n³/3: with P the reversal, write P H P = RᵀR (R
// upper, dpotrf 'U'); then H = (P Rᵀ P)(P R P) with P R P lower, so H⁻¹ = (P R P)⁻¹ (P R P)⁻ᵀ and
// U = (P R P)⁻ᵀ = P R⁻ᵀ P (upper): U[i][j] = R⁻¹[n−1−j][n−1−i]. R⁻¹ (dtrtri) is column-major,
// R⁻¹[r][c] at r + c·n; reversing the whole buffer puts U[i][j] at i·n + j.
using Buffer = std::unique_ptr<double[]>;  // n×n, uninitialized (no n² memset, no extra page touching)

bool factor(const double* H, const std::vector<int64_t>& perm, const std::vector<double>& diag, int64_t n, double lambda,
            Buffer& A) {
  if (!A) A = std::make_unique_for_overwrite<double[]>(static_cast<size_t>(n * n));
  for (int64_t a = 0; a < n; ++a) {
    const int64_t pa = perm[n - 1 - a];
    for (int64_t b = 0; b < n; ++b) A[a * n + b] = a == b ? diag[pa] + lambda : H[pa * n + perm[n - 1 - b]];
  }
  if (n == 0) return true;
  const lapack_int N = static_cast<lapack_int>(n);
  if (LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', N, A.get(), N) != 0) return false;
  if (LAPACKE_dtrtri(LAPACK_COL_MAJOR, 'U', 'N', N, A.get(), N) != 0) return false;
  std::reverse(A.get(), A.get() + n * n);
  for (int64_t i = 0; i < n; ++i)
    if (!(A[i * n + i] > 0.0) || !std::isfinite(A[i * n + i])) return false;
  return true;
}

// w[r] -= u * e[r] (a product, then a difference: no fused multiply-add, as the reference's
// torch ops). SSE2 because -O2 does not vectorize it; this is the inner loop of GPTQ.
void sub_scaled(float u, const float* e, float* w, int64_t n) {
  int64_t r = 0;
#if defined(__SSE2__)
  const __m128 vu = _mm_set1_ps(u);
  for (; r + 8 <= n; r += 8) {
    _mm_storeu_ps(w + r, _mm_sub_ps(_mm_loadu_ps(w + r), _mm_mul_ps(vu, _mm_loadu_ps(e + r))));
    _mm_storeu_ps(w + r + 4, _mm_sub_ps(_mm_loadu_ps(w + r + 4), _mm_mul_ps(vu, _mm_loadu_ps(e + r + 4))));
  }
#endif
  for (; r < n; ++r) w[r] -= u * e[r];
}

// The quantizer of one codec, with per-(row, group) parameters. A ggml block type's group is its
// block: `find` chooses the block's scales as encode_row does (into the block's bytes) and keeps
// each sub-block's grid; codes are stored as q − qmin and set into the blocks at the end.
struct Quantizer {
  const CodecSpec& c;
  int64_t rows, ng, gl;
  int maxq = 0;
  std::vector<IntParams> ip;
  std::vector<TernaryLevels> tl;
  GgmlGridInfo gg;
  int64_t nsub = 0, rb = 0, block_bytes = 0;
  core::Tensor blocks;              // Ggml: [rows, row bytes]
  std::vector<float> step, offset;  // Ggml: per (row, block, sub-block)
  Quantizer(const CodecSpec& c, int64_t rows, int64_t cols) : c(c), rows(rows) {
    gl = c.group == 0 ? cols : c.group;
    if (c.kind == CodecSpec::Kind::Ggml) {
      gg = *ggml_grid_info(c.ggml);
      rb = static_cast<int64_t>(ggml_row_bytes(c.ggml, cols));  // Error::invalid unless whole blocks
      block_bytes = static_cast<int64_t>(ggml_type_info(c.ggml).type_size);
      ng = cols / gl;
      nsub = gl / gg.sub;
      blocks = core::Tensor::zeros(core::DType::U8, {rows, rb});
      step.resize(static_cast<size_t>(rows * ng * nsub));
      offset.resize(step.size());
      return;
    }
    ng = c.kind == CodecSpec::Kind::Int ? IntN::num_groups(c.group, cols) : Ternary::num_groups(c.group, cols);
    if (c.kind == CodecSpec::Kind::Int) {
      maxq = (1 << c.bits) - 1;
      ip.resize(static_cast<size_t>(rows * ng));
    } else {
      tl.resize(static_cast<size_t>(rows * ng));
    }
  }
  uint8_t* block(int64_t r, int64_t g) { return blocks.mutable_data() + r * rb + g * block_bytes; }
  void find(int64_t r, int64_t g, const float* x, int64_t n) {
    if (c.kind == CodecSpec::Kind::Ggml) {
      encode_row(c.ggml, x, n, block(r, g));
      ggml_block_grid(c.ggml, block(r, g), step.data() + (r * ng + g) * nsub, offset.data() + (r * ng + g) * nsub);
    } else if (c.kind == CodecSpec::Kind::Int) {
      ip[r * ng + g] = int_params(x, n, 1, c.bits, c.symmetric);
    } else {
      tl[r * ng + g] = ternary_levels(x, n, 1, c.grid, c.symmetric);
    }
  }
  // The code of w, the k-th value of its group, and its value.
  uint8_t code(int64_t r, int64_t g, int64_t k, float w, float* value) const {
    if (c.kind == CodecSpec::Kind::Ggml) {
      const size_t s = static_cast<size_t>((r * ng + g) * nsub + k / gg.sub);
      return static_cast<uint8_t>(ggml_grid_code(step[s], offset[s], gg, w, value) - gg.qmin);
    }
    if (c.kind == CodecSpec::Kind::Int) {
      const IntParams& p = ip[r * ng + g];
      const int q = int_code(w, p, maxq);
      *value = p.scale * static_cast<float>(q - p.zero);
      return static_cast<uint8_t>(q);
    }
    const TernaryLevels& l = tl[r * ng + g];
    const int t = ternary_code(w, l, c.grid, c.threshold);
    *value = t == 0 ? 0.0f : t == 1 ? l.lo : l.hi;
    return static_cast<uint8_t>(t);
  }
};

// H-weighted refit of ternary levels for fixed trits (gptq.h). Wz: weights after dead columns.
void refit_weighted(const std::vector<float>& Wz, int64_t rows, int64_t cols, const double* H,
                    const std::vector<uint8_t>& trits, Quantizer& qz) {
  const CodecSpec& c = qz.c;
  const int64_t ng = qz.ng, gl = qz.gl;
  std::vector<double> d(static_cast<size_t>(cols)), g(static_cast<size_t>(cols)), ha(d.size()), hb(d.size());
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* t = trits.data() + r * cols;
    auto value = [&](int64_t j) {
      const TernaryLevels& l = qz.tl[r * ng + j / gl];
      return t[j] == 0 ? 0.0 : t[j] == 1 ? double(l.lo) : double(l.hi);
    };
    for (int64_t j = 0; j < cols; ++j) d[j] = Wz[r * cols + j] - value(j);
    cblas_dsymv(CblasRowMajor, CblasUpper, int(cols), 1.0, H, int(cols), d.data(), 1, 0.0, g.data(), 1);
    for (int it = 0; it < c.refit_iters; ++it) {
      for (int64_t gi = 0; gi < ng; ++gi) {
        const int64_t j0 = gi * gl, j1 = std::min(cols, j0 + gl);
        std::fill(ha.begin(), ha.end(), 0.0);
        std::fill(hb.begin(), hb.end(), 0.0);
        int64_t na = 0, nb = 0;
        for (int64_t j = j0; j < j1; ++j) {
          if (t[j] == 0) continue;
          double* h = t[j] == 1 ? ha.data() : hb.data();
          (t[j] == 1 ? na : nb)++;
          const double* Hj = H + j * cols;
          for (int64_t k = 0; k < cols; ++k) h[k] += Hj[k];
        }
        if (na + nb == 0) continue;
        double Haa = 0, Hab = 0, Hbb = 0, ra = 0, rb = 0;
        for (int64_t j = j0; j < j1; ++j) {
          if (t[j] == 1) Haa += ha[j], Hab += hb[j], ra += g[j];
          else if (t[j] == 2) Hbb += hb[j], rb += g[j];
        }
        TernaryLevels& l = qz.tl[r * ng + gi];
        double dlo = 0, dhi = 0;
        if (c.symmetric) {
          const double vHv = Hbb - 2 * Hab + Haa;  // v = b − a
          if (!(vHv > 0)) continue;
          const double ds = (rb - ra) / vHv;
          const TernaryLevels nl = ternary_fixed(0.0, std::max(0.0, double(l.hi) + ds), c.grid, true);
          dhi = double(nl.hi) - l.hi;
          dlo = -dhi;
          const double dL = -2 * dhi * (rb - ra) + dhi * dhi * vHv;
          if (!(dL < 0)) continue;
          l = nl;
        } else {
          double xlo = 0, xhi = 0;
          const double det = Haa * Hbb - Hab * Hab;
          if (na && nb && det > 1e-12 * std::max(Haa * Hbb, 1e-300)) {
            xlo = (Hbb * ra - Hab * rb) / det;
            xhi = (Haa * rb - Hab * ra) / det;
          } else if (nb && Hbb > 0) {
            xhi = rb / Hbb;
          } else if (na && Haa > 0) {
            xlo = ra / Haa;
          } else {
            continue;
          }
          const TernaryLevels nl =
              ternary_fixed(std::min(0.0, double(l.lo) + xlo), std::max(0.0, double(l.hi) + xhi), c.grid, false);
          dlo = double(nl.lo) - l.lo;
          dhi = double(nl.hi) - l.hi;
          const double dL = -2 * (dlo * ra + dhi * rb) + dlo * dlo * Haa + 2 * dlo * dhi * Hab + dhi * dhi * Hbb;
          if (!(dL < 0)) continue;
          l = nl;
        }
        for (int64_t j = j0; j < j1; ++j) d[j] -= t[j] == 1 ? dlo : t[j] == 2 ? dhi : 0.0;
        for (int64_t k = 0; k < cols; ++k) g[k] -= dlo * ha[k] + dhi * hb[k];
      }
    }
  }
}

void check_inputs(const float* W, int64_t rows, int64_t cols, const double* H, const GptqOptions& o) {
  if (rows < 0 || cols < 0) throw Error::internal("gptq: negative shape");
  if (o.block < 1) throw Error::invalid("gptq: block: expected >= 1, found " + std::to_string(o.block));
  if (!(o.damp >= 0) || !std::isfinite(o.damp)) throw Error::invalid("gptq: damp: expected a number >= 0, found " + std::to_string(o.damp));
  const int64_t bw = core::first_non_finite(core::DType::F32, W, static_cast<size_t>(rows * cols));
  if (bw >= 0)
    throw Error::invalid("gptq: weight [" + std::to_string(bw / cols) + ", " + std::to_string(bw % cols) + "] is not finite");
  const int64_t bh = core::first_non_finite(core::DType::F64, H, static_cast<size_t>(cols * cols));
  if (bh >= 0)
    throw Error::invalid("gptq: Hessian [" + std::to_string(bh / cols) + ", " + std::to_string(bh % cols) + "] is not finite");
}

}  // namespace

std::shared_ptr<const core::Encoding> gptq(const float* W, int64_t rows, int64_t cols, const double* H,
                                           const CodecSpec& c, const GptqOptions& o, GptqInfo* info) {
  check_inputs(W, rows, cols, H, o);
  GptqInfo inf;
  const int64_t n = cols;

  // 1. Dead columns; 2. order.
  std::vector<char> dead(static_cast<size_t>(n));
  std::vector<double> diag(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    dead[i] = H[i * n + i] == 0.0;
    diag[i] = dead[i] ? 1.0 : H[i * n + i];
    inf.dead_columns += dead[i];
  }
  std::vector<int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  if (o.act_order) std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return diag[a] > diag[b]; });
  std::vector<int64_t> pos(static_cast<size_t>(n));
  for (int64_t a = 0; a < n; ++a) pos[perm[a]] = a;

  const double mean_diag = n ? std::accumulate(diag.begin(), diag.end(), 0.0) / static_cast<double>(n) : 0.0;

  // 3, 4. Damping and the factor, with retries.
  Buffer U;  // the factor, then the proxy losses' workspace
  double p = o.damp;
  bool ok = factor(H, perm, diag, n, p * mean_diag, U);
  while (!ok && inf.cholesky_retries < 3) {
    ++inf.cholesky_retries;
    p = p > 0 ? p * 10 : 0.01;
    ok = factor(H, perm, diag, n, p * mean_diag, U);
  }
  inf.damp_used = p;
  if (!ok) {
    inf.rtn_fallback = true;
    auto enc = rtn(W, rows, cols, c);
    inf.proxy_loss_gptq = inf.proxy_loss_rtn = proxy_into(W, rows, cols, H, *enc, U.get());
    if (info) *info = inf;
    return enc;
  }

  // 5. The column loop on Wt [n, rows] (permuted column order, contiguous columns).
  auto Wt = std::make_unique_for_overwrite<float[]>(static_cast<size_t>(n * rows));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) Wt[pos[j] * rows + r] = dead[j] ? 0.0f : W[r * n + j];
  Quantizer qz(c, rows, n);
  std::vector<char> ready(static_cast<size_t>(qz.ng), 0);
  std::vector<uint8_t> codes(static_cast<size_t>(rows * n));
  std::vector<float> gather(static_cast<size_t>(qz.gl)), err, ub;
  const int64_t B = o.block;
  for (int64_t i1 = 0; i1 < n; i1 += B) {
    const int64_t i2 = std::min(n, i1 + B), count = i2 - i1;
    err.resize(static_cast<size_t>(count * rows));  // every entry is written below
    for (int64_t a = i1; a < i2; ++a) {
      const int64_t j = perm[a], g = j / qz.gl;
      if (!ready[g]) {
        ready[g] = 1;
        const int64_t j0 = g * qz.gl, j1 = std::min(n, j0 + qz.gl);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t k = j0; k < j1; ++k) gather[k - j0] = Wt[pos[k] * rows + r];
          qz.find(r, g, gather.data(), j1 - j0);
        }
      }
      float* w = Wt.get() + a * rows;
      float* e = err.data() + (a - i1) * rows;
      const double d = U[a * n + a];
      for (int64_t r = 0; r < rows; ++r) {
        float v;
        codes[r * n + j] = qz.code(r, g, j - g * qz.gl, w[r], &v);
        e[r] = static_cast<float>((static_cast<double>(w[r]) - v) / d);
      }
      for (int64_t b = a + 1; b < i2; ++b) sub_scaled(static_cast<float>(U[a * n + b]), e, Wt.get() + b * rows, rows);
    }
    if (i2 < n) {
      const int64_t rest = n - i2;
      ub.resize(static_cast<size_t>(count * rest));
      for (int64_t a = i1; a < i2; ++a)
        for (int64_t b = i2; b < n; ++b) ub[(a - i1) * rest + (b - i2)] = static_cast<float>(U[a * n + b]);
      // Wt[i2:, :] -= ubᵀ · err
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(rest), int(rows), int(count), -1.0f, ub.data(),
                  int(rest), err.data(), int(rows), 1.0f, Wt.get() + i2 * rows, int(rows));
    }
  }
  Wt.reset();

  // 6. The encoding, in the original column order (codes were written there).
  std::shared_ptr<const core::Encoding> enc;
  if (c.kind == CodecSpec::Kind::Ggml) {
    std::vector<int> q(static_cast<size_t>(qz.gl));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < qz.ng; ++g) {
        for (int64_t k = 0; k < qz.gl; ++k) q[k] = codes[r * n + g * qz.gl + k] + qz.gg.qmin;
        ggml_set_block_codes(c.ggml, qz.block(r, g), q.data());
      }
    enc = std::make_shared<const GgufBlocks>(c.ggml, n, std::move(qz.blocks), /*stored=*/true);
  } else if (c.kind == CodecSpec::Kind::Int) {
    std::vector<float> scales(qz.ip.size());
    std::vector<uint8_t> zeros(c.symmetric ? 0 : qz.ip.size());
    for (size_t i = 0; i < qz.ip.size(); ++i) {
      scales[i] = qz.ip[i].scale;
      if (!c.symmetric) zeros[i] = static_cast<uint8_t>(qz.ip[i].zero);
    }
    enc = IntN::pack(c.bits, c.group, c.symmetric, rows, n, codes.data(), scales.data(), zeros.data());
  } else {
    if (c.refit_iters > 0) {
      std::vector<float> Wz(W, W + rows * n);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < n; ++j)
          if (dead[j]) Wz[r * n + j] = 0.0f;
      refit_weighted(Wz, rows, n, H, codes, qz);
    }
    std::vector<float> lo(qz.tl.size()), hi(qz.tl.size());
    for (size_t i = 0; i < qz.tl.size(); ++i) lo[i] = qz.tl[i].lo, hi[i] = qz.tl[i].hi;
    enc = Ternary::pack(c.grid, c.group, c.symmetric, rows, n, codes.data(), lo.data(), hi.data());
  }
  inf.proxy_loss_gptq = proxy_into(W, rows, cols, H, *enc, U.get());
  inf.proxy_loss_rtn = proxy_into(W, rows, cols, H, *rtn(W, rows, cols, c), U.get());
  if (info) *info = inf;
  return enc;
}

}  // namespace moe::quant
