#include "pipeline/model_dictionary.h"

#include <memory>
#include <set>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "quant/registry.h"
#include "quant/ternary.h"
#include "quant/ternary_dict.h"

namespace moe::pipeline {

using core::Error;
using nlohmann::json;

namespace {

// One spill group's marked weights, decoded from the group's file.
struct GroupWeights {
  std::shared_ptr<io::SafetensorsFile> file;
  std::map<std::string, const io::TensorInfo*> info;          // tensor name -> its entry in the file
  std::vector<std::pair<std::string, std::shared_ptr<const quant::Ternary>>> weights;  // in manifest order
};

GroupWeights read_group(io::Env& env, const io::fs::path& path, const json& manifest, const std::set<std::string>& marked) {
  GroupWeights g;
  g.file = io::SafetensorsFile::open(env, path);
  for (const auto& t : g.file->header().tensors) g.info[t.name] = &t;
  for (const std::string& name : marked) {
    const json& e = manifest.at(name);
    if (!g.info.count(e.at("parts").at("codes").get<std::string>())) continue;
    std::map<std::string, quant::StoredPart> parts;
    for (const auto& [role, pn] : e.at("parts").items()) {
      auto it = g.info.find(pn.get<std::string>());
      if (it == g.info.end())
        throw Error::internal("weight " + name + ": part " + pn.get<std::string>() + " is not in the group of its codes");
      parts[role] = {std::make_shared<const core::Tensor>(g.file->tensor(*it->second)), false};
    }
    auto t = std::dynamic_pointer_cast<const quant::Ternary>(quant::decode(e, parts));
    if (!t || t->ngroups() != 1) throw Error::internal("weight " + name + ": marked for the model dictionary but not row ternary");
    g.weights.emplace_back(name, std::move(t));
  }
  return g;
}

uint64_t part_bytes(const core::Encoding& e) {
  uint64_t b = 0;
  for (const auto& p : e.parts())
    if (!p.shared) b += p.tensor->nbytes();
  return b;
}

}  // namespace

json code_with_model_dictionary(SpillWriter& spill, json& manifest, const std::map<std::string, std::string>& weight_class,
                                std::map<std::string, model::ClassAccount>& acc) {
  std::set<std::string> marked;
  for (const auto& [name, e] : manifest.items())
    if (quant::TernaryDictPending::marked(e)) marked.insert(name);
  if (marked.empty()) return json();
  io::Env& env = spill.env();
  auto cls_of = [&](const std::string& w) {
    auto it = weight_class.find(w);
    return it == weight_class.end() ? std::string("other") : it->second;
  };

  // 1. Pair statistics of every marked weight (and per class, for the report).
  quant::PairStats all;
  std::map<std::string, quant::PairStats> by_class;
  size_t found = 0;
  for (const auto& path : spill.group_files()) {
    const GroupWeights g = read_group(env, path, manifest, marked);
    for (const auto& [name, t] : g.weights) {
      quant::add_pair_stats(*t, &by_class[cls_of(name)]);
      ++found;
    }
  }
  if (found != marked.size())
    throw Error::internal("model dictionary: " + std::to_string(marked.size()) + " weights marked, " +
                          std::to_string(found) + " found in the spill files");
  for (const auto& [c, s] : by_class) {
    for (int k = 0; k < quant::kPairSymbols; ++k) all.counts[static_cast<size_t>(k)] += s.counts[static_cast<size_t>(k)];
    all.trits += s.trits;
    all.zeros += s.zeros;
  }

  // 2. The dictionary size that stores codes and dictionary in the fewest bits.
  const auto candidates = quant::dictionary_candidates(all);
  std::vector<int64_t> codes(candidates.size(), 0);
  for (const auto& path : spill.group_files()) {
    const GroupWeights g = read_group(env, path, manifest, marked);
    for (const auto& [name, t] : g.weights)
      for (size_t k = 0; k < candidates.size(); ++k) codes[k] += quant::count_codes(*t, *candidates[k]);
  }
  size_t best = 0;
  auto bits_of = [&](size_t k) { return 16 * codes[k] + quant::dictionary_bits(*candidates[k]); };
  for (size_t k = 1; k < candidates.size(); ++k)
    if (bits_of(k) < bits_of(best)) best = k;
  const auto dict = candidates[best];

  // 3. Rewrite the groups: each marked weight's parts replaced by its codes, row counts and levels.
  struct ClassBits {
    double bits = 0, params = 0;
  };
  std::map<std::string, ClassBits> cb;
  bool dict_written = false;
  const double dict_share = static_cast<double>(quant::dictionary_bits(*dict)) / static_cast<double>(marked.size());
  for (size_t gi = 0; gi < spill.group_files().size(); ++gi) {
    const GroupWeights g = read_group(env, spill.group_files()[gi], manifest, marked);
    if (g.weights.empty()) continue;
    std::map<std::string, std::vector<model::OutTensor>> replaced;  // first part name -> the coded parts
    std::set<std::string> dropped;                                  // the other parts of coded weights
    for (const auto& [name, t] : g.weights) {
      const auto coded = quant::TernaryDict::code(*t, dict);
      const std::string cls = cls_of(name);
      model::ClassAccount& a = acc[cls];
      a.bytes = a.bytes - part_bytes(*t) + part_bytes(*coded);
      cb[cls].bits += static_cast<double>(quant::own_bits(*coded)) + dict_share;
      cb[cls].params += static_cast<double>(t->rows() * t->cols());
      json parts = json::object();
      std::vector<model::OutTensor> outs;
      for (const auto& p : coded->parts()) {
        const std::string pn = p.shared ? std::string(kModelDictionaryTensor) : name + p.suffix;
        parts[p.role] = pn;
        if (p.shared && dict_written) continue;
        if (p.shared) {
          dict_written = true;
          a.bytes += p.tensor->nbytes();
        }
        auto part = p.tensor;
        outs.push_back({pn, part->dtype(), part->shape(), [part] { return *part; }, {}, name, cls, 0});
      }
      json entry = coded->params();
      entry["encoding"] = coded->name();
      entry["parts"] = parts;
      const json old = manifest.at(name).at("parts");
      for (const auto& [role, pn] : old.items()) dropped.insert(pn.get<std::string>());
      replaced[old.at("codes").get<std::string>()] = std::move(outs);
      manifest[name] = entry;
    }
    std::vector<model::OutTensor> list;
    for (const auto& info : g.file->header().tensors) {
      auto r = replaced.find(info.name);
      if (r != replaced.end()) {
        for (auto& o : r->second) list.push_back(std::move(o));
        continue;
      }
      if (dropped.count(info.name)) continue;
      list.push_back({info.name, info.dtype, info.shape, [f = g.file, i = info] { return f->tensor(i); }, {}, "", "", 0});
    }
    spill.rewrite_group(gi, list);
  }

  json classes = json::object();
  for (const auto& [cls, s] : by_class)
    classes[cls] = {{"zero_fraction", s.trits > 0 ? static_cast<double>(s.zeros) / static_cast<double>(s.trits) : 0.0},
                    {"bits_per_param", cb[cls].params > 0 ? cb[cls].bits / cb[cls].params : 0.0},
                    {"params", static_cast<int64_t>(cb[cls].params)}};
  return {{"encoding", "ternary-dict"},
          {"dict_scope", "model"},
          {"dictionary_tensor", kModelDictionaryTensor},
          {"weights", static_cast<int64_t>(marked.size())},
          {"dictionary_codewords", dict->size()},
          {"dictionary_bits", quant::dictionary_bits(*dict)},
          {"codes", codes[best]},
          {"classes", classes}};
}

}  // namespace moe::pipeline
