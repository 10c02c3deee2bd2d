// Sub-1-bit coding of a layer's ternary weights, the quantize pass's `sub1bit` option (QMoE,
// METHODS.md §6): once the layer's matrices are quantized (rtn or gptq) with a ternary-minmax
// row codec, one Tunstall dictionary is built from the pair statistics of all of them and every
// Ternary weight of the layer is replaced by its dictionary-coded form (quant/ternary_dict.h),
// lossless against its trits. The dictionary is stored once per layer.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace moe::passes {

struct Sub1bitSlot {
  core::Tensor* tensor;
  std::string cls;  // tensor class in the report ("experts", "shared", ...)
};

// Codes every slot whose tensor holds a one-group-per-row Ternary encoding (others are left as
// they are) and returns the layer's report: dictionary codewords and bits, per class the zero
// fraction of the trits and the stored bits per parameter (codes, offsets, levels and the
// dictionary's share; the dictionary's bits split equally over the weights using it, as
// inspect counts them).
nlohmann::json sub1bit_layer(const std::vector<Sub1bitSlot>& slots);

}  // namespace moe::passes
