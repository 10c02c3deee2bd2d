// Model::rewritten_config: the config.json of an output (counts, aliases, quantization_config).
#include <algorithm>
#include <cmath>
#include <functional>
#include <set>

#include "core/error.h"
#include "core/warn.h"
#include "io/packed_input.h"
#include "model/detail.h"
#include "model/model.h"
#include "model/wrapped_config.h"

namespace moe::model {

using core::DType;
using core::Error;
using core::Shape;
using detail::kExpertCountKeys;
using detail::kTopKKeys;

nlohmann::json Model::rewritten_config(const OutputOptions& opts, const nlohmann::json* manifest) const {
  const std::optional<DType> dtype = opts.dtype;
  nlohmann::json j = config_.json();
  const FamilyDesc& f = *family_;
  std::vector<int64_t> counts;  // experts per decoder layer (0: dense)
  bool ragged = false;
  if (f.moe) {
    int64_t E = -1, I = -1;
    int first = -1;
    for (const auto& layer : layers_) {
      counts.push_back(layer.moe ? layer.moe->num_experts() : 0);
      if (!layer.moe) continue;
      const int64_t e = layer.moe->num_experts();
      const int64_t w = layer.moe->expert_width();
      for (const auto& x : layer.moe->experts)
        if (!x.novice && x.width() != w)
          throw Error::unsupported("layer " + std::to_string(layer.index) +
                                   ": experts of different widths cannot be written in the " + f.model_type + " layout");
      if (E >= 0 && w != I)
        throw Error::unsupported("layer " + std::to_string(layer.index) + " has experts of width " + std::to_string(w) +
                                 " but layer " + std::to_string(first) + " of width " + std::to_string(I) +
                                 ": every MoE layer needs the same expert width");
      if (E >= 0 && e != E) {
        // Ragged counts: only the native format holds them (quantization_config.experts_per_layer).
        if (opts.materialize)
          throw Error::unsupported("layer " + std::to_string(layer.index) + " has " + std::to_string(e) +
                                   " experts but layer " + std::to_string(first) + " has " + std::to_string(E) +
                                   ": stock loaders need the same expert count in every MoE layer (write the native "
                                   "format, without materialize)");
        ragged = true;
      }
      if (first < 0) {
        first = layer.index;
        E = e;
        I = w;
      }
    }
    if (ragged) E = *std::max_element(counts.begin(), counts.end());
    if (E >= 0) {
      const bool changed = !j.contains(f.expert_count_key) || j[f.expert_count_key] != E;
      j[f.expert_count_key] = E;
      j[f.expert_width_key] = I;
      if (j.contains(f.topk_key) && j[f.topk_key].get<int64_t>() > E) j[f.topk_key] = E;
      // Other spellings of the two keys (equal to them at load, see check_aliases) follow them.
      for (const char* a : kExpertCountKeys)
        if (a != f.expert_count_key && j.contains(a) && !j[a].is_null()) j[a] = E;
      for (const char* a : kTopKKeys)
        if (a != f.topk_key && j.contains(a) && !j[a].is_null() && j.contains(f.topk_key)) j[a] = j[f.topk_key];
      // DeepSeek group-limited routing: groups are contiguous blocks of E / n_group experts. Once
      // experts are dropped or merged those blocks no longer are the trained groups (and E may
      // not divide), so the written model routes plain top-k: one group, chosen always.
      if (changed && j.contains("n_group") && j["n_group"].is_number_integer() && j["n_group"].get<int64_t>() > 1) {
        j["n_group"] = 1;
        if (j.contains("topk_group")) j["topk_group"] = 1;
      }
    }
  }
  // quantization_config for the encoded weights as written.
  nlohmann::json own;
  if (!manifest) {
    (void)outputs(opts, &own);
    manifest = &own;
  }
  bool native = false;
  std::set<std::string> fp8_blocks;
  // gpt_oss MXFP4 experts written as their blocks (model/outputs.cpp): the fused tensors'
  // modules ("model.layers.3.mlp.experts"), and every MoE layer's module.
  std::set<std::string> mxfp4_modules;
  nlohmann::json kept = nlohmann::json::object();  // the manifest without them
  for (const auto& [name, e] : manifest->items()) {
    if (e.at("encoding") == "mxfp4") {
      mxfp4_modules.insert(name.substr(0, name.rfind('.')));
      continue;
    }
    kept[name] = e;
    if (e.at("encoding") == "fp8-block") fp8_blocks.insert(e.at("block").dump());
    else native = true;
  }
  manifest = &kept;
  const std::string qm = j.contains("quantization_config") && j.at("quantization_config").is_object()
                             ? j.at("quantization_config").value("quant_method", "") : "";
  if (native || fp8_blocks.size() > 1 || ragged) {
    j["quantization_config"] = {{"quant_method", "moe_tool"}, {"format_version", 1}, {"weights", *manifest}};
    if (ragged) {
      j["quantization_config"]["experts_per_layer"] = counts;
      // The input's keep-map, when it had one (convert); a pipeline run writes its own.
      const nlohmann::json& in = config_.json();
      if (in.contains("quantization_config") && in["quantization_config"].is_object() &&
          in["quantization_config"].contains("keep_map"))
        j["quantization_config"]["keep_map"] = in["quantization_config"]["keep_map"];
      if (in.contains("quantization_config") && in["quantization_config"].is_object() &&
          in["quantization_config"].contains("input_experts_per_layer"))
        j["quantization_config"]["input_experts_per_layer"] = in["quantization_config"]["input_experts_per_layer"];
    }
  } else if (fp8_blocks.size() == 1) {
    if (qm != "fp8")
      j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                                  {"weight_block_size", nlohmann::json::parse(*fp8_blocks.begin())}};
  } else if (!mxfp4_modules.empty()) {
    // The input's MXFP4 config (modules_to_not_convert: attention, routers, embeddings, lm_head),
    // with the expert modules of the layers written dense added (transformers'
    // replace_with_mxfp4_linear skips a listed module).
    nlohmann::json q = qm == "mxfp4" ? j.at("quantization_config") : nlohmann::json{{"quant_method", "mxfp4"}};
    nlohmann::json skip = q.contains("modules_to_not_convert") && q.at("modules_to_not_convert").is_array()
                              ? q.at("modules_to_not_convert") : nlohmann::json::array();
    for (const auto& layer : layers_)
      if (layer.moe) {
        const std::string gu = expand(f.layer_prefix, layer.index) + f.fused_gate_up;
        const std::string mod = gu.substr(0, gu.rfind('.'));
        if (!mxfp4_modules.count(mod) && std::find(skip.begin(), skip.end(), mod) == skip.end()) skip.push_back(mod);
      }
    q["modules_to_not_convert"] = skip;
    j["quantization_config"] = q;
  } else if (qm == "fp8" || qm == "moe_tool" || qm == "mxfp4" || io::PackedInput::reads(qm)) {
    j.erase("quantization_config");  // every weight written dense (gpt_oss MXFP4 experts decoded)
  }
  // transformers >= 4.56 writes "dtype" (and prefers it), older versions "torch_dtype": update
  // whichever the input has, both when it has both, "torch_dtype" (read by every version) when none.
  if (dtype) {
    const char* name = *dtype == DType::BF16 ? "bfloat16" : *dtype == DType::F16 ? "float16" : "float32";
    const bool has_new = j.contains("dtype"), has_old = j.contains("torch_dtype");
    if (has_new) j["dtype"] = name;
    if (has_old || !has_new) j["torch_dtype"] = name;
  }
  if (!wrapper_.is_null()) return wrap_text_config(wrapper_, std::move(j));  // llama4: back into text_config
  return j;
}

}  // namespace moe::model
