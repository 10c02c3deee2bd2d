// Expert initialisation: the seeded draws every method uses, Drop-Upcycling's re-drawn neurons,
// the split (fine-grained) segments of the intermediate neurons (random, balanced k-means on gate
// rows, or on co-activation features over a calibration text) and the scaled / averaged tensors.
// Shapes are HF's [out, in]: gate/up [I, H], down [H, I].
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/model.h"
#include "passes/hungarian.h"  // MatrixXdRM
#include "passes/upcycle/plan.h"

namespace moe::passes::upcycling {

// splitmix64 of a seed and a salt (layer, expert, purpose): independent streams per use.
uint64_t mix(uint64_t seed, uint64_t a, uint64_t b = 0, uint64_t c = 0);

// Standard normal draws (Box–Muller on unit_double: portable, unlike std::normal_distribution).
struct Normal {
  std::mt19937_64 rng;
  bool has = false;
  double spare = 0;
  explicit Normal(uint64_t seed) : rng(seed) {}
  double operator()();
};

// Drop-Upcycling: a seeded fraction r of the I neurons (rows of gate/up, columns of down) re-drawn
// from N(mean, std^2) of the whole matrix; the expert in the dense MLP's dtypes.
model::Mlp drop_expert(const model::Mlp& dense, double r, uint64_t seed);

// Segments of the I neurons into G groups of I/G (sorted indices each): `how` random, kmeans
// (balanced, on L2-normalised gate rows) or coact (balanced, on `coact` [I, tokens]).
std::vector<std::vector<int64_t>> segments(const model::Mlp& dense, int64_t G, const std::string& how, uint64_t seed,
                                           const MatrixXdRM* coact);

// Expert of one segment: rows `idx` of gate/up [S, H], columns of down [H, S], scaled by sg, su, sd.
model::Mlp segment_expert(const model::Mlp& dense, const std::vector<int64_t>& idx, double sg, double su, double sd);

// t times s in t's dtype (t itself when s is 1).
core::Tensor scaled(const core::Tensor& t, double s);
// The elementwise mean of equal-shaped tensors (fp64 sums), in the first one's dtype.
core::Tensor mean_of(const std::vector<const core::Tensor*>& ts);

// split --segmenting coact: per source and layer, |silu(gate x) * up x| of every neuron over the
// first 512 tokens of p.o.text (windows of 128) as rows [I, tokens], L2-normalised, into p.coact.
// Error::invalid naming the text when it tokenizes to fewer than 2 tokens.
void compute_coact(Plan& p);

}  // namespace moe::passes::upcycling
