// A checkpoint's intN codes written as they are in the int4/int8 layouts vLLM and transformers
// load (io/compressed_tensors.h, docs/compressed-tensors.md): compressed-tensors `pack-quantized`,
// GPTQ (checkpoint_format "gptq") or AWQ GEMM (int4), every other weight dense under its stock
// name, config.json with the format's quantization_config. What `moe-tool export --format
// compressed-tensors|gptq|awq` writes and what a recipe's `"output": {"format": ...}` converts its
// staged native output into (pipeline/sink.h). Memory: one weight at a time.
#pragma once

#include <cstdint>
#include <string>

#include "io/checkpoint.h"
#include "io/compressed_tensors.h"
#include "model/model.h"

namespace moe::pipeline {

// The one integer scheme of a packed output: both configs name one (bits, group, symmetry) for
// every quantized Linear. group 0: the whole row.
struct PackedScheme {
  int bits = 0;
  int64_t group = 0;
  bool symmetric = true;
};

struct PackedResult {
  PackedScheme scheme;
  size_t quantized_linears = 0, dense_linears = 0;
  size_t tensors = 0;
  uint64_t tensor_bytes = 0;  // the tensors' data
  size_t shards = 0;          // safetensors files written
  int64_t quantized_params = 0;
  uint64_t quantized_bytes = 0;
};

// "gptq" -> Gptq, "awq" -> Awq, anything else -> CompressedTensors (the caller checks the name).
io::PackedFormat parse_packed_format(const std::string& f);

// A compressed-tensors float-quantized checkpoint (FP8 E4M3 weights: config.json
// quantization_config.quant_method "compressed-tensors", format "float-quantized").
bool is_compressed_tensors_fp8(const io::Checkpoint& ckpt);

// A run of prune passes only on such an input, written as compressed-tensors again
// (docs/compressed-tensors.md, "Outputs of such an input"): every FP8 Linear of the output is the
// input's module it came from, its tensors copied as stored (`weight` F8_E4M3, `weight_scale` in
// its stored dtype and shape, `input_scale` when the input has it), renamed to the expert's new
// index by the run's keep-map (Sink::set_keep_map); the KV-cache scales of a kv_cache_scheme
// (`….k_scale`, `….v_scale`) copied as stored; every other tensor as the run wrote it.
// What cannot be written so, on the plan, before any work: novices, ragged counts, fused experts
// (check_packed_structure) and a router stored quantized (a prune keeps some of its rows, which
// are no tensor of the input): Error::unsupported naming `where` and the layer.
void check_fp8_copy(const model::Model& planned, const std::string& where);

struct Fp8CopyResult {
  size_t tensors = 0, shards = 0;
  uint64_t tensor_bytes = 0;
  size_t fp8_linears = 0, input_scales = 0, kv_cache_scales = 0;
};

// Writes the folder `dir`: side files; config.json = `config` (the run's, counts rewritten) with
// the input's quantization_config, whose entries naming a removed expert module exactly (ignore,
// config_groups targets) are dropped and those naming a kept one renumbered (`re:` patterns and
// "Linear" as they are); the tensors of `staged` (the run's native output), each FP8 weight
// replaced by its input module's tensors. The staged codes and scales are checked equal to the
// input's they are taken from (Error::internal otherwise).
Fp8CopyResult write_fp8_copied(io::Env& env, const io::Checkpoint& input, const io::Checkpoint& staged,
                               const nlohmann::json& config, const nlohmann::json& keep_map, const io::fs::path& dir,
                               uint64_t max_shard_bytes = 5'000'000'000ull);

// What the layouts cannot hold in a model's structure, whatever its codes: novices and ragged
// expert counts. Error::unsupported naming `where` and the layer. `m` may be a plan (shapes only).
void check_packed_structure(const model::Model& m, io::PackedFormat fmt, const std::string& where);

// Every refusal of write_packed on `m` (loaded from `ckpt`) without writing anything: the
// structure above, a weight encoded other than intN, a quantized embedding (and for GPTQ and AWQ
// a quantized lm_head), two schemes in one model, shapes the layout cannot hold, a routed expert
// stored dense, nothing quantized, GPTQ zero points of 0, an AWQ dense Linear whose name lies
// inside a quantized one's (modules_to_not_convert matches substrings). Error::unsupported naming
// `ckpt`'s folder, the weight and the way out. Returns the tensors' bytes.
uint64_t check_packed(const io::Checkpoint& ckpt, const model::Model& m, io::PackedFormat fmt);

// Writes the folder `dir` (the caller's io::OutputDir temporary): side files, config.json with the
// quantization_config, the tensors (io::CheckpointWriter shards of at most max_shard_bytes, a
// tensor never split; the finite check there).
PackedResult write_packed(io::Env& env, const io::Checkpoint& ckpt, const model::Model& m, io::PackedFormat fmt,
                          const io::fs::path& dir, uint64_t max_shard_bytes = 5'000'000'000ull);

}  // namespace moe::pipeline
