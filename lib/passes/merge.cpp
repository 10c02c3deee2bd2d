#include "passes/merge.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>

#include "core/error.h"
#include "runtime/finite.h"
#include "passes/experts.h"
#include "passes/expert_merge.h"
#include "passes/options.h"
#include "passes/passes.h"
#include "passes/router_merge.h"
#include "runtime/weights.h"

namespace moe::passes {

using core::Error;
using nlohmann::json;

Groups msmoe_groups(const std::vector<double>& importance, const calib::MatrixF& logit_sim, int n,
                    std::vector<int>& dominant) {
  const int E = static_cast<int>(importance.size());
  if (n < 1 || n > E || logit_sim.rows() != E || logit_sim.cols() != E)
    throw Error::internal("msmoe grouping: " + std::to_string(n) + " groups of " + std::to_string(E) +
                          " experts with a " + std::to_string(logit_sim.rows()) + "x" +
                          std::to_string(logit_sim.cols()) + " similarity");
  for (int e = 0; e < E; ++e)
    if (!std::isfinite(importance[e])) throw Error::internal("msmoe grouping: non-finite importance of expert " + std::to_string(e));
  if (!logit_sim.allFinite()) throw Error::internal("msmoe grouping: non-finite logit similarity");
  std::vector<int> order(E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return importance[a] > importance[b]; });
  dominant.assign(order.begin(), order.begin() + n);
  std::sort(dominant.begin(), dominant.end());
  Groups groups(n);
  for (int e = 0; e < E; ++e) {
    int best = 0;
    for (int g = 0; g < n; ++g) {
      if (dominant[g] == e) {
        best = g;
        break;
      }
      if (logit_sim(e, dominant[g]) > logit_sim(e, dominant[best])) best = g;
    }
    groups[best].push_back(e);
  }
  return groups;
}

std::vector<int> most_important(const Groups& groups, const std::vector<double>& importance) {
  std::vector<int> dom;
  for (const auto& members : groups) {
    int best = members.at(0);
    for (int e : members)
      if (importance[e] > importance[best]) best = e;
    dom.push_back(best);
  }
  return dom;
}

namespace {

enum class MergeMethod { MSMoE, HCSMoE, SubMoE, DERN };

MergeMethod parse_merge_method(const std::string& m) {
  if (m == "msmoe") return MergeMethod::MSMoE;
  if (m == "hcsmoe") return MergeMethod::HCSMoE;
  if (m == "submoe") return MergeMethod::SubMoE;
  if (m == "dern") return MergeMethod::DERN;
  throw Error::internal("merge: method " + m + " not handled");
}

calib::MatrixD as_double(const calib::MatrixF& m) { return m.cast<double>(); }

// Per-expert importance of the layer by the "importance" option: count (frequency), weight_sum
// (soft) or count * reap = Σ over routed tokens of gate · ‖expert output‖ (saliency).
std::vector<double> expert_importance(const calib::LayerStats& st, const std::string& mode, int64_t E, int L) {
  if (mode == "frequency") return st.count;
  if (mode == "soft") {
    check_stat_size(static_cast<int64_t>(st.weight_sum.size()), E, "weight_sum", L);
    return st.weight_sum;
  }
  check_stat_size(static_cast<int64_t>(st.reap.size()), E, "reap", L);
  std::vector<double> v(E);
  for (int64_t e = 0; e < E; ++e) v[e] = st.count[e] * st.reap[e];
  return v;
}

class MergePass final : public pipeline::Pass {
 public:
  MergePass(const json& spec, const std::string& method, const std::string& path)
      : method_name_(method), method_(parse_merge_method(method)) {
    Options o(spec, path, "merge/" + method);
    o.allow({"pass", "method"});
    seed_ = o.opt_uint64("seed");
    const auto n = o.opt_int("experts", 1, 1 << 20);
    if (method_ == MergeMethod::DERN) {
      // Retained experts keep their own router rows (and biases): no router options.
      threshold_ = o.get_number("threshold", 0.4, -1.0, 1.0);
    } else {
      router_ = o.get_enum("router", "mean", {"dominant", "mean", "refit"});
      router_bias_ = o.get_enum("router_bias", "max", {"max", "mean"});
      // HC-SMoE and Sub-MoE as published average without alignment; here they align by default
      // (measured better on both fixtures, docs/benchmarks.md quality table); "align": false is the papers' rule.
      if (method_ != MergeMethod::MSMoE) align_ = o.get_bool("align", true);
      protect_ = o.get_bool("protect_super_experts", false);
    }
    // The papers weight by frequency (count); saliency weighting measured better in 10 of the 12
    // fixture cells (docs/benchmarks.md quality table), "importance": "frequency" is the papers' rule.
    importance_ = o.get_enum("importance", "saliency", {"frequency", "soft", "saliency"});
    if (method_ == MergeMethod::SubMoE) {
      rank_ratio_ = o.get_number("rank_ratio", 1.0, 0.0, 1.0, /*min_open=*/true);
      whiten_ = o.get_bool("whiten", false);
      damp_ = o.get_number("damp", 1e-2, 0.0, 1e3, /*min_open=*/true);  // used when whitening
    }
    o.finish();
    if (!n) throw Error::invalid(path + ": missing key \"experts\" (experts per layer after merging, an integer >= 1)");
    experts_ = *n;
  }

