#include "pipeline/mtp.h"

#include <algorithm>
#include <map>

#include "core/error.h"
#include "core/warn.h"
#include "passes/experts.h"
#include "passes/pass.h"  // moe::pipeline::Pass

namespace moe::pipeline {

using core::Error;

namespace {

// Whether pass p leaves every MoE decoder layer's expert count as it is (quantize, factorize, ...).
// A count it cannot know before running (counts_at_run) is a change. Invalid pass arguments are
// not judged here: the runner reports them with their recipe key when it computes the counts.
bool keeps_expert_counts(const model::Model& m, const Pass& p) {
  if (p.counts_at_run()) return false;
  for (const auto& l : m.layers()) {
    if (!l.moe) continue;
    const int64_t before = l.moe->num_experts();
    try {
      if (p.experts_after(l.index, before, m.dims().top_k) != before) return false;
    } catch (const Error&) {
      return true;
    }
  }
  return true;
}

}  // namespace

void check_mtp_passes(const model::Model& m, const Recipe& r) {
  if (m.mtp_moe_layers().empty()) return;
  for (size_t i = 0; i < r.passes.size(); ++i) {
    const Pass& p = *r.passes[i];
    if (p.name() == "prune" || keeps_expert_counts(m, p)) continue;
    throw Error::unsupported(
        r.source + ": passes[" + std::to_string(i) + "]: " + p.name() + " " + p.method() +
        " changes the decoder layers' expert counts, and the model has a multi-token-prediction layer (model.layers." +
        std::to_string(m.mtp_moe_layers().front()) +
        ") with an MoE block, which must keep the decoder layers' expert count (n_routed_experts is one key for "
        "both); only prune is carried over to it (same keep-map as the last decoder layer). Passes that keep the "
        "expert counts (quantize, factorize, ...) are accepted and leave the MTP layer as it is");
  }
}

size_t drop_stale_mtp_head(model::Model& m, const Recipe& r) {
  auto& extras = m.mutable_extras();
  // qwen3_next's head is `mtp.*`, ERNIE-4.5's `model.mtp_*` (mtp_block, mtp_linear_proj, ...).
  std::string prefix;
  for (const char* p : {"mtp.", "model.mtp_"})
    if (std::any_of(extras.begin(), extras.end(), [&](const auto& x) {
          return x.first.rfind(p, 0) == 0 && x.first.find(".experts.") != std::string::npos;
        }))
      prefix = p;
  if (prefix.empty()) return 0;
  auto in_head = [&](const std::string& name) { return name.rfind(prefix, 0) == 0; };
  for (const auto& p : r.passes) {
    if (keeps_expert_counts(m, *p)) continue;
    const size_t before = extras.size();
    std::erase_if(extras, [&](const auto& x) { return in_head(x.first); });
    // The config no longer promises the head (speculative decoding would look for its weights).
    nlohmann::json& cfg = m.mutable_config().json();
    if (cfg.contains("num_nextn_predict_layers")) cfg["num_nextn_predict_layers"] = 0;
    core::warn_once(r.source + ": " + p->name() + " " + p->method() + " changes the expert counts, so the " + m.family().model_type +
                    " multi-token-prediction head (" + prefix + "*, " + std::to_string(before - extras.size()) +
                    " tensors, whose MoE block keeps the input's count) is not written (num_nextn_predict_layers 0 where the config "
                    "has it); passes that keep the counts "
                    "(quantize, factorize) and convert pass it through");
    return before - extras.size();
  }
  return 0;
}

std::vector<int> kept_from_origin(const nlohmann::json& origin) {
  std::vector<int> kept;
  for (const auto& row : origin) {
    if (row.size() != 1) throw Error::internal("multi-token-prediction layer: an expert with several sources (a merge)");
    kept.push_back(row.at(0).at(0).get<int>());
  }
  return kept;
}

void select_mtp_experts(model::Model& m, const std::vector<int>& kept) {
  const model::FamilyDesc& f = m.family();
  const std::string experts_prefix = f.expert_gate.substr(0, f.expert_gate.find("{e}"));  // "mlp.experts."
  std::map<int, int> new_index;
  for (size_t i = 0; i < kept.size(); ++i) new_index[kept[i]] = static_cast<int>(i);
  for (const int l : m.mtp_moe_layers()) {
    const std::string prefix = model::expand(f.layer_prefix, l);
    const std::string router = prefix + f.router;
    const std::string bias = f.router_bias.empty() ? std::string() : prefix + f.router_bias;
    std::vector<std::pair<std::string, core::Tensor>> out;
    std::vector<std::pair<std::string, core::Tensor>> experts;  // kept, renamed
    for (auto& [name, t] : m.mutable_extras()) {
      if (name == router || (!bias.empty() && name == bias)) {
        out.emplace_back(name, passes::take_rows(t, kept));
        continue;
      }
      if (name.rfind(prefix + experts_prefix, 0) == 0) {
        const std::string rest = name.substr(prefix.size() + experts_prefix.size());
        const size_t dot = rest.find('.');
        const int e = std::stoi(rest.substr(0, dot));
        auto it = new_index.find(e);
        if (it == new_index.end()) continue;  // dropped
        experts.emplace_back(prefix + experts_prefix + std::to_string(it->second) + rest.substr(dot), t);
        continue;
      }
      out.emplace_back(name, t);
    }
    // Experts in their new order, where the layer's expert tensors were.
    std::sort(experts.begin(), experts.end(), [&](const auto& a, const auto& b) {
      auto idx = [&](const std::string& n) { return std::stoi(n.substr(prefix.size() + experts_prefix.size())); };
      return idx(a.first) != idx(b.first) ? idx(a.first) < idx(b.first) : a.first < b.first;
    });
    out.insert(out.end(), experts.begin(), experts.end());
    m.mutable_extras() = std::move(out);
  }
}

}  // namespace moe::pipeline
