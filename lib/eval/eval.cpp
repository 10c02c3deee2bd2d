#include "eval/eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include <Eigen/Core>

#include "core/error.h"
#include "core/progress.h"
#include "io/checkpoint.h"
#include "io/gguf_model.h"
#include "runtime/forward.h"
#include "tokenizer/utf8.h"

namespace moe::eval {

using core::Error;
using runtime::MatrixRM;

void check_utf8(std::string_view text, const std::string& source, bool strict) {
  if (tokenizer::is_valid_utf8(text)) return;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t n = tokenizer::valid_sequence_length(text, pos);
    if (n == 0) break;
    pos += n;
  }
  const std::string what = source + ": not valid UTF-8 (first bad byte sequence at byte offset " + std::to_string(pos) + ")";
  if (strict) throw Error::invalid(what + "; --strict-utf8 refuses such text");
  std::fprintf(stderr, "moe-tool: warning: %s; every invalid sequence is read as U+FFFD (--strict-utf8 refuses)\n",
               what.c_str());
}

int64_t count_special_strings(const tokenizer::Tokenizer& tok, std::string_view text) {
  int64_t n = 0;
  for (const std::string& s : tok.special_tokens())
    for (size_t p = text.find(s); p != std::string_view::npos; p = text.find(s, p + s.size())) ++n;
  return n;
}

std::string read_text(const std::filesystem::path& path, bool strict_utf8) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) throw Error::not_found(path.string() + ": text file not found");
  if (std::filesystem::is_directory(path, ec)) throw Error::invalid(path.string() + ": is a directory, not a text file");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error::io(path.string() + ": cannot read the text file");
  std::stringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw Error::io(path.string() + ": read error");
  std::string s = ss.str();
  if (s.empty()) throw Error::invalid(path.string() + ": text file is empty");
  check_utf8(s, path.string(), strict_utf8);
  return s;
}

tokenizer::Tokenizer load_tokenizer(const std::filesystem::path& model_dir) {
  if (io::is_gguf_path(model_dir)) {
    // A GGUF file: the tokenizer rebuilt from its tokenizer.ggml.* keys (io/gguf_model.h).
    const auto f = io::GgufFile::open(io::Env::posix(), model_dir);
    const auto text = io::gguf_tokenizer_json(f);
    const std::string src = model_dir.string() + ": tokenizer.ggml.*";
    return tokenizer::Tokenizer::from_json_text(text.tokenizer_json, text.config_json, src, src);
  }
  std::error_code ec;
  if (!std::filesystem::exists(model_dir / "tokenizer.json", ec))
    throw Error::not_found(model_dir.string() + ": no tokenizer (tokenizer.json missing in the model folder)");
  return tokenizer::Tokenizer::load(model_dir);
}

