// safetensors: an 8-byte little-endian header length N, N bytes of JSON header (an object
// mapping tensor names to {dtype, shape, data_offsets} plus an optional "__metadata__" object of
// string -> string), padded with spaces; then the data section. Offsets are relative to the data
// section; sorted by begin they tile [0, data length) exactly (no holes, no overlaps), and each
// tensor's byte length equals numel * dtype size. The header is at most 100 MB.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/tensor.h"
#include "io/env.h"

namespace moe::io {

constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;

struct TensorInfo {
  std::string name;
  core::DType dtype = core::DType::F32;
  core::Shape shape;
  uint64_t begin = 0;  // relative to the data section
  uint64_t end = 0;
  uint64_t nbytes() const { return end - begin; }
};

struct SafetensorsHeader {
  std::vector<TensorInfo> tensors;  // in data order (sorted by begin)
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;  // absolute offset of the data section (8 + header length)
  uint64_t data_size = 0;
};

// Parses and validates the header of a safetensors file whose first bytes are `data` and whose
// total size is `file_size` (only the first min(size, 8 + header) bytes are read, so a prefix
// buffer works). Throws core::Error (Corruption) naming the tensor and the broken rule.
SafetensorsHeader parse_safetensors_header(const uint8_t* data, uint64_t size, uint64_t file_size);

// A mapped, validated safetensors file; tensors are zero-copy views of the mapping.
class SafetensorsFile {
 public:
  static std::shared_ptr<SafetensorsFile> open(Env& env, const fs::path& path);

  const fs::path& path() const { return map_->path(); }
  const SafetensorsHeader& header() const { return header_; }
  const TensorInfo* find(std::string_view name) const;
  core::Tensor tensor(const TensorInfo& info) const;
  // Drops the pages of a tensor from memory (see MappedFile::release).
  void release(const TensorInfo& info) const;
  // Releases [p, p+n) if it lies inside this file's mapping; returns whether it did.
  bool release_range(const uint8_t* p, uint64_t n) const;
  uint64_t file_size() const { return map_->size(); }
  // The mapping of the whole file (CheckpointWriter::copy copies from it).
  const MappedFile& mapping() const { return *map_; }

 private:
  std::shared_ptr<const MappedFile> map_;
  SafetensorsHeader header_;
  std::map<std::string, size_t, std::less<>> by_name_;
};

// Serialises a header for `tensors` (already laid out: begin/end set) and `metadata`, padded with
// spaces to a multiple of 8. Returns the 8-byte length prefix + JSON.
std::string serialize_safetensors_header(const std::vector<TensorInfo>& tensors,
                                         const std::map<std::string, std::string>& metadata);

}  // namespace moe::io
