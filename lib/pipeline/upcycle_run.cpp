#include "pipeline/upcycle_run.h"

#include <chrono>
#include <limits>

#include "core/error.h"
#include "core/progress.h"
#include "io/checkpoint_writer.h"
#include "io/output_dir.h"
#include "passes/options.h"
#include "passes/upcycle.h"
#include "pipeline/hf_sink.h"

namespace moe::pipeline {

using core::Error;
using nlohmann::json;
namespace fs = std::filesystem;

bool is_upcycle_recipe(const json& recipe) { return recipe.is_object() && recipe.contains("upcycle"); }

void check_upcycle_section_keys(const json& section) {
  passes::Options s(section, "upcycle", "upcycle");
  s.allow(passes::upcycle_section_keys());
  s.finish();
}

json run_upcycle_recipe(const json& j, const fs::path& base, const std::string& source, const UpcycleRunOptions& opts) {
  auto resolve = [&](const std::string& p) {
    const fs::path x(p);
    return x.is_absolute() ? x : (base / x).lexically_normal();
  };
  passes::UpcycleOptions uo;
  fs::path model, out;
  bool force = false;
  core::with_context(source, [&] {
    passes::Options top(j, "", "an upcycle recipe");
    top.allow({"upcycle", "output"});
    top.opt_string("description", /*non_empty=*/false);
    model = resolve(top.get_string("model"));
    const int64_t seed = top.get_int("seed", 0, 0, std::numeric_limits<int64_t>::max());
    if (j.contains("passes")) throw Error::invalid("passes: a recipe has either passes or an upcycle section, not both");
    top.finish();
    check_upcycle_section_keys(j.at("upcycle"));
    uo = passes::parse_upcycle_section(j.at("upcycle"), base);
    uo.seed = static_cast<uint64_t>(seed);
    if (!j.contains("output")) throw Error::invalid("output: missing (required)");
    passes::Options o(j.at("output"), "output", "output");
    out = resolve(o.get_string("path"));
    if (auto d = o.opt_string("dtype")) {
      uo.dtype = core::parse_user_dtype(*d);
      if (!uo.dtype) throw Error::invalid("output.dtype: '" + *d + "' is not one of bf16, f16, f32");
    }
    if (auto m = o.opt_string("max_shard_size"))
      uo.max_shard_bytes = core::with_context("output.max_shard_size", [&] { return io::parse_size(*m); });
    force = o.get_bool("force", false);
    o.finish();
  });
  auto& env = io::Env::posix();
  // Every file the run reads is an input the output may not be, be inside or contain.
  std::vector<fs::path> inputs{model, uo.prompts, uo.text};
  for (const auto& s : uo.sources) inputs.push_back(s);
  inputs.insert(inputs.end(), opts.reads.begin(), opts.reads.end());
  const uint64_t bytes = core::with_context(source, [&] { return passes::check_upcycle(env, model, uo); });
  io::check_output(out, inputs, force, io::OutputKind::Folder, "output.force");
  io::check_free_space(out, bytes, "output.path");
  json summary = {{"command", opts.command}, {"model", model.string()}, {"output", out.string()}, {"to", uo.to},
                  {"method", uo.method}, {"experts", uo.experts}, {"top_k", uo.top_k},
                  {"disk", {{"needs", bytes}, {"free", io::free_space(out)}}}};
  if (opts.dry_run) {
    summary["dry_run"] = true;
    return summary;
  }
  const auto t0 = std::chrono::steady_clock::now();
  HfSink sink(env, out, inputs, force, "output.force", uo.max_shard_bytes);
  const passes::Upcycler up(env, model, uo);
  const std::vector<io::TensorSpec> plan = up.plan();
  sink.begin(up.source(), plan);
  uint64_t planned = 0;
  for (const auto& s : plan) planned += s.nbytes();
  core::Progress progress("upcycle", planned, "B", opts.quiet);
  // The writer's refusals (a NaN/Inf copied from the dense model) name the model, then the tensor.
  auto write = [&](const std::vector<model::OutTensor>& group) {
    core::with_context(model.string(), [&] { sink.write(group); });
    for (const auto& o : group) progress.add(io::TensorSpec{o.name, o.dtype, o.shape}.nbytes());
  };
  write(up.head());
  for (int l = 0; l < up.layers(); ++l) {
    write(up.layer(l));
    up.release_layer(l);
  }
  write(up.tail());
  const SinkResult r = sink.finish(up.config());
  progress.finish();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  json report = up.report(r.tensor_bytes, r.shards);
  report["command"] = opts.command;
  report["recipe"] = j;
  report["timings"]["total_seconds"] = secs;
  sink.write_report(report);
  sink.commit();
  summary["bytes"] = r.tensor_bytes;
  summary["tensors"] = r.tensors;
  summary["shards"] = r.shards;
  summary["seconds"] = secs;
  summary["equals_dense_at_init"] = report["upcycle"]["equals_dense_at_init"];
  summary["next"] = report["upcycle"]["next"];
  summary["report"] = (out / "moe_tool_report.json").string();
  return summary;
}

}  // namespace moe::pipeline
