// fp32 copies of one layer's weights, converted from the (lazy, possibly encoded) model tensors.
// The driver converts a layer once, applies it to every window of the batch and releases it,
// so at most one layer is resident in f32 at a time. Orientation is HF's: [out, in], row-major.
#pragma once

#include <Eigen/Core>
#include <optional>
#include <vector>

#include "model/model.h"

namespace moe::runtime {

using MatrixRM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowVector = Eigen::Matrix<float, 1, Eigen::Dynamic>;

// A projection held low-rank (quant/lowrank.h): W = A·B (+ base), A [out, r], B [r, in],
// base [out, in] or empty. The forward runs it as x·Bᵀ·Aᵀ (+ x·baseᵀ): two thin GEMMs.
struct LowRankWeights {
  MatrixRM a, b, base;
  int64_t rows() const { return a.rows(); }
  int64_t cols() const { return b.cols(); }
};

struct MlpWeights {  // down(act(gate x + gate_bias, up x + up_bias)) + down_bias (model::GluActivation)
  // Dense projections; a projection converted with `factored` from a low-rank weight has an empty
  // dense matrix here and its factors in the *_lr member instead (only the forward does that).
  MatrixRM gate;  // [I,H]
  MatrixRM up;    // [I,H]
  MatrixRM down;  // [H,I]
  std::optional<LowRankWeights> gate_lr{}, up_lr{}, down_lr{};
  // Expert biases (gpt_oss): [I], [I], [H]; absent elsewhere.
  std::optional<RowVector> gate_bias{}, up_bias{}, down_bias{};
  model::GluActivation act{};
  // A novice expert (model::Mlp::novice, MoNE): its constant output n_e [H]; the projections are
  // empty and the expert's output on every row is n_e (width 0).
  std::optional<RowVector> novice{};
  int64_t width() const { return novice ? 0 : gate_lr ? gate_lr->rows() : gate.rows(); }
};

// X Wᵀ for a projection held dense (`w`) or low-rank (`lr`): [N, out].
MatrixRM project(const MatrixRM& X, const MatrixRM& w, const std::optional<LowRankWeights>& lr);

// Y = X Wᵀ for a weight W [out, in] as stored (plain bf16/f16/f32/f8 or encoded: int4/int8 groups,
// ternary, sub-1-bit codes, FP8 blocks, not low-rank), X [n, in] with row stride ldx, Y [n, out]
// with row stride ldy. W is decoded to f32 a tile of rows at a time (about 4 MB of f32: 1,024 rows
// of a 1,024-wide weight) into `tile` (the caller's, kept across calls) and each tile is
// multiplied at once, while it is in cache, so no f32 copy of the whole matrix is written. Each
// tile is checked as the whole conversion checks it: NonFiniteError with the same message (the
// index in the whole tensor). n may be 0: W is still decoded and checked.
void project_in_tiles(int64_t n, const float* X, int64_t ldx, const core::Tensor& W, float* Y, int64_t ldy,
                      std::vector<float>& tile);

struct MoeWeights {
  MatrixRM router;                      // [E,H]
  // [E] deepseek_v3 e_score_correction_bias (expert choice only) or gpt_oss router bias (added to
  // the logits: RoutingRule::logit_bias).
  std::optional<RowVector> router_bias;
  std::vector<MlpWeights> experts;      // E (empty when the experts are streamed)
  std::optional<MlpWeights> shared;     // qwen2_moe shared expert
  std::optional<RowVector> shared_gate; // [H] (the [1,H] sigmoid gate row)
  // Streamed routed experts (convert_layer_into with stream_experts; Forward::set_stream_experts):
  // `experts` stays empty and each expert is decoded from `source` when it is needed, so a layer
  // holds a few experts in f32 instead of E: converted whole (expert()) where the caller keeps
  // the intermediates or a projection is low-rank, else a tile of rows at a time
  // (expert_in_tiles, project_in_tiles: no f32 copy of the expert at all). `release`
  // (model::Model::page_releaser, may be empty) hands back an expert's mapped source pages once
  // it is decoded. Converted whole, the results are the same bytes as with every expert converted
  // up front; in tiles, the same where every weight fits one tile (about 2^20 values), else equal
  // up to the order OpenBLAS sums in (a few outputs differ in their last bits).
  const model::MoeBlock* source = nullptr;
  int layer = 0;                        // for error messages ("layer 3: expert 5: gate: ...")
  bool factored = false;                // low-rank projections kept as factors (the forward's choice)
  // [E] each expert's width (0 for a novice) when streamed or converted owned-only; else empty
  std::vector<int64_t> widths;
  model::Model::PageReleaser release;
  bool streamed() const { return source != nullptr; }
  int64_t num_experts() const { return streamed() ? static_cast<int64_t>(widths.size()) : static_cast<int64_t>(experts.size()); }
  int64_t expert_width(int64_t e) const { return !widths.empty() ? widths.at(static_cast<size_t>(e)) : experts.at(static_cast<size_t>(e)).width(); }
  // Expert e in f32: experts[e], or, when streamed, converted into `scratch` (reusing its buffers)
  // and returned. Throws what the conversion throws (NonFiniteError naming layer and expert).
  const MlpWeights& expert(int64_t e, MlpWeights& scratch) const;
  // Whether streamed expert e is run from its stored weights a tile of rows at a time
  // (project_in_tiles) instead of through expert(): streamed, not a novice, no projection kept
  // low-rank (a low-rank one runs as two thin GEMMs on its factors, through expert()) and none
  // whose row ranges cost a decode of the whole weight (Encoding::decodes_row_ranges_alone).
  bool expert_in_tiles(int64_t e) const;
  const model::Mlp& source_expert(int64_t e) const { return source->experts.at(static_cast<size_t>(e)); }
  // Hands streamed expert e's mapped source pages back (`release`; nothing when it is empty).
  void release_expert(int64_t e) const;
};

struct AttnWeights {
  // Standard attention (MLA: k and v empty; q empty when q goes through q_a/q_b).
  MatrixRM q, k, v, o;                     // [nH*d,H], [nKV*d,H], [nKV*d,H], [H,nH*d]
  std::optional<RowVector> q_bias, k_bias, v_bias, o_bias;
  std::optional<RowVector> q_norm, k_norm; // [d] (per head) or [nH*d]/[nKV*d] (full)
  std::optional<RowVector> sinks;          // [nH] gpt_oss attention sinks (one extra logit per head)
  // Multi-head Latent Attention (deepseek_v2/v3; runtime/mla.h). dqk = qk_nope_head_dim +
  // qk_rope_head_dim, r = kv_lora_rank, rq = q_lora_rank. q is [nH*dqk,H] when direct; o is [H,nH*dv].
  MatrixRM q_a, q_b;                       // [rq,H], [nH*dqk,rq] (q_lora_rank set; else empty)
  std::optional<RowVector> q_a_norm;       // [rq]
  MatrixRM kv_a, kv_b;                     // [r+dr,H], [nH*(dn+dv),r] (empty for standard attention)
  RowVector kv_a_norm;                     // [r]
  bool mla() const { return kv_a.size() != 0; }
};

// qwen3_next's Gated DeltaNet (a "linear_attention" layer, runtime/gated_delta_net.h), with
// K = linear_num_key_heads * linear_key_head_dim, V = linear_num_value_heads * linear_value_head_dim.
struct DeltaNetWeights {
  MatrixRM in_proj_qkvz;  // [2K + 2V, H], rows grouped per key head (q, k, v, z of the head's group)
  MatrixRM in_proj_ba;    // [2 * v_heads, H], grouped per key head (b, a)
  MatrixRM conv1d;        // [2K + V, kernel] (the stored [2K + V, 1, kernel] depthwise weight)
  RowVector dt_bias, A_log;  // [v_heads]
  RowVector norm;         // [v_dim] gated RMSNorm weight (not zero-centred)
  MatrixRM out_proj;      // [H, V]
};

struct LayerWeights {
  int index = 0;
  std::optional<DeltaNetWeights> delta_net;  // qwen3_next linear-attention layers (attn then empty)
  RowVector input_norm, post_attn_norm;  // [H]
  std::optional<RowVector> input_norm_bias, post_attn_norm_bias;  // [H] phimoe's LayerNorm biases
  AttnWeights attn;
  std::optional<MoeWeights> moe;
  std::optional<MlpWeights> mlp;
};

// Converts a tensor [rows, cols] (any float dtype) to an f32 row-major matrix.
MatrixRM to_matrix(const core::Tensor& t);
RowVector to_row(const core::Tensor& t);
// Every projection dense (passes that compute on the weights use these).
MlpWeights convert_mlp(const model::Mlp& m);
MoeWeights convert_moe(const model::MoeBlock& b);
// Converts every tensor of layer `l` the forward needs (errors name the layer and role).
// `factored`: MLP and expert projections stored low-rank keep their factors (*_lr) instead of
// being rebuilt dense (what the forward does).
LayerWeights convert_layer(const model::Layer& l, bool factored = false);
// The same into `w`, reusing its buffers where shapes match (no allocation, no page faults when
// consecutive layers have the same shapes: what the layer-sequential driver does).
// `stream_experts`: the routed experts are not converted but streamed (MoeWeights::source, which
// must outlive `w`), their pages handed back to `release` one expert at a time.
// `owned_experts_only`, in a run over several MPI ranks (runtime/mpi.h) and without
// stream_experts: only the routed experts this rank owns are converted; the others are left empty
// (MoeWeights::expert_width still answers for them). For a forward that splits the experts
// (Forward::set_split_experts), which never runs another rank's expert.
void convert_layer_into(const model::Layer& l, LayerWeights& w, bool factored = false, bool stream_experts = false,
                        const model::Model::PageReleaser& release = {}, bool owned_experts_only = false);

}  // namespace moe::runtime
