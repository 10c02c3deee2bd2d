// The default sink (pipeline/sink.h, format "hf"): a model written as a Hugging Face checkpoint
// that transformers, vLLM and llama.cpp's converter load unchanged when nothing is encoded
// (per-expert names, config keys per family, side files such as the tokenizer copied untouched),
// encoded weights in moe-tool's native format (docs/FORMAT.md). Safetensors shards cut at
// max_shard_bytes (io::CheckpointWriter), written layer by layer as the tensors are computed;
// outputs whose shapes are decided while the passes run go through spill files
// (pipeline/spill_writer.h). Memory: one tensor (views are converted and written in chunks).
#pragma once

#include <nlohmann/json.hpp>
#include <optional>

#include "io/checkpoint.h"
#include "io/checkpoint_writer.h"
#include "io/output_dir.h"
#include "model/model.h"
#include "pipeline/sink.h"
#include "pipeline/spill_writer.h"

namespace moe::pipeline {

class HfSink final : public Sink {
 public:
  // Writes into a temporary sibling of `final_path` (io::OutputDir: never an input, `force` only
  // over an earlier output, spelled `force_name` in messages), renamed into place by commit().
  HfSink(io::Env& env, const io::fs::path& final_path, const std::vector<io::fs::path>& inputs, bool force,
         const std::string& force_name, uint64_t max_shard_bytes);
  // Writes into `dir`, an existing empty folder another owner removes or renames (the staging
  // folder of an export sink); commit() does nothing.
  HfSink(io::Env& env, io::fs::path dir, uint64_t max_shard_bytes);

  std::string format() const override { return "hf"; }
  const io::fs::path& native_dir() const override { return dir_; }
  // `source`: the input checkpoint (side files; the pages of its tensors are handed back to the
  // OS as they are written, so memory stays bounded).
  void begin(const io::Checkpoint& source, const std::optional<std::vector<io::TensorSpec>>& plan) override;
  void write(const std::vector<model::OutTensor>& group) override;
  SpillWriter* spill() override { return spill_ ? &*spill_ : nullptr; }
  SinkResult finish(const nlohmann::json& config) override;
  io::fs::path write_report(const nlohmann::json& report) override;
  void commit() override;

 private:
  io::Env& env_;
  std::optional<io::OutputDir> out_;
  io::fs::path dir_;
  uint64_t max_shard_bytes_;
  const io::Checkpoint* source_ = nullptr;
  std::optional<io::CheckpointWriter> writer_;
  std::optional<SpillWriter> spill_;
  uint64_t planned_bytes_ = 0;
  size_t planned_tensors_ = 0;
};

struct HfSinkOptions {
  std::optional<core::DType> dtype;            // convert float tensors (not F8) to this
  bool materialize = false;                     // encoded weights written dense (model::OutputOptions)
  uint64_t max_shard_bytes = 5'000'000'000ull;  // HF's "5GB"
  bool quiet = false;
};

// The source's side files (tokenizer, generation config; not config.json or a report) copied into
// dir, and the ones a GGUF input holds as metadata (io::Checkpoint::generated_side_files) written.
void write_side_files(io::Env& env, const io::Checkpoint& source, const io::fs::path& dir);

// `convert`: writes `model` (loaded from `source`) whole through `sink` (begun here) with a
// progress bar; config.json is the model's rewritten for its current state.
SinkResult write_hf_checkpoint(Sink& sink, const model::Model& model, const io::Checkpoint& source,
                               const HfSinkOptions& opts);
// The same into `out_dir`, an existing empty folder (the caller's io::OutputDir temporary).
SinkResult write_hf_checkpoint(io::Env& env, const model::Model& model, const io::Checkpoint& source,
                               const io::fs::path& out_dir, const HfSinkOptions& opts);

}  // namespace moe::pipeline
