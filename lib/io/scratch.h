// Scratch arrays too large to be sure of RAM: a layer's calibration activations
// (calib/input_grams.h). Kept in RAM, or spilled to a memory-mapped temporary file whose pages
// the kernel writes back and drops when memory runs short.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>

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

}  // namespace moe::io
