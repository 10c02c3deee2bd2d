// A Hugging Face checkpoint folder: config.json, one or more safetensors shards (with
// model.safetensors.index.json when sharded), tokenizer and other side files.
// Opening validates every shard header and the index against the shards.
// A GGUF file (io/gguf_model.h: a regular file ending in .gguf or starting with the GGUF magic) is
// opened as a checkpoint too: config.json and the tensor names are mapped back from its metadata
// and tensor names; dir() is then the file, shards() and side_files() are empty.
#pragma once

#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace moe::io {
class GgufModel;
}

namespace moe::io {

class Checkpoint {
 public:
  // Reads config.json and the tensor headers (no tensor data is touched). A GGUF file: its header.
  static Checkpoint open(Env& env, const fs::path& dir);

  // The GGUF file this checkpoint was read from, or null for a folder.
  const GgufModel* gguf() const { return gguf_.get(); }
  const std::shared_ptr<const GgufModel>& gguf_ptr() const { return gguf_; }
  // What errors about config.json name: dir/config.json, or the GGUF file.
  std::string config_path() const;

  const fs::path& dir() const { return dir_; }
  const nlohmann::json& config() const { return config_; }
  const std::string& config_text() const { return config_text_; }

  bool has(std::string_view name) const { return index_.count(std::string(name)) != 0; }
  const TensorInfo& info(std::string_view name) const;
  core::Tensor tensor(std::string_view name) const;
  void release(std::string_view name) const;
  // Releases the mapped pages of [p, p+n) if they belong to one of the shards.
  void release_range(const uint8_t* p, uint64_t n) const;
  // Maps the pages of [p, p+n) ahead of a read of them all (MappedFile::populate) when one file's
  // mapping holds the range; nothing otherwise.
  void populate_range(const uint8_t* p, uint64_t n) const;
  // The mapped file (a shard, or the GGUF file) whose mapping holds all of [p, p+n); null when
  // none does (a tensor made in memory).
  const MappedFile* mapping_of(const uint8_t* p, uint64_t n) const;
  // All tensor names in storage order (shard by shard, by offset).
  const std::vector<std::string>& names() const { return names_; }
  const std::vector<std::shared_ptr<SafetensorsFile>>& shards() const { return shards_; }
  // Path of the shard holding `name`.
  const fs::path& shard_path(std::string_view name) const;
  // Files of the folder that are not weights (config, tokenizer, generation config, ...).
  const std::vector<fs::path>& side_files() const { return side_files_; }
  // Side files a GGUF input holds as metadata instead: {"tokenizer.json", text} and
  // {"tokenizer_config.json", text} rebuilt from tokenizer.ggml.* (io/gguf_model.h); empty for a
  // folder. An output folder written from a GGUF input writes them as its side files.
  std::vector<std::pair<std::string, std::string>> generated_side_files() const;
  uint64_t total_tensor_bytes() const;
  // Hex fingerprint of what identifies the model (not the data, not how it is stored): the parsed
  // config without bookkeeping keys, and every tensor's name, dtype and shape, order-independent.
  std::string fingerprint() const;

  // Sampled tensor contents, which fingerprint() leaves out: they tell apart two checkpoints of
  // one structure (two fine-tunes of one base). Per tensor, in name order, a 32-bit FNV-1a hash of
  // its stored bytes when it holds at most kDigestWholeBytes (norms, biases, small routers), else
  // of kDigestBlocks blocks of kDigestBlockBytes at evenly spaced offsets (the first at the
  // tensor's start, the last ending at its end). At most 16 KiB is read per tensor, whatever the
  // checkpoint's size; a change confined to bytes between the blocks is not seen.
  static constexpr uint64_t kDigestWholeBytes = 16384;
  static constexpr uint64_t kDigestBlocks = 4;
  static constexpr uint64_t kDigestBlockBytes = 1024;
  struct TensorDigest {
    std::string name;
    uint32_t digest = 0;
  };
  std::vector<TensorDigest> content_digests() const;

 private:
  fs::path dir_;
  nlohmann::json config_;
  std::string config_text_;
  std::vector<std::shared_ptr<SafetensorsFile>> shards_;
  std::map<std::string, std::pair<size_t, const TensorInfo*>, std::less<>> index_;
  std::vector<std::string> names_;
  std::vector<fs::path> side_files_;
  std::shared_ptr<const GgufModel> gguf_;
  static constexpr size_t kGgufShard = static_cast<size_t>(-1);  // index_ entries of a GGUF file
  // Every tensor's header and first byte, sorted by name.
  std::vector<std::pair<const TensorInfo*, const uint8_t*>> sorted_tensors() const;
};

// Parses JSON text; errors name `what` (usually the file) and the parse problem.
nlohmann::json parse_json_file_text(const std::string& text, const std::string& what);
// A JSON library exception's text without the library's internal id: "parse error at line 1,
// column 5: syntax error while parsing value - invalid literal; last read: 'x'".
std::string json_error_text(const std::exception& e);

}  // namespace moe::io
