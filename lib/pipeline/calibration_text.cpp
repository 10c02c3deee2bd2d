#include "pipeline/calibration_text.h"

#include "calib/calibrate.h"
#include "calib/sha256.h"
#include "core/error.h"
#include "eval/eval.h"
#include "io/checkpoint.h"

namespace moe::pipeline {

namespace {

std::vector<int32_t> text_tokens(const std::filesystem::path& model_dir, const CalibrationSpec& spec) {
  return eval::load_tokenizer(model_dir).encode(eval::read_text(spec.text), false);
}

}  // namespace

CalibrationTokens calibration_tokens(const std::filesystem::path& model_dir, const CalibrationSpec& spec) {
  const std::vector<int32_t> all = text_tokens(model_dir, spec);
  const int64_t available = static_cast<int64_t>(all.size()) / spec.ctx;
  // The same windows `moe-tool calibrate` takes (the first N), so statistics and block inputs agree.
  const auto ids = core::with_context(spec.text.string(), [&] {
    if (available == 0)
      throw core::Error::invalid(std::to_string(all.size()) + " tokens, fewer than one window of ctx " + std::to_string(spec.ctx));
    return calib::choose_windows(available, spec.windows > 0 ? spec.windows : available,
                                 spec.sample == "random" ? calib::Sample::Random : calib::Sample::First, spec.seed);
  });
  CalibrationTokens ct;
  ct.ctx = spec.ctx;
  ct.windows = static_cast<int64_t>(ids.size());
  for (int64_t w : ids) ct.tokens.insert(ct.tokens.end(), all.begin() + w * spec.ctx, all.begin() + (w + 1) * spec.ctx);
  return ct;
}

calib::Stats collect_stats(const io::Checkpoint& ckpt, const model::Model& model, const CalibrationSpec& spec,
                          uint64_t seed, bool quiet, const std::filesystem::path& out) {
  const std::string text = eval::read_text(spec.text);
  const std::vector<int32_t> tokens = eval::load_tokenizer(ckpt.dir()).encode(text, false);
  calib::CalibrateOptions o;
  o.ctx = spec.ctx;
  o.windows = spec.windows;
  o.batch_windows = spec.batch_windows;
  o.out_stride = spec.out_stride;
  o.seed = seed;
  o.quiet = quiet;
  o.gram = spec.gram;
  o.keep_grams = spec.gram;
  // runner.cpp refuses the passes that read out_mean / out_cos where they are not defined.
  o.routed_only = calib::routed_statistics_only(model, spec.routed_only);
  o.out_cos_tokens = spec.out_cos_tokens;
  o.sample = spec.sample == "random" ? calib::Sample::Random : calib::Sample::First;
  // Without `out` the statistics stay in memory (nothing to clean up after an interrupted run).
  o.inputs = {ckpt.dir(), spec.text};
  o.force = true;
  auto result = calib::calibrate(ckpt, model, tokens, calib::sha256_hex(text), o, out);
  return std::move(result.stats);
}

}  // namespace moe::pipeline
