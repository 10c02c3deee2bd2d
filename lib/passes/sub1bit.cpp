#include "passes/sub1bit.h"

#include <map>
#include <memory>

#include "quant/ternary.h"
#include "quant/ternary_dict.h"

namespace moe::passes {

using nlohmann::json;

json sub1bit_layer(const std::vector<Sub1bitSlot>& slots) {
  std::vector<const quant::Ternary*> tern;
  std::vector<size_t> which;
  for (size_t i = 0; i < slots.size(); ++i) {
    const auto* t = dynamic_cast<const quant::Ternary*>(slots[i].tensor->encoding());
    if (!t || t->ngroups() != 1) continue;
    tern.push_back(t);
    which.push_back(i);
  }
  if (tern.empty()) return json::object();
  // Per-class zero counts before the Ternary encodings are released.
  struct Acc {
    double trits = 0, zeros = 0, bits = 0, params = 0;
  };
  std::map<std::string, Acc> acc;
  for (size_t k = 0; k < tern.size(); ++k) {
    quant::PairStats s;
    quant::add_pair_stats(*tern[k], &s);
    Acc& a = acc[slots[which[k]].cls];
    a.trits += static_cast<double>(s.trits);
    a.zeros += static_cast<double>(s.zeros);
  }
  const quant::DictCoded dc = quant::dict_code(tern);
  const double dict_share = static_cast<double>(quant::dictionary_bits(*dc.dict)) / static_cast<double>(tern.size());
  for (size_t k = 0; k < tern.size(); ++k) {
    const Sub1bitSlot& s = slots[which[k]];
    const auto& w = dc.weights[k];
    Acc& a = acc[s.cls];
    a.bits += static_cast<double>(quant::own_bits(*w)) + dict_share;
    a.params += static_cast<double>(w->rows() * w->cols());
    *s.tensor = core::Tensor::encoded(w, s.tensor->dtype());
  }
  json classes = json::object();
  for (const auto& [cls, a] : acc)
    classes[cls] = {{"zero_fraction", a.trits > 0 ? a.zeros / a.trits : 0.0},
                    {"bits_per_param", a.params > 0 ? a.bits / a.params : 0.0},
                    {"params", static_cast<int64_t>(a.params)}};
  return {{"encoding", "ternary-dict"},
          {"weights", static_cast<int64_t>(tern.size())},
          {"dictionary_codewords", dc.dict->size()},
          {"dictionary_bits", quant::dictionary_bits(*dc.dict)},
          {"codes", dc.codes},
          {"classes", classes}};
}

}  // namespace moe::passes
