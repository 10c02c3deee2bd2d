#include "passes/upcycle.h"

#include <Eigen/Dense>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>

#include "core/error.h"
#include "core/progress.h"
#include "io/checkpoint.h"
#include "io/checkpoint_writer.h"
#include "model/family.h"
#include "model/model.h"
#include "passes/clustering.h"
#include "passes/options.h"
#include "runtime/forward.h"
#include "tokenizer/tokenizer.h"

namespace moe::passes {

using core::Error;
using core::Tensor;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// The methods, in the order passes/passes.def lists them (their one spelling).
const std::vector<std::string>& methods() {
  static const std::vector<std::string> v = {
#define MOE_PASS(pass, method, description)
#define MOE_UPCYCLE(method, description) #method,
#include "passes/passes.def"
  };
  return v;
}

// splitmix64 of a seed and a salt (layer, expert, purpose): independent streams per use.
uint64_t mix(uint64_t seed, uint64_t a, uint64_t b = 0, uint64_t c = 0) {
  uint64_t z = seed;
  for (uint64_t v : {a, b, c}) {
    z += 0x9E3779B97F4A7C15ull * (v + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
  }
  return z;
}

// Standard normal draws (Box–Muller on unit_double: portable, unlike std::normal_distribution).
struct Normal {
  std::mt19937_64 rng;
  bool has = false;
  double spare = 0;
  explicit Normal(uint64_t seed) : rng(seed) {}
  double operator()() {
    if (has) {
      has = false;
      return spare;
    }
    double u1 = unit_double(rng());
    const double u2 = unit_double(rng());
    if (u1 < 1e-300) u1 = 1e-300;
    const double r = std::sqrt(-2.0 * std::log(u1)), t = 2.0 * M_PI * u2;
    spare = r * std::sin(t);
    has = true;
    return r * std::cos(t);
  }
};

const char* torch_dtype_name(core::DType t) {
  switch (t) {
    case core::DType::BF16: return "bfloat16";
    case core::DType::F16: return "float16";
    case core::DType::F32: return "float32";
    default: return nullptr;
  }
}

struct Source {
  fs::path dir;
  std::unique_ptr<io::Checkpoint> ckpt;
  std::unique_ptr<model::Model> model;
};

// Everything decided before the first byte is written.
struct Plan {
  UpcycleOptions o;
  std::vector<Source> src;
  const model::FamilyDesc* target = nullptr;
  int64_t L = 0, H = 0, I = 0, width = 0;  // width: expert width
  bool zero_qkv_bias = false;               // llama/mistral into qwen2_moe
  std::vector<std::vector<float>> routers;  // hidden/ridge: [L][E*H]
  std::vector<std::vector<MatrixXdRM>> coact;  // split coact: [source][layer] [I, tokens]
  json router_info;
};

const model::Model& first(const Plan& p) { return *p.src.front().model; }

bool has_role(const model::Model& m, const std::string& role) {
  return !m.layers().empty() && m.layers().front().find(role) != nullptr;
}

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

// ---- routers from prompts (mergekit-moe "hidden", DUME "ridge") ----

struct ExpertPrompts {
  std::vector<std::string> positive, negative;
};

std::vector<ExpertPrompts> read_prompts(const fs::path& file, int64_t E) {
  const json j = io::parse_json_file_text(io::Env::posix().read_text(file), file.string());
  const std::string where = file.string();
  if (!j.is_object()) throw Error::invalid(where + ": expected an object {\"<expert index>\": {\"positive\": [...], \"negative\": [...]}}");
  std::vector<ExpertPrompts> out(static_cast<size_t>(E));
  std::vector<bool> seen(static_cast<size_t>(E), false);
  auto strings = [&](const json& v, const std::string& path) {
    std::vector<std::string> s;
    if (!v.is_array()) throw Error::invalid(where + ": " + path + ": expected a list of strings, found " + json_found(v));
    for (const auto& x : v) {
      if (!x.is_string()) throw Error::invalid(where + ": " + path + ": expected strings, found " + json_found(x));
      s.push_back(x.get<std::string>());
    }
    return s;
  };
  for (const auto& [key, v] : j.items()) {
    size_t used = 0;
    long long e = -1;
    try {
      e = std::stoll(key, &used);
    } catch (...) {
      used = 0;
    }
    if (used != key.size() || e < 0 || e >= E)
      throw Error::invalid(where + ": key \"" + key + "\": expected an expert index 0.." + std::to_string(E - 1));
    ExpertPrompts ep;
    if (v.is_array()) {
      ep.positive = strings(v, key);
    } else if (v.is_object()) {
      for (const auto& [k2, v2] : v.items())
        if (k2 != "positive" && k2 != "negative")
          throw Error::invalid(where + ": " + key + "." + k2 + ": unknown key (allowed: positive, negative)");
      if (!v.contains("positive")) throw Error::invalid(where + ": " + key + ".positive: missing (required)");
      ep.positive = strings(v.at("positive"), key + ".positive");
      if (v.contains("negative")) ep.negative = strings(v.at("negative"), key + ".negative");
    } else {
      throw Error::invalid(where + ": " + key + ": expected {\"positive\": [...], \"negative\": [...]} or a list, found " + json_found(v));
    }
    if (ep.positive.empty()) throw Error::invalid(where + ": " + key + ".positive: empty prompt list");
    out[static_cast<size_t>(e)] = std::move(ep);
    seen[static_cast<size_t>(e)] = true;
  }
  for (int64_t e = 0; e < E; ++e)
    if (!seen[static_cast<size_t>(e)])
      throw Error::invalid(where + ": no prompts for expert " + std::to_string(e) + " (every expert 0.." + std::to_string(E - 1) + " needs some)");
  return out;
}

// Sum of the MLP inputs per layer (and, for ridge, x xᵀ and x onehotᵀ) over a prompt's tokens.
class PromptObserver : public runtime::Observer {
 public:
  PromptObserver(int64_t L, int64_t H, int64_t E, bool ridge) : H_(H), E_(E), ridge_(ridge), sum_(static_cast<size_t>(L)) {
    if (ridge) {
      A_.assign(static_cast<size_t>(L), Eigen::MatrixXd::Zero(H, H));
      B_.assign(static_cast<size_t>(L), Eigen::MatrixXd::Zero(H, E));
    }
  }
  bool wants_dense_mlp_trace() const override { return true; }
  void on_dense_mlp(int layer, const runtime::DenseMlpTrace& t) override {
    Eigen::VectorXd s = Eigen::VectorXd::Zero(H_);
    for (Eigen::Index n = 0; n < t.x.rows(); ++n) s += t.x.row(n).transpose().cast<double>();
    sum_[static_cast<size_t>(layer)] = s;
    if (ridge_ && domain_ >= 0) {
      const Eigen::MatrixXd X = t.x.cast<double>();
      A_[static_cast<size_t>(layer)].noalias() += X.transpose() * X;
      B_[static_cast<size_t>(layer)].col(domain_) += s;
    }
  }
  int domain_ = -1;  // ridge: the expert whose texts run now (-1: negatives)
  const Eigen::VectorXd& sum(int64_t l) const { return sum_[static_cast<size_t>(l)]; }
  std::vector<Eigen::MatrixXd> A_, B_;

 private:
  int64_t H_, E_;
  bool ridge_;
  std::vector<Eigen::VectorXd> sum_;
};

void compute_prompt_routers(Plan& p) {
  const int64_t E = p.o.experts, L = p.L, H = p.H;
  const auto prompts = read_prompts(p.o.prompts, E);
  const auto tok = tokenizer::Tokenizer::load(p.src.front().dir);
  const bool ridge = p.o.router == "ridge";
  runtime::Forward fwd(first(p));
  PromptObserver obs(L, H, E, ridge);
  runtime::Observer* obsp[] = {&obs};
  // Per expert: sum of inputs and token counts (positive, negative) per layer.
  std::vector<std::vector<Eigen::VectorXd>> pos(E, std::vector<Eigen::VectorXd>(L, Eigen::VectorXd::Zero(H)));
  auto neg = pos;
  std::vector<int64_t> npos(E, 0), nneg(E, 0);
  int64_t tokens_total = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int sign = 0; sign < 2; ++sign) {
      const auto& list = sign == 0 ? prompts[e].positive : prompts[e].negative;
      for (size_t i = 0; i < list.size(); ++i) {
        const std::vector<int32_t> ids = tok.encode(list[i], /*add_special=*/false, /*parse_special=*/false);
        if (ids.empty())
          throw Error::invalid(p.o.prompts.string() + ": " + std::to_string(e) + (sign ? ".negative[" : ".positive[") +
                               std::to_string(i) + "]: the prompt tokenizes to no tokens");
        obs.domain_ = sign == 0 ? static_cast<int>(e) : -1;
        fwd.run(ids, static_cast<int64_t>(ids.size()), obsp);
        tokens_total += static_cast<int64_t>(ids.size());
        for (int64_t l = 0; l < L; ++l) (sign == 0 ? pos : neg)[e][l] += obs.sum(l);
        (sign == 0 ? npos : nneg)[e] += static_cast<int64_t>(ids.size());
      }
    }
  }
  p.routers.assign(static_cast<size_t>(L), std::vector<float>(static_cast<size_t>(E * H)));
  for (int64_t l = 0; l < L; ++l) {
    if (!ridge) {
      for (int64_t e = 0; e < E; ++e) {
        Eigen::VectorXd v = pos[e][l] / static_cast<double>(npos[e]);
        if (nneg[e] > 0) v -= neg[e][l] / static_cast<double>(nneg[e]);
        const double n = v.norm();
        if (n > 0) v /= n;
        for (int64_t h = 0; h < H; ++h) p.routers[l][e * H + h] = static_cast<float>(v(h));
      }
    } else {
      Eigen::MatrixXd A = obs.A_[l];
      A.diagonal().array() += p.o.ridge_lambda;
      const Eigen::MatrixXd W = A.ldlt().solve(obs.B_[l]);  // [H, E]
      for (int64_t e = 0; e < E; ++e)
        for (int64_t h = 0; h < H; ++h) p.routers[l][e * H + h] = static_cast<float>(W(h, e));
    }
  }
  p.router_info = {{"prompts", p.o.prompts.string()}, {"prompt_tokens", tokens_total},
                   {"input", "post-attention RMSNorm output of the dense model (the MoE block input)"}};
  if (ridge) p.router_info["lambda"] = p.o.ridge_lambda;
}

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

