#include "core/tensor_arena.h"

#include <atomic>

namespace moe::core {

namespace {
std::atomic<TensorArena*> g_arena{nullptr};
}

TensorArena* installed_arena() { return g_arena.load(std::memory_order_acquire); }

ScopedTensorArena::ScopedTensorArena(TensorArena* arena) : previous_(g_arena.exchange(arena)) {}

ScopedTensorArena::~ScopedTensorArena() { g_arena.store(previous_); }

bool release_arena_range(const uint8_t* p, size_t n) {
  TensorArena* a = installed_arena();
  return a && a->release_range(p, n);
}

}  // namespace moe::core
