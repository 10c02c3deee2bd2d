#include "pipeline/gguf_export.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <future>
#include <map>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>
#include <unordered_map>

#include "core/error.h"
#include "core/warn.h"
#include "io/gguf.h"
#include "io/gguf_model.h"
#include "io/gguf_names.h"
#include "model/hybrid_layers.h"
#include "core/mxfp4.h"
#include "quant/intn.h"
#include "quant/ternary.h"
#include "runtime/forward.h"
#include "runtime/parallel.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/tokenizer.h"

namespace moe::pipeline {

namespace {

// A config value in a refusal message, as a stream prints it (1e-05, 0.2, 8).
std::string num_str(double v) {
  std::ostringstream o;
  o << v;
  return o.str();
}

using core::Error;
using io::GgufValue;
using quant::GgmlType;
namespace fs = std::filesystem;

// One output tensor: the source tensors stacked along the slowest dimension (experts) or one.
struct Item {
  io::GgufTensorInfo info;
  std::vector<core::Tensor> parts;
  std::vector<std::optional<core::NativeForm>> native;  // per part: a packed input's codes as intN, or none
  int64_t permute_heads = 0;  // > 0: rows permuted for llama.cpp's RoPE, this many heads
  io::GgufValueMap map = io::GgufValueMap::None;  // the converter's value transform (io::gguf_value_map)
  // Multi-head Latent Attention: the part is kv_b_proj, written as attn_k_b (1) or attn_v_b (2)
  // (io/gguf_names.h kGgufMlaKB), from `mla_heads` heads of mla_nope + mla_v rows.
  int mla_split = 0;
  int64_t mla_heads = 0, mla_nope = 0, mla_v = 0;
  // GgufArch::centre_residual: each row (token_embd; a 1-D bias: its one row) or each column
  // (attn_output, each expert's ffn_down) written with mean 0.
  enum class Centre { None, Rows, Columns } centre = Centre::None;
};

// The type of one tensor whose rows hold `row` values: 1-D tensors, routers and the DeltaNet's
// ssm_conv1d stay F32 (llama.cpp's graph and llama-quantize keep them so); then the first matching --tensor-type; token_embd and
// output, when the main type is a block type other than Q8_0, at Q6_K where the rows are a multiple
// of 256 (as llama-quantize puts output), else Q8_0; else the main type.
// `matched` (optional) is set to the --tensor-type that chose the type, else null.
GgmlType choose_type(const std::string& name, size_t n_dims, int64_t row, GgmlType main, const std::vector<GgufTypeOverride>& ovr,
                     const GgufTypeOverride** matched = nullptr) {
  if (matched) *matched = nullptr;
  const bool bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;  // stacked expert biases are 2-D
  if (n_dims < 2 || bias || name.find("ffn_gate_inp") != std::string::npos || name.find("ssm_conv1d") != std::string::npos)
    return GgmlType::F32;
  for (const auto& o : ovr)
    if (std::regex_search(name, o.re)) {
      if (matched) *matched = &o;
      return o.type;
    }
  if ((name == "token_embd.weight" || name == "output.weight") && quant::ggml_type_info(main).block > 1)
    return main != GgmlType::Q8_0 && row % quant::ggml_type_info(GgmlType::Q6_K).block == 0 ? GgmlType::Q6_K : GgmlType::Q8_0;
  return main;
}

// Rows of a [heads * d, cols] q or k projection reordered as llama.cpp's converter does for the
// interleaved (non-NeoX) RoPE of arch llama: within each head, row 2i + s takes row s * d/2 + i.
void permute_rows(const float* w, int64_t heads, int64_t rows, int64_t cols, float* out) {
  const int64_t d = rows / heads, half = d / 2;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < half; ++i)
      for (int64_t s = 0; s < 2; ++s) std::copy_n(w + (h * d + s * half + i) * cols, cols, out + (h * d + 2 * i + s) * cols);
}

// The block type of symmetric intN codes in groups of `group` (f16 scales, implied zero point
// 2^(bits-1)): groups of 32 of int4 / int8 are Q4_0 / Q8_0 blocks exactly. nullopt otherwise.
std::optional<GgmlType> int_block_type(int bits, int64_t group, bool symmetric, int64_t cols) {
  if (!symmetric || group != 32 || cols % 32 != 0) return std::nullopt;
  if (bits == 4) return GgmlType::Q4_0;
  if (bits == 8) return GgmlType::Q8_0;
  return std::nullopt;
}

// A direct type and, for a packed input's codes (core::Encoding::native_form), the intN they are
// (made when the part is written: write_item).
struct Direct {
  std::optional<GgmlType> type;
  std::optional<core::NativeForm> form;
};

// The block type an encoded weight's codes are already on, so they are copied, not re-quantized:
// moe-tool's symmetric int4 / int8 groups of 32 (int_block_type), and ternary-tq trits (groups of
// 256, one f16 d) are TQ1_0 or TQ2_0 blocks exactly: `wanted` (the type --type / --tensor-type give
// the tensor) when it is one of the two, else TQ1_0, the smaller. A GPTQ / AWQ / compressed-tensors
// input's codes that moe-tool's intN holds exactly (core::Encoding::native_form) follow the intN
// rule. Blocks a ggml codec wrote (`quantize --codec q4_k`: GgufBlocks) are their own type. No
// type for a plain tensor or any other encoding.
Direct direct_type(const core::Tensor& t, GgmlType wanted) {
  // gpt-oss's MXFP4 experts (core/mxfp4.h): their E8M0 scales and E2M1 codes are MXFP4 blocks.
  if (dynamic_cast<const core::Mxfp4*>(t.encoding())) return {GgmlType::MXFP4, std::nullopt};
  if (const auto* gb = dynamic_cast<const quant::GgufBlocks*>(t.encoding())) return {gb->type(), std::nullopt};
  if (const auto* tq = dynamic_cast<const quant::Ternary*>(t.encoding())) {
    if (tq->grid() != quant::TernaryGrid::TQ || !tq->symmetric() || tq->group() != 256 || tq->cols() % 256 != 0) return {};
    return {wanted == GgmlType::TQ2_0 ? GgmlType::TQ2_0 : GgmlType::TQ1_0, std::nullopt};
  }
  if (const auto* q = dynamic_cast<const quant::IntN*>(t.encoding()))
    return {int_block_type(q->bits(), q->group(), q->symmetric(), q->cols()), std::nullopt};
  if (!t.encoding()) return {};
  std::optional<core::NativeForm> f = t.encoding()->native_form();
  if (!f || f->name != "intN") return {};
  const auto type = int_block_type(f->params.value("bits", 0), f->params.value("group", int64_t{0}),
                                   f->params.value("symmetric", false), t.encoding()->cols());
  if (!type) return {};
  return {type, std::move(f)};
}

// Whether an extra tensor (model::Model::extras) belongs to a multi-token-prediction layer, one
// past the decoder layers (the layer prefix, layer L + i, of a family with extra_layers_allowed),
// or to qwen3_next's mtp.* head.
bool mtp_extra(const model::Model& m, const std::string& name) {
  // qwen3_next's head is mtp.* (convert_hf_to_gguf.py's Qwen3NextModel leaves it out as well).
  if (m.family().hybrid_linear_attention && name.rfind("mtp.", 0) == 0) return true;
  const std::string& lp = m.family().layer_prefix;
  const std::string prefix = lp.substr(0, lp.find("{l}"));  // "model.layers."
  if (!m.family().extra_layers_allowed || name.rfind(prefix, 0) != 0) return false;
  const size_t dot = name.find('.', prefix.size());
  const std::string idx = name.substr(prefix.size(), dot == std::string::npos ? std::string::npos : dot - prefix.size());
  return !idx.empty() && idx.size() < 7 && idx.find_first_not_of("0123456789") == std::string::npos &&
         std::stoll(idx) >= m.dims().layers;
}

// Refuses what this exporter cannot write faithfully, before any work (encodings without a block
// type are refused by the plan, naming the tensor, before the file is created). Returns the number
// of leading dense layers (0 unless the architecture has them: GgufArch::leading_dense).
int64_t refuse_unsupported(const model::Model& m, const model::GgufArch& arch, const std::string& src) {
  m.refuse_novices(src, "GGUF has no constant expert; prune them instead");
  int64_t experts = -1, lead = 0;
  for (const auto& layer : m.layers()) {
    const std::string where = "layer " + std::to_string(layer.index);
    if (arch.dense) {  // a dense family's layers are all dense (model::Model); no expert keys to write
      if (layer.moe) throw Error::internal(src + ": " + where + ": an MoE block in the dense family " + m.family().model_type);
      continue;
    }
    if (!layer.moe) {
      if (arch.leading_dense && layer.index == lead) {
        ++lead;
        continue;
      }
      if (arch.interleaved_dense) continue;  // the pattern: refuse_llama4
      throw Error::unsupported(src + ": " + where + " is a dense layer; llama.cpp's " + arch.arch + " needs experts in every layer" +
                               (arch.leading_dense ? " after the leading dense ones" : ""));
    }
    if (experts >= 0 && layer.moe->num_experts() != experts)
      throw Error::unsupported(src + ": " + where + " has " + std::to_string(layer.moe->num_experts()) +
                               " experts, other layers " + std::to_string(experts) + "; GGUF has one expert_count per model");
    experts = layer.moe->num_experts();
  }
  if (experts < 0 && !arch.dense) throw Error::unsupported(src + ": no MoE layer; llama.cpp's " + arch.arch + " is an MoE architecture");
  int64_t vision = 0;
  for (const auto& [name, t] : m.extras()) {
    if (mtp_extra(m, name)) continue;
    // A wrapper's vision tower and projector (llama4): llama.cpp reads them from a separate mmproj
    // file (convert_hf_to_gguf.py --mmproj), which this exporter does not write.
    if (!m.family().text_model_type.empty() && (name.rfind("vision_model.", 0) == 0 || name.rfind("multi_modal_projector.", 0) == 0)) {
      ++vision;
      continue;
    }
    throw Error::unsupported(src + ": tensor " + name + " has no GGUF name in this exporter");
  }
  if (vision > 0)
    core::warn_once(m.family().model_type + ": the text model is exported; the vision tower and projector (" + std::to_string(vision) +
                    " tensors: vision_model.*, multi_modal_projector.*) are not written (llama.cpp reads them from a separate "
                    "mmproj GGUF, which moe-tool does not write)");
  return lead;
}

// Refuses a model that llama.cpp's llama4 graph (GgufArch::llama4_graph) would compute differently:
// its loader fixes the attention (not read from keys) to RoPE on every layer but each 4th, the RoPE
// layers chunked by 8192 tokens, the NoPE layers full with the temperature tuning of floor_scale 8192
// and attn_scale 0.1, the q/k RMS norm after RoPE unless the model has 128 experts; the MoE layers
// every interleave_moe_layer_step-th; the shared expert as wide as the experts; no attention biases;
// the router's top-k logits through a sigmoid scaling each expert's input. Returns the step.
int64_t refuse_llama4(const model::Model& m, const model::GgufArch& arch, const runtime::ForwardSpec& spec,
                      const model::MoeBlock& moe0, const std::string& src) {
  const std::string A = "llama.cpp's " + arch.arch + " ";
  constexpr int64_t kChunk = 8192, kFloor = 8192, kNoRopeStep = 4;
  constexpr double kAttnScale = 0.1;
  if (spec.routing.kind != model::Routing::TopKSigmoid)
    throw Error::unsupported(src + ": routing " + model::routing_name(spec.routing.kind) + ": " + A +
                             "graph routes as top-k logits, sigmoid, the weight on the expert's input");
  for (const char* bias : {"q_bias", "k_bias", "v_bias", "o_bias"})
    if (m.layers().front().find(bias))
      throw Error::unsupported(src + ": attention_bias true: " + A + "loader has no attention biases");
  int64_t step = 0, dense_layer = -1;
  for (const auto& layer : m.layers())
    if (layer.moe) {
      step = layer.index + 1;
      break;
    }
  const bool qk_norm = moe0.num_experts() != 128;  // llama.cpp: use_kq_norm = type != LLM_TYPE_17B_128E
  std::optional<int64_t> dense_width;
  for (const auto& layer : m.layers()) {
    const int64_t l = layer.index;
    const std::string where = src + ": layer " + std::to_string(l) + ": ";
    if (layer.moe.has_value() != ((l + 1) % step == 0))
      throw Error::unsupported(where + (layer.moe ? "MoE" : "dense") + " (moe_layers): " + A + "graph makes every " +
                               std::to_string(step) + "th layer MoE (interleave_moe_layer_step), the others dense");
    if (layer.moe) {
      if (!layer.moe->shared || layer.moe->shared->width() != layer.moe->expert_width())
        throw Error::unsupported(where + "the shared expert is " +
                                 (layer.moe->shared ? std::to_string(layer.moe->shared->width()) + " wide" : std::string("missing")) +
                                 ": " + A + "loader requires one as wide as the experts (" +
                                 std::to_string(layer.moe->expert_width()) + ")");
    } else {
      if (dense_width && layer.mlp->width() != *dense_width)
        throw Error::unsupported(where + "dense MLP " + std::to_string(layer.mlp->width()) + " wide, layer " +
                                 std::to_string(dense_layer) + "'s " + std::to_string(*dense_width) +
                                 ": GGUF has one feed_forward_length");
      dense_width = layer.mlp->width();
      dense_layer = l;
    }
    const runtime::AttnSpec a = spec.layer_specs.empty() ? spec.attn : spec.layer_specs.at(static_cast<size_t>(l));
    const bool rope = (l + 1) % kNoRopeStep != 0;
    if (a.use_rope != rope)
      throw Error::unsupported(where + (a.use_rope ? "RoPE" : "NoPE") + " (no_rope_layers): " + A +
                               "graph uses RoPE on every layer but each 4th");
    if (rope && a.chunk != kChunk)
      throw Error::unsupported(where + (a.chunk > 0 ? "attention_chunk_size " + std::to_string(a.chunk) : std::string("full attention (layer_types)")) +
                               ": " + A + "graph chunks the RoPE layers' attention by 8192 tokens");
    if (!rope && a.chunk != 0)
      throw Error::unsupported(where + "chunked attention (layer_types): " + A + "graph gives the NoPE layers full attention");
    if (!rope && a.floor_scale == 0)
      throw Error::unsupported(src + ": attn_temperature_tuning false: " + A + "graph scales q on the NoPE layers (floor_scale 8192, attn_scale 0.1)");
    if (!rope && a.floor_scale != kFloor)
      throw Error::unsupported(src + ": floor_scale " + num_str(a.floor_scale) + ": " + A +
                               "graph's temperature tuning has floor_scale 8192");
    if (!rope && static_cast<float>(a.attn_scale) != static_cast<float>(kAttnScale))
      throw Error::unsupported(src + ": attn_scale " + num_str(a.attn_scale) + ": " + A +
                               "graph's temperature tuning has attn_scale 0.1");
    if (rope && a.l2_qk_norm != qk_norm)
      throw Error::unsupported(src + ": use_qk_norm " + (a.l2_qk_norm ? "true" : "false") + ": " + A + "graph normalizes q/k " +
                               (qk_norm ? "unless the model has 128 experts" : "not with 128 experts"));
  }
  return step;
}

// Refuses a yarn RoPE llama.cpp's graph would compute differently (GgufArch::yarn): its loader
// reads no yarn_beta_* / attention-factor keys for this architecture (beta_fast 32, beta_slow 1,
// the attention factor 0.1 ln(factor) + 1 of transformers' default), so other values are refused.
// transformers' truncate false (gpt-oss's released configs) leaves the correction range unrounded;
// ggml_rope_yarn_corr_dims always floors / ceils it: exported with a warning, the difference
// measured in docs/gguf.md.
void refuse_yarn(const runtime::RopeScaling& rs, int64_t max_positions, const model::GgufArch& arch, const std::string& src) {
  // transformers' yarn takes max_position_embeddings / original_max_position_embeddings as its
  // factor (runtime::yarn_factor), llama.cpp rope.scaling.factor.
  if (rs.original_max_positions > 0 && std::abs(runtime::yarn_factor(rs, max_positions) - rs.factor) > 1e-9 * rs.factor)
    throw Error::unsupported(src + ": rope_scaling yarn: factor " + num_str(rs.factor) + " is not max_position_embeddings / " +
                             "original_max_position_embeddings (" + num_str(runtime::yarn_factor(rs, max_positions)) +
                             "), which transformers' yarn frequencies use; llama.cpp's " + arch.arch + " uses the factor: " +
                             "set max_position_embeddings to factor x original_max_position_embeddings");
  if (rs.beta_fast != 32.0 || rs.beta_slow != 1.0)
    throw Error::unsupported(src + ": rope_scaling beta_fast " + num_str(rs.beta_fast) + " / beta_slow " + num_str(rs.beta_slow) +
                             ": llama.cpp's " + arch.arch + " loader uses 32 / 1 whatever the file says");
  if (rs.attention_factor || rs.mscale != 0 || rs.mscale_all_dim != 0)
    throw Error::unsupported(src + ": rope_scaling attention_factor / mscale: llama.cpp's " + arch.arch +
                             " loader takes the yarn attention factor from the scaling factor only");
}

// The warning for transformers' truncate false (refuse_yarn), given once nothing is refused.
void warn_untruncated_yarn(const runtime::RopeScaling& rs) {
  if (!rs.truncate)
    core::warn_once("rope_scaling truncate false: llama.cpp rounds the yarn correction range to whole dimensions "
                    "(ggml_rope_yarn_corr_dims), transformers does not: the GGUF's RoPE differs slightly on a few "
                    "dimensions (docs/gguf.md, gpt-oss)");
}

// The window of llama.cpp's sliding layers (GgufArch::swa_pattern: layer l slides when
// l % n < n - 1), 0 for an architecture without one; refuses layer_types llama.cpp would not follow.
int64_t sliding_window(const runtime::ForwardSpec& spec, const model::GgufArch& arch, const std::string& src) {
  int64_t window = 0;
  for (int64_t l = 0; l < spec.layers; ++l) {
    const int64_t w = spec.layer_window.empty() ? 0 : spec.layer_window[static_cast<size_t>(l)];
    const bool slides = arch.swa_pattern > 0 && l % arch.swa_pattern < arch.swa_pattern - 1;
    if (w > 0 && !slides)
      throw Error::unsupported(src + ": layer_types[" + std::to_string(l) + "] sliding_attention: llama.cpp's " + arch.arch +
                               (arch.swa_pattern > 0 ? " attends fully in every " + std::to_string(arch.swa_pattern) + "th layer (l % " +
                                                           std::to_string(arch.swa_pattern) + " == " + std::to_string(arch.swa_pattern - 1) + ")"
                                                     : " graph has no sliding window"));
    if (slides && w <= 0)
      throw Error::unsupported(src + ": layer_types[" + std::to_string(l) + "] full_attention (or sliding_window null): llama.cpp's " +
                               arch.arch + " slides layer l when l % " + std::to_string(arch.swa_pattern) + " < " +
                               std::to_string(arch.swa_pattern - 1));
    if (slides && window > 0 && w != window)
      throw Error::unsupported(src + ": layer " + std::to_string(l) + " slides over " + std::to_string(w) + " positions, another over " +
                               std::to_string(window) + ": GGUF has one attention.sliding_window");
    if (slides) window = w;
  }
  return window;
}

// The factor on cos and sin of a longrope RoPE (GgufArch::longrope), refused where llama.cpp
// would compute another: its graph divides the frequencies by rope_factors_short or
// rope_factors_long ([head_dim / 2] each) and multiplies cos and sin by one
// rope.scaling.attn_factor whatever the window, where transformers takes short_mscale or
// long_mscale (else the attention factor) with the factors of the same window.
double longrope_attn_factor(const runtime::ForwardSpec& spec, int64_t head_dim, const model::GgufArch& arch, const std::string& src) {
  const auto& rs = spec.rope_scaling;
  for (const auto& [key, f] : {std::pair{"short_factor", &rs.short_factor}, {"long_factor", &rs.long_factor}})
    if (static_cast<int64_t>(f->size()) != head_dim / 2)
      throw Error::unsupported(src + ": rope_scaling." + key + ": " + std::to_string(f->size()) + " values, expected head_dim / 2 = " +
                               std::to_string(head_dim / 2));
  const int64_t orig = rs.original_max_positions > 0 ? rs.original_max_positions : spec.max_positions;
  const double short_factor = runtime::longrope_attention_factor(rs, orig, spec.max_positions);
  const double long_factor = runtime::longrope_attention_factor(rs, orig + 1, spec.max_positions);
  if (!std::isfinite(short_factor) || short_factor <= 0)
    throw Error::unsupported(src + ": rope_scaling: the factor on cos and sin (short_mscale / long_mscale, else the attention "
                             "factor) is " + num_str(short_factor) + ": llama.cpp's rope.scaling.attn_factor must be positive");
  if (std::abs(short_factor - long_factor) > 1e-6 * std::abs(short_factor))
    throw Error::unsupported(src + ": rope_scaling: the short window's factor on cos and sin (" + num_str(short_factor) +
                             ") differs from the long window's (" + num_str(long_factor) + "): llama.cpp's " + arch.arch +
                             " applies one rope.scaling.attn_factor to both");
  return short_factor;
}

// Refuses experts whose activation llama.cpp's graph does not compute (GgufArch::swiglu_oai:
// ggml_swiglu_oai with alpha 1.702 and limit 7 fixed in llama-graph.cpp; else plain SiLU).
void refuse_activation(const model::Model& m, const model::GgufArch& arch, const std::string& src) {
  for (const auto& layer : m.layers()) {
    if (!layer.moe) {  // every architecture's dense FFN is plain SwiGLU (LLM_FFN_SILU, LLM_FFN_PAR)
      if (layer.mlp && layer.mlp->act.kind != model::GluActivation::Silu)
        throw Error::unsupported(src + ": layer " + std::to_string(layer.index) + ": a dense MLP with clamped SwiGLU: llama.cpp's " +
                                 arch.arch + " graph applies plain SwiGLU");
      continue;
    }
    for (const auto& e : layer.moe->experts) {
      const model::GluActivation& a = e.act;
      if (arch.swiglu_oai && (a.kind != model::GluActivation::ClampedSwiGlu || a.alpha != 1.702f || a.limit != 7.0f)) {
        const std::string clamp = "swiglu_alpha " + num_str(a.alpha) + ", swiglu_limit " + num_str(a.limit);
        throw Error::unsupported(src + ": " + (a.kind == model::GluActivation::ClampedSwiGlu ? clamp : std::string("plain SwiGLU")) +
                                 ": llama.cpp's " + arch.arch + " graph clamps with alpha 1.702 and limit 7 (fixed in llama-graph.cpp)");
      }
      if (!arch.swiglu_oai && a.kind != model::GluActivation::Silu)
        throw Error::unsupported(src + ": clamped SwiGLU experts: llama.cpp's " + arch.arch + " graph applies plain SwiGLU");
    }
  }
}

// Refuses a model whose MoE block llama.cpp's graph would compute differently where the
// architecture takes the routing from the metadata (GgufArch::routing_keys: build_moe_ffn with
// sigmoid gating, the choice bias exp_probs_b, group scores as the sum of each group's top 2).
void refuse_routing(const model::Model& m, const model::GgufArch& arch, const runtime::ForwardSpec& spec,
                    const model::MoeBlock& moe0, const std::string& src) {
  const auto& r = spec.routing;
  const std::string A = arch.arch;
  // deepseek2 also routes as DeepSeek-V2 (expert_gating_func softmax, no choice bias).
  const bool softmax = arch.mla && r.kind == model::Routing::DeepSeekV2;
  if (r.kind != model::Routing::DeepSeekV3 && !softmax)
    throw Error::unsupported(src + ": routing " + model::routing_name(r.kind) + ": llama.cpp's " + A +
                             " graph routes as DeepSeek-V3 (sigmoid, choice bias)");
  if (softmax && r.group_limited && r.n_group > 1 && r.topk_group < r.n_group)
    throw Error::unsupported(src + ": topk_method group_limited_greedy (n_group " + std::to_string(r.n_group) + ", topk_group " +
                             std::to_string(r.topk_group) + "): llama.cpp's " + A +
                             " graph scores a group by the sum of its top 2 experts, DeepSeek-V2 by its best one");
  if (!softmax && !moe0.router_bias)
    throw Error::unsupported(src + ": no router bias (" + m.family().router_bias + "): llama.cpp's " + A +
                             " loader requires exp_probs_b in every MoE layer");
  if (r.group_limited && r.n_group > 1 && r.topk_group < r.n_group && r.num_experts / r.n_group < 2)
    throw Error::unsupported(src + ": n_group " + std::to_string(r.n_group) + " makes groups of one expert of " +
                             std::to_string(r.num_experts) + ": llama.cpp's " + A +
                             " graph scores a group by its top 2 and needs fewer groups than experts");
  if (moe0.shared && moe0.shared->width() % moe0.expert_width() != 0)
    throw Error::unsupported(src + ": shared expert width " + std::to_string(moe0.shared->width()) +
                             " is not a multiple of the expert width " + std::to_string(moe0.expert_width()) + ": llama.cpp's " +
                             A + " sizes it as expert_shared_count experts");
  for (const char* bias : {"q_bias", "k_bias", "v_bias"})
    if (!arch.mla && !m.layers().front().find(bias))
      throw Error::unsupported(src + ": attention_bias false (no " + bias + "): llama.cpp's " + A +
                               " loader requires attn_q/k/v biases");
}

// Refuses a model whose routing llama.cpp's softmax-with-choice-bias graph (GgufArch::choice_bias:
// build_moe_ffn with softmax gating, exp_probs_b, norm_w) would compute differently.
void refuse_choice_bias(const model::GgufArch& arch, const runtime::ForwardSpec& spec, const std::string& src) {
  const auto& r = spec.routing;
  if (r.kind != model::Routing::SoftmaxBiasTopK)
    throw Error::unsupported(src + ": routing " + model::routing_name(r.kind) + ": llama.cpp's " + arch.arch +
                             " graph routes as softmax, choice bias, top-k renormalized");
  // llama.cpp divides the chosen weights by max(sum, 2^-14) (the smallest normal f16); ours by
  // max(sum, moe_norm_min). Below 2^-14 they differ only on sums under 2^-14, above it on every
  // sum under moe_norm_min, which a model may reach.
  constexpr double kLlamaWeightsSumMin = 6.103515625e-5;
  if (r.norm_min > kLlamaWeightsSumMin)
    throw Error::unsupported(src + ": moe_norm_min " + num_str(r.norm_min) + ": llama.cpp's " + arch.arch +
                             " graph clamps the top-k weight sum at 6.103515625e-05 only");
}

// Refuses a hybrid model (FamilyDesc::hybrid_linear_attention: qwen3_next) that llama.cpp's
// qwen3next would load or compute differently: its loader takes layer i as linear attention iff
// (i + 1) % 4 != 0 (full_attention_interval is not read), sizes the DeltaNet's values by
// ssm.state_size (the key head width), requires the shared expert and its gate in every layer and
// has no attention biases.
void refuse_hybrid(const model::Model& m, const model::GgufArch& arch, const std::string& src) {
  const std::string A = arch.arch;
  const auto linear = model::linear_attention_layers(m.config(), m.dims().layers);
  for (size_t i = 0; i < linear.size(); ++i)
    if (linear[i] != ((i + 1) % 4 != 0))
      throw Error::unsupported(src + ": layer " + std::to_string(i) + " is " + (linear[i] ? "linear" : "full") +
                               " attention (layer_types / full_attention_interval): llama.cpp's " + A +
                               " takes every 4th layer (3, 7, ...) as full attention and the others as linear");
  const auto dn = model::delta_net_dims(m.config());
  if (dn.k_dim != dn.v_dim)
    throw Error::unsupported(src + ": linear_value_head_dim " + std::to_string(dn.v_dim) + " != linear_key_head_dim " +
                             std::to_string(dn.k_dim) + ": llama.cpp's " + A + " sizes the value heads by ssm.state_size");
  for (const auto& layer : m.layers()) {
    const std::string where = "layer " + std::to_string(layer.index);
    if (layer.moe && (!layer.moe->shared || !layer.moe->shared_gate))
      throw Error::unsupported(src + ": " + where + " has no shared expert with its gate: llama.cpp's " + A +
                               " loader requires ffn_*_shexp and ffn_gate_inp_shexp in every layer");
    for (const char* bias : {"q_bias", "k_bias", "v_bias", "o_bias"})
      if (layer.find(bias))
        throw Error::unsupported(src + ": attention_bias true (" + where + " " + bias + "): llama.cpp's " + A +
                                 " has no attention biases");
  }
}

// The Multi-head Latent Attention keys of llama.cpp's deepseek2 (GgufArch::mla), as its converter
// (DeepseekV2Model.set_gguf_parameters) writes them, after refusing what its loader or graph (src/
// llama-model.cpp, src/models/deepseek2.cpp at ec98e2002) would read or compute differently.
struct MlaKeys {
  int64_t nope = 0, v = 0;
  io::GgufMetadata kv;  // keys after "ARCH."
};
MlaKeys mla_keys(const model::Model& m, const model::GgufArch& arch, const runtime::ForwardSpec& spec, const std::string& src) {
  const runtime::MlaSpec& a = *spec.mla;
  const std::string A = arch.arch;
  const int64_t layers = m.dims().layers;
  // The loader takes a model for DeepSeek-V2-Lite (q as one projection, no q_lora_rank) by its
  // layer count alone: n_layer 26 or 27.
  const bool lite = layers == 26 || layers == 27;
  if (a.q_lora_rank == 0 && !lite)
    throw Error::unsupported(src + ": q_lora_rank null with " + std::to_string(layers) + " layers: llama.cpp's " + A +
                             " loader reads q as one projection (attn_q) only for 26 or 27 layers (DeepSeek-V2-Lite) and "
                             "otherwise requires attn_q_a / attn_q_b");
  if (a.q_lora_rank > 0 && lite)
    throw Error::unsupported(src + ": q_lora_rank " + std::to_string(a.q_lora_rank) + " with " + std::to_string(layers) +
                             " layers: llama.cpp's " + A + " loader takes 26 or 27 layers as DeepSeek-V2-Lite (attn_q, no q lora)");
  if (!a.interleaved)
    throw Error::unsupported(src + ": rope_interleave false: llama.cpp's " + A + " graph rotates interleaved pairs (2i, 2i+1)");
  if (m.globals().find("lm_head") == m.globals().end())
    throw Error::unsupported(src + ": tie_word_embeddings true: llama.cpp's " + A + " loader requires output.weight");
  if (static_cast<float>(spec.eps) != static_cast<float>(a.lora_norm_eps))
    throw Error::unsupported(src + ": rms_norm_eps " + num_str(spec.eps) + ": llama.cpp's " + A +
                             " graph normalizes q_a and kv_a with it, transformers with 1e-06");
  MlaKeys k;
  k.nope = a.qk_nope_head_dim;
  k.v = a.v_head_dim;
  auto u32 = [&](const char* key, int64_t v) { k.kv.emplace_back(key, GgufValue::u32(static_cast<uint32_t>(v))); };
  if (a.q_lora_rank > 0) u32("attention.q_lora_rank", a.q_lora_rank);
  u32("attention.kv_lora_rank", a.kv_lora_rank);
  // As the converter: the absorbed (MQA) head sizes, then the decompressed ones.
  u32("attention.key_length", a.kv_lora_rank + a.qk_rope_head_dim);
  u32("attention.value_length", a.kv_lora_rank);
  u32("attention.key_length_mla", a.qk_head_dim());
  u32("attention.value_length_mla", a.v_head_dim);
  u32("rope.dimension_count", a.qk_rope_head_dim);
  const runtime::RopeScaling& rs = spec.rope_scaling;
  if (rs.type != "yarn") return k;
  const double f = rs.factor;
  const std::string y = src + ": rope_scaling yarn: ";
  if (!(f > 1)) throw Error::unsupported(y + "factor " + num_str(f) + ": llama.cpp's yarn needs a factor above 1");
  if (rs.original_max_positions <= 0)
    throw Error::unsupported(y + "no original_max_position_embeddings (llama.cpp's rope.scaling.original_context_length)");
  if (std::abs(double(spec.max_positions) / double(rs.original_max_positions) - f) > 1e-9 * f)
    throw Error::unsupported(y + "factor " + num_str(f) + " is not max_position_embeddings / original_max_position_embeddings (" +
                             std::to_string(spec.max_positions) + " / " + std::to_string(rs.original_max_positions) +
                             "), which transformers' yarn frequencies use; llama.cpp uses the factor for both");
  if (rs.beta_fast != 32 || rs.beta_slow != 1)
    throw Error::unsupported(y + "beta_fast " + num_str(rs.beta_fast) + ", beta_slow " + num_str(rs.beta_slow) +
                             ": llama.cpp's " + A + " loader reads no yarn_beta_fast / yarn_beta_slow and uses 32 / 1");
  if (!rs.truncate) throw Error::unsupported(y + "truncate false: llama.cpp rounds the correction range outwards");
  // transformers: cos/sin times `att` (attention_factor, else get_mscale(f, mscale) /
  // get_mscale(f, mscale_all_dim) when both are set, else get_mscale(f)); the softmax scale times
  // get_mscale(f, mscale_all_dim)^2 when mscale_all_dim is set. llama.cpp (llama-context.cpp,
  // deepseek2.cpp): with yarn_log_multiplier L (the key holds 0.1 L) cos/sin times attn_factor R and
  // the scale times (R (1 + 0.1 L ln f))^2; without it cos/sin times R get_mscale(f) and the scale
  // times (R get_mscale(f))^2. The converter writes L = mscale_all_dim and no R, exact when mscale
  // = mscale_all_dim (R = 1); otherwise R and L are solved for here.
  const double g1 = runtime::yarn_mscale(f, 1.0);
  const double att = rs.attention_factor          ? *rs.attention_factor
                     : rs.mscale && rs.mscale_all_dim ? runtime::yarn_mscale(f, rs.mscale) / runtime::yarn_mscale(f, rs.mscale_all_dim)
                                                      : g1;
  const double root = rs.mscale_all_dim ? runtime::yarn_mscale(f, rs.mscale_all_dim) : 1.0;  // sqrt of the scale's factor
  const double log_mul = (root / att - 1) / (0.1 * std::log(f));
  const double R = std::abs(log_mul) > 1e-12 ? att : att / g1;
  k.kv.emplace_back("rope.scaling.type", GgufValue::string("yarn"));
  k.kv.emplace_back("rope.scaling.factor", GgufValue::f32(static_cast<float>(f)));
  u32("rope.scaling.original_context_length", rs.original_max_positions);
  if (std::abs(log_mul) > 1e-12) k.kv.emplace_back("rope.scaling.yarn_log_multiplier", GgufValue::f32(static_cast<float>(0.1 * log_mul)));
  if (std::abs(R - 1) > 1e-12) k.kv.emplace_back("rope.scaling.attn_factor", GgufValue::f32(static_cast<float>(R)));
  return k;
}

// tokenizer.ggml.* for a byte-level BPE tokenizer (llama.cpp's "gpt2" model).
// Whether tokenizer.json is SentencePiece-style BPE (byte_fallback, "▁" for spaces: Llama 2's,
// Mistral's, Phi-3's), as transformers' LlamaConverter writes it: the pre_tokenizer Metaspace
// (replacement "▁", split false) or, in older files, the normalizer Prepend("▁") + Replace(" ",
// "▁"). Its value: whether a "▁" is prepended (llama.cpp's add_space_prefix); nullopt otherwise.
std::optional<bool> sentencepiece_space_prefix(const nlohmann::json& j) {
  const nlohmann::json& m = j.contains("model") ? j["model"] : nlohmann::json();
  if (!m.is_object() || m.value("type", "") != "BPE" || !m.value("byte_fallback", false)) return std::nullopt;
  const nlohmann::json pt = j.value("pre_tokenizer", nlohmann::json()), norm = j.value("normalizer", nlohmann::json());
  if (pt.is_object() && pt.value("type", "") == "Metaspace" && pt.value("replacement", "") == "\u2581" && !pt.value("split", true) &&
      norm.is_null()) {
    const std::string scheme = pt.value("prepend_scheme", pt.value("add_prefix_space", true) ? "always" : "never");
    if (scheme == "first" || scheme == "always") return true;
    if (scheme == "never") return false;
    return std::nullopt;
  }
  if (pt.is_null() && norm.is_object() && norm.value("type", "") == "Sequence") {
    const nlohmann::json ns = norm.value("normalizers", nlohmann::json::array());
    const nlohmann::json prepend = {{"type", "Prepend"}, {"prepend", "\u2581"}};
    const nlohmann::json replace = {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\u2581"}};
    if (ns.size() == 2 && ns[0] == prepend && ns[1] == replace) return true;
    if (ns.size() == 1 && ns[0] == replace) return false;
  }
  return std::nullopt;
}

// The vocabulary as llama.cpp's token rows, one per embedding row: the tokenizer's pieces ("[PADn]"
// past them) and their llama_token_type: 3 special tokens, 4 other added tokens, 5 padding, else 1.
struct VocabRows {
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
};
VocabRows vocab_rows(const tokenizer::Tokenizer& tok, const nlohmann::json& j, int64_t n_vocab) {
  VocabRows v;
  for (int64_t id = 0; id < n_vocab; ++id) {
    std::string t;
    int32_t ty = 1;  // normal
    try {
      t = tok.id_to_token(static_cast<int32_t>(id));
      if (tok.is_special(static_cast<int32_t>(id))) ty = 3;  // control
    } catch (const Error&) {
      t = "[PAD" + std::to_string(id) + "]";
      ty = 5;  // unused
    }
    v.tokens.push_back(std::move(t));
    v.types.push_back(ty);
  }
  for (const auto& a : j.value("added_tokens", nlohmann::json::array())) {
    const int64_t id = a.value("id", -1);
    if (id >= 0 && id < n_vocab && !a.value("special", false)) v.types[id] = 4;  // user defined
  }
  return v;
}

// tokenizer.ggml.* for a SentencePiece-style BPE tokenizer (sentencepiece_space_prefix) as
// llama.cpp's "llama" vocabulary, which merges the adjacent pair whose joined piece has the highest
// score. Each piece's score is minus the rank of the first merge that makes it: transformers'
// SentencePieceExtractor lists every split of a piece at the rank of the piece's score, so the
// lowest-rank merge is the highest-score piece; pieces no merge makes score 0 (characters, bytes,
// specials: never a join). Types: 2 the unk token, 3 special added tokens, 4 other added tokens,
// 6 the byte pieces <0xXX>, 5 padding rows, else 1.
void sentencepiece_metadata(const tokenizer::Tokenizer& tok, const nlohmann::json& j, const fs::path& tj, int64_t n_vocab,
                            bool space_prefix, io::GgufMetadata& kv) {
  auto [tokens, types] = vocab_rows(tok, j, n_vocab);
  std::unordered_map<std::string, int64_t> ids;
  for (int64_t id = 0; id < n_vocab; ++id) {
    const size_t i = static_cast<size_t>(id);
    if (types[i] == 1 && io::gguf_byte_piece(tokens[i])) types[i] = 6;
    ids.emplace(tokens[i], id);
  }
  const nlohmann::json& model = j["model"];
  if (model.contains("unk_token") && model["unk_token"].is_string())
    if (auto u = ids.find(model["unk_token"].get<std::string>()); u != ids.end()) types[u->second] = 2;
  // Each pair's rank is its last occurrence (a repeated merge takes its later rank, as the BPE
  // model's merge map does); a piece's rank the lowest of the pairs that make it.
  std::map<std::pair<std::string, std::string>, int64_t> pair_rank;
  const nlohmann::json merges = model.value("merges", nlohmann::json::array());
  for (size_t r = 0; r < merges.size(); ++r) {
    const auto& m = merges[r];
    std::pair<std::string, std::string> ab;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const auto sp = s.find(' ');
      if (sp == std::string::npos) throw Error::corruption(tj.string() + ": model.merges[" + std::to_string(r) + "]: expected \"a b\", found " + m.dump());
      ab = {s.substr(0, sp), s.substr(sp + 1)};
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      ab = {m[0].get<std::string>(), m[1].get<std::string>()};
    } else {
      throw Error::corruption(tj.string() + ": model.merges[" + std::to_string(r) + "]: expected \"a b\" or [a, b], found " + m.dump());
    }
    pair_rank[ab] = static_cast<int64_t>(r) + 1;
  }
  std::vector<int64_t> rank(static_cast<size_t>(n_vocab), 0);
  for (const auto& [ab, r] : pair_rank) {
    const auto it = ids.find(ab.first + ab.second);
    if (it == ids.end())
      throw Error::corruption(tj.string() + ": model.merges: " + ab.first + " + " + ab.second + " joins to '" + ab.first + ab.second +
                              "', which is not in the vocabulary");
    int64_t& k = rank[static_cast<size_t>(it->second)];
    if (k == 0 || r < k) k = r;
  }
  std::vector<float> scores(static_cast<size_t>(n_vocab), 0.0f);
  for (int64_t id = 0; id < n_vocab; ++id) {
    const std::string& t = tokens[static_cast<size_t>(id)];
    const size_t i = static_cast<size_t>(id);
    if (rank[i] > 0) {
      scores[i] = -static_cast<float>(rank[i]);
      continue;
    }
    // A piece of several characters that no merge makes: the BPE never produces it, but llama.cpp
    // joins any adjacent pair whose join is in the vocabulary.
    const auto chars = std::count_if(t.begin(), t.end(), [](char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; });
    if (types[i] == 1 && chars > 1)
      throw Error::unsupported(tj.string() + ": model.vocab: piece '" + t + "' (id " + std::to_string(id) +
                               ") is made by no merge: llama.cpp's SentencePiece tokenizer would still join it, so it would "
                               "tokenize differently");
  }
  kv.emplace_back("tokenizer.ggml.model", GgufValue::string("llama"));
  kv.emplace_back("tokenizer.ggml.tokens", GgufValue::strings(tokens));
  kv.emplace_back("tokenizer.ggml.scores", GgufValue::f32s(scores));
  kv.emplace_back("tokenizer.ggml.token_type", GgufValue::i32s(types));
  kv.emplace_back("tokenizer.ggml.add_space_prefix", GgufValue::boolean(space_prefix));
  if (model.contains("unk_token") && model["unk_token"].is_string())
    if (auto u = ids.find(model["unk_token"].get<std::string>()); u != ids.end())
      kv.emplace_back("tokenizer.ggml.unknown_token_id", GgufValue::u32(static_cast<uint32_t>(u->second)));
}

void byte_level_metadata(const tokenizer::Tokenizer& tok, const nlohmann::json& j, const fs::path& tj, int64_t n_vocab,
                         io::GgufMetadata& kv);
void special_token_metadata(io::Env& env, const fs::path& dir, const tokenizer::Tokenizer& tok, int64_t n_vocab, io::GgufMetadata& kv);

// tokenizer.ggml.*: SentencePiece-style BPE as llama.cpp's "llama" vocabulary, byte-level BPE as "gpt2".
void tokenizer_metadata(io::Env& env, const fs::path& dir, int64_t n_vocab, io::GgufMetadata& kv) {
  const fs::path tj = dir / "tokenizer.json";
  const auto tok = tokenizer::Tokenizer::load(dir);
  const auto j = io::parse_json_file_text(env.read_text(tj), tj.string());
  const std::string type = j.contains("model") ? j["model"].value("type", "") : "";
  if (type != "BPE")
    throw Error::unsupported(tj.string() + ": model.type '" + type + "': only BPE (byte-level or SentencePiece-style) is exported");
  if (static_cast<int64_t>(tok.vocab_size()) > n_vocab)
    throw Error::corruption(tj.string() + ": " + std::to_string(tok.vocab_size()) + " tokens, more than the embedding's " +
                            std::to_string(n_vocab) + " rows");
  // An added token is its vocabulary piece, or has an id of its own: one id holding two strings
  // (or one string under two ids) would be read back as another vocabulary.
  if (j.contains("model") && j["model"].contains("vocab") && j["model"]["vocab"].is_object()) {
    const auto& vocab = j["model"]["vocab"];
    std::unordered_map<int64_t, std::string> by_id;
    for (const auto& [piece, id] : vocab.items())
      if (id.is_number_integer()) by_id.emplace(id.get<int64_t>(), piece);
    const auto added = j.value("added_tokens", nlohmann::json::array());
    for (size_t i = 0; i < added.size(); ++i) {
      const int64_t id = added[i].value("id", int64_t{-1});
      const std::string content = added[i].value("content", "");
      const auto at = by_id.find(id);
      const auto same = vocab.find(content);
      if ((at != by_id.end() && at->second != content) || (same != vocab.end() && same->is_number_integer() && same->get<int64_t>() != id))
        throw Error::corruption(tj.string() + ": added_tokens[" + std::to_string(i) + "]: '" + content + "' with id " + std::to_string(id) +
                                (at != by_id.end() && at->second != content ? ", which is the vocabulary's '" + at->second + "'"
                                                                            : ", but the vocabulary has it as id " + std::to_string(same->get<int64_t>())));
    }
  }
  const std::optional<bool> space_prefix = sentencepiece_space_prefix(j);
  if (space_prefix) {
    sentencepiece_metadata(tok, j, tj, n_vocab, *space_prefix, kv);
  } else {
    byte_level_metadata(tok, j, tj, n_vocab, kv);
  }
  special_token_metadata(env, dir, tok, n_vocab, kv);
}

// tokenizer.ggml.* for a byte-level BPE tokenizer (llama.cpp's "gpt2" model).
void byte_level_metadata(const tokenizer::Tokenizer& tok, const nlohmann::json& j, const fs::path& tj, int64_t n_vocab,
                         io::GgufMetadata& kv) {
  // The pre_tokenizer's Split regexes in order (each Isolated, not inverted) and a ByteLevel without
  // its own regex: what llama.cpp's named pre-tokenizers are (io::gguf_pre_tokenizers).
  const nlohmann::json pt = j.contains("pre_tokenizer") ? j["pre_tokenizer"] : nlohmann::json();
  const nlohmann::json steps = pt.is_object() && pt.value("type", "") == "Sequence" ? pt.value("pretokenizers", nlohmann::json::array())
                               : pt.is_object()                                   ? nlohmann::json::array({pt})
                                                                                  : nlohmann::json::array();
  std::vector<std::string> splits;
  bool byte_level = false, other = false;
  for (const auto& st : steps) {
    const std::string t = st.is_object() ? st.value("type", "") : "";
    if (t == "ByteLevel" && st.value("add_prefix_space", false))
      throw Error::unsupported(tj.string() + ": pre_tokenizer: ByteLevel add_prefix_space true: llama.cpp's gpt2 tokenizer "
                               "adds no space before the text, so it would tokenize differently");
    if (t == "ByteLevel" && !byte_level && !st.value("use_regex", true)) {
      byte_level = true;
    } else if (t == "ByteLevel" && !byte_level && splits.empty()) {  // its own regex: GPT-2's
      splits.push_back(tokenizer::kGpt2Pattern);
      byte_level = true;
    } else if (t == "Split" && !byte_level && st.value("behavior", "") == "Isolated" && !st.value("invert", false) &&
               st.contains("pattern") && st["pattern"].is_object() && st["pattern"].contains("Regex") && st["pattern"]["Regex"].is_string()) {
      splits.push_back(st["pattern"]["Regex"].get<std::string>());
    } else {
      other = true;
    }
  }
  if (!byte_level && steps.dump().find("\"ByteLevel\"") == std::string::npos)
    throw Error::unsupported(tj.string() + ": pre_tokenizer: neither byte-level nor SentencePiece-style (Metaspace \"\u2581\" with "
                             "byte_fallback BPE): llama.cpp would tokenize differently");
  const char* pre = byte_level && !other ? io::gguf_pre_tokenizer_name(splits) : nullptr;
  if (!pre) {
    std::string known;
    for (const auto& p : io::gguf_pre_tokenizers()) known += (known.empty() ? "" : ", ") + std::string(p.name);
    throw Error::unsupported(tj.string() + ": pre_tokenizer: its Split regexes are none llama.cpp knows by name here (" + known +
                             "); llama.cpp would tokenize differently");
  }
  const auto [tokens, types] = vocab_rows(tok, j, n_vocab);
  std::vector<std::string> merges;
  for (const auto& m : j["model"].value("merges", nlohmann::json::array())) {
    if (m.is_string()) merges.push_back(m.get<std::string>());
    else if (m.is_array() && m.size() == 2) merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
    else throw Error::corruption(tj.string() + ": model.merges: expected \"a b\" or [a, b], found " + m.dump());
  }
  kv.emplace_back("tokenizer.ggml.model", GgufValue::string("gpt2"));
  kv.emplace_back("tokenizer.ggml.pre", GgufValue::string(pre));
  kv.emplace_back("tokenizer.ggml.tokens", GgufValue::strings(tokens));
  kv.emplace_back("tokenizer.ggml.token_type", GgufValue::i32s(types));
  kv.emplace_back("tokenizer.ggml.merges", GgufValue::strings(merges));
}

// The special token ids and add_bos / add_eos, as the converter writes them: the tokenizer's
// special tokens, else config.json's ids.
void special_token_metadata(io::Env& env, const fs::path& dir, const tokenizer::Tokenizer& tok, int64_t n_vocab, io::GgufMetadata& kv) {
  auto special = [&](const char* key, std::optional<int32_t> id, const char* config_key) {
    if (!id) {
      const fs::path cj = dir / "config.json";
      const auto c = io::parse_json_file_text(env.read_text(cj), cj.string());
      if (c.contains(config_key) && c[config_key].is_number_integer()) id = c[config_key].get<int32_t>();
    }
    if (id && *id >= 0 && *id < n_vocab) kv.emplace_back(key, GgufValue::u32(static_cast<uint32_t>(*id)));
  };
  special("tokenizer.ggml.bos_token_id", tok.bos_id(), "bos_token_id");
  special("tokenizer.ggml.eos_token_id", tok.eos_id(), "eos_token_id");
  kv.emplace_back("tokenizer.ggml.add_bos_token", GgufValue::boolean(tok.adds_bos()));
  kv.emplace_back("tokenizer.ggml.add_eos_token", GgufValue::boolean(tok.adds_eos()));
}

struct ExportPlan {
  io::GgufMetadata kv;
  std::vector<Item> items;
};

ExportPlan plan_export(io::Env& env, const io::Checkpoint& ckpt, const model::Model& m, const GgufOptions& opts) {
  const GgmlType main = opts.type;
  const auto& ovr = opts.overrides;
  const std::string src = ckpt.dir().string();
  const auto& fam = m.family();
  const model::GgufArch* arch = fam.gguf ? &*fam.gguf : nullptr;
  if (!arch)
    throw Error::unsupported(src + ": family " + fam.model_type + " is not exported to GGUF yet (exported: " +
                             io::gguf_exported_model_types() + ")");
  const int64_t lead = refuse_unsupported(m, *arch, src);
  const auto spec = core::with_context(src, [&] { return runtime::ForwardSpec::from_model(m); });
  const auto& rs = spec.rope_scaling;
  const bool yarn = arch->yarn && rs.type == "yarn", longrope = arch->longrope && rs.type == "longrope";
  if (rs.type != "default" && !yarn && !longrope && !(arch->rope_freqs && rs.type == "llama3") && !(arch->mla && rs.type == "yarn"))
    throw Error::unsupported(src + ": rope_scaling '" + rs.type + "' is not exported to GGUF yet");
  if (yarn) refuse_yarn(rs, spec.max_positions, *arch, src);
  const std::optional<MlaKeys> mla = arch->mla ? std::optional<MlaKeys>(mla_keys(m, *arch, spec, src)) : std::nullopt;
  // A window as long as the trained context (Phi-3.5-MoE's 131072) never limits within it.
  if (spec.attn.sliding_window > 0 && (spec.max_positions <= 0 || spec.attn.sliding_window < spec.max_positions))
    throw Error::unsupported(src + ": sliding_window " + std::to_string(spec.attn.sliding_window) +
                             ": llama.cpp's " + arch->arch + " graph has no sliding window");
  const int64_t window = sliding_window(spec, *arch, src);
  // granitemoe's softmax over the top-k logits equals llama.cpp's softmax over all experts with the
  // top-k weights renormalized; ernie4_5_moe's routing renormalizes whatever norm_topk_prob says (by
  // max(sum, moe_norm_min)).
  const bool renormalizes = spec.routing.renormalize || spec.routing.kind == model::Routing::TopKSoftmax ||
                            spec.routing.kind == model::Routing::SoftmaxBiasTopK;
  const bool sparsemixer = arch->sparsemixer_differs && spec.routing.kind == model::Routing::SparseMixer;
  if (!arch->dense && !arch->routing_keys && !sparsemixer && renormalizes != arch->renormalizes)
    throw Error::unsupported(src + ": routing " + (renormalizes ? "renormalizes" : "does not renormalize") +
                             " the top-k weights (norm_topk_prob) but llama.cpp's " + arch->arch + " graph " +
                             (arch->renormalizes ? "does" : "does not"));
  const auto& d = m.dims();
  const auto& c = m.config();
  const std::string A = arch->arch;
  if (arch->square_q && d.heads * d.head_dim != d.hidden)
    throw Error::unsupported(src + ": num_attention_heads x head_dim = " + std::to_string(d.heads * d.head_dim) +
                             " is not hidden_size " + std::to_string(d.hidden) + ": llama.cpp's " + A +
                             " loader fixes attn_q at [hidden_size, hidden_size]");
  if (arch->no_attention_bias)
    for (const auto& layer : m.layers())
      for (const char* b : {"q_bias", "k_bias", "v_bias", "o_bias"})
        if (layer.tensors.count(b))
          throw Error::unsupported(src + ": layer " + std::to_string(layer.index) + ": attention biases (attention_bias): llama.cpp's " +
                                   A + " loader has none");
  // OLMoE's k_norm spans the whole k projection ([kv_heads * head_dim]); llama.cpp's olmoe loader
  // requires attn_k_norm of [n_embd], so it loads only models without grouped-query attention.
  if (fam.qk_norm == model::QKNorm::Full && d.kv_heads != d.heads)
    throw Error::unsupported(src + ": num_key_value_heads " + std::to_string(d.kv_heads) + " != num_attention_heads " +
                             std::to_string(d.heads) + ": llama.cpp's " + A +
                             " graph needs a k_norm as wide as the hidden size (no grouped-query attention)");
  // The first MoE block (nullptr in a dense family: the keys that read it do not apply).
  const model::MoeBlock* moe0 = nullptr;
  for (const auto& layer : m.layers())
    if (layer.moe && !moe0) moe0 = &*layer.moe;
  if (arch->routing_keys) refuse_routing(m, *arch, spec, *moe0, src);
  if (arch->choice_bias) refuse_choice_bias(*arch, spec, src);
  if (fam.hybrid_linear_attention) refuse_hybrid(m, *arch, src);
  const int64_t moe_step = arch->llama4_graph ? refuse_llama4(m, *arch, spec, *moe0, src) : 0;
  // The dense layers' width (feed_forward_length where the experts have their own key).
  std::optional<int64_t> dense_width;
  for (const auto& layer : m.layers())
    if (!layer.moe && !dense_width) dense_width = layer.mlp->width();
  refuse_activation(m, *arch, src);
  ExportPlan p;
  auto& kv = p.kv;
  kv.emplace_back("general.architecture", GgufValue::string(A));
  fs::path folder = fs::absolute(ckpt.dir()).lexically_normal();
  if (folder.filename().empty()) folder = folder.parent_path();  // "models/x/"
  kv.emplace_back("general.name", GgufValue::string(opts.name.empty() ? folder.filename().string() : opts.name));
  kv.emplace_back("general.alignment", GgufValue::u32(io::kGgufDefaultAlignment));
  kv.emplace_back("general.file_type", GgufValue::u32(io::gguf_file_type_of(main)));
  kv.emplace_back("general.quantization_version", GgufValue::u32(2));
  // The hyper-parameters from the one table the GGUF reader maps back (io/gguf_names.h): each
  // row's value from the model, or nullopt where the row does not apply to this model.
  const auto& r = spec.routing;
  auto value = [&](const io::GgufHparam& h) -> std::optional<double> {
    if (!io::gguf_hparam_applies(h, *arch)) return std::nullopt;
    const std::string k = h.config_key, key = h.key;
    auto num = [](int64_t v) { return std::optional<double>(static_cast<double>(v)); };
    if (k == "max_position_embeddings") return num(spec.max_positions > 0 ? spec.max_positions : 4096);
    if (k == "hidden_size") return num(d.hidden);
    if (k == "num_hidden_layers") return num(d.layers);
    if (k == "intermediate_size")
      return num((arch->interleaved_dense || arch->dense) && dense_width ? *dense_width
                                                                         : c.get_int_or(fam.dense_width_key, moe0->expert_width()));
    if (k == "{expert_width}") return num(moe0->expert_width());
    if (k == "num_attention_heads") return num(d.heads);
    if (k == "num_key_value_heads") return num(arch->mla ? 1 : d.kv_heads);  // MLA: one latent kv head
    if (k == "rope_theta") return spec.rope_theta;
    if (k == "rms_norm_eps") return spec.eps;
    if (k == "{expert_count}") return num(moe0->num_experts());
    if (k == "{topk}") return num(d.top_k);
    // llama4: the shared expert is as wide as the experts (llama.cpp's n_ff_shexp = n_ff_exp), no key.
    if (k == "{shared_width}")
      return arch->shared_expert && !arch->shared_count && !arch->llama4_graph && moe0->shared ? num(moe0->shared->width()) : std::nullopt;
    if (k == "{shared_count}")
      return arch->shared_count ? num(moe0->shared ? moe0->shared->width() / moe0->expert_width() : 0) : std::nullopt;
    // The RoPE width: llama.cpp's n_rot (partial rotary: the first rope_dim() elements of a head).
    if (arch->mla && (k == "{rope_dim}" || k == "head_dim")) return std::nullopt;  // mla->kv below
    if (k == "{rope_dim}")
      return fam.partial_rotary                                       ? num(spec.attn.rope_dim())
             : arch->permute_qk || arch->rope_freqs || arch->longrope ? num(d.head_dim)
                                                                      : std::nullopt;
    if (k == "head_dim") return d.head_dim * d.heads != d.hidden ? num(d.head_dim) : std::nullopt;  // key/value_length
    if (k == "clip_qkv") return spec.attn.clip_qkv ? std::optional<double>(*spec.attn.clip_qkv) : std::nullopt;
    if (k == "{dense_lead}") return arch->leading_dense ? num(lead) : std::nullopt;
    // llama.cpp's ernie4_5-moe requires the step; 1 as refuse_unsupported leaves no dense layer after the lead.
    if (k == "moe_layer_interval")
      return fam.moe_layers == model::MoeLayerRule::StartEndInterval ? num(1) : arch->interleaved_dense ? num(moe_step) : std::nullopt;
    // DeepSeek-V2 scales the weights only when it does not renormalize them; llama.cpp always scales.
    if (k == "routed_scaling_factor")
      return !arch->routing_keys ? std::nullopt
             : r.kind == model::Routing::DeepSeekV2 && r.renormalize ? std::optional<double>(1.0)
                                                                     : std::optional<double>(r.routed_scaling_factor);
    if (k == "norm_topk_prob") return arch->routing_keys ? num(r.renormalize) : std::nullopt;
    // Group-limited routing only where it limits (llama.cpp asserts expert_group_used_count < expert_group_count).
    const bool groups = arch->routing_keys && r.group_limited && r.n_group > 1 && r.topk_group < r.n_group;
    if (k == "n_group") return groups ? num(r.n_group) : std::nullopt;
    if (k == "topk_group") return groups ? num(r.topk_group) : std::nullopt;
    // granitemoe's multipliers, each written (1 where config.json has none: llama.cpp requires them).
    auto scalar = [&](double v) { return fam.scalar_multipliers ? std::optional<double>(v) : std::nullopt; };
    if (k == "embedding_multiplier") return scalar(spec.embedding_multiplier);
    if (k == "residual_multiplier") return scalar(spec.residual_multiplier);
    if (k == "attention_multiplier") return scalar(spec.attn.scale.value_or(1.0));
    if (k == "logits_scaling") return scalar(spec.logits_scaling);
    // The Gated DeltaNet's sizes (hybrid families).
    if (k.rfind("linear_", 0) == 0 || k == "{ssm_inner}") {
      if (!fam.hybrid_linear_attention) return std::nullopt;
      const auto dn = model::delta_net_dims(c);
      if (k == "linear_conv_kernel_dim") return num(dn.conv_kernel);
      if (k == "linear_key_head_dim") return num(dn.k_dim);
      if (k == "linear_num_key_heads") return num(dn.k_heads);
      if (k == "linear_num_value_heads") return num(dn.v_heads);
      if (k == "{ssm_inner}") return num(dn.value_dim());
    }
    if (k == "sliding_window") return window > 0 ? num(window) : std::nullopt;
    throw Error::internal("GGUF export: no value for " + A + "." + key);
  };
  io::for_each_gguf_hparam([&](const io::GgufHparam& h) {
    const std::optional<double> v = value(h);
    if (!v) return;
    kv.emplace_back(A + "." + h.key, h.boolean ? GgufValue::boolean(*v != 0)
                                     : h.real  ? GgufValue::f32(static_cast<float>(*v))
                                               : GgufValue::u32(static_cast<uint32_t>(static_cast<int64_t>(*v))));
  });
  if (arch->routing_keys)
    kv.emplace_back(A + ".expert_gating_func", GgufValue::u32(r.kind == model::Routing::DeepSeekV2 ? io::kGgufGatingSoftmax
                                                                                                   : io::kGgufGatingSigmoid));
  if (mla)
    for (const auto& [key, v] : mla->kv) kv.emplace_back(A + "." + key, v);
  if (yarn) {  // as TextModel.set_gguf_parameters writes a yarn rope_scaling
    kv.emplace_back(A + ".rope.scaling.type", GgufValue::string("yarn"));
    kv.emplace_back(A + ".rope.scaling.factor", GgufValue::f32(static_cast<float>(rs.factor)));
    kv.emplace_back(A + ".rope.scaling.original_context_length",
                    GgufValue::u32(static_cast<uint32_t>(rs.original_max_positions > 0 ? rs.original_max_positions : spec.max_positions)));
    kv.emplace_back(A + ".rope.scaling.yarn_beta_fast", GgufValue::f32(static_cast<float>(rs.beta_fast)));
    kv.emplace_back(A + ".rope.scaling.yarn_beta_slow", GgufValue::f32(static_cast<float>(rs.beta_slow)));
  }
  if (longrope) {  // as Phi3MiniModel writes it (the factors: rope_factors_long / _short below)
    kv.emplace_back(A + ".rope.scaling.attn_factor", GgufValue::f32(static_cast<float>(longrope_attn_factor(spec, d.head_dim, *arch, src))));
    kv.emplace_back(A + ".rope.scaling.original_context_length",
                    GgufValue::u32(static_cast<uint32_t>(rs.original_max_positions > 0 ? rs.original_max_positions : spec.max_positions)));
  }
  if (sparsemixer)  // llama.cpp has no key for it; our reader takes it back (io/gguf_model.h)
    kv.emplace_back(io::kGgufRouterJitterKey, GgufValue::f32(static_cast<float>(spec.routing.jitter_eps)));

  // --tensor-type rules that tensors of copied codes ignore: tensor names and the type they keep.
  std::map<const GgufTypeOverride*, std::vector<std::pair<std::string, std::string>>> ignored;
  std::set<const GgufTypeOverride*> used;  // rules that chose some tensor's type
  auto add = [&](const std::string& name, std::vector<core::Tensor> parts, int64_t permute_heads = 0,
                 io::GgufValueMap map = io::GgufValueMap::None, int mla_split = 0) {
    Item it;
    it.info.name = name;
    const auto& s = parts.front().shape();
    it.info.ne.assign(s.rbegin(), s.rend());
    // Dimensions of 1 left out, as the converter's squeeze: a [1, H] gate is a vector to llama.cpp
    // ({n_embd}), qwen3_next's conv1d [conv_dim, 1, K] is ssm_conv1d {K, conv_dim}.
    if (parts.size() == 1) std::erase_if(it.info.ne, [](int64_t n) { return n == 1; });
    if (it.info.ne.empty()) it.info.ne.push_back(1);
    if (mla_split) {  // kv_b_proj [heads * (nope + v), kv_lora_rank] -> attn_k_b / attn_v_b
      it.mla_split = mla_split;
      it.mla_heads = d.heads;
      it.mla_nope = mla->nope;
      it.mla_v = mla->v;
      const int64_t lora = s.at(1);
      if (s.at(0) != d.heads * (mla->nope + mla->v))
        throw Error::corruption(src + ": kv_b_proj: " + std::to_string(s.at(0)) + " rows, expected num_attention_heads x " +
                                "(qk_nope_head_dim + v_head_dim) = " + std::to_string(d.heads * (mla->nope + mla->v)));
      it.info.ne = mla_split == 1 ? std::vector<int64_t>{mla->nope, lora, d.heads} : std::vector<int64_t>{lora, mla->v, d.heads};
    }
    if (parts.size() > 1) it.info.ne.push_back(static_cast<int64_t>(parts.size()));
    if (map != io::GgufValueMap::None && parts.front().encoding())
      throw Error::unsupported(src + ": " + name + " is encoded as '" + parts.front().encoding()->name() +
                               "'; its value is transformed for llama.cpp (1 + w, -exp(A_log)) and must be stored plain");
    const GgufTypeOverride* rule = nullptr;
    const GgmlType wanted = choose_type(name, it.info.ne.size(), it.info.ne[0], main, ovr, &rule);
    std::vector<Direct> direct(parts.size());
    for (size_t e = 0; e < parts.size() && !mla_split; ++e)  // a split kv_b_proj is decoded and re-encoded
      if (const core::Encoding* enc = parts[e].encoding(); enc && !(direct[e] = direct_type(parts[e], wanted)).type)
        throw Error::unsupported(src + ": " + name + (parts.size() > 1 ? ": expert " + std::to_string(e) : "") +
                                 " is encoded as '" + enc->name() + "' " + enc->params().dump() +
                                 ", which has no GGUF block type here (int4/int8 symmetric groups of 32 are copied as "
                                 "q4_0/q8_0, ternary-tq trits as tq1_0/tq2_0, ggml codecs such as q4_k as their type): "
                                 "write it dense first with `moe-tool convert " + src +
                                 " DENSE --materialize`, then export DENSE");
    for (const auto& d : direct)
      if (d.type != direct.front().type)
        throw Error::unsupported(src + ": " + name + ": its experts are stored in different encodings; one GGUF tensor "
                                 "has one type: write them dense first with `moe-tool convert " + src +
                                 " DENSE --materialize`");
    // Codes already on a block grid are copied as that type (--type and --tensor-type do not apply,
    // except to choose tq1_0 or tq2_0 for ternary-tq trits).
    it.info.type = direct.front().type ? *direct.front().type : wanted;
    if (rule) used.insert(rule);
    if (rule && it.info.type != rule->type) ignored[rule].push_back({name, quant::ggml_type_info(it.info.type).name});
    const auto& ti = quant::ggml_type_info(it.info.type);
    if (it.info.ne[0] % ti.block != 0)
      throw Error::unsupported(src + ": " + name + ": rows of " + std::to_string(it.info.ne[0]) + " values are not a multiple of the " +
                               ti.name + " block size " + std::to_string(ti.block) + "; give it another type with " + opts.tensor_type_key);
    it.parts = std::move(parts);
    for (auto& d : direct) it.native.push_back(std::move(d.form));
    it.permute_heads = permute_heads;
    it.map = map;
    p.items.push_back(std::move(it));
  };
  auto global = [&](const char* role) {
    auto g = m.globals().find(role);
    if (g != m.globals().end()) add(io::gguf_global_name(role), {g->second}, 0, io::gguf_value_map(fam, role));
  };
  // GgufArch::centre_residual: the last item added written mean-centred (Item::centre). Codes are
  // copied as they are (centring them would re-quantize them), named in one warning below.
  std::vector<std::string> uncentred;
  auto centre_last = [&](Item::Centre how) {
    if (!arch->centre_residual) return;
    Item& it = p.items.back();
    if (it.parts.front().encoding()) {
      uncentred.push_back(it.info.name);
      return;
    }
    it.centre = how;
  };
  global("embed");
  centre_last(Item::Centre::Rows);
  if (longrope) {
    const auto& s = spec.rope_scaling;
    auto factors = [](const std::vector<double>& v) {
      std::vector<float> f(v.begin(), v.end());
      return core::Tensor::from_f32(f, {static_cast<int64_t>(f.size())});
    };
    add(io::kGgufRopeFactorsLong, {factors(s.long_factor)});
    add(io::kGgufRopeFactorsShort, {factors(s.short_factor)});
  }
  // llama3 RoPE scaling as LlamaModel.generate_extra_tensors writes it: per-frequency divisors of
  // the RoPE frequencies (1 above the high-frequency wavelength, factor below the low one, smoothed
  // between), as the forward's RopeTable scales them.
  if (arch->rope_freqs && spec.rope_scaling.type == "llama3") {
    const auto& s = spec.rope_scaling;
    const std::vector<float> div = io::gguf_llama3_rope_divisors(spec.rope_theta, d.head_dim, s.factor, s.low_freq_factor,
                                                                 s.high_freq_factor, double(s.original_max_positions));
    // A file moe-tool writes reads back as the same model: divisors the reader does not take back
    // to keys (a smoothed band of one frequency, an original length the band's line puts between
    // whole numbers, a factor below 1) are refused.
    try {
      (void)io::gguf_llama3_scaling(div, spec.rope_theta, d.head_dim, "rope_freqs.weight: ");
    } catch (const Error& e) {
      throw Error::unsupported(src + ": rope_scaling llama3 (factor " + num_str(s.factor) + ", low_freq_factor " +
                               num_str(s.low_freq_factor) + ", high_freq_factor " + num_str(s.high_freq_factor) +
                               ", original_max_position_embeddings " + std::to_string(s.original_max_positions) +
                               "): its divisors would not read back from the file (" + e.what() + ")");
    }
    add(io::kGgufRopeFreqs, {core::Tensor::from_f32(div, {static_cast<int64_t>(div.size())})});
  }
  for (const auto& layer : m.layers()) {
    const std::string blk = "blk." + std::to_string(layer.index) + ".";
    for (const auto& [role, t] : layer.tensors) {
      if (arch->mla && role == io::kGgufMlaRole) {
        add(blk + io::kGgufMlaKB, {t}, 0, io::GgufValueMap::None, 1);
        add(blk + io::kGgufMlaVB, {t}, 0, io::GgufValueMap::None, 2);
        continue;
      }
      const char* n = io::gguf_layer_name(*arch, role);
      if (!n) throw Error::unsupported(src + ": layer " + std::to_string(layer.index) + " " + role + " has no GGUF name in this exporter");
      int64_t heads = 0;
      if (arch->permute_qk && (role == "q_proj" || role == "q_bias")) heads = d.heads;
      if (arch->permute_qk && (role == "k_proj" || role == "k_bias")) heads = d.kv_heads;
      add(blk + n, {t}, heads, io::gguf_value_map(fam, role));
      if (role == "o_proj") centre_last(Item::Centre::Columns);
      if (role == "o_bias") centre_last(Item::Centre::Rows);
    }
    if (!layer.moe) {  // a leading or interleaved dense layer (refuse_unsupported)
      const model::Mlp& x = *layer.mlp;
      add(blk + io::gguf_moe_name("dense_gate"), {x.gate});
      add(blk + io::gguf_moe_name("dense_up"), {x.up});
      add(blk + io::gguf_moe_name("dense_down"), {x.down});
      continue;
    }
    const auto& moe = *layer.moe;
    add(blk + "ffn_gate_inp.weight", {moe.router});
    if (moe.router_bias) {
      if (!arch->routing_keys && !arch->choice_bias && !arch->gate_inp_bias)
        throw Error::unsupported(src + ": router bias: llama.cpp's " + A + " has none");
      add(blk + io::gguf_moe_name(*arch, "router_bias"), {*moe.router_bias});
    } else if (arch->gate_inp_bias) {
      throw Error::unsupported(src + ": layer " + std::to_string(layer.index) + ": no router bias (" + fam.router_bias +
                               "): llama.cpp's " + A + " loader requires ffn_gate_inp.bias");
    }
    std::vector<core::Tensor> gate, up, down;
    for (const auto& e : moe.experts) {
      gate.push_back(e.gate);
      up.push_back(e.up);
      down.push_back(e.down);
    }
    add(blk + "ffn_gate_exps.weight", gate);
    add(blk + "ffn_up_exps.weight", up);
    add(blk + "ffn_down_exps.weight", down);
    centre_last(Item::Centre::Columns);
    const bool biased = std::any_of(moe.experts.begin(), moe.experts.end(), [](const model::Mlp& e) { return e.has_bias(); });
    if (biased != arch->expert_biases)
      throw Error::unsupported(src + ": layer " + std::to_string(layer.index) + ": " +
                               (biased ? "expert biases: llama.cpp's " + A + " has none"
                                       : "no expert biases: llama.cpp's " + A + " loader requires ffn_{gate,up,down}_exps.bias"));
    if (biased) {
      std::vector<core::Tensor> gb, ub, db;
      for (const auto& e : moe.experts) {
        if (!e.gate_bias || !e.up_bias || !e.down_bias)
          throw Error::unsupported(src + ": layer " + std::to_string(layer.index) + ": an expert without all three biases");
        gb.push_back(*e.gate_bias);
        ub.push_back(*e.up_bias);
        db.push_back(*e.down_bias);
      }
      add(blk + io::gguf_moe_name(*arch, "expert_gate_bias"), gb);
      add(blk + io::gguf_moe_name(*arch, "expert_up_bias"), ub);
      add(blk + io::gguf_moe_name(*arch, "expert_down_bias"), db);
    }
    if (moe.shared) {
      if (!arch->shared_expert) throw Error::unsupported(src + ": shared expert: llama.cpp's " + A + " has none");
      add(blk + "ffn_gate_shexp.weight", {moe.shared->gate});
      add(blk + "ffn_up_shexp.weight", {moe.shared->up});
      add(blk + "ffn_down_shexp.weight", {moe.shared->down});
      if (moe.shared_gate) add(blk + "ffn_gate_inp_shexp.weight", {*moe.shared_gate});
    }
  }
  global("final_norm");
  global("final_norm_bias");
  global("lm_head");
  global("lm_head_bias");
  // Tied embeddings where llama.cpp's loader requires output.weight (gpt-oss): the embedding again.
  if (arch->output_required && !m.globals().count("lm_head")) add(io::gguf_global_name("lm_head"), {m.globals().at("embed")});
  const int64_t n_vocab = m.globals().at("embed").dim(0);
  core::with_context(src, [&] { tokenizer_metadata(env, ckpt.dir(), n_vocab, kv); });
  // One warning per rule, naming no folder: the plan is also made on a run's staged native output.
  for (const auto& o : ovr)
    if (!used.count(&o))
      core::warn_once(opts.tensor_type_key + " " + o.pattern + "=" + quant::ggml_type_info(o.type).name +
                      " matches no tensor of this model (GGUF names: blk.N.ffn_down_exps.weight, blk.N.attn_q.weight, "
                      "token_embd.weight, ...; 1-D tensors and routers stay f32)");
  if (yarn) warn_untruncated_yarn(rs);
  if (!uncentred.empty())
    core::warn_once(A + ": " + uncentred.front() + (uncentred.size() > 1 ? " and " + std::to_string(uncentred.size() - 1) + " more" : "") +
                    " are stored as codes, copied as they are without the export's mean-centring: unless they were quantized from "
                    "centred weights (a GGUF this export wrote, quantized into a folder: docs/gguf.md, phimoe), llama.cpp's RMS norm "
                    "sees the mean they add to the residual stream, which the model's LayerNorm removes (as in convert_hf_to_gguf.py's "
                    "files)");
  if (sparsemixer)
    core::warn_once(A + ": llama.cpp's graph weighs the top-2 experts by their softmax renormalized over the two; PhiMoE's "
                    "sparsemixer weighs each by its own masked softmax (router_jitter_noise " + num_str(spec.routing.jitter_eps) +
                    "; at the released 0.01 usually 1 each): llama.cpp computes a different MoE output from this file "
                    "(docs/gguf.md, phimoe)");
  for (const auto& [rule, tensors] : ignored)
    core::warn_once(opts.tensor_type_key + " " + rule->pattern + "=" + quant::ggml_type_info(rule->type).name +
                    " does not apply to " + std::to_string(tensors.size()) + " tensor(s) whose codes are copied, not re-quantized (" +
                    tensors.front().first + " as " + tensors.front().second + (tensors.size() > 1 ? ", ..." : "") +
                    (opts.staged ? "): the run's quantize codec gives them their type"
                                 : "): write the model dense first (`moe-tool convert IN DENSE --materialize`) to choose their type"));
  return p;
}

// Subtracts from each row (`rows_mean`) or each column of row-major x [rows, cols] its mean
// (summed in double).
void centre_values(float* x, int64_t rows, int64_t cols, bool rows_mean) {
  if (rows_mean) {
    for (int64_t r = 0; r < rows; ++r) {
      float* v = x + r * cols;
      const double mean = std::accumulate(v, v + cols, 0.0) / static_cast<double>(cols);
      for (int64_t j = 0; j < cols; ++j) v[j] = static_cast<float>(v[j] - mean);
    }
    return;
  }
  std::vector<double> mean(static_cast<size_t>(cols), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) mean[j] += x[r * cols + j];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) x[r * cols + j] = static_cast<float>(x[r * cols + j] - mean[j] / static_cast<double>(rows));
}

