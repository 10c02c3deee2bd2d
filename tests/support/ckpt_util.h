// Reading a checkpoint folder back through the project's reader, for comparisons in tests.
#pragma once

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/encoding.h"
#include "core/tensor.h"
#include "runtime/weights.h"
#include "support/synth.h"

namespace moe::test {

// Every element of an encoded [rows, cols] matrix, decoded to f32 in row-major order.
inline std::vector<float> dequant(const core::Encoding& e) {
  std::vector<float> v(static_cast<size_t>(e.rows() * e.cols()));
  e.dequantize_rows(0, e.rows(), v.data());
  return v;
}

struct TensorBytes {
  core::DType dtype;
  core::Shape shape;
  std::string bytes;
  bool operator==(const TensorBytes& o) const = default;
};
using TensorMap = std::map<std::string, TensorBytes>;

// Every tensor of the checkpoint in `dir` (model.safetensors or the shards its index names),
// through moe::io::SafetensorsFile; config.json is not read.
TensorMap read_tensors(const std::filesystem::path& dir);
// The tensors of a synthetic checkpoint.
TensorMap synth_tensors(const SynthCheckpoint& ck);
// Human-readable first difference between two maps ("" if equal).
std::string first_difference(const TensorMap& a, const TensorMap& b);

// The logits [64, vocab] of the model in `dir` (every encoding decoded as the forward decodes it)
// on 64 fixed token ids in windows of 32.
runtime::MatrixRM fixed_logits(const std::filesystem::path& dir);

}  // namespace moe::test

namespace moe::test {

// Overwrites bytes of tensor `name` in the safetensors file `file`, starting `byte_offset` bytes
// into the tensor's data (e.g. a NaN into an expert's weight). Throws std::runtime_error when the
// tensor is absent or the bytes do not fit.
void patch_tensor_bytes(const std::filesystem::path& file, const std::string& name, uint64_t byte_offset,
                        const std::string& bytes);
// Rewrites the safetensors file `file` without tensor `name` (the other tensors' bytes unchanged).
// Throws std::runtime_error when the tensor is absent.
void remove_tensor(const std::filesystem::path& file, const std::string& name);
// A copy of folder `from` at `to` (files only, one level).
void copy_folder(const std::filesystem::path& from, const std::filesystem::path& to);
// copy_folder, then `patch` merged into the copy's config.json (nlohmann::json::merge_patch: a null
// value removes the key).
void copy_with_config(const std::filesystem::path& from, const std::filesystem::path& to, const nlohmann::json& patch);
// data/phimoe-tiny's config patch for llama.cpp's phimoe: no sliding window (removed: transformers'
// default None; llama.cpp attends fully;
// the fixture's 8 is refused by the export) and a longrope RoPE (8 short and 8 long divisors, one
// mscale 1.15, original context 64).
nlohmann::json phimoe_llamacpp_patch();
// Row-major `v` [rows, cols] with each row's (rows_mean) or each column's mean subtracted, the
// means summed in double: GgufArch::centre_residual's writers as the export writes them.
std::vector<float> centred(std::vector<float> v, size_t rows, size_t cols, bool rows_mean);

}  // namespace moe::test
