// Numerical core of the `factorize` pass (docs/methods.md): low-rank factorisations of expert
// weights. Pure functions on matrices; no tensors, names or files.
//
// Conventions. A weight W is [m, n] = [out, in] (HF orientation, row-major), y = W x. A Gram
// matrix G = Σ x xᵀ over calibration inputs x ∈ R^n is [n, n] f64 (calib/stats.h: gram_in for
// gate/up, gram_mid for down); writing X = [x_1 … x_N] (n × N), G = X Xᵀ and for any R [m, n]
// ‖R X‖²_F = tr(R G Rᵀ). Every decomposition runs in f64 (LAPACKE dgesdd / dpotrf / dsyevd,
// cblas dtrmm / dtrsm); factors are returned in f32.
//
// Errors: core::Error::invalid for bad inputs (shape mismatch, empty matrix, NaN/Inf, negative
// scales or weights, impossible budgets), the message naming what is wrong; core::Error::internal
// for a rank outside [0, p] or a LAPACK failure (a bug, exit status 1).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "runtime/weights.h"

namespace moe::passes::lowrank {

using MatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// W ≈ A·B with A [m, k], B [k, n]; k = 0 gives A [m, 0], B [0, n] (the product is zero).
struct Factors {
  runtime::MatrixRM a, b;
};

// A full decomposition, computed once so that any rank can be taken cheaply. With M the scaled
// matrix that was decomposed (svd: M = W; asvd: M = W·diag(s); svdllm: M = W·S, S Sᵀ = G + shift·I):
//   M = U diag(sigma) Vᵀ,   W = U diag(sigma) Vᵀ T⁻¹   (T = I, diag(s) or S)
// `vt` holds Vᵀ of M itself; right(k) applies T⁻¹ to its first k rows only (a triangular solve for
// svdllm, never an explicit inverse). Doing that at truncation instead of on all p rows saves
// (p − k)·n² flops of the solve for svdllm. W_k = U_k Σ_k right(k).
struct Spectrum {
  MatrixD u;                  // [m, p], p = min(m, n), orthonormal columns
  std::vector<double> sigma;  // [p], descending, >= 0
  MatrixD vt;                 // [p, n], Vᵀ of the scaled matrix (orthonormal rows)
  std::vector<double> col_scale;            // asvd: s [n] (T = diag(s)); empty otherwise
  std::shared_ptr<const MatrixD> whitening; // svdllm: S [n, n] lower triangular (T = S); null otherwise
  double shift = 0;  // svdllm: λ added to the Gram's diagonal before the Cholesky (0 if none), see whiten()
  std::string note;  // why the method fell back or adjusted its input (empty when it ran as asked)
  int64_t rows = 0, cols = 0;  // m, n

