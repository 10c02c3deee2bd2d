#include "calib/calibrate.h"

#include <algorithm>
#include <chrono>
#include <optional>
#include <cmath>
#include <numeric>

#include "calib/stats_observer.h"
#include "core/error.h"
#include "core/progress.h"
#include "io/scratch.h"
#include "runtime/routing.h"
#include "runtime/forward.h"
#include "runtime/mpi.h"
#include "runtime/mtp.h"

namespace moe::calib {

using core::Error;

namespace {

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The model with its multi-token-prediction layer's decoder block as layer L (runtime/mtp.h), which
// calibrate runs after the decoder layers: `m` itself when it has none or it is adopted already,
// else a copy in `copy`.
const model::Model& with_mtp_layer(const model::Model& m, std::optional<model::Model>& copy) {
  if (m.mtp_moe_layers().empty() || runtime::adopted_mtp_layer(m) >= 0) return m;
  copy.emplace(m);
  runtime::adopt_mtp_layer(*copy);
  return *copy;
}

uint64_t layer_f32_bytes(const model::Layer& l) {
  int64_t n = 0;
  for (const auto& [role, t] : l.tensors) n += t.numel();
  if (l.moe) {
    n += l.moe->router.numel();
    for (const auto& e : l.moe->experts) n += e.params();
    if (l.moe->shared) n += l.moe->shared->params();
    if (l.moe->shared_gate) n += l.moe->shared_gate->numel();
  }
  if (l.mlp) n += l.mlp->params();
  return static_cast<uint64_t>(n) * 4u;
}

}  // namespace

std::vector<int64_t> choose_windows(int64_t available, int64_t n, Sample sample, uint64_t seed) {
  if (n == 0) n = available;
  if (n < 0) throw Error::invalid("--windows must be positive");
  if (n > available)
    throw Error::invalid("--windows " + std::to_string(n) + ": the text gives only " + std::to_string(available) +
                         " window(s) of --ctx tokens; ask for fewer windows, a shorter --ctx or a longer text");
  std::vector<int64_t> ids(available);
  std::iota(ids.begin(), ids.end(), 0);
  if (sample == Sample::Random) {
    uint64_t s = seed;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = i + static_cast<int64_t>(splitmix64(s) % static_cast<uint64_t>(available - i));
      std::swap(ids[i], ids[j]);
    }
  }
  ids.resize(n);
  std::sort(ids.begin(), ids.end());
  return ids;
}

bool routed_statistics_only(const model::Model& model, bool requested) {
  return requested || runtime::RoutingRule::from_model(model).scales_input;
}

CalibrationPlan plan_calibration(const model::Model& input, int64_t text_tokens, const CalibrateOptions& o) {
  std::optional<model::Model> copy;
  const model::Model& model = with_mtp_layer(input, copy);
  if (o.ctx < 1) throw Error::invalid("--ctx must be at least 1 (got " + std::to_string(o.ctx) + ")");
  if (o.batch_windows < 1) throw Error::invalid("--batch-windows must be at least 1");
  if (o.out_cos_tokens < 1) throw Error::invalid("--out-cos-tokens must be at least 1");
  if (o.out_stride < 1)
    throw Error::invalid("--out-stride must be at least 1 (got " + std::to_string(o.out_stride) + ")");
  if (!model.family().moe)
    throw Error::invalid("calibrate: " + model.family().model_type + " is a dense model (no experts to calibrate)");
  const int64_t maxpos = model.config().get_int_or("max_position_embeddings", 0);
  if (maxpos > 0 && o.ctx > maxpos)
    throw Error::invalid("--ctx " + std::to_string(o.ctx) + " exceeds the model's max_position_embeddings " +
                         std::to_string(maxpos));
  if (runtime::adopted_mtp_layer(model) >= 0 && o.ctx < 2)
    throw Error::invalid("--ctx " + std::to_string(o.ctx) + ": the multi-token-prediction layer (model.layers." +
                         std::to_string(runtime::adopted_mtp_layer(model)) +
                         ") pairs each position with the next token, so a window needs 2 tokens or more");
  CalibrationPlan p;
  p.windows_available = text_tokens / o.ctx;
  if (p.windows_available == 0)
    throw Error::invalid("the text has " + std::to_string(text_tokens) + " tokens, fewer than one window of --ctx " +
                         std::to_string(o.ctx) + "; use a longer text or a shorter --ctx");
  p.window_ids = choose_windows(p.windows_available, o.windows, o.sample, o.seed);
  p.tokens = static_cast<int64_t>(p.window_ids.size()) * o.ctx;
  const auto& d = model.dims();
  p.hidden_bytes = static_cast<uint64_t>(p.tokens) * static_cast<uint64_t>(d.hidden) * 4u;
  for (const auto& layer : model.layers()) {
    LayerLayout L;
    L.layer = layer.index;
    L.moe = layer.moe.has_value();
    L.hidden = d.hidden;
    L.gram = o.gram;
    L.all_token_stats = !o.routed_only;
    if (L.moe) {
      L.experts = layer.moe->num_experts();
      for (const auto& e : layer.moe->experts) L.expert_widths.push_back(e.width());
    }
    if (layer.mlp) L.mlp_width = layer.mlp->width();
    // o_proj's input width; a linear-attention layer's (qwen3_next) out_proj's.
    const auto* op = layer.find("o_proj") ? layer.find("o_proj") : layer.find("out_proj");
    L.attn_o_width = op ? op->dim(1) : d.heads * d.head_dim;
    p.layer_weight_bytes = std::max(p.layer_weight_bytes, layer_f32_bytes(layer));
    if (!L.moe && !L.gram) continue;
    p.gram_peak_bytes = std::max(p.gram_peak_bytes, gram_bytes(L));
    p.gram_total_bytes += gram_bytes(L);
    p.layout.push_back(L);
  }
  return p;
}

