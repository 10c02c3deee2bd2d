// Numeric building blocks of the forward: BLAS products, RMSNorm, SiLU-GLU, RoPE tables.
// Every matrix product goes through cblas_sgemm (OpenBLAS).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "runtime/weights.h"

namespace moe::runtime {

// Row-major C[M,N] = alpha * A[M,K] * B^T + beta * C with B stored [N,K] (HF weight orientation).
void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
             int64_t ldb, float beta, float* C, int64_t ldc);
// Row-major C[M,N] = alpha * A[M,K] * B + beta * C with B stored [K,N].
void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
             int64_t ldb, float beta, float* C, int64_t ldc);

// X W^T (+ b): X [N,in], W [out,in] -> [N,out].
MatrixRM linear(const MatrixRM& X, const MatrixRM& W, const RowVector* bias = nullptr);
// The same into Y, resized to [N,out]. A Y already holding N*out elements keeps its storage, so a
// working matrix reused across layers and calls is allocated (and its pages faulted in by the
// kernel) once. Y must not be X.
void linear_into(const MatrixRM& X, const MatrixRM& W, const RowVector* bias, MatrixRM& Y);

// Row-wise RMSNorm x * rsqrt(mean(x^2) + eps) * w, mean accumulated in double.
MatrixRM rms_norm(const MatrixRM& X, const RowVector& w, double eps);
// rms_norm of `rows` rows of `cols` values at row stride ldx into Y [rows, cols] (storage kept as
// linear_into's).
void rms_norm_into(const float* X, int64_t rows, int64_t cols, int64_t ldx, const RowVector& w, double eps,
                   MatrixRM& Y);
// Row-wise LayerNorm (x - mean) * rsqrt(var + eps) * w + b (biased variance), moments in double
// (phimoe's nn.LayerNorm). X [N,H], w and b [H].
MatrixRM layer_norm(const MatrixRM& X, const RowVector& w, const RowVector& b, double eps);
// The same into Y (storage kept as linear_into's).
void layer_norm_into(const MatrixRM& X, const RowVector& w, const RowVector& b, double eps, MatrixRM& Y);
// In place on `groups` consecutive column groups of width w.size() (per-head norms).
void rms_norm_groups_inplace(MatrixRM& X, const RowVector& w, double eps);

// G <- silu(G) * U (elementwise), silu(g) = g / (1 + exp(-g)).
void silu_mul_inplace(MatrixRM& G, const MatrixRM& U);
// G <- act(G, U) for a model::GluActivation: silu_mul_inplace, or gpt_oss's clamped SwiGLU
// g = min(g, limit), u = clamp(u, -limit, limit), G = (u + 1) * g * sigmoid(alpha * g).
void glu_inplace(MatrixRM& G, const MatrixRM& U, const model::GluActivation& act);
// The same on `size` contiguous values g and u (g at least as aligned as a MatrixRM's storage for
// the same results bit for bit).
void glu_inplace(float* g, const float* u, int64_t size, const model::GluActivation& act);

// OpenBLAS threads (the process default is OpenBLAS's own choice).
void set_blas_threads(int n);
int blas_threads();

// RoPE angles for positions 0..T-1: cos/sin [T, d/2] (frequency i rotates one pair of elements).
struct RopeScaling {
  std::string type = "default";  // default | linear | dynamic | llama3 | yarn
  double factor = 1.0;
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
  int64_t original_max_positions = 0;                   // llama3 / dynamic / yarn (0: max_positions)
  // yarn (transformers' modeling_rope_utils._compute_yarn_parameters):
  double beta_fast = 32.0, beta_slow = 1.0;
  double mscale = 0.0, mscale_all_dim = 0.0;  // 0: absent
  std::optional<double> attention_factor;     // absent: from factor, mscale, mscale_all_dim
  bool truncate = true;
  // longrope (transformers' _compute_longrope_parameters; Phi-3.5-MoE): per-frequency divisors of
  // the default inverse frequencies, [d/2] each; long_factor when the window is longer than
  // original_max_positions, else short_factor. short_mscale / long_mscale (phimoe's
  // PhimoeRotaryEmbedding) replace the attention factor on cos/sin for the same choice.
  std::vector<double> short_factor, long_factor;
  std::optional<double> short_mscale, long_mscale;
};
// yarn's get_mscale(scale, mscale): 1 for scale <= 1, else 0.1 * mscale * ln(scale) + 1.
double yarn_mscale(double scale, double mscale);
// The scaling's factor as transformers' yarn uses it: max_position_embeddings /
// original_max_position_embeddings when the latter is given (and max_positions > 0), else `factor`.
double yarn_factor(const RopeScaling& s, int64_t max_positions);
// longrope's factor on cos and sin for a window of T positions: the short/long mscale when given,
// else attention_factor, else sqrt(1 + ln(f) / ln(original)) with f = max_positions / original
// (1 when f <= 1).
double longrope_attention_factor(const RopeScaling& s, int64_t T, int64_t max_positions);
struct RopeTable {
  int64_t T = 0, d = 0;
  // [T * d/2], already multiplied by the scaling's attention factor (yarn; 1 for the others),
  // as transformers multiplies cos and sin by attention_scaling.
  std::vector<float> cos, sin;
  static RopeTable make(int64_t T, int64_t d, double theta, const RopeScaling& s, int64_t max_positions);
  // Rotates every head of X [N, heads*d] in place (rotate-half pairs (i, i + d/2)); row n has
  // position n % T.
  void apply(MatrixRM& X, int64_t heads) const;
  // The same on `heads` blocks of d columns starting at column `offset` of row-major X [rows, ld],
  // block h at offset + h * stride. `interleaved`: pairs (2i, 2i+1) (DeepSeek's layout), else
  // rotate-half pairs (i, i + d/2).
  void apply(float* X, int64_t rows, int64_t ld, int64_t heads, int64_t stride, int64_t offset,
             bool interleaved) const;
};

}  // namespace moe::runtime
