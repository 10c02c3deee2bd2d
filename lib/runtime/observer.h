// Observers watch the layer-sequential forward (runtime/forward.h). The driver calls them, per
// layer l, in this order: on_layer_input, on_attention (if wanted), then on_routing and on_moe (MoE
// layers, if wanted) or on_dense_mlp (dense layers, if wanted), then on_layer_output.
//
// N = all tokens of the batch, window-major: row n is token (n % T) of window (n / T).
// All matrices are fp32, row-major, one token per row. References are valid only during the call.
//
// Observers cost nothing when absent: the driver builds a trace only when at least one observer
// answers true to the matching wants_*() query; the base class answers false to all of them.
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <vector>

#include "runtime/weights.h"

namespace moe::runtime {

using IndexMatrix = Eigen::Matrix<int32_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// The family's routing decision for N tokens (runtime/routing.h computes it).
struct RoutingResult {
  IndexMatrix ids;   // [N,k] expert ids per token, in top-k order (descending score; ties: lower id)
  MatrixRM weights;  // [N,k] weights actually applied to each chosen expert's output
  MatrixRM probs;    // [N,E] softmax over all logits for softmax routers; empty (0x0) otherwise
};

// Everything one MoE block computed for the batch.
struct MoeTrace {
  const MatrixRM& x;              // [N,H] block input (post_attention_layernorm output)
  const MatrixRM& logits;         // [N,E] router logits
  const RoutingResult& routing;   // ids/weights [N,k], probs [N,E]
  // Per expert e (size E): token rows routed to e (ascending), h = silu(gate x) * up x [n_e, I],
  // and y = down h [n_e, H] before the routing weight. Row j of h[e]/y[e] is token tokens[e][j].
  // A forward that splits the experts over MPI ranks (Forward::set_split_experts) leaves h[e]
  // empty ([0, 0]) for an expert this rank does not own; y is every expert's on every rank.
  const std::vector<std::vector<int32_t>>& tokens;
  const std::vector<MatrixRM>& h;
  const std::vector<MatrixRM>& y;
  // qwen2_moe shared expert: its output before the sigmoid gate [N,H] and the gate value
  // sigmoid(shared_gate x) [N,1] (1 when ungated). Empty (0x0) when the block has no shared expert.
  const MatrixRM& shared_out;
  const MatrixRM& shared_gate;
  const MatrixRM& out;            // [N,H] block output (added to the residual stream)
  const MoeWeights& weights;      // the layer's MoE weights as f32 (run experts yourself)
  // llama4 (RoutingRule::scales_input): expert e's input for token n is x[n] times its routing
  // weight (runtime::scale_expert_inputs), h/y are computed from it, and y enters `out` unweighted.
  bool scaled_inputs = false;
};

struct AttnTrace {
  const MatrixRM& x;        // [N,H] input_layernorm output: the input of q/k/v projections
  const MatrixRM& o_input;  // [N, heads*head_dim] attention output before o_proj
  const MatrixRM& out;      // [N,H] o_proj output (added to the residual stream)
  const AttnWeights& weights;
};

struct DenseMlpTrace {
  const MatrixRM& x;    // [N,H] post_attention_layernorm output
  const MatrixRM& h;    // [N,I] silu(gate x) * up x
  const MatrixRM& out;  // [N,H] down h
  const MlpWeights& weights;
};

class Observer {
 public:
  virtual ~Observer() = default;

  // Which traces to build. Traces nobody wants are never built.
  virtual bool wants_attention_trace() const { return false; }
  virtual bool wants_moe_trace() const { return false; }
  virtual bool wants_routing() const { return false; }
  virtual bool wants_dense_mlp_trace() const { return false; }

  // X [N,H]: the residual stream entering layer l (after the embedding for l = 0).
  virtual void on_layer_input(int /*layer*/, const MatrixRM& /*X*/) {}
  virtual void on_attention(int /*layer*/, const AttnTrace& /*t*/) {}
  virtual void on_moe(int /*layer*/, const MoeTrace& /*t*/) {}
  // The routing decision of an MoE layer only (no per-expert intermediates kept): router logits
  // [N,E] and the choice. Called before on_moe when both are wanted.
  virtual void on_routing(int /*layer*/, const MatrixRM& /*logits*/, const RoutingResult& /*r*/) {}
  virtual void on_dense_mlp(int /*layer*/, const DenseMlpTrace& /*t*/) {}
  // X [N,H]: the residual stream leaving layer l.
  virtual void on_layer_output(int /*layer*/, const MatrixRM& /*X*/) {}
};

}  // namespace moe::runtime
