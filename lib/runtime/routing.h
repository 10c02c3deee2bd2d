// The family's routing rule, usable alone: router logits [N,E] -> per-token expert ids and the
// weights applied to their outputs (docs/methods.md). The forward, calibration and the pruning
// passes all route through route() so they share one definition of every family's rule.
//
// Ties: the top-k selection is a stable sort by descending score, so among equal scores the lower
// expert index comes first. torch.topk on CPU gives the same order for the small k used here in
// practice (it is not documented as stable); exact ties are rare with real-valued logits.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "family/family.h"
#include "model/model.h"
#include "runtime/observer.h"

namespace moe::runtime {

struct RoutingRule {
  std::string family;             // model_type, for messages
  model::Routing kind = model::Routing::None;
  int top_k = 0;
  int num_experts = 0;
  bool renormalize = false;       // SoftmaxTopK: divide the k weights by their sum
  // DeepSeek:
  int n_group = 1, topk_group = 1;
  double routed_scaling_factor = 1.0;
  bool group_limited = false;     // v2 topk_method == "group_limited_greedy" (v3: always)
  // gpt_oss: the router bias is part of the logits (moe_block.h router_logits), not a choice bias.
  bool logit_bias = false;
  // phimoe sparsemixer: router_jitter_noise (the relative mask threshold is 2 x this).
  double jitter_eps = 0.01;
  // ernie4_5_moe: the k weights are divided by max(their sum, moe_norm_min).
  double norm_min = 1e-12;
  // llama4 (Llama4TextMoe): the weight multiplies the chosen expert's input (routed_in = x *
  // score), and the expert outputs are summed unweighted.
  bool scales_input = false;

  // The rule of this family with this config (norm_topk_prob, num_experts_per_tok, ...).
  static RoutingRule from_config(const model::FamilyDesc& f, const model::Config& c);
  static RoutingRule from_model(const model::Model& m) { return from_config(m.family(), m.config()); }
  // Whether route() fills RoutingResult::probs (softmax over all logits).
  bool has_probs() const;
};

// logits [N,E] -> ids/weights [N,k] (+ probs [N,E] for softmax routers).
// `bias` [E]: deepseek_v3 / ernie4_5_moe e_score_correction_bias (choice only). `active` (size E): experts with
// active[e] == false are never chosen (their logits count as -inf: softmax gives them 0), for
// pruning what-ifs. Throws Error::unsupported for routing kinds without an implementation.
RoutingResult route(const RoutingRule& rule, const MatrixRM& logits,
                    const RowVector* bias = nullptr, const std::vector<bool>* active = nullptr);

}  // namespace moe::runtime
