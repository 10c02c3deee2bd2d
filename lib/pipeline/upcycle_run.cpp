#include "pipeline/upcycle_run.h"

#include <chrono>
#include <limits>

#include "core/error.h"
#include "core/progress.h"
#include "io/checkpoint_writer.h"
#include "io/gguf_model.h"
#include "io/output_dir.h"
#include "io/temp_files.h"
#include "model/model.h"
#include "passes/options.h"
#include "passes/upcycle.h"
#include "pipeline/gguf_export.h"
#include "pipeline/hf_sink.h"
#include "pipeline/recipe.h"

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
  OutputSpec format;  // output.format: hf, or gguf with output.type / output.tensor_type
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
    parse_output_format(o, j.at("output"), format);
    if (format.format != "hf" && format.format != "gguf")
      throw Error::invalid("output.format: '" + format.format + "': an upcycle recipe writes hf or gguf (the upcycled experts "
                           "are dense weights, which the packed formats do not hold)");
    if (format.format == "gguf" && format.type.empty())
      throw Error::invalid("output.type: missing (required with output.format gguf: the main ggml type, e.g. q8_0)");
    o.finish();
  });
  const bool gguf = format.format == "gguf";
  format.path = out;
  const GgufOptions go = gguf ? gguf_output_options(format, [](const std::string& k) { return k; }) : GgufOptions{};
  auto& env = io::Env::posix();
  // Every file the run reads is an input the output may not be, be inside or contain.
  std::vector<fs::path> inputs{model, uo.prompts, uo.text};
  for (const auto& s : uo.sources) inputs.push_back(s);
  inputs.insert(inputs.end(), opts.reads.begin(), opts.reads.end());
  const uint64_t bytes = core::with_context(source, [&] { return passes::check_upcycle(env, model, uo); });
  io::check_output(out, inputs, force, gguf ? io::OutputKind::File : io::OutputKind::Folder, "output.force");
  if (gguf && !io::is_gguf_path(model)) {
    // Before any work, what the GGUF writer decides from the dense model: the main type's blocks
    // against its widths, the tokenizer, RoPE scaling and sliding window, which the upcycled model
    // keeps (the --tensor-type rules, named by the MoE's tensor names, and an expert width a split
    // narrows are checked on the upcycled model once it is staged, nothing written; so is all of it
    // for a GGUF source, whose tokenizer the staged folder holds as tokenizer.json).
    core::with_context(source, [&] {
      const io::Checkpoint dense = io::Checkpoint::open(env, model);
      GgufOptions main_only = go;
      main_only.overrides.clear();
      core::with_context("output.format gguf", [&] { (void)check_gguf(env, dense, model::Model::load(dense), main_only); });
    });
  }
  io::check_free_space(out, bytes, "output.path");
  json summary = {{"command", opts.command}, {"model", model.string()}, {"output", out.string()}, {"to", uo.to},
                  {"method", uo.method}, {"experts", uo.experts}, {"top_k", uo.top_k},
                  {"disk", {{"needs", bytes}, {"free", io::free_space(out)}}}};
  if (opts.dry_run) {
    summary["dry_run"] = true;
    return summary;
  }
  const auto t0 = std::chrono::steady_clock::now();
  // GGUF: the upcycled checkpoint staged in a temporary folder beside the file and converted as
  // `moe-tool export` converts a folder (the recipes' export sinks do the same, pipeline/sink.h).
  std::optional<io::OutputFile> file;
  std::optional<io::StagingFolder> staging;
  std::optional<HfSink> hf;
  if (gguf) {
    file.emplace(env, out, inputs, force, "output.force");
    const std::string name = out.filename().string() + ".native";
    io::remove_stale_temps(file->path().parent_path(), io::temp_prefix(name));
    staging.emplace(env, file->path().parent_path(), name);
    hf.emplace(env, staging->path(), uo.max_shard_bytes);
  } else {
    hf.emplace(env, out, inputs, force, "output.force", uo.max_shard_bytes);
  }
  HfSink& sink = *hf;
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
  if (gguf) {
    const io::Checkpoint ckpt = io::Checkpoint::open(env, staging->path());
    const GgufResult g = [&] {
      try {
        return core::with_context(source, [&] {
          return core::with_context("output.format gguf", [&] { return write_gguf(env, ckpt, model::Model::load(ckpt), go, file->path()); });
        });
      } catch (Error& e) {
        e.with_path_shown(staging->path().string(), "the upcycled model staged for " + out.string());
        e.with_path_shown(file->path().string(), out.string());
        throw;
      }
    }();
    staging->remove();
    file->commit();
    summary["format"] = "gguf";
    summary["bytes"] = g.tensor_bytes;
    summary["file_bytes"] = g.file_bytes;
    summary["tensors"] = g.tensors;
    summary["types"] = g.types;
    summary["shards"] = 1;
    // A GGUF file has no room for moe_tool_report.json: the report is in this summary only.
    summary["report"] = nullptr;
    summary["upcycle_report"] = report;
  } else {
    sink.write_report(report);
    sink.commit();
    summary["bytes"] = r.tensor_bytes;
    summary["tensors"] = r.tensors;
    summary["shards"] = r.shards;
    summary["report"] = (out / "moe_tool_report.json").string();
  }
  summary["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  summary["equals_dense_at_init"] = report["upcycle"]["equals_dense_at_init"];
  summary["next"] = report["upcycle"]["next"];
  return summary;
}

}  // namespace moe::pipeline