Windows make_windows(const tokenizer::Tokenizer& tok, const std::string& text, const EvalOptions& o) {
  if (o.ctx < 2) throw Error::invalid(o.ctx_name + " must be at least 2, got " + std::to_string(o.ctx));
  if (o.llama_cpp && o.ctx < 3) throw Error::invalid("--llama-cpp-compatible needs " + o.ctx_name + " of at least 3");
  if (o.max_windows < 0) throw Error::invalid(o.max_windows_name + " must be at least 1");
  if (o.batch_windows < 0) throw Error::invalid("--batch-windows must be positive");
  if (o.llama_cpp && o.parse_special)
    throw Error::invalid("--parse-special contradicts --llama-cpp-compatible (llama-perplexity tokenizes the text "
                         "without parsing special tokens)");
  Windows w;
  w.ctx = o.ctx;
  const bool parse = o.parse_special && !o.llama_cpp;
  std::vector<int32_t> all = tok.encode(text, /*add_special=*/o.llama_cpp, parse);
  const int64_t specials = count_special_strings(tok, text);
  const std::string special_note =
      specials == 0 ? "no special-token strings in the text"
      : parse ? std::to_string(specials) + " special-token strings in the text read as special ids (--parse-special)"
              : std::to_string(specials) + " special-token strings in the text read as plain text" +
                    (o.llama_cpp ? std::string(" (as llama-perplexity does)") : std::string(" (--parse-special reads them as special ids)"));
  w.text_tokens = static_cast<int64_t>(all.size());
  if (w.text_tokens < o.ctx)
    throw Error::invalid("text has " + std::to_string(w.text_tokens) + " tokens, fewer than one window of " + o.ctx_name +
                         " " + std::to_string(o.ctx));
  if (o.llama_cpp && w.text_tokens < 2 * o.ctx)
    std::fprintf(stderr,
                 "moe-tool: warning: --llama-cpp-compatible: the text has %lld tokens, fewer than 2 x --ctx (%lld); "
                 "llama-perplexity refuses such a text, this run scores its %lld complete window(s)\n",
                 (long long)w.text_tokens, (long long)(2 * o.ctx), (long long)(w.text_tokens / o.ctx));
  w.windows = w.text_tokens / o.ctx;
  if (o.max_windows > 0) w.windows = std::min(w.windows, o.max_windows);
  w.tokens.assign(all.begin(), all.begin() + w.windows * o.ctx);
  if (o.llama_cpp) {
    const bool bos = tok.adds_bos() && tok.bos_id().has_value();
    if (bos)
      for (int64_t i = 0; i < w.windows; ++i) w.tokens[i * o.ctx] = *tok.bos_id();
    w.score_begin = o.ctx / 2;
    w.convention = "llama.cpp: text tokenized with special tokens, " +
                   std::string(bos ? "first token of each window replaced by BOS, " : "no BOS (tokenizer adds none), ") +
                   "second half of each window scored (" + std::to_string(w.scored_per_window()) + " per window); " +
                   special_note;
  } else {
    w.score_begin = 0;
    w.convention = "every predictable position scored: token t+1 from tokens 0..t, " +
                   std::to_string(w.scored_per_window()) + " per window of " + std::to_string(o.ctx) +
                   "; no BOS; non-overlapping windows, tail dropped; " + special_note;
  }
  return w;
}

void check_context(const model::Model& m, int64_t ctx, bool force, const std::string& ctx_name,
                   const std::string& force_name) {
  const int64_t maxp = m.config().get_int_or("max_position_embeddings", 0);
  if (maxp > 0 && ctx > maxp) {
    const std::string msg = ctx_name + " " + std::to_string(ctx) + " exceeds max_position_embeddings " +
                            std::to_string(maxp) + " of " + m.config().source();
    if (!force)
      throw Error::invalid(msg + (force_name.empty() ? std::string(" (lower ") + ctx_name + ")"
                                                     : " (use " + force_name + " to evaluate anyway)"));
    std::fprintf(stderr, "moe-tool: warning: %s (%s)\n", msg.c_str(), force_name.c_str());
  }
}

double PerplexityResult::perplexity() const {
  return tokens_scored ? std::exp(nll_sum / double(tokens_scored)) : 0.0;
}

