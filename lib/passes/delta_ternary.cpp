#include "passes/delta_ternary.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>

#include "core/error.h"
#include "io/checkpoint.h"
#include "passes/experts.h"
#include "passes/options.h"
#include "quant/delta_ternary.h"

namespace moe::passes {

using core::Error;
using nlohmann::json;

namespace {

constexpr double kDefaultDensity = 0.1;

double round6(double v) { return std::round(v * 1e6) / 1e6; }

// Expected Rice-coded bits per kept entry when kept positions are independent with probability ρ
// (geometric gaps), at the best k: k + 2 + E[g >> k] with E[g >> k] = q / (1 − q), q = (1 − ρ)^(2^k).
double rice_bits_per_entry(double rho) {
  double best = 1e300;
  for (int k = 0; k <= 30; ++k) {
    const double q = std::pow(1.0 - rho, std::ldexp(1.0, k));
    best = std::min(best, k + 2 + (q >= 1 ? 1e300 : q / (1 - q)));
  }
  return best;
}

class DeltaTernaryPass final : public pipeline::Pass {
 public:
  DeltaTernaryPass(const json& spec, const std::string& path) {
    Options o(spec, path, "quantize/delta-ternary");
    o.allow({"pass", "method"});
    const bool has_density = o.has("density");
    density_ = o.get_number("density", kDefaultDensity, 0, 1, true);
    // (0, 1), open at both ends: one message for every value outside it.
    if (spec.contains("max_error") && spec.at("max_error").is_number() &&
        !(spec.at("max_error").get<double>() > 0 && spec.at("max_error").get<double>() < 1))
      throw Error::invalid(o.key_path("max_error") + ": expected a number in (0, 1), found " + json_found(spec.at("max_error")));
    max_error_ = o.opt_number("max_error", 0, 1, true);
    if (max_error_ && *max_error_ >= 1)
      throw Error::invalid(o.key_path("max_error") + ": expected a number in (0, 1), found " + json_found(spec.at("max_error")));
    if (max_error_ && has_density)
      throw Error::invalid(o.key_path("density") + ": give density or max_error, not both");
    if (auto p = o.opt_string("parent")) parent_path_ = *p, parent_key_ = o.key_path("parent");
    o.finish();
  }

  std::string name() const override { return "quantize"; }
  std::string method() const override { return "delta-ternary"; }
  json params() const override {
    json p = {{"pass", "quantize"}, {"method", "delta-ternary"},
              {"base", parent_path_.empty() ? "mean of the layer's experts" : "parent's MLP"}};
    if (!parent_path_.empty()) p["parent"] = parent_path_;
    if (max_error_) p["max_error"] = *max_error_;
    else p["density"] = density_;
    if (estimate_) p["estimated_bits_per_expert_param"] = *estimate_;
    return p;
  }
  pipeline::Requirements requirements() const override { return {}; }
  int64_t experts_after(int, int64_t before, int64_t) const override { return before; }
  bool shapes_at_run() const override { return true; }

  void check_model(const model::Model& m) const override {
    if (!parent_path_.empty()) load_parent(m);
    for (const auto& l : m.layers()) {
      if (!l.moe) continue;
      if (!estimate_ && !max_error_ && l.moe->num_experts() > 0 && !l.moe->experts[0].is_novice()) {
        // The plan's figure (density rule): the base's share, the kept entries' expected Rice
        // bits, the scale; the run reports the exact stored bits.
        const auto& x = l.moe->experts[0];
        const double n = static_cast<double>(x.gate.numel());
        const double base_bits = 8.0 * static_cast<double>(core::dtype_size(base_dtype(x.gate)));
        const double e = static_cast<double>(l.moe->num_experts());
        estimate_ = std::round(1e3 * (base_bits / e + density_ * rice_bits_per_entry(density_) + 32.0 / n)) / 1e3;
      }
      for (size_t e = 0; e < l.moe->experts.size(); ++e) {
        const auto& x = l.moe->experts[e];
        const std::string where = "layer " + std::to_string(l.index) + " expert " + std::to_string(e);
        if (x.is_novice()) throw Error::invalid(where + ": a novice expert (MoNE) has no weights to store as a delta");
        if (x.has_bias()) throw Error::invalid(where + ": experts with biases are not delta-coded (the biases would need a base too)");
      }
      return;
    }
    throw Error::invalid("quantize --method delta-ternary: applies to routed experts, and the model has no MoE layer");
  }

  std::vector<std::string> dequantizes(const EncodedClasses& encoded) const override {
    auto it = encoded.find("experts");
    if (it == encoded.end() || it->second.empty()) return {};
    std::string list;
    for (const auto& e : it->second) list += (list.empty() ? "" : ", ") + e;
    return {"experts stored as " + list + " are dequantized and written delta-ternary (the base in bf16): the earlier "
            "encoding is replaced, not kept"};
  }
  EncodedClasses encodes() const override { return {{"experts", {"delta-ternary"}}}; }