std::map<std::string, std::string> stats_metadata(const io::Checkpoint& ckpt, const model::Model& model,
                                                  const CalibrationPlan& plan, const std::string& text_sha256,
                                                  const CalibrateOptions& o) {
  std::map<std::string, std::string> m;
  m["model_fingerprint"] = ckpt.fingerprint();
  m["model_content"] = content_digest_text(ckpt.content_digests());
  m["text_sha256"] = text_sha256;
  m["ctx"] = std::to_string(o.ctx);
  m["windows"] = std::to_string(plan.window_ids.size());
  m["windows_available"] = std::to_string(plan.windows_available);
  m["tokens"] = std::to_string(plan.tokens);
  m["sample"] = o.sample == Sample::Random ? "random" : "first";
  m["seed"] = std::to_string(o.seed);
  if (o.sample == Sample::Random) {
    std::string ids;
    for (int64_t w : plan.window_ids) ids += (ids.empty() ? "" : ",") + std::to_string(w);
    m["window_ids"] = ids;
  }
  m["tool_version"] = MOE_TOOL_VERSION;
  m["family"] = model.family().model_type;
  m["num_layers"] = std::to_string(model.dims().layers);
  m["batch_windows"] = std::to_string(o.batch_windows);
  // out_cos_tokens: the sampled tokens out_cos was averaged over (every out_stride-th token).
  const int64_t sampled = (plan.tokens + o.out_stride - 1) / o.out_stride;
  m["out_cos_tokens"] = o.routed_only ? "0" : std::to_string(std::min(o.out_cos_tokens, sampled));
  m["out_stride"] = std::to_string(o.out_stride);
  m["gram"] = o.gram ? "true" : "false";
  m["routed_only"] = o.routed_only ? "true" : "false";
  m["prob_sum"] = "softmax_all_logits";
  return m;
}

