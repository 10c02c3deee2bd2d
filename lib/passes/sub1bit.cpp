#include "passes/sub1bit.h"

#include <map>
#include <memory>

#include "quant/ternary.h"
#include "quant/ternary_dict.h"

namespace moe::passes {

using nlohmann::json;

namespace {

struct Acc {
  double trits = 0, zeros = 0, bits = 0, params = 0;
};

// The slots holding one-group-per-row Ternary weights, and per class their zero counts.
struct RowTernaries {
  std::vector<const quant::Ternary*> tern;
  std::vector<size_t> which;
  std::map<std::string, Acc> acc;
};

RowTernaries row_ternaries(const std::vector<Sub1bitSlot>& slots) {
  RowTernaries r;
  for (size_t i = 0; i < slots.size(); ++i) {
    const auto* t = dynamic_cast<const quant::Ternary*>(slots[i].tensor->encoding());
    if (!t || t->ngroups() != 1) continue;
    r.tern.push_back(t);
    r.which.push_back(i);
    quant::PairStats s;
    quant::add_pair_stats(*t, &s);
    Acc& a = r.acc[slots[i].cls];
    a.trits += static_cast<double>(s.trits);
    a.zeros += static_cast<double>(s.zeros);
  }
  return r;
}

}  // namespace

json sub1bit_defer(const std::vector<Sub1bitSlot>& slots) {
  const RowTernaries r = row_ternaries(slots);
  if (r.tern.empty()) return json::object();
  json classes = json::object();
  for (const auto& [cls, a] : r.acc) classes[cls] = {{"zero_fraction", a.trits > 0 ? a.zeros / a.trits : 0.0}, {"trits", static_cast<int64_t>(a.trits)}};
  for (size_t k = 0; k < r.tern.size(); ++k) {
    core::Tensor* t = slots[r.which[k]].tensor;
    auto own = std::dynamic_pointer_cast<const quant::Ternary>(t->encoding_ptr());
    *t = core::Tensor::encoded(std::make_shared<const quant::TernaryDictPending>(own), t->dtype());
  }
  return {{"encoding", "ternary-dict"},
          {"dict_scope", "model"},
          {"weights", static_cast<int64_t>(r.tern.size())},
          {"note", "coded with the checkpoint's dictionary after the last layer: bits in the run's sub1bit report"},
          {"classes", classes}};
}

json sub1bit_layer(const std::vector<Sub1bitSlot>& slots) {
  RowTernaries r = row_ternaries(slots);
  const auto& tern = r.tern;
  const auto& which = r.which;
  auto& acc = r.acc;
  if (tern.empty()) return json::object();
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