// ---- co-activation features (split --segmenting coact) ----

// Per source and layer, |silu(gate x) * up x| of every neuron over the first kCoactTokens tokens
// of the text (windows of 128), as rows [I, tokens], L2-normalised: neurons that fire on the same
// tokens are close.
constexpr int64_t kCoactTokens = 512, kCoactWindow = 128;

void normalise_rows(MatrixXdRM& X);

class CoactObserver : public runtime::Observer {
 public:
  explicit CoactObserver(std::vector<MatrixXdRM>& out) : out_(out) {}
  bool wants_dense_mlp_trace() const override { return true; }
  void on_dense_mlp(int layer, const runtime::DenseMlpTrace& t) override {
    MatrixXdRM X = t.h.cast<double>().cwiseAbs().transpose();
    normalise_rows(X);
    out_[static_cast<size_t>(layer)] = std::move(X);
  }

 private:
  std::vector<MatrixXdRM>& out_;
};

void compute_coact(Plan& p) {
  const auto tok = tokenizer::Tokenizer::load(p.src.front().dir);
  std::vector<int32_t> ids = tok.encode(io::Env::posix().read_text(p.o.text), false, false);
  if (ids.size() < 2) throw Error::invalid(p.o.text.string() + ": the calibration text tokenizes to fewer than 2 tokens");
  int64_t T = std::min<int64_t>(kCoactWindow, static_cast<int64_t>(ids.size()));
  const int64_t n = std::min<int64_t>(kCoactTokens, static_cast<int64_t>(ids.size())) / T * T;
  ids.resize(static_cast<size_t>(n));
  for (const auto& s : p.src) {
    std::vector<MatrixXdRM> feats(static_cast<size_t>(p.L));
    CoactObserver obs(feats);
    runtime::Observer* ob[] = {&obs};
    runtime::Forward(*s.model).run(ids, T, ob);
    p.coact.push_back(std::move(feats));
  }
}