namespace {

// log sum_v exp(x_v) in double (KL needs every term exactly).
double log_sum_exp(const float* x, int64_t V, int64_t* argmax = nullptr) {
  int64_t best = 0;
  for (int64_t v = 1; v < V; ++v)
    if (x[v] > x[best]) best = v;
  const double m = x[best];
  double s = 0;
  for (int64_t v = 0; v < V; ++v) s += std::exp(double(x[v]) - m);
  if (argmax) *argmax = best;
  return m + std::log(s);
}

// The same for NLL scoring: exp(x - max) vectorised in float (relative error ~1e-7 per term),
// summed in double; the NLL itself is accumulated in double by the callers.
double log_sum_exp_fast(const float* x, int64_t V) {
  Eigen::Map<const Eigen::ArrayXf> a(x, V);
  const float m = a.maxCoeff();
  const double s = (a - m).exp().cast<double>().sum();
  return double(m) + std::log(s);
}

int64_t auto_batch(const EvalOptions& o, int64_t ctx, int64_t vocab, int64_t windows, int models) {
  if (o.batch_windows > 0) return std::min(o.batch_windows, windows);
  // Up to 4096 tokens per batch, logits of all models under ~1 GB.
  const int64_t by_logits = (int64_t{1} << 30) / (vocab * 4 * models);
  const int64_t tokens = std::max<int64_t>(ctx, std::min<int64_t>(4096, by_logits));
  return std::clamp<int64_t>(tokens / ctx, 1, windows);
}

int64_t vocab_of(const model::Model& m) {
  const auto& g = m.globals();
  return (g.count("lm_head") ? g.at("lm_head") : g.at("embed")).dim(0);
}

// Records each MoE layer's top-k expert ids of one forward batch.
class RouteRecorder : public runtime::Observer {
 public:
  bool wants_routing() const override { return true; }
  void on_routing(int layer, const runtime::MatrixRM&, const runtime::RoutingResult& r) override { ids[layer] = r.ids; }
  std::map<int, runtime::IndexMatrix> ids;
};

// For each MoE layer of the model: input expert id -> output expert id (-1: none), from origin.
// Fills why_not and returns empty when the layers cannot be compared.
std::map<int, std::vector<int32_t>> expert_maps(const model::Model& reference, const model::Model& m,
                                                const ExpertOrigin* origin, std::string& why_not) {
  std::map<int, std::vector<int32_t>> maps;
  if (reference.layers().size() != m.layers().size()) {
    why_not = "the models have different layer counts";
    return {};
  }
  for (size_t l = 0; l < m.layers().size(); ++l) {
    const auto& lr = reference.layers()[l];
    const auto& lm = m.layers()[l];
    if (!lr.moe != !lm.moe) {
      why_not = "layer " + std::to_string(l) + " is an MoE layer in one model only";
      return {};
    }
    if (!lm.moe) continue;
    const int64_t e_in = lr.moe->num_experts(), e_out = lm.moe->num_experts();
    std::vector<int32_t> map(static_cast<size_t>(e_in), -1);
    const bool has_origin = origin && l < origin->size() && !(*origin)[l].empty();
    if (!has_origin) {
      if (e_in != e_out) {
        why_not = "layer " + std::to_string(l) + " has " + std::to_string(e_out) + " experts, the reference " +
                  std::to_string(e_in) + ", and the model's report records no origin for them";
        return {};
      }
      for (int32_t e = 0; e < e_in; ++e) map[static_cast<size_t>(e)] = e;
    } else {
      const auto& o = (*origin)[l];
      if (static_cast<int64_t>(o.size()) != e_out) {
        why_not = "layer " + std::to_string(l) + ": the report's origin names " + std::to_string(o.size()) +
                  " experts, the model has " + std::to_string(e_out);
        return {};
      }
      for (size_t out = 0; out < o.size(); ++out)
        for (int32_t in : o[out]) {
          if (in < 0 || in >= e_in) {
            why_not = "layer " + std::to_string(l) + ": the report's origin names input expert " + std::to_string(in) +
                      ", the reference has " + std::to_string(e_in) + " (is it the model's input?)";
            return {};
          }
          map[static_cast<size_t>(in)] = static_cast<int32_t>(out);
        }
    }
    maps[static_cast<int>(l)] = std::move(map);
  }
  if (maps.empty()) why_not = "the models have no MoE layer";
  return maps;
}

void add_agreement(RoutingAgreement& ra, const std::map<int, std::vector<int32_t>>& maps, const RouteRecorder& ref,
                   const RouteRecorder& mod) {
  for (const auto& [layer_id, map] : maps) {
    const int l = layer_id;  // a structured binding cannot be captured by clang 14's lambdas
    const auto& a = ref.ids.at(l);
    const auto& b = mod.ids.at(l);
    auto it = std::find_if(ra.layers.begin(), ra.layers.end(), [&](const RoutingAgreement::Layer& x) { return x.layer == l; });
    if (it == ra.layers.end()) it = ra.layers.insert(ra.layers.end(), RoutingAgreement::Layer{l});
    const int64_t k = b.cols();
    std::vector<int32_t> sa, sb;
    for (int64_t n = 0; n < b.rows(); ++n) {
      sa.clear();
      sb.assign(b.row(n).data(), b.row(n).data() + k);
      for (int64_t j = 0; j < a.cols(); ++j) sa.push_back(map[static_cast<size_t>(a(n, j))]);
      std::sort(sa.begin(), sa.end());
      std::sort(sb.begin(), sb.end());
      // Experts of sb that the mapped reference choice holds (a pruned expert, -1, matches none).
      int64_t common = 0;
      for (int32_t e : sb) common += std::binary_search(sa.begin(), sa.end(), e);
      const bool same = sa == sb;
      const double overlap = double(common) / double(k);
      it->pairs += 1;
      it->same += same;
      it->overlap_sum += overlap;
      ra.pairs += 1;
      ra.same += same;
      ra.overlap_sum += overlap;
    }
  }
}

}  // namespace

