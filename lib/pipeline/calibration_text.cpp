#include "pipeline/calibration_text.h"

#include <unistd.h>

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
    return calib::choose_windows(available, spec.windows > 0 ? spec.windows : available, calib::Sample::First, 0);
  });
  CalibrationTokens ct;
  ct.ctx = spec.ctx;
  ct.windows = static_cast<int64_t>(ids.size());
  for (int64_t w : ids) ct.tokens.insert(ct.tokens.end(), all.begin() + w * spec.ctx, all.begin() + (w + 1) * spec.ctx);
  return ct;
}

calib::Stats collect_stats(const io::Checkpoint& ckpt, const model::Model& model, const CalibrationSpec& spec,
                          uint64_t seed, bool quiet) {
  const std::string text = eval::read_text(spec.text);
  const std::vector<int32_t> tokens = eval::load_tokenizer(ckpt.dir()).encode(text, false);
  calib::CalibrateOptions o;
  o.ctx = spec.ctx;
  o.windows = spec.windows;
  o.batch_windows = spec.batch_windows;
  o.out_stride = spec.out_stride;
  o.seed = seed;
  o.quiet = quiet;
  // calibrate() streams its statistics into a file; keep it out of the output folder (loaders
  // that glob *.safetensors would pick it up) and remove it once read.
  const auto tmp = std::filesystem::temp_directory_path() / ("moe-tool-stats-" + std::to_string(getpid()) + ".safetensors");
  auto result = calib::calibrate(ckpt, model, tokens, calib::sha256_hex(text), o, tmp);
  std::error_code ec;
  std::filesystem::remove(tmp, ec);
  return std::move(result.stats);
}

}  // namespace moe::pipeline
