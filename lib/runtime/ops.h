// Numeric building blocks of the forward: BLAS products, RMSNorm, SiLU-GLU, RoPE tables.
// Every matrix product goes through cblas_sgemm (OpenBLAS).
#pragma once

#include <cstdint>
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

// Row-wise RMSNorm x * rsqrt(mean(x^2) + eps) * w, mean accumulated in double.
MatrixRM rms_norm(const MatrixRM& X, const RowVector& w, double eps);
// In place on `groups` consecutive column groups of width w.size() (per-head norms).
void rms_norm_groups_inplace(MatrixRM& X, const RowVector& w, double eps);

// G <- silu(G) * U (elementwise), silu(g) = g / (1 + exp(-g)).
void silu_mul_inplace(MatrixRM& G, const MatrixRM& U);

// OpenBLAS threads (the process default is OpenBLAS's own choice).
void set_blas_threads(int n);
int blas_threads();

// RoPE angles for positions 0..T-1: cos/sin [T, d/2] in the rotate-half convention.
struct RopeScaling {
  std::string type = "default";  // default | linear | dynamic | llama3
  double factor = 1.0;
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
  int64_t original_max_positions = 0;                   // llama3 / dynamic
};
struct RopeTable {
  int64_t T = 0, d = 0;
  std::vector<float> cos, sin;  // [T * d/2]
  static RopeTable make(int64_t T, int64_t d, double theta, const RopeScaling& s, int64_t max_positions);
  // Rotates every head of X [N, heads*d] in place; row n has position n % T.
  void apply(MatrixRM& X, int64_t heads) const;
};

}  // namespace moe::runtime
