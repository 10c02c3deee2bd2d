// Small synthetic checkpoints in each family's exact Hugging Face layout, for tests.
//
//   auto ck = moe::test::make_synth("mixtral");            // config + tensors in memory
//   moe::test::write_synth(ck, dir);                       // config.json + model.safetensors
//   moe::test::write_synth(ck, dir, {.max_shard_bytes = 4096});  // sharded + index
//
// Dimensions are tiny (hidden 32, 4 heads / 2 kv heads of dim 8, vocab 64, 4 experts top-2,
// expert width 16, dense width 64, 2-3 layers). Weights are deterministic pseudo-random bf16:
// each tensor's values depend only on (seed, tensor name), so dropping or renaming one tensor does
// not change the others. The layout (which tensors exist, their shapes, which layers are dense) is
// derived here from the config independently of lib/model, so the two can check each other.
//
// This file must not depend on GoogleTest: the fuzz targets link it too.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"

namespace moe::test {

namespace fs = std::filesystem;

// The twelve families, by model_type: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2,
// deepseek_v3, phimoe, granitemoe, llama, mistral, qwen2, qwen3.
const std::vector<std::string>& synth_families();
bool synth_is_moe(const std::string& family);

struct SynthTensor {
  std::string name;
  core::DType dtype = core::DType::BF16;
  core::Shape shape;
  std::vector<uint8_t> data;  // numel * dtype size bytes, little endian
};

struct SynthSpec {
  uint64_t seed = 1;
  int layers = 0;  // 0: the family's default (2, or 3 where dense and MoE layers mix)
  // Applied (RFC 7386 merge patch; null removes a key) BEFORE the tensor list is derived: changes
  // the model (e.g. {"decoder_sparse_step": 2}).
  nlohmann::json config_patch = nullptr;
  // Applied AFTER: changes config.json only, so tensors and config disagree.
  nlohmann::json config_edit = nullptr;
  core::DType dtype = core::DType::BF16;        // dtype of float tensors
  std::map<std::string, core::DType> dtypes{};  // per-tensor override (values regenerated)
  std::set<std::string> drop{};                 // tensor names to leave out
  std::map<std::string, std::string> rename{};  // old name -> new name
  std::map<std::string, core::Shape> reshape{}; // name -> new shape (values regenerated)
  std::vector<SynthTensor> extra{};             // appended as given
};

struct SynthCheckpoint {
  std::string family;
  nlohmann::json config;
  std::vector<SynthTensor> tensors;  // write order
  const SynthTensor* find(const std::string& name) const;
  const SynthTensor& at(const std::string& name) const;  // throws std::out_of_range
  std::vector<std::string> names() const;
};

SynthCheckpoint make_synth(const std::string& family, const SynthSpec& spec = {});

// A tensor with deterministic values for (seed, name); float values are small (|x| < 0.5), F8
// codes avoid NaN, BOOL is 0/1, integers are arbitrary.
SynthTensor synth_tensor(const std::string& name, core::DType dtype, const core::Shape& shape, uint64_t seed);

enum class Writer {
  Project,     // moe::io::CheckpointWriter (shards cut as the tool cuts them)
  HandRolled,  // this file's own serializer: header keys sorted by name (as the Rust/Python
               // safetensors libraries write them), index written by hand
};

struct WriteOptions {
  uint64_t max_shard_bytes = 0;  // 0: one model.safetensors; else shards + index
  Writer writer = Writer::Project;
  bool tokenizer = false;        // also tokenizer.json, tokenizer_config.json, generation_config.json
};

// Writes config.json and the weights into `dir` (created if missing).
void write_synth(const SynthCheckpoint& ck, const fs::path& dir, const WriteOptions& opts = {});
// make_synth + write_synth; returns dir.
fs::path synth_to(const fs::path& dir, const std::string& family, const SynthSpec& spec = {},
                  const WriteOptions& opts = {});

// --- Hand-rolled safetensors bytes (for breaking rules on purpose) ---

// 8-byte little-endian length + header text + data. The header text is used verbatim; when `pad`
// it is padded with spaces to a multiple of 8 first.
std::string raw_safetensors(const std::string& header, const std::string& data, bool pad = true);
// A valid file for `tensors` laid out in the given order (header keys sorted by name).
std::string safetensors_bytes(const std::vector<SynthTensor>& tensors,
                              const std::map<std::string, std::string>& metadata = {{"format", "pt"}});
// The header JSON of safetensors_bytes (without length prefix or padding).
nlohmann::json safetensors_header_json(const std::vector<SynthTensor>& tensors,
                                       const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// --- Files and folders ---

void write_file(const fs::path& path, const std::string& bytes);
std::string read_file(const fs::path& path);

// A fresh empty folder under the system temp dir, removed with its contents on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& tag = "moe-test");
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir();
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& s) const { return path_ / s; }

 private:
  fs::path path_;
};

// Entries of `dir` (file names), sorted.
std::vector<std::string> list_dir(const fs::path& dir);
// Temporary entries (".<name>.moe-tool-tmp-...") left in a folder.
std::vector<std::string> temp_leftovers(const fs::path& dir);

}  // namespace moe::test
