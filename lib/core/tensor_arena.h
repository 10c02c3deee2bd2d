// Where large tensors take their buffers while a pass works on a layer: a TensorArena installed
// with ScopedTensorArena gives Tensor::zeros its buffers (those of min_bytes() or more), so the
// encodings a pass makes expert by expert (codes, scales, factors) can live outside the process's
// resident memory (io::SpillArena: a memory-mapped temporary file whose pages are handed back)
// until the layer is written. The bytes are the same wherever they live.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace moe::core {

class TensorArena {
 public:
  virtual ~TensorArena() = default;
  struct Block {
    uint8_t* data = nullptr;              // `bytes` zero bytes, 64-byte aligned
    std::shared_ptr<const void> owner;    // keeps them (and the arena's storage) alive
  };
  // Tensor::zeros of fewer bytes allocates on the heap.
  virtual size_t min_bytes() const = 0;
  // Throws core::Error (kind IO) when the storage cannot grow (a full disk), naming where.
  virtual Block allocate(size_t bytes) = 0;
  // Drops the pages wholly inside [p, p + n) from the process's memory when they are the arena's
  // (they stay readable: touched again, they are read back). False when the range is not the arena's.
  virtual bool release_range(const uint8_t* p, size_t n) = 0;
};

// The arena installed now (null: none; Tensor::zeros allocates on the heap).
TensorArena* installed_arena();

// Installs `arena` until destroyed (then the previous one again). Not nested across threads: the
// one arena is seen by every thread (the threads of a pass allocate from it too).
class ScopedTensorArena {
 public:
  explicit ScopedTensorArena(TensorArena* arena);
  ~ScopedTensorArena();
  ScopedTensorArena(const ScopedTensorArena&) = delete;
  ScopedTensorArena& operator=(const ScopedTensorArena&) = delete;

 private:
  TensorArena* previous_;
};

// installed_arena()->release_range(p, n), or false without an arena.
bool release_arena_range(const uint8_t* p, size_t n);

}  // namespace moe::core
