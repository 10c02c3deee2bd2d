// Sub-1-bit coding with one dictionary for the whole checkpoint (the quantize pass's dict_scope
// "model"; QMoE, Frantar & Alistarh 2023, codes every expert with one fixed dictionary). The
// pipeline runs layer by layer and GPTQ makes a layer's trits depend on the layers before it, so
// the pair statistics of the model are known only after the last layer: the pass leaves each
// weight as quant::TernaryDictPending, the runner writes it as plain `ternary` into its spill files
// (pipeline/spill_writer.h), and once every layer is written this step
//   1. reads the spilled trits of every marked weight and counts the 9 pair symbols,
//   2. builds the candidate Tunstall dictionaries (2^8 ... 2^16 codewords) and keeps the one that
//      stores all codes plus the dictionary in the fewest bits (a second read of the trits),
//   3. rewrites each spill group that holds marked weights, coding them as `ternary-dict` with that
//      dictionary, stored once as the tensor kModelDictionaryTensor (in the first such group).
// Memory: one group (layer) at a time. Exact: the trits read back are the trits the pass chose.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "model/model.h"
#include "pipeline/spill_writer.h"

namespace moe::pipeline {

// The safetensors name of the model-wide dictionary (docs/FORMAT.md, ternary-dict).
inline constexpr const char* kModelDictionaryTensor = "moe_tool.ternary_dict.dictionary";

// Codes the weights `manifest` marks (quant::TernaryDictPending::marked) in the spill's groups and
// rewrites their manifest entries as ternary-dict. `weight_class` maps each weight to its tensor
// class; `acc` (stored bytes per class, as written to the spill) is corrected to the coded bytes,
// the dictionary counted with the class of its first user. Returns the report (null when nothing
// is marked): dictionary codewords and bits, total codes, and per class the zero fraction of the
// trits and the stored bits per parameter (codes, row counts, levels, and the dictionary's bits split
// equally over every coded weight). Throws Error::internal for a marked weight that is in no group.
nlohmann::json code_with_model_dictionary(SpillWriter& spill, nlohmann::json& manifest,
                                          const std::map<std::string, std::string>& weight_class,
                                          std::map<std::string, model::ClassAccount>& acc);

}  // namespace moe::pipeline