  std::string name() const override { return "merge"; }
  std::string method() const override { return method_name_; }
  bool densifies_experts() const override { return true; }

  json params() const override {
    json p = {{"pass", "merge"}, {"method", method_name_}, {"experts", experts_}};
    if (method_ == MergeMethod::DERN) {
      p["threshold"] = threshold_;
      p["importance"] = importance_;
      if (seed_) p["seed"] = *seed_;
      return p;
    }
    p["router"] = router_;
    p["router_bias"] = router_bias_;
    if (method_ != MergeMethod::MSMoE) p["align"] = align_;
    p["importance"] = importance_;
    p["protect_super_experts"] = protect_;
    if (method_ == MergeMethod::SubMoE) {
      p["rank_ratio"] = rank_ratio_;
      p["whiten"] = whiten_;
      if (whiten_) p["damp"] = damp_;
    }
    if (seed_) p["seed"] = *seed_;
    return p;
  }

  pipeline::Requirements requirements() const override {
    pipeline::Requirements r;
    r.stats_fields = {"count"};
    if (importance_ == "soft") r.stats_fields.push_back("weight_sum");
    if (importance_ == "saliency") r.stats_fields.push_back("reap");
    switch (method_) {
      case MergeMethod::MSMoE: r.stats_fields.push_back("logit_sim"); break;
      case MergeMethod::HCSMoE: r.stats_fields.push_back("out_mean"); break;
      case MergeMethod::SubMoE:
        r.stats_fields.push_back("out_cos");
        if (whiten_) {
          r.stats_fields.push_back("gram_in");
          r.stats_fields.push_back("gram_mid");
        }
        break;
      case MergeMethod::DERN: break;
    }
    if (protect_) r.stats_fields.push_back("out_absmax");  // super-expert flags derive from it
    r.block_inputs = router_ == "refit";
    if (r.block_inputs) r.unscaled_expert_inputs = "merge " + method() + " with router refit";
    return r;
  }

  // Merged experts and the new router rows are computed in f32 and written dense; experts left
  // alone (groups of one, DERN experts that received no neuron) keep their encoding.
  std::vector<std::string> dequantizes(const EncodedClasses& encoded) const override {
    std::vector<std::string> out;
    auto names = [&](const char* cls) {
      std::string s;
      for (const auto& n : encoded.at(cls)) s += (s.empty() ? "" : ", ") + n;
      return s;
    };
    if (encoded.count("experts"))
      out.push_back("experts stored as " + names("experts") + " are dequantized to merge them; each merged expert is "
                    "written dense (the model's dtype; block-scaled FP8 stays FP8), the experts left alone keep their encoding "
                    "where the output stores it (an hf output writes GPTQ / AWQ / compressed-tensors and GGUF inputs' "
                    "weights dequantized)");
    if (encoded.count("router"))
      out.push_back("the router stored as " + names("router") + " is dequantized; its new rows are written dense");
    return out;
  }

  int64_t experts_after(int layer, int64_t before, int64_t top_k) const override {
    if (experts_ > before)
      throw Error::invalid("layer " + std::to_string(layer) + ": merge to " + std::to_string(experts_) +
                           " experts, but the layer has only " + std::to_string(before));
    if (experts_ < top_k)
      throw Error::invalid("layer " + std::to_string(layer) + ": merge to " + std::to_string(experts_) +
                           " experts is below num_experts_per_tok " + std::to_string(top_k));
    return experts_;
  }

