// Sub-1-bit coding of ternary weights, the quantize pass's `sub1bit` option (QMoE, docs/methods.md):
// once a layer's matrices are quantized (rtn or gptq) with a ternary-minmax row codec, its Ternary
// weights are dictionary-coded (quant/ternary_dict.h), lossless against their trits, with one
// Tunstall dictionary built from the pair statistics of
//   dict_scope "layer"  the layer's weights, stored once per layer (sub1bit_layer), or
//   dict_scope "model"  every layer's weights, stored once per checkpoint: the layer's weights are
//                       marked (sub1bit_defer) and coded by the runner after the last layer
//                       (pipeline/model_dictionary.h).
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
// fraction of the trits and the stored bits per parameter (codes, row counts, levels and the
// dictionary's share; the dictionary's bits split equally over the weights using it, as
// inspect counts them).
nlohmann::json sub1bit_layer(const std::vector<Sub1bitSlot>& slots);

// dict_scope "model": wraps every slot's one-group-per-row Ternary as quant::TernaryDictPending
// and returns the layer's report: per class the zero fraction of the trits (the bits are known
// once the model's dictionary is built: the run's "sub1bit" report).
nlohmann::json sub1bit_defer(const std::vector<Sub1bitSlot>& slots);

}  // namespace moe::passes
