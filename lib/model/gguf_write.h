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
// file is created, as are novices and different expert counts per layer. A NaN or Inf among the
// copied values (a block's scale, a plain tensor's element) is refused with Error::invalid naming
// the input file and tensor (the block types with f16 scales are checked on their scales, read
// from the file a few rows at a time, the others decoded a row at a time; the partial file is the
// caller's to remove). The bytes from the input file are copied inside the kernel
// (io::WritableFile::copy_from). Returns the file size.
uint64_t write_gguf_like(io::Env& env, const Model& m, const io::GgufModel& src, const std::filesystem::path& path);

// The sizes write_gguf_like would write for `m` (only its expert counts are read: a planned model
// of views, pipeline/runner.cpp planned_model, is enough), exact, without reading any tensor data:
// the tensors' data bytes and the file's bytes (header, alignment padding and data). Its
// Error::unsupported refusals as write_gguf_like's on the structure (novices, expert counts).
struct GgufLikeSize {
  uint64_t tensor_bytes = 0;
  uint64_t file_bytes = 0;
};
GgufLikeSize gguf_like_size(const Model& m, const io::GgufModel& src);

}  // namespace moe::model
