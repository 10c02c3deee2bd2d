// Scratch arrays too large to be sure of RAM: a layer's calibration activations
// (calib/input_grams.h). Kept in RAM, or spilled to a memory-mapped temporary file whose pages
// the kernel writes back and drops when memory runs short.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <vector>

#include "core/tensor_arena.h"

namespace moe::io {

namespace fs = std::filesystem;

// MemAvailable of /proc/meminfo in bytes: what can be allocated without swapping (0 when unknown).
uint64_t available_memory();

class ScratchFloats {
 public:
  ScratchFloats() = default;
  // `n` floats, zero. `spill_dir` empty: in RAM. Otherwise in a temporary file in that folder,
  // its space reserved (posix_fallocate, so a full disk is an error here, not a crash on first
  // write), mapped shared and unlinked at once: nothing is left behind, whatever ends the process.
  // Throws Error::io naming the folder and the cause when the file cannot be made.
  ScratchFloats(size_t n, const fs::path& spill_dir);
  ~ScratchFloats();
  ScratchFloats(ScratchFloats&& o) noexcept;
  ScratchFloats& operator=(ScratchFloats&& o) noexcept;
  ScratchFloats(const ScratchFloats&) = delete;
  ScratchFloats& operator=(const ScratchFloats&) = delete;

  float* data() { return data_; }
  const float* data() const { return data_; }
  size_t size() const { return n_; }
  bool spilled() const { return mapped_; }
  // Spilled: drops the pages wholly inside floats [offset, offset + count) from this process's
  // memory (the file keeps them; they are read back when next touched). In RAM: nothing.
  void evict(size_t offset, size_t count) const;

 private:
  void reset();
  float* data_ = nullptr;
  size_t n_ = 0;
  bool mapped_ = false;
};

// A core::TensorArena in a temporary file of `dir`: buffers of `min_bytes` or more are carved from
// chunks (64 MiB, or one larger allocation) of one file, unlinked at once and mapped shared, its
// space reserved (posix_fallocate) as the chunks are made. Every `evict_every` bytes handed out, the pages of all
// live chunks are dropped from the process (the file keeps them; they are read back when
// touched), so what a pass encodes expert by expert does not pile up in resident memory. A chunk
// is unmapped (and its file space freed) when the last tensor in it goes; the file goes with the
// last chunk. Thread-safe. Throws Error::io naming `dir` when the file cannot be made or grown.
class SpillArena final : public core::TensorArena {
 public:
  SpillArena(const fs::path& dir, size_t min_bytes = size_t{64} << 10, size_t evict_every = size_t{64} << 20);
  ~SpillArena() override;
  SpillArena(const SpillArena&) = delete;
  SpillArena& operator=(const SpillArena&) = delete;

  size_t min_bytes() const override { return min_bytes_; }
  Block allocate(size_t bytes) override;
  bool release_range(const uint8_t* p, size_t n) override;
  // Drops every live chunk's pages from the process now.
  void evict_all();
  uint64_t bytes_allocated() const { return allocated_; }  // bytes asked for, over the arena's life

  struct File;
  struct Chunk;

 private:
  void evict_locked();
  fs::path dir_;
  size_t min_bytes_, evict_every_;
  std::shared_ptr<File> file_;
  std::mutex m_;
  std::vector<std::weak_ptr<Chunk>> chunks_;
  std::shared_ptr<Chunk> current_;
  size_t used_ = 0;              // bytes used in current_
  size_t since_evict_ = 0;
  uint64_t allocated_ = 0;
};

}  // namespace moe::io
