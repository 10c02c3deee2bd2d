// Expert-aware smoothing and router alignment for quantize (passes/quantize.h options "smooth",
// "smooth_alpha", "align_router"; docs/smoothing.md).
//
// Defined in passes/quantize.cpp, their only user.
//
// Smoothing (SmoothQuant, Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training
// Quantization for Large Language Models"; the aggregation over experts is EAQuant's, Fu et al.
// 2025, "EAQuant: Enhancing Post-Training Quantization for MoE Models via Expert-Aware
// Optimization"): the MoE block input x [N, H] (post-attention norm output) is read by every
// routed expert's gate and up projections, the shared expert (and its gate row) and the router.
// One per-input-channel scale vector s [H] serves all of them:
//   s_j = 2^round(log2( max_r  max_{t in T_r} |x_tj|^α / max_i |W_r,ij|^(1−α) ))
// over the readers r (routed expert e: T_e = the tokens routed to e, W_e = [gate_e; up_e]; the
// shared expert: every token, W = [gate; up; shared-expert gate row]; the router: every token,
// W = router), terms whose activation or weight maximum is 0 left out (no term at all: s_j = 1).
// The fold divides the norm weight (and LayerNorm bias) by s and multiplies the columns of every
// reader by s, so x·Wᵀ is unchanged. Rounding s to a power of two (an exponent in [-30, 30]) makes
// the fold exact in f32, bf16 and f16 storage, not only up to rounding: the smoothed float model
// computes bit for bit what the input does (the intermediate rounding of x/s and W·s is exact).
//
// Router alignment: after a layer's experts are quantized, the router weight R [E, H] is re-fitted
// so that its logits on the quantized model's block inputs Xq [N, H] match the input model's
// logits on its own block inputs Xr: closed-form ridge regression toward the current router Rc,
//   R' = argmin ||Xq R'ᵀ − Xr R0ᵀ||² + λ ||R' − Rc||²,  λ = ridge · tr(XqᵀXq) / H,
// solved in f64 (LDLT of XqᵀXq + λI). EAQuant minimises a KL divergence between the routers'
// distributions by gradient steps instead; the least-squares fit of the logits is its closed-form
// stand-in. R' is stored in the router's dtype and kept only when the share of calibration tokens
// whose top-k set equals the input model's rises (else the router is left as it was).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "runtime/routing.h"
#include "runtime/weights.h"

namespace moe::passes {

using runtime::MatrixRM;
using runtime::RowVector;

// One reader of the smoothed input: its weight [out, H] (rows of several matrices may be stacked
// by giving several readers the same tokens) and the rows of x it reads (null: every row).
struct SmoothReader {
  const MatrixRM* weight = nullptr;
  const std::vector<int32_t>* tokens = nullptr;
};

// The scale vector s [H] of the formula above; `alpha` in [0, 1]. Throws Error::internal on
// shape mismatches.
std::vector<double> smoothing_scales(const MatrixRM& x, const std::vector<SmoothReader>& readers, double alpha);

// Top-k set agreement: the share of rows whose expert sets (order ignored) in `a` and `b` [N, k]
// are equal (0 when N = 0). Throws Error::internal when the shapes differ.
double topk_set_agreement(const runtime::IndexMatrix& a, const runtime::IndexMatrix& b);

struct RouterFit {
  MatrixRM router;       // R' [E, H] in f32
  double before = 0;     // top-k agreement of Rc on Xq with R0 on Xr
  double after = 0;      // the same for R' (as given to `round`, when set)
  int64_t tokens = 0;
  double lambda = 0;
};

// Re-fits the router (formula above). `current` Rc [E, H] (the router after smoothing, if any),
// `reference` R0 [E, H] (the input model's), `bias` the router bias [E] (added to the logits when
// rule.logit_bias, else the choice bias of deepseek_v3; null when none), `xq`/`xr` [N, H] the same
// tokens' block inputs in the quantized and the input model (xq already divided by the smoothing
// scales). `round` maps R' to what will be stored (the router's dtype) before `after` is measured.
// `ridge` is λ relative to the mean diagonal of XqᵀXq. Throws Error::internal when the shapes do
// not agree or the ridge system is not positive definite.
RouterFit fit_router(const MatrixRM& current, const MatrixRM& reference, const RowVector* bias,
                     const runtime::RoutingRule& rule, const MatrixRM& xq, const MatrixRM& xr, double ridge,
                     const std::function<MatrixRM(const MatrixRM&)>& round);

}  // namespace moe::passes
