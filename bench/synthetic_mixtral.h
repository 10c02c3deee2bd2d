// The synthetic mixtral-layout checkpoint that bench_forward and bench_calibrate both measure:
// random small bf16 weights (seeded xorshift), norms 1.0, written through the project's writer
// (bench/synthetic_checkpoint.h, which also writes the other layouts and FP8).
#pragma once

#include <filesystem>

#include "synthetic_checkpoint.h"

namespace moe::bench {

// Writes config.json and the bf16 weights of the mixtral layout of `D` into `dir` (no tokenizer);
// returns the tensor bytes.
inline uint64_t write_model(const fs::path& dir, const Dims& D) {
  SynthSpec s;
  s.D = D;
  return write_synthetic(dir, s);
}

}  // namespace moe::bench