// ---- expert construction ----

std::vector<float> f32(const Tensor& t) { return t.to_f32(); }

std::pair<double, double> mean_std(const std::vector<float>& v) {
  double s = 0, s2 = 0;
  for (float x : v) s += x;
  const double mu = s / static_cast<double>(v.size());
  for (float x : v) s2 += (x - mu) * (x - mu);
  return {mu, std::sqrt(s2 / static_cast<double>(v.size()))};
}

// Drop-Upcycling: re-draw rows `idx` of gate/up [I,H] and columns `idx` of down [H,I].
model::Mlp drop_expert(const model::Mlp& dense, double r, uint64_t seed) {
  const int64_t I = dense.gate.dim(0), H = dense.gate.dim(1);
  std::vector<int64_t> perm(static_cast<size_t>(I));
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937_64 rng(seed);
  const int64_t n = std::max<int64_t>(1, static_cast<int64_t>(std::llround(r * static_cast<double>(I))));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = i + static_cast<int64_t>(rng() % static_cast<uint64_t>(I - i));
    std::swap(perm[i], perm[j]);
  }
  Normal z(mix(seed, 7));
  auto redraw_rows = [&](const Tensor& t) {
    std::vector<float> v = f32(t);
    const auto [mu, sd] = mean_std(v);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < H; ++h) v[perm[i] * H + h] = static_cast<float>(mu + sd * z());
    return Tensor::from_f32(v, t.shape()).converted(t.dtype());
  };
  model::Mlp m;
  m.gate = redraw_rows(dense.gate);
  m.up = redraw_rows(dense.up);
  std::vector<float> d = f32(dense.down);
  const auto [mu, sd] = mean_std(d);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < H; ++h) d[h * I + perm[i]] = static_cast<float>(mu + sd * z());
  m.down = Tensor::from_f32(d, dense.down.shape()).converted(dense.down.dtype());
  return m;
}

// Balanced k-means of the rows of X [I, d] into G groups of I/G: k-means centres, then every
// (row, centre) pair by ascending distance, a row going to its nearest centre that has room.
std::vector<std::vector<int64_t>> balanced_kmeans(const MatrixXdRM& X, int64_t G, uint64_t seed) {
  const int64_t I = X.rows(), S = I / G;
  std::vector<std::vector<int64_t>> seg(static_cast<size_t>(G));
  const Groups groups = kmeans(X, static_cast<int>(G), seed);
  Eigen::MatrixXd C = Eigen::MatrixXd::Zero(G, X.cols());
  for (int64_t c = 0; c < G; ++c) {
    for (int i : groups[c]) C.row(c) += X.row(i);
    C.row(c) /= static_cast<double>(std::max<size_t>(1, groups[c].size()));
  }
  std::vector<std::tuple<double, int64_t, int64_t>> pairs;
  pairs.reserve(static_cast<size_t>(I * G));
  for (int64_t i = 0; i < I; ++i)
    for (int64_t c = 0; c < G; ++c) pairs.emplace_back((X.row(i) - C.row(c)).squaredNorm(), i, c);
  std::sort(pairs.begin(), pairs.end());
  std::vector<bool> done(static_cast<size_t>(I), false);
  for (const auto& [d, i, c] : pairs) {
    if (done[i] || static_cast<int64_t>(seg[c].size()) >= S) continue;
    seg[c].push_back(i);
    done[i] = true;
  }
  return seg;
}