  void run_layer(pipeline::LayerContext& ctx) override {
    model::MoeBlock& block = *ctx.target.moe;
    const int64_t E = block.num_experts();
    const int L = ctx.layer;
    const int n = static_cast<int>(experts_after(L, E, ctx.routing.top_k));
    check_stats(ctx.stats, L, "merge/" + method_name_);
    const calib::LayerStats& st = *ctx.stats;
    check_stat_size(static_cast<int64_t>(st.count.size()), E, "count", L);
    const std::vector<double> importance = expert_importance(st, importance_, E, L);
    if (method_ == MergeMethod::DERN) return run_dern(ctx, importance, n);

    // 1. Groups (and each group's dominant member). With protect_super_experts every super expert
    // is a group of its own and the method groups the other experts into the remaining groups.
    std::vector<int> rest, supers;
    const std::vector<bool>* flags = protect_ ? &super_flags(st, E, L) : nullptr;
    for (int e = 0; e < E; ++e) (flags && (*flags)[e] ? supers : rest).push_back(e);
    const int n_rest = n - static_cast<int>(supers.size());
    if (n_rest < (rest.empty() ? 0 : 1) || (rest.empty() && n_rest != 0))
      throw Error::invalid("layer " + std::to_string(L) + ": " + std::to_string(supers.size()) +
                           " super experts are protected but only " + std::to_string(n) +
                           " experts remain after merging; raise experts or set protect_super_experts to false");
    const int R = static_cast<int>(rest.size());
    auto sub_vec = [&](const std::vector<double>& v) {
      std::vector<double> out;
      for (int e : rest) out.push_back(v.at(e));
      return out;
    };
    auto sub_mat = [&](const calib::MatrixF& m, bool square) {
      calib::MatrixF out(R, square ? R : m.cols());
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < out.cols(); ++j) out(i, j) = m(rest[i], square ? rest[j] : j);
      return out;
    };
    Groups groups;
    std::vector<int> dominant;
    if (!rest.empty()) switch (method_) {
      case MergeMethod::MSMoE:
        check_stat_size(st.logit_sim.rows(), E, "logit_sim", L);
        groups = msmoe_groups(sub_vec(importance), sub_mat(st.logit_sim, true), n_rest, dominant);
        break;
      case MergeMethod::HCSMoE:
        check_stat_size(st.out_mean.rows(), E, "out_mean", L);
        groups = agglomerative_average(as_double(sub_mat(st.out_mean, false)), n_rest);
        break;
      case MergeMethod::SubMoE:
        check_stat_size(st.out_cos.rows(), E, "out_cos", L);
        groups = kmeans(as_double(sub_mat(st.out_cos, true)), n_rest, layer_seed(seed_, ctx.seed, L));
        break;
      case MergeMethod::DERN:
        break;  // handled by run_dern above
    }
    for (auto& g : groups)
      for (int& e : g) e = rest[e];
    for (int e : supers) groups.push_back({e});
    std::sort(groups.begin(), groups.end());
    dominant = most_important(groups, importance);
    std::vector<std::vector<double>> weights;
    for (const auto& members : groups) weights.push_back(importance_weights(importance, members));

    // 2. Merged expert weights (f32).
    const runtime::MoeWeights w =
        runtime::naming_non_finite(ctx.model, ctx.layer, [&] { return runtime::convert_moe(block); });
    std::vector<runtime::MlpWeights> merged;
    for (size_t g = 0; g < groups.size(); ++g) merged.push_back(merge_group(w, st, groups[g], weights[g], dominant[g], L));

