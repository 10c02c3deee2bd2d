// Perplexity and model-vs-reference comparison over a text (docs/methods.md).
//
// Windows: the whole text is tokenized once; non-overlapping windows of ctx tokens from token 0;
// the incomplete tail is dropped. Positions restart at 0 in each window.
// Default convention: every predictable position of each window is scored (ctx-1 per window:
// token t+1 is predicted from tokens 0..t), text tokenized without special tokens added and with
// special-token strings in the text (e.g. "<|endoftext|>") read as plain text unless
// parse_special (`--parse-special`: they become their special ids); the convention line says which.
// llama.cpp convention (`--llama-cpp-compatible`, as llama-perplexity): text tokenized with the
// tokenizer's special tokens added (BOS when it adds one) and special-token strings in the text
// read as plain text (llama-perplexity does not parse them), the first token of every window replaced by
// BOS when the tokenizer adds one, only the second half scored: logits at positions
// ctx/2 .. ctx-2 predicting tokens ctx/2+1 .. ctx-1 (ctx-1-ctx/2 per window).
// NLL and softmax are computed in double.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace moe::eval {

struct EvalOptions {
  int64_t ctx = 512;
  int64_t max_windows = 0;    // 0: all
  int64_t batch_windows = 0;  // 0: automatic (memory-bounded)
  bool llama_cpp = false;
  bool parse_special = false; // special-token strings in the text become special ids (default mode only)
  bool force = false;         // allow ctx beyond max_position_embeddings
  bool quiet = false;         // no progress on stderr
  // How the user spells the options, for messages ("--ctx" for eval, "--eval-ctx" for prune and
  // merge, "eval.ctx" in recipes); an empty force_name: no force option to offer.
  std::string ctx_name = "--ctx", max_windows_name = "--max-windows", force_name = "--force";
  // The evaluated model's routable experts per layer (runtime::Forward::set_active_experts; a task
  // subset, eval/task_subsets.h); empty: all. Never applied to compare()'s reference.
  std::vector<std::vector<bool>> active;
};

struct Windows {
  std::vector<int32_t> tokens;  // windows * ctx, window-major
  int64_t ctx = 0, windows = 0;
  int64_t text_tokens = 0;      // tokens of the whole text
  int64_t score_begin = 0;      // scored: logits at positions [score_begin, ctx-1) predict the next token
  std::string convention;       // human-readable description
  int64_t scored_per_window() const { return ctx - 1 - score_begin; }
};

// Reads the text file; Error::invalid/io for an unreadable or empty file. Text that is not valid
// UTF-8: see check_utf8.
std::string read_text(const std::filesystem::path& path, bool strict_utf8 = false);
// Invalid UTF-8 (the tokenizer replaces each invalid sequence by U+FFFD): with strict, refused
// (Error::invalid naming the source and the byte offset of the first bad sequence); else a
// warning saying the same on stderr.
void check_utf8(std::string_view text, const std::string& source, bool strict);
// How many times special-token strings occur in the text (non-overlapping, left to right).
int64_t count_special_strings(const tokenizer::Tokenizer& tok, std::string_view text);
// Loads the tokenizer of a model folder (or of a GGUF file: rebuilt from its tokenizer.ggml.* keys,
// io/gguf_model.h); Error::not_found naming the folder when absent.
tokenizer::Tokenizer load_tokenizer(const std::filesystem::path& model_dir);
// Tokenizes and cuts windows. Error::invalid when fewer tokens than one window, or max_windows < 0
// (0 = all: callers refuse a user's 0 themselves).
Windows make_windows(const tokenizer::Tokenizer& tok, const std::string& text, const EvalOptions& o);
// Checks ctx against the model's max_position_embeddings: Error::invalid beyond it unless
// force (then a warning on stderr).
void check_context(const model::Model& m, int64_t ctx, bool force, const std::string& ctx_name = "--ctx",
                   const std::string& force_name = "--force");

struct PerplexityResult {
  double nll_sum = 0;
  int64_t tokens_scored = 0;
  int64_t windows = 0, ctx = 0;
  double seconds = 0;            // forward + scoring wall time
  double tokens_per_second = 0;  // tokens forwarded (windows*ctx) per second
  std::string convention;
  double perplexity() const;
};