nlohmann::json RoutingAgreement::to_json(const std::string& expert_map) const {
  if (!available) return {{"unavailable", unavailable}};
  nlohmann::json j{{"agreement", agreement()}, {"overlap", overlap()}, {"pairs", pairs}, {"expert_map", expert_map},
                   {"layers", nlohmann::json::array()}};
  for (const auto& l : layers)
    j["layers"].push_back({{"layer", l.layer},
                           {"agreement", l.pairs ? double(l.same) / double(l.pairs) : 0.0},
                           {"overlap", l.pairs ? l.overlap_sum / double(l.pairs) : 0.0}});
  return j;
}

std::optional<ExpertOrigin> origin_from_layers(const nlohmann::json& layers, const std::string& where_prefix) {
  if (!layers.is_array()) return std::nullopt;
  ExpertOrigin out;
  bool any = false;
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& lr = layers[i];
    const std::string where = where_prefix + ": layers[" + std::to_string(i) + "]";
    if (!lr.is_object() || !lr.contains("layer") || !lr["layer"].is_number_integer())
      throw Error::corruption(where + ".layer: expected an integer");
    const int64_t layer = lr["layer"].get<int64_t>();
    if (layer < 0 || layer > 1'000'000) throw Error::corruption(where + ".layer: " + std::to_string(layer) + " is out of range");
    if (!lr.contains("origin")) continue;
    if (static_cast<int64_t>(out.size()) <= layer) out.resize(static_cast<size_t>(layer) + 1);
    auto& dst = out[static_cast<size_t>(layer)];
    const auto& o = lr["origin"];
    if (!o.is_array()) throw Error::corruption(where + ".origin: expected an array");
    for (size_t e = 0; e < o.size(); ++e) {
      std::vector<int32_t> ins;
      const std::string ew = where + ".origin[" + std::to_string(e) + "]";
      if (!o[e].is_array()) throw Error::corruption(ew + ": expected an array of [input expert, weight]");
      for (const auto& src : o[e]) {
        if (!src.is_array() || src.size() != 2 || !src[0].is_number_integer())
          throw Error::corruption(ew + ": expected [input expert, weight] pairs, found " + src.dump());
        ins.push_back(src[0].get<int32_t>());
      }
      dst.push_back(std::move(ins));
    }
    any = true;
  }
  if (!any) return std::nullopt;
  return out;
}

std::optional<ExpertOrigin> origin_from_report(const std::filesystem::path& model_dir) {
  const auto path = model_dir / "moe_tool_report.json";
  std::ifstream f(path);
  if (!f) return std::nullopt;
  std::stringstream ss;
  ss << f.rdbuf();
  const nlohmann::json j = io::parse_json_file_text(ss.str(), path.string());
  if (!j.contains("layers")) return std::nullopt;
  return origin_from_layers(j["layers"], path.string());
}

namespace {

// origin of the model's experts in a middle model's (`acc`), then the middle model's in its input's
// (`step`): the model's in the input's. Empty per-layer lists and nullopt are identities.
std::optional<ExpertOrigin> compose(const std::optional<ExpertOrigin>& acc, const std::optional<ExpertOrigin>& step) {
  if (!acc) return step;
  if (!step) return acc;
  ExpertOrigin out(std::max(acc->size(), step->size()));
  for (size_t l = 0; l < out.size(); ++l) {
    const bool a = l < acc->size() && !(*acc)[l].empty(), s = l < step->size() && !(*step)[l].empty();
    if (!a || !s) {
      out[l] = a ? (*acc)[l] : s ? (*step)[l] : std::vector<std::vector<int32_t>>{};
      continue;
    }
    for (const auto& mids : (*acc)[l]) {
      std::vector<int32_t> ins;
      for (int32_t mid : mids) {
        if (mid < 0 || static_cast<size_t>(mid) >= (*step)[l].size())
          throw Error::corruption("layer " + std::to_string(l) + ": a report names expert " + std::to_string(mid) +
                                  " of its input, whose own report records " + std::to_string((*step)[l].size()));
        for (int32_t in : (*step)[l][static_cast<size_t>(mid)])
          if (std::find(ins.begin(), ins.end(), in) == ins.end()) ins.push_back(in);
      }
      out[l].push_back(std::move(ins));
    }
  }
  return out;
}

}  // namespace

