#include "runtime/finite.h"

#include <cmath>
#include <filesystem>

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

}  // namespace

void check_finite(const float* v, int64_t n, int64_t cols, const core::Tensor& src) {
  // Sum first (vectorises; NaN and Inf propagate), then find the index only when needed.
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += v[i] * 0.0f;
  if (std::isfinite(acc)) return;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isfinite(v[i])) continue;
    std::string where = "index " + std::to_string(i);
    if (cols > 0 && src.rank() == 2)
      where += " (row " + std::to_string(i / cols) + ", column " + std::to_string(i % cols) + ")";
    throw NonFiniteError(std::string("non-finite value ") + (std::isnan(v[i]) ? "nan" : v[i] > 0 ? "inf" : "-inf") +
                             " at " + where + " of " + core::shape_str(src.shape()),
                         identity(src));
  }
}

void name_non_finite(const model::Model& m, int layer, NonFiniteError& e) {
  if (!e.source() || layer < 0 || layer >= static_cast<int>(m.layers().size())) return;
  try {
    for (const auto& o : m.layer_outputs(layer)) {
      if (o.sources.size() != 1) continue;
      // The tensor itself, or a fused tensor holding it (gpt_oss, llama4: one expert's slice).
      const core::Tensor t = o.make();
      if (!t.data() || e.source() < t.data() || e.source() >= t.data() + t.nbytes()) continue;
      const std::string dir = std::filesystem::path(m.config().source()).parent_path().string();
      // A part of an encoded weight names the weight (its parts are decoded together).
      e.with_frame((dir.empty() ? std::string() : dir + ": ") + "tensor " + (o.weight.empty() ? o.name : o.weight));
      return;
    }
  } catch (const core::Error&) {
    // Naming is best effort: the original error says what is wrong.
  }
}

}  // namespace moe::runtime
