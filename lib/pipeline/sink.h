// Where a command's model goes: one output Sink per format (docs/architecture.md, "Output sinks").
//
//   hf                  the Hugging Face layout, safetensors shards + config.json + side files,
//                       encoded weights in moe-tool's native format (docs/FORMAT.md): HfSink
//   gguf                one GGUF v3 file (pipeline/gguf_export.h)
//   compressed-tensors  a folder in vLLM's pack-quantized int4/int8 layout (pipeline/packed_export.h)
//   gptq                a folder in the GPTQ (v1) layout (pipeline/packed_export.h)
//   awq                 a folder in the AWQ GEMM int4 layout (pipeline/packed_export.h)
//
// A sink's life: begin(source, plan) once, write(group) per layer and once for the globals,
// finish(config) once (the accounting of the report and the summary comes from it), write_report(), then
// commit() renames the output into place. Destroying a sink without commit() aborts: everything
// it wrote is removed (its temporaries are registered with io/temp_files.h, so SIGINT/SIGTERM
// remove them too). The tensors are checked for NaN/Inf once, by io::CheckpointWriter.
//
// The export formats need the whole tensor list before their first byte (GGUF's header holds every
// tensor's offset; the packed layouts write one scheme for the model) and re-lay the native codes
// without re-rounding them, so their sinks stage the native output in a temporary folder beside
// the output (in the output's parent, ".NAME.native.moe-tool-tmp-PID-NONCE") and convert it in
// finish(), as `moe-tool export` converts a native checkpoint. The staged folder is what an
// evaluation of the run reads (native_dir()); it is removed when the sink dies.
//
// Family-specific tensor names of a format live in the family table (family/family.h) and the
// format's tables (io/gguf_names.h), not here.
#pragma once

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "io/checkpoint_writer.h"
#include "model/model.h"
#include "pipeline/gguf_export.h"

