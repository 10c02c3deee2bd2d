#include "pipeline/mtp.h"

#include <algorithm>

#include "core/error.h"
#include "core/warn.h"
#include "passes/pass.h"  // moe::pipeline::Pass
#include "runtime/mtp.h"

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

void check_mtp_passes(const model::Model& m, const Recipe& r, const std::vector<int64_t>& counts) {
  const int L = runtime::adopted_mtp_layer(m);
  if (L < 0) return;
  const std::string mtp = "the multi-token-prediction layer (model.layers." + std::to_string(L) + ")";
  for (size_t i = 0; i < r.passes.size(); ++i) {
    const Pass& p = *r.passes[i];
    const std::string where = r.source + ": passes[" + std::to_string(i) + "]: " + p.name() + " " + p.method();
    if (p.counts_at_run())
      throw Error::unsupported(where + " decides each layer's expert count while it runs, and " + mtp +
                               " must end with the decoder layers' count (n_routed_experts is one key for both): give "
                               "one count for every layer");
    if (p.name() == "prune" && p.method() == "search")
      throw Error::unsupported(where + " scores a layer by the final output's KL against the input model, which the "
                               "predictions of " + mtp + " (its shared_head logits) do not enter: not implemented for "
                               "a model with an MTP layer; use another prune method");
    if (p.method() == "delta-ternary")
      throw Error::unsupported(where + " stores experts as deltas from the dense parent's MLP of each MoE layer, "
                               "which has none for " + mtp);
  }
  for (const auto& l : m.layers())
    if (l.moe && counts.at(static_cast<size_t>(l.index)) != counts.at(static_cast<size_t>(L)))
      throw Error::unsupported(r.source + ": the passes leave layer " + std::to_string(l.index) + " with " +
                               std::to_string(counts.at(static_cast<size_t>(l.index))) + " experts and " + mtp + " with " +
                               std::to_string(counts.at(static_cast<size_t>(L))) +
                               ": its count must equal the decoder layers' (n_routed_experts is one key for both)");
  if (!r.calibration.text.empty() && r.calibration.ctx < 2)
    throw Error::invalid(r.source + ": " + r.key("calibration.ctx") + " " + std::to_string(r.calibration.ctx) + ": " + mtp +
                         " pairs each position with the next token, so a window needs 2 tokens or more");
}

void check_mtp_stats(const model::Model& m, const calib::Stats& stats, const std::string& path) {
  const int L = runtime::adopted_mtp_layer(m);
  if (L < 0 || stats.layers.count(L)) return;
  throw Error::invalid(path + ": no statistics for the multi-token-prediction layer (model.layers." + std::to_string(L) +
                       "), which the passes compress from its own statistics: the file was made before calibrate "
                       "collected them; run `moe-tool calibrate` again on this model");
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

}  // namespace moe::pipeline
