// The multi-token-prediction (MTP) layer of DeepSeek-V3 / Kimi-K2 / GLM-4.5 checkpoints
// (num_nextn_predict_layers 1: model.layers.{L}., L = num_hidden_layers, stored among the
// model's extras) run as vLLM runs it for speculative decoding (vllm/model_executor/models/
// deepseek_mtp.py, glm4_moe_mtp.py; the proposer vllm/v1/spec_decode/eagle.py):
//   h      = the decoder's last hidden states after the final norm (what lm_head reads) [N, H]
//   e_i    = embed_tokens(t_{i+1}) (the main model's embedding, which vLLM shares with the MTP
//            draft), zeroed at position 0 (inputs_embeds[positions == 0] = 0)
//   x_i    = eh_proj([enorm(e_i), hnorm(h_i)])            eh_proj [H, 2H]
//   y      = the MTP layer's decoder block on x (attention, MoE block, residuals; positions 0..)
//   logits = shared_head.head(shared_head.norm(y)); lm_head when shared_head.head is not stored
// Position i of a window of T tokens gets token t_{i+1}; the last position's token is the one the
// main model samples, which a window does not have, so the MTP sequence of a window is its first
// T-1 positions (attention is causal: the others do not depend on it).
#pragma once

#include <cstdint>
#include <set>
#include <span>
#include <string>

#include "model/model.h"
#include "runtime/forward.h"

namespace moe::runtime {

// The decoder block (attention, norms, MoE block) of MTP layer `l`: m.layers()[l] once adopted
// (adopt_mtp_layer), else a layer view of the model's extras under the family's names
// (model.layers.{l}.self_attn..., mlp.gate, mlp.experts.{e}..., mlp.shared_experts...); `used`
// (optional) receives the extras' names it reads. Error::corruption naming the tensor when one the
// family requires is missing.
model::Layer mtp_decoder_block(const model::Model& m, int l, std::set<std::string>* used = nullptr);

// Moves the MTP layer's decoder block from m's extras into m.layers() as layer L (after the
// decoder layers), so that calibration, the passes and the writers treat its MoE block as any MoE
// layer's (written back under the same names by Model::layer_outputs); its own tensors (enorm,
// hnorm, eh_proj, shared_head.*, embed_tokens) stay extras. The forward still runs the decoder
// layers only (ForwardSpec::layers is num_hidden_layers); the MTP layer runs through MtpForward.
// Returns L, or -1 when the model has no MTP layer with an MoE block (or it is adopted already).
// Error::unsupported for num_nextn_predict_layers >= 2 (chained MTP layers are not run).
int adopt_mtp_layer(model::Model& m);
// The model's MTP layer when adopted (m.layers() longer than num_hidden_layers), else -1.
int adopted_mtp_layer(const model::Model& m);

// The step from the decoder into the MTP layer, as calibration and the pipeline's layer loops take
// it: X the decoder's last hidden states before the final norm [windows*T, H], tokens the windows'
// ids window-major (windows*T) -> the MTP layer's input [windows*(T-1), H] and its window, T - 1.
// Errors as MtpForward's constructor; Error::internal when the sizes disagree.
struct MtpLayerInput {
  MatrixRM x;    // [windows*(T-1), H]
  int64_t T = 0;  // the window of x: T - 1
};
MtpLayerInput mtp_layer_input(const Forward& f, std::span<const int32_t> tokens, const MatrixRM& X, int64_t T);

class MtpForward {
 public:
  // The model's MTP layer (num_hidden_layers). Error::unsupported when the model has none with an
  // MoE block, or more than one (num_nextn_predict_layers >= 2: chained MTP is not run);
  // Error::corruption when enorm, hnorm, eh_proj [H, 2H] or shared_head.norm is missing.
  explicit MtpForward(const Forward& f);

  int layer() const { return index_; }
  const model::Layer& block() const { return block_; }

  // The MTP layer's input, [windows*(T-1), H] window-major: tokens window-major (windows*T ids),
  // hn the decoder's last hidden states after the final norm [windows*T, H].
  MatrixRM input(std::span<const int32_t> tokens, const MatrixRM& hn, int64_t T) const;
  // The decoder block's weights in f32 (an adopted block as it is in the model now).
  LayerWeights load_block() const;
  // The decoder block on Y [windows*(T-1), H] in place (observers see layer layer()).
  void apply_block(const LayerWeights& w, MatrixRM& Y, int64_t T, std::span<Observer* const> observers = {}) const;
  // shared_head: [windows*(T-1), V].
  MatrixRM logits(const MatrixRM& Y) const;

  // All of it after the decoder: X the decoder's last hidden states before the final norm
  // [windows*T, H] -> MTP logits [windows*(T-1), V].
  MatrixRM run(std::span<const int32_t> tokens, const MatrixRM& X, int64_t T, std::span<Observer* const> observers = {}) const;

 private:
  const Forward& f_;
  int index_ = 0;
  model::Layer block_;
  RowVector enorm_, hnorm_, head_norm_;
  MatrixRM eh_proj_;               // [H, 2H]
  const core::Tensor* head_ = nullptr;  // shared_head.head, else lm_head (tied: the embedding)
};

}  // namespace moe::runtime
