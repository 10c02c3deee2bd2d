#include "runtime/moe_block.h"

#include <cmath>
#include <optional>

#include "core/error.h"
#include "runtime/ops.h"
#include "runtime/profile.h"

namespace moe::runtime {

MatrixRM mlp_forward(const MlpWeights& w, const MatrixRM& x, MatrixRM* h_out) {
  if (w.novice) {  // MoNE: the constant n_e on every row, no intermediate activations
    if (h_out) h_out->resize(x.rows(), 0);
    return w.novice->replicate(x.rows(), 1);
  }
  MatrixRM g = mlp_hidden(w, x);
  MatrixRM y = project(g, w.down, w.down_lr);
  if (w.down_bias) y.rowwise() += *w.down_bias;
  if (h_out) *h_out = std::move(g);
  return y;
}

MatrixRM mlp_hidden(const MlpWeights& w, const MatrixRM& x) {
  if (w.novice) throw core::Error::internal("mlp_hidden: a novice expert has no intermediate activations");
  MatrixRM g = project(x, w.gate, w.gate_lr);
  MatrixRM u = project(x, w.up, w.up_lr);
  if (w.gate_bias) g.rowwise() += *w.gate_bias;
  if (w.up_bias) u.rowwise() += *w.up_bias;
  glu_inplace(g, u, w.act);
  return g;
}

MatrixRM router_logits(const MoeWeights& w, const RoutingRule& rule, const MatrixRM& x) {
  return linear(x, w.router, rule.logit_bias && w.router_bias ? &*w.router_bias : nullptr);
}

const RowVector* choice_bias(const MoeWeights& w, const RoutingRule& rule) {
  return !rule.logit_bias && w.router_bias ? &*w.router_bias : nullptr;
}

std::vector<std::vector<int32_t>> tokens_per_expert(const RoutingResult& r, int64_t E) {
  std::vector<std::vector<int32_t>> t(E);
  for (int64_t n = 0; n < r.ids.rows(); ++n)
    for (int64_t j = 0; j < r.ids.cols(); ++j) {
      const int32_t e = r.ids(n, j);
      if (e < 0 || e >= E) throw core::Error::internal("routing chose expert " + std::to_string(e));
      t[e].push_back(static_cast<int32_t>(n));
    }
  return t;
}

MatrixRM moe_forward(const MoeWeights& w, const RoutingRule& rule, const MatrixRM& x, MoeDetail* detail,
                     bool keep_intermediates, const std::vector<bool>* active) {
  const int64_t N = x.rows(), H = x.cols(), E = w.num_experts(), k = rule.top_k;
  MoeDetail local;
  MoeDetail& d = detail ? *detail : local;
  std::optional<PhaseScope> phase(std::in_place, Phase::Router);
  d.logits = router_logits(w, rule, x);
  d.routing = route(rule, d.logits, choice_bias(w, rule), active);
  d.tokens = tokens_per_expert(d.routing, E);
  if (keep_intermediates) {
    d.h.assign(E, MatrixRM());
    d.y.assign(E, MatrixRM());
  }
  // Experts in index order (as transformers accumulates): gather, GEMMs, scatter-add weighted.
  MatrixRM out = MatrixRM::Zero(N, H);
  MatrixRM xe, h;
  for (int64_t e = 0; e < E; ++e) {
    const auto& tok = d.tokens[e];
    const int64_t ne = static_cast<int64_t>(tok.size());
    if (ne == 0) {
      if (keep_intermediates) {
        d.h[e].resize(0, w.experts[e].width());
        d.y[e].resize(0, H);
      }
      continue;
    }
    phase.emplace(Phase::GatherScatter);
    xe.resize(ne, H);
    for (int64_t j = 0; j < ne; ++j) xe.row(j) = x.row(tok[j]);
    phase.emplace(Phase::ExpertGemms);
    MatrixRM y = mlp_forward(w.experts[e], xe, &h);
    phase.emplace(Phase::GatherScatter);
    for (int64_t j = 0; j < ne; ++j) {
      const int32_t n = tok[j];
      float wt = 0;
      for (int64_t s = 0; s < k; ++s)
        if (d.routing.ids(n, s) == e) wt = d.routing.weights(n, s);
      out.row(n) += wt * y.row(j);
    }
    if (keep_intermediates) {
      d.h[e] = std::move(h);
      d.y[e] = std::move(y);
      h = MatrixRM();
    }
  }
  phase.reset();
  if (w.shared) {
    const PhaseScope timed(Phase::SharedExpert);
    MatrixRM so = mlp_forward(*w.shared, x);
    MatrixRM sg(N, 1);
    if (w.shared_gate) {
      gemm_nt(N, 1, H, 1.0f, x.data(), H, w.shared_gate->data(), H, 0.0f, sg.data(), 1);
      sg = (1.0f / (1.0f + (-sg.array()).exp())).matrix();
    } else {
      sg.setOnes();  // deepseek shared experts: added ungated
    }
    for (int64_t n = 0; n < N; ++n) out.row(n) += sg(n, 0) * so.row(n);
    if (keep_intermediates) {
      d.shared_out = std::move(so);
      d.shared_gate = std::move(sg);
    }
  }
  return out;
}

}  // namespace moe::runtime