// Rows of X L2-normalised (a zero row stays zero).
void normalise_rows(MatrixXdRM& X) {
  for (Eigen::Index i = 0; i < X.rows(); ++i) {
    const double n = X.row(i).norm();
    if (n > 0) X.row(i) /= n;
  }
}

// Segments of the I neurons into G groups of I/G (sorted indices each): random, balanced k-means
// on normalised gate rows, or on `coact` (co-activation: per neuron its |activation| over the
// calibration tokens, normalised).
std::vector<std::vector<int64_t>> segments(const model::Mlp& dense, int64_t G, const std::string& how, uint64_t seed,
                                           const MatrixXdRM* coact) {
  const int64_t I = dense.gate.dim(0), H = dense.gate.dim(1), S = I / G;
  std::vector<std::vector<int64_t>> seg(static_cast<size_t>(G));
  if (how == "random" || G == 1) {
    std::vector<int64_t> order(static_cast<size_t>(I));
    std::iota(order.begin(), order.end(), 0);
    std::mt19937_64 rng(seed);
    for (int64_t i = I - 1; i > 0; --i) std::swap(order[i], order[static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1))]);
    for (int64_t g = 0; g < G; ++g) seg[g].assign(order.begin() + g * S, order.begin() + (g + 1) * S);
  } else if (how == "coact") {
    seg = balanced_kmeans(*coact, G, seed);
  } else {
    const std::vector<float> g = f32(dense.gate);
    MatrixXdRM X(I, H);
    for (int64_t i = 0; i < I; ++i)
      for (int64_t h = 0; h < H; ++h) X(i, h) = g[i * H + h];
    normalise_rows(X);
    seg = balanced_kmeans(X, G, seed);
  }
  for (auto& s : seg) std::sort(s.begin(), s.end());
  return seg;
}

// Expert of one segment: rows of gate/up, columns of down, scaled (gate, up, down factors).
model::Mlp segment_expert(const model::Mlp& dense, const std::vector<int64_t>& idx, double sg, double su, double sd) {
  const int64_t I = dense.gate.dim(0), H = dense.gate.dim(1), S = static_cast<int64_t>(idx.size());
  auto rows = [&](const Tensor& t, double s) {
    const std::vector<float> v = f32(t);
    std::vector<float> o(static_cast<size_t>(S * H));
    for (int64_t r = 0; r < S; ++r)
      for (int64_t h = 0; h < H; ++h) o[r * H + h] = static_cast<float>(v[idx[r] * H + h] * s);
    return Tensor::from_f32(o, {S, H}).converted(t.dtype());
  };
  const std::vector<float> d = f32(dense.down);
  std::vector<float> o(static_cast<size_t>(H * S));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t r = 0; r < S; ++r) o[h * S + r] = static_cast<float>(d[h * I + idx[r]] * sd);
  return {rows(dense.gate, sg), rows(dense.up, su), Tensor::from_f32(o, {H, S}).converted(dense.down.dtype())};
}

Tensor scaled(const Tensor& t, double s) {
  if (s == 1.0) return t;
  std::vector<float> v = f32(t);
  for (auto& x : v) x = static_cast<float>(x * s);
  return Tensor::from_f32(v, t.shape()).converted(t.dtype());
}

Tensor mean_of(const std::vector<const Tensor*>& ts) {
  std::vector<double> acc(static_cast<size_t>(ts.front()->numel()), 0.0);
  for (const Tensor* t : ts) {
    const std::vector<float> v = f32(*t);
    for (size_t i = 0; i < v.size(); ++i) acc[i] += v[i];
  }
  std::vector<float> o(acc.size());
  for (size_t i = 0; i < acc.size(); ++i) o[i] = static_cast<float>(acc[i] / static_cast<double>(ts.size()));
  return Tensor::from_f32(o, ts.front()->shape()).converted(ts.front()->dtype());
}

// ---- config ----

