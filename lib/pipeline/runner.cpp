#include "pipeline/runner.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "calib/stats.h"
#include "calib/stats_observer.h"
#include "core/error.h"
#include "core/fp8_block.h"
#include "core/progress.h"
#include "core/tensor_arena.h"
#include "eval/eval.h"
#include "io/checkpoint_writer.h"
#include "io/gguf_model.h"
#include "io/gguf_names.h"
#include "io/output_dir.h"
#include "io/scratch.h"
#include "pipeline/calibration_text.h"
#include "pipeline/model_dictionary.h"
#include "pipeline/packed_export.h"
#include "pipeline/mtp.h"
#include "pipeline/preflight.h"
#include "pipeline/report.h"
#include "pipeline/sink.h"
#include "pipeline/spill_writer.h"
#include "pipeline/tasks_run.h"
#include "quant/pooled.h"
#include "quant/ternary_dict.h"
#include "runtime/finite.h"
#include "runtime/forward.h"
#include "runtime/mpi.h"
#include "runtime/mtp.h"
#include "runtime/weights.h"

namespace moe::pipeline {

using core::Error;
using nlohmann::json;

namespace {

// The sink of the ranks other than 0 in an MPI run (runtime/mpi.h): they run every layer to hold
// what the next layer reads, and write nothing; rank 0 writes the output.
class DiscardSink final : public Sink {
 public:
  std::string format() const override { return "none"; }
  const io::fs::path& native_dir() const override { return dir_; }
  void begin(const io::Checkpoint&, const std::optional<std::vector<io::TensorSpec>>&) override {}
  void write(const std::vector<model::OutTensor>&) override {}
  SpillWriter* spill() override { return nullptr; }
  SinkResult finish(const json&) override { return {}; }
  io::fs::path write_report(const json&) override { return {}; }
  void commit() override {}

