// GPTQ (Frantar et al. 2022) for any codec of quant/codec.h, as docs/methods.md and the reference
// implementation's fasterquant (IST-DASLab/gptq, gptq.py) do it:
//   1. dead columns (H_ii = 0): H_ii = 1, W[:, i] = 0
//   2. act-order (optional): columns in order of descending diag H (stable for ties)
//   3. damping: H += p · mean(diag H) · I
//   4. U = upper Cholesky factor of H⁻¹, in f64 (the reference's chol, cholesky_inverse, chol
//      give the same U as LAPACKE dpotrf + dtrtri of the reversed H, at half the flops: gptq.cpp)
//   5. columns in blocks of `block`: q = Q(w_i), err = (w_i − q) / U_ii, the rest of the block
//      -= err · U[i, i+1:] (W in f32 as the reference keeps it); after the block the later
//      columns -= Err · U[block, later] (one SGEMM)
//   6. codes un-permuted to the original column order.
// Quantizer parameters: per row (group 0) from the whole row (after step 1) before the loop;
// with groups, a group's parameters are computed from the current, updated values of its
// columns when the first of them is quantized (static_groups off). Groups are always contiguous
// runs of original columns (so the stored layout is the same as RTN's, no g_idx): with act-order
// the group's first quantized column need not be its first column. The reference reads W, not the
// block's working copy, at that point; this implementation reads the working copy, i.e. includes
// the updates from earlier columns of the same block; the two agree whenever every group starts at
// a block boundary (without act-order: the block size a multiple of the group size).
// Ternary under GPTQ is QMoE's setting (per-row minmax; the caller passes damp 0.1).
// A ggml block type (codec.h) is rounded within its grid: a block's scales (and mins) are chosen
// as encode_row chooses them from the block's current values when its first column is quantized
// (so, as for groups, after the updates from earlier blocks), then every value of the block is
// rounded to the nearest point of that grid (quant/gguf_blocks.h: ggml_grid_code) with the error
// fed back as for any codec.
//
// Cholesky failure (of H + damping, or of H⁻¹): the damping p is multiplied by 10 (0 becomes
// 0.01) and the factorisation retried, up to 3 times; then the weight is quantized by RTN. Both
// are recorded in GptqInfo, never silent.
//
// Ternary refit (c.refit_iters > 0) under GPTQ: the trits GPTQ chose are kept and the levels of
// each row/group are set to minimise the H-weighted error (w − q)ᵀ H (w − q) of the row (w the
// weights after step 1, H the caller's): per group, with the other groups' levels fixed, a 2×2
// linear system in (lo, hi) (1×1 in the scale when symmetric), groups visited in order,
// refit_iters sweeps; a step whose f16-rounded levels would not lower the error is skipped, so the
// refit never increases it.
// Memory, besides W and the caller's H: one n×n f64 buffer (U during the column loop, then the
// proxy losses' DᵀD), W transposed in f32 and the codes in u8 (n = cols). BLAS threads are the
// caller's setting (runtime::set_blas_threads).
#pragma once

#include <cstdint>
#include <memory>

#include "core/encoding.h"
#include "quant/codec.h"

namespace moe::quant {

struct GptqOptions {
  double damp = 0.01;    // p: relative to mean(diag H)
  int64_t block = 128;   // columns per lazy-update block
  bool act_order = false;
};

struct GptqInfo {
  double damp_used = 0;       // the relative damping p the factorisation succeeded with (or the last tried)
  int64_t dead_columns = 0;   // columns with H_ii = 0
  int cholesky_retries = 0;   // times the damping was raised (0 to 3)
  bool rtn_fallback = false;  // every factorisation failed: the result is rtn(W, codec)
  double proxy_loss_gptq = 0;  // tr((W − Q) H (W − Q)ᵀ) of the returned Q, with the caller's H
  double proxy_loss_rtn = 0;   // the same for rtn(W, codec)
};

// W [rows, cols] row-major f32; H [cols, cols] row-major, symmetric, Σ x xᵀ over the inputs (any
// positive scale). Throws Error::invalid on a non-finite W or H, a block < 1, a damping < 0.
std::shared_ptr<const core::Encoding> gptq(const float* W, int64_t rows, int64_t cols, const double* H,
                                           const CodecSpec& c, const GptqOptions& o, GptqInfo* info);

// tr((W − Q) H (W − Q)ᵀ) with Q = enc dequantized, in f64 (Σ_ij H_ij (DᵀD)_ij, D = W − Q: one
// DSYRK over chunks of rows).
double proxy_loss(const float* W, int64_t rows, int64_t cols, const double* H, const core::Encoding& enc);

}  // namespace moe::quant
