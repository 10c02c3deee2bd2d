// One interface for every pass (prune, merge, factorize, quantize, upcycle, ...). A pass is built
// from its JSON options (the recipe's pass object, or the flags of its subcommand), may plan
// across layers (global budgets) once before the layer loop, then runs on one MoE layer at a time.
// Passes see the logical Model only: never tensor names or file formats.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "calib/stats.h"
#include "core/error.h"
#include "calib/input_grams.h"
#include "model/model.h"
#include "runtime/routing.h"
#include "runtime/weights.h"

namespace moe::pipeline {

// What a pass needs from the runner before its layers run.
struct Requirements {
  std::vector<std::string> stats_fields;  // e.g. {"count"}, {"out_mean"}, {"gram_in"}; empty: no stats
  bool block_inputs = false;  // the MoE block inputs x [N,H] of the calibration tokens at this layer
  // plan() reads every layer's statistics (a budget across layers): only possible for the first
  // pass of a recipe, whose statistics exist for all layers before the first layer is changed.
  bool plan_stats = false;
  // Gram matrices of every projection's inputs at this layer (calib/input_grams.h), from the
  // calibration windows pushed through the layers already changed.
  bool input_grams = false;
  // The residual stream at the layer's input [windows*T, H] on the calibration windows (through
  // the layers already changed when calibration.propagate): for passes that run the rest of the
  // model from this layer (prune/search scores keep-sets by the final output's KL).
  bool layer_inputs = false;
  // The MoE block inputs of the same calibration tokens through the input model, unchanged (a
  // second hidden-state stream beside the one through the changed layers): for passes that match
  // the compressed model to the input one (quantize align_router). Needs calibration.propagate
  // (without it both streams are the input model's).
  bool reference_inputs = false;
  // A planning sweep before the layer loop (a budget across layers that needs each layer's
  // calibration inputs, not statistics): the calibration windows run through the input model,
  // unchanged, one layer at a time, and plan_layer() sees every layer the pass will run on, with
  // that layer's Grams when input_grams is set; then finish_plan(). Memory: one layer and its
  // Grams, plus a second copy of the hidden states. Only possible for the first pass of a recipe
  // (a later pass's input model does not exist before the layer loop).
  bool plan_sweep = false;
  // Calibration windows the pass needs at least (prune/search: its search + held-out windows);
  // preflight checks the run has them, naming the cause (calibration.windows or the text).
  int64_t min_windows = 0;
  std::string min_windows_keys;  // the pass keys that set it, e.g. "search_windows + heldout_windows"
  // What of the pass runs the routed experts on the MoE block inputs (block_inputs, layer_inputs,
  // reference_inputs) as a router that weighs the experts' outputs gives them, e.g. "prune
  // enumerate": the runner refuses it, naming it, for a router that scales each expert's input instead
  // (RoutingRule::scales_input, llama4). Empty: nothing (GPTQ's top-up reads the block inputs
  // through the family's rule, passes/quantize.cpp).
  std::string unscaled_expert_inputs{};
};

struct LayerContext {
  int layer = 0;
  model::Model& model;
  model::Layer& target;                         // the layer being changed (target.moe is set)
  // Set when Requirements::stats_fields is not empty: the input model's statistics for the first
  // pass; for a later pass, this layer's statistics recomputed on the experts the earlier passes
  // left (calib::block_stats on the layer's calibration inputs).
  const calib::LayerStats* stats = nullptr;
  const runtime::MatrixRM* block_inputs = nullptr;  // set when Requirements::block_inputs
  runtime::RoutingRule routing;                 // the family's routing rule for this layer
  uint64_t seed = 0;                            // per-layer seed derived from the recipe seed
  nlohmann::json& report;                       // this layer's entry in moe_tool_report.json
  // Set when Requirements::input_grams. Scratch of this layer: a pass may change it in place (quantize
  // tops up few-token experts' Grams); a later pass gets the experts' Grams recomputed. A routed
  // expert's Grams are computed when asked for (InputGrams::expert_in/expert_mid) and should be
  // released when the pass is done with that expert, so memory holds one expert's, not E.
  InputGrams* grams = nullptr;
  const runtime::MatrixRM* layer_inputs = nullptr;  // set when Requirements::layer_inputs
  int64_t window_tokens = 0;                    // T of the calibration windows (rows are window-major)
  // Set when Requirements::reference_inputs: the MoE block inputs [N,H] of the same tokens in the
  // input model (rows as block_inputs).
  const runtime::MatrixRM* reference_inputs = nullptr;
};

// One task's statistics for a task-subset plan (calibration.tasks, docs/tasks.md).
struct TaskStats {
  std::string name;
  const calib::Stats* stats = nullptr;  // the input model's statistics on the task's text
};

class Pass {
 public:
  virtual ~Pass() = default;
  virtual std::string name() const = 0;    // "prune"
  virtual std::string method() const = 0;  // "reap"
  // Parameters as they will be recorded in the report (after defaults are applied).
  virtual nlohmann::json params() const = 0;
  virtual Requirements requirements() const = 0;
  // Global planning over all layers' statistics (budgets across layers). Default: nothing.
  virtual void plan(const model::Model& /*model*/, const calib::Stats* /*stats*/) {}
  // The planning sweep (Requirements::plan_sweep), layer by layer in order: `layer` as the input
  // model has it, `grams` its Grams on the calibration windows through the input model (null
  // when the pass does not ask for input_grams), `block_inputs` its MoE block inputs [N,H] there
  // (null unless the pass asks for block_inputs), `residual_energy` Σ_t ||r_t||² of the residual
  // stream leaving the layer (what the next layer reads) on those tokens (0 without calibration
  // inputs). Then finish_plan() once, which fills `report` (the pass's entry under "plans" in
  // moe_tool_report.json; the runner adds the sweep's seconds).
  virtual void plan_layer(const model::Layer& /*layer*/, InputGrams* /*grams*/, const runtime::MatrixRM* /*block_inputs*/,
                          double /*residual_energy*/) {}
  virtual void finish_plan(nlohmann::json& /*report*/) {}
  // Experts each MoE layer will have after this pass (for --dry-run and budget checks), given the
  // count before. Throws Error::invalid for impossible budgets.
  virtual int64_t experts_after(int layer, int64_t experts_before, int64_t top_k) const = 0;
  // Changes ctx.target in place: replaces experts, router rows, shared parts as the method says.
  virtual void run_layer(LayerContext& ctx) = 0;
  // Whether run_layer is called on MoE layers only (prune, merge) or on every layer (factorize
  // of attention or dense MLPs; ctx.target.moe may then be unset).
  virtual bool moe_layers_only() const { return true; }
  // Whether the pass replaces experts by novices (prune --novices, MoNE): the output is then
  // native-only (docs/FORMAT.md) and no later pass may run on it.
  virtual bool makes_novices() const { return false; }
  // Why the pass's output can be written in the native format only (docs/FORMAT.md: novices,
  // ragged per-layer expert counts), or "" when stock formats hold it: a stock output
  // (output.materialize) is then refused before any work.
  virtual std::string native_only() const { return ""; }
  // Whether the shapes of what the pass writes are decided while it runs (ranks chosen by
  // energy or budget, codes): the runner then writes through spill files (pipeline/spill_writer.h)
  // and a dry run cannot tell the bytes after.
  virtual bool shapes_at_run() const { return false; }
  // Whether run_layer replaces the experts' weights by dense tensors computed from them (merge):
  // on an input whose experts are encoded (low-rank, integer codes) the output then differs from
  // the input's encodings, so the runner writes through spill files too.
  virtual bool densifies_experts() const { return false; }
  // Whether the expert counts (or which experts become novices) are known only once the pass has
  // its calibration statistics or runs: a dry run then says so instead of printing estimates.
  virtual bool counts_at_run() const { return false; }
  // Encoded inputs (docs/encodings.md). Tensor classes, as model::OutTensor::cls names them
  // (experts, shared_experts, dense_mlp, attention, router, embeddings, lm_head; the shared-expert
  // gate apart, as shared_expert_gate), mapped to the encodings ("intN", "lowrank", ...) they have
  // when the pass runs.
  using EncodedClasses = std::map<std::string, std::set<std::string>>;
  // What the pass does to those encodings beyond keeping them: one sentence per class it
  // dequantizes (reads as f32 and writes differently: dense, or re-encoded), naming the class, the
  // encodings and what is written instead. Empty: every encoded weight the pass does not change
  // keeps its encoding. The runner prints these in the plan (--dry-run) and the summary.
  virtual std::vector<std::string> dequantizes(const EncodedClasses& /*encoded*/) const { return {}; }
  // The classes the pass writes encoded, and as what (quantize: the classes with a codec;
  // factorize: its targets), for the plan of the passes after it.
  virtual EncodedClasses encodes() const { return {}; }
  // Checks against the input model before any work (options that name tensors or classes the
  // model lacks, rules that match nothing, a run that would change nothing): Error::invalid
  // naming the option by its JSON path ("passes[0].tensor_type[1]"). Default: nothing.
  virtual void check_model(const model::Model& /*input*/) const {}
  // A pass that changes the whole model at once, before the layer loop, from the input model's
  // statistics (cross-layer sharing, passes/xlayer_share.h: experts of neighbouring layers pooled
  // into one stored expert): run_model() then does its work, with `report` its entry under
  // "plans" in moe_tool_report.json, and run_layer() only reports. Such a pass is a recipe's only
  // pass (the runner refuses others beside it). Memory: what the pass computes for every layer.
  virtual bool model_scope() const { return false; }
  virtual void run_model(model::Model& /*model*/, const calib::Stats& /*stats*/, nlohmann::json& /*report*/) {}
  // Warnings once every layer ran (a pass that changed nothing says so): shown in the summary
  // and the report. Default: none.
  virtual std::vector<std::string> run_warnings() const { return {}; }
  // Changes the model's globals (embeddings, lm_head) after every layer ran, before they are
  // written; `report` is the pass's entry under "globals" in moe_tool_report.json. Default: nothing.
  virtual void run_globals(model::Model& /*model*/, nlohmann::json& /*report*/) {}
  // Task subsets (calibration.tasks, docs/tasks.md). Why this pass cannot take them, or "" when
  // it can (the runner refuses before any work).
  virtual std::string tasks_refusal() const { return "pass " + name() + " takes no task subsets"; }
  // Plans, before the layer loop, every MoE layer's keep-set per task from the task's statistics
  // (the same method and budget as without tasks) and the experts written (their union, with
  // equal counts in every layer); experts_after() and run_layer() then follow it. Returns the
  // report's "tasks" section (eval/task_subsets.h). Error::invalid for statistics lacking a field.
  virtual nlohmann::json plan_tasks(const model::Model& /*model*/, const std::vector<TaskStats>& /*tasks*/) {
    throw core::Error::internal("pass " + name() + ": plan_tasks without task support");
  }
};

// Builds a pass from its JSON object (recipe "passes"[i] or the subcommand's flags), e.g.
// {"pass": "prune", "method": "reap", "keep": 6}. `json_path` is used in error messages
// ("passes[0].keep: expected an integer >= 1, found \"six\""). Unknown pass, method or key →
// Error::invalid listing what is allowed (with "did you mean ...").
std::unique_ptr<Pass> make_pass(const nlohmann::json& spec, const std::string& json_path);

// The registry (generated from passes.def): pass names, their methods and one-line descriptions.
struct PassInfo {
  const char* pass;
  const char* method;
  const char* description;
};
const std::vector<PassInfo>& registered_passes();
// The methods of upcycle (MOE_UPCYCLE in passes.def), with pass "upcycle".
const std::vector<PassInfo>& registered_upcycle_methods();

}  // namespace moe::pipeline
