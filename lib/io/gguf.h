// GGUF v3 files (the format llama.cpp loads): a reader and a streaming writer behind one
// description of the layout. All integers little-endian:
//   header   u32 magic "GGUF" (0x46554747), u32 version (3), u64 n_tensors, u64 n_kv
//   kv       n_kv times: string key, u32 value type, value
//   tensors  n_tensors times: string name, u32 n_dims (1..4), u64 ne[n_dims] (fastest-varying
//            first: a weight [out, in] has ne = [in, out]), u32 ggml type (quant/gguf_blocks.h),
//            u64 offset of its data relative to the data section
//   padding  to general.alignment (a u32 key, default 32, a power of two)
//   data     each tensor at its offset (a multiple of the alignment), rows of ne[0] values in
//            the type's blocks; the section ends padded to the alignment
// A string is u64 length + that many bytes (no terminator). A value is one of GgufValueType; an
// array is u32 element type, u64 count, then the elements.
//
// Errors: the reader throws core::Error::corruption (exit 2) naming the file and the field
// ("m.gguf: tensor 3 (blk.0.attn_q.weight): offset 4096 + 512 bytes past the data section end
// 4000") for every length, count, offset, type or alignment that does not fit the file.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "io/env.h"
#include "quant/gguf_blocks.h"

namespace moe::io {

enum class GgufValueType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7, STRING = 8, ARRAY = 9,
  U64 = 10, I64 = 11, F64 = 12,
};
// "u32", "string", ... ; "?" for ids outside the enum.
const char* gguf_value_type_name(GgufValueType t);

inline constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" read as a little-endian u32
inline constexpr uint32_t kGgufVersion = 3;
inline constexpr uint32_t kGgufDefaultAlignment = 32;
inline constexpr int kGgufMaxDims = 4;

// One metadata value. Integers and bools are held in `integer` (signed types sign-extended),
// floats in `real`, strings in `str`, arrays in `items` (all of `elem`).
struct GgufValue {
  GgufValueType type = GgufValueType::U32;
  uint64_t integer = 0;
  double real = 0.0;
  std::string str;
  GgufValueType elem = GgufValueType::U32;
  std::vector<GgufValue> items;

  static GgufValue u32(uint32_t v);
  static GgufValue i32(int32_t v);
  static GgufValue u64(uint64_t v);
  static GgufValue f32(float v);
  static GgufValue boolean(bool v);
  static GgufValue string(std::string v);
  static GgufValue strings(const std::vector<std::string>& v);
  static GgufValue i32s(const std::vector<int32_t>& v);
  static GgufValue f32s(const std::vector<float>& v);

  bool is_integer() const;
  // The value of an integer type; Error::corruption "<key>: expected an integer, found <type>".
  int64_t as_int(const std::string& key) const;
  double as_double(const std::string& key) const;  // integer or float types
  const std::string& as_string(const std::string& key) const;
};

using GgufMetadata = std::vector<std::pair<std::string, GgufValue>>;

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // fastest-varying first, 1..4 dims
  quant::GgmlType type = quant::GgmlType::F32;
  uint64_t offset = 0;      // relative to the data section

  int64_t numel() const;
  uint64_t nbytes() const;  // rows (numel / ne[0]) times ggml_row_bytes(type, ne[0])
};

// A parsed GGUF file, mapped read-only.
class GgufFile {
 public:
  // Parses and checks the whole header: magic, version 3, every count against the bytes left,
  // strings and arrays inside the file, value and ggml types known, keys and tensor names unique,
  // 1..4 dims, ne[0] a multiple of the type's block size, offsets aligned and every tensor's data
  // inside the file without overlapping another. Error::corruption / not_found, naming the file.
  static GgufFile open(Env& env, const fs::path& path);

