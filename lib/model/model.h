// The logical view every pass works on: per layer {attention tensors and norms by role, MoE block
// (router, experts {gate, up, down}, shared expert(s) and gate) or dense MLP}, plus globals.
// Tensors are lazy views into the mapped checkpoint until a pass replaces them.
// Passes never see on-disk names; the family descriptor maps both ways.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "family/config.h"
#include "family/family.h"

namespace moe::model {

using core::Tensor;

// The native format's novice entry (docs/FORMAT.md): quantization_config.weights[<expert's down
// projection>] = {"encoding": "novice", "parts": {"value": "<down name>.novice"}}, value F32 [H].
extern const char* const kNoviceEncoding;  // "novice"
inline constexpr const char* kNoviceSuffix = ".novice";

// The gated activation of an MLP. Silu: silu(g) * u (every family but gpt_oss). ClampedSwiGlu
// (gpt_oss, transformers' GptOssExperts): g = min(g, limit), u = clamp(u, -limit, limit),
// h = (u + 1) * g * sigmoid(alpha * g).
struct GluActivation {
  enum Kind { Silu, ClampedSwiGlu } kind = Silu;
  float alpha = 1.702f, limit = 7.0f;
  bool operator==(const GluActivation&) const = default;
};

struct Mlp {  // an expert or a dense MLP: down(act(gate x + gate_bias, up x + up_bias)) + down_bias
  Tensor gate, up, down;  // [I,H], [I,H], [H,I]; empty for a novice
  // Expert biases (gpt_oss): [I], [I], [H]; absent in every other family.
  std::optional<Tensor> gate_bias{}, up_bias{}, down_bias{};
  GluActivation act{};
  // A novice (MoNE, docs/methods.md): a pruned expert replaced by the constant n_e [H] (F32), the
  // mean of its outputs over the calibration tokens routed to it. Its output is n_e on every token
  // (still scaled by the gate); gate/up/down are empty. Written only in the native format
  // (docs/FORMAT.md, encoding "novice").
  std::optional<Tensor> novice{};
  bool is_novice() const { return novice.has_value(); }
  int64_t width() const { return novice ? 0 : gate.dim(0); }
  bool has_bias() const { return gate_bias || up_bias || down_bias; }
  // Every tensor of the expert (the novice vector, or gate, up, down and the biases present).
  template <class F>
  void for_each_tensor(F&& f) const {
    if (novice) {
      f(*novice);
      return;
    }
    f(gate);
    f(up);
    f(down);
    for (const auto* b : {&gate_bias, &up_bias, &down_bias})
      if (*b) f(**b);
  }
  int64_t params() const {
    if (novice) return novice->numel();
    int64_t n = gate.numel() + up.numel() + down.numel();
    for (const auto* b : {&gate_bias, &up_bias, &down_bias})
      if (*b) n += (*b)->numel();
    return n;
  }
};

struct MoeBlock {
  Tensor router;                      // [E,H]
  std::optional<Tensor> router_bias;  // [E] (deepseek_v3)
  std::vector<Mlp> experts;
  std::optional<Mlp> shared;          // qwen2_moe shared_expert / deepseek shared_experts
  std::optional<Tensor> shared_gate;  // [1,H] sigmoid gate (qwen2_moe)
  int64_t num_experts() const { return static_cast<int64_t>(experts.size()); }
  int64_t num_novices() const;
  // The width of the block's real experts (novices have none); 0 when every expert is a novice.
  int64_t expert_width() const;
  // The expert parameters a token does not use (what Model::active_params subtracts): all the
  // experts but top_k of them at their mean size; with novices, all but the top_k largest (the
  // real experts: a token may route to top_k real ones, so the active count is an upper bound).
  int64_t inactive_params(int64_t top_k) const;
};

struct Layer {
  int index = 0;
  std::map<std::string, Tensor> tensors;  // attention and norms by role ("q_proj", "input_norm", ...)
  std::optional<MoeBlock> moe;
  std::optional<Mlp> mlp;  // dense layers
  const Tensor* find(const std::string& role) const {
    auto it = tensors.find(role);
    return it == tensors.end() ? nullptr : &it->second;
  }
  // Every tensor of the layer (attention, norms, router, experts, shared expert, dense MLP).
  template <class F>
  void for_each_tensor(F&& f) const {
    for (const auto& [role, t] : tensors) f(t);
    auto mlp_tensors = [&](const Mlp& m) { m.for_each_tensor(f); };
    if (moe) {
      f(moe->router);
      if (moe->router_bias) f(*moe->router_bias);
      for (const auto& e : moe->experts) mlp_tensors(e);
      if (moe->shared) mlp_tensors(*moe->shared);
      if (moe->shared_gate) f(*moe->shared_gate);
    }
    if (mlp) mlp_tensors(*mlp);
  }
};

// Dimensions read from the config and checked against the tensors.
struct Dims {
  int64_t layers = 0, hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0;
  int64_t top_k = 0;
};

// One output tensor: its on-disk name, dtype and shape, and how to produce it (a view of the
// source, or a computed tensor for families fused on disk).
struct OutTensor {
  std::string name;
  core::DType dtype;
  core::Shape shape;
  std::function<Tensor()> make;
  std::vector<std::string> sources;  // source tensor names (to release their pages after writing)
  std::string weight{};              // a part of an encoded weight: that weight's name ("" otherwise)
  // Tensor class (accounting, inspect): embeddings, lm_head, norms, attention, router, experts,
  // shared_experts, dense_mlp, other.
  std::string cls{};
  // Logical parameters this output accounts for: numel for a plain tensor, out * in on the first
  // part of an encoded weight, 0 on its other parts.
  int64_t params = 0;
};

// Parameters and stored bytes per tensor class of a list of outputs (every stored byte counted,
// each shared part once, under the class of its first user).
struct ClassAccount {
  int64_t params = 0;
  uint64_t bytes = 0;
  double bits_per_param() const { return params ? 8.0 * static_cast<double>(bytes) / static_cast<double>(params) : 0.0; }
};
std::map<std::string, ClassAccount> account(const std::vector<OutTensor>& outs);
void account_into(std::map<std::string, ClassAccount>& acc, const std::vector<OutTensor>& outs);
nlohmann::json account_json(const std::map<std::string, ClassAccount>& acc);

// How a model is written.
// The names given to shared parts so far, across the calls that build one output (a part that
// weights of several layers share, such as the checkpoint-wide ternary-dict dictionary, is written
// once, under its first user's name). Held weakly: a part freed and another one made at the same
// address are never taken for each other.
using SharedPartNames =
    std::map<std::weak_ptr<const core::Tensor>, std::string, std::owner_less<std::weak_ptr<const core::Tensor>>>;

struct OutputOptions {
  // Float tensors are written in this dtype; encoded weights as their rule says
  // (core::Encoding::dtype_rule: dequantized, parts converted, or kept).
  std::optional<core::DType> dtype;
  // Every encoded weight written dense (in `dtype`, else Model::materialize_dtype()): a stock
  // checkpoint (`convert --materialize`).
  bool materialize = false;
  // Shared parts already named by earlier calls for the same output (layer_outputs layer by
  // layer, then global_outputs); null: shared parts are looked up within the one call.
  std::shared_ptr<SharedPartNames> shared_parts = nullptr;
  // Accounting of the input as stored (inspect): encoded weights that every writer dequantizes
  // (DtypeRule::Dequantize: GGUF blocks, compressed-tensors / GPTQ / AWQ inputs) are listed as
  // their stored parts, so bits per parameter count the bytes the input holds.
  bool as_stored = false;
  // Encoded weights that every writer dequantizes (DtypeRule::Dequantize) are written as the
  // native encoding holding the same values (core::Encoding::native_form) where there is one:
  // the codes of a GPTQ / AWQ / compressed-tensors input pass through a prune whose output is
  // written as gptq, compressed-tensors or gguf (the staged native output and the exports' plans).
  bool keep_codes = false;
};

class Model {
 public:
  // Builds the view and checks every tensor and shape against config and family.
  static Model load(const io::Checkpoint& ckpt);
  // Whether the checkpoint stores block-scaled FP8 weights (quantization_config fp8): such weights
  // carry their scale (core::Tensor::block_scale) and are written back as FP8 + weight_scale_inv,
  // or dequantized when an output dtype is given (then quantization_config is dropped).
  bool fp8_block_scaled() const { return fp8_block_; }
  // Hands mapped pages of this model's checkpoint back to the OS (io::Checkpoint::release_range;
  // ranges outside its files are ignored; the data stays readable). Empty for models not loaded
  // from a checkpoint. runtime::Forward calls it for each layer it has converted.
  using PageReleaser = std::function<void(const uint8_t*, uint64_t)>;
  const PageReleaser& page_releaser() const { return release_; }
  // Hands back the mapped pages of `t`'s stored tensors (a pass calls it once it has read a source
  // tensor it replaces, so a layer's source pages do not pile up while the layer is worked on).
  void release_pages(const Tensor& t) const {
    if (release_)
      for (const Tensor* p : t.stored_tensors()) release_(p->data(), p->nbytes());
  }

