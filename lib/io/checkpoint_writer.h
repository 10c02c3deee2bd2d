// Streaming checkpoint writer. The caller declares every output tensor (name, dtype, shape) up
// front; the writer cuts shards at max_shard_bytes (HF semantics: a tensor never spans shards,
// a tensor larger than the limit gets a shard of its own), writes each shard header immediately,
// and then accepts tensor data in any order, writing it straight to its final place.
// Memory use is independent of the model size.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace moe::io {

struct TensorSpec {
  std::string name;
  core::DType dtype;
  core::Shape shape;
  uint64_t nbytes() const;
};

class CheckpointWriter {
 public:
  CheckpointWriter(Env& env, fs::path dir, std::vector<TensorSpec> plan, uint64_t max_shard_bytes);
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;
  ~CheckpointWriter();

  // Writes bytes [offset, offset+n) of tensor `name` (n may be the whole tensor or a chunk, cut at
  // element boundaries). Throws Error::invalid, naming the tensor and the element, when the bytes
  // hold a NaN or Inf of the planned dtype: the one finite check of every checkpoint the tool writes.
  void write(const std::string& name, uint64_t offset, const void* data, size_t n);
  // write(name, offset, src.data() + src_offset, n), the bytes copied from src's file inside the
  // kernel (WritableFile::copy_from: no user-space copy; the finite check still reads them).
  void copy(const std::string& name, uint64_t offset, const MappedFile& src, uint64_t src_offset, size_t n);
  // Writes a whole tensor; dtype and shape must match the plan.
  void write(const std::string& name, const core::Tensor& t);
  // Checks every tensor was written completely, closes shards, writes the index when sharded.
  void finish();

  size_t shard_count() const { return shards_.size(); }
  const std::vector<std::string>& shard_names() const { return shard_names_; }

 private:
  struct Slot {
    size_t shard;
    uint64_t abs_offset;  // absolute offset in the shard file
    uint64_t nbytes;
    uint64_t written = 0;
    size_t plan = 0;  // index in plan_
  };
  // The slot of `name` after the checks every write makes (planned, inside its size, finite).
  Slot& checked_slot(const std::string& name, uint64_t offset, const void* data, size_t n);

  Env& env_;
  fs::path dir_;
  std::vector<TensorSpec> plan_;
  std::map<std::string, Slot> slots_;
  std::vector<std::unique_ptr<WritableFile>> shards_;
  std::vector<std::string> shard_names_;
  bool finished_ = false;
};

// Parses "5GB", "500MB", "2GiB", "1TiB", "1000000" (bytes) as HF does (GB = 10^9, GiB = 2^30).
uint64_t parse_size(const std::string& text);

}  // namespace moe::io