    // 3. Router rows (and deepseek_v3 bias) of the merged experts.
    MatrixRM router;
    if (router_ == "dominant") {
      router = router_dominant(w.router, groups, dominant);
    } else if (router_ == "mean") {
      router = router_mean(w.router, groups, weights);
    } else {
      if (!ctx.block_inputs) throw Error::internal("merge router refit: the runner gave no block inputs");
      router = core::with_context("layer " + std::to_string(L), [&] { return router_refit(w.router, *ctx.block_inputs, groups); });
    }
    std::optional<core::Tensor> bias;
    if (w.router_bias) {
      std::vector<float> b(groups.size());
      for (size_t g = 0; g < groups.size(); ++g) {
        double acc = router_bias_ == "max" ? -std::numeric_limits<double>::infinity() : 0.0;
        for (size_t i = 0; i < groups[g].size(); ++i) {
          const double v = (*w.router_bias)(groups[g][i]);
          acc = router_bias_ == "max" ? std::max(acc, v) : acc + weights[g][i] * v;
        }
        b[g] = static_cast<float>(acc);
      }
      bias = to_tensor(b, block.router_bias->dtype());
    }

    // 4. Back into the block, in the checkpoint's dtypes (encoded members: the materialize dtype).
    // A group of one is its expert unchanged (M-SMoE, HC-SMoE: the average of one member) and
    // keeps its tensors, encoded ones included.
    const core::DType dense = ctx.model.materialize_dtype();
    std::vector<model::Mlp> experts;
    for (size_t g = 0; g < groups.size(); ++g) {
      const model::Mlp& like = block.experts[dominant[g]];
      if (groups[g].size() == 1 && method_ != MergeMethod::SubMoE) experts.push_back(like);
      else experts.push_back(mlp_like(merged[g], like, dense));
    }
    block.router = to_tensor_like(router, block.router, dense);
    block.router_bias = bias;
    block.experts = std::move(experts);

    json jg = json::array(), jw = json::array();
    for (size_t g = 0; g < groups.size(); ++g) {
      jg.push_back(ids_json(groups[g]));
      jw.push_back(weights[g]);
    }
    ctx.report["groups"] = std::move(jg);
    ctx.report["weights"] = std::move(jw);
    ctx.report["dominant"] = ids_json(dominant);
    ctx.report["router"] = router_;
    if (bias) ctx.report["router_bias"] = router_bias_;
  }

 private:
  // A computed expert stored like `like` (passes/experts.h to_tensor_like).
  // Its biases (gpt_oss) in the dtype of `like`'s and its activation `like`'s.
  static model::Mlp mlp_like(const runtime::MlpWeights& w, const model::Mlp& like, core::DType dense) {
    model::Mlp m{to_tensor_like(w.gate, like.gate, dense), to_tensor_like(w.up, like.up, dense),
                 to_tensor_like(w.down, like.down, dense)};
    m.act = like.act;
    auto bias = [](const std::optional<runtime::RowVector>& b, const std::optional<core::Tensor>& l) -> std::optional<core::Tensor> {
      if (!b || !l) return std::nullopt;
      return to_tensor(std::vector<float>(b->data(), b->data() + b->size()), l->dtype());
    };
    m.gate_bias = bias(w.gate_bias, like.gate_bias);
    m.up_bias = bias(w.up_bias, like.up_bias);
    m.down_bias = bias(w.down_bias, like.down_bias);
    return m;
  }