json target_config(const Plan& p) {
  const auto& m = first(p);
  const json& s = m.config().json();
  const auto& sf = m.family();
  const std::string& to = p.o.to;
  json c = json::object();
  c["architectures"] = p.target->architectures;
  c["model_type"] = to;
  for (const char* k : {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                        "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                        "use_cache", "rope_theta", "rope_scaling", "attention_dropout", "tie_word_embeddings",
                        "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "sliding_window",
                        "use_sliding_window", "max_window_layers", "attention_bias", "transformers_version"})
    if (s.contains(k)) c[k] = s.at(k);
  // The target family's defaults differ (mixtral: rope_theta 1e6, eps 1e-5): write the source's.
  if (!c.contains("rope_theta") || c["rope_theta"].is_null()) c["rope_theta"] = sf.default_rope_theta;
  if (!c.contains("rms_norm_eps") || c["rms_norm_eps"].is_null()) c["rms_norm_eps"] = sf.default_rms_norm_eps;
  c["head_dim"] = m.dims().head_dim;
  if (!c.contains("num_key_value_heads")) c["num_key_value_heads"] = m.dims().kv_heads;
  c["tie_word_embeddings"] = m.tied_embeddings();
  if (p.o.dtype) c["torch_dtype"] = torch_dtype_name(*p.o.dtype);
  c["num_experts_per_tok"] = p.o.top_k;
  c["output_router_logits"] = false;
  c["router_aux_loss_coef"] = 0.001;  // transformers' default for all three families
  // The target's expert count and width keys (its family table entry).
  c[p.target->expert_count_key] = p.o.experts;
  c[p.target->expert_width_key] = p.width;
  if (to == "mixtral") {
    c["router_jitter_noise"] = 0.0;
    if (!c.contains("sliding_window")) c["sliding_window"] = nullptr;
    c.erase("use_sliding_window");
    c.erase("max_window_layers");
    c.erase("attention_bias");
  } else {
    c["intermediate_size"] = p.I;  // dense layers (none: decoder_sparse_step 1, mlp_only_layers [])
    c["decoder_sparse_step"] = 1;
    c["mlp_only_layers"] = json::array();
    c["norm_topk_prob"] = p.o.norm_topk_prob;
    if (!c.contains("use_sliding_window")) c["use_sliding_window"] = false;
    if (!c.contains("sliding_window")) c["sliding_window"] = nullptr;
    if (!c.contains("max_window_layers")) c["max_window_layers"] = p.L;
    if (to == "qwen2_moe") {
      c[p.target->shared_width_key] = p.o.shared_expert ? p.I : p.width;
      c.erase("attention_bias");
      c.erase("head_dim");
    } else {
      c["attention_bias"] = has_role(m, "q_bias");
    }
  }
  return c;
}

// ---- writing ----

struct Out {
  std::string name;
  core::DType dtype;
  Tensor t;
};

// Writes one tensor in its planned dtype; the writer checks every written tensor for NaN/Inf
// (io::CheckpointWriter), so a poisoned dense weight cannot be copied into E experts unnoticed.
void write_one(io::CheckpointWriter& w, const Out& o, const fs::path& model) {
  const Tensor c = o.t.dtype() == o.dtype ? o.t : o.t.converted(o.dtype);
  core::with_context(model.string(), [&] { w.write(o.name, 0, c.data(), c.nbytes()); });
}

class Builder {
 public:
  explicit Builder(const Plan& p) : p_(p) {}

  core::DType dtype_of(const Tensor& t) const { return p_.o.dtype ? *p_.o.dtype : t.dtype(); }

  // Globals (embed first / the rest after the layers).
  std::vector<Out> globals(bool head) const {
    std::vector<Out> out;
    const auto& m = first(p_);
    for (const auto& r : m.family().globals) {
      if ((r.role == "embed") != head) continue;
      const auto it = m.globals().find(r.role);
      if (it == m.globals().end()) continue;
      out.push_back({r.name, dtype_of(it->second), attention_like(r.role, -1)});
    }
    return out;
  }

  // A tensor taken from the first source or averaged over all (attention, norms, embeddings).
  Tensor attention_like(const std::string& role, int layer) const {
    std::vector<const Tensor*> ts;
    for (const auto& s : p_.src) {
      const auto& m = *s.model;
      ts.push_back(layer < 0 ? &m.globals().at(role) : m.layers()[layer].find(role));
    }
    if (p_.o.attention == "first" || ts.size() == 1) return *ts.front();
    return mean_of(ts);
  }

