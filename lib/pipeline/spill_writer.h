// A checkpoint writer for outputs whose shapes are known only once computed (factorized ranks
// chosen by energy or budget, variable-length codes): each group of tensors (a layer) is written
// as computed into a temporary safetensors file under `dir`/.spill; finish() lays out the final
// shards (max_shard_bytes, HF naming and index, as io::CheckpointWriter) in group order, copies
// the data over in chunks (handing back the pages read) and removes the temporary files. Costs
// one extra write of the output; memory stays one group.
#pragma once

#include <functional>
#include <vector>

#include "io/checkpoint_writer.h"
#include "model/model.h"

namespace moe::pipeline {

class SpillWriter {
 public:
  SpillWriter(io::Env& env, io::fs::path dir, uint64_t max_shard_bytes);
  SpillWriter(const SpillWriter&) = delete;
  SpillWriter& operator=(const SpillWriter&) = delete;
  ~SpillWriter();

  // Computes and writes `outs` (OutTensor::make; NaN/Inf refused by io::CheckpointWriter);
  // `written` is called with each tensor after it is written.
  void write_group(const std::vector<model::OutTensor>& outs,
                   const std::function<void(const core::Tensor&)>& written = nullptr);
  // The groups' temporary files, in order (readable with io::SafetensorsFile until finish()).
  const std::vector<io::fs::path>& group_files() const { return files_; }
  // Replaces group i by `outs` (made and written as write_group does; they may read the old
  // file, which is removed once the new one is complete).
  void rewrite_group(size_t i, const std::vector<model::OutTensor>& outs);
  // Assembles the shards; returns the tensor bytes written.
  uint64_t finish();
  size_t shard_count() const { return shards_; }
  io::Env& env() const { return env_; }
  size_t tensor_count() const { return tensors_; }

 private:
  io::Env& env_;
  io::fs::path dir_, spill_;
  uint64_t max_shard_bytes_;
  std::vector<io::fs::path> files_;
  size_t shards_ = 0, tensors_ = 0;
  bool finished_ = false;
};

}  // namespace moe::pipeline
