// `share IN OUT --stats FILE --share R`: cross-layer expert sharing (passes/xlayer_share.h): experts
// of adjacent MoE layers pooled and stored once (docs/xlayer.md); `convert --materialize` expands
// the pool back into per-layer experts.
#include <chrono>
#include <iostream>

#include "command.h"
#include "flags.h"
#include "calib/stats.h"
#include "core/error.h"
#include "core/progress.h"
#include "io/checkpoint_writer.h"
#include "io/output_dir.h"
#include "passes/xlayer_share.h"
#include "pipeline/hf_sink.h"
#include "pipeline/report.h"

namespace moe::app {

void setup_share(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  struct Opts {
    std::string in, out, stats, method = "pairs";
    double share = -1;
    bool dry_run = false;
    FolderOutputFlags output;
  };
  auto o = std::make_shared<Opts>();
  sub.add_option("IN", o->in, "Input checkpoint folder (dense experts)")->required();
  sub.add_option("OUT", o->out, "Output folder (built in a temporary sibling, renamed on success)")->required();
  sub.add_option("--stats", o->stats, "Calibration statistics of IN (moe-tool calibrate; out_mean and count are used)")->required();
  sub.add_option("--share", o->share, "Share of expert parameters pooled away, in [0, 0.5]: round(R x experts) pooled experts")
      ->required();
  sub.add_option("--method", o->method, "Method: " + pass_methods("share") + " (see moe-tool list; recipe key passes[0].method; default pairs)");
  o->output.declare(sub);
  sub.add_flag("--dry-run", o->dry_run, "Run every check and choose the pools; write nothing");
  sub.callback([o, &handler, &flags] {
    handler = [o, &flags] {
      const auto t0 = std::chrono::steady_clock::now();
      if (o->method != "pairs")  // passes/passes.def: the one method of pass share
        throw core::Error::invalid("--method: unknown method \"" + o->method + "\" for share (allowed: " + pass_methods("share") + ")");
      const pipeline::HfSinkOptions opts = o->output.sink_options(flags.quiet);
      auto& env = io::Env::posix();
      auto ckpt = io::Checkpoint::open(env, o->in);
      const auto stats = calib::Stats::load(o->stats, /*with_gram=*/false);
      stats.check_model(ckpt, o->stats);
      const model::Model before = model::Model::load(ckpt);
      model::Model model = before;
      nlohmann::json pools =
          core::with_context(o->in, [&] { return passes::share_experts_across_layers(model, stats, o->share); });
      io::check_output(o->out, {o->in, o->stats}, o->output.force, io::OutputKind::Folder);
      uint64_t bytes = 0;
      for (const auto& t : model.outputs(model::OutputOptions{})) bytes += io::TensorSpec{t.name, t.dtype, t.shape}.nbytes();
      io::check_free_space(o->out, bytes, "OUT");
      nlohmann::json result = {{"output", o->out}, {"pools", pools["pools"].size()},
                               {"expert_params_logical", pools["expert_params_logical"]},
                               {"expert_params_stored", pools["expert_params_stored"]}, {"bytes_before", ckpt.total_tensor_bytes()}};
      if (o->dry_run) {
        result["dry_run"] = true;
        result["bytes_after"] = bytes;
      } else {
        pipeline::HfSink sink(env, o->out, {o->in, o->stats}, o->output.force, "--force", opts.max_shard_bytes);
        const pipeline::SinkResult r = pipeline::write_hf_checkpoint(sink, model, ckpt, opts);
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        nlohmann::json report = pipeline::make_report("share", ckpt, before, model, r, secs);
        report["share"] = pools;
        sink.write_report(report);
        sink.commit();
        result["bytes_after"] = r.tensor_bytes;
        result["tensors"] = r.tensors;
      }
      if (o->output.json) std::cout << result.dump(2) << "\n";
      else
        std::cout << (o->dry_run ? "dry run, nothing written: " : "wrote ") << o->out << ": " << result["pools"].dump()
                  << " pooled experts, expert parameters " << result["expert_params_logical"].dump() << " logical, "
                  << result["expert_params_stored"].dump() << " stored; "
                  << core::format_bytes(static_cast<double>(ckpt.total_tensor_bytes())) << " -> "
                  << core::format_bytes(result["bytes_after"].get<double>()) << "\n";
      return 0;
    };
  });
}

}  // namespace moe::app