// Source row of output row r of a [heads * d, cols] projection permuted as permute_rows does.
int64_t permuted_source_row(int64_t r, int64_t heads, int64_t rows) {
  const int64_t d = rows / heads, h = r / d, i = (r % d) / 2, s = r % 2;
  return h * d + s * (d / 2) + i;
}

// Buffers kept across the tensors of one export: a [rows, cols] float copy of the part being
// encoded, its row-permuted copy and two byte buffers, one being encoded while the other is
// written by `pending` (the kernel's copy into the page cache overlaps the next part's encoding).
// Each grows to the largest part and its pages are faulted in once per export, not once per
// tensor (a fresh block of tens of MiB per expert cost more than the encoding: docs/gguf.md
// "Export throughput").
struct ExportBuffers {
  std::vector<float> x, permuted;
  std::vector<uint8_t> out[2];
  int next = 0;
  std::future<void> pending;

  // Waits for the write in flight, rethrowing its error.
  void wait() {
    if (pending.valid()) pending.get();
  }
  ~ExportBuffers() {
    if (pending.valid()) pending.wait();
  }
};

// Encodes rows [0, rows) of `rows` x `cols` with `encode_one(r, dst)`, the rows split over the
// forward's threads (each row's bytes depend on that row only, so the bytes do not depend on the
// threads), and appends them once the previous part's bytes are written (in order).
template <typename Fn>
void encode_rows(io::GgufWriter& w, ExportBuffers& b, int64_t rows, uint64_t row_bytes, const Fn& encode_one) {
  std::vector<uint8_t>& out = b.out[b.next];
  out.resize(static_cast<size_t>(rows) * row_bytes);
  uint8_t* dst = out.data();
  runtime::parallel_rows(rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) encode_one(r, dst + r * row_bytes);
  });
  b.wait();
  b.pending = std::async(std::launch::async, [&w, &out] { w.append(out.data(), out.size()); });
  b.next ^= 1;
}

