// Delta-compressed experts: `quantize --method delta-ternary` (docs/delta.md). For experts that
// share a parent (copy-upcycled and then trained, BTX/BAM-style merges of fine-tunes), each MoE
// layer's routed experts of one matrix type (gate, up, down) are stored as
//   base = (1/E) Σ_e W_e           the mean of the layer's experts, rounded to the experts' dtype
//                                  (bf16 when they are encoded), stored once (a shared part);
//                                  with "parent", that dense model's MLP matrix of the layer,
//   W_e ≈ base + s_e · sign(D_e) ⊙ M_e,   D_e = W_e − base,
// with M_e the m_e largest |D_e| (ties: lower flat index first; zero deltas never kept) and
// s_e = mean |D_e| over M_e, which is also the least-squares scale for those signs and that mask
// (min_s ‖D − s·sign(D)⊙M‖ is reached at s = Σ_M |D| / m). Encoding: quant/delta_ternary.h.
//
// Options (besides "pass", "method"):
//   "density": 0.1     share of each expert matrix's entries kept, in (0, 1]: m = min(round(ρ·n),
//                      nonzero deltas) with n = out·in
//   "max_error": E     instead of density: per expert matrix the smallest m whose relative
//                      reconstruction error ‖W_e − Ŵ_e‖_F / ‖W_e‖_F is <= E, in (0, 1)
//                      (computed exactly for every m from the sorted |D_e|: the residual is
//                      ‖D‖² − (Σ_{top m} |D|)² / m, which is not monotone in m: past some m, more
//                      small deltas under one scale fit worse); when no m reaches E, the m with the
//                      least error is kept (the report says so for that matrix)
//   "parent": PATH     the dense checkpoint the experts were upcycled from (same layer count; every
//                      MoE layer's MLP of the experts' shapes, else Error::invalid naming the key):
//                      its MLP matrices are the bases instead of the experts' mean
// Only routed experts are changed (novices and experts with biases are refused: Error::invalid
// naming the layer); shared experts, attention, routers keep what they are. Experts stored
// encoded are read dequantized (said in the plan). No calibration is used. Reported per matrix:
// density, scale, relative error, stored bits per parameter (the base's share included).
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "passes/pass.h"
#include "runtime/weights.h"

namespace moe::passes {

std::unique_ptr<pipeline::Pass> make_delta_ternary(const nlohmann::json& spec, const std::string& path);

// The sparse ternary delta of one expert matrix against its base (flat row-major [out, in]):
// kept positions ascending, their signs, the scale, and the relative error ‖W − Ŵ‖_F / ‖W‖_F
// (0 when W = 0). Exactly one of density (in (0, 1]) and max_error (in (0, 1)) is used: density
// when max_error < 0. Throws Error::invalid when a delta is not finite.
struct SparseDelta {
  std::vector<int64_t> positions;
  std::vector<bool> negative;
  float scale = 0;
  double rel_error = 0;
  bool reached = true;  // max_error: whether some m reached it (else the m of least error)
};
SparseDelta sparse_delta(const runtime::MatrixRM& w, const runtime::MatrixRM& base, double density, double max_error);

}  // namespace moe::passes
