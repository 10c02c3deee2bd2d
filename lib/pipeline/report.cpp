#include "pipeline/report.h"

#include <set>

namespace moe::pipeline {

namespace {
// Parameters and bytes of routed expert weights, each stored tensor once (gpt-oss's MXFP4 gate and
// up share their blocks and scales).
std::pair<int64_t, uint64_t> expert_params_bytes(const model::Model& m) {
  int64_t p = 0;
  uint64_t b = 0;
  std::set<const core::Tensor*> seen;
  for (const auto& l : m.layers()) {
    if (!l.moe) continue;
    for (const auto& e : l.moe->experts)
      for (const auto* t : {&e.gate, &e.up, &e.down}) {
        p += t->numel();
        for (const core::Tensor* s : t->stored_tensors())
          if (seen.insert(s).second) b += s->nbytes();
      }
  }
  return {p, b};
}
}  // namespace

nlohmann::json make_report(const std::string& command, const io::Checkpoint& input, const model::Model& before,
                           const model::Model& after, const SinkResult& written, double seconds) {
  nlohmann::json r;
  r["tool"] = std::string("moe-tool ") + MOE_TOOL_VERSION;
  r["command"] = command;
  r["input"] = {{"path", input.dir().string()}, {"fingerprint", input.fingerprint()}, {"family", before.family().model_type}};
  const auto [ep0, eb0] = expert_params_bytes(before);
  const auto [ep1, eb1] = expert_params_bytes(after);
  r["params"] = {{"before", before.total_params()}, {"after", after.total_params()},
                 {"active_before", before.active_params()}, {"active_after", after.active_params()}};
  r["bytes"] = {{"before", input.total_tensor_bytes()}, {"after", written.tensor_bytes}};
  r["expert_bits_per_param"] = {{"before", ep0 ? 8.0 * static_cast<double>(eb0) / static_cast<double>(ep0) : 0.0},
                                {"after", ep1 ? 8.0 * static_cast<double>(eb1) / static_cast<double>(ep1) : 0.0}};
  r["shards"] = written.shards;
  r["timings"] = {{"total_seconds", seconds}};
  return r;
}

void write_report(io::Env& env, const io::fs::path& dir, const nlohmann::json& report) {
  env.write_text(dir / "moe_tool_report.json", report.dump(2) + "\n");
}

}  // namespace moe::pipeline