CalibrateResult calibrate(const io::Checkpoint& ckpt, const model::Model& input, std::span<const int32_t> tokens,
                          const std::string& text_sha256, const CalibrateOptions& o, const std::filesystem::path& out) {
  const auto t0 = std::chrono::steady_clock::now();
  std::optional<model::Model> copy;
  const model::Model& model = with_mtp_layer(input, copy);
  CalibrateResult res;
  res.plan = plan_calibration(model, static_cast<int64_t>(tokens.size()), o);
  const CalibrationPlan& plan = res.plan;
  res.stats.metadata = stats_metadata(ckpt, model, plan, text_sha256, o);
  res.stats.metadata["format"] = "pt";

  runtime::Forward fwd(model);
  // A layer whose routed experts in f32 would take more than a quarter of the memory available is
  // streamed (runtime::Forward::set_stream_experts: each expert converted when the block runs it,
  // for every batch, and again by the statistics): slower, but a few experts in memory instead of
  // the layer. The statistics are the same bits either way.
  {
    uint64_t largest = 0;
    for (const auto& layer : model.layers()) {
      if (!layer.moe) continue;
      uint64_t n = 0;
      for (const auto& e : layer.moe->experts) n += static_cast<uint64_t>(e.params()) * sizeof(float);
      largest = std::max(largest, n);
    }
    const uint64_t avail = io::available_memory();
    fwd.set_stream_experts(avail > 0 && largest > avail / 4);
  }
  const int64_t T = o.ctx, W = static_cast<int64_t>(plan.window_ids.size()), B = o.batch_windows;
  // L: the decoder layers, then the multi-token-prediction layer when the model has one (mtp).
  const int64_t L = static_cast<int64_t>(model.layers().size()), N = plan.tokens;
  const int mtp = runtime::adopted_mtp_layer(model);
  // Hidden states of every window, in batches of B windows (window-major rows), and their tokens.
  std::vector<runtime::MatrixRM> X;
  std::vector<std::vector<int32_t>> batch_tokens;
  for (int64_t w0 = 0; w0 < W; w0 += B) {
    std::vector<int32_t>& buf = batch_tokens.emplace_back();
    for (int64_t w = w0; w < std::min(W, w0 + B); ++w) {
      const auto* p = tokens.data() + plan.window_ids[w] * T;
      buf.insert(buf.end(), p, p + T);
    }
    X.push_back(core::with_context("calibration text", [&] { return fwd.embed(buf); }));
  }

  // Over several MPI ranks (runtime/mpi.h) the routed experts of each layer are split between the
  // ranks, in the forward and in the statistics, and exchanged: every rank returns the single
  // process's statistics; rank 0 alone writes the file.
  const runtime::mpi::World& world = runtime::mpi::World::get();
  fwd.set_split_experts(true);
  // No path: the statistics are only returned (a run that collects them on the fly).
  std::optional<StatsWriter> writer;
  if (!out.empty() && world.rank() == 0) writer.emplace(io::Env::posix(), out, plan.layout, res.stats.metadata, o.inputs, o.force, o.force_name);
  ObserverOptions oo;
  oo.all_token_stats = !o.routed_only;
  oo.gram = o.gram;
  oo.out_cos_tokens = o.out_cos_tokens;
  oo.out_stride = o.out_stride;
  oo.split_experts = true;
  StatsObserver obs(oo);
  runtime::Observer* observers[] = {&obs};

  // Progress in whole-model tokens: a layer of a batch of n tokens counts n / L.
  core::Progress progress("calibrate (" + std::to_string(L) + " layers)", static_cast<uint64_t>(N), "tokens", o.quiet);
  uint64_t shown = 0;
  int64_t done_rows = 0;  // token-layers
  for (int64_t l = 0; l < L; ++l) {
    runtime::LayerWeights w = fwd.load_layer(static_cast<int>(l));
    // The MTP layer's inputs (runtime/mtp.h): T - 1 positions per window.
    if (l == mtp)
      for (size_t b = 0; b < X.size(); ++b) X[b] = runtime::mtp_layer_input(fwd, batch_tokens[b], X[b], T).x;
    int64_t offset = 0;
    for (auto& x : X) {
      obs.set_token_offset(offset);
      fwd.apply_layer(w, x, l == mtp ? T - 1 : T, observers);
      offset += x.rows();
      done_rows += x.rows();
      const uint64_t now = static_cast<uint64_t>(done_rows / L);
      if (now > shown) progress.add(now - shown);
      shown = now;
    }
    w = runtime::LayerWeights();  // release before writing
    auto st = obs.take_layer(static_cast<int>(l));
    auto g = obs.take_grams(static_cast<int>(l));
    const bool in_file = std::any_of(plan.layout.begin(), plan.layout.end(),
                                     [&](const LayerLayout& x) { return x.layer == l; });
    if (in_file && writer) writer->write_layer(static_cast<int>(l), st ? &*st : nullptr, g ? &*g : nullptr);
    if (st) {
      if (!o.keep_grams) {
        st->gram_in.clear();
        st->gram_mid.clear();
      }
      res.stats.layers[static_cast<int>(l)] = std::move(*st);
    }
    if (g && o.keep_grams) res.stats.grams[static_cast<int>(l)] = std::move(*g);
  }
  if (static_cast<uint64_t>(N) > shown) progress.add(static_cast<uint64_t>(N) - shown);
  progress.finish();
  if (writer) {
    writer->finish();
    res.file_bytes = writer->file_bytes();
  }
  res.stats.source = out;
  res.stats.flag_super_experts(static_cast<int>(model.dims().layers));
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return res;
}

}  // namespace moe::calib
