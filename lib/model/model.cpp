#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <set>

#include "core/error.h"
#include "core/warn.h"

namespace moe::model {

const char* const kNoviceEncoding = "novice";

using core::DType;
using core::Error;
using core::Shape;

bool is_moe_layer(const FamilyDesc& f, const Config& c, int layer) {
  if (!f.moe) return false;
  switch (f.moe_layers) {
    case MoeLayerRule::All: return true;
    case MoeLayerRule::SparseStep: {
      const auto only = c.get_int_list_or("mlp_only_layers", {});
      const int64_t layers = c.get_int_or("num_hidden_layers", 0);  // 0: not checked here
      for (const int64_t v : only)
        if (v < 0 || (layers > 0 && v >= layers))
          throw core::Error::corruption(c.where("mlp_only_layers") + ": layer " + std::to_string(v) +
                                        " not in [0, num_hidden_layers " + std::to_string(layers) + ")");
      if (std::find(only.begin(), only.end(), layer) != only.end()) return false;
      const int64_t step = c.get_int_or("decoder_sparse_step", 1, false);
      return (layer + 1) % step == 0;
    }
    case MoeLayerRule::Interleave: {  // llama4: moe_layers, else range(step - 1, L, step)
      if (c.has("moe_layers") && !c.json().at("moe_layers").is_null()) {
        const auto list = c.get_int_list_or("moe_layers", {});
        const int64_t layers = c.get_int_or("num_hidden_layers", 0);  // 0: not checked here
        for (const int64_t v : list)
          if (v < 0 || (layers > 0 && v >= layers))
            throw core::Error::corruption(c.where("moe_layers") + ": layer " + std::to_string(v) +
                                          " not in [0, num_hidden_layers " + std::to_string(layers) + ")");
        return std::find(list.begin(), list.end(), layer) != list.end();
      }
      const int64_t step = c.get_int_or("interleave_moe_layer_step", 1, false);
      return (layer + 1) % step == 0;
    }
    case MoeLayerRule::FirstKDense: {
      const int64_t first = c.get_int_or("first_k_dense_replace", 0);
      const int64_t freq = c.get_int_or("moe_layer_freq", 1, false);
      return layer >= first && layer % freq == 0;
    }
    case MoeLayerRule::StartEndInterval: {
      // configuration_ernie4_5_moe.py: end -1 (its default) is the last layer.
      const int64_t start = c.get_int_or("moe_layer_start_index", 1);
      const bool to_last = !c.has("moe_layer_end_index") || c.json().at("moe_layer_end_index") == -1;
      const int64_t end = to_last ? c.get_int("num_hidden_layers") - 1 : c.get_int_or("moe_layer_end_index", 0);
      const int64_t interval = c.get_int_or("moe_layer_interval", 1, false);
      return (layer + 1) % interval == 0 && layer >= start && layer <= end;
    }
  }
  return true;
}

void account_into(std::map<std::string, ClassAccount>& acc, const std::vector<OutTensor>& outs) {
  for (const auto& o : outs) {
    auto& a = acc[o.cls.empty() ? "other" : o.cls];
    a.params += o.params;
    a.bytes += static_cast<uint64_t>(core::shape_numel(o.shape)) * core::dtype_size(o.dtype);
  }
}

std::map<std::string, ClassAccount> account(const std::vector<OutTensor>& outs) {
  std::map<std::string, ClassAccount> acc;
  account_into(acc, outs);
  return acc;
}

nlohmann::json account_json(const std::map<std::string, ClassAccount>& acc) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [cls, a] : acc)
    j[cls] = {{"params", a.params}, {"bytes", a.bytes}, {"bits_per_param", a.bits_per_param()}};
  return j;
}

int64_t Model::total_params() const {
  int64_t n = 0;
  for (const auto& [role, t] : globals_) n += t.numel();
  for (const auto& l : layers_) l.for_each_tensor([&](const Tensor& t) { n += t.numel(); });
  for (const auto& [name, t] : extras_) n += t.numel();
  return n;
}

DType Model::materialize_dtype() const {
  const nlohmann::json& j = config_.json();
  for (const char* key : {"dtype", "torch_dtype"}) {
    if (!j.contains(key) || !j[key].is_string()) continue;
    const std::string v = j[key];
    if (v == "bfloat16") return DType::BF16;
    if (v == "float16") return DType::F16;
    if (v == "float32") return DType::F32;
  }
  return DType::BF16;
}

bool Model::has_encoded_weights() const {
  bool any = false;
  for (const auto& [role, t] : globals_) any = any || t.encoding();
  for (const auto& l : layers_) l.for_each_tensor([&](const Tensor& t) { any = any || t.encoding(); });
  for (const auto& [name, t] : extras_) any = any || t.encoding();
  return any;
}

int64_t Model::active_params() const {
  // A text token runs the decoder: the extras (a vision tower, multi-token-prediction layers and
  // heads, passed through) are not counted, as released models' "active" figures leave them out.
  int64_t n = total_params();
  for (const auto& [name, t] : extras_) n -= t.numel();
  for (const auto& layer : layers_)
    if (layer.moe) n -= layer.moe->inactive_params(dims_.top_k);
  return n;
}

int64_t MoeBlock::inactive_params(int64_t top_k) const {
  if (experts.empty()) return 0;
  const int64_t E = num_experts(), k = std::min(top_k, E);
  int64_t all = 0;
  std::vector<int64_t> sizes;
  for (const auto& e : experts) {
    all += e.params();
    sizes.push_back(e.params());
  }
  if (num_novices() == 0) return (E - k) * all / E;
  std::sort(sizes.begin(), sizes.end(), std::greater<int64_t>());
  int64_t used = 0;
  for (int64_t i = 0; i < k; ++i) used += sizes[static_cast<size_t>(i)];
  return all - used;
}

int64_t MoeBlock::num_novices() const {
  return std::count_if(experts.begin(), experts.end(), [](const Mlp& m) { return m.is_novice(); });
}

int64_t MoeBlock::expert_width() const {
  for (const auto& e : experts)
    if (!e.novice) return e.width();
  return 0;
}

int64_t Model::num_novices() const {
  int64_t n = 0;
  for (const auto& l : layers_)
    if (l.moe) n += l.moe->num_novices();
  return n;
}

void Model::refuse_novices(const std::string& what, const std::string& why) const {
  const int64_t n = num_novices();
  if (n > 0)
    throw Error::unsupported(what + ": the model has " + std::to_string(n) + " novice experts (MoNE constants, docs/FORMAT.md); " +
                             why);
}

}  // namespace moe::model