  int rank_limit() const { return static_cast<int>(sigma.size()); }  // p
  // Σ_{i>=k} σ_i², k in [0, p] (else Error::internal). What it measures, by method:
  //   svd    ‖W − W_k‖²_F
  //   asvd   ‖(W − W_k)·diag(s)‖²_F
  //   svdllm ‖(W − W_k) X‖²_F = tr((W − W_k)(G + shift·I)(W − W_k)ᵀ)
  // W_k = U_k Σ_k right(k) is the rank-k reconstruction; it is the best rank-k approximation in
  // that norm (Eckart–Young on M).
  double loss(int k) const;
  // The first k rows of Vᵀ T⁻¹, [k, n]; k in [0, p] (else Error::internal).
  MatrixD right(int k) const;
  // U_k Σ_k right(k), [m, n] f64 (tests and diagnostics).
  MatrixD reconstruct(int k) const;
};

// A = U_k Σ_k^½ [m, k], B = Σ_k^½ right(k) [k, n] (the SVD-LLM split of docs/methods.md), in f32.
// k in [0, p]; k = 0 gives empty factors. Throws Error::internal outside.
Factors truncate(const Spectrum& s, int k);

// Plain truncated SVD (Eckart–Young): W = U Σ Vᵀ via LAPACKE_dgesdd in f64. W [m, n], m, n >= 1,
// finite (else Error::invalid).
Spectrum svd(const runtime::MatrixRM& w);

// ASVD (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition for Compressing
// Large Language Models"): scale input channel j by s_j = act_scale_j^alpha, SVD of W·diag(s),
// B ← B·diag(s)⁻¹ (docs/methods.md, α = 0.5).
//   act_scale [n]: per-input-channel activation magnitude, >= 0 and finite. The paper uses mean|x_j|
//   over the calibration tokens; the factorize pass derives it from the Gram as the RMS
//   sqrt(G_jj / N) (N = tokens routed to the expert), an approximation (RMS >= mean|x|, equal
//   when |x_j| is constant; it weighs outliers more) since the statistics store no mean|x|.
//   Zero entries (channels no token activated) are raised to 1e-6 · max_j act_scale_j before the
//   power, so s stays invertible and the reconstruction finite; such channels still get the
//   smallest weight. All zero (or an empty calibration) → plain SVD (s = 1), said in `note`.
//   alpha finite and >= 0 (0 = plain SVD).
// Throws Error::invalid for act_scale.size() != n, negative/NaN/Inf scales, a bad alpha, bad W.
Spectrum asvd(const runtime::MatrixRM& w, const std::vector<double>& act_scale, double alpha = 0.5);

// The Cholesky whitening of SVD-LLM for a Gram matrix G [n, n]: S lower triangular with
// S Sᵀ = G + shift·I. Computed once per Gram and reusable for every matrix that reads the same
// input (gate and up share gram_in).
struct Whitening {
  std::shared_ptr<const MatrixD> s;  // [n, n] lower triangular; null when `plain`
  double shift = 0;                  // λ added to the diagonal (0 when G was positive definite)
  bool plain = false;                // G was all zero (no token reached the expert): no whitening
  std::string note;                  // what was done when not the plain Cholesky of G
  int64_t dim = 0;                   // n
};
// The rule of docs/methods.md: S = chol(G) (LAPACKE_dpotrf); if G is not positive definite, add
// (−λ_min + 1e−6)·I, λ_min the smallest eigenvalue of G (LAPACKE_dsyevd), and record the λ in
// `shift`. "Not positive definite" means dpotrf fails or a pivot² is <= 1e−10·max_j G_jj
// (numerically singular: S⁻¹ would amplify rounding by more than 1e5). When the 1e−6 of the rule
// is below the rounding level of G's entries (large G) the factorisation can still fail; the
// additive constant then grows tenfold until it succeeds (shift = max(−λ_min, 0) + d; `note`
// says so). All-zero G → plain = true (the caller gets a plain SVD, never NaN).
// Throws Error::invalid for a non-square G, NaN/Inf, a negative diagonal entry, or G not
// symmetric (|G − Gᵀ| > 1e−9·max|G|); `what` names G in messages.
// G is taken by value and factorised in place: pass it with std::move when it is not needed
// afterwards (saves an n×n copy, ~1/4 of the whitening's time at n = 2816).
Whitening whiten(MatrixD gram, const std::string& what = "Gram matrix");

// SVD-LLM (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for Large
// Language Model Compression"): SVD(W S) = U Σ Vᵀ with S from whiten(G); A = U_k Σ_k^½,
// B = Σ_k^½ V_kᵀ S⁻¹ (truncate). loss(k) = ‖(W − W_k) X‖²_F under G + shift·I. An all-zero
// Gram gives the plain SVD with note "Gram matrix is zero (no calibration token reached this
// expert): plain SVD". Throws Error::invalid for G not [n, n] (W [m, n]) and as whiten() / svd().
Spectrum svdllm(const runtime::MatrixRM& w, MatrixD gram);  // std::move(gram) saves a copy
Spectrum svdllm(const runtime::MatrixRM& w, const Whitening& white);

// ‖(W − A·B) X‖²_F = tr(R G Rᵀ), R = W − A·B computed in f64; an empty (0×0) gram means the
// plain ‖R‖²_F. Shapes must agree (Error::invalid). For reporting a loss under a Gram other than
// the one a factorisation was computed with.
double weighted_error(const runtime::MatrixRM& w, const Factors& f, const MatrixD& gram);

// D²-MoE (Gu et al. 2025, "Delta Decompression for MoE-based LLMs Compression"): the base
// W_b = Σ_e ω_e W_e with ω = weights normalised to sum 1 (the pass passes token counts:
// frequency); the deltas Δ_e = W_e − W_b are then factorised (svdllm per expert, or
// shared_spectrum(Side::Right) for one V shared by all). All ws of one shape [m, n], weights
// finite, >= 0, same count, positive sum (else Error::invalid). Summed in f64.
runtime::MatrixRM delta_base(const std::vector<const runtime::MatrixRM*>& ws, const std::vector<double>& weights);
// Δ_e = W_e − base for every e (f32).
std::vector<runtime::MatrixRM> deltas(const std::vector<const runtime::MatrixRM*>& ws, const runtime::MatrixRM& base);

// Low-rank factorisations with one factor shared by the E matrices of one type (all [m, n]):
//   Side::Right  one B [k, n] for every expert, A_e [m, k] each: the input-side basis. Used by
//                D²-MoE's shared-V option (on the deltas) and MoLE's shared projection of gate/up
//                (docs/methods.md).
//                Joint SVD of the stacked [W_1; …; W_E] [E·m, n]; with grams, whitened by the
//                SUMMED Gram G = Σ_e G_e (one S for the stacked matrix), so
//                  loss(k) = Σ_e ‖(W_e − A_e B) X‖²_F,  X = every expert's calibration inputs
//                  together (G = X Xᵀ): expert e's error is weighted by all E experts' tokens,
//                  not by its own (a per-expert weighting has no closed form with a shared B;
//                  weighted_error() gives each expert's loss under its own Gram).
//   Side::Left   one A [m, k] for every expert, B_e [k, n] each: the output-side basis (MoLE for
//                the down projection, whose output is the shared hidden space). Joint SVD of [W_1 S_1 | … | W_E S_E] [m, E·n], each block
//                whitened by its own Gram (S_e S_eᵀ = G_e + shift_e·I; identity for an all-zero
//                G_e), so loss(k) = Σ_e ‖(W_e − A B_e) X_e‖²_F with each expert's own inputs.
// Without grams (nullptr) there is no whitening: loss(k) = Σ_e ‖W_e − W_{e,k}‖²_F.
// At full rank (k = p) every W_e is reproduced. grams, when given: E matrices [n, n].
// Throws Error::invalid for no matrices, unequal shapes, a bad Gram (see whiten()).
enum class Side { Right, Left };
struct SharedSpectrum {
  Side side = Side::Right;
  Spectrum joint;  // Right: u [E·m, p] (rows e·m … of expert e), right(k) = V_kᵀ S⁻¹ [k, n];
                   // Left:  u [m, p], vt [p, E·n] unwhitened, block_whitening applied per block
  std::vector<std::shared_ptr<const MatrixD>> block_whitening;  // Left with grams: S_e (null: none)
  std::vector<double> shifts;  // Right with grams: [1] (the summed Gram's); Left: [E]; else empty
  std::vector<std::string> notes;  // fallbacks (zero Grams), one line each
  int64_t experts = 0, rows = 0, cols = 0;  // E, m, n of each expert matrix
  int rank_limit() const { return joint.rank_limit(); }
  double loss(int k) const { return joint.loss(k); }  // Σ_{i>=k} σ_i² as defined above
};
SharedSpectrum shared_spectrum(const std::vector<const runtime::MatrixRM*>& ws, Side side,
                               const std::vector<const MatrixD*>* grams = nullptr);

// Where Σ_k goes when a shared spectrum is truncated:
//   Balanced   Σ_k^½ on each side (the SVD-LLM split; D²-MoE's shared V)
//   OnExperts  the shared factor is the (whitened) singular basis itself and the per-expert
//              factors carry Σ_k (MoLE: B = V_rᵀ S⁻¹, A_e = W_e S V_r = U_e Σ_r; for Side::Left
//              A = U_r, B_e = Σ_r V_{e,r}ᵀ S_e⁻¹ = U_rᵀ W_e)
enum class SigmaSplit { Balanced, OnExperts };
struct SharedFactors {
  Side side = Side::Right;
  runtime::MatrixRM shared;            // Right: B [k, n]; Left: A [m, k]
  std::vector<runtime::MatrixRM> own;  // Right: A_e [m, k]; Left: B_e [k, n]
  // W_e ≈ own[e]·shared (Right) or shared·own[e] (Left), f32.
  runtime::MatrixRM product(size_t e) const;
  // Parameters stored: shared + Σ own = k·(n + E·m) (Right) or k·(m + E·n) (Left).
  int64_t params() const;
};
// k in [0, p] (else Error::internal).
SharedFactors truncate_shared(const SharedSpectrum& s, int k, SigmaSplit split = SigmaSplit::Balanced);

// Rank for a kept-parameter ratio ρ ∈ (0, 1] (docs/methods.md): ⌊ρ·mn/(m+n)⌋ clamped to [1, min(m, n)].
// Throws Error::invalid for ρ outside (0, 1] or NaN, m or n < 1.
int rank_for_ratio(int64_t m, int64_t n, double ratio);
// Smallest k in [0, p] with Σ_{i<k} σ_i² >= energy·Σ_i σ_i² (energy ∈ [0, 1], else
// Error::invalid); 0 for energy 0 or an all-zero spectrum, never above p.
int rank_for_energy(const Spectrum& s, double energy);
// Largest k with k(m+n) < mn (a factorisation at rank k stores fewer parameters than W); 0 when
// no rank saves memory (e.g. 1×n). Always < min(m, n).
int64_t max_useful_rank(int64_t m, int64_t n);

// Budget allocation (--budget). An item is one factorisable unit: a matrix (cost_per_rank = m+n,
// dense_params = mn) or a shared group (cost_per_rank = n + E·m for Side::Right, dense = E·mn), with
// its spectrum's σ (descending; loss(k) = Σ_{i>=k} σ_i²) and a weight.
struct BudgetItem {
  std::vector<double> sigma;
  int64_t cost_per_rank = 0;  // parameters per unit of rank
  int64_t dense_params = 0;   // parameters when kept dense
  double weight = 1;          // multiplies the item's loss (>= 0, finite)
};
BudgetItem budget_item(const Spectrum& s, double weight = 1);
BudgetItem budget_item(const SharedSpectrum& s, double weight = 1);
// The rank an item keeps dense at (not factorised; loss 0, dense_params parameters).
inline constexpr int kKeepDense = -1;
// Ranks minimising Σ_j weight_j·loss_j(k_j) subject to Σ_j params_j(k_j) <= param_budget, where
// params_j(k) = k·cost_per_rank_j for a factorised k in [1, kmax_j] and dense_params_j for
// kKeepDense; kmax_j = largest k with k·cost_per_rank_j < dense_params_j (ranks that save no
// memory are never chosen: such a matrix stays dense). An item with kmax_j = 0 is always
// kKeepDense (and its dense_params count against the budget).
// Algorithm: every factorisable item starts at rank 1; then steps are taken greedily by gain per
// parameter: rank k → k+1 gains weight·σ_k² for cost_per_rank, and from kmax the step to dense gains
// weight·loss(kmax) for dense_params − kmax·cost_per_rank; a step that no longer fits ends its item,
// a step with no gain is not taken. Ties go to the lower item index (deterministic). Then an
// exchange improvement: undo one item's last step, refill the freed parameters greedily from the
// others, keep the best strictly improving exchange, repeat until none improves (at most 64
// rounds of O(J²)).
// Optimality: among factorised ranks, when every item has the same cost_per_rank (all expert
// matrices of a model: gate, up and down all have m+n = I+H), the greedy alone is exactly
// optimal: the gains σ_k² of an item are non-increasing, so the T largest gains over all items
// form a prefix of each item's list, and taking them maximises the loss removed for T steps. The
// dense step breaks that concavity (it is cheap: at most one rank step, and removes the whole
// tail), and unequal costs make it a knapsack: there the greedy alone can miss the optimum (e.g.
// three 12x8-sized matrices with budget 252: all at rank 4, where two dense and one at rank 3 is
// better) and the exchange step is a heuristic, not a proof. Tests compare with brute force on
// every budget of small cases (equal costs: the same objective on all of them; unequal costs:
// within one step's gain).
// Throws Error::invalid when param_budget is below the minimum (every factorisable item at rank 1,
// the others dense), naming both numbers, or for an inconsistent item.
std::vector<int> allocate_ranks(const std::vector<BudgetItem>& items, int64_t param_budget);
// Parameters of an allocation (Σ_j params_j(k_j)) and its objective (Σ_j weight_j·loss_j(k_j)).
int64_t allocation_params(const std::vector<BudgetItem>& items, const std::vector<int>& ranks);
double allocation_loss(const std::vector<BudgetItem>& items, const std::vector<int>& ranks);

}  // namespace moe::passes::lowrank
