#include "runtime/profile.h"

namespace moe::runtime {

namespace {
thread_local PhaseTimes* g_phase_times = nullptr;
}

const char* phase_name(Phase p) {
  switch (p) {
    case Phase::Embed: return "embed";
    case Phase::Dequantize: return "dequantize";
    case Phase::Norms: return "norms";
    case Phase::AttnProjections: return "attention_projections";
    case Phase::RopeQkNorm: return "rope_qk_norm";
    case Phase::AttnCore: return "attention_core";
    case Phase::Router: return "router_routing";
    case Phase::ExpertGemms: return "expert_gemms";
    case Phase::GatherScatter: return "gather_scatter";
    case Phase::SharedExpert: return "shared_expert";
    case Phase::Residual: return "residual_adds";
    case Phase::LmHead: return "lm_head";
    case Phase::Count: break;
  }
  return "?";
}

double PhaseTimes::total() const {
  double s = 0;
  for (double v : seconds) s += v;
  return s;
}

void set_phase_times(PhaseTimes* t) { g_phase_times = t; }

PhaseScope::PhaseScope(Phase p) : times_(g_phase_times), phase_(p) {
  if (times_) t0_ = std::chrono::steady_clock::now();
}

PhaseScope::~PhaseScope() {
  if (times_)
    times_->seconds[static_cast<int>(phase_)] +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
}

}  // namespace moe::runtime
