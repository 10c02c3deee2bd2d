// Gram matrices Σ x xᵀ (f64) of the inputs of every projection of one layer, over the
// calibration tokens at that layer's input (for a pipeline: pushed through the layers already
// compressed). What SVD-LLM whitening and ASVD scaling need (passes/factorize.h), computed while
// the runner applies the layer, instead of a `calibrate --gram` file.
#pragma once

#include <cstdint>
#include <vector>

#include "calib/stats.h"
#include "runtime/observer.h"
#include "runtime/routing.h"

namespace moe::pipeline {

struct InputGrams {
  int64_t tokens = 0;                 // N
  calib::MatrixD attn_qkv, attn_o;    // [H,H] input of q/k/v, [nH*d, nH*d] input of o_proj
  std::vector<calib::MatrixD> expert_in, expert_mid;  // per routed expert: [H,H], [I,I] over its routed tokens
  std::vector<int64_t> expert_tokens;                 // tokens routed to each expert
  calib::MatrixD shared_in, shared_mid;               // shared expert (every token)
  calib::MatrixD mlp_in, mlp_mid;                     // dense-layer MLP
};

// The routed experts' and shared expert's Grams of `grams` recomputed for the MoE block `w` on
// its inputs x [N,H] (a later pass in a recipe, after an earlier one changed the experts).
void recompute_moe_grams(InputGrams& grams, const runtime::MoeWeights& w, const runtime::RoutingRule& rule,
                         const runtime::MatrixRM& x);

// Fills an InputGrams during one apply_layer.
class GramCapture final : public runtime::Observer {
 public:
  bool wants_attention_trace() const override { return true; }
  bool wants_moe_trace() const override { return true; }
  bool wants_dense_mlp_trace() const override { return true; }
  void on_attention(int layer, const runtime::AttnTrace& t) override;
  void on_moe(int layer, const runtime::MoeTrace& t) override;
  void on_dense_mlp(int layer, const runtime::DenseMlpTrace& t) override;

  InputGrams grams;
};

}  // namespace moe::pipeline
