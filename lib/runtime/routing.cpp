#include "runtime/routing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.h"

namespace moe::runtime {

using core::Error;
using model::Routing;

RoutingRule RoutingRule::from_config(const model::FamilyDesc& f, const model::Config& c) {
  RoutingRule r;
  r.family = f.model_type;
  r.kind = f.routing;
  if (!f.moe) return r;
  r.top_k = static_cast<int>(c.get_int(f.topk_key));
  r.num_experts = static_cast<int>(c.get_int(f.expert_count_key));
  r.renormalize = f.norm_topk_forced || c.get_bool_or("norm_topk_prob", f.norm_topk_default);
  r.logit_bias = f.router_bias_in_logits;
  r.scales_input = f.routing == Routing::TopKSigmoid;
  if (f.routing == Routing::SparseMixer) {
    // modeling_phimoe.py sparsemixer(): "top_k must be equal to 2".
    if (r.top_k != 2)
      throw Error::unsupported(c.where(f.topk_key) + " " + std::to_string(r.top_k) + ": " + f.model_type +
                               "'s sparsemixer routing chooses 2 experts");
    r.jitter_eps = c.get_double_or("router_jitter_noise", 0.01);
    if (!std::isfinite(r.jitter_eps) || r.jitter_eps < 0)
      throw Error::corruption(c.where("router_jitter_noise") + ": expected a finite number >= 0, found " +
                              c.json().at("router_jitter_noise").dump());
  }
  if (f.routing == Routing::SoftmaxBiasTopK) {
    r.norm_min = c.get_double_or("moe_norm_min", 1e-12);
    if (!std::isfinite(r.norm_min) || r.norm_min < 0)
      throw Error::corruption(c.where("moe_norm_min") + ": expected a finite number >= 0, found " +
                              c.json().at("moe_norm_min").dump());
  }
  if (f.routing == Routing::DeepSeekV2 || f.routing == Routing::DeepSeekV3) {
    r.n_group = static_cast<int>(c.get_int_or("n_group", 1, false));
    r.topk_group = static_cast<int>(c.get_int_or("topk_group", 1, false));
    r.routed_scaling_factor = c.get_double_or("routed_scaling_factor", 1.0);
    if (f.routing == Routing::DeepSeekV3) {
      r.group_limited = true;
    } else {
      r.group_limited = c.get_string_or("topk_method", "greedy") == "group_limited_greedy";
    }
    if (r.topk_group > r.n_group)  // transformers' topk over the n_group group scores would raise
      throw Error::corruption(c.where("topk_group") + " " + std::to_string(r.topk_group) + " exceeds n_group " +
                              std::to_string(r.n_group));
    if (r.num_experts % r.n_group != 0)
      throw Error::corruption(c.where("n_group") + " " + std::to_string(r.n_group) +
                              " does not divide the expert count " + std::to_string(r.num_experts));
  }
  return r;
}

bool RoutingRule::has_probs() const {
  return kind == Routing::SoftmaxTopK || kind == Routing::DeepSeekV2 || kind == Routing::SoftmaxBiasTopK;
}

namespace {

// Indices of the k largest scores, descending; ties: lower index first.
void top_k_indices(const float* s, int E, int k, int* out, std::vector<int>& scratch) {
  scratch.resize(E);
  std::iota(scratch.begin(), scratch.end(), 0);
  std::partial_sort(scratch.begin(), scratch.begin() + k, scratch.end(), [s](int a, int b) {
    return s[a] > s[b] || (s[a] == s[b] && a < b);
  });
  std::copy(scratch.begin(), scratch.begin() + k, out);
}

void softmax_row(const float* x, float* p, int E) {
  double m = -std::numeric_limits<double>::infinity();
  for (int e = 0; e < E; ++e) m = std::max(m, double(x[e]));
  double sum = 0;
  for (int e = 0; e < E; ++e) sum += std::exp(double(x[e]) - m);
  for (int e = 0; e < E; ++e) p[e] = static_cast<float>(std::exp(double(x[e]) - m) / sum);
}

// DeepSeek group limitation: keep the topk_group best groups (group score = max (v2) or sum of
// the top-2 (v3) of its members' choice scores), zero the others' choice scores (as transformers'
// masked_fill(~mask, 0.0) does).
// A layer whose expert count is no longer the config's (a pass of this run pruned or merged it) has
// no trained groups: it routes plain top-k, as the written config (n_group 1) says it will.
void limit_groups(std::vector<float>& choice, const RoutingRule& r, bool v3, std::vector<int>& scratch) {
  const int G = r.n_group, per = r.num_experts / G;
  if (G <= 1 || static_cast<int>(choice.size()) != r.num_experts) return;
  std::vector<float> gs(G);
  for (int g = 0; g < G; ++g) {
    const float* s = choice.data() + g * per;
    if (v3) {
      float a = -std::numeric_limits<float>::infinity(), b = a;
      for (int i = 0; i < per; ++i) {
        if (s[i] > a) { b = a; a = s[i]; } else if (s[i] > b) { b = s[i]; }
      }
      gs[g] = per >= 2 ? a + b : a;
    } else {
      gs[g] = *std::max_element(s, s + per);
    }
  }
  std::vector<int> keep(r.topk_group);
  top_k_indices(gs.data(), G, std::min(r.topk_group, G), keep.data(), scratch);
  std::vector<bool> kept(G, false);
  for (int g : keep) kept[g] = true;
  for (int g = 0; g < G; ++g)
    if (!kept[g])
      for (int i = 0; i < per; ++i) choice[g * per + i] = 0.0f;
}

// modeling_phimoe.py sparsemixer(training=False) on one row of scores: the expert `top` (the
// row's argmax) weighs softmax(masked)[top], where masked is `s` with every expert e whose
// (max - scores[e]) / max(|scores[e]|, max) exceeds 2 * eps set to -inf (max = s[top]; the
// threshold is taken against `scores`, the unmasked logits, as transformers does for both
// choices).
float sparsemixer_weight(const std::vector<float>& s, const std::vector<float>& scores, int top, double eps) {
  const int E = static_cast<int>(s.size());
  const float m = s[top];
  double sum = 0;
  for (int e = 0; e < E; ++e) {
    const float factor = std::max(std::abs(scores[e]), m);
    const bool masked = (m - scores[e]) / factor > static_cast<float>(2 * eps);
    if (!masked && s[e] != -std::numeric_limits<float>::infinity()) sum += std::exp(double(s[e]) - m);
  }
  return static_cast<float>(1.0 / sum);
}

}  // namespace

RoutingResult route(const RoutingRule& rule, const MatrixRM& logits, const RowVector* bias,
                    const std::vector<bool>* active) {
  const int64_t N = logits.rows();
  const int E = static_cast<int>(logits.cols());
  const int k = rule.top_k;
  if (rule.kind == Routing::None) throw Error::internal("route(): " + rule.family + " is a dense family");
  // E comes from the logits (experts may have been pruned since the config was read).
  if (k <= 0 || k > E)
    throw Error::invalid(rule.family + ": num_experts_per_tok " + std::to_string(k) + " not in [1, " +
                         std::to_string(E) + "] experts");
  if (active) {
    if (static_cast<int>(active->size()) != E) throw Error::internal("route(): active mask size != experts");
    if (std::count(active->begin(), active->end(), true) < k)
      throw Error::invalid(rule.family + ": fewer active experts than num_experts_per_tok");
  }
  const float ninf = -std::numeric_limits<float>::infinity();
  RoutingResult r;
  r.ids.resize(N, k);
  r.weights.resize(N, k);
  if (rule.has_probs()) r.probs.resize(N, E);
  std::vector<float> row(E), p(E);
  std::vector<int> scratch, top(k);
  for (int64_t n = 0; n < N; ++n) {
    for (int e = 0; e < E; ++e) row[e] = (active && !(*active)[e]) ? ninf : logits(n, e);
    switch (rule.kind) {
      case Routing::SoftmaxTopK: {
        softmax_row(row.data(), p.data(), E);
        top_k_indices(p.data(), E, k, top.data(), scratch);
        float sum = 0;
        for (int j = 0; j < k; ++j) sum += p[top[j]];
        for (int j = 0; j < k; ++j) {
          r.ids(n, j) = top[j];
          r.weights(n, j) = rule.renormalize ? p[top[j]] / sum : p[top[j]];
        }
        break;
      }
      case Routing::TopKSoftmax: {  // granitemoe: top-k of the logits, softmax over the k
        top_k_indices(row.data(), E, k, top.data(), scratch);
        std::vector<float> sel(k), w(k);
        for (int j = 0; j < k; ++j) sel[j] = row[top[j]];
        softmax_row(sel.data(), w.data(), k);
        for (int j = 0; j < k; ++j) {
          r.ids(n, j) = top[j];
          r.weights(n, j) = w[j];
        }
        break;
      }
      case Routing::TopKSigmoid: {  // llama4 Llama4Router: top-k of the logits, sigmoid of each
        top_k_indices(row.data(), E, k, top.data(), scratch);
        for (int j = 0; j < k; ++j) {
          r.ids(n, j) = top[j];
          r.weights(n, j) = static_cast<float>(1.0 / (1.0 + std::exp(-double(row[top[j]]))));
        }
        break;
      }
      case Routing::DeepSeekV2: {
        softmax_row(row.data(), p.data(), E);
        std::vector<float> choice(p);
        if (rule.group_limited) limit_groups(choice, rule, false, scratch);
        top_k_indices(choice.data(), E, k, top.data(), scratch);
        // Weights are the (group-masked) scores the top-k ran on, as transformers' topk returns
        // them: an expert of a dropped group (only chosen when the kept groups hold fewer than k
        // experts) weighs 0.
        float sum = 0;
        for (int j = 0; j < k; ++j) sum += choice[top[j]];
        const bool norm = k > 1 && rule.renormalize;
        for (int j = 0; j < k; ++j) {
          r.ids(n, j) = top[j];
          r.weights(n, j) = norm ? choice[top[j]] / (sum + 1e-20f)
                                 : static_cast<float>(choice[top[j]] * rule.routed_scaling_factor);
        }
        break;
      }
      case Routing::DeepSeekV3: {
        std::vector<float> s(E), choice(E);
        for (int e = 0; e < E; ++e) {
          s[e] = row[e] == ninf ? 0.0f : 1.0f / (1.0f + std::exp(-row[e]));
          choice[e] = row[e] == ninf ? ninf : s[e] + (bias ? (*bias)(e) : 0.0f);
        }
        limit_groups(choice, rule, true, scratch);
        if (active)  // a dropped expert in a kept group must stay unchosen
          for (int e = 0; e < E; ++e)
            if (!(*active)[e]) choice[e] = ninf;
        top_k_indices(choice.data(), E, k, top.data(), scratch);
        float sum = 0;
        for (int j = 0; j < k; ++j) sum += s[top[j]];
        for (int j = 0; j < k; ++j) {
          float w = rule.renormalize ? s[top[j]] / (sum + 1e-20f) : s[top[j]];
          r.ids(n, j) = top[j];
          r.weights(n, j) = static_cast<float>(w * rule.routed_scaling_factor);
        }
        break;
      }
      case Routing::SoftmaxBiasTopK: {
        // ernie4_5_moe (Ernie4_5_MoeSparseMoeBlock): softmax over all logits; the correction bias
        // is added for the choice only; the chosen softmax weights divided by max(sum, norm_min).
        softmax_row(row.data(), p.data(), E);
        std::vector<float> choice(E);
        for (int e = 0; e < E; ++e) choice[e] = row[e] == ninf ? ninf : p[e] + (bias ? (*bias)(e) : 0.0f);
        top_k_indices(choice.data(), E, k, top.data(), scratch);
        float sum = 0;
        for (int j = 0; j < k; ++j) sum += p[top[j]];
        const float denom = std::max(sum, static_cast<float>(rule.norm_min));
        for (int j = 0; j < k; ++j) {
          r.ids(n, j) = top[j];
          r.weights(n, j) = p[top[j]] / denom;
        }
        break;
      }
      case Routing::SparseMixer: {
        // phimoe: the argmax, then the argmax of the rest; each weighs its own masked softmax;
        // no renormalisation.
        if (k != 2) throw Error::invalid(rule.family + ": sparsemixer routing chooses 2 experts, num_experts_per_tok " + std::to_string(k));
        top_k_indices(row.data(), E, 1, top.data(), scratch);
        const int first = top[0];
        std::vector<float> rest(row);
        rest[first] = ninf;
        top_k_indices(rest.data(), E, 1, top.data() + 1, scratch);
        r.ids(n, 0) = first;
        r.ids(n, 1) = top[1];
        r.weights(n, 0) = sparsemixer_weight(row, row, first, rule.jitter_eps);
        r.weights(n, 1) = sparsemixer_weight(rest, row, top[1], rule.jitter_eps);
        break;
      }
      default:
        throw Error::unsupported("routing '" + std::string(model::routing_name(rule.kind)) +
                                 "' not implemented (family " + rule.family + ")");
    }
    if (rule.has_probs())
      for (int e = 0; e < E; ++e) r.probs(n, e) = p[e];
  }
  return r;
}

}  // namespace moe::runtime
