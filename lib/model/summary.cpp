#include "model/summary.h"

#include <algorithm>
#include <cstdio>

#include <map>
#include <sstream>

#include "core/progress.h"

namespace moe::model {

using nlohmann::json;

json summarize(const io::Checkpoint& ckpt, const Model& model, bool with_tensors) {
  const FamilyDesc& f = model.family();
  const Dims& d = model.dims();
  json s;
  s["path"] = ckpt.dir().string();
  s["family"] = f.model_type;
  const json& top = model.wrapper_config().is_null() ? model.config().json() : model.wrapper_config();
  s["architectures"] = top.value("architectures", json::array());
  s["layers"] = d.layers;
  s["hidden_size"] = d.hidden;
  s["attention_heads"] = d.heads;
  s["kv_heads"] = d.kv_heads;
  s["head_dim"] = d.head_dim;
  s["vocab_size"] = d.vocab;
  s["tied_embeddings"] = model.tied_embeddings();
  s["attention"] = f.attention == AttentionKind::MLA ? "mla" : "standard";
  std::vector<int64_t> experts_per_layer, widths, dense_layers, moe_layers, novices_per_layer;
  int64_t shared = 0, shared_width = 0, novice_params = 0;
  for (const auto& l : model.layers()) {
    if (l.moe) {
      moe_layers.push_back(l.index);
      experts_per_layer.push_back(l.moe->num_experts());
      widths.push_back(l.moe->expert_width());
      novices_per_layer.push_back(l.moe->num_novices());
      for (const auto& e : l.moe->experts)
        if (e.novice) novice_params += e.params();
      if (l.moe->shared) {
        shared = f.shared_count_key.empty() ? 1 : model.config().get_int_or(f.shared_count_key, std::max<int64_t>(f.default_shared_count, 1));
        shared_width = l.moe->shared->width();
      }
    } else {
      dense_layers.push_back(l.index);
    }
  }
  s["moe"] = f.moe;
  if (f.moe) {
    s["routing"] = routing_name(f.routing);
    bool uniform = true;
    for (auto e : experts_per_layer) uniform = uniform && e == experts_per_layer.front();
    if (uniform && !experts_per_layer.empty()) s["experts_per_layer"] = experts_per_layer.front();
    else s["experts_per_layer"] = experts_per_layer;
    s["experts_per_token"] = d.top_k;
    s["expert_width"] = widths.empty() ? 0 : widths.front();
    s["shared_experts"] = shared;
    if (shared) s["shared_expert_width"] = shared_width;
    s["moe_layers"] = moe_layers.size();
    if (model.num_novices() > 0) {
      // Novice experts (MoNE constants, docs/FORMAT.md): per MoE layer, their parameters (H each)
      // and the bytes their stored values take.
      uint64_t novice_bytes = 0;
      for (const auto& name : ckpt.names())
        if (name.ends_with(kNoviceSuffix)) novice_bytes += ckpt.info(name).nbytes();
      s["novices"] = {{"count", model.num_novices()}, {"per_layer", novices_per_layer}, {"params", novice_params},
                      {"bytes", novice_bytes}};
    }
  }
  s["dense_layers"] = dense_layers;
  if (!model.mtp_moe_layers().empty()) s["mtp_moe_layers"] = model.mtp_moe_layers();
  // The stored dtype as the config says it: "dtype" (transformers >= 4.56, preferred) or "torch_dtype".
  const Config& c = model.config();
  const std::string cfg_dtype = c.get_string_or("dtype", c.get_string_or("torch_dtype", ""));
  if (!cfg_dtype.empty()) s["config_dtype"] = cfg_dtype;
  s["params_total"] = model.total_params();
  s["params_active_per_token"] = model.active_params();
  std::map<std::string, uint64_t> by_dtype;
  for (const auto& name : ckpt.names()) {
    const auto& info = ckpt.info(name);
    by_dtype[core::dtype_name(info.dtype)] += info.nbytes();
  }
  s["bytes_by_dtype"] = by_dtype;
  if (model.fp8_block_scaled()) {
    // Block-scaled FP8 weights: how many, and their bits per weight with the scales counted.
    int64_t n = 0, weights = 0;
    uint64_t bytes = 0;
    for (const auto& name : ckpt.names()) {
      if (!name.ends_with("_scale_inv")) continue;
      const std::string w = name.substr(0, name.size() - 10);
      if (!ckpt.has(w)) continue;
      ++n;
      weights += core::shape_numel(ckpt.info(w).shape);
      bytes += ckpt.info(w).nbytes() + ckpt.info(name).nbytes();
    }
    s["quantization"] = {{"method", "fp8 block-scaled (e4m3 codes, weight_scale_inv per block)"},
                         {"block", model.config().json().at("quantization_config").at("weight_block_size")},
                         {"weights", n},
                         {"bits_per_weight", weights ? 8.0 * static_cast<double>(bytes) / static_cast<double>(weights) : 0.0}};
  }
  // Encoded weights (docs/FORMAT.md) and what each tensor class stores per parameter.
  {
    json manifest = json::object();
    OutputOptions stored;
    stored.as_stored = true;
    const auto outs = model.outputs(stored, &manifest);
    std::map<std::string, int64_t> encodings;
    for (const auto& [name, e] : manifest.items()) ++encodings[e["encoding"].get<std::string>()];
    s["encodings"] = encodings;
    // Cross-layer expert sharing (docs/xlayer.md): the experts' logical parameters against the
    // elements they store (a pooled expert once for the two layers that name it).
    if (encodings.count("pooled")) {
      int64_t logical = 0, stored = 0;
      for (const auto& l : model.layers())
        if (l.moe)
          for (const auto& x : l.moe->experts) logical += x.params();
      for (const auto& o : outs)
        if (o.cls == "experts") stored += core::shape_numel(o.shape);
      s["expert_pool"] = {{"pooled_weights", encodings["pooled"]}, {"expert_params_logical", logical},
                          {"expert_params_stored", stored}};
    }
    auto acc = account(outs);
    // MXFP4 experts (gpt_oss, core/mxfp4.h): listed as the blocks and scales they are stored in.
    int64_t mxfp4_tensors = 0, mxfp4_weights = 0;
    uint64_t mxfp4_bytes = 0;
    for (const auto& o : outs) {
      if (o.weight.empty() || !manifest.contains(o.weight) || manifest.at(o.weight).value("encoding", "") != "mxfp4") continue;
      mxfp4_tensors += o.params > 0;
      mxfp4_weights += o.params;
      mxfp4_bytes += static_cast<uint64_t>(core::shape_numel(o.shape)) * core::dtype_size(o.dtype);
    }
    if (mxfp4_weights > 0)
      s["quantization"] = {{"method", "mxfp4 (e2m1 codes, one e8m0 scale per block)"},
                           {"block", 32},
                           {"weights", mxfp4_tensors},
                           {"bits_per_weight", 8.0 * static_cast<double>(mxfp4_bytes) / static_cast<double>(mxfp4_weights)}};
    s["tensor_classes"] = account_json(acc);
    int64_t params = 0;
    uint64_t bytes = 0;
    for (const auto& [cls, a] : acc) {
      params += a.params;
      bytes += a.bytes;
    }
    s["bits_per_param"] = params ? 8.0 * static_cast<double>(bytes) / static_cast<double>(params) : 0.0;
  }
  s["bytes_total"] = ckpt.total_tensor_bytes();
  s["tensors"] = ckpt.names().size();
  s["shards"] = ckpt.shards().size();
  if (with_tensors) {
    json list = json::array();
    for (const auto& name : ckpt.names()) {
      const auto& info = ckpt.info(name);
      list.push_back({{"name", name}, {"dtype", core::dtype_name(info.dtype)}, {"shape", info.shape},
                      {"shard", ckpt.shard_path(name).filename().string()}});
    }
    s["tensor_list"] = list;
  }
  return s;
}

namespace {
std::string human_count(int64_t n) {
  std::ostringstream o;
  o.precision(3);
  if (n >= 1'000'000'000) o << n / 1e9 << "B";
  else if (n >= 1'000'000) o << n / 1e6 << "M";
  else if (n >= 1'000) o << n / 1e3 << "K";
  else o << n;
  return o.str();
}
}  // namespace

std::string render_summary(const json& s) {
  std::ostringstream o;
  auto row = [&](const std::string& k, const std::string& v) { o << "  " << k << std::string(k.size() < 24 ? 24 - k.size() : 1, ' ') << v << "\n"; };
  o << s.at("path").get<std::string>() << "\n";
  row("family", s.at("family").get<std::string>() + " " + s.at("architectures").dump());
  row("layers", std::to_string(s.at("layers").get<int64_t>()));
  row("hidden size", std::to_string(s.at("hidden_size").get<int64_t>()));
  row("heads / kv heads", std::to_string(s.at("attention_heads").get<int64_t>()) + " / " +
                              std::to_string(s.at("kv_heads").get<int64_t>()) + " (head dim " +
                              std::to_string(s.at("head_dim").get<int64_t>()) + ", " + s.at("attention").get<std::string>() + ")");
  row("vocabulary", std::to_string(s.at("vocab_size").get<int64_t>()) + (s.at("tied_embeddings").get<bool>() ? " (tied lm head)" : ""));
  if (s.at("moe").get<bool>()) {
    row("experts per layer", s.at("experts_per_layer").dump());
    row("experts per token", std::to_string(s.at("experts_per_token").get<int64_t>()));
    row("expert width", std::to_string(s.at("expert_width").get<int64_t>()));
    row("shared experts", std::to_string(s.at("shared_experts").get<int64_t>()) +
                              (s.contains("shared_expert_width") ? " (width " + std::to_string(s.at("shared_expert_width").get<int64_t>()) + ")" : ""));
    row("routing", s.at("routing").get<std::string>());
    row("MoE layers", std::to_string(s.at("moe_layers").get<int64_t>()));
    if (s.contains("novices")) {
      const json& n = s.at("novices");
      row("novice experts", std::to_string(n.at("count").get<int64_t>()) + " (per layer " + n.at("per_layer").dump() +
                                "; " + human_count(n.at("params").get<int64_t>()) + " parameters, " +
                                core::format_bytes(n.at("bytes").get<double>()) + "; MoNE constants, native format only)");
    }
  }
  row("dense layers", s.at("dense_layers").empty() ? "none" : s.at("dense_layers").dump());
  if (s.contains("mtp_moe_layers"))
    row("MTP layers", s.at("mtp_moe_layers").dump() + " (multi-token prediction, MoE block checked against the config)");
  if (s.contains("config_dtype")) row("config dtype", s.at("config_dtype").get<std::string>());
  row("parameters", human_count(s.at("params_total").get<int64_t>()) + " total, " +
                        human_count(s.at("params_active_per_token").get<int64_t>()) + " active per token");
  std::string bytes;
  for (const auto& [k, v] : s.at("bytes_by_dtype").items()) bytes += (bytes.empty() ? "" : ", ") + k + " " + core::format_bytes(v.get<double>());
  row("bytes", core::format_bytes(s.at("bytes_total").get<double>()) + " (" + bytes + ")");
  if (s.contains("quantization")) {
    const json& q = s.at("quantization");
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.3f", q.at("bits_per_weight").get<double>());
    row("quantization", q.at("method").get<std::string>() + ", blocks " + q.at("block").dump() + ", " +
                            std::to_string(q.at("weights").get<int64_t>()) + " weights, " + buf + " bits per weight");
  }
  if (s.contains("encodings") && !s.at("encodings").empty()) {
    std::string e;
    for (const auto& [k, v] : s.at("encodings").items()) e += (e.empty() ? "" : ", ") + k + " " + std::to_string(v.get<int64_t>());
    row("encoded weights", e);
  }
  if (s.contains("expert_pool")) {
    const json& p = s.at("expert_pool");
    row("expert pool", std::to_string(p.at("pooled_weights").get<int64_t>()) + " expert weights name a pooled tensor (" +
                           "cross-layer sharing); expert parameters " + human_count(p.at("expert_params_logical").get<int64_t>()) +
                           " logical, " + human_count(p.at("expert_params_stored").get<int64_t>()) + " stored");
  }
  if (s.contains("tensor_classes")) {
    std::string c;
    char buf[96];
    for (const auto& [k, v] : s.at("tensor_classes").items()) {
      std::snprintf(buf, sizeof buf, "%s %.3g", k.c_str(), v.at("bits_per_param").get<double>());
      c += (c.empty() ? "" : ", ") + std::string(buf);
    }
    std::snprintf(buf, sizeof buf, "%.3f overall; ", s.at("bits_per_param").get<double>());
    row("bits per parameter", buf + c);
  }
  row("tensors / shards", std::to_string(s.at("tensors").get<int64_t>()) + " / " + std::to_string(s.at("shards").get<int64_t>()));
  if (s.contains("tensor_list")) {
    o << "tensors:\n";
    for (const auto& t : s.at("tensor_list"))
      o << "  " << t.at("name").get<std::string>() << "  " << t.at("dtype").get<std::string>() << " " << t.at("shape").dump()
        << "  " << t.at("shard").get<std::string>() << "\n";
  }
  return o.str();
}

}  // namespace moe::model
