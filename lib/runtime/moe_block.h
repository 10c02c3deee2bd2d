// The MoE block and the dense MLP on a batch of token rows. Experts run only on the tokens routed
// to them: gather the rows, two GEMMs (gate, up), SiLU-GLU, one GEMM (down), scatter-add weighted.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/observer.h"
#include "runtime/routing.h"
#include "runtime/weights.h"

namespace moe::runtime {

// What the block computed besides its output. logits/routing/tokens are always filled; h/y
// (per-expert intermediates and outputs) and shared_out/shared_gate only when keep_intermediates.
struct MoeDetail {
  MatrixRM logits;                           // [N,E]
  RoutingResult routing;                     // ids/weights [N,k], probs [N,E]
  std::vector<std::vector<int32_t>> tokens;  // per expert, ascending
  std::vector<MatrixRM> h, y;                // per expert [n_e,I], [n_e,H]
  MatrixRM shared_out, shared_gate;          // [N,H], [N,1]
};

// Output [N,H] of the MoE block on x [N,H] (post_attention_layernorm output).
// active (size E, optional): experts marked false are never routed to (see route()).
MatrixRM moe_forward(const MoeWeights& w, const RoutingRule& rule, const MatrixRM& x, MoeDetail* detail = nullptr,
                     bool keep_intermediates = false, const std::vector<bool>* active = nullptr);

// The block's working matrices, kept by a caller that runs many layers of one shape
// (runtime::Forward) so that their storage is allocated, and its pages faulted in by the kernel,
// once: N·k rows each, whatever the routing (every expert's rows one after the other).
struct MoeWorkspace {
  MatrixRM xs, ys;   // [N·k, H] the experts' gathered inputs and (without keep_intermediates) outputs
  MatrixRM shared;   // [N, H] the shared expert's output (without keep_intermediates)
};
// moe_forward into `out` (resized to [N,H], its storage kept when the size is unchanged).
// split_experts, in a run over several MPI ranks (runtime/mpi.h): this rank runs only the routed
// experts it owns and the ranks exchange the experts' outputs y (the shared expert and the router
// run on every rank), so `out` and the y of every expert are the single process's, bit for bit;
// with keep_intermediates the h of an expert this rank does not own is left empty ([0, 0]). A
// collective: every rank calls it for the same layer and batch. Ignored for one rank.
void moe_forward(const MoeWeights& w, const RoutingRule& rule, const MatrixRM& x, MatrixRM& out, MoeWorkspace& ws,
                 MoeDetail* detail = nullptr, bool keep_intermediates = false, const std::vector<bool>* active = nullptr,
                 bool split_experts = false);

// The router logits x·routerᵀ [N,E] (+ the router bias when the rule adds it to the logits:
// gpt_oss), and the bias route() takes for the choice (deepseek_v3's and ernie4_5_moe's correction bias; null
// otherwise). Every caller that routes uses both, so the forward and the passes agree.
MatrixRM router_logits(const MoeWeights& w, const RoutingRule& rule, const MatrixRM& x);
const RowVector* choice_bias(const MoeWeights& w, const RoutingRule& rule);

// The intermediate activations act(gate x + gate_bias, up x + up_bias) [N, I] of an expert or
// dense MLP (MlpWeights::act; biases when present). Not for a novice.
MatrixRM mlp_hidden(const MlpWeights& w, const MatrixRM& x);

// One expert / dense MLP on all rows of x: down(mlp_hidden(x)) + down_bias. h_out receives the
// intermediate activations when given. A novice expert (MlpWeights::novice) gives its constant
// n_e on every row and an empty [N, 0] h_out.
MatrixRM mlp_forward(const MlpWeights& w, const MatrixRM& x, MatrixRM* h_out = nullptr);
// mlp_forward into y (resized to [N, H], its storage kept when the size is unchanged), the
// intermediate activations in buffers of the calling thread that grow to the largest call and are
// kept (not handed out). The same values bit for bit.
void mlp_forward_into(const MlpWeights& w, const MatrixRM& x, MatrixRM& y);

// llama4 (RoutingRule::scales_input): row j of xe [n_e,H], the input of token tokens[j] to expert
// e, times the routing weight of e for that token (what the expert receives).
void scale_expert_inputs(Eigen::Ref<MatrixRM> xe, const RoutingResult& r, const std::vector<int32_t>& tokens, int64_t e);

// llama4 (RoutingRule::scales_input): every row of x [N,H] routed to all E experts (the rule with
// top_k = E, through router_logits and route()), so that scale_expert_inputs over all N rows gives
// what expert e would receive on every token were it chosen (x times sigmoid of its logit).
// `w` needs only the router (and its bias). Error::internal for a rule that weighs the outputs
// (their weights depend on which k experts are chosen).
RoutingResult route_to_every_expert(const MoeWeights& w, const RoutingRule& rule, const MatrixRM& x);

// Per-expert token lists (ascending) of a routing result over E experts.
std::vector<std::vector<int32_t>> tokens_per_expert(const RoutingResult& r, int64_t E);

}  // namespace moe::runtime
