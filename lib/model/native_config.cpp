// The quantization_config readers of a checkpoint's config.json: block-scaled FP8, the native
// moe_tool encodings and ragged expert counts with their keep map (docs/FORMAT.md).
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <set>

#include "core/error.h"
#include "model/detail.h"
#include "model/model.h"

namespace moe::model::detail {

using core::Error;

namespace {

// What one MoE layer's entry of a per-layer count list may be: an integer in [lo, hi], as `what`
// says it in messages.
struct CountBound {
  int64_t lo = 0, hi = std::numeric_limits<int64_t>::max();
  std::string what;
};

// A quantization_config list of one integer per decoder layer (`where` names it): an MoE layer's
// entry within moe_bound(l), a dense layer's 0. Error::corruption naming the entry otherwise.
std::vector<int64_t> read_layer_counts(const Config& c, const FamilyDesc& f, const nlohmann::json& a, const std::string& where,
                                       size_t layers, const std::function<CountBound(size_t)>& moe_bound) {
  if (!a.is_array() || a.size() != layers)
    throw Error::corruption(where + ": expected a list of " + std::to_string(layers) + " integers (one per layer), found " +
                            a.dump());
  std::vector<int64_t> counts;
  for (size_t l = 0; l < layers; ++l) {
    const nlohmann::json& v = a[l];
    const CountBound b = is_moe_layer(f, c, static_cast<int>(l)) ? moe_bound(l) : CountBound{0, 0, "0 (a dense layer)"};
    if (!v.is_number_integer() || v.get<int64_t>() < b.lo || v.get<int64_t>() > b.hi)
      throw Error::corruption(where + "[" + std::to_string(l) + "]: expected " + b.what + ", found " + v.dump());
    counts.push_back(v.get<int64_t>());
  }
  return counts;
}

// quantization_config.input_experts_per_layer and keep_map of a ragged native checkpoint
// (docs/FORMAT.md): both optional; when present, a list of one entry per decoder layer. keep_map[l]
// is null for a dense layer; for an MoE layer null (not recorded) or one entry per written expert:
// an input expert id, or a merged expert's members [[id, weight], ...]; ids are in
// [0, input_experts_per_layer[l]) (>= 0 when that list is absent) and a layer's ids are distinct.
void check_keep_map(const Config& c, const FamilyDesc& f, const nlohmann::json& q, const std::vector<int64_t>& counts,
                    int64_t top_k) {
  const std::string base = c.source() + ": quantization_config.";
  const size_t layers = counts.size();
  std::vector<int64_t> input(layers, -1);  // -1: unknown
  if (q.contains("input_experts_per_layer"))
    input = read_layer_counts(c, f, q.at("input_experts_per_layer"), base + "input_experts_per_layer", layers, [&](size_t l) {
      const int64_t lo = std::max(top_k, counts[l]);
      return CountBound{lo, std::numeric_limits<int64_t>::max(),
                        "an integer >= " + std::to_string(lo) + " (the layer's written expert count)"};
    });
  if (!q.contains("keep_map")) return;
  const std::string where = base + "keep_map";
  const nlohmann::json& m = q.at("keep_map");
  if (!m.is_array() || m.size() != layers)
    throw Error::corruption(where + ": expected a list of " + std::to_string(layers) +
                            " entries (one per layer), found " + m.dump());
  for (size_t l = 0; l < layers; ++l) {
    const nlohmann::json& row = m[l];
    const std::string at = where + "[" + std::to_string(l) + "]";
    const bool moe = is_moe_layer(f, c, static_cast<int>(l));
    if (row.is_null()) continue;
    if (!moe) throw Error::corruption(at + ": expected null (a dense layer), found " + row.dump());
    if (!row.is_array() || static_cast<int64_t>(row.size()) != counts[l])
      throw Error::corruption(at + ": expected null or a list of " + std::to_string(counts[l]) +
                              " entries (experts_per_layer[" + std::to_string(l) + "]), found " + row.dump());
    const std::string range = input[l] >= 0 ? "an input expert id in [0, " + std::to_string(input[l]) + ")"
                                            : std::string("an input expert id >= 0");
    auto id_ok = [&](const nlohmann::json& v) {
      return v.is_number_integer() && v.get<int64_t>() >= 0 && (input[l] < 0 || v.get<int64_t>() < input[l]);
    };
    std::set<int64_t> seen;
    for (size_t e = 0; e < row.size(); ++e) {
      const nlohmann::json& v = row[e];
      const std::string ae = at + "[" + std::to_string(e) + "]";
      if (v.is_array()) {  // a merged expert: [[id, weight], ...]
        if (v.empty()) throw Error::corruption(ae + ": expected a merged expert's members [[id, weight], ...], found []");
        std::set<int64_t> members;
        for (size_t i = 0; i < v.size(); ++i) {
          const nlohmann::json& p = v[i];
          const std::string ap = ae + "[" + std::to_string(i) + "]";
          if (!p.is_array() || p.size() != 2 || !p[1].is_number() || !std::isfinite(p[1].get<double>()))
            throw Error::corruption(ap + ": expected a member [id, weight], found " + p.dump());
          if (!id_ok(p[0])) throw Error::corruption(ap + "[0]: expected " + range + ", found " + p[0].dump());
          if (!members.insert(p[0].get<int64_t>()).second)
            throw Error::corruption(ap + "[0]: expert " + p[0].dump() + " is a member twice");
        }
        continue;
      }
      if (!id_ok(v))
        throw Error::corruption(ae + ": expected " + range + " or a merged expert's members [[id, weight], ...], found " +
                                v.dump());
      if (!seen.insert(v.get<int64_t>()).second)
        throw Error::corruption(ae + ": input expert " + v.dump() + " appears twice in the layer");
    }
  }
}

}  // namespace

std::optional<std::pair<int64_t, int64_t>> fp8_block_size(const Config& c) {
  const nlohmann::json& j = c.json();
  if (!j.contains("quantization_config") || !j.at("quantization_config").is_object()) return std::nullopt;
  const nlohmann::json& q = j.at("quantization_config");
  if (q.value("quant_method", "") != "fp8") return std::nullopt;
  const std::string where = c.source() + ": quantization_config";
  if (!q.contains("weight_block_size"))
    throw Error::unsupported(where + ": fp8 without weight_block_size (per-tensor FP8 scales) is not supported; only "
                             "block-scaled FP8 (weight_scale_inv) is");
  const nlohmann::json& b = q.at("weight_block_size");
  if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || !b[1].is_number_integer() ||
      b[0].get<int64_t>() < 1 || b[1].get<int64_t>() < 1)
    throw Error::corruption(where + ".weight_block_size: expected two positive integers, found " + b.dump());
  if (q.contains("fmt") && q.at("fmt") != "e4m3")
    throw Error::unsupported(where + ".fmt: " + q.at("fmt").dump() + " (only e4m3 block-scaled FP8 is read)");
  return std::make_pair(b[0].get<int64_t>(), b[1].get<int64_t>());
}

