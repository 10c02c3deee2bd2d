// A checkpoint written as one GGUF v3 file llama.cpp loads (docs/gguf.md): what `moe-tool export
// --format gguf` writes and what a recipe's `"output": {"format": "gguf"}` converts its staged
// native output into (pipeline/sink.h). Families and names follow llama.cpp's architecture table
// (llama-arch.cpp) and converter (convert_hf_to_gguf.py) through io/gguf_names.h; every block is
// rounded by our own codecs (quant/gguf_blocks.h); int4/int8 symmetric groups of 32 are copied
// into Q4_0/Q8_0 blocks as they are. Streams: memory is one tensor (one expert of a stacked
// tensor) at a time.
#pragma once

#include <nlohmann/json.hpp>
#include <functional>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "model/model.h"
#include "quant/gguf_blocks.h"

namespace moe::pipeline {

// One --tensor-type rule: GGUF tensor names matching `re` (std::regex search) get `type`.
struct GgufTypeOverride {
  std::string pattern;
  std::regex re;
  quant::GgmlType type;
};

struct GgufOptions {
  quant::GgmlType type = quant::GgmlType::Q8_0;  // the main type
  std::vector<GgufTypeOverride> overrides;       // the first match wins
  std::string name;                              // general.name; empty: the input folder's name
  // How messages name the override rules: the export's flag, or a run's key ("--gguf-tensor-type",
  // "output.tensor_type").
  std::string tensor_type_key = "--tensor-type";
  // The model is a run's staged native output: a tensor whose codes are copied is re-typed by the
  // run's quantize codec, not by converting a folder first.
  bool staged = false;
};

// A type the writer produces, from its name ("q4_0"); Error::invalid (unknown) or
// Error::unsupported (known, not written) naming `key` (the flag or JSON path).
quant::GgmlType gguf_writable_type(const std::string& name, const std::string& key);
// REGEX=TYPE rules; `key(i)` names rule i in messages ("--tensor-type 'x=y'", "output.tensor_type[1]").
std::vector<GgufTypeOverride> parse_gguf_overrides(const std::vector<std::string>& specs,
                                                   const std::function<std::string(size_t)>& key);

// Every refusal of the GGUF writer on `m`, without writing anything: a family llama.cpp's
// architectures do not cover here, dense layers, ragged expert counts, novices, tensors without a
// GGUF name, RoPE scaling, sliding windows, routing llama.cpp would not reproduce, an encoding with
// no block type (the way out named), a row not a multiple of its block, and the tokenizer
// (byte-level BPE with a pre-tokenizer llama.cpp names). `m` may be a plan (shapes only, views of
// `ckpt`'s tensors). Error::unsupported / Error::corruption naming `ckpt`'s folder and the tensor.
// Returns the tensors' bytes (the file is larger by its header and metadata only).
uint64_t check_gguf(io::Env& env, const io::Checkpoint& ckpt, const model::Model& m, const GgufOptions& opts);

struct GgufResult {
  size_t tensors = 0;
  uint64_t tensor_bytes = 0;  // the tensors' data
  uint64_t file_bytes = 0;    // the whole file
  std::map<std::string, int> types;  // ggml type name -> tensors of that type
};

// Writes `m` (loaded from `ckpt`) as a GGUF file at `path` (the caller's io::OutputFile temporary).
GgufResult write_gguf(io::Env& env, const io::Checkpoint& ckpt, const model::Model& m, const GgufOptions& opts,
                      const io::fs::path& path);

}  // namespace moe::pipeline
