// Low-rank factorization of expert (and optionally shared-expert, attention, dense-MLP) weights
// (docs/methods.md). Each factorized weight becomes a quant::LowRank encoding (W ≈ A·B, or
// base + A·B), written in the native checkpoint format (docs/FORMAT.md) and run by the forward
// as two thin GEMMs. The numerical core is passes/lowrank.h.
//
// Options (besides "pass", "method"):
//   exactly one rank rule:
//     "ratio": ρ ∈ (0, 1]   kept-parameter ratio per matrix (per shared group for delta/latent:
//                           base or shared factor included): the largest rank whose stored
//                           parameters are <= ρ · the dense parameters
//     "rank": k             the same rank for every matrix (clamped to the largest rank that
//                           still saves memory, with a note in the report)
//     "energy": E ∈ (0, 1]  per matrix, the smallest rank keeping E of Σσ² (of the whitened /
//                           scaled matrix for svdllm / asvd)
//     "budget": R ∈ (0, 1]  one parameter budget, R · the targeted dense parameters, ranks
//                           allocated across matrices and experts by truncation loss per
//                           parameter saved (lowrank::allocate_ranks; a matrix may stay dense,
//                           a rank that saves no memory is never chosen). Its scope:
//   "budget_scope": "model" (default) one budget for the whole model. A planning sweep runs the
//                           calibration windows through the input model layer by layer
//                           (pipeline::Requirements::plan_sweep; memory one layer), decomposes
//                           every targeted matrix on those inputs and keeps only its σ (the
//                           truncation-loss curve: Σ dropped σ², whitened for svdllm, scaled for
//                           asvd, of the deltas / shared group for delta / latent); the ranks are
//                           allocated over all of them at once, then the layer loop decomposes
//                           each matrix again on its own inputs (through the layers already
//                           factorized) and truncates it at the planned rank: two decompositions
//                           per matrix. The first pass of a recipe only. Report: "plans" (ranks
//                           per matrix, the sweep's seconds).
//                   "layer"  R · each layer's targeted parameters, allocated within the layer;
//                           each matrix decomposed once (the layer's decompositions are kept,
//                           then truncated; memory one layer).
//   "targets": "experts"   or a list of: experts, shared (shared experts), attention (q/k/v/o),
//                           dense (dense-layer MLPs), or "all"
//   "alpha": 0.5           asvd: activation exponent
//   "damp": 0.01           every Gram G is used as G + damp · mean(diag G) · I (GPTQ's damping;
//                          experts that saw few calibration tokens have noisy, near-singular
//                          Grams that SVD-LLM overfits; 0 = the papers' plain rule)
//   "shared_v": false      delta: one right factor B shared by all experts' deltas of a matrix type
// Methods:
//   svd     plain truncated SVD of each matrix
//   asvd    ASVD: input channels scaled by RMS activation^alpha (from the calibration Grams;
//           the paper's mean|x| is approximated by the RMS sqrt(G_jj / N))
//   svdllm  SVD-LLM: Cholesky-whitened by the Gram of the matrix's calibration inputs (the
//           tokens routed to each expert; one Cholesky per Gram: an expert's gate and up share
//           it); loss = ‖(W − W′)X‖²_F
//   delta   D²-MoE: per layer and matrix type a frequency-weighted base W_b = Σ f_e W_e stored once,
//           each expert's delta W_e − W_b factorized with SVD-LLM (or a shared B, shared_v)
//   latent  MoLE: per layer a shared input basis for gate/up (B shared, A_e own) and a shared
//           output basis for down (A shared, B_e own), whitened by the summed Grams
// delta and latent apply to routed experts; other targets use svdllm (said in the report).
// Grams come from the calibration windows at each layer's input, pushed through the layers
// already factorized (as GPTQ does): calibration.text is needed for every method but svd.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "passes/pass.h"

namespace moe::passes {

std::unique_ptr<pipeline::Pass> make_factorize(const nlohmann::json& spec, const std::string& method,
                                               const std::string& path);

}  // namespace moe::passes
