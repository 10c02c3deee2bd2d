// A recipe is the pipeline written as JSON:
// {
//   "model": "path/to/checkpoint",
//   "seed": 0,
//   "calibration": {"text": "calib.txt", "ctx": 512, "windows": 64, "batch_windows": 8,
//                   "stats": "stats.safetensors", "propagate": true, "out_stride": 16,
//                   "sample": "first", "gram": false, "routed_only": false, "out_cos_tokens": 512},
//   "passes": [{"pass": "merge", "method": "hcsmoe", "experts": 6}],
//   "output": {"path": "out", "dtype": "bf16", "max_shard_size": "5GB", "force": false, "materialize": false,
//              "format": "hf", "type": "q4_0", "tensor_type": ["ffn_down_exps=q8_0"]},
//   "eval": {"text": "heldout.txt", "ctx": 512, "max_windows": 0, "against_input": true,
//            "max_ppl_ratio": 1.15, "max_kl": 0.1, "min_top1": 0.8}
// }
// The eval bounds are quality gates: a written model that misses one is kept, the report says
// so, and `run` exits 3 naming the bound (they need against_input).
// Relative paths resolve against the recipe's folder. Validation happens before any work:
// unknown keys, wrong types, unknown passes/methods, impossible budgets → Error::invalid with
// the JSON path, what was found and what is allowed.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "passes/pass.h"
#include "passes/options.h"

namespace moe::pipeline {

namespace fs = std::filesystem;

// One task of a task-subset prune (docs/tasks.md): its statistics from a stats file, or computed
// on its own text with the rest of the calibration section (ctx, windows, ...).
struct TaskCalibration {
  std::string name;
  fs::path stats;  // exactly one of stats and text is set
  fs::path text;
};

struct CalibrationSpec {
  fs::path text;           // empty: none
  fs::path stats;          // empty: compute on the fly when a pass needs statistics
  int64_t ctx = 512;
  int64_t windows = 0;     // 0: all windows of the text
  int64_t batch_windows = 8;
  int64_t out_stride = 16; // statistics on the fly: token sample of out_mean/out_cos (calib/calibrate.h)
  bool propagate = true;   // calibrate each layer on the outputs of the already-compressed layers
  // Statistics on the fly, as `moe-tool calibrate` takes them (calib/calibrate.h): window choice
  // (with the recipe's seed), Gram matrices (also set when a pass needs them), no out_mean/out_cos,
  // tokens of out_cos.
  std::string sample = "first";
  bool gram = false;
  bool routed_only = false;
  int64_t out_cos_tokens = 512;
  uint64_t seed = 0;       // the recipe's seed (random windows)
  // A layer's routed calibration activations (what the experts' Grams are computed from,
  // calib/input_grams.h) are kept in RAM up to this many bytes and spilled to a memory-mapped
  // temporary file beside the output past it. Unset ("auto"): half the memory available when the
  // run starts (/proc/meminfo MemAvailable).
  std::optional<uint64_t> memory_budget;
  // "tasks": one keep-map per task (prune only). Recipe: a list whose items are
  // {"name": N, "stats": FILE} or {"name": N, "text": FILE}, or "NAME=STATS_FILE" strings (what
  // the flag --tasks gives; a string may join several with commas). Names: letters, digits, _ . -,
  // each once.
  std::vector<TaskCalibration> tasks;
};

struct OutputSpec {
  fs::path path;
  std::optional<core::DType> dtype;
  uint64_t max_shard_bytes = 5'000'000'000ull;
  bool max_shard_given = false;
  bool force = false;
  bool materialize = false;  // encoded weights written dense (a stock checkpoint; model::OutputOptions)
  // The output format (pipeline/sink.h): hf (default), gguf, compressed-tensors, gptq or awq. gguf: the
  // main ggml type (required) and REGEX=TYPE overrides by GGUF tensor name.
  std::string format = "hf";
  bool format_given = false;  // output.format / --format was given (else a prune may follow its input's: runner.cpp)
  std::string type;
  std::vector<std::string> tensor_type;
};

struct EvalSpec {
  fs::path text;
  int64_t ctx = 512;
  int64_t max_windows = 0;
  bool against_input = true;
  // Quality gates (need against_input): perplexity_after / perplexity_before, mean KL and top-1
  // agreement of the written model against the input.
  std::optional<double> max_ppl_ratio, max_kl, min_top1;
  bool has_gates() const { return max_ppl_ratio || max_kl || min_top1; }
};

struct Recipe {
  fs::path model;
  uint64_t seed = 0;
  CalibrationSpec calibration;
  std::vector<std::unique_ptr<Pass>> passes;
  nlohmann::json pass_specs = nlohmann::json::array();
  OutputSpec output;
  std::optional<EvalSpec> eval;
  std::string source;  // recipe file (for messages and the report)
  // Files the run reads besides the model, texts and statistics: the recipe file itself and, in a
  // batch, every recipe of the batch. The output may not be, be inside or contain any of them.
  std::vector<fs::path> reads;
  nlohmann::json json; // the validated recipe, paths resolved
  // How the user spells each recipe key when the recipe was built from flags (prune, merge):
  // JSON path -> flag ("calibration.text" -> "--text"); empty for recipe files.
  std::map<std::string, std::string> flag_names;
  // The name of a recipe key in messages: its flag for prune/merge, else the JSON path.
  std::string key(const std::string& json_path) const {
    auto it = flag_names.find(json_path);
    return it == flag_names.end() ? json_path : it->second;
  }
};

// output.format, output.type and output.tensor_type of an "output" section `spec` read with `o`
// into `out` (pipeline/sink.h; the GGUF type names and rules checked, parsed again by the sink).
// Error::invalid naming the key.
void parse_output_format(passes::Options& o, const nlohmann::json& spec, OutputSpec& out);
// The "calibration" section alone (what `moe-tool calibrate` takes from its flags).
CalibrationSpec parse_calibration(const nlohmann::json& j, const fs::path& base);
// Parses and validates; `base` resolves relative paths; `source` names the file in errors.
Recipe parse_recipe(const nlohmann::json& j, const fs::path& base, const std::string& source);
// Reads a recipe file, applies `--set path=value` overrides (value parsed as JSON when it is
// valid JSON, else taken as a string), then parse_recipe().
Recipe load_recipe(const fs::path& file, const std::vector<std::string>& overrides);
// Applies one "a.b[2].c=value" override to j (creating objects as needed).
void apply_override(nlohmann::json& j, const std::string& assignment);

}  // namespace moe::pipeline
