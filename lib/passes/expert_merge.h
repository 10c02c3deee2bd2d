// Merging the weights of a group of experts into one: neuron alignment (M-SMoE), weighted
// averaging (M-SMoE, HC-SMoE) and the joint-SVD merge with a shared basis (Sub-MoE).
// All in f32 (alignment costs and SVDs in f64); results are f32 matrices the pass stores back
// in the checkpoint's dtype.
#pragma once

#include <vector>

#include "calib/stats.h"
#include "passes/hungarian.h"
#include "runtime/weights.h"

namespace moe::passes {

using runtime::MatrixRM;
using runtime::MlpWeights;
using runtime::RowVector;

// M-SMoE neuron alignment of expert `e` to the reference expert `ref` (same width I):
// C = W1_ref W1_eᵀ + W3_ref W3_eᵀ + W2_refᵀ W2_e (I×I, W1 = gate, W3 = up, W2 = down), and the
// assignment maximising Σ_i C[i, π(i)]. Returns π: neuron i of the aligned expert is neuron π(i)
// of e.
std::vector<int> align_neurons(const MlpWeights& ref, const MlpWeights& e);
// Rows of gate/up and columns of down reordered: new neuron i = old neuron perm[i].
MlpWeights permute_neurons(const MlpWeights& e, const std::vector<int>& perm);

// Σ w_i M_i (weights already normalised to sum 1), all members of equal shape.
MatrixRM weighted_sum(const std::vector<const MatrixRM*>& ms, const std::vector<double>& w);
MlpWeights weighted_average(const std::vector<const MlpWeights*>& ms, const std::vector<double>& w);
// out's activation becomes the members' and its biases (gpt_oss experts) Σ w_i b_i of the members'
// (members of a group have the same biases present; Error::invalid otherwise).
void average_biases(MlpWeights& out, const std::vector<const MlpWeights*>& ms, const std::vector<double>& w);

// Sub-MoE joint SVD merge of one matrix type over a group. Members W_e [m, c] are concatenated
// along the input axis, A = [W_1 S_1 | W_2 S_2 | ...] (S_e = I, or with whitening the lower
// Cholesky factor of gram_e + damp · mean(diag gram_e) · I as in SVD-LLM; S_e = I for an expert
// that saw no tokens), A = U Σ Vᵀ with Vᵀ = [V_1ᵀ | V_2ᵀ | ...]. Each member is W_e = U Σ V_eᵀ S_e⁻¹;
// keeping the shared U_r (r = max(1, round(rank_ratio · min(m, k·c)))) its coefficients are
// Σ_r V_{e,r}ᵀ S_e⁻¹ = U_rᵀ W_e, merged by the weights w (importance, passes/merge.h) and rebuilt:
//   W = U_r Σ_r V_mergedᵀ = U_r (Σ_e w_e U_rᵀ W_e) = U_r U_rᵀ (Σ_e w_e W_e).
// Computed in that last form (no S_e⁻¹ needed). With r = full rank U_r U_rᵀ acts as the identity
// on the members' column space, so the result is the w-weighted average exactly.
// `grams` (optional, one per member, [c, c] f64) enables whitening.
MatrixRM joint_svd_merge(const std::vector<const MatrixRM*>& ms, const std::vector<double>& w, double rank_ratio,
                         const std::vector<const calib::MatrixD*>* grams = nullptr, double damp = 1e-2);

// DERN recombination (passes/merge.h, method dern) of one layer at uniform width. A segment is one
// neuron j of a dropped expert: its gate row, up row and down column. Its similarity to neuron i of a
// retained expert is the cosine of the concatenated [gate row | up row] vectors; the segment goes to
// the retained expert holding its most similar neuron (ties: lower kept index, lower neuron), or is
// discarded when that cosine is below `threshold`. Each neuron i of retained expert r that receives
// segments S_i becomes the weighted average (w_r · n_i + Σ_{s∈S_i} w_{d(s)} · s) / (w_r + Σ w_{d(s)})
// of its gate/up rows and down column, w = `weights` (one per expert of the layer, >= 0; a neuron
// whose weights sum to 0 stays unchanged).
struct DernResult {
  std::vector<MlpWeights> experts;           // one per kept expert, in `kept` order, same width
  std::vector<std::vector<int>> target;      // per dropped expert and neuron: index into kept, -1 discarded
  std::vector<std::vector<double>> cosine;   // per dropped expert and neuron: best cosine found
  std::vector<int> neurons_merged;           // per kept expert: neurons that received segments
};
DernResult dern_recombine(const std::vector<MlpWeights>& experts, const std::vector<int>& kept,
                          const std::vector<int>& dropped, const std::vector<double>& weights, double threshold);

}  // namespace moe::passes