ReportedOrigin origin_against(const std::filesystem::path& model_dir, const std::string& reference_fingerprint) {
  ReportedOrigin r;
  std::vector<std::string> chain;
  std::optional<ExpertOrigin> acc;
  std::filesystem::path dir = model_dir;
  for (int depth = 0;; ++depth) {
    const auto path = dir / "moe_tool_report.json";
    std::ifstream f(path);
    if (!f) {
      if (depth == 0) {
        r.how = "by index";
      } else {
        r.broken = "the model's reports lead to " + dir.string() + ", which has no moe_tool_report.json and is not the reference";
      }
      return r;
    }
    std::stringstream ss;
    ss << f.rdbuf();
    const nlohmann::json j = io::parse_json_file_text(ss.str(), path.string());
    const nlohmann::json* input = j.contains("input") && j.at("input").is_object() ? &j.at("input") : nullptr;
    if (!input || !input->contains("fingerprint") || !input->contains("path") || !input->at("path").is_string()) {
      r.broken = path.string() + ": no input.path / input.fingerprint: which model its experts come from is not recorded";
      return r;
    }
    if (j.contains("layers")) acc = compose(acc, origin_from_layers(j.at("layers"), path.string()));
    chain.push_back(dir.string());
    if (input->at("fingerprint") == reference_fingerprint) {
      r.origin = acc;
      r.reports = chain.size();
      if (chain.size() == 1) {
        r.how = "through the model's report";
      } else {
        r.how = "through " + std::to_string(chain.size()) + " reports (";
        for (size_t i = 0; i < chain.size(); ++i) r.how += (i ? " <- " : "") + chain[i];
        r.how += ")";
      }
      return r;
    }
    const std::filesystem::path next = input->at("path").get<std::string>();
    const std::string why = path.string() + " names its input " + next.string() + ", not the reference";
    if (depth >= 64) {
      r.broken = why + " (more than 64 reports in the chain)";
      return r;
    }
    std::error_code ec;
    if (!std::filesystem::exists(next / "config.json", ec)) {
      r.broken = why + ", and that folder is gone";
      return r;
    }
    try {
      if (io::Checkpoint::open(io::Env::posix(), next).fingerprint() != input->at("fingerprint")) {
        r.broken = why + ", and that folder has changed since";
        return r;
      }
    } catch (const Error&) {
      r.broken = why + ", and that folder no longer reads as a checkpoint";
      return r;
    }
    dir = next;
  }
}

double nll_of_row(const float* logits, int64_t V, int32_t target) {
  if (target < 0 || target >= V)
    throw Error::invalid("token id " + std::to_string(target) + " outside the model's vocabulary (" + std::to_string(V) + ")");
  return log_sum_exp_fast(logits, V) - double(logits[target]);
}

PerplexityResult perplexity(const model::Model& m, const Windows& w, const EvalOptions& o) {
  runtime::Forward fwd(m);
  fwd.set_active_experts(o.active);
  PerplexityResult r;
  r.windows = w.windows;
  r.ctx = w.ctx;
  r.convention = w.convention;
  const int64_t V = vocab_of(m);
  const int64_t B = auto_batch(o, w.ctx, V, w.windows, 1);
  core::Progress prog("eval", static_cast<uint64_t>(w.windows), "windows", o.quiet || core::Progress::global_quiet());
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t b0 = 0; b0 < w.windows; b0 += B) {
    const int64_t nb = std::min(B, w.windows - b0);
    std::span<const int32_t> toks(w.tokens.data() + b0 * w.ctx, static_cast<size_t>(nb * w.ctx));
    const MatrixRM& logits = fwd.run_kept(toks, w.ctx);
    for (int64_t i = 0; i < nb; ++i)
      for (int64_t p = w.score_begin; p + 1 < w.ctx; ++p) {
        const double nll = nll_of_row(logits.data() + (i * w.ctx + p) * V, V, toks[i * w.ctx + p + 1]);
        if (!std::isfinite(nll))
          throw Error::invalid("non-finite logits at window " + std::to_string(b0 + i) + ", position " +
                               std::to_string(p) + " (activations overflow): no perplexity to report");
        r.nll_sum += nll;
        ++r.tokens_scored;
      }
    prog.add(static_cast<uint64_t>(nb));
  }
  prog.finish();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.tokens_per_second = r.seconds > 0 ? double(w.windows * w.ctx) / r.seconds : 0.0;
  return r;
}