  const fs::path& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // absolute offset of the data section
  const GgufMetadata& metadata() const { return kv_; }
  const GgufValue* find(const std::string& key) const;
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(const std::string& name) const;
  // The bytes of a tensor (nbytes() of them).
  const uint8_t* tensor_data(const GgufTensorInfo& t) const;
  // All numel() values as f32, in storage order (row r of ne[0] values at r * ne[0]).
  // Error::unsupported for types without a decoder, naming the tensor and the type.
  std::vector<float> decode(const GgufTensorInfo& t) const;
  // The mapping of the whole file (GgufWriter::append_copy copies from it).
  const MappedFile& mapping() const { return *map_; }
  // Hands the mapped pages of [p, p + n) back to the OS when they lie inside this file (the data
  // stays readable); returns whether they did.
  bool release_range(const uint8_t* p, uint64_t n) const;
  // The n bytes at p: when they lie inside this file, read into buf (n bytes) through the file
  // (MappedFile::read_at: no page mapped) and buf returned; else p.
  const uint8_t* read_range(const uint8_t* p, uint64_t n, uint8_t* buf) const;

 private:
  fs::path path_;
  std::shared_ptr<const MappedFile> map_;
  uint32_t version_ = 0, alignment_ = kGgufDefaultAlignment;
  uint64_t data_offset_ = 0;
  GgufMetadata kv_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

// Whether every f16 scale in n bytes of whole blocks of type t is finite, read without decoding,
// for the types whose values are those scales times bounded integers (q4_0, q4_1, q5_0, q5_1,
// q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, tq1_0, tq2_0): finite scales there give finite values, and a
// non-finite scale a NaN or Inf value; mxfp4: no E8M0 scale byte is 255 (its NaN). nullopt for the
// other types (decode them to know).
std::optional<bool> gguf_scales_finite(quant::GgmlType t, const uint8_t* p, uint64_t n);

// Writes a GGUF file at `path` (the caller owns atomicity: io::OutputFile gives a temporary
// sibling and renames it on success). The header is written by the constructor, with the tensors'
// offsets laid out in the given order at general.alignment (taken from `kv` when present, else 32
// and added); then each tensor's bytes are appended in order, in as many pieces as the caller
// likes (memory bounded by one piece), and finish() pads and closes the file.
// Error::internal for misuse (duplicate keys or names, a tensor written short or long, a row not
// a multiple of its block), Error::io from the file system.
class GgufWriter {
 public:
  GgufWriter(Env& env, const fs::path& path, GgufMetadata kv, std::vector<GgufTensorInfo> tensors);
  // Appends n bytes of the current tensor (moving to the next one when it is complete).
  void append(const void* data, size_t n);
  // append(data, n) where [data, data + n) lies inside `src`'s mapping: the bytes are copied from
  // its file inside the kernel (WritableFile::copy_from) without mapping them; elsewhere append.
  void append_copy(const GgufFile& src, const uint8_t* data, size_t n);
  // Index of the tensor the next append() writes to (tensors().size() when all are written).
  size_t current() const { return current_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  // Checks every tensor was written whole, pads the data section, closes; returns the file size.
  uint64_t finish();

 private:
  // Moves the output n bytes of the current tensor(s) on; write(file offset, bytes done, take)
  // writes each run.
  template <typename Write>
  void advance(size_t n, Write&& write);

  std::unique_ptr<WritableFile> file_;
  fs::path path_;
  std::vector<GgufTensorInfo> tensors_;
  uint32_t alignment_ = kGgufDefaultAlignment;
  uint64_t data_offset_ = 0, data_size_ = 0;
  size_t current_ = 0;
  uint64_t written_ = 0;  // bytes of the current tensor so far
};

// The size in bytes of the file GgufWriter writes for (kv, tensors) (offsets ignored), without
// writing it: header, padding, every tensor's data at its aligned offset, the padded end.
// Error::internal for what the writer refuses.
uint64_t gguf_file_size(GgufMetadata kv, std::vector<GgufTensorInfo> tensors);

}  // namespace moe::io