// Appends an encoded weight whose codes are already Q4_0 / Q8_0 / TQ blocks (direct_type), row by
// row: `codes_row(src, codes)` and `scale(src, g)` read the encoding's codes and group scales.
template <typename Codes, typename Scale>
void write_codes(io::GgufWriter& w, ExportBuffers& b, const Item& it, int64_t rows, int64_t cols, int64_t ngroups,
                 const Codes& codes_row, const Scale& scale) {
  encode_rows(w, b, rows, quant::ggml_row_bytes(it.info.type, cols), [&](int64_t r, uint8_t* dst) {
    const int64_t src = it.permute_heads ? permuted_source_row(r, it.permute_heads, rows) : r;
    thread_local std::vector<uint8_t> codes;
    thread_local std::vector<float> scales;
    codes.resize(static_cast<size_t>(cols));
    scales.resize(static_cast<size_t>(ngroups));
    codes_row(src, codes.data());
    for (int64_t g = 0; g < ngroups; ++g) scales[g] = scale(src, g);
    core::with_context("row " + std::to_string(src), [&] {
      quant::pack_codes_row(it.info.type, codes.data(), scales.data(), cols, dst);
    });
  });
}

// Encodes and appends one item, one part (expert) at a time.
void write_item(io::GgufWriter& w, ExportBuffers& b, const Item& it, const model::Model& m) {
  const int64_t cols = it.info.ne[0];
  const uint64_t rb = quant::ggml_row_bytes(it.info.type, cols);
  for (size_t e = 0; e < it.parts.size(); ++e) {
    const core::Tensor& part = it.parts[e];
    if (it.mla_split) {
      const auto n = static_cast<size_t>(part.numel());
      if (b.x.size() < n) b.x.resize(n);
      part.to_f32(b.x.data());
      const float* x = b.x.data();
      // kv_b_proj [H * (nope + v), L]: attn_k_b[h][l][i] = kv_b[h * (nope + v) + i][l] (transposed),
      // attn_v_b[h][j][l] = kv_b[h * (nope + v) + nope + j][l].
      if (b.permuted.size() < n) b.permuted.resize(n);
      const int64_t H = it.mla_heads, nope = it.mla_nope, v = it.mla_v, L = part.shape().at(1);
      float* o = b.permuted.data();
      for (int64_t h = 0; h < H; ++h) {
        const float* kv = x + h * (nope + v) * L;
        if (it.mla_split == 1) {
          for (int64_t l = 0; l < L; ++l)
            for (int64_t i = 0; i < nope; ++i) o[(h * L + l) * nope + i] = kv[i * L + l];
        } else {
          std::copy_n(kv + nope * L, v * L, o + h * v * L);
        }
      }
      const int64_t out_rows = it.mla_split == 1 ? H * L : H * v;
      encode_rows(w, b, out_rows, rb, [&](int64_t r, uint8_t* dst) { quant::encode_row(it.info.type, o + r * cols, cols, dst); });
      if (const auto& release = m.page_releaser())
        for (const core::Tensor* s : part.stored_tensors()) release(s->data(), s->nbytes());
      continue;
    }
    // A packed input's codes as intN (direct_type), made here: one weight's codes at a time.
    const std::shared_ptr<const core::Encoding> native = it.native[e] ? it.native[e]->make() : nullptr;
    if (const auto* q = dynamic_cast<const quant::IntN*>(native ? native.get() : part.encoding())) {
      write_codes(w, b, it, q->rows(), q->cols(), q->ngroups(), [q](int64_t r, uint8_t* c) { q->codes_row(r, c); },
                  [q](int64_t r, int64_t g) { return q->scale(r, g); });
      continue;
    }
    if (const auto* gb = dynamic_cast<const quant::GgufBlocks*>(part.encoding())) {
      // Blocks of this type already: the rows copied (in the converter's q/k order where it
      // applies), each decoded first so that a non-finite scale is refused as for any weight.
      const uint8_t* src = gb->bytes().data();
      const int64_t rows = gb->rows();
      encode_rows(w, b, rows, rb, [&](int64_t r, uint8_t* dst) {
        const int64_t s = it.permute_heads ? permuted_source_row(r, it.permute_heads, rows) : r;
        thread_local std::vector<float> y;
        y.resize(static_cast<size_t>(cols));
        gb->dequantize_rows(s, s + 1, y.data());
        if (const int64_t bad = core::first_non_finite(core::DType::F32, y.data(), y.size()); bad >= 0)
          throw Error::invalid("row " + std::to_string(s) + ": " + gb->name() + " block " + std::to_string(bad / quant::ggml_type_info(gb->type()).block) +
                               " decodes to " + std::to_string(y[static_cast<size_t>(bad)]) + " (a scale is not finite)");
        std::memcpy(dst, src + s * static_cast<int64_t>(rb), rb);
      });
      continue;
    }
    if (const auto* mx = dynamic_cast<const core::Mxfp4*>(part.encoding())) {
      // gpt-oss's MXFP4 experts copied into MXFP4 blocks, nothing re-quantized: each block's E8M0
      // scale byte, then its 32 E2M1 codes reordered from the checkpoint's (value 2j + h in nibble h
      // of byte j, convert_moe_packed_tensors) to ggml's (value j in the low nibble of qs[j], j + 16
      // in the high one), as convert_hf_to_gguf.py's GptOssModel.transform_nibble_layout does.
      const int64_t groups = mx->groups();
      encode_rows(w, b, mx->rows(), rb, [&](int64_t r, uint8_t* dst) {
        const uint8_t* codes = mx->row_blocks(r);
        const uint8_t* scales = mx->row_scales(r);
        for (int64_t g = 0; g < groups; ++g) {
          if (scales[g] == 0xFF)
            throw Error::invalid("row " + std::to_string(r) + ": mxfp4 block " + std::to_string(g) + ": e8m0 scale 255 (NaN)");
          const uint8_t* c = codes + 16 * g;
          auto code = [c](int k) { return static_cast<uint8_t>((c[k / 2] >> (4 * (k % 2))) & 0xF); };
          uint8_t* blk = dst + 17 * g;
          blk[0] = scales[g];
          for (int j = 0; j < 16; ++j) blk[1 + j] = static_cast<uint8_t>(code(j) | code(j + 16) << 4);
        }
      });
      continue;
    }
    if (const auto* t = dynamic_cast<const quant::Ternary*>(part.encoding())) {
      write_codes(w, b, it, t->rows(), t->cols(), t->ngroups(), [t](int64_t r, uint8_t* c) { t->trits_row(r, c); },
                  [t](int64_t r, int64_t g) { return t->hi(r, g); });
      continue;
    }
    const auto n = static_cast<size_t>(part.numel());
    if (b.x.size() < n) b.x.resize(n);
    part.to_f32(b.x.data());
    if (it.map != io::GgufValueMap::None) io::gguf_map_to_file(it.map, b.x.data(), n);
    const int64_t rows = static_cast<int64_t>(n) / cols;
    if (it.centre != Item::Centre::None) centre_values(b.x.data(), rows, cols, it.centre == Item::Centre::Rows);
    const float* x = b.x.data();
    if (it.permute_heads) {
      if (b.permuted.size() < n) b.permuted.resize(n);
      // A bias (1-D: one row of cols values) is permuted as a column, its values the rows.
      const bool bias = it.info.ne.size() == 1;
      permute_rows(x, it.permute_heads, bias ? cols : rows, bias ? 1 : cols, b.permuted.data());
      x = b.permuted.data();
    }
    encode_rows(w, b, rows, rb, [&](int64_t r, uint8_t* dst) {
      try {
        quant::encode_row(it.info.type, x + r * cols, cols, dst);
      } catch (core::Error& e) {
        e.with_frame("row " + std::to_string(r));
        throw;
      }
    });
    if (const auto& release = m.page_releaser())
      for (const core::Tensor* s : part.stored_tensors()) release(s->data(), s->nbytes());
  }
}

}  // namespace