  void run_layer(pipeline::LayerContext& ctx) override {
    model::MoeBlock& moe = *ctx.target.moe;
    json& rep = ctx.report;
    rep["matrices"] = json::array();
    const int64_t E = moe.num_experts();
    if (E == 0) return;
    static const char* const kTypes[] = {"gate", "up", "down"};
    for (int t = 0; t < 3; ++t) {
      auto tensor_of = [&](int64_t e) -> core::Tensor& {
        model::Mlp& x = moe.experts[static_cast<size_t>(e)];
        return t == 0 ? x.gate : t == 1 ? x.up : x.down;
      };
      std::vector<runtime::MatrixRM> w;
      w.reserve(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) {
        const std::string what = "expert " + std::to_string(e) + " " + kTypes[t];
        w.push_back(core::with_context(what, [&] { return runtime::to_matrix(tensor_of(e)); }));
        if (!w.back().allFinite()) throw Error::invalid(what + ": a weight is not finite (NaN or Inf)");
      }
      const core::DType bd = base_dtype(tensor_of(0));
      std::shared_ptr<const core::Tensor> base_part;
      if (parent_model_) {  // the parent's MLP matrix as it is stored (checked in check_model)
        const model::Mlp& pm = *parent_model_->layers()[static_cast<size_t>(ctx.layer)].mlp;
        const core::Tensor& pt = t == 0 ? pm.gate : t == 1 ? pm.up : pm.down;
        base_part = std::make_shared<const core::Tensor>(pt.encoding() || pt.dtype() != bd ? to_tensor(runtime::to_matrix(pt), bd) : pt);
      } else {
        Eigen::MatrixXd sum = Eigen::MatrixXd::Zero(w[0].rows(), w[0].cols());
        for (const auto& m : w) sum += m.cast<double>();
        base_part = std::make_shared<const core::Tensor>(to_tensor(runtime::MatrixRM((sum / static_cast<double>(E)).cast<float>()), bd));
      }
      const runtime::MatrixRM base = runtime::to_matrix(*base_part);  // as stored
      const double n = static_cast<double>(base.size());
      const double base_bytes = static_cast<double>(base_part->nbytes());
      for (int64_t e = 0; e < E; ++e) {
        const SparseDelta d = sparse_delta(w[static_cast<size_t>(e)], base, max_error_ ? -1.0 : density_, max_error_.value_or(-1.0));
        auto enc = quant::DeltaTernary::pack(base_part, d.positions, d.negative, d.scale);
        const double own_bytes = static_cast<double>(enc->parts()[1].tensor->nbytes() + enc->parts()[2].tensor->nbytes());
        json m = {{"matrix", "expert " + std::to_string(e) + " " + kTypes[t]},
                  {"density", round6(static_cast<double>(d.positions.size()) / n)},
                  {"scale", d.scale},
                  {"rel_error", round6(d.rel_error)},
                  {"bits_per_param", round6(8.0 * (own_bytes + base_bytes / static_cast<double>(E)) / n)},
                  {"written", {{"encoding", enc->name()}, {"nnz", enc->nnz()}, {"rice_k", enc->rice_k()}}}};
        if (!d.reached) {
          m["note"] = "max_error not reached: the density with the least error kept";
          ++unreached_;
        }
        rep["matrices"].push_back(m);
        tensor_of(e) = core::Tensor::encoded(enc, bd);
      }
    }
  }

  std::vector<std::string> run_warnings() const override {
    if (!unreached_) return {};
    return {std::to_string(unreached_) + " expert matrices could not reach max_error " + json(*max_error_).dump() +
            " (the density with the least error kept for them; see the report's notes)"};
  }

 private:
  static core::DType base_dtype(const core::Tensor& t) {
    if (t.encoding()) return core::DType::BF16;
    const core::DType d = t.dtype();
    return (d == core::DType::F32 || d == core::DType::BF16 || d == core::DType::F16) ? d : core::DType::BF16;
  }