// Routing agreement of a model with its reference: for each token of the windows (every position,
// scored or not) and each MoE layer, whether the model's top-k expert set equals the reference's
// top-k set mapped onto the model's experts (EAQuant's measure of routing drift; docs/commands/eval.md).
// An input expert maps to the output expert whose origin holds it (model's moe_tool_report.json
// `layers[].origin`); one with no output expert (pruned) maps to none, so a token whose reference
// choice included a pruned expert never agrees; a merged expert holds several input experts.
// overlap: mean of |model set ∩ mapped reference set| / k.
struct RoutingAgreement {
  bool available = false;
  std::string unavailable;  // why not, when !available
  int64_t pairs = 0;        // token × MoE-layer pairs compared
  int64_t same = 0;         // pairs with equal top-k sets
  double overlap_sum = 0;
  struct Layer {
    int layer = 0;
    int64_t pairs = 0, same = 0;
    double overlap_sum = 0;
  };
  std::vector<Layer> layers;
  double agreement() const { return pairs ? double(same) / double(pairs) : 0.0; }
  double overlap() const { return pairs ? overlap_sum / double(pairs) : 0.0; }
  // {"agreement", "overlap", "pairs", "expert_map": how experts were matched, "layers": [...]}, or
  // {"unavailable": why}.
  nlohmann::json to_json(const std::string& expert_map) const;
};

// Which reference (input) experts each of the model's experts comes from, per layer:
// origin[l][e] = the input expert ids output expert e of layer l holds. Empty origin[l]: identity
// (the layer's expert counts must then agree). Read from a run's report by origin_from_report.
using ExpertOrigin = std::vector<std::vector<std::vector<int32_t>>>;
// The origin recorded in a model folder's moe_tool_report.json (`layers[].origin`, input expert
// ids with weights); nullopt when the file or the key is absent. Error::corruption naming the file
// and the JSON path for a malformed entry.
std::optional<ExpertOrigin> origin_from_report(const std::filesystem::path& model_dir);
// The same from a report's `layers` array (a run's own layer reports); `where` prefixes errors.
std::optional<ExpertOrigin> origin_from_layers(const nlohmann::json& layers, const std::string& where);

// Which of a reference's experts a model's experts hold, from the model's report when the report's
// input (`input.fingerprint`) is the reference, else composed along the chain of reports: the
// report's input folder (unchanged since: same fingerprint) and its own report, up to the
// reference (prune, then quantize, then merge, ... in separate runs).
struct ReportedOrigin {
  std::optional<ExpertOrigin> origin;  // nullopt: compared by index (identity)
  std::string how;                     // "by index", "through the model's report", "through 2 reports (...)"
  std::string broken;                  // non-empty: the reports do not lead to the reference (why)
  size_t reports = 0;                  // reports composed (0: by index)
  // For JSON: "by index", "report origin" (one report), "report chain" (several).
  std::string label() const { return reports == 0 ? "by index" : reports == 1 ? "report origin" : "report chain"; }
};
// `model_dir` without a report: by index. Error::corruption for a malformed report.
ReportedOrigin origin_against(const std::filesystem::path& model_dir, const std::string& reference_fingerprint);

struct CompareResult {
  PerplexityResult model, reference;
  RoutingAgreement routing;
  double kl_sum = 0;  // sum over scored tokens of KL(ref || model), nats
  int64_t top1_agree = 0;
  int64_t tokens = 0;
  double mean_kl() const { return tokens ? kl_sum / double(tokens) : 0.0; }
  double top1_agreement() const { return tokens ? double(top1_agree) / double(tokens) : 0.0; }
};

PerplexityResult perplexity(const model::Model& m, const Windows& w, const EvalOptions& o);
// Same windows through both models; vocab sizes (lm_head rows) must agree (Error::invalid).
// Routing agreement is computed when both models have the same MoE layers and each layer's experts
// map through `origin` (or, without it, have equal counts); otherwise routing.unavailable says why.
CompareResult compare(const model::Model& reference, const model::Model& m, const Windows& w, const EvalOptions& o,
                      const ExpertOrigin* origin = nullptr);

// Scores rows of logits [rows, V]: nll += -log softmax(row)[target] (double); returns nll.
double nll_of_row(const float* logits, int64_t V, int32_t target);

}  // namespace moe::eval