CompareResult compare(const model::Model& reference, const model::Model& m, const Windows& w, const EvalOptions& o,
                      const ExpertOrigin* origin) {
  const int64_t V = vocab_of(m), Vr = vocab_of(reference);
  if (V != Vr)
    throw Error::invalid("--against: vocabulary sizes differ (model " + std::to_string(V) + ", reference " +
                         std::to_string(Vr) + "): the models must share a tokenizer");
  runtime::Forward fm(m), fr(reference);
  fm.set_active_experts(o.active);
  CompareResult c;
  const auto maps = expert_maps(reference, m, origin, c.routing.unavailable);
  c.routing.available = !maps.empty();
  RouteRecorder rec_r, rec_m;
  std::vector<runtime::Observer*> obs_r, obs_m;
  if (c.routing.available) {
    obs_r.push_back(&rec_r);
    obs_m.push_back(&rec_m);
  }
  for (PerplexityResult* r : {&c.model, &c.reference}) {
    r->windows = w.windows;
    r->ctx = w.ctx;
    r->convention = w.convention;
  }
  const int64_t B = auto_batch(o, w.ctx, V, w.windows, 2);
  core::Progress prog("eval", static_cast<uint64_t>(w.windows), "windows", o.quiet || core::Progress::global_quiet());
  double secs_m = 0, secs_r = 0;
  for (int64_t b0 = 0; b0 < w.windows; b0 += B) {
    const int64_t nb = std::min(B, w.windows - b0);
    std::span<const int32_t> toks(w.tokens.data() + b0 * w.ctx, static_cast<size_t>(nb * w.ctx));
    auto t0 = std::chrono::steady_clock::now();
    const MatrixRM& lr = fr.run_kept(toks, w.ctx, obs_r);
    auto t1 = std::chrono::steady_clock::now();
    const MatrixRM& lm = fm.run_kept(toks, w.ctx, obs_m);
    auto t2 = std::chrono::steady_clock::now();
    if (c.routing.available) add_agreement(c.routing, maps, rec_r, rec_m);
    secs_r += std::chrono::duration<double>(t1 - t0).count();
    secs_m += std::chrono::duration<double>(t2 - t1).count();
    for (int64_t i = 0; i < nb; ++i)
      for (int64_t p = w.score_begin; p + 1 < w.ctx; ++p) {
        const float* a = lr.data() + (i * w.ctx + p) * V;
        const float* q = lm.data() + (i * w.ctx + p) * V;
        const int32_t target = toks[i * w.ctx + p + 1];
        int64_t am_r = 0, am_m = 0;
        const double lse_r = log_sum_exp(a, V, &am_r), lse_m = log_sum_exp(q, V, &am_m);
        if (target < 0 || target >= V) throw Error::invalid("token id " + std::to_string(target) + " outside the vocabulary");
        c.reference.nll_sum += lse_r - a[target];
        c.model.nll_sum += lse_m - q[target];
        double kl = 0;
        for (int64_t v = 0; v < V; ++v) {
          const double lr_v = double(a[v]) - lse_r, lm_v = double(q[v]) - lse_m;
          kl += std::exp(lr_v) * (lr_v - lm_v);
        }
        // Finite weights can still overflow to Inf/NaN activations: never let a NaN turn into KL 0
        // (std::max(0.0, NaN) is 0) or a NaN perplexity.
        if (!std::isfinite(kl) || !std::isfinite(lse_r - a[target]) || !std::isfinite(lse_m - q[target]))
          throw Error::invalid(std::string("non-finite logits from the ") +
                               (!std::isfinite(lse_r - a[target]) ? "reference" : "model") + " at window " +
                               std::to_string(b0 + i) + ", position " + std::to_string(p) +
                               " (activations overflow): no KL or perplexity to report");
        c.kl_sum += std::max(0.0, kl);
        c.top1_agree += am_r == am_m;
        ++c.tokens;
      }
    prog.add(static_cast<uint64_t>(nb));
  }
  prog.finish();
  c.model.tokens_scored = c.reference.tokens_scored = c.tokens;
  c.model.seconds = secs_m;
  c.reference.seconds = secs_r;
  c.model.tokens_per_second = secs_m > 0 ? double(w.windows * w.ctx) / secs_m : 0;
  c.reference.tokens_per_second = secs_r > 0 ? double(w.windows * w.ctx) / secs_r : 0;
  return c;
}

}  // namespace moe::eval