  const FamilyDesc& family() const { return *family_; }
  // The text model's config (for a wrapper family, FamilyDesc::text_model_type: its text_config).
  const Config& config() const { return config_; }
  // A wrapper family's config.json as read (model/wrapped_config.h); null otherwise.
  const nlohmann::json& wrapper_config() const { return wrapper_; }
  Config& mutable_config() { return config_; }
  const Dims& dims() const { return dims_; }
  std::vector<Layer>& layers() { return layers_; }
  const std::vector<Layer>& layers() const { return layers_; }
  std::map<std::string, Tensor>& globals() { return globals_; }
  const std::map<std::string, Tensor>& globals() const { return globals_; }
  bool tied_embeddings() const { return !globals_.count("lm_head"); }
  // Tensors the family does not describe, written back unchanged (e.g. MTP layers).
  const std::vector<std::pair<std::string, Tensor>>& extras() const { return extras_; }
  std::vector<std::pair<std::string, Tensor>>& mutable_extras() { return extras_; }
  // DeepSeek-V3 multi-token-prediction layers (indices >= num_hidden_layers) that carry an MoE
  // block among the extras, checked against the config at load (router, bias, experts 0..E-1).
  const std::vector<int>& mtp_moe_layers() const { return mtp_moe_; }

  // Output tensors in write order: globals first (embed), then layer by layer, then the rest.
  // Float tensors are written as `dtype` when given. An encoded weight kept encoded becomes one
  // output per stored part (`<name><suffix>`; a part shared by several weights of a layer once,
  // under its first user's name) and an entry in `manifest` (weight name -> {"encoding", params,
  // "parts": {role: tensor name}}: the quantization_config "weights" of docs/FORMAT.md).
  std::vector<OutTensor> outputs(const OutputOptions& opts, nlohmann::json* manifest = nullptr) const;
  std::vector<OutTensor> outputs(std::optional<core::DType> dtype = std::nullopt) const { return outputs(OutputOptions{dtype}); }
  std::vector<OutTensor> layer_outputs(int layer, const OutputOptions& opts, nlohmann::json* manifest = nullptr) const;
  std::vector<OutTensor> layer_outputs(int layer, std::optional<core::DType> dtype = std::nullopt) const {
    return layer_outputs(layer, OutputOptions{dtype});
  }
  // Globals (the embedding first unless `with_embed` is false: outputs() writes it before the
  // layers) and the tensors the family does not describe (extras: MTP layers, buffers).
  std::vector<OutTensor> global_outputs(const OutputOptions& opts, nlohmann::json* manifest = nullptr,
                                        bool with_embed = true) const;
  // config.json for the current state: expert counts and widths per family keys (all MoE
  // layers must have the same expert width), num_experts_per_tok clamped, torch_dtype, and
  // quantization_config for the encoded weights written (`manifest` as outputs() fills it;
  // computed from this model when null): the native moe-tool block when any weight has an
  // encoding other than block-scaled FP8 (novices included) or the MoE layers have different
  // expert counts (then with "experts_per_layer", the config's count key the largest;
  // docs/FORMAT.md), the HF fp8 block when all encoded weights are FP8, none when every weight
  // is dense. Error::unsupported for different widths, and for different counts when
  // opts.materialize (stock loaders need one count per model).
  nlohmann::json rewritten_config(const OutputOptions& opts, const nlohmann::json* manifest = nullptr) const;
  nlohmann::json rewritten_config(std::optional<core::DType> dtype = std::nullopt) const {
    return rewritten_config(OutputOptions{dtype});
  }
  // The dtype encoded weights materialize to without --dtype: the config's dtype/torch_dtype
  // when it is bfloat16, float16 or float32, else bf16.
  core::DType materialize_dtype() const;
  // Whether any weight of the model is encoded (low-rank, FP8, ...).
  bool has_encoded_weights() const;
  // Novice experts (MoNE) over all MoE layers: stock formats cannot hold them (docs/FORMAT.md).
  int64_t num_novices() const;
  // Error::unsupported (exit 2) "<what>: the model has N novice experts (...); <why>" when the
  // model has novices: for outputs that must load in stock loaders (convert --materialize) and for
  // the passes, none of which reads them.
  void refuse_novices(const std::string& what, const std::string& why) const;

  // Logical parameters (an encoded weight counts out * in, whatever it stores).
  int64_t total_params() const;
  // Per token: every non-expert tensor of the decoder and top_k routed experts (MoeBlock::inactive_params;
  // extras such as a vision tower or multi-token-prediction layers not counted). A
  // novice counts what it stores, H parameters (its constant).
  int64_t active_params() const;

 private:
  const FamilyDesc* family_ = nullptr;
  Config config_;
  nlohmann::json wrapper_;  // llama4: config.json as read when config_ is its text_config (else null)
  Dims dims_;
  std::vector<Layer> layers_;
  std::map<std::string, Tensor> globals_;
  std::map<std::string, std::string> global_names_;  // role -> on-disk name
  std::vector<std::pair<std::string, Tensor>> extras_;
  bool fp8_block_ = false;  // config.json quantization_config: block-scaled fp8
  std::vector<int> mtp_moe_;
  static void check_mtp_layers(Model& m, const io::Checkpoint& ckpt, int64_t n_experts, int64_t width);
  PageReleaser release_;
};

// Whether layer l of this config is an MoE layer.
bool is_moe_layer(const FamilyDesc& f, const Config& c, int layer);

}  // namespace moe::model
