// `moe-tool calibrate`: routing statistics of a model over calibration text.
//
// Windows: the text is tokenized once (no BOS/EOS) and cut into non-overlapping windows of ctx
// tokens (a tail shorter than ctx is dropped). `first` takes windows 0..n-1; `random` takes n
// windows chosen with a seeded partial Fisher-Yates shuffle driven by splitmix64 (documented so
// scripts can reproduce it: state = seed; next() = splitmix64; for i in 0..n-1:
// j = i + next() % (M - i), swap(ids[i], ids[j]); the chosen ids are then sorted ascending).
//
// Execution is layer-sequential: the hidden states of all chosen windows are kept
// ([windows*ctx, H] fp32), each layer is converted to f32 once and applied to the windows in
// batches of batch_windows, the StatsObserver watches, and the finished layer's statistics are
// streamed into the stats file before the next layer loads. Memory: one layer's f32 weights +
// the hidden states + one batch's activations (incl. two [sampled tokens, I] buffers for the
// all-experts pass) + the statistics (out_cos keeps up to E*out_cos_tokens*H*4 bytes of expert
// outputs while a batch with out_cos tokens runs; with --gram: one layer's Gram matrices,
// E*H^2*8 + E*I^2*8 bytes for an MoE layer plus the attention's).
//
// Determinism: the forward is deterministic for a fixed batch_windows (OpenBLAS splits a GEMM
// between threads by shape, never by timing, and every output element is reduced by one thread),
// and all statistics are summed in a fixed order on one thread, so a rerun gives a byte-identical
// file (checked by the tests and by bench_calibrate on the d=1024 model, 1 and 2 threads). A
// different batch_windows changes the last bits (GEMM shapes change); it is recorded in the file.
// Files made with 1 and 2 OpenBLAS threads were identical on the fixtures, but OpenBLAS does not
// promise that across thread counts.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "calib/stats.h"
#include "calib/stats_file.h"
#include "io/checkpoint.h"
#include "model/model.h"

namespace moe::calib {

enum class Sample { First, Random };

struct CalibrateOptions {
  int64_t ctx = 512;
  int64_t windows = 0;  // 0: every window of the text
  int64_t batch_windows = 8;
  bool gram = false;
  bool routed_only = false;  // skip out_mean/out_cos (the statistics that run every expert)
  Sample sample = Sample::First;
  uint64_t seed = 0;
  int64_t out_cos_tokens = 512;  // sampled tokens for out_cos
  // --out-stride S >= 1: stream token n (windows concatenated in the chosen order) is sampled when
  // n % S == 0. out_mean = routed tokens exact + S x (sampled tokens not routed to the expert), an
  // estimate of the every-token mean for S > 1; out_cos over the first out_cos_tokens sampled
  // tokens. S = 1 is the exact definition (every token through every expert, E/k times the routed
  // expert compute). Details: calib/stats_observer.h.
  int64_t out_stride = 16;
  bool quiet = false;
  // With gram: also keep every layer's Gram matrices in the returned Stats (they always go to the
  // file; in memory they cost gram_total_bytes, so only for pipelines on models that fit).
  bool keep_grams = false;
  // The stats file is an io::OutputFile: never one of `inputs` (the model folder, the text) nor
  // inside an input folder; an existing file needs `force` (spelt `force_name` in messages).
  std::vector<std::filesystem::path> inputs;
  bool force = false;
  std::string force_name = "--force";
};

// Indices of the chosen windows among `available`, ascending. Throws Error::invalid when more
// windows are asked for than the text has.
std::vector<int64_t> choose_windows(int64_t available, int64_t n, Sample sample, uint64_t seed);

// Everything decided before the forward runs.
struct CalibrationPlan {
  int64_t windows_available = 0;
  std::vector<int64_t> window_ids;
  int64_t tokens = 0;
  std::vector<LayerLayout> layout;
  uint64_t gram_peak_bytes = 0;   // Gram matrices resident at once (the largest layer)
  uint64_t gram_total_bytes = 0;  // all Gram matrices (their share of the stats file)
  uint64_t hidden_bytes = 0;      // hidden states of all windows
  uint64_t layer_weight_bytes = 0;  // the largest layer in f32
};

// Throws Error::invalid for bad options (ctx < 1, or < 2 with a multi-token-prediction layer, too
// few tokens, ...), naming the flag. The layout lists the MTP layer after the decoder layers.
CalibrationPlan plan_calibration(const model::Model& model, int64_t text_tokens, const CalibrateOptions& o);

// Whether a calibration collects the routed-token statistics only: when asked (--routed-only), and
// always for a router that scales each expert's input by its score (llama4), for which the
// all-token statistics (out_mean / out_cos: every expert run on tokens the router did not give it,
// weighted by a score it never applied) are not defined.
bool routed_statistics_only(const model::Model& model, bool requested);

struct CalibrateResult {
  Stats stats;  // Gram matrices only with keep_grams (they always go to the file); super experts flagged
  CalibrationPlan plan;
  double seconds = 0;
  uint64_t file_bytes = 0;
};

// Runs the calibration and writes the stats file `out` (atomically: temporary sibling + rename).
// A model with a multi-token-prediction layer (runtime/mtp.h) gets its MoE block's statistics too,
// as layer num_hidden_layers, on the T-1 positions per window the MTP layer runs on.
// `tokens`: the whole text, tokenized once without special tokens. `text_sha256` goes into the
// metadata.
CalibrateResult calibrate(const io::Checkpoint& ckpt, const model::Model& model, std::span<const int32_t> tokens,
                          const std::string& text_sha256, const CalibrateOptions& o, const std::filesystem::path& out);

// The metadata calibrate() records (exposed for tests).
std::map<std::string, std::string> stats_metadata(const io::Checkpoint& ckpt, const model::Model& model,
                                                  const CalibrationPlan& plan, const std::string& text_sha256,
                                                  const CalibrateOptions& o);

}  // namespace moe::calib
