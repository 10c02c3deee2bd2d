// The observer that computes the routing statistics of docs/methods.md while the layer-sequential
// forward runs (calib/calibrate.h drives it). It may see a layer in several batches of windows:
// set_token_offset() before each batch tells it where the batch sits in the token stream, and
// take_layer() / take_grams() after the last batch of a layer finish that layer.
//
// Every sum is accumulated in double, token by token in stream order (one thread), so the
// result depends only on the forward's numbers, not on timing.
//
// What each statistic uses (trace = runtime::MoeTrace):
//   count, weight_sum, coact   trace.routing (the family's own ids and applied weights)
//   prob_sum                    trace.routing.probs (softmax over all logits); for routers that do
//                               not produce it (sigmoid, top-k-softmax) the softmax over all E
//                               logits is computed here, so sum(prob_sum) = tokens for every family
//   reap, out_absmax            trace.y (routed tokens only) and the applied weights
//   logit_sim                   trace.logits: sum over tokens of logit_i * logit_j
//   out_mean, out_cos           every expert on a token sample. Stream token n (n = offset + row,
//                               the index in the calibration stream, windows concatenated in the
//                               chosen order) is sampled when n % S == 0, S = out_stride. Then
//                                 out_mean[e] = ( sum_{n routed to e} y_e(n)
//                                               + S * sum_{n sampled, not routed to e} y_e(n) ) / tokens
//                               Routed rows are exact (trace.h is reused); only the sampled rows
//                               not routed to e run through gate/up here (two GEMMs per expert),
//                               weighted by S in double when h is summed; since down is linear it
//                               is applied once to that sum. For S > 1 this is an estimate of the
//                               mean over all tokens (the unrouted part from a systematic sample,
//                               scaled by S; the sample always starts at stream token 0, so reruns
//                               agree); S = 1 is the exact mean (every token through every expert).
//                               out_cos = mean over the first out_cos_tokens sampled tokens of
//                               cos(y_i(n), y_j(n)), every expert on each of them (S = 1: the first
//                               out_cos_tokens tokens of the stream).
//   gram_in / gram_mid          (--gram) routed rows of trace.x / trace.h, fp64 DSYRK
#pragma once

#include <cstdint>
#include <map>
#include <optional>

#include "calib/stats.h"
#include "runtime/observer.h"
#include "runtime/routing.h"

namespace moe::calib {

struct ObserverOptions {
  bool all_token_stats = true;  // out_mean, out_cos (false: --routed-only)
  bool gram = false;
  int64_t out_cos_tokens = 512;  // sampled tokens for out_cos
  int64_t out_stride = 16;       // S >= 1: every S-th stream token is sampled (1: every token, exact)
  // In a run over several MPI ranks whose forward splits the experts (Forward::set_split_experts):
  // each rank computes the per-expert work (the Grams, out_mean's unrouted rows, the sampled
  // outputs of out_cos) for the experts it owns, and the ranks exchange it, so every rank ends
  // with the single process's statistics bit for bit. on_moe and take_layer are then collectives.
  bool split_experts = false;
};

class StatsObserver : public runtime::Observer {
 public:
  explicit StatsObserver(ObserverOptions o);
  ~StatsObserver() override;
  StatsObserver(const StatsObserver&) = delete;
  StatsObserver& operator=(const StatsObserver&) = delete;

  bool wants_attention_trace() const override { return opt_.gram; }
  bool wants_moe_trace() const override { return true; }
  bool wants_dense_mlp_trace() const override { return opt_.gram; }

  // Index in the whole token stream of row 0 of the next batch.
  void set_token_offset(int64_t first) { offset_ = first; }

  void on_attention(int layer, const runtime::AttnTrace& t) override;
  void on_moe(int layer, const runtime::MoeTrace& t) override;
  void on_dense_mlp(int layer, const runtime::DenseMlpTrace& t) override;

  // Finishes layer l and forgets its accumulators. take_layer: nullopt for layers without an MoE
  // block; take_grams: nullopt without --gram.
  std::optional<LayerStats> take_layer(int l);
  std::optional<LayerGrams> take_grams(int l);

 private:
  struct MoeAcc;
  bool split() const;            // split_experts and more than one rank
  bool mine(int64_t e) const;    // this rank computes expert e's per-expert statistics
  ObserverOptions opt_;
  int64_t offset_ = 0;
  std::map<int, MoeAcc> moe_;
  std::map<int, LayerGrams> grams_;
};

// G += A^T A (upper triangle only) for A [n, d] fp32 row-major, in fp64.
void gram_update(MatrixD& G, const float* A, int64_t n, int64_t d);
// Copies the upper triangle into the lower one.
void gram_symmetrize(MatrixD& G);

// The statistics of one MoE block as it is now (weights w, routing rule) on its inputs x [N,H]
// (post_attention_layernorm outputs, rows in calibration stream order), run in batches of
// batch_rows rows: what calibrate records for that layer when x are the layer's inputs. Used for
// a recipe pass that follows another pass (its experts are no longer the input model's). Super
// expert flags are left false (they need every layer; see Stats::super_flags).
LayerStats block_stats(int layer, const runtime::MoeWeights& w, const runtime::RoutingRule& rule, const runtime::MatrixRM& x,
                       int64_t batch_rows, const ObserverOptions& o);

}  // namespace moe::calib
