// The upcycle plan (passes/upcycle/plan.h): the sources opened, and the checks that run before
// anything is built or written — options, target family against the source's attention, numbers,
// sources against each other.
#include "passes/upcycle/plan.h"

#include <algorithm>

#include "core/encoding.h"
#include "core/error.h"
#include "passes/options.h"

namespace moe::passes::upcycling {

using core::Error;
using core::Tensor;
using nlohmann::json;
namespace fs = std::filesystem;

const std::vector<std::string>& methods() {
  static const std::vector<std::string> v = {
#define MOE_PASS(pass, method, description)
#define MOE_UPCYCLE(method, description) #method,
#include "passes/passes.def"
  };
  return v;
}

bool has_role(const model::Model& m, const std::string& role) {
  return !m.layers().empty() && m.layers().front().find(role) != nullptr;
}

namespace {

void open_sources(Plan& p, io::Env& env, const fs::path& model_dir) {
  std::vector<fs::path> dirs{model_dir};
  for (const auto& s : p.o.sources) dirs.push_back(s);
  for (const auto& d : dirs) {
    Source s;
    s.dir = d;
    s.ckpt = std::make_unique<io::Checkpoint>(io::Checkpoint::open(env, d));
    s.model = std::make_unique<model::Model>(model::Model::load(*s.ckpt));
    const auto& f = s.model->family();
    if (f.moe)
      throw Error::invalid(d.string() + ": already a Mixture-of-Experts checkpoint (model_type " + f.model_type +
                           "): upcycle takes a dense model (" + model::family_list(&model::FamilyDesc::upcycle_source) + ")");
    if (!f.upcycle_source)
      throw Error::invalid(d.string() + ": model_type " + f.model_type + " cannot be upcycled (dense sources: " +
                           model::family_list(&model::FamilyDesc::upcycle_source) + ")");
    // A quantized GGUF's blocks: the builder copies and mixes float weights.
    auto refuse_codes = [&](const std::string& what, const core::Tensor& t) {
      if (const core::Encoding* e = t.encoding())
        throw Error::invalid(d.string() + ": " + what + " is stored as codes ('" + e->name() + "'): upcycle takes float weights: " +
                             "write the model dense first with `moe-tool convert " + d.string() + " DENSE --dtype bf16`, then upcycle DENSE");
    };
    for (const auto& [role, t] : s.model->globals()) refuse_codes(role, t);
    for (const auto& layer : s.model->layers()) {
      const std::string l = "layer " + std::to_string(layer.index) + " ";
      for (const auto& [role, t] : layer.tensors) refuse_codes(l + role, t);
      if (layer.mlp) {
        refuse_codes(l + "mlp gate_proj", layer.mlp->gate);
        refuse_codes(l + "mlp up_proj", layer.mlp->up);
        refuse_codes(l + "mlp down_proj", layer.mlp->down);
      }
    }
    p.src.push_back(std::move(s));
  }
}

std::string tokenizer_text(const fs::path& dir) {
  std::error_code ec;
  if (!fs::exists(dir / "tokenizer.json", ec)) return "";
  return io::Env::posix().read_text(dir / "tokenizer.json");
}

void check_sources_match(const Plan& p) {
  const auto& a = first(p);
  const std::string tok0 = tokenizer_text(p.src.front().dir);
  for (size_t i = 1; i < p.src.size(); ++i) {
    const auto& b = *p.src[i].model;
    const std::string where = "upcycle.sources: " + p.src[i].dir.string();
    if (b.family().model_type != a.family().model_type)
      throw Error::invalid(where + ": model_type " + b.family().model_type + " differs from " + a.family().model_type +
                           " (sources must be fine-tunes of the same base)");
    const auto &da = a.dims(), &db = b.dims();
    if (da.layers != db.layers || da.hidden != db.hidden || da.heads != db.heads || da.kv_heads != db.kv_heads ||
        da.head_dim != db.head_dim || da.vocab != db.vocab)
      throw Error::invalid(where + ": dimensions differ from " + p.src.front().dir.string() +
                           " (layers, hidden_size, heads, kv heads, head_dim, vocab_size must match)");
    for (int64_t l = 0; l < da.layers; ++l) {
      const auto &la = a.layers()[l], &lb = b.layers()[l];
      if (la.mlp->gate.shape() != lb.mlp->gate.shape())
        throw Error::invalid(where + ": layer " + std::to_string(l) + " MLP shape " + core::shape_str(lb.mlp->gate.shape()) +
                             " differs from " + core::shape_str(la.mlp->gate.shape()));
      for (const auto& [role, t] : la.tensors) {
        const Tensor* u = lb.find(role);
        if (!u || u->shape() != t.shape())
          throw Error::invalid(where + ": layer " + std::to_string(l) + " " + role + " differs in shape or is missing");
      }
    }
    if (tokenizer_text(p.src[i].dir) != tok0)
      throw Error::invalid(where + ": tokenizer.json differs from " + p.src.front().dir.string() +
                           " (experts of one model share one tokenizer)");
  }
}

void check_target(Plan& p) {
  const auto& m = first(p);
  const std::string src_type = m.family().model_type;
  const std::string& to = p.o.to;
  const std::vector<std::string> targets = model::families_with(&model::FamilyDesc::upcycle_target);
  if (std::find(targets.begin(), targets.end(), to) == targets.end())
    throw Error::invalid("upcycle.to '" + to + "': unknown target" + allowed_suffix(to, targets));
  for (const auto& f : model::all_families())
    if (f.model_type == to) p.target = &f;
  const auto& c = m.config();
  const std::string act = c.get_string_or("hidden_act", "silu");
  if (act != "silu") throw Error::invalid(c.source() + ": hidden_act " + act + ": the MoE families take silu experts only");
  if (c.get_bool_or("mlp_bias", false)) throw Error::invalid(c.source() + ": mlp_bias true: no target family has expert biases");
  const bool qk = has_role(m, "q_norm"), qkv_bias = has_role(m, "q_bias"), o_bias = has_role(m, "o_bias");
  const std::string what = "upcycle.to " + to + ": the source (" + src_type + ") ";
  if (qk && to != "qwen3_moe")
    throw Error::invalid(what + "has q/k norms (self_attn.q_norm, k_norm); only qwen3_moe has them: use upcycle.to qwen3_moe");
  if (!qk && to == "qwen3_moe")
    throw Error::invalid(what + "has no q/k norms, which qwen3_moe applies in every layer: use upcycle.to mixtral or qwen2_moe");
  if (qkv_bias && to == "mixtral")
    throw Error::invalid(what + "has q/k/v projection biases; mixtral attention has no bias: use upcycle.to qwen2_moe");
  if (o_bias && to == "qwen2_moe")
    throw Error::invalid(what + "has an o_proj bias; qwen2_moe has q/k/v biases only");
  if (o_bias && to == "mixtral") throw Error::invalid(what + "has attention biases; mixtral attention has no bias");
  p.zero_qkv_bias = to == "qwen2_moe" && !qkv_bias;
  if (to != "mixtral" && src_type == "mistral" && c.has("sliding_window"))
    throw Error::invalid(what + "uses a sliding window in every layer (sliding_window " + c.json().at("sliding_window").dump() +
                         "); " + to + " windows only layers past max_window_layers: use upcycle.to mixtral");
  const auto& d = m.dims();
  if (to == "qwen2_moe" && d.head_dim * d.heads != d.hidden)
    throw Error::invalid(what + "has head_dim " + std::to_string(d.head_dim) + " != hidden_size / heads; qwen2_moe has no head_dim key");
  if (p.o.shared_expert && to != "qwen2_moe")
    throw Error::invalid("upcycle.shared_expert: only qwen2_moe has a gated shared expert (not " + to + ")");
  if (!p.o.norm_topk_prob && to == "mixtral")
    throw Error::invalid("upcycle.norm_topk_prob: mixtral always renormalises the top-k weights (it cannot be false)");
}

void check_numbers(Plan& p) {
  const auto& o = p.o;
  if (o.experts < 1) throw Error::invalid("upcycle.experts: expected an integer >= 1, found " + std::to_string(o.experts));
  if (o.top_k < 1) throw Error::invalid("upcycle.top_k: expected an integer >= 1, found " + std::to_string(o.top_k));
  if (o.top_k > o.experts)
    throw Error::invalid("upcycle.top_k " + std::to_string(o.top_k) + " exceeds upcycle.experts " + std::to_string(o.experts) +
                         " (each token picks k of the E experts)");
  const auto& m = first(p);
  p.L = m.dims().layers;
  p.H = m.dims().hidden;
  for (const auto& l : m.layers()) {
    if (!l.mlp) throw Error::internal("upcycle: layer without a dense MLP");
    if (l.mlp->width() != m.layers().front().mlp->width())
      throw Error::invalid(m.config().source() + ": layers differ in MLP width; the MoE families take one expert width");
  }
  p.I = m.layers().front().mlp->width();
  p.width = p.I;
  if (o.method == "split") {
    if (o.segments < 1) throw Error::invalid("upcycle.segments: expected an integer >= 1");
    if (o.experts % o.segments != 0)
      throw Error::invalid("upcycle.segments " + std::to_string(o.segments) + ": upcycle.experts " + std::to_string(o.experts) +
                           " is not a multiple of it (E = copies x G)");
    if (p.I % o.segments != 0)
      throw Error::invalid("upcycle.segments " + std::to_string(o.segments) + ": the MLP width " + std::to_string(p.I) +
                           " is not divisible by it");
    p.width = p.I / o.segments;
  }
  if (o.method == "drop" && !(o.drop_ratio > 0.0 && o.drop_ratio <= 1.0))
    throw Error::invalid("upcycle.drop_ratio: expected a number in (0, 1], found " + std::to_string(o.drop_ratio));
  if (!(o.router_std >= 0.0)) throw Error::invalid("upcycle.router_std: expected a number >= 0");
  if ((o.router == "hidden" || o.router == "ridge") && o.prompts.empty())
    throw Error::invalid("upcycle.router " + o.router + ": give upcycle.prompts FILE (per expert: positive and negative prompts)");
}

}  // namespace

Plan make_plan(io::Env& env, const fs::path& model_dir, const UpcycleOptions& opts) {
  Plan p;
  p.o = opts;
  const std::vector<std::string> routers = {"random", "hidden", "ridge"};
  if (std::find(methods().begin(), methods().end(), opts.method) == methods().end())
    throw Error::invalid("upcycle.method '" + opts.method + "': unknown method" + allowed_suffix(opts.method, methods()));
  if (std::find(routers.begin(), routers.end(), opts.router) == routers.end())
    throw Error::invalid("upcycle.router '" + opts.router + "': unknown router" + allowed_suffix(opts.router, routers));
  if (opts.segmenting != "random" && opts.segmenting != "kmeans" && opts.segmenting != "coact")
    throw Error::invalid("upcycle.segmenting '" + opts.segmenting + "': expected random, kmeans or coact");
  if (opts.method == "split" && opts.segmenting == "coact" && opts.text.empty())
    throw Error::invalid("upcycle.segmenting coact: give upcycle.text FILE (calibration text whose MLP activations are clustered)");
  if (opts.split_scale != "down" && opts.split_scale != "cube" && opts.split_scale != "none")
    throw Error::invalid("upcycle.split_scale '" + opts.split_scale + "': expected down, cube or none");
  if (opts.attention != "first" && opts.attention != "mean")
    throw Error::invalid("upcycle.attention_from '" + opts.attention + "': expected first or mean");
  open_sources(p, env, model_dir);
  check_target(p);
  check_numbers(p);
  check_sources_match(p);
  return p;
}

}  // namespace moe::passes::upcycling