  // The parent (parent_path_): a dense checkpoint with the input's layer count whose MLP of every
  // MoE layer has the experts' shapes. Error::invalid naming the key otherwise.
  void load_parent(const model::Model& m) const {
    if (parent_model_) return;
    core::with_context(parent_key_, [&] {
      parent_ckpt_ = std::make_shared<io::Checkpoint>(io::Checkpoint::open(io::Env::posix(), parent_path_));
    });
    auto pm = std::make_shared<model::Model>(model::Model::load(*parent_ckpt_));
    if (pm->layers().size() != m.layers().size())
      throw Error::invalid(parent_key_ + ": " + parent_path_ + " has " + std::to_string(pm->layers().size()) +
                           " layers, the model " + std::to_string(m.layers().size()));
    for (const auto& l : m.layers()) {
      if (!l.moe || l.moe->experts.empty()) continue;
      const auto& pl = pm->layers()[static_cast<size_t>(l.index)];
      const auto& x = l.moe->experts[0];
      if (!pl.mlp || pl.mlp->gate.shape() != x.gate.shape() || pl.mlp->up.shape() != x.up.shape() ||
          pl.mlp->down.shape() != x.down.shape())
        throw Error::invalid(parent_key_ + ": layer " + std::to_string(l.index) + " of " + parent_path_ +
                             (pl.mlp ? " has an MLP of gate " + core::shape_str(pl.mlp->gate.shape()) : std::string(" has no dense MLP")) +
                             ", the experts have gate " + core::shape_str(x.gate.shape()) +
                             " (the parent must be the dense model the experts were upcycled from)");
    }
    parent_model_ = std::move(pm);
  }

  std::string parent_path_, parent_key_;
  mutable std::shared_ptr<io::Checkpoint> parent_ckpt_;
  mutable std::shared_ptr<const model::Model> parent_model_;
  double density_ = kDefaultDensity;
  std::optional<double> max_error_;
  mutable std::optional<double> estimate_;
  int64_t unreached_ = 0;
};

}  // namespace

SparseDelta sparse_delta(const runtime::MatrixRM& w, const runtime::MatrixRM& base, double density, double max_error) {
  if (w.rows() != base.rows() || w.cols() != base.cols()) throw Error::internal("sparse_delta: shapes differ");
  const int64_t n = w.size();
  std::vector<float> dl(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    dl[static_cast<size_t>(i)] = w.data()[i] - base.data()[i];
    if (!std::isfinite(dl[static_cast<size_t>(i)])) throw Error::invalid("sparse_delta: a delta is not finite (NaN or Inf)");
  }
  // Nonzero deltas by decreasing magnitude, ties by lower flat index.
  std::vector<int64_t> order;
  for (int64_t i = 0; i < n; ++i)
    if (dl[static_cast<size_t>(i)] != 0) order.push_back(i);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const float fa = std::fabs(dl[static_cast<size_t>(a)]), fb = std::fabs(dl[static_cast<size_t>(b)]);
    return fa != fb ? fa > fb : a < b;
  });
  double d2 = 0, w2 = 0;
  for (int64_t i = 0; i < n; ++i) d2 += double(dl[static_cast<size_t>(i)]) * dl[static_cast<size_t>(i)];
  w2 = w.cast<double>().squaredNorm();
  const int64_t nz = static_cast<int64_t>(order.size());
  SparseDelta out;
  int64_t m = 0;
  if (max_error < 0) {
    m = std::min<int64_t>(nz, static_cast<int64_t>(std::llround(density * static_cast<double>(n))));
  } else {
    // The residual at m is ‖D‖² − (Σ_{top m} |D|)² / m, not monotone in m (a one-scale ternary
    // code fits many small deltas badly): the first m reaching the target, else the best m.
    const double target2 = max_error * max_error * w2;
    double s = 0, best = d2;
    m = 0;
    out.reached = d2 <= target2;
    for (int64_t j = 0; j < nz && !out.reached; ++j) {
      s += std::fabs(dl[static_cast<size_t>(order[static_cast<size_t>(j)])]);
      const double r2 = d2 - s * s / static_cast<double>(j + 1);
      if (r2 < best) best = r2, m = j + 1;
      if (r2 <= target2) m = j + 1, out.reached = true;
    }
  }
  double sum = 0;
  for (int64_t j = 0; j < m; ++j) sum += std::fabs(dl[static_cast<size_t>(order[static_cast<size_t>(j)])]);
  out.scale = m ? static_cast<float>(sum / static_cast<double>(m)) : 0.0f;
  out.positions.assign(order.begin(), order.begin() + m);
  std::sort(out.positions.begin(), out.positions.end());
  out.negative.reserve(out.positions.size());
  double err2 = 0;
  std::vector<float> rec(dl);
  for (int64_t p : out.positions) {
    const bool neg = dl[static_cast<size_t>(p)] < 0;
    out.negative.push_back(neg);
    rec[static_cast<size_t>(p)] -= neg ? -out.scale : out.scale;
  }
  for (float r : rec) err2 += double(r) * r;
  out.rel_error = w2 > 0 ? std::sqrt(err2 / w2) : 0.0;
  return out;
}

std::unique_ptr<pipeline::Pass> make_delta_ternary(const json& spec, const std::string& path) {
  return std::make_unique<DeltaTernaryPass>(spec, path);
}

}  // namespace moe::passes