const nlohmann::json* native_weights(const Config& c) {
  const nlohmann::json& j = c.json();
  if (!j.contains("quantization_config") || !j.at("quantization_config").is_object()) return nullptr;
  const nlohmann::json& q = j.at("quantization_config");
  if (q.value("quant_method", "") != "moe_tool") return nullptr;
  const std::string where = c.source() + ": quantization_config";
  if (!q.contains("format_version") || q.at("format_version") != 1)
    throw Error::unsupported(where + ".format_version: " + (q.contains("format_version") ? q.at("format_version").dump() : "missing") +
                             " (this moe-tool reads format 1)");
  if (!q.contains("weights") || !q.at("weights").is_object())
    throw Error::corruption(where + ".weights: expected an object (weight name -> encoding)");
  for (const auto& [name, e] : q["weights"].items()) {
    if (!e.is_object() || !e.contains("parts") || !e.at("parts").is_object() || e.at("parts").empty())
      throw Error::corruption(where + ".weights[\"" + name + "\"].parts: expected an object (part -> tensor name)");
    for (const auto& [role, t] : e.at("parts").items())
      if (!t.is_string())
        throw Error::corruption(where + ".weights[\"" + name + "\"].parts." + role + ": expected a tensor name, found " + t.dump());
  }
  return &q.at("weights");
}

std::vector<int64_t> native_expert_counts(const Config& c, const FamilyDesc& f, int64_t layers, int64_t E, int64_t top_k) {
  const nlohmann::json& j = c.json();
  if (!j.contains("quantization_config") || !j.at("quantization_config").is_object()) return {};
  const nlohmann::json& q = j.at("quantization_config");
  if (q.value("quant_method", "") != "moe_tool" || !q.contains("experts_per_layer")) return {};
  const std::vector<int64_t> counts = read_layer_counts(
      c, f, q.at("experts_per_layer"), c.source() + ": quantization_config.experts_per_layer", static_cast<size_t>(layers),
      [&](size_t) {
        return CountBound{top_k, E,
                          "an integer in [" + std::to_string(top_k) + ", " + std::to_string(E) + "] (" + f.topk_key + " .. " +
                              f.expert_count_key + ")"};
      });
  check_keep_map(c, f, q, counts, top_k);
  return counts;
}

}  // namespace moe::model::detail