GgmlType gguf_writable_type(const std::string& name, const std::string& key) {
  const auto* info = quant::parse_ggml_type(name);
  if (!info) throw Error::invalid(key + ": unknown ggml type '" + name + "' (written: " + quant::ggml_encoder_names() + ")");
  if (!info->encodes())
    throw Error::unsupported(key + ": " + info->name + " is not written yet (written: " + quant::ggml_encoder_names() + ")");
  return info->type;
}

std::vector<GgufTypeOverride> parse_gguf_overrides(const std::vector<std::string>& specs,
                                                   const std::function<std::string(size_t)>& key) {
  std::vector<GgufTypeOverride> out;
  for (size_t i = 0; i < specs.size(); ++i) {
    const std::string& s = specs[i];
    const auto eq = s.rfind('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == s.size()) throw Error::invalid(key(i) + ": expected REGEX=TYPE");
    const std::string pat = s.substr(0, eq);
    std::regex re;
    try {
      re = std::regex(pat);
    } catch (const std::regex_error& e) {
      throw Error::invalid(key(i) + ": bad regex: " + e.what());
    }
    out.push_back({pat, std::move(re), gguf_writable_type(s.substr(eq + 1), key(i))});
  }
  return out;
}

uint64_t check_gguf(io::Env& env, const io::Checkpoint& ckpt, const model::Model& m, const GgufOptions& opts) {
  uint64_t bytes = 0;
  for (const auto& it : plan_export(env, ckpt, m, opts).items) bytes += it.info.nbytes();
  return bytes;
}

GgufResult write_gguf(io::Env& env, const io::Checkpoint& ckpt, const model::Model& m, const GgufOptions& opts,
                      const fs::path& path) {
  const ExportPlan plan = plan_export(env, ckpt, m, opts);
  std::vector<io::GgufTensorInfo> infos;
  GgufResult r;
  for (const auto& it : plan.items) {
    infos.push_back(it.info);
    r.tensor_bytes += it.info.nbytes();
    ++r.types[quant::ggml_type_info(it.info.type).name];
  }
  r.tensors = infos.size();
  io::GgufWriter w(env, path, plan.kv, infos);
  const std::string src = ckpt.dir().string();
  ExportBuffers buffers;
  for (const auto& it : plan.items)
    core::with_context(src + ": " + it.info.name, [&] { write_item(w, buffers, it, m); });
  core::with_context(path.string(), [&] { buffers.wait(); });
  r.file_bytes = w.finish();
  return r;
}

}  // namespace moe::pipeline
