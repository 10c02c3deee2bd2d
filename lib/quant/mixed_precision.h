// Mixed precision per expert (MC-MoE: Huang et al. 2024, "Mixture Compressor for Mixture-of-Experts
// LLMs Gains More"; docs/methods.md): give each item (an expert, or any weight group) one of several
// quantisation widths so that the importance-weighted quantisation loss is smallest within an
// average-bits budget. The choice is an integer program (a multiple-choice knapsack), solved
// exactly with GLPK's branch and cut (glp_intopt):
//   minimise    Σ_j Σ_o importance_j · loss_j[o] · x_jo
//   subject to  Σ_o x_jo = 1                                         for every item j
//               Σ_j Σ_o params_j · bits_o · x_jo ≤ avg_bits · Σ_j params_j
//               x_jo ∈ {0, 1}
// The budget is per call: the caller decides what one call covers (the experts of one layer, or
// every expert of the model, which lets layers trade bits with each other).
#pragma once

#include <string>
#include <vector>

namespace moe::quant {

// One width an item may be stored at.
struct WidthOption {
  std::string codec;      // the encoding's name, for messages and reports ("ternary", "int4-g128")
  double bits_per_param;  // exact stored bits per parameter, scales and offsets included; > 0
};

// One item to give a width (an expert; `name` is used in messages, e.g. "layers.3.experts.5").
struct MixedItem {
  std::string name;
  double params;            // parameter count (> 0): its weight in the budget
  double importance;        // >= 0, e.g. mc_moe_importance(frequency, routing weight)
  std::vector<double> loss; // loss[o] >= 0 for options[o]: the block-output error (e.g. mean
                            // squared error of the MoE block's output on calibration tokens) with
                            // only this item quantised at that width; one entry per option
};

struct MixedResult {
  std::vector<int> choice;  // per item, the index into `options` it gets
  double objective = 0;     // Σ_j importance_j · loss_j[choice_j] (recomputed from the choice)
  double avg_bits = 0;      // Σ_j params_j · bits[choice_j] / Σ_j params_j (<= the budget)
  std::string status;       // "optimal", or with MixedSolve limits "within gap" / "time limit"
  double gap = 0;           // relative gap to the best bound GLPK proved, (objective − bound) /
                            // objective: 0 when "optimal", else an upper bound on the distance
                            // to the optimum
};

// How hard to search. The defaults prove optimality: milliseconds for the experts of one layer
// (64 items × 5 widths), but on a model at once GLPK's branch and bound can take very long (items
// with equal parameter counts give many assignments of nearly the same cost; bench_mixed_precision
// measured 1024 items not proven in 20 s, 4096 not within 1e-5 in 30 s). For a model-wide call
// pass a gap (1e-4: within 0.01% of the optimum) and/or a time limit.
struct MixedSolve {
  double mip_gap = 0;       // stop at this relative gap: status "within gap"
  double time_limit_s = 0;  // 0: none; when reached, the best assignment found: status "time limit"
};

// Solves the program above for `items` (shape: N items, each with options.size() losses) and
// `options` (K widths, any order) under `avg_bits` bits per parameter averaged over the items'
// parameters. Throws Error::invalid for: no items or no options; an option with bits not finite
// or <= 0; avg_bits not finite or below the smallest option's bits (no assignment fits); an item
// whose loss has the wrong size, or whose params, importance or loss is NaN/Inf or negative
// (params must be > 0) — the message names the item; a negative or NaN mip_gap or time limit.
// Throws Error::internal if GLPK fails, or stops (time limit) before it has any assignment.
// GLPK prints nothing.
MixedResult choose_widths(const std::vector<MixedItem>& items, const std::vector<WidthOption>& options, double avg_bits,
                          const MixedSolve& solve = {});

// MC-MoE's importance of an expert: φ^α · w^β, where φ is its activation frequency (share of the
// layer's tokens routed to it) and w its routing weight (sum of its gate probabilities, normalised
// per layer). α = 1, β = 1.5 are the paper's values.
double mc_moe_importance(double frequency, double routing_weight, double alpha = 1.0, double beta = 1.5);

}  // namespace moe::quant