namespace moe::pipeline {

class SpillWriter;
struct Recipe;
struct OutputSpec;

// What a sink wrote, for the report's "output" section and the summary.
struct SinkResult {
  std::string format = "hf";
  uint64_t tensor_bytes = 0;  // the tensors' data in the final output
  size_t tensors = 0;         // tensors in the final output
  size_t shards = 0;          // safetensors shards; 1 for a GGUF file
  // Set by the export formats: "staged" (the native folder converted) and what the format reports
  // (GGUF: tensors per ggml type; packed: the scheme and the quantized Linears).
  nlohmann::json details = nlohmann::json::object();
  nlohmann::json to_json() const;  // {"format", "tensors", "tensor_bytes", "shards", ...details}
};

class Sink {
 public:
  virtual ~Sink() = default;
  // "hf", "gguf", "compressed-tensors", "gptq", "awq".
  virtual std::string format() const = 0;
  // The native checkpoint folder being written (a temporary until commit; staged for the export
  // formats): where an evaluation of the written model reads it.
  virtual const io::fs::path& native_dir() const = 0;
  // Starts the tensors. `plan`: every tensor in write order when the shapes are known before the
  // passes run (written straight into their shards); nullopt when shapes are decided while they
  // run (written through spill files, pipeline/spill_writer.h).
  // `source`: the input checkpoint (side files; its pages are handed back as tensors are written).
  virtual void begin(const io::Checkpoint& source, const std::optional<std::vector<io::TensorSpec>>& plan) = 0;
  // Computes (OutTensor::make), converts to the planned dtype and writes one group of tensors (a
  // layer's, then the globals'), then hands the source pages they read back to the OS.
  // Error::invalid naming the tensor for a NaN/Inf.
  virtual void write(const std::vector<model::OutTensor>& group) = 0;
  // The spill writer when begin() had no plan (null otherwise): the model dictionary recodes its
  // groups before finish() (pipeline/model_dictionary.h).
  virtual SpillWriter* spill() = 0;
  // Completes the output: the tensors, the source's side files (not its config.json or report),
  // `config` as config.json, then the conversion of the export formats.
  virtual SinkResult finish(const nlohmann::json& config) = 0;
  // Writes moe_tool_report.json where the format has room for it (a folder); returns the path it
  // will have after commit(), or an empty path (a GGUF file holds no report: the run's summary
  // carries it).
  virtual io::fs::path write_report(const nlohmann::json& report) = 0;
  // The run's keep-map, before finish(): per decoder layer (null for a layer the passes left
  // alone), the input expert id of each written expert (runner.cpp keep_map). The GGUF sink of a
  // GGUF input copies those experts' blocks (model/gguf_write.h), the compressed-tensors sink of an
  // FP8 input their FP8 tensors (copies_fp8_input); the other sinks ignore it.
  virtual void set_keep_map(const nlohmann::json& /*keep_map*/) {}
  // Renames the output into place (io::OutputDir / io::OutputFile commit) and removes staging.
  virtual void commit() = 0;
};

// The output of a recipe (its "output" section): checks the output path (not an input, force
// for an earlier output) and creates the temporary output. `inputs`: every file the run reads.
std::unique_ptr<Sink> make_sink(io::Env& env, const Recipe& r, const std::vector<io::fs::path>& inputs);

// Whether the recipe's output format is a single file (gguf) or a folder.
bool output_is_file(const Recipe& r);

// The GGUF writer's options from an "output" section (format gguf): output.type, the
// output.tensor_type rules, general.name from the file's name. `key` spells a JSON path in
// messages (a recipe's flag names). Error::invalid / Error::unsupported naming the key.
GgufOptions gguf_output_options(const OutputSpec& out, const std::function<std::string(const std::string&)>& key);

// Whether the recipe has passes and every one is a prune (the kept experts' tensors are the
// input's: a prune may write its input's format, runner.cpp follow_input_format).
bool prunes_only(const Recipe& r);

// Whether the run writes compressed-tensors FP8 by copying its input's FP8 tensors: a
// compressed-tensors float-quantized input (is_compressed_tensors_fp8), prune passes only, format
// compressed-tensors (pipeline/packed_export.h write_fp8_copied; check_output_format checks the
// plan with check_fp8_copy).
bool copies_fp8_input(const Recipe& r, const io::Checkpoint& ckpt);

// Whether the run writes a native output for the sink (the hf output itself excepted): the export
// formats stage one and convert it, but a GGUF input written as GGUF copies its blocks from the
// input and stages none unless the recipe evaluates the output (eval reads the staged folder).
bool stages_native_output(const Recipe& r);

// The exact size of an output whose bytes do not come from the planned tensors: a GGUF input
// written as GGUF (the kept experts' blocks copied, model::gguf_like_size of `planned`, the model
// as the passes will leave it); nullopt for every other output (the planned tensors' bytes).
struct OutputSize {
  uint64_t tensor_bytes = 0;  // the tensors' data, as SinkResult::tensor_bytes counts it
  uint64_t file_bytes = 0;    // on disk: header, padding and data
};
std::optional<OutputSize> copied_output_size(const Recipe& r, const io::Checkpoint& ckpt, const model::Model& planned);

// The refusals of the recipe's output format against the model as the passes will leave it
// (`planned`: shapes only, views of `ckpt`'s tensors; the encodings the passes will write come
// from the passes' parameters), before calibration or any pass runs: an encoding the format
// cannot hold, two integer schemes, shapes the layout cannot take, ragged counts, novices, a family
// or tokenizer the format does not cover. Error::unsupported naming the JSON path (or flag) and the
// way out. Nothing for "hf".
void check_output_format(io::Env& env, const Recipe& r, const io::Checkpoint& ckpt, const model::Model& planned);

// GPTQ's config names one set of quantized modules for every decoder layer: a model with dense
// decoder layers among its MoE layers (deepseek_v3 and glm4_moe's first_k_dense_replace, llama4's
// interleave_moe_layer_step, ...) cannot be written as gptq once a dense MLP, an expert, a shared
// expert or a router is quantized (`quantized`: whether an output of m.outputs() with its
// manifest will be intN codes); attention alone can. Error::unsupported "<where>: <the first such
// tensor>: ...: write <format_key> compressed-tensors"; nothing otherwise.
void check_gptq_layer_kinds(const model::Model& m,
                            const std::function<bool(const model::OutTensor&, const nlohmann::json&)>& quantized,
                            const std::string& where, const std::string& format_key);

}  // namespace moe::pipeline
