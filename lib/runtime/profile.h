// Wall time of the forward's phases, for benchmarks (bench/bench_forward.cpp). Off unless a
// PhaseTimes is installed on the calling thread; when off a PhaseScope costs one thread-local
// load. Phases are timed on the thread that drives the forward: a phase run on several threads
// (runtime/parallel.h) counts its wall time once.
#pragma once

#include <array>
#include <chrono>

namespace moe::runtime {

enum class Phase : int {
  Embed,           // token rows of the embedding
  Dequantize,      // a layer's weights to f32 (Forward::load_layer_into)
  Norms,           // RMSNorms before attention, before the MLP/MoE block, and the final norm
  AttnProjections, // q/k/v and o projections (GEMMs)
  RopeQkNorm,      // RoPE, per-head q/k norms, clip_qkv
  AttnCore,        // QK^T, masked softmax, PV
  Router,          // router logits, routing rule, tokens per expert
  ExpertGemms,     // routed experts' gate/up/down GEMMs and GLU
  GatherScatter,   // gathering each expert's token rows; weighted scatter-add into the output
  SharedExpert,    // the shared expert and its gate
  Residual,        // adding attention and MLP outputs to the residual stream
  LmHead,          // lm_head (dequantised slices and GEMMs)
  Count
};

const char* phase_name(Phase p);

struct PhaseTimes {
  std::array<double, static_cast<int>(Phase::Count)> seconds{};
  double total() const;
};

// Installs `t` for the calling thread (nullptr: off).
void set_phase_times(PhaseTimes* t);

// Adds the wall time from construction to destruction to its phase when timing is on.
class PhaseScope {
 public:
  explicit PhaseScope(Phase p);
  ~PhaseScope();
  PhaseScope(const PhaseScope&) = delete;
  PhaseScope& operator=(const PhaseScope&) = delete;

 private:
  PhaseTimes* times_;
  Phase phase_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace moe::runtime
