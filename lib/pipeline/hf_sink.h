// The default sink: writes a Model as a Hugging Face checkpoint that transformers, vLLM and
// llama.cpp's converter load unchanged (per-expert names, config keys per family, side files
// such as the tokenizer copied untouched), streaming tensor by tensor.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>

#include "io/checkpoint.h"
#include "io/checkpoint_writer.h"
#include "model/model.h"

namespace moe::pipeline {

struct HfSinkOptions {
  std::optional<core::DType> dtype;            // convert float tensors (not F8) to this
  bool materialize = false;                     // encoded weights written dense (model::OutputOptions)
  uint64_t max_shard_bytes = 5'000'000'000ull;  // HF's "5GB"
  bool quiet = false;
};

struct HfSinkResult {
  uint64_t tensor_bytes = 0;
  size_t tensors = 0;
  size_t shards = 0;
};

// Writes `model` into `out_dir` (an existing, empty folder). `source` provides side files and is
// used to release mapped pages as tensors are written.
HfSinkResult write_hf_checkpoint(io::Env& env, const model::Model& model, const io::Checkpoint& source,
                                 const io::fs::path& out_dir, const HfSinkOptions& opts);

}  // namespace moe::pipeline