 private:
  io::fs::path dir_;
};

// Σ_t ||r_t||² of the residual stream leaving a layer (plan_layer's residual_energy).
class ResidualEnergy final : public runtime::Observer {
 public:
  void on_layer_output(int, const runtime::MatrixRM& X) override { energy = static_cast<double>(X.cast<double>().squaredNorm()); }
  double energy = 0;
};

// Captures the MoE block input x of the layer being run.
class BlockInputCapture final : public runtime::Observer {
 public:
  bool wants_moe_trace() const override { return true; }
  void on_moe(int, const runtime::MoeTrace& t) override { x = t.x; }
  runtime::MatrixRM x;
};

// The model as it will be after the passes, shapes only (expert lists truncated to the planned
// counts; views, nothing computed): the writer's plan and the dry run's numbers come from it.
// Novices (MoNE, passes/novices.h) and ragged per-layer expert counts are written in the native
// format only, and no pass reads novices: refuse a model that has them, a pass after the one that
// makes them, and a stock output, before any work.
void check_native_only_passes(const model::Model& m, const Recipe& r) {
  m.refuse_novices(r.model.string() + ": passes",
                   "no pass reads novices: run every other pass before prune --novices, on the input without them");
  for (size_t i = 0; i < r.passes.size(); ++i) {
    const std::string where = r.source + ": passes[" + std::to_string(i) + "]";
    const std::string why = r.passes[i]->native_only();
    if (!why.empty() && r.output.materialize)
      throw Error::unsupported(where + ": " + r.key("output.materialize") + " asks for a stock checkpoint, but " + why);
    if (!r.passes[i]->makes_novices()) continue;
    if (i + 1 < r.passes.size())
      throw Error::unsupported(where + ".novices: no pass can run after novices are made (passes[" + std::to_string(i + 1) +
                               "] would have to); make it the last pass");
    if (m.family().fused_only())
      throw Error::unsupported(where + ".novices: the fused " + m.family().model_type +
                               " expert layout has no place for a constant expert");
  }
  // The fused expert layouts (granitemoe, gpt_oss: one tensor per projection per layer) hold dense
  // experts only: a pass that writes the experts encoded needs them written dense, refused here
  // rather than when the first layer is written.
  if (m.family().fused_only() && !r.output.materialize)
    for (size_t i = 0; i < r.passes.size(); ++i)
      if (r.passes[i]->encodes().count("experts"))
        throw Error::unsupported(r.source + ": passes[" + std::to_string(i) + "]: " + r.passes[i]->name() + " " +
                                 r.passes[i]->method() + " writes the routed experts encoded, which the fused " +
                                 m.family().model_type + " expert layout cannot hold: " + r.key("output.materialize") +
                                 " writes them dense (a stock checkpoint of the decoded values)");
  // A whole-model pass (share: experts pooled across layers) runs alone in its recipe, and its
  // pools are stored once in the native format only: the export formats have no pooled weight.
  for (size_t i = 0; i < r.passes.size(); ++i) {
    if (!r.passes[i]->model_scope()) continue;
    if (r.output.format != "hf")
      throw Error::unsupported(r.source + ": " + r.key("output.format") + " " + r.output.format + ": passes[" +
                               std::to_string(i) + "] (" + r.passes[i]->name() + ") pools experts across layers, which " +
                               r.output.format + " cannot store; write format hf (with " + r.key("output.materialize") +
                               " for per-layer copies), then `moe-tool export` that folder");
    if (r.passes.size() > 1)
      throw Error::invalid(r.source + ": passes[" + std::to_string(i) + "]: pass " + r.passes[i]->name() +
                           " changes the whole model before the layer loop, so it runs alone in a recipe (the recipe "
                           "has " + std::to_string(r.passes.size()) + " passes): run the other passes in a second recipe on its output");
  }
}

// The keep-map of a native checkpoint with ragged expert counts (docs/FORMAT.md): per decoder
// layer (null for a dense layer), per expert, the input expert it is (an id), or the members and
// weights of a merged expert ([[id, weight], ...]).
json keep_map(const json& layer_reports, int64_t layers) {
  json map = json::array();
  for (int64_t l = 0; l < layers; ++l) map.push_back(nullptr);
  for (const auto& lr : layer_reports) {
    if (!lr.contains("origin")) continue;
    json row = json::array();
    for (const auto& o : lr.at("origin")) row.push_back(o.size() == 1 && o[0][1] == 1.0 ? o[0][0] : o);
    map[lr.at("layer").get<size_t>()] = row;
  }
  return map;
}

// How the run's outputs are written: the output dtype and --materialize, and for the formats that
// take intN codes (gptq, awq, compressed-tensors; gguf copies symmetric int4/int8 groups of 32 as
// Q4_0/Q8_0) the codes of a GPTQ / AWQ / compressed-tensors input kept
// (OutputOptions::keep_codes), so a prune of such an input writes its kept codes unchanged.
model::OutputOptions output_options(const Recipe& r) {
  model::OutputOptions o{r.output.dtype, r.output.materialize};
  o.keep_codes = r.output.format == "gptq" || r.output.format == "awq" || r.output.format == "compressed-tensors" ||
                 r.output.format == "gguf";
  return o;
}

model::Model planned_model(const model::Model& m, const std::vector<int64_t>& experts) {
  model::Model p = m;
  for (auto& layer : p.layers()) {
    if (!layer.moe) continue;
    const int64_t e = experts.at(static_cast<size_t>(layer.index));
    auto& b = *layer.moe;
    b.experts.resize(static_cast<size_t>(e));
    b.router = b.router.slice0(0, e);
    if (b.router_bias) *b.router_bias = b.router_bias->reshaped({b.router_bias->numel(), 1}).slice0(0, e).reshaped({e});
  }
  return p;
}

uint64_t bytes_of(const std::vector<model::OutTensor>& outs) {
  uint64_t n = 0;
  for (const auto& o : outs) n += io::TensorSpec{o.name, o.dtype, o.shape}.nbytes();
  return n;
}

// The key of pass i that sets its expert count, as the user wrote it (the flag for prune/merge,
// else the JSON path "passes[i].keep"); "passes[i]" for a pass without one.
std::string count_key(const Recipe& r, size_t i) {
  const std::string path = "passes[" + std::to_string(i) + "]";
  const json params = r.passes[i]->params();
  for (const char* k : {"keep", "keep_ratio", "experts"})
    if (params.is_object() && params.contains(k) && !params.at(k).is_null()) return r.key(path + "." + k);
  return r.key(path);
}

// Plans the passes in order (each on the model as the earlier passes leave it, shapes only) and
// returns the expert counts per layer before each pass and after the last: [passes+1][layers]
// (0 for dense layers). Only the first pass plans with statistics (later passes' statistics do
// not exist before their layer is reached); plan = false (dry run) leaves the passes' estimates.
std::vector<std::vector<int64_t>> plan_passes(Recipe& r, const model::Model& m, const calib::Stats* stats, bool plan) {
  std::vector<std::vector<int64_t>> counts;
  std::vector<int64_t> cur;
  for (const auto& l : m.layers()) cur.push_back(l.moe ? l.moe->num_experts() : 0);
  counts.push_back(cur);
  for (size_t i = 0; i < r.passes.size(); ++i) {
    if (plan) r.passes[i]->plan(i == 0 ? m : planned_model(m, cur), i == 0 ? stats : nullptr);
    for (const auto& l : m.layers()) {
      if (!l.moe) continue;
      auto& c = cur[static_cast<size_t>(l.index)];
      c = core::with_context(count_key(r, i), [&] { return r.passes[i]->experts_after(l.index, c, m.dims().top_k); });
    }
    counts.push_back(cur);
  }
  return counts;
}

// The tensor classes of m whose weights are encoded, and their encodings (docs/encodings.md), as
// stored: GGUF blocks and compressed-tensors / GPTQ / AWQ codes too, which every writer dequantizes
// (OutputOptions::as_stored), so a pass that reads them dequantized says so.
Pass::EncodedClasses encoded_classes(const model::Model& m) {
  json manifest = json::object();
  Pass::EncodedClasses out;
  const std::string& gate = m.family().shared_expert_gate;  // told apart from the shared expert's MLP
  model::OutputOptions stored;
  stored.as_stored = true;
  for (const auto& o : m.outputs(stored, &manifest))
    if (!o.weight.empty() && manifest.contains(o.weight)) {
      const bool is_gate = o.cls == "shared_experts" && !gate.empty() && o.weight.ends_with(gate);
      out[is_gate ? "shared_expert_gate" : o.cls].insert(manifest.at(o.weight).value("encoding", std::string("?")));
    }
  return out;
}

// What the passes do to the encodings they meet (each pass sees the input's encodings and those
// the passes before it write): one line per pass and class it dequantizes.
json dequantize_warnings(const Recipe& r, const model::Model& m) {
  json lines = json::array();
  Pass::EncodedClasses enc = encoded_classes(m);
  for (size_t i = 0; i < r.passes.size(); ++i) {
    const std::string who = r.passes.size() == 1 ? r.passes[i]->name()
                                                 : "passes[" + std::to_string(i) + "] (" + r.passes[i]->name() + ")";
    for (const auto& line : r.passes[i]->dequantizes(enc)) lines.push_back(who + ": " + line);
    for (const auto& [cls, names] : r.passes[i]->encodes()) enc[cls] = names;
  }
  return lines;
}

// "output larger than its input" when it is.
void size_warning(json& summary) {
  const json& b = summary.at("bytes");
  if (b.at("after").is_null() || b.at("after").get<uint64_t>() <= b.at("before").get<uint64_t>()) return;
  summary["warnings"].push_back("the output (" + core::format_bytes(b.at("after").get<double>()) +
                                ") is larger than its input (" + core::format_bytes(b.at("before").get<double>()) + ")");
}

bool has_field(const Requirements& q, const char* f) {
  return std::find(q.stats_fields.begin(), q.stats_fields.end(), f) != q.stats_fields.end();
}

// Where each expert of a layer comes from after the passes: per output expert, [[input expert id,
// weight], ...], composed over the passes' keep-maps ("kept": prune) and groups ("groups" with
// "weights": merge). A pass that changes the expert count must report one of them.
json compose_origin(int64_t experts_in, int64_t experts_out, const json& pass_reports) {
  std::vector<std::vector<std::pair<int, double>>> m(static_cast<size_t>(experts_in));
  for (int e = 0; e < experts_in; ++e) m[e] = {{e, 1.0}};
  for (const auto& pr : pass_reports) {
    std::vector<std::vector<std::pair<int, double>>> next;
    if (pr.contains("kept")) {
      for (int k : pr.at("kept").get<std::vector<int>>()) next.push_back(m.at(static_cast<size_t>(k)));
    } else if (pr.contains("groups")) {
      const json& g = pr.at("groups");
      for (size_t j = 0; j < g.size(); ++j) {
        std::map<int, double> acc;
        for (size_t i = 0; i < g[j].size(); ++i)
          for (const auto& [src, w] : m.at(g[j][i].get<size_t>())) acc[src] += pr.at("weights").at(j).at(i).get<double>() * w;
        next.emplace_back(acc.begin(), acc.end());
      }
    } else {
      continue;
    }
    m = std::move(next);
  }
  if (static_cast<int64_t>(m.size()) != experts_out)
    throw Error::internal("a pass changed the expert count without reporting \"kept\" or \"groups\"");
  json out = json::array();
  for (const auto& v : m) {
    json row = json::array();
    for (const auto& [src, w] : v) row.push_back({src, w});
    out.push_back(row);
  }
  return out;
}

// Statistics of layer l's MoE block as the earlier passes left it, on the layer's calibration
// inputs x (batches of batch_windows windows, as calibrate runs them).
calib::LayerStats recompute_stats(const model::Model& model, int l, const model::Layer& layer, const Requirements& req,
                                  const runtime::MatrixRM& x, int64_t T, const CalibrationSpec& spec, const runtime::RoutingRule& rule) {
  calib::ObserverOptions o;
  o.all_token_stats = has_field(req, "out_mean") || has_field(req, "out_cos");
  o.gram = has_field(req, "gram_in") || has_field(req, "gram_mid");
  o.out_stride = spec.out_stride;
  const runtime::MoeWeights w = runtime::naming_non_finite(model, l, [&] { return runtime::convert_moe(*layer.moe); });
  return calib::block_stats(l, w, rule, x, spec.batch_windows * T, o);
}

// The planning sweep of `pass` (Requirements::plan_sweep): every layer it runs on is shown to
// plan_layer() as the input model has it, with its Grams on the calibration windows X [N, H]
// (copied: the layer loop starts from the embedding again) pushed through the input model's
// layers (the multi-token-prediction layer on its own inputs, made from the windows' `tokens`);
// without a forward (no calibration inputs asked) the layers only. Returns the pass's plan report
// with the sweep's seconds.
json plan_sweep(Pass& pass, const model::Model& model, const runtime::Forward* fwd, const runtime::MatrixRM& X, int64_t T,
                std::span<const int32_t> tokens, const ActivationBudget& budget, bool quiet) {
  const auto t0 = std::chrono::steady_clock::now();
  const bool grams_wanted = pass.requirements().input_grams, inputs_wanted = pass.requirements().block_inputs;
  runtime::MatrixRM Xp;
  if (fwd) Xp = X;
  core::Progress progress("planning", static_cast<uint64_t>(model.layers().size()), "layers", quiet);
  for (const auto& layer : model.layers()) {
    const bool runs = layer.moe || !pass.moe_layers_only();
    GramCapture grams(budget);
    BlockInputCapture inputs;
    ResidualEnergy residual;
    if (fwd && layer.index == runtime::adopted_mtp_layer(model)) {
      auto in = runtime::mtp_layer_input(*fwd, tokens, Xp, T);
      Xp = std::move(in.x);
      T = in.T;
    }
    if (fwd) {
      std::vector<runtime::Observer*> obs = {&residual};
      if (runs && grams_wanted) obs.push_back(&grams);
      if (runs && inputs_wanted) obs.push_back(&inputs);
      fwd->apply_layer(fwd->load_layer(layer.index), Xp, T, obs);
    }
    if (runs)
      core::with_context("layer " + std::to_string(layer.index) + ": planning " + pass.name() + " " + pass.method(),
                         [&] {
                           pass.plan_layer(layer, fwd && grams_wanted ? &grams.grams : nullptr,
                                           fwd && inputs_wanted && layer.moe ? &inputs.x : nullptr, residual.energy);
                         });
    progress.add(1);
  }
  progress.finish();
  json rep = json::object();
  core::with_context("planning " + pass.name() + " " + pass.method(), [&] { pass.finish_plan(rep); });
  rep["pass"] = pass.name();
  rep["method"] = pass.method();
  rep["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

// The state run_recipe's phases share.
struct RunState {
  RunState(Recipe& recipe, const RunOptions& options, io::Env& e, const io::Checkpoint& c, model::Model& m)
      : r(recipe), opts(options), env(e), ckpt(c), model(m), original(m) {}
  Recipe& r;
  const RunOptions& opts;
  io::Env& env;
  const io::Checkpoint& ckpt;
  model::Model& model;     // the passes change it layer by layer
  model::Model original;   // the input as loaded (its pages are released as layers are written)
  std::chrono::steady_clock::time_point t0;  // the run's start
  // check_run
  bool needs_inputs = false, needs_stats = false, needs_grams = false, needs_layer_inputs = false;
  bool needs_reference = false;  // a second stream through the input model (Requirements::reference_inputs)
  std::vector<std::string> fields;  // statistics fields the first pass reads
  bool shapes_at_run = false, moe_only = true;
  uint64_t disk_needs = 0;
  // Where a layer's routed activations live (calib/input_grams.h), and what the layers took.
  ActivationBudget act_budget;
  std::string act_budget_source;
  uint64_t act_largest = 0;
  int64_t act_spilled_layers = 0;
  uint64_t made_spilled = 0;  // bytes the passes made through the temporary file (io::SpillArena)
  // the output, statistics and the plan
  std::unique_ptr<Sink> sink;
  std::optional<calib::Stats> stats;
  std::vector<calib::Stats> task_stats;  // calibration.tasks, in the recipe's order
  json tasks;                            // the report's "tasks" section (task subsets)
  json inherited_tasks;                  // the input's, when the run keeps every expert in place
  std::vector<std::vector<int64_t>> counts;
  std::optional<model::Model> planned;
  std::vector<model::OutTensor> outs_after;
  json summary, passes;
  std::string format_note, format_warning;  // follow_input_format's lines for the summary
  bool format_followed = false;             // the output format is the input's (follow_input_format)
  // run_layers
  json plan_reports = json::array(), layer_reports = json::array();
  int64_t params_fix = 0, active_fix = 0;  // written minus planned parameters (novices)
  json manifest = json::object();
  model::OutputOptions out_opts;
  std::map<std::string, model::ClassAccount> acc_after;
  std::map<std::string, std::string> weight_class;  // encoded weight -> its tensor class
  // write_globals, evaluate_output
  json global_reports = json::array();
  SinkResult written;
  json new_config, notes, eval_json, gate;
};

// Plan and preflight: every check before any work (--dry-run stops after them), what the run
// will compute, how it writes, and the output's room on its file system.
// A run whose passes only prune, given no output format (nor dtype or materialize; nor a shard
// size for a GGUF input), writes the format of its input when moe-tool writes that format: a GPTQ,
// AWQ or compressed-tensors pack-quantized input as gptq / awq / compressed-tensors (the kept
// experts' codes unchanged), a compressed-tensors float-quantized (FP8) input as
// compressed-tensors float-quantized (its FP8 tensors copied, pipeline/sink.h copies_fp8_input),
// a GGUF input as GGUF (their blocks copied). Chosen first (the output
// checks depend on it); check_planned_format then keeps it or, when that format cannot hold the
// result (act-order codes, novices, ...: the format's own check refuses it), writes hf, the
// weights dequantized, with a warning saying why. The summary says which (docs/recipes.md).
void follow_input_format(RunState& s) {
  Recipe& r = s.r;
  if (r.output.format_given || !prunes_only(r)) return;
  std::string fmt;
  if (s.ckpt.gguf()) {
    fmt = "gguf";
  } else {
    const json q = s.ckpt.config().value("quantization_config", json());
    const json qm = q.is_object() ? q.value("quant_method", json()) : json();
    if (qm == "gptq") fmt = "gptq";
    else if (qm == "awq") fmt = "awq";
    else if (qm == "compressed-tensors" &&
             (q.value("format", json()) == "pack-quantized" || q.value("format", json()) == "float-quantized"))
      fmt = "compressed-tensors";
    else return;
  }
  std::string given;  // an option of the hf folder that keeps the input's format out
  if (r.output.dtype) given = r.key("output.dtype");
  else if (r.output.materialize) given = r.key("output.materialize");
  else if (fmt == "gguf" && r.output.max_shard_given) given = r.key("output.max_shard_size");
  if (!given.empty()) {
    s.format_note = "output: format hf, the weights dequantized (" + given + " is an hf option; " + r.key("output.format") + " " +
                    fmt + " keeps the input's " + (fmt == "gguf" ? "blocks" : "codes") + ")";
    return;
  }
  r.output.format = fmt;
  s.format_followed = true;
  if (copies_fp8_input(r, s.ckpt)) {
    s.format_note = "output: format compressed-tensors, the input's (float-quantized: the kept FP8 Linears' weight, "
                    "weight_scale and input_scale copied as stored); " + r.key("output.format") +
                    " hf writes the FP8 codes under moe-tool's own config";
    return;
  }
  s.format_note = "output: format " + fmt + ", the input's (" +
                  (fmt == "gguf" ? "the kept experts' blocks copied" : "the kept experts' codes written unchanged") +
                  "); " + r.key("output.format") + " hf writes the weights dequantized";
}

// The output format's refusals (an encoding it cannot hold, ...) on the plan, before any work; a
// format followed from the input (follow_input_format) that refuses gives way to hf instead.
void check_planned_format(RunState& s, const model::Model& planned) {
  Recipe& r = s.r;
  if (!s.format_followed) return check_output_format(s.env, r, s.ckpt, planned);
  const std::string fmt = r.output.format;
  try {
    check_output_format(s.env, r, s.ckpt, planned);
  } catch (const Error& e) {
    if (e.kind() != core::ErrorKind::NotSupported) throw;
    r.output.format = "hf";
    s.format_followed = false;
    s.format_note.clear();
    s.format_warning = std::string("output: written as hf (") +
                       (is_compressed_tensors_fp8(s.ckpt) ? "the FP8 codes under moe-tool's own config"
                                                          : "the weights dequantized") +
                       "), not in the input's format " + fmt +
                       ", which cannot hold it: " + e.message();
  }
}

// A folder output named like a GGUF file, or a GGUF file named like a folder (a trailing '/'), is
// a slip: refused before any work (`why`: the reason the format is not the input's, if any).
void check_output_name(const Recipe& r, const std::string& why) {
  const std::string path = r.output.path.string();
  if (r.output.format == "gguf") {
    if (!path.empty() && path.back() == '/')
      throw Error::invalid(r.key("output.path") + " " + path + ": a folder name (a trailing '/'), but the output is one GGUF file");
    return;
  }
  if (io::has_gguf_name(r.output.path))
    throw Error::invalid(r.key("output.path") + " " + path + ": a .gguf name, but the output is a folder (format " + r.output.format +
                         ")" + (why.empty() ? std::string("; name it without .gguf, or give ") + r.key("output.format") + " gguf"
                                            : ": " + why));
}

void check_run(RunState& s) {
  Recipe& r = s.r;
  const io::Checkpoint& ckpt = s.ckpt;
  const RunOptions& opts = s.opts;
  model::Model& model = s.model;
  bool &needs_inputs = s.needs_inputs, &needs_stats = s.needs_stats, &needs_grams = s.needs_grams,
       &needs_layer_inputs = s.needs_layer_inputs, &shapes_at_run = s.shapes_at_run, &moe_only = s.moe_only;
  std::vector<std::string>& fields = s.fields;
  uint64_t& disk_needs = s.disk_needs;
  if (!model.family().moe)
    throw Error::invalid(r.model.string() + ": family " + model.family().model_type +
                         " is dense: the passes of this recipe work on MoE layers");
  // A family GGUF has no architecture for: said first, before what the passes would need.
  if (r.output.format == "gguf" && !model.family().gguf && !s.ckpt.gguf())
    throw Error::unsupported(r.model.string() + ": family " + model.family().model_type +
                             " is not exported to GGUF yet (exported: " + io::gguf_exported_model_types() + ")");
  follow_input_format(s);
  drop_stale_mtp_head(model, r);
  check_native_only_passes(model, r);
  for (const auto& p : r.passes) {
    try {
      p->check_model(model);
    } catch (const Error& e) {
      if (!r.flag_names.empty()) throw;
      throw Error(e.kind(), r.source + ": " + e.message());
    }
  }
  // Statistics: the first pass reads the input model's (file or collected on the text). A later
  // pass that needs statistics gets them recomputed per layer on the experts the earlier passes
  // left, from the layer's calibration inputs; super experts among them are judged by the input
  // model's thresholds, so those statistics are collected too when a later pass needs out_absmax.
  // A router that scales each expert's input by its score (llama4): a pass that runs the experts on
  // the block inputs as a router weighing their outputs would, or that reads the all-token
  // statistics (out_mean / out_cos: every expert run on every sampled token, weighted by a score
  // the router never gave it), cannot apply. The others get the routed-token statistics only
  // (collect_stats).
  const bool scales_input = runtime::RoutingRule::from_model(model).scales_input;
  for (size_t i = 0; i < r.passes.size(); ++i) {
    const auto req = r.passes[i]->requirements();
    if (scales_input && !req.unscaled_expert_inputs.empty())
      throw Error::unsupported(r.source + ": passes[" + std::to_string(i) + "]: " + req.unscaled_expert_inputs +
                               " runs the experts on the MoE block's inputs, which " + model.family().model_type +
                               "'s router scales per expert (Llama4TextMoe): not implemented");
    for (const auto& f : req.stats_fields)
      if (scales_input && (f == "out_mean" || f == "out_cos"))
        throw Error::unsupported(r.source + ": passes[" + std::to_string(i) + "]: " + r.passes[i]->name() + " " +
                                 r.passes[i]->method() + " reads " + f + " (every expert run on every sampled token), "
                                 "which " + model.family().model_type + "'s router does not define: it scales each "
                                 "expert's input by its score (Llama4TextMoe); not applicable to this family");
    needs_inputs = needs_inputs || req.block_inputs || req.input_grams;
    needs_grams = needs_grams || req.input_grams;
    needs_inputs = needs_inputs || req.layer_inputs;
    needs_layer_inputs = needs_layer_inputs || req.layer_inputs;
    needs_inputs = needs_inputs || req.reference_inputs;
    s.needs_reference = s.needs_reference || req.reference_inputs;
    if (req.reference_inputs && !r.calibration.propagate) {
      // From flags the setting is the flag itself (--no-propagate), from a recipe the key's value.
      const std::string flag = r.key("calibration.propagate");
      const std::string setting = flag == "calibration.propagate" ? flag + ": false" : flag;
      throw Error::invalid(r.source + ": passes[" + std::to_string(i) + "]: " + r.passes[i]->name() + " " +
                           r.passes[i]->method() + " compares each layer on the compressed model's inputs with the input "
                           "model's, which are the same without propagation (" + setting + "): run with propagation");
    }
    if ((req.input_grams || req.layer_inputs || req.reference_inputs) && r.calibration.text.empty())
      throw Error::invalid(r.source + ": passes[" + std::to_string(i) + "]: method '" + r.passes[i]->method() +
                           "' needs the inputs of each layer on calibration windows: give calibration.text");
    if (req.plan_sweep && i > 0)
      throw Error::invalid(r.source + ": passes[" + std::to_string(i) + "]: method '" + r.passes[i]->method() +
                           "' plans across layers on the input model's calibration inputs, which exist only for the "
                           "first pass: make it the first, or plan per layer (factorize: budget_scope \"layer\")");
    if (req.stats_fields.empty()) continue;
    const std::string where = r.source + ": passes[" + std::to_string(i) + "]: method '" + r.passes[i]->method() + "'";
    if (i == 0) {
      needs_stats = true;
      fields.insert(fields.end(), req.stats_fields.begin(), req.stats_fields.end());
      continue;
    }
    if (req.plan_stats)
      throw Error::invalid(where + " ranks experts across layers (keep_ratio), which needs every layer's statistics "
                           "before the first layer is changed; after an earlier pass they are recomputed layer by "
                           "layer, so use \"keep\" here or make this pass the first");
    if (r.calibration.text.empty())
      throw Error::invalid(where + " needs statistics of the experts left by the earlier passes; they are computed on "
                           "the calibration windows layer by layer: give " + r.key("calibration.text") +
                           " (a stats file describes the input model only)");
    needs_inputs = true;
    if (has_field(req, "out_absmax")) {
      needs_stats = true;
      fields.push_back("out_absmax");
    }
  }
  // Task subsets: each task brings its own statistics (checked here); the pass reads no others.
  if (!r.calibration.tasks.empty()) {
    check_tasks(r, ckpt, model, fields);
    needs_stats = false;
  }
  // Every check before any work (--dry-run stops after them); then the output folder exists from
  // the start, so nothing can take its place unnoticed while the statistics are computed.
  RunNeeds run_needs{needs_stats, needs_inputs, fields};
  for (size_t i = 0; i < r.passes.size(); ++i) {
    const Requirements req = r.passes[i]->requirements();
    if (req.min_windows <= run_needs.min_windows) continue;
    run_needs.min_windows = req.min_windows;
    std::string why;  // the pass's keys by the names the user gave them (flags or JSON paths)
    for (size_t a = 0, b; a <= req.min_windows_keys.size(); a = b + 3) {
      b = req.min_windows_keys.find(" + ", a);
      if (b == std::string::npos) b = req.min_windows_keys.size();
      why += (why.empty() ? "" : " + ") + r.key("passes[" + std::to_string(i) + "]." + req.min_windows_keys.substr(a, b - a));
    }
    run_needs.min_windows_why = why + " = " + std::to_string(req.min_windows);
  }
  preflight(r, ckpt, model, run_needs, /*load_stats_file=*/opts.dry_run);
  bool densifies = false;
  for (const auto& p : r.passes) {
    shapes_at_run = shapes_at_run || p->shapes_at_run();
    moe_only = moe_only && p->moe_layers_only();
    densifies = densifies || p->densifies_experts();
  }
  // A pass that writes encoded experts dense (merge of a factorized or quantized checkpoint)
  // leaves tensors the input's encodings do not describe: written through spill files too. A
  // block-scaled FP8 expert stays FP8 of the same shape (passes/experts.h to_tensor_like).
  if (densifies)
    for (const auto& l : model.layers())
      if (l.moe) {
        auto dense_after = [&](const core::Tensor& t) {
          shapes_at_run = shapes_at_run || (t.encoding() && !dynamic_cast<const core::Fp8Block*>(t.encoding()));
        };
        for (const auto& e : l.moe->experts)
          for (const core::Tensor* t : {&e.gate, &e.up, &e.down}) dense_after(*t);
        dense_after(l.moe->router);  // the merged router rows too
      }
  // Experts of a layer stored unlike each other (one kept dense by a quantization config's
  // `ignore`, scales of another dtype or shape): the plan names each written expert's tensors
  // after the input expert at its index, which a pass that drops or moves experts changes: written
  // through spill files too.
  for (const auto& l : model.layers()) {
    if (!l.moe || shapes_at_run) continue;
    auto signature = [](const model::Mlp& e) {
      std::string sig;
      for (const core::Tensor* t : {&e.gate, &e.up, &e.down}) {
        sig += core::dtype_name(t->dtype()) + core::shape_str(t->shape()) + ";";
        if (const core::Encoding* enc = t->encoding()) {
          sig += enc->name() + enc->params().dump();
          for (const auto& part : enc->parts())
            sig += part.role + part.suffix + core::dtype_name(part.tensor->dtype()) + core::shape_str(part.tensor->shape());
        }
        sig += "|";
      }
      return sig;
    };
    const std::string first = l.moe->experts.empty() ? "" : signature(l.moe->experts.front());
    for (const auto& e : l.moe->experts) shapes_at_run = shapes_at_run || signature(e) != first;
  }
  // Weights whose parts' shapes depend on their values (sub-1-bit code streams) cannot be planned
  // from the input's positions once a pass moves experts: written through spill files too.
  // Experts pooled across layers (`moe-tool share`): the pool's tensor is written once, under the
  // name of its first user in the output, which a pass that drops or moves experts decides while
  // it runs (the plan names it after the input's first user): written through spill files too.
  for (const auto& l : model.layers())
    l.for_each_tensor([&](const core::Tensor& t) {
      shapes_at_run = shapes_at_run || (t.encoding() && (quant::part_shapes_depend_on_values(*t.encoding()) ||
                                                         dynamic_cast<const quant::Pooled*>(t.encoding())));
    });
  // Counts and sizes the plan knows before any work (a dry run shows them): a count a layer cannot
  // take is refused here, not after the statistics, and the output must fit on its file system.
  // Outputs whose shapes are decided while the passes run go through spill files first (twice
  // their size until the shards are assembled); their estimate is the planned shapes'.
  const std::vector<int64_t> estimated_counts = plan_passes(r, model, nullptr, false).back();
  check_mtp_passes(model, r, estimated_counts);  // the MTP layer's count ends equal to the decoder layers'
  const model::Model estimated = planned_model(model, estimated_counts);
  // Task subsets: the union of the tasks' experts is known after their statistics; the input's
  // size bounds it.
  const uint64_t estimate = bytes_of((r.calibration.tasks.empty() ? estimated : model)
                                         .outputs(output_options(r)));
  check_planned_format(s, estimated);
  check_output_name(r, s.format_warning.empty() ? s.format_note : s.format_warning);
  // The export formats stage the native output beside theirs: room for both. A GGUF input written
  // as GGUF copies its blocks: the file's exact size, and the staged output only for an evaluation.
  const uint64_t native = shapes_at_run ? 2 * estimate : estimate;
  if (const auto copied = copied_output_size(r, ckpt, estimated))
    disk_needs = copied->file_bytes + (stages_native_output(r) ? native : 0);
  else
    disk_needs = native * (r.output.format == "hf" ? 1 : 2);
  io::check_free_space(r.output.path, disk_needs, r.key("output.path"));
  for (const auto& f : fields)
    if (f == "gram_in" || f == "gram_mid") r.calibration.gram = true;  // statistics on the fly: with Gram matrices
}

// Statistics the first pass reads: from the file (checked against this model) or collected on the
// calibration text.
void load_statistics(RunState& s) {
  Recipe& r = s.r;
  const io::Checkpoint& ckpt = s.ckpt;
  const RunOptions& opts = s.opts;
  const model::Model& model = s.model;
  std::optional<calib::Stats>& stats = s.stats;
  if (s.needs_stats && !s.opts.dry_run) {
    if (!r.calibration.stats.empty()) {
      stats = calib::Stats::load(r.calibration.stats);
      stats->check_model(ckpt, r.calibration.stats);
      check_mtp_stats(model, *stats, r.calibration.stats.string());
    } else {
      stats = collect_stats(ckpt, model, r.calibration, r.seed, opts.quiet);
    }
    for (const auto& l : model.layers())
      if (l.moe)
        for (const auto& f : s.fields) stats->layer(l.index, f);
  }
  // Task subsets: a dry run reads stats files (cheap, so its counts are exact) but calibrates no text.
  const bool task_texts = std::any_of(r.calibration.tasks.begin(), r.calibration.tasks.end(),
                                      [](const TaskCalibration& t) { return !t.text.empty(); });
  if (!r.calibration.tasks.empty() && (!s.opts.dry_run || !task_texts))
    s.task_stats = task_statistics(r, ckpt, model, opts.quiet);
}

// The plan after the statistics: expert counts per layer after each pass, and the summary of what
// the run will do (its core, and all of a dry run).
void plan_run(RunState& s) {
  Recipe& r = s.r;
  const io::Checkpoint& ckpt = s.ckpt;
  const RunOptions& opts = s.opts;
  const model::Model& model = s.model;
  const model::Model& original = s.original;
  const std::optional<calib::Stats>& stats = s.stats;
  json& summary = s.summary;
  const bool needs_stats = s.needs_stats, needs_grams = s.needs_grams, needs_inputs = s.needs_inputs,
             shapes_at_run = s.shapes_at_run;
  const uint64_t disk_needs = s.disk_needs;
  // Global budgets are planned over all layers' statistics before the per-layer counts are known
  // (a dry run shows the passes' estimates instead).
  if (!s.task_stats.empty()) {
    std::vector<TaskStats> ts;
    for (size_t i = 0; i < s.task_stats.size(); ++i) ts.push_back({r.calibration.tasks[i].name, &s.task_stats[i]});
    s.tasks = task_section(r, s.task_stats, r.passes[0]->plan_tasks(model, ts));
    json unions = json::array();
    for (const auto& l : s.tasks.at("layers")) unions.push_back({{"layer", l.at("layer")}, {"union", l.at("union")}});
    summary["tasks"] = {{"names", s.tasks.at("names")}, {"experts_per_layer", s.tasks.at("experts_per_layer")},
                        {"union", unions}};
  }
  s.counts = plan_passes(r, model, stats ? &*stats : nullptr, !opts.dry_run);
  s.planned.emplace(planned_model(model, s.counts.back()));
  const auto& counts = s.counts;
  const model::Model& planned = *s.planned;
  s.outs_after = planned.outputs(output_options(r));

  summary["model"] = r.model.string();
  summary["family"] = model.family().model_type;
  summary["output"] = r.output.path.string();
  json& passes = s.passes;
  passes = json::array();
  for (const auto& p : r.passes) passes.push_back({{"pass", p->name()}, {"method", p->method()}, {"params", p->params()}});
  summary["passes"] = passes;
  json layers = json::array();
  for (const auto& l : model.layers()) {
    if (!l.moe) {
      layers.push_back({{"layer", l.index}, {"dense", true}});
      continue;
    }
    layers.push_back({{"layer", l.index}, {"experts_before", counts.front()[static_cast<size_t>(l.index)]},
                      {"experts_after", counts.back()[static_cast<size_t>(l.index)]}});
  }
  summary["layers"] = layers;
  summary["params"] = {{"before", original.total_params()}, {"after", planned.total_params()},
                       {"active_before", original.active_params()}, {"active_after", planned.active_params()}};
  const std::optional<OutputSize> copied = copied_output_size(r, ckpt, planned);  // a GGUF input's blocks
  summary["bytes"] = {{"before", ckpt.total_tensor_bytes()},
                      {"after", copied ? json(copied->tensor_bytes) : shapes_at_run ? json() : json(bytes_of(s.outs_after))}};
  summary["disk"] = {{"needs", disk_needs}, {"free", io::free_space(r.output.path)}};

  std::vector<std::string> compute;
  if (needs_stats)
    compute.push_back(!r.calibration.stats.empty() ? "statistics read from " + r.calibration.stats.string()
                                                   : "statistics collected on " + r.calibration.text.string());
  for (size_t i = 1; i < r.passes.size(); ++i)
    if (!r.passes[i]->requirements().stats_fields.empty())
      compute.push_back("passes[" + std::to_string(i) + "]: statistics of the experts left by the earlier passes, "
                        "recomputed layer by layer on the calibration windows");
  if (!r.passes.empty() && r.passes[0]->requirements().plan_sweep)
    compute.push_back("passes[0]: a planning sweep before the layer loop (the calibration windows through the input "
                      "model, layer by layer) for its plan across layers");
  if (needs_grams) {
    ActivationBudget& b = s.act_budget;
    b.spill_dir = io::fs::absolute(r.output.path).parent_path();
    if (r.calibration.memory_budget) {
      b.bytes = *r.calibration.memory_budget;
      s.act_budget_source = r.key("calibration.memory_budget");
    } else {
      const uint64_t avail = io::available_memory();
      b.bytes = avail ? avail / 2 : UINT64_MAX;
      s.act_budget_source = avail ? "auto: half of the " + core::format_bytes(static_cast<double>(avail)) + " available when the run started"
                                  : "auto: unlimited (/proc/meminfo unreadable)";
    }
    compute.push_back("Gram matrices of every projection's inputs, layer by layer, on the calibration windows; a routed "
                      "expert's computed from the layer's activations when the pass reaches it (activations in RAM up to " +
                      (b.bytes == UINT64_MAX ? std::string("any size") : core::format_bytes(static_cast<double>(b.bytes))) + ", " +
                      s.act_budget_source + "; spilled to a temporary file in " + b.spill_dir.string() + " past it)");
    summary["memory"] = {{"activation_budget", b.bytes == UINT64_MAX ? json() : json(b.bytes)},
                         {"source", s.act_budget_source}};
  }
  if (s.needs_reference)
    compute.push_back("MoE block inputs of the calibration windows through the input model too (a second hidden-state "
                      "stream, for matching the compressed layers to the input)");
  if (needs_inputs)
    compute.push_back(std::string("MoE block inputs of the calibration windows, layer by layer") +
                      (r.calibration.propagate ? " (through the compressed layers)" : " (of the input model)"));
  summary["computes"] = compute;
  summary["warnings"] = dequantize_warnings(r, model);
  if (!s.format_warning.empty()) summary["warnings"].push_back(s.format_warning);
  if (r.calibration.memory_budget && !needs_grams)
    summary["warnings"].push_back(r.key("calibration.memory_budget") +
                                  ": no pass of this run computes Gram matrices (quantize gptq, factorize asvd, svdllm, "
                                  "delta, latent), so the budget is unused");
}

// A dry run's summary: the plan, with the counts decided while a pass runs shown as such.
json dry_run_summary(RunState& s) {
  json& summary = s.summary;
  const Recipe& r = s.r;
  {
    size_warning(summary);
    summary["dry_run"] = true;
    if (!s.format_note.empty()) summary["notes"].push_back(s.format_note);
    bool at_run = false;
    for (const auto& p : r.passes) at_run = at_run || p->counts_at_run();
    at_run = at_run || (!r.calibration.tasks.empty() && s.task_stats.empty());  // task texts not calibrated
    if (at_run) {  // the estimates would be wrong: null, "decided while the pass runs"
      for (auto& l : summary["layers"])
        if (l.contains("experts_after")) l["experts_after"] = nullptr;
      summary["params"]["after"] = nullptr;
      summary["params"]["active_after"] = nullptr;
    }
    return summary;
  }


}

// A whole-model pass (Pass::model_scope, alone in its recipe: check_run) on the input model's
// statistics, before the layer loop; its report goes under "plans".
void run_model_passes(RunState& s) {
  for (const auto& p : s.r.passes) {
    if (!p->model_scope()) continue;
    const auto t0 = std::chrono::steady_clock::now();
    json rep = json::object();
    core::with_context(p->name() + " " + p->method(), [&] { p->run_model(s.model, *s.stats, rep); });
    if (s.r.output.materialize && rep.contains("expert_params_stored")) {  // each layer's copy is written
      rep["expert_params_stored"] = rep["expert_params_logical"];
      rep["materialized"] = true;
    }
    rep["pass"] = p->name();
    rep["method"] = p->method();
    rep["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    s.plan_reports.push_back(rep);
  }
}

// Writes one group of tensors (a layer's, the globals) through the sink, counting it per tensor class.
// Every written tensor is checked for NaN/Inf by the writer (io::CheckpointWriter), so a pass
// that copies weights without converting them (prune by a clean model's statistics) cannot
// write a poisoned checkpoint either; the message names the input it came from.
void write_group(RunState& s, const std::vector<model::OutTensor>& list) {
  model::account_into(s.acc_after, list);
  for (const auto& o : list)
    if (!o.weight.empty()) s.weight_class[o.weight] = o.cls;
  core::with_context(s.r.model.string(), [&] { s.sink->write(list); });
}

// The layer loop: the calibration hidden states (and a first pass's planning sweep), then per layer
// the passes, the propagating forward and the write; then the multi-token-prediction layers.
// Memory: one layer plus the calibration hidden states.
void run_layers(RunState& s) {
  Recipe& r = s.r;
  const io::Checkpoint& ckpt = s.ckpt;
  const RunOptions& opts = s.opts;
  model::Model& model = s.model;
  const model::Model& original = s.original;
  const model::Model& planned = *s.planned;
  const auto& counts = s.counts;
  const std::optional<calib::Stats>& stats = s.stats;
  Sink* sink = s.sink.get();
  const bool needs_inputs = s.needs_inputs, needs_grams = s.needs_grams, needs_layer_inputs = s.needs_layer_inputs,
             shapes_at_run = s.shapes_at_run, moe_only = s.moe_only;
  const auto& outs_after = s.outs_after;
  json& plan_reports = s.plan_reports;
  json& manifest = s.manifest;
  const model::OutputOptions& out_opts = s.out_opts;
  json& layer_reports = s.layer_reports;
  int64_t &params_fix = s.params_fix, &active_fix = s.active_fix;
  // Calibration hidden states when a pass runs the block on real inputs.
  std::optional<runtime::Forward> fwd;
  runtime::MatrixRM X;
  int64_t T = 0;
  std::vector<int32_t> tokens;  // the windows' tokens (the MTP layer's inputs are made from them too)
  if (needs_inputs) {
    const CalibrationTokens ct = calibration_tokens(r.model, r.calibration);
    T = ct.ctx;
    tokens = ct.tokens;
    fwd.emplace(model);
    fwd->set_stream_experts(true);  // a layer holds a few experts in f32, not all (docs/memory.md)
    X = fwd->embed(ct.tokens);
  }
  // The same windows through the input model, unchanged (Requirements::reference_inputs).
  std::optional<runtime::Forward> ref_fwd;
  runtime::MatrixRM X_ref;
  if (fwd && s.needs_reference) {
    ref_fwd.emplace(original);
    ref_fwd->set_stream_experts(true);
    X_ref = X;
  }

  // The planning sweep of a pass that plans across layers on calibration inputs (the first pass
  // only, checked above): the windows through the input model, layer by layer, on a copy of the
  // hidden states.
  if (!r.passes.empty() && r.passes[0]->requirements().plan_sweep)
    plan_reports.push_back(plan_sweep(*r.passes[0], model, fwd ? &*fwd : nullptr, X, T, tokens, s.act_budget, opts.quiet));

  // Passes whose outputs' shapes are decided while they run (ranks, codes) write through spill
  // files; the others straight into the planned shards.
  if (shapes_at_run) {
    sink->begin(ckpt, std::nullopt);
  } else {
    std::vector<io::TensorSpec> plan;
    for (const auto& o : outs_after) plan.push_back({o.name, o.dtype, o.shape});
    sink->begin(ckpt, plan);
  }
  // What the passes make (encodings, factors, merged experts: Tensor::zeros of 64 KiB or more, or of
  // the activation budget when that is smaller) lives in a temporary file beside the output, its
  // pages handed back every 64 MiB (or budget) made and once written, so a layer's output does not
  // sit in memory whole while the layer is worked on (docs/memory.md).
  std::optional<io::SpillArena> arena;
  std::optional<core::ScopedTensorArena> arena_scope;
  if (!r.passes.empty()) {
    const uint64_t budget = needs_grams ? s.act_budget.bytes : UINT64_MAX;
    arena.emplace(io::fs::absolute(r.output.path).parent_path(), std::min<uint64_t>(budget, uint64_t{64} << 10),
                  std::min<uint64_t>(budget, uint64_t{64} << 20));
    arena_scope.emplace(&*arena);
  }
  // Layer by layer into one output: a part shared across layers is written once.
  s.out_opts = output_options(r);
  s.out_opts.shared_parts = std::make_shared<model::SharedPartNames>();
  auto release = [&](const core::Tensor& t) {
    for (const core::Tensor* p : t.stored_tensors()) ckpt.release_range(p->data(), p->nbytes());
  };
  auto write_outputs = [&](const std::vector<model::OutTensor>& list) { write_group(s, list); };
  const calib::Stats::SuperThresholds super_th = stats ? stats->super_thresholds() : calib::Stats::SuperThresholds{};
  // Progress in hundredths of a layer: each layer's steps (calibration forward, each pass, the
  // propagating forward, the write) move it, so it shows before the first layer is done.
  constexpr uint64_t kPart = 100;
  core::Progress progress("layers", static_cast<uint64_t>(model.layers().size()) * kPart, "layers", opts.quiet, kPart);
  for (auto& layer : model.layers()) {
    const int l = layer.index;
    json lr = {{"layer", l}};
    uint64_t passes_here = 0;
    for (const auto& p : r.passes) passes_here += layer.moe || !p->moe_layers_only();
    const uint64_t steps = 1 + (fwd ? 2 : 0) + passes_here;  // write, forwards, passes
    uint64_t shown = 0, step = 0;
    auto step_done = [&] {
      const uint64_t now = ++step * kPart / steps;
      progress.add(now - shown);
      shown = now;
    };
    if (fwd && l == runtime::adopted_mtp_layer(model)) {
      // The multi-token-prediction layer (runtime/mtp.h): its input from the decoder's last hidden
      // states and the shifted embeddings of the same windows, T - 1 positions per window.
      auto in = runtime::mtp_layer_input(*fwd, tokens, X, T);
      if (ref_fwd) X_ref = runtime::mtp_layer_input(*ref_fwd, tokens, X_ref, T).x;
      X = std::move(in.x);
      T = in.T;
    }
    BlockInputCapture ref_capture;
    if (ref_fwd) {
      runtime::Observer* ro[] = {&ref_capture};
      ref_fwd->apply_layer(ref_fwd->load_layer(l), X_ref, T, ro);
    }
    if (layer.moe || !moe_only) {
      BlockInputCapture capture;
      GramCapture grams(s.act_budget);
      runtime::MatrixRM X_in;
      if (fwd) {
        if (r.calibration.propagate || needs_layer_inputs) X_in = X;  // the layer's input stream
        std::vector<runtime::Observer*> obs = {&capture};
        if (needs_grams) obs.push_back(&grams);
        fwd->apply_layer(fwd->load_layer(l), X, T, obs);
        step_done();
      }
      json pass_reports = json::array();
      for (size_t i = 0; i < r.passes.size(); ++i) {
        if (!layer.moe && r.passes[i]->moe_layers_only()) continue;
        json pr;
        const Requirements req = r.passes[i]->requirements();
        const calib::LayerStats* st = nullptr;
        std::optional<calib::LayerStats> fresh;
        // Routing statistics exist for MoE layers only: a pass that also runs on dense layers
        // (quantize) gets none there.
        if (!req.stats_fields.empty() && i == 0 && stats && layer.moe) st = &stats->layers.at(l);  // none with task subsets
        if (!req.stats_fields.empty() && i > 0 && layer.moe) {
          fresh = recompute_stats(model, l, layer, req, capture.x, T, r.calibration, runtime::RoutingRule::from_model(model));
          if (stats)
            fresh->super_expert = calib::Stats::super_flags(super_th, *fresh, l, static_cast<int>(model.dims().layers));
          st = &*fresh;
          pr["statistics"] = "recomputed on the experts left by the earlier passes";
        }
        if (req.input_grams && i > 0 && layer.moe && fwd)  // the experts an earlier pass left
          recompute_moe_grams(grams.grams, runtime::convert_moe(*layer.moe), runtime::RoutingRule::from_model(model),
                              capture.x, s.act_budget);
        LayerContext ctx{l, model, layer, st, fwd ? &capture.x : nullptr, runtime::RoutingRule::from_model(model),
                         r.seed * 1000003ull + static_cast<uint64_t>(l) * 7919ull + i, pr,
                         needs_grams && fwd ? &grams.grams : nullptr,
                         needs_layer_inputs && fwd ? &X_in : nullptr, T, ref_fwd ? &ref_capture.x : nullptr};
        core::with_context("layer " + std::to_string(l) + ": " + r.passes[i]->name() + " " + r.passes[i]->method(),
                           [&] { r.passes[i]->run_layer(ctx); });
        pr["pass"] = r.passes[i]->name();
        pr["method"] = r.passes[i]->method();
        pass_reports.push_back(pr);
        step_done();
        if (layer.moe && layer.moe->num_experts() != counts[i + 1][static_cast<size_t>(l)])
          throw Error::internal("layer " + std::to_string(l) + ": pass " + r.passes[i]->name() + " left " +
                                std::to_string(layer.moe->num_experts()) + " experts, planned " +
                                std::to_string(counts[i + 1][static_cast<size_t>(l)]));
      }
      lr["passes"] = pass_reports;
      if (needs_grams && layer.moe && fwd) {
        s.act_largest = std::max(s.act_largest, grams.grams.activation_bytes());
        s.act_spilled_layers += grams.grams.spilled();
      }
      if (layer.moe) {
        lr["experts_before"] = counts.front()[static_cast<size_t>(l)];
        lr["experts_after"] = layer.moe->num_experts();
        lr["origin"] = compose_origin(counts.front()[static_cast<size_t>(l)], layer.moe->num_experts(), pass_reports);
      } else {
        lr["dense"] = true;  // a dense MLP a pass ran on (quantize, factorize --targets dense)
      }
      if (fwd && r.calibration.propagate) {
        X = std::move(X_in);
        // Over MPI ranks every rank now holds the whole compressed layer (split passes exchanged
        // their results): each runs the routed experts it owns and the outputs are exchanged
        // (Forward::set_split_experts), the same hidden states bit for bit. No observer here.
        fwd->set_split_experts(true);
        fwd->apply_layer(fwd->load_layer(l), X, T);
        fwd->set_split_experts(false);
        step_done();
      }
    } else {
      lr["dense"] = true;  // a dense MLP: no pass applies
      if (fwd) fwd->apply_layer(fwd->load_layer(l), X, T);
    }
    if (layer.moe) {
      // Novices are decided while the pass runs (the plan keeps every slot a real expert): count
      // the layer as it is written, as inspect counts the output.
      int64_t got = 0, want = 0;
      layer.for_each_tensor([&](const core::Tensor& t) { got += t.numel(); });
      const model::Layer& pl = planned.layers().at(static_cast<size_t>(l));
      pl.for_each_tensor([&](const core::Tensor& t) { want += t.numel(); });
      params_fix += got - want;
      active_fix += (got - layer.moe->inactive_params(model.dims().top_k)) -
                    (want - (pl.moe ? pl.moe->inactive_params(planned.dims().top_k) : 0));
    }
    write_outputs(model.layer_outputs(l, out_opts, &manifest));
    // The layer is on disk: drop its computed tensors and the mapped pages of its source weights,
    // the ones no output carried too (experts a pass read and dropped or merged), so memory stays
    // one layer.
    if (layer.moe) {
      for (auto& e : layer.moe->experts) e = model::Mlp{};
    }
    if (shapes_at_run) layer = model::Layer{l, {}, std::nullopt, std::nullopt};  // encoded parts: dropped too
    original.layers().at(static_cast<size_t>(l)).for_each_tensor(release);
    layer_reports.push_back(lr);
    progress.add(kPart - shown);  // the rest of the layer (its write, and forwards not run)
  }
  progress.finish();
  if (arena) s.made_spilled = arena->bytes_allocated();
}

// Globals and pass-through tensors, the sub-1-bit dictionary, config.json, and the sink's finish
// (the export formats convert their staged output here); the notes the report carries.
void write_globals(RunState& s) {
  Recipe& r = s.r;
  model::Model& model = s.model;
  const model::Model& original = s.original;
  const model::Model& planned = *s.planned;
  Sink* sink = s.sink.get();
  json& summary = s.summary;
  json& global_reports = s.global_reports;
  json& manifest = s.manifest;
  const model::OutputOptions& out_opts = s.out_opts;
  const json& layer_reports = s.layer_reports;
  // Globals and pass-through tensors: everything not written with a layer (this includes
  // per-layer tensors the family does not describe, such as rotary_emb.inv_freq buffers, and
  // the MTP layer's own tensors: enorm, hnorm, eh_proj, shared_head; its block is layer L).
  for (const auto& p : r.passes) {
    json gr;
    core::with_context("globals: " + p->name() + " " + p->method(), [&] { p->run_globals(model, gr); });
    if (!gr.is_null()) {
      gr["pass"] = p->name();
      gr["method"] = p->method();
      global_reports.push_back(gr);
    }
  }
  write_group(s, model.global_outputs(out_opts, &manifest));
  for (size_t i = 0; i < r.passes.size(); ++i)
    for (const auto& w : r.passes[i]->run_warnings())
      summary["warnings"].push_back(r.passes.size() == 1 ? w : "passes[" + std::to_string(i) + "]: " + w);
  if (SpillWriter* spill = sink->spill()) {
    // Weights waiting for the checkpoint's sub-1-bit dictionary (pipeline/model_dictionary.h).
    const json s1 = code_with_model_dictionary(*spill, manifest, s.weight_class, s.acc_after);
    if (!s1.is_null()) summary["sub1bit"] = s1;
  }
  // config.json (the side files are copied by the sink).
  json& new_config = s.new_config;
  new_config = planned.rewritten_config(out_opts, &manifest);
  if (new_config.contains("quantization_config") && new_config["quantization_config"].contains("experts_per_layer"))
  {
    new_config["quantization_config"]["keep_map"] = keep_map(layer_reports, model.dims().layers);
    // The range of the keep-map's ids: the expert counts of this run's input (0: dense layer).
    json input_counts = json::array();
    for (const auto& l : original.layers()) input_counts.push_back(l.moe ? l.moe->num_experts() : 0);
    new_config["quantization_config"]["input_experts_per_layer"] = input_counts;
  }
  sink->set_keep_map(keep_map(layer_reports, model.dims().layers));
  s.written = sink->finish(new_config);
  const SinkResult& written = s.written;
  json& notes = s.notes;
  notes = json::array();
  if (!s.format_note.empty()) notes.push_back(s.format_note);
  const json& old_config = original.config().json();
  if (old_config.value("n_group", 1) > 1 && new_config.value("n_group", 1) == 1)
    notes.push_back("config: n_group " + old_config.at("n_group").dump() + " -> 1 and topk_group " +
                    old_config.value("topk_group", json(1)).dump() +
                    " -> 1: the expert count changed, so the trained expert groups are gone; the written "
                    "model routes plain top-k over its experts (group-limited routing not preserved)");
  if (s.tasks.is_null()) {  // the input's task subsets, where this run leaves them true
    std::string tasks_note;
    s.inherited_tasks = inherited_task_subsets(s.ckpt, layer_reports, tasks_note);
    if (!tasks_note.empty()) notes.push_back(tasks_note);
  }
  if (r.eval && written.format == "gguf" && s.ckpt.gguf())
    notes.push_back("eval: measured on the native output staged beside the GGUF file, whose weights were dequantized from "
                    "the input's blocks and stored as " + new_config.value("torch_dtype", std::string("the config's dtype")) +
                    "; the file holds the kept experts' blocks as stored, so its numbers differ from these by that rounding");
  else if (r.eval && written.format == "gguf")
    notes.push_back("eval: measured on the native output the GGUF file was converted from; int4/int8 groups of 32 are "
                    "copied into q4_0/q8_0 blocks as they are, but tensors rounded to " + r.key("output.type") + " " +
                    r.output.type + " in the file were measured before that rounding");

}

// Evaluates the written checkpoint (still in the temporary folder; the export formats' staged
// native output) against the input, and checks the quality gates: the written model is kept
// either way; the report and the summary say which bounds it missed (the CLI exits 3 then).
void evaluate_output(RunState& s) {
  const Recipe& r = s.r;
  io::Env& env = s.env;
  const RunOptions& opts = s.opts;
  const model::Model& original = s.original;
  Sink* sink = s.sink.get();
  json& eval_json = s.eval_json;
  if (r.eval) {
    const io::Checkpoint written_ckpt = io::Checkpoint::open(env, sink->native_dir());
    const model::Model written_model = model::Model::load(written_ckpt);
    eval::EvalOptions eo;
    eo.ctx = r.eval->ctx;
    eo.max_windows = r.eval->max_windows;
    eo.quiet = opts.quiet;
    eo.ctx_name = r.key("eval.ctx");
    eo.max_windows_name = r.key("eval.max_windows");
    eval::check_context(original, eo.ctx, false, eo.ctx_name, "");
    const std::string text = eval::read_text(r.eval->text);  // its errors name the file
    const auto windows = core::with_context(r.eval->text.string(),
                                            [&] { return eval::make_windows(eval::load_tokenizer(r.model), text, eo); });
    if (r.eval->against_input) {
      // Experts matched through the whole recipe's origin (every pass composed).
      const std::optional<eval::ExpertOrigin> origin = eval::origin_from_layers(s.layer_reports, "run report");
      const auto c = eval::compare(original, written_model, windows, eo, origin ? &*origin : nullptr);
      eval_json = {{"text", r.eval->text.string()}, {"ctx", eo.ctx}, {"windows", windows.windows},
                   {"tokens_scored", c.tokens}, {"perplexity_before", c.reference.perplexity()},
                   {"perplexity_after", c.model.perplexity()}, {"kl_mean", c.mean_kl()},
                   {"top1_agreement", c.top1_agreement()},
                   {"routing_agreement", c.routing.to_json(origin ? "run origin" : "by index")},
                   {"convention", windows.convention}};
    } else {
      const auto p = eval::perplexity(written_model, windows, eo);
      eval_json = {{"text", r.eval->text.string()}, {"ctx", eo.ctx}, {"windows", windows.windows},
                   {"tokens_scored", p.tokens_scored}, {"perplexity_after", p.perplexity()}, {"convention", windows.convention}};
    }
    if (!s.tasks.is_null()) {  // and once per task, over that task's experts only
      const std::optional<eval::ExpertOrigin> origin = eval::origin_from_layers(s.layer_reports, "run report");
      eval_json["tasks"] = evaluate_tasks(s.tasks, original, written_model, windows, eo, r.eval->against_input,
                                          origin ? &*origin : nullptr);
    }
  }

  // Quality gates: the written model is kept either way; the report and the summary say which
  // bounds it missed (the CLI exits 3 then).
  json& gate = s.gate;
  if (r.eval && r.eval->has_gates()) gate = check_quality_gates(*r.eval, eval_json);

}

// The report's "mpi" section of a run over several ranks (null for one process): the ranks, and
// per layer the exchange of the split passes (their reports' "mpi" entries, as rank 0 measured).
json mpi_report(const json& layer_reports) {
  const runtime::mpi::World& world = runtime::mpi::World::get();
  if (!world.split()) return nullptr;
  json layers = json::array();
  uint64_t sent = 0, gathered = 0;
  double seconds = 0, encode = 0;
  for (const json& lr : layer_reports) {
    if (!lr.contains("passes")) continue;
    for (const json& pr : lr.at("passes")) {
      if (!pr.contains("mpi")) continue;
      const json& m = pr.at("mpi");
      layers.push_back({{"layer", lr.at("layer")}, {"pass", pr.at("pass")}, {"bytes_sent", m.at("bytes_sent")},
                        {"bytes_gathered", m.at("bytes_gathered")}, {"seconds", m.at("seconds")},
                        {"encode_seconds", m.at("encode_seconds")}});
      sent += m.at("bytes_sent").get<uint64_t>();
      gathered += m.at("bytes_gathered").get<uint64_t>();
      seconds += m.at("seconds").get<double>();
      encode += m.at("encode_seconds").get<double>();
    }
  }
  const double n = layers.empty() ? 1.0 : static_cast<double>(layers.size());
  // The rest of this rank's traffic: the forwards' routed experts split (Forward::set_split_experts:
  // the statistics' forward and the propagating one), their outputs exchanged.
  const runtime::mpi::Traffic& t = world.traffic();
  const uint64_t forward_gathered = t.bytes_gathered > gathered ? t.bytes_gathered - gathered : 0;
  const int64_t forward_exchanges = std::max<int64_t>(0, t.exchanges - static_cast<int64_t>(layers.size()));
  return {{"ranks", world.size()},
          {"rank_writing", 0},
          {"exchanges", layers.size()},
          {"forward_exchanges", forward_exchanges},
          {"forward_bytes_gathered", forward_gathered},
          {"bytes_sent_per_layer", static_cast<double>(sent) / n},
          {"bytes_gathered_per_layer", static_cast<double>(gathered) / n},
          {"seconds_per_layer", seconds / n},
          {"encode_seconds_per_layer", encode / n},
          {"layers", layers},
          {"note", "bytes_sent: rank 0's encodings times the ranks receiving them; bytes_gathered: every rank's "
                   "encodings of the layer, which each rank holds after the exchange; seconds: rank 0's wall time in "
                   "the exchange, waiting for slower ranks included; encode_seconds: rank 0's time encoding its share"}};
}

// The report (moe_tool_report.json where the format has room for it), the commit, and the summary.
json write_run_report(RunState& s) {
  const Recipe& r = s.r;
  const RunOptions& opts = s.opts;
  const io::Checkpoint& ckpt = s.ckpt;
  const model::Model& original = s.original;
  const model::Model& planned = *s.planned;
  Sink* sink = s.sink.get();
  json& summary = s.summary;
  const json &passes = s.passes, &layer_reports = s.layer_reports, &plan_reports = s.plan_reports,
             &global_reports = s.global_reports, &eval_json = s.eval_json, &gate = s.gate, &notes = s.notes;
  const SinkResult& written = s.written;
  const uint64_t written_bytes = written.tensor_bytes;
  const std::optional<calib::Stats>& stats = s.stats;
  const auto& acc_after = s.acc_after;
  const int64_t params_fix = s.params_fix, active_fix = s.active_fix;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - s.t0).count();
  summary["params"]["after"] = planned.total_params() + params_fix;
  summary["params"]["active_after"] = planned.active_params() + active_fix;
  json report = make_report(opts.command, ckpt, original, planned, written, secs);
  report["params"] = summary["params"];
  const auto acc_before = model::account(original.outputs());
  report["tensor_classes"] = {{"before", model::account_json(acc_before)}, {"after", model::account_json(acc_after)}};
  // Both sides as the experts class of the outputs (every stored byte: expert biases, shared parts
  // once), the input's as stored (GGUF blocks, GPTQ / AWQ / compressed-tensors codes, MXFP4).
  model::OutputOptions stored;
  stored.as_stored = true;
  if (const auto acc = model::account(original.outputs(stored)); acc.count("experts"))
    report["expert_bits_per_param"]["before"] = acc.at("experts").bits_per_param();
  // After: the written folder's own when a packed format counted it (sink.cpp), else the outputs'.
  if (written.details.contains("expert_bits_per_param") && !written.details["expert_bits_per_param"].is_null())
    report["expert_bits_per_param"]["after"] = written.details["expert_bits_per_param"];
  else if (acc_after.count("experts"))
    report["expert_bits_per_param"]["after"] = acc_after.at("experts").bits_per_param();
  if (summary.contains("sub1bit")) report["sub1bit"] = summary["sub1bit"];
  report["recipe"] = r.json;
  report["passes"] = passes;
  report["layers"] = layer_reports;
  if (!plan_reports.empty()) report["plans"] = plan_reports;
  if (!global_reports.empty()) report["globals"] = global_reports;
  report["calibration"] = {{"text", r.calibration.text.string()}, {"stats", r.calibration.stats.string()},
                           {"ctx", r.calibration.ctx}, {"windows", r.calibration.windows},
                           {"propagate", r.calibration.propagate}, {"seed", r.seed}};
  if (stats && !r.calibration.stats.empty()) {
    // Statistics from a file: what they were computed on, from the file (not the run's defaults).
    auto num = [&](const char* k) -> json {
      const std::string v = stats->meta(k);
      try {
        return v.empty() ? json(nullptr) : json(std::stoll(v));
      } catch (...) {
        return json(v);
      }
    };
    const json file = {{"ctx", num("ctx")}, {"windows", num("windows")}, {"tokens", num("tokens")},
                       {"out_stride", num("out_stride")}, {"sample", stats->meta("sample")}, {"seed", num("seed")},
                       {"text_sha256", stats->meta("text_sha256")}};
    report["calibration"]["stats_file"] = file;
    if (r.calibration.text.empty()) {  // no text: the run's ctx and windows are the file's
      report["calibration"]["ctx"] = file["ctx"];
      report["calibration"]["windows"] = file["windows"];
    }
  }
  if (summary.contains("memory")) {
    report["memory"] = summary["memory"];
    report["memory"]["largest_layer_activation_bytes"] = s.act_largest;
    report["memory"]["layers_spilled"] = s.act_spilled_layers;
    report["memory"]["pass_output_bytes_spilled"] = s.made_spilled;
  }
  if (!s.tasks.is_null()) report["tasks"] = s.tasks;
  else if (!s.inherited_tasks.is_null()) report["tasks"] = s.inherited_tasks;
  if (!eval_json.is_null()) report["eval"] = eval_json;
  if (!gate.is_null()) report["quality_gate"] = gate;
  if (!notes.empty()) report["notes"] = notes;
  summary["bytes"]["after"] = written_bytes;
  size_warning(summary);
  if (!summary["warnings"].empty()) report["warnings"] = summary["warnings"];
  report["output"] = written.to_json();
  if (const json mpi = mpi_report(layer_reports); !mpi.is_null()) {
    report["mpi"] = mpi;
    summary["mpi"] = {{"ranks", mpi["ranks"]}, {"exchanges", mpi["exchanges"]},
                      {"forward_bytes_gathered", mpi["forward_bytes_gathered"]},
                      {"bytes_gathered_per_layer", mpi["bytes_gathered_per_layer"]},
                      {"seconds_per_layer", mpi["seconds_per_layer"]}};
  }
  const io::fs::path report_path = sink->write_report(report);
  sink->commit();
  if (!eval_json.is_null()) summary["eval"] = eval_json;
  if (!gate.is_null()) summary["quality_gate"] = gate;
  summary["layers"] = layer_reports;
  if (!plan_reports.empty()) summary["plans"] = plan_reports;
  summary["seconds"] = secs;
  summary["report"] = report_path.empty() ? json() : json(report_path.string());
  if (written.format != "hf") summary["output_format"] = written.to_json();
  if (!notes.empty()) summary["notes"] = notes;
  return summary;
}

}  // namespace

json check_quality_gates(const EvalSpec& spec, const json& eval_json) {
  json bounds = json::object(), failed = json::array();
  auto fmt = [](double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.6g", v);
    return std::string(buf);
  };
  if (spec.max_ppl_ratio) {
    const double before = eval_json.at("perplexity_before").get<double>(), after = eval_json.at("perplexity_after").get<double>();
    const double ratio = after / before;
    bounds["max_ppl_ratio"] = *spec.max_ppl_ratio;
    if (!(ratio <= *spec.max_ppl_ratio))
      failed.push_back("eval.max_ppl_ratio " + fmt(*spec.max_ppl_ratio) + ": perplexity ratio " + fmt(ratio) + " (" +
                       fmt(after) + " vs " + fmt(before) + " of the input)");
  }
  if (spec.max_kl) {
    const double kl = eval_json.at("kl_mean").get<double>();
    bounds["max_kl"] = *spec.max_kl;
    if (!(kl <= *spec.max_kl))
      failed.push_back("eval.max_kl " + fmt(*spec.max_kl) + ": mean KL " + fmt(kl) + " nats/token");
  }
  if (spec.min_top1) {
    const double top1 = eval_json.at("top1_agreement").get<double>();
    bounds["min_top1"] = *spec.min_top1;
    if (!(top1 >= *spec.min_top1))
      failed.push_back("eval.min_top1 " + fmt(*spec.min_top1) + ": top-1 agreement " + fmt(top1));
  }
  return {{"passed", failed.empty()}, {"bounds", bounds}, {"failed", failed}};
}

json run_recipe(Recipe& r, const RunOptions& opts) {
  const auto t0 = std::chrono::steady_clock::now();
  auto& env = io::Env::posix();
  const io::Checkpoint ckpt = io::Checkpoint::open(env, r.model);
  model::Model model = model::Model::load(ckpt);
  runtime::adopt_mtp_layer(model);  // the MTP layer's MoE block as layer L, like any MoE layer (pipeline/mtp.h)
  RunState s(r, opts, env, ckpt, model);
  s.t0 = t0;
  check_run(s);
  // The output exists from here on, so nothing can take its place unnoticed while the statistics
  // are computed.
  const runtime::mpi::World& world = runtime::mpi::World::get();
  if (!opts.dry_run) s.sink = world.rank() == 0 ? make_sink(env, r, run_inputs(r)) : std::make_unique<DiscardSink>();
  load_statistics(s);
  plan_run(s);
  if (opts.dry_run) return dry_run_summary(s);
  run_model_passes(s);
  run_layers(s);
  // The other ranks of an MPI run: their share of the layers is done, rank 0 writes the rest.
  if (world.rank() != 0) return json::object();
  write_globals(s);
  evaluate_output(s);
  return write_run_report(s);
}

std::string render_run_summary(const json& s) {
  std::ostringstream o;
  const bool dry = s.value("dry_run", false);
  o << (dry ? "plan (dry run, nothing computed or written)\n" : "done\n");
  o << "  model    " << s.at("model").get<std::string>() << " (" << s.at("family").get<std::string>() << ")\n";
  for (const auto& p : s.at("passes"))
    o << "  pass     " << p.at("pass").get<std::string>() << " " << p.at("method").get<std::string>() << " "
      << p.at("params").dump() << "\n";
  o << "  experts  ";
  for (const auto& l : s.at("layers")) {
    o << "L" << l.at("layer").get<int>() << " ";
    if (l.value("dense", false)) o << "dense  ";
    else if (l.at("experts_after").is_null()) o << l.at("experts_before").get<int64_t>() << "->?  ";
    else o << l.at("experts_before").get<int64_t>() << "->" << l.at("experts_after").get<int64_t>() << "  ";
  }
  const json& params = s.at("params");
  const bool at_run = params.at("after").is_null();
  const char* decided = "decided while the pass runs (after calibration)";
  if (at_run) o << "(counts " << decided << ")";
  o << "\n";
  o << "  params   " << params.at("before").get<int64_t>() << " -> ";
  if (at_run) o << decided << " (active per token " << params.at("active_before").get<int64_t>() << ")\n";
  else
    o << params.at("after").get<int64_t>() << " (active per token " << params.at("active_before").get<int64_t>() << " -> "
      << params.at("active_after").get<int64_t>() << ")\n";
  o << "  bytes    " << core::format_bytes(s.at("bytes").at("before").get<double>()) << " -> "
    << (s.at("bytes").at("after").is_null() ? std::string("decided while the passes run (data-dependent ranks or codes)")
                                            : core::format_bytes(s.at("bytes").at("after").get<double>()))
    << "\n";
  if (dry && s.contains("disk"))
    o << "  disk     needs about " << core::format_bytes(s.at("disk").at("needs").get<double>()) << ", "
      << core::format_bytes(s.at("disk").at("free").get<double>()) << " free on the output's file system\n";
  if (s.contains("tasks")) {  // task subsets: the union of the tasks' keep sets per layer
    std::string names;
    for (const auto& n : s.at("tasks").at("names")) names += (names.empty() ? "" : ", ") + n.get<std::string>();
    o << "  tasks    " << names << "; union of their experts per layer:";
    for (const auto& u : s.at("tasks").at("union")) o << " L" << u.at("layer").get<int>() << " " << u.at("union").get<int>();
    o << " (written " << s.at("tasks").at("experts_per_layer").get<int>() << " per layer)\n";
  }
  for (const auto& p : s.value("plans", json::array()))  // cross-layer sharing (pass share): its pools
    if (p.contains("pools") && p.at("pools").is_array())
      o << "  pools    " << p.at("pools").size() << " experts pooled across adjacent layers; expert parameters "
        << p.at("expert_params_logical").dump() << " logical, " << p.at("expert_params_stored").dump() << " stored"
        << (p.value("materialized", false) ? " (output.materialize: each layer's copy written)" : "") << "\n";
  for (const auto& c : s.at("computes")) o << "  computes " << c.get<std::string>() << "\n";
  if (s.contains("mpi")) {  // a run over MPI ranks (runtime/mpi.h)
    const json& m = s.at("mpi");
    char buf[200];
    const double fwd = m.value("forward_bytes_gathered", 0.0);
    if (m.at("exchanges").get<int64_t>() == 0 && fwd > 0)
      std::snprintf(buf, sizeof buf, "%d ranks: every pass ran on each rank; the forward's routed experts were split (%s of "
                    "expert outputs exchanged)", m.at("ranks").get<int>(), core::format_bytes(fwd).c_str());
    else if (m.at("exchanges").get<int64_t>() == 0)
      std::snprintf(buf, sizeof buf, "%d ranks, nothing split: every pass ran on each rank (no faster than one process)",
                    m.at("ranks").get<int>());
    else
      std::snprintf(buf, sizeof buf, "%d ranks split the routed experts; %s of encodings exchanged per layer in %.3g s",
                    m.at("ranks").get<int>(), core::format_bytes(m.at("bytes_gathered_per_layer").get<double>()).c_str(),
                    m.at("seconds_per_layer").get<double>());
    o << "  mpi      " << buf << "\n";
  }
  for (const auto& n : s.value("notes", json::array())) o << "  note     " << n.get<std::string>() << "\n";
  for (const auto& w : s.value("warnings", json::array())) o << "  warning  " << w.get<std::string>() << "\n";
  if (!dry) {
    o << "  output   " << s.at("output").get<std::string>();
    if (s.contains("output_format")) o << " (" << s.at("output_format").at("format").get<std::string>() << ")";
    if (s.at("report").is_null()) o << " (report: in this summary only; a GGUF file holds none: use --json)\n";
    else o << " (report: " << s.at("report").get<std::string>() << ")\n";
  }
  if (s.contains("eval")) {
    const auto& e = s.at("eval");
    char buf[256];
    if (e.contains("perplexity_before"))
      std::snprintf(buf, sizeof buf, "perplexity %.3f -> %.3f (%+.2f%%), KL %.4g nats/token, top-1 agreement %.2f%%",
                    e.at("perplexity_before").get<double>(), e.at("perplexity_after").get<double>(),
                    100.0 * (e.at("perplexity_after").get<double>() / e.at("perplexity_before").get<double>() - 1.0),
                    e.at("kl_mean").get<double>(), 100.0 * e.at("top1_agreement").get<double>());
    else
      std::snprintf(buf, sizeof buf, "perplexity %.3f", e.at("perplexity_after").get<double>());
    std::string routing;
    if (e.contains("routing_agreement") && e.at("routing_agreement").contains("agreement")) {
      char rb[96];
      std::snprintf(rb, sizeof rb, ", routing agreement %.2f%%",
                    100.0 * e.at("routing_agreement").at("agreement").get<double>());
      routing = rb;
    }
    o << "  eval     " << buf << routing << "\n           on " << e.at("tokens_scored").get<int64_t>() << " tokens of "
      << e.at("text").get<std::string>() << " (ctx " << e.at("ctx").get<int64_t>() << ", "
      << e.at("convention").get<std::string>() << ")\n";
  }
  if (s.contains("quality_gate")) {
    const json& g = s.at("quality_gate");
    if (g.at("passed").get<bool>()) o << "  gate     passed " << g.at("bounds").dump() << "\n";
    for (const auto& f : g.at("failed")) o << "  gate     FAILED " << f.get<std::string>() << " (checkpoint kept)\n";
  }
  return o.str();
}

}  // namespace moe::pipeline
