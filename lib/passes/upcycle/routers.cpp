// Routers from prompts (passes/upcycle/routers.h): mergekit-moe's "hidden" and DUME's "ridge".
#include "passes/upcycle/routers.h"

#include <Eigen/Dense>

#include "core/error.h"
#include "eval/eval.h"
#include "io/checkpoint.h"
#include "passes/options.h"
#include "runtime/forward.h"
#include "tokenizer/tokenizer.h"

namespace moe::passes::upcycling {

using core::Error;
using core::Tensor;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

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
  PromptObserver(int64_t L, int64_t H, int64_t E, bool ridge) : H_(H), ridge_(ridge), sum_(static_cast<size_t>(L)) {
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
  int64_t H_;
  bool ridge_;
  std::vector<Eigen::VectorXd> sum_;
};

}  // namespace

void compute_prompt_routers(Plan& p) {
  const int64_t E = p.o.experts, L = p.L, H = p.H;
  const auto prompts = read_prompts(p.o.prompts, E);
  const auto tok = eval::load_tokenizer(p.src.front().dir);  // a folder's tokenizer.json, or a GGUF's keys
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

}  // namespace moe::passes::upcycling