  // The tensors of layer l (made now; `make` false: views and empty tensors only).
  std::vector<Out> layer(int l, bool make) const {
    std::vector<Out> out;
    const auto& f = *p_.target;
    const auto& m0 = first(p_);
    const auto& L0 = m0.layers()[l];
    const std::string prefix = model::expand(f.layer_prefix, l);
    const core::DType wd = dtype_of(L0.mlp->gate);
    for (const auto& r : f.layer_roles) {
      const Tensor* t = L0.find(r.role);
      if (t) {
        out.push_back({prefix + r.name, dtype_of(*t), make ? attention_like(r.role, l) : *t});
      } else if (p_.zero_qkv_bias && (r.role == "q_bias" || r.role == "k_bias" || r.role == "v_bias")) {
        const Tensor* proj = L0.find(r.role.substr(0, 1) + "_proj");
        const core::DType bd = dtype_of(*proj);
        out.push_back({prefix + r.name, bd, Tensor::zeros(bd, {proj->dim(0)})});
      }
    }
    const int64_t E = p_.o.experts, H = p_.H, W = p_.width;
    // Router [E, H].
    {
      Tensor router;
      if (make) {
        std::vector<float> v;
        if (!p_.routers.empty()) {
          v = p_.routers[l];
        } else {
          v.resize(static_cast<size_t>(E * H));
          Normal z(mix(p_.o.seed, 1, static_cast<uint64_t>(l)));
          for (auto& x : v) x = static_cast<float>(p_.o.router_std * z());
        }
        router = Tensor::from_f32(v, {E, H});
      }
      out.push_back({prefix + f.router, wd, router});
    }
    const double routed_scale = p_.o.shared_expert ? 0.5 : 1.0;
    const int64_t G = p_.o.method == "split" ? p_.o.segments : 1;
    std::vector<std::vector<std::vector<int64_t>>> segs(p_.src.size());
    if (make && p_.o.method == "split")
      for (size_t s = 0; s < p_.src.size(); ++s)
        segs[s] = segments(*p_.src[s].model->layers()[l].mlp, G, p_.o.segmenting, mix(p_.o.seed, 2, static_cast<uint64_t>(l), s),
                           p_.coact.empty() ? nullptr : &p_.coact[s][l]);
    double sg = 1, su = 1, sd = 1;
    if (p_.o.split_scale == "down") sd = static_cast<double>(G);
    if (p_.o.split_scale == "cube") sg = su = sd = std::cbrt(static_cast<double>(G));
    for (int64_t e = 0; e < E; ++e) {
      const int64_t copy = e / G, g = e % G;
      const size_t s = static_cast<size_t>(copy) % p_.src.size();
      const model::Mlp& dense = *p_.src[s].model->layers()[l].mlp;
      model::Mlp x;
      if (make) {
        if (p_.o.method == "copy") {
          x = {dense.gate, dense.up, scaled(dense.down, routed_scale)};
        } else if (p_.o.method == "drop") {
          x = drop_expert(dense, p_.o.drop_ratio, mix(p_.o.seed, 3, static_cast<uint64_t>(l), static_cast<uint64_t>(e)));
          if (routed_scale != 1.0) x.down = scaled(x.down, routed_scale);
        } else {
          x = segment_expert(dense, segs[s][g], sg, su, sd * routed_scale);
        }
      }
      out.push_back({prefix + model::expand(f.expert_gate, l, static_cast<int>(e)), dtype_of(dense.gate), x.gate});
      out.push_back({prefix + model::expand(f.expert_up, l, static_cast<int>(e)), dtype_of(dense.up), x.up});
      out.push_back({prefix + model::expand(f.expert_down, l, static_cast<int>(e)), dtype_of(dense.down), x.down});
    }
    if (f.has_shared()) {
      // qwen2_moe: the dense MLP behind a zero gate row (sigmoid 0.5), or an all-zero expert.
      const model::Mlp& dense = *L0.mlp;
      const int64_t SW = p_.o.shared_expert ? p_.I : W;
      model::Mlp sh;
      if (make) {
        if (p_.o.shared_expert) {
          sh = dense;
        } else {
          sh = {Tensor::zeros(dense.gate.dtype(), {SW, H}), Tensor::zeros(dense.up.dtype(), {SW, H}),
                Tensor::zeros(dense.down.dtype(), {H, SW})};
        }
      }
      out.push_back({prefix + f.shared_gate, dtype_of(dense.gate), sh.gate});
      out.push_back({prefix + f.shared_up, dtype_of(dense.up), sh.up});
      out.push_back({prefix + f.shared_down, dtype_of(dense.down), sh.down});
      out.push_back({prefix + f.shared_expert_gate, wd, make ? Tensor::zeros(wd, {1, H}) : Tensor()});
    }
    return out;
  }

  // Shapes of the layer's outputs without computing them.
  std::vector<io::TensorSpec> layer_specs(int l) const {
    std::vector<io::TensorSpec> specs;
    const auto& f = *p_.target;
    const auto& L0 = first(p_).layers()[l];
    const std::string prefix = model::expand(f.layer_prefix, l);
    const int64_t E = p_.o.experts, H = p_.H, W = p_.width;
    const core::DType wd = dtype_of(L0.mlp->gate);
    for (const auto& r : f.layer_roles) {
      const Tensor* t = L0.find(r.role);
      if (t) {
        specs.push_back({prefix + r.name, dtype_of(*t), t->shape()});
      } else if (p_.zero_qkv_bias && (r.role == "q_bias" || r.role == "k_bias" || r.role == "v_bias")) {
        const Tensor* proj = L0.find(r.role.substr(0, 1) + "_proj");
        specs.push_back({prefix + r.name, dtype_of(*proj), {proj->dim(0)}});
      }
    }
    specs.push_back({prefix + f.router, wd, {E, H}});
    for (int64_t e = 0; e < E; ++e) {
      const int ei = static_cast<int>(e);
      specs.push_back({prefix + model::expand(f.expert_gate, l, ei), dtype_of(L0.mlp->gate), {W, H}});
      specs.push_back({prefix + model::expand(f.expert_up, l, ei), dtype_of(L0.mlp->up), {W, H}});
      specs.push_back({prefix + model::expand(f.expert_down, l, ei), dtype_of(L0.mlp->down), {H, W}});
    }
    if (f.has_shared()) {
      const int64_t SW = p_.o.shared_expert ? p_.I : W;
      specs.push_back({prefix + f.shared_gate, dtype_of(L0.mlp->gate), {SW, H}});
      specs.push_back({prefix + f.shared_up, dtype_of(L0.mlp->up), {SW, H}});
      specs.push_back({prefix + f.shared_down, dtype_of(L0.mlp->down), {H, SW}});
      specs.push_back({prefix + f.shared_expert_gate, wd, {1, H}});
    }
    return specs;
  }

 private:
  const Plan& p_;
};

void release_layer(const Plan& p, int l) {
  for (const auto& s : p.src) {
    const auto& layer = s.model->layers()[l];
    layer.for_each_tensor([&](const Tensor& t) {
      if (t.data() && !t.owns_data()) s.ckpt->release_range(t.data(), t.nbytes());
    });
  }
}

}  // namespace

