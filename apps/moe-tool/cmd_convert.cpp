#include <chrono>
#include <iostream>

#include "command.h"
#include "flags.h"
#include "core/error.h"
#include "core/progress.h"
#include "eval/eval.h"
#include "eval/task_subsets.h"
#include "io/checkpoint_writer.h"
#include "io/output_dir.h"
#include "passes/experts.h"
#include "pipeline/hf_sink.h"
#include "pipeline/report.h"

namespace moe::app {

void setup_convert(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  struct Opts {
    std::string in, out, dtype, task;
    bool materialize = false;
    FolderOutputFlags output;
  };
  auto o = std::make_shared<Opts>();
  sub.add_option("IN", o->in, "Input checkpoint folder, or a .gguf file")->required();
  sub.add_option("OUT", o->out, "Output folder (built in a temporary sibling, renamed on success)")->required();
  sub.add_option("--dtype", o->dtype, "Convert float tensors to bf16, f16 or f32 (default: as stored; F8 and integer tensors are kept)");
  sub.add_flag("--materialize", o->materialize,
               "Write every encoded weight (low-rank, FP8, ...) dense, in --dtype or the config's dtype: a stock checkpoint");
  sub.add_option("--task", o->task,
                 "A checkpoint of prune --tasks: write only this task's experts (and their router rows), a stock "
                 "checkpoint equal to a prune to the task's keep-map (docs/tasks.md)");
  o->output.declare(sub);
  sub.callback([o, &handler, &flags] {
    handler = [o, &flags] {
      const auto t0 = std::chrono::steady_clock::now();
      pipeline::HfSinkOptions opts = o->output.sink_options(flags.quiet);
      opts.materialize = o->materialize;
      if (!o->dtype.empty()) {
        opts.dtype = core::parse_user_dtype(o->dtype);
        if (!opts.dtype) throw core::Error::invalid("--dtype: '" + o->dtype + "' is not one of bf16, f16, f32");
      }
      auto& env = io::Env::posix();
      auto ckpt = io::Checkpoint::open(env, o->in);
      auto model = model::Model::load(ckpt);
      // --task: the task's experts only; the report's origin maps them to the source's experts.
      // Without it a task checkpoint keeps its tasks section (same experts, same keep-maps).
      const auto tasks = eval::task_subsets_from_report(ckpt.dir());
      nlohmann::json task_layers = nlohmann::json::array();
      if (!o->task.empty()) {
        const auto keep =
            eval::task_keep(eval::require_task_subsets(ckpt.dir(), "--task " + o->task), model, o->task, "--task");
        const auto origin = eval::origin_from_report(ckpt.dir());
        for (auto& layer : model.layers()) {
          if (!layer.moe) continue;
          const std::vector<int>& k = keep.at(layer.index);
          nlohmann::json org = nlohmann::json::array();
          const bool known =
              origin && static_cast<size_t>(layer.index) < origin->size() && !(*origin)[layer.index].empty();
          for (int e : k) {
            nlohmann::json src = nlohmann::json::array();
            if (known)
              for (int32_t id : (*origin)[layer.index].at(static_cast<size_t>(e))) src.push_back({id, 1.0});
            else
              src.push_back({e, 1.0});
            org.push_back(src);
          }
          passes::keep_experts(*layer.moe, k);
          task_layers.push_back({{"layer", layer.index}, {"kept", passes::ids_json(k)}, {"origin", org}});
        }
      }
      if (o->materialize) {
        // What a stock checkpoint cannot hold (novices, ragged expert counts): refused before any work.
        model.refuse_novices(o->in + ": --materialize", "stock loaders cannot express a constant expert");
        core::with_context(o->in + ": --materialize", [&] { (void)model.rewritten_config(model::OutputOptions{opts.dtype, true}); });
      }
      // Every check before any work: the output (never the input, --force only over an earlier
      // output) and its size against the free space of its file system.
      io::check_output(o->out, {o->in}, o->output.force, io::OutputKind::Folder);
      uint64_t bytes = 0;
      for (const auto& t : model.outputs(model::OutputOptions{opts.dtype, opts.materialize}))
        bytes += io::TensorSpec{t.name, t.dtype, t.shape}.nbytes();
      io::check_free_space(o->out, bytes, "OUT");
      pipeline::HfSink sink(env, o->out, {o->in}, o->output.force, "--force", opts.max_shard_bytes);
      const pipeline::SinkResult r = pipeline::write_hf_checkpoint(sink, model, ckpt, opts);
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      nlohmann::json report = pipeline::make_report("convert", ckpt, model, model, r, secs);
      report["parameters"] = {{"dtype", o->dtype.empty() ? "unchanged" : o->dtype}, {"max_shard_size", o->output.max_shard_size()},
                              {"materialize", o->materialize}};
      if (!o->task.empty()) {
        report["parameters"]["task"] = o->task;
        report["layers"] = task_layers;  // kept: indices into the input's experts; origin: the source's
      } else if (tasks) {
        const auto report_path = ckpt.dir() / "moe_tool_report.json";
        report["tasks"] = io::parse_json_file_text(env.read_text(report_path), report_path.string()).at("tasks");
      }
      sink.write_report(report);
      sink.commit();
      nlohmann::json result = {{"output", o->out}, {"tensors", r.tensors}, {"shards", r.shards},
                               {"bytes_before", ckpt.total_tensor_bytes()}, {"bytes_after", r.tensor_bytes},
                               {"seconds", secs}};
      if (o->output.json) std::cout << result.dump(2) << "\n";
      else
        std::cout << "wrote " << o->out << ": " << r.tensors << " tensors in " << r.shards << " shard(s), "
                  << core::format_bytes(static_cast<double>(ckpt.total_tensor_bytes())) << " -> "
                  << core::format_bytes(static_cast<double>(r.tensor_bytes)) << " in " << secs << " s\n";
      return 0;
    };
  });
}

}  // namespace moe::app
