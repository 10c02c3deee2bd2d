#include "pipeline/preflight.h"

#include "calib/stats.h"
#include "core/error.h"
#include "eval/eval.h"
#include "io/output_dir.h"
#include "pipeline/calibration_text.h"
#include "pipeline/sink.h"
#include "runtime/forward.h"

namespace moe::pipeline {

using core::Error;

namespace {

bool is_gram(const std::string& f) { return f == "gram_in" || f == "gram_mid"; }

}  // namespace

void check_stats_fields(const calib::Stats& s, const model::Model& model, const std::vector<std::string>& fields) {
  for (const auto& l : model.layers()) {
    if (!l.moe) continue;
    for (const auto& f : fields) {
      if (is_gram(f) && !s.has_gram())
        throw Error::invalid(s.source.string() + ": layer " + std::to_string(l.index) + " has no " + f +
                             " (the file was made without --gram); rerun `moe-tool calibrate MODEL --text FILE -o "
                             "STATS --gram`");
      if (!is_gram(f)) s.layer(l.index, f);
    }
  }
}

std::vector<fs::path> run_inputs(const Recipe& r) {
  std::vector<fs::path> inputs = {r.model, r.calibration.text, r.calibration.stats};
  if (r.eval) inputs.push_back(r.eval->text);
  inputs.insert(inputs.end(), r.reads.begin(), r.reads.end());
  return inputs;
}

void preflight(const Recipe& r, const io::Checkpoint& ckpt, const model::Model& model, const RunNeeds& needs,
               bool load_stats_file) {
  // Output: the same rules as the writer applies (io::OutputDir), without creating anything.
  io::check_output(r.output.path, run_inputs(r), r.output.force,
                   output_is_file(r) ? io::OutputKind::File : io::OutputKind::Folder, r.key("output.force"));

  const bool on_the_fly = needs.stats && r.calibration.stats.empty();
  if (on_the_fly && r.calibration.routed_only)
    for (const auto& f : needs.fields)
      if (f == "out_mean" || f == "out_cos")
        throw Error::invalid((r.flag_names.empty() ? r.source + ": " : std::string()) + r.key("calibration.routed_only") +
                             " skips " + f + ", which the first pass needs");
  if (on_the_fly || needs.inputs || r.eval) runtime::ForwardSpec::from_model(model);

  // Statistics file: this model's, with the fields the first pass reads.
  if (needs.stats && !r.calibration.stats.empty() && load_stats_file) {
    const auto s = calib::Stats::load(r.calibration.stats, /*with_gram=*/false);
    s.check_model(ckpt, r.calibration.stats);
    check_stats_fields(s, model, needs.fields);
  }

  // Calibration text: readable, tokenizable, enough windows, ctx within the model's positions.
  if (on_the_fly || needs.inputs) {
    const int64_t maxpos = model.config().get_int_or("max_position_embeddings", 0);
    if (maxpos > 0 && r.calibration.ctx > maxpos)
      throw Error::invalid(r.key("calibration.ctx") + " " + std::to_string(r.calibration.ctx) +
                           " exceeds the model's max_position_embeddings " + std::to_string(maxpos));
    const int64_t windows =
        core::with_context(r.key("calibration.text"), [&] { return calibration_tokens(r.model, r.calibration).windows; });
    if (windows < needs.min_windows) {
      // The cause: the windows the run was limited to, else the text's length at this ctx.
      if (r.calibration.windows > 0 && r.calibration.windows < needs.min_windows)
        throw Error::invalid(r.key("calibration.windows") + " " + std::to_string(r.calibration.windows) + ": " +
                             needs.min_windows_why + " calibration windows are needed: raise it or lower them");
      throw Error::invalid(r.key("calibration.text") + ": gives " + std::to_string(windows) + " windows of " +
                           std::to_string(r.calibration.ctx) + " tokens, but " + needs.min_windows_why +
                           " are needed: lower them, lower " + r.key("calibration.ctx") + " or give more text");
    }
  }

  // Evaluation: text, context, at least one window.
  if (r.eval) {
    eval::EvalOptions eo;
    eo.ctx = r.eval->ctx;
    eo.max_windows = r.eval->max_windows;
    eo.ctx_name = r.key("eval.ctx");
    eo.max_windows_name = r.key("eval.max_windows");
    eval::check_context(model, eo.ctx, false, eo.ctx_name, "");
    core::with_context(r.key("eval.text"), [&] {
      const std::string text = eval::read_text(r.eval->text);  // its errors name the file
      core::with_context(r.eval->text.string(), [&] { eval::make_windows(eval::load_tokenizer(r.model), text, eo); });
    });
  }
}

}  // namespace moe::pipeline