const std::vector<std::string>& upcycle_section_keys() {
  static const std::vector<std::string> keys = {"to", "experts", "top_k", "method", "drop_ratio", "segments",
                                                "segmenting", "text", "split_scale", "router", "router_std", "prompts",
                                                "ridge_lambda", "shared_expert", "norm_topk_prob", "sources",
                                                "attention_from"};
  return keys;
}

UpcycleOptions parse_upcycle_section(const json& section, const fs::path& base) {
  Options s(section, "upcycle", "upcycle");
  auto resolve = [&](const std::string& x) {
    const fs::path p(x);
    return p.is_absolute() ? p : (base / p).lexically_normal();
  };
  UpcycleOptions o;
  o.to = s.get_string("to");
  // Counts the written config.json holds: at most the loader's bound on its integers (2^31 - 1,
  // model/config.cpp); the output's size is checked against the free space before writing.
  const int64_t max_count = 2147483647;
  o.experts = s.get_int("experts", 0, 1, max_count);
  if (!s.has("experts")) throw Error::invalid("upcycle.experts: missing (required)");
  o.top_k = s.get_int("top_k", 0, 1, max_count);
  if (!s.has("top_k")) throw Error::invalid("upcycle.top_k: missing (required)");
  o.method = s.get_enum("method", methods().front(), methods());
  o.drop_ratio = s.get_number("drop_ratio", 0.5, 0.0, 1.0, /*min_open=*/true);
  o.segments = s.get_int("segments", 2, 1, max_count);
  o.segmenting = s.get_enum("segmenting", "random", {"random", "kmeans", "coact"});
  if (auto t = s.opt_string("text")) o.text = resolve(*t);
  o.split_scale = s.get_enum("split_scale", "down", {"down", "cube", "none"});
  o.router = s.get_enum("router", "random", {"random", "hidden", "ridge"});
  o.router_std = s.get_number("router_std", 0.02, 0.0, 1e30);
  if (auto pr = s.opt_string("prompts")) o.prompts = resolve(*pr);
  o.ridge_lambda = s.get_number("ridge_lambda", 1e-2, 0.0, 1e30);
  o.shared_expert = s.get_bool("shared_expert", false);
  o.norm_topk_prob = s.get_bool("norm_topk_prob", true);
  if (auto src = s.opt_string("sources")) {
    std::string list = *src;
    for (size_t i = 0; i <= list.size();) {
      size_t j = list.find(',', i);
      if (j == std::string::npos) j = list.size();
      const std::string item = list.substr(i, j - i);
      if (item.empty()) throw Error::invalid("upcycle.sources: empty path in '" + list + "'");
      o.sources.push_back(resolve(item));
      i = j + 1;
    }
  }
  o.attention = s.get_enum("attention_from", "first", {"first", "mean"});
  s.finish();
  return o;
}

uint64_t check_upcycle(io::Env& env, const fs::path& model_dir, const UpcycleOptions& opts) {
  const Plan p = make_plan(env, model_dir, opts);
  // The output's bytes from the shapes alone (nothing built): the first source's tensors with
  // each layer's MLP replaced by E experts of [width, H] x 3 and the router [E, H] (and, with a
  // shared expert, the MLP and its gate row kept). Long double: E x H x width may pass 2^64.
  const auto& m = first(p);
  auto size_of = [&](const Tensor& t) {
    return static_cast<long double>(core::dtype_size(p.o.dtype ? *p.o.dtype : t.dtype()));
  };
  long double b = 0;
  for (const auto& [role, t] : m.globals()) b += static_cast<long double>(t.numel()) * size_of(t);
  const long double E = static_cast<long double>(p.o.experts), H = static_cast<long double>(p.H),
                    W = static_cast<long double>(p.width);
  for (const auto& l : m.layers()) {
    l.for_each_tensor([&](const Tensor& t) { b += static_cast<long double>(t.numel()) * size_of(t); });
    const long double es = size_of(l.mlp->gate), mlp = 3.0L * H * static_cast<long double>(p.I) * es;
    b += E * 3.0L * H * W * es + E * H * es;
    b += p.o.shared_expert ? H * es : -mlp;
    if (p.zero_qkv_bias)  // qwen2_moe's q/k/v biases, written as zeros
      b += static_cast<long double>((m.dims().heads + 2 * m.dims().kv_heads) * m.dims().head_dim) * es;
  }
  return b >= 1.8e19L ? UINT64_MAX : static_cast<uint64_t>(b);
}

