// Writing a pruned GGUF input back as GGUF without re-quantizing (docs/gguf.md, "GGUF as an input").
#pragma once

#include <cstdint>
#include <filesystem>

#include "io/env.h"
#include "io/gguf_model.h"

namespace moe::model {

class Model;

// Writes `m`, a model loaded from the GGUF file `src` and pruned (experts dropped, router rows
// kept), as a GGUF file at `path` (the caller owns atomicity: io::OutputFile): the source's
// metadata with ARCH.expert_count set to the kept count (and expert_used_count clamped to it), the
// source's tensors in its order, every tensor's bytes copied as stored (q/k rows permuted back for
// arch llama), stacked expert tensors holding the kept experts' blocks in the model's order and
// routers their kept rows. Nothing is re-quantized: a weight a pass changed (not the source's
// bytes in the source's type) is refused with Error::unsupported naming the tensor, before the
// file is created, as are novices and different expert counts per layer. Returns the file size.
uint64_t write_gguf_like(io::Env& env, const Model& m, const io::GgufModel& src, const std::filesystem::path& path);

}  // namespace moe::model
