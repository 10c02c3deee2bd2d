#include "runtime/finite.h"

#include <cmath>
#include <filesystem>
#include <string>

namespace moe::runtime {

namespace {

// What name_non_finite matches an output against: the tensor's bytes, or for an encoded weight the
// bytes of its first part of its own (a shared part, such as a dictionary, names its first user).
const uint8_t* identity(const core::Tensor& src) {
  if (src.data() || !src.encoding()) return src.data();
  for (const auto& p : src.encoding()->parts())
    if (!p.shared && p.tensor) return p.tensor->data();
  return nullptr;
}

bool holds(const core::Tensor& t, const uint8_t* p) { return t.data() && p >= t.data() && p < t.data() + t.nbytes(); }

// A fused-layout family's experts (gpt_oss, llama4, granitemoe, the v5 layouts) are stored as one
// [E, ...] tensor per projection and copied out per expert at load (model/load.cpp), so no output
// holds the bad bytes: the expert whose tensor holds them names the stored tensor. "" when none.
std::string fused_expert_tensor(const model::Model& m, int layer, const uint8_t* source) {
  const model::FamilyDesc& f = m.family();
  const model::Layer& l = m.layers()[static_cast<size_t>(layer)];
  if (!f.fused() || !l.moe) return "";
  const std::string prefix = model::expand(f.layer_prefix, layer);
  for (size_t e = 0; e < l.moe->experts.size(); ++e) {
    const model::Mlp& x = l.moe->experts[e];
    std::string name;
    if (holds(x.gate, source) || holds(x.up, source)) name = f.fused_gate_up;
    else if (holds(x.down, source)) name = f.fused_down;
    else if ((x.gate_bias && holds(*x.gate_bias, source)) || (x.up_bias && holds(*x.up_bias, source))) name = f.fused_gate_up_bias;
    else if (x.down_bias && holds(*x.down_bias, source)) name = f.fused_down_bias;
    if (!name.empty()) return prefix + name + " (expert " + std::to_string(e) + ")";
  }
  return "";
}

}  // namespace

void check_finite(const float* v, int64_t n, int64_t cols, const core::Tensor& src, int64_t first) {
  // Sum first (vectorises; NaN and Inf propagate), then find the index only when needed.
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += v[i] * 0.0f;
  if (std::isfinite(acc)) return;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isfinite(v[i])) continue;
    const int64_t at = first + i;
    std::string where = "index " + std::to_string(at);
    if (cols > 0 && src.rank() == 2)
      where += " (row " + std::to_string(at / cols) + ", column " + std::to_string(at % cols) + ")";
    throw NonFiniteError(std::string("non-finite value ") + (std::isnan(v[i]) ? "nan" : v[i] > 0 ? "inf" : "-inf") +
                             " at " + where + " of " + core::shape_str(src.shape()),
                         identity(src));
  }
}

void name_non_finite(const model::Model& m, int layer, NonFiniteError& e) {
  if (!e.source() || layer < 0 || layer >= static_cast<int>(m.layers().size())) return;
  // The checkpoint: a folder's config.json names its folder; a GGUF file's config is the file.
  const std::filesystem::path config(m.config().source());
  const std::string dir = (config.filename() == "config.json" ? config.parent_path() : config).string();
  if (const std::string fused = fused_expert_tensor(m, layer, e.source()); !fused.empty()) {
    e.with_frame((dir.empty() ? std::string() : dir + ": ") + "tensor " + fused);
    return;
  }
  try {
    for (const auto& o : m.layer_outputs(layer)) {
      if (o.sources.size() != 1) continue;
      const core::Tensor t = o.make();
      if (!holds(t, e.source())) continue;
      // A part of an encoded weight names the weight (its parts are decoded together).
      e.with_frame((dir.empty() ? std::string() : dir + ": ") + "tensor " + (o.weight.empty() ? o.name : o.weight));
      return;
    }
  } catch (const core::Error&) {
    // Naming is best effort: the original error says what is wrong.
  }
}

}  // namespace moe::runtime
