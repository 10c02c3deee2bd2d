// Gram matrices Σ x xᵀ (f64) of the inputs of every projection of one layer, over the
// calibration tokens at that layer's input (for a pipeline: pushed through the layers already
// compressed). What GPTQ's Hessians (passes/quantize.h), SVD-LLM whitening and ASVD scaling
// (passes/factorize.h) need, computed while the runner applies the layer, instead of a
// `calibrate --gram` file.
//
// Memory. The routed experts' Grams are not all held at once: E·(H² + I²)·8 bytes is 105 GB for
// one DeepSeek-V3 layer. What is kept is what they are computed from, the layer's routed
// activations: the MoE block inputs x [N, H] and each expert's intermediate activations
// h_e [n_e, I] (N·H + Σ_e n_e·I floats, about N·(H + k·I) for top-k routing), in RAM or, past the
// memory budget, in a memory-mapped temporary file (io/scratch.h). A pass asks for one expert's
// Grams (expert_in / expert_mid), uses them and releases them; the same expert's Grams are the
// same bytes whichever way the activations are stored and in whichever order experts are asked for.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "calib/stats.h"
#include "io/scratch.h"
#include "runtime/observer.h"
#include "runtime/routing.h"

namespace moe::pipeline {

// Where a layer's routed activations live (calib/input_grams.h).
struct ActivationBudget {
  uint64_t bytes = UINT64_MAX;  // kept in RAM up to this size; spilled past it
  std::filesystem::path spill_dir;  // the folder of the spill file (the output's folder)
};

class InputGrams {
 public:
  int64_t tokens = 0;                 // N
  calib::MatrixD attn_qkv, attn_o;    // [H,H] input of q/k/v, [nH*d, nH*d] input of o_proj
  calib::MatrixD shared_in, shared_mid;  // shared expert (every token)
  calib::MatrixD mlp_in, mlp_mid;        // dense-layer MLP

  // Routed experts (an MoE layer): E, and the tokens routed to each.
  int64_t num_experts() const { return static_cast<int64_t>(rows_.size()); }
  int64_t expert_tokens(int64_t e) const { return static_cast<int64_t>(rows_.at(static_cast<size_t>(e)).size()); }
  // Expert e's Grams, computed on first use and kept until release(e): [H,H] over its routed
  // tokens' block inputs (with the input scaling of scale_inputs applied), [I,I] over its
  // intermediate activations. An expert no token reached has zero Grams. A pass may change them
  // in place (GPTQ's top-up) until it releases them. Error::internal for e out of range.
  calib::MatrixD& expert_in(int64_t e);
  calib::MatrixD& expert_mid(int64_t e);
  void release(int64_t e);
  // Σ_e expert_in(e) in expert order (the MoE block input over all tokens, each counted once per
  // expert it was routed to), computed expert by expert without keeping them.
  calib::MatrixD expert_in_sum();
  // The block inputs as the rest of the layer reads them after smoothing (x · diag(s)): every
  // expert input Gram is then diag(s) G diag(s), those computed already and those to come; the
  // shared expert's too. Repeated calls compose.
  void scale_inputs(const Eigen::VectorXd& s);
  // Bytes of the kept activations, and whether they were spilled.
  uint64_t activation_bytes() const { return acts_.size() * sizeof(float); }
  bool spilled() const { return acts_.spilled(); }

  // Keeps the routed activations of one MoE block's trace (replacing any kept before): the
  // block inputs, token lists and h_e; drops every expert Gram computed before.
  void keep_routed(const runtime::MoeTrace& t, const ActivationBudget& budget);

 private:
  void compute(size_t e);
  std::vector<std::vector<int32_t>> rows_;  // per expert: its token rows in x (ascending)
  std::vector<std::vector<float>> row_scale_;  // llama4: per expert, each row's input scale (empty: 1)
  std::vector<int64_t> width_;              // per expert: I_e
  std::vector<size_t> h_offset_;            // per expert: where h_e starts in acts_
  int64_t N_ = 0, H_ = 0;
  io::ScratchFloats acts_;                  // x [N,H] then h_0, h_1, ... row-major
  std::vector<calib::MatrixD> in_, mid_;    // computed and not released (else empty)
  std::vector<Eigen::VectorXd> scales_;     // scale_inputs calls, in order
};

// The routed experts' and shared expert's Grams of `grams` recomputed for the MoE block `w` on
// its inputs x [N,H] (a later pass in a recipe, after an earlier one changed the experts).
void recompute_moe_grams(InputGrams& grams, const runtime::MoeWeights& w, const runtime::RoutingRule& rule,
                         const runtime::MatrixRM& x, const ActivationBudget& budget);

// Fills an InputGrams during one apply_layer.
class GramCapture final : public runtime::Observer {
 public:
  explicit GramCapture(ActivationBudget budget = {}) : budget_(std::move(budget)) {}
  bool wants_attention_trace() const override { return true; }
  bool wants_moe_trace() const override { return true; }
  bool wants_dense_mlp_trace() const override { return true; }
  void on_attention(int layer, const runtime::AttnTrace& t) override;
  void on_moe(int layer, const runtime::MoeTrace& t) override;
  void on_dense_mlp(int layer, const runtime::DenseMlpTrace& t) override;

  InputGrams grams;

 private:
  ActivationBudget budget_;
};

}  // namespace moe::pipeline