  // DERN (passes/merge.h): keep the top-n experts by importance, recombine the dropped experts'
  // neurons into them (passes/expert_merge.h dern_recombine), keep the retained router rows.
  void run_dern(pipeline::LayerContext& ctx, const std::vector<double>& importance, int n) const {
    model::MoeBlock& block = *ctx.target.moe;
    const int E = static_cast<int>(block.num_experts());
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return importance[a] > importance[b]; });
    std::vector<int> kept(order.begin(), order.begin() + n), dropped(order.begin() + n, order.end());
    std::sort(kept.begin(), kept.end());
    std::sort(dropped.begin(), dropped.end());
    const runtime::MoeWeights w =
        runtime::naming_non_finite(ctx.model, ctx.layer, [&] { return runtime::convert_moe(block); });
    const DernResult res = core::with_context("layer " + std::to_string(ctx.layer), [&] {
      return dern_recombine(w.experts, kept, dropped, importance, threshold_);
    });

    const core::DType dense = ctx.model.materialize_dtype();
    std::vector<model::Mlp> experts;
    for (int k = 0; k < n; ++k) {  // a kept expert that received no neuron is unchanged: kept as stored
      const model::Mlp& like = block.experts[kept[k]];
      if (res.neurons_merged.at(static_cast<size_t>(k)) == 0) experts.push_back(like);
      else experts.push_back(mlp_like(res.experts[k], like, dense));
    }
    MatrixRM router(n, w.router.cols());
    for (int k = 0; k < n; ++k) router.row(k) = w.router.row(kept[k]);
    if (w.router_bias) {
      std::vector<float> b(n);
      for (int k = 0; k < n; ++k) b[k] = (*w.router_bias)(kept[k]);
      block.router_bias = to_tensor(b, block.router_bias->dtype());
    }
    block.router = to_tensor_like(router, block.router, dense);
    block.experts = std::move(experts);

    json segs = json::array();
    int discarded_total = 0;
    for (size_t k = 0; k < dropped.size(); ++k) {
      std::vector<int> to(n, 0);
      int discarded = 0;
      for (int t : res.target[k]) t < 0 ? ++discarded : ++to[t];
      json jt = json::object();
      for (int r = 0; r < n; ++r)
        if (to[r]) jt[std::to_string(kept[r])] = to[r];
      segs.push_back({{"expert", dropped[k]}, {"to", std::move(jt)}, {"discarded", discarded}});
      discarded_total += discarded;
    }
    ctx.report["kept"] = ids_json(kept);
    ctx.report["dropped"] = ids_json(dropped);
    ctx.report["segments"] = std::move(segs);
    ctx.report["neurons_merged"] = res.neurons_merged;
    ctx.report["segments_discarded"] = discarded_total;
  }

  runtime::MlpWeights merge_group(const runtime::MoeWeights& w, const calib::LayerStats& st, const std::vector<int>& members,
                                  const std::vector<double>& wts, int dom, int layer) const {
    std::vector<const runtime::MlpWeights*> ms;
    for (int e : members) ms.push_back(&w.experts[e]);
    // M-SMoE (and the others with "align": true): every member's neurons aligned to the dominant
    // expert's before merging.
    std::vector<runtime::MlpWeights> aligned(members.size());
    if (method_ == MergeMethod::MSMoE || align_)
      for (size_t i = 0; i < members.size(); ++i) {
        if (members[i] == dom) continue;
        aligned[i] = permute_neurons(*ms[i], align_neurons(w.experts[dom], *ms[i]));
        ms[i] = &aligned[i];
      }
    switch (method_) {
      case MergeMethod::MSMoE:
        return weighted_average(ms, wts);
      case MergeMethod::HCSMoE:
        return weighted_average(ms, wts);
      case MergeMethod::DERN:
        break;
      case MergeMethod::SubMoE: {
        std::vector<const MatrixRM*> gate, up, down;
        std::vector<const calib::MatrixD*> gin, gmid;
        for (size_t i = 0; i < members.size(); ++i) {
          gate.push_back(&ms[i]->gate);
          up.push_back(&ms[i]->up);
          down.push_back(&ms[i]->down);
          if (whiten_) {
            check_stat_size(static_cast<int64_t>(st.gram_in.size()), w.num_experts(), "gram_in", layer);
            check_stat_size(static_cast<int64_t>(st.gram_mid.size()), w.num_experts(), "gram_mid", layer);
            gin.push_back(&st.gram_in[members[i]]);
            gmid.push_back(&st.gram_mid[members[i]]);
          }
        }
        return core::with_context("layer " + std::to_string(layer), [&] {
          runtime::MlpWeights out{joint_svd_merge(gate, wts, rank_ratio_, whiten_ ? &gin : nullptr, damp_),
                                  joint_svd_merge(up, wts, rank_ratio_, whiten_ ? &gin : nullptr, damp_),
                                  joint_svd_merge(down, wts, rank_ratio_, whiten_ ? &gmid : nullptr, damp_)};
          average_biases(out, ms, wts);
          return out;
        });
      }
    }
    throw Error::internal("merge: method not handled");
  }

  std::string method_name_;
  MergeMethod method_;
  std::optional<uint64_t> seed_;
  int64_t experts_ = 0;
  std::string router_, router_bias_, importance_;
  double rank_ratio_ = 1.0;
  double threshold_ = 0.4;
  bool align_ = true;
  bool protect_ = false;
  bool whiten_ = false;
  double damp_ = 1e-2;
};

}  // namespace

std::unique_ptr<pipeline::Pass> make_merge(const json& spec, const std::string& method, const std::string& path) {
  return std::make_unique<MergePass>(spec, method, path);
}

}  // namespace moe::passes