UpcycleResult upcycle(io::Env& env, const fs::path& model_dir, const UpcycleOptions& opts, const fs::path& out_dir,
                      bool quiet) {
  const auto t0 = std::chrono::steady_clock::now();
  Plan p = make_plan(env, model_dir, opts);
  if (opts.router == "hidden" || opts.router == "ridge") compute_prompt_routers(p);
  if (opts.method == "split" && opts.segmenting == "coact") compute_coact(p);
  Builder b(p);

  std::vector<io::TensorSpec> plan;
  auto add_specs = [&](const std::vector<Out>& outs) {
    for (const auto& o : outs) plan.push_back({o.name, o.dtype, o.t.shape()});
  };
  add_specs(b.globals(true));
  for (int l = 0; l < p.L; ++l)
    for (auto& s : b.layer_specs(l)) plan.push_back(std::move(s));
  add_specs(b.globals(false));

  UpcycleResult res;
  int64_t params_after = 0;
  for (const auto& s : plan) {
    res.tensor_bytes += s.nbytes();
    params_after += core::shape_numel(s.shape);
  }
  res.tensors = plan.size();

  const auto& src0 = p.src.front();
  for (const auto& f : src0.ckpt->side_files()) {
    if (f.filename() == "config.json" || f.filename() == "moe_tool_report.json") continue;
    env.copy_file(f, out_dir / f.filename());
  }
  const json cfg = target_config(p);
  env.write_text(out_dir / "config.json", cfg.dump(2) + "\n");

  io::CheckpointWriter writer(env, out_dir, plan, opts.max_shard_bytes);
  core::Progress progress("upcycle", res.tensor_bytes, "B", quiet);
  auto write_all = [&](const std::vector<Out>& outs) {
    for (const auto& o : outs) {
      write_one(writer, o, model_dir);
      // Views of the mapped sources (copy experts, attention, embeddings) hand their pages back.
      if (o.t.data() && !o.t.owns_data())
        for (const auto& s : p.src) s.ckpt->release_range(o.t.data(), o.t.nbytes());
      progress.add(io::TensorSpec{o.name, o.dtype, o.t.shape()}.nbytes());
    }
  };
  write_all(b.globals(true));
  for (int l = 0; l < p.L; ++l) {
    write_all(b.layer(l, true));
    release_layer(p, l);
  }
  write_all(b.globals(false));
  writer.finish();
  progress.finish();
  res.shards = writer.shard_count();

  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  json sources = json::array();
  for (const auto& s : p.src) sources.push_back({{"path", s.dir.string()}, {"fingerprint", s.ckpt->fingerprint()},
                                                 {"family", s.model->family().model_type}});
  json u = {{"method", opts.method},
            {"to", opts.to},
            {"experts", opts.experts},
            {"top_k", opts.top_k},
            {"expert_width", p.width},
            {"dense_width", p.I},
            {"router", opts.router},
            {"seed", opts.seed},
            {"sources", sources}};
  if (opts.router == "random") u["router_std"] = opts.router_std;
  if (!p.router_info.is_null()) u["router_init"] = p.router_info;
  if (opts.method == "drop") u["drop_ratio"] = opts.drop_ratio;
  if (opts.method == "split") {
    u["segments"] = opts.segments;
    u["segmenting"] = opts.segmenting;
    if (opts.segmenting == "coact") u["coact_text"] = opts.text.string();
    u["split_scale"] = opts.split_scale;
    u["copies"] = opts.experts / opts.segments;
  }
  if (opts.to != "mixtral") u["norm_topk_prob"] = opts.norm_topk_prob;
  if (opts.to == "qwen2_moe")
    u["shared_expert"] = opts.shared_expert ? "the dense MLP, gate row 0 (sigmoid 0.5), routed experts' down_proj x 0.5"
                                            : "all-zero (adds exactly 0; stock loaders build the tensors)";
  if (p.src.size() > 1) u["attention_from"] = opts.attention;
  if (p.zero_qkv_bias) u["attention_biases"] = "zero q/k/v biases written (qwen2_moe requires them)";
  // Where the MoE equals the dense model at initialisation (docs/benchmarks.md, upcycle).
  std::string exact;
  const bool renorm = opts.to == "mixtral" || opts.norm_topk_prob;
  if (opts.method == "copy")
    exact = renorm ? "yes: equal experts, top-k weights renormalised to sum 1"
                   : "no: top-k probabilities are not renormalised, the output is their sum times the dense MLP";
  else if (opts.method == "split")
    exact = (renorm && opts.split_scale == "down" && opts.router == "random" && opts.router_std == 0.0 &&
             (opts.top_k == opts.experts || opts.top_k == opts.segments))
                ? "yes: equal router logits, the G segments of copy 0 selected with weight 1/G, down_proj x G"
                : "no: needs renormalised weights, split_scale down, router_std 0 (equal logits) and k = G or k = E";
  else
    exact = "no: re-drawn neurons change the output";
  u["equals_dense_at_init"] = exact;
  u["next"] = "continued training: an upcycled model is a start for training (routers untrained" +
              std::string(opts.method == "copy" ? ", experts identical" : "") + "), not a finished model";
  res.report = {{"tool", std::string("moe-tool ") + MOE_TOOL_VERSION},
                {"input", {{"path", src0.dir.string()}, {"fingerprint", src0.ckpt->fingerprint()},
                           {"family", first(p).family().model_type}}},
                {"output_family", opts.to},
                {"upcycle", u},
                {"params", {{"before", first(p).total_params()}, {"after", params_after},
                            {"active_after", params_after - p.L * (opts.experts - opts.top_k) * 3 * p.H * p.width}}},
                {"bytes", {{"before", src0.ckpt->total_tensor_bytes()}, {"after", res.tensor_bytes}}},
                {"shards", res.shards},
                {"timings", {{"total_seconds", secs}}}};
  return res;
}

}  // namespace moe::passes
