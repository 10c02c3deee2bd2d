// moe-tool export MODEL OUT [--format gguf|compressed-tensors|gptq|awq]: the flags of the export
// sinks (pipeline/gguf_export.h, pipeline/packed_export.h), which a recipe's "output" section
// also reaches (pipeline/sink.h).
// - gguf (OUT.gguf, --type TYPE [--tensor-type REGEX=TYPE]): a GGUF v3 file llama.cpp loads
//   (docs/gguf.md).
// - compressed-tensors / gptq / awq (OUT a folder): the model's intN codes as they are, in the
//   int4/int8 layouts vLLM and transformers load (awq: int4 only) (docs/compressed-tensors.md).
#include <chrono>
#include <iostream>
#include <map>

#include "command.h"
#include "core/error.h"
#include "core/progress.h"
#include "io/checkpoint.h"
#include "io/checkpoint_writer.h"
#include "io/gguf_model.h"
#include "io/output_dir.h"
#include "model/model.h"
#include "pipeline/gguf_export.h"
#include "pipeline/packed_export.h"
#include "pipeline/sink.h"

namespace moe::app {

namespace {

using core::Error;
namespace fs = std::filesystem;

}  // namespace

void setup_export(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  struct Opts {
    std::string in, out, type, format, max_shard_size;
    std::vector<std::string> tensor_types;
    bool force = false, json = false;
  };
  auto o = std::make_shared<Opts>();
  sub.add_option("MODEL", o->in,
                 "Input checkpoint folder (mixtral, qwen2_moe, qwen3_moe, olmoe, glm4_moe, granitemoe, ernie4_5_moe, deepseek_v3, "
                 "kimi_k2, deepseek_v2, gpt_oss, qwen3_next, llama4_text, llama4: its text model, phimoe; dense: llama, mistral, qwen2, "
                 "qwen3)")
      ->required();
  sub.add_option("OUT", o->out,
                 "Output: a .gguf file, or a folder for compressed-tensors, gptq and awq (written as a temporary sibling, renamed "
                 "on success)")->required();
  sub.add_option("--format", o->format,
                 "gguf (llama.cpp), compressed-tensors (pack-quantized), gptq or awq (GEMM, int4) (vLLM, transformers); default gguf for an "
                 "OUT ending in .gguf, else required")
      ->check(CLI::IsMember({"gguf", "compressed-tensors", "gptq", "awq"}));
  sub.add_option("--type", o->type,
                 "gguf: main tensor type: f32, f16, bf16, q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1, q4_0, q3_k, q2_k, tq2_0, "
                 "tq1_0 (required for gguf)");
  sub.add_option("--tensor-type", o->tensor_types,
                 "gguf: override by GGUF tensor name, REGEX=TYPE (std::regex search; the first match wins; 1-D tensors and "
                 "routers stay f32)");
  CLI::Option* shard_opt = sub.add_option("--max-shard-size", o->max_shard_size,
                 "compressed-tensors, gptq, awq: largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB); a .gguf file "
                 "is one file");
  sub.add_flag("--force", o->force, "Replace an existing output (file or folder the tool wrote)");
  sub.add_flag("--json", o->json, "Print the result as JSON");
  sub.callback([o, &handler, &flags, shard_opt] {
    handler = [o, &flags, shard_given = shard_opt->count() > 0] {
      (void)flags;
      const auto t0 = std::chrono::steady_clock::now();
      std::string format = o->format;
      if (format.empty()) {
        if (fs::path(o->out).extension() != ".gguf")
          throw Error::invalid("OUT '" + o->out + "': not a .gguf file; give --format compressed-tensors, gptq or awq "
                               "for a folder (or --format gguf)");
        format = "gguf";
      }
      if (format == "gguf" && !o->out.empty() && o->out.back() == '/')
        throw Error::invalid("OUT '" + o->out + "': a folder name (a trailing '/'), but --format gguf writes one file");
      if (format != "gguf") {
        if (io::has_gguf_name(o->out))
          throw Error::invalid("OUT '" + o->out + "': a .gguf name, but --format " + format +
                               " writes a folder; name the folder without .gguf (or give --format gguf)");
        if (!o->type.empty() || !o->tensor_types.empty())
          throw Error::invalid(std::string(o->type.empty() ? "--tensor-type" : "--type") + ": gguf only; --format " + format +
                               " writes the model's intN codes as they are");
        const uint64_t max_shard_bytes =
            !shard_given ? 5'000'000'000ull
                                      : core::with_context("--max-shard-size", [&] { return io::parse_size(o->max_shard_size); });
        const io::PackedFormat fmt = pipeline::parse_packed_format(format);
        auto& env = io::Env::posix();
        auto ckpt = io::Checkpoint::open(env, o->in);
        auto model = model::Model::load(ckpt);
        if (fmt == io::PackedFormat::Gptq)
          pipeline::check_gptq_layer_kinds(
              model,
              [](const model::OutTensor& o, const nlohmann::json& manifest) {
                return !o.weight.empty() && manifest.at(o.weight).value("encoding", "") == "intN";
              },
              ckpt.dir().string() + ": --format gptq", "--format");
        const uint64_t needs = pipeline::check_packed(ckpt, model, fmt);
        io::check_free_space(o->out, needs, "OUT");
        io::OutputDir out(env, o->out, {o->in}, o->force);
        // Errors name OUT, not the temporary folder it is written as.
        const pipeline::PackedResult plan = core::with_path_shown(out.path().string(), o->out, [&] {
          return pipeline::write_packed(env, ckpt, model, fmt, out.path(), max_shard_bytes);
        });
        uint64_t bytes = 0;
        for (const auto& e : fs::directory_iterator(out.path())) bytes += e.is_regular_file() ? e.file_size() : 0;
        out.commit();
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const auto& sc = plan.scheme;
        const double bpp = 8.0 * static_cast<double>(plan.quantized_bytes) / static_cast<double>(plan.quantized_params);
        nlohmann::json result = {{"output", o->out}, {"format", format}, {"bits", sc.bits},
                                 {"group_size", sc.group == 0 ? -1 : sc.group}, {"symmetric", sc.symmetric},
                                 {"quantized_linears", plan.quantized_linears}, {"dense_linears", plan.dense_linears},
                                 {"tensors", plan.tensors}, {"shards", plan.shards}, {"bytes", bytes},
                                 {"quantized_params", plan.quantized_params}, {"quantized_bytes", plan.quantized_bytes},
                                 {"quantized_bits_per_param", bpp}, {"seconds", secs}};
        if (o->json) std::cout << result.dump(2) << "\n";
        else
          std::cout << "wrote " << o->out << " (" << format << ", int" << sc.bits << " "
                    << (sc.group == 0 ? std::string("per row") : "groups of " + std::to_string(sc.group)) << ", "
                    << (sc.symmetric ? "symmetric" : "asymmetric") << "): " << plan.quantized_linears << " quantized Linears at "
                    << bpp << " bits/param, " << plan.dense_linears << " dense, " << core::format_bytes(static_cast<double>(bytes))
                    << (plan.shards > 1 ? ", " + std::to_string(plan.shards) + " shards" : std::string()) << " in " << secs << " s\n";
        return 0;
      }
      if (shard_given)
        throw Error::invalid("--max-shard-size: --format gguf writes one file, never shards: leave it out");
      if (o->type.empty()) throw Error::invalid("--type: required for --format gguf");
      pipeline::GgufOptions go;
      go.type = pipeline::gguf_writable_type(o->type, "--type");
      go.overrides = pipeline::parse_gguf_overrides(
          o->tensor_types, [&](size_t i) { return "--tensor-type '" + o->tensor_types[i] + "'"; });
      auto& env = io::Env::posix();
      auto ckpt = io::Checkpoint::open(env, o->in);
      auto model = model::Model::load(ckpt);
      if (ckpt.gguf())  // a dense model has no experts to prune
        throw Error::unsupported(o->in + ": already a GGUF file; export converts a folder. " +
                                 (model.family().moe ? "`moe-tool prune " + o->in + " OUT.gguf` writes a GGUF with its blocks copied; for other types, "
                                                     : std::string("For other types, ")) +
                                 "`moe-tool convert " + o->in + " DENSE --dtype f32` and export DENSE");
      const uint64_t needs = pipeline::check_gguf(env, ckpt, model, go);
      io::check_free_space(o->out, needs, "OUT");
      io::OutputFile out(env, o->out, {o->in}, o->force);
      const pipeline::GgufResult written =
          core::with_path_shown(out.path().string(), o->out, [&] { return pipeline::write_gguf(env, ckpt, model, go, out.path()); });
      const uint64_t bytes = written.file_bytes;
      out.commit();
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const std::map<std::string, int>& by_type = written.types;
      nlohmann::json result = {{"output", o->out}, {"tensors", written.tensors}, {"bytes", bytes},
                               {"types", by_type}, {"seconds", secs}};
      if (o->json) {
        std::cout << result.dump(2) << "\n";
      } else {
        std::cout << "wrote " << o->out << ": " << written.tensors << " tensors (";
        bool first = true;
        for (const auto& [t, n] : by_type) std::cout << (first ? "" : ", ") << n << " " << t, first = false;
        std::cout << "), " << core::format_bytes(static_cast<double>(bytes)) << " in " << secs << " s\n";
      }
      return 0;
    };
  });
}

}  // namespace moe::app
