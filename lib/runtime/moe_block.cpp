#include "runtime/moe_block.h"

#include <algorithm>
#include <cmath>
#include <optional>

#include "core/error.h"
#include "runtime/finite.h"
#include "runtime/mpi.h"
#include "runtime/ops.h"
#include "runtime/parallel.h"
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

namespace {

// Storage that grows to the largest request and is kept, aligned as a MatrixRM's (so that the
// element-wise passes over it split into the same packets and give the same values).
using Buffer = std::vector<float, Eigen::aligned_allocator<float>>;
float* grown(Buffer& b, int64_t size) {
  if (static_cast<int64_t>(b.size()) < size) b.resize(static_cast<size_t>(size));
  return b.data();
}

void expect_width(const MatrixRM& w, int64_t in, const char* what) {
  if (w.cols() != in)
    throw core::Error::internal(std::string("mlp: ") + what + " is " + std::to_string(w.rows()) + "x" +
                                std::to_string(w.cols()) + ", the input width " + std::to_string(in));
}

// The gate/up activations of the MLPs run on rows (mlp_rows, expert_rows_in_tiles): this
// thread's, grown to the largest call and kept.
thread_local Buffer t_gate, t_up;

// act(gate x + gate_bias, up x + up_bias), then down (+ down_bias), on n rows of x [n, H] into
// y [n, out] (row strides H and out), the activations [n, I] in this thread's kept buffers.
// project(k, in, dst) writes projection k of its input: 0 gate and 1 up (in = x, dst [n, I]),
// 2 down (in = the activations, dst = y): the caller's GEMMs.
template <typename Project>
void glu_rows(const float* x, int64_t n, int64_t I, int64_t out, float* y, const model::GluActivation& act,
              const RowVector* gate_bias, const RowVector* up_bias, const RowVector* down_bias, Project&& project) {
  float* g = grown(t_gate, n * I);
  float* u = grown(t_up, n * I);
  project(0, x, g);
  project(1, x, u);
  if (gate_bias) Eigen::Map<MatrixRM>(g, n, I).rowwise() += *gate_bias;
  if (up_bias) Eigen::Map<MatrixRM>(u, n, I).rowwise() += *up_bias;
  glu_inplace(g, u, n * I, act);
  project(2, g, y);
  if (down_bias) Eigen::Map<MatrixRM>(y, n, out).rowwise() += *down_bias;
}

const RowVector* ptr(const std::optional<RowVector>& v) { return v ? &*v : nullptr; }

// mlp_forward on n rows x [n, H] (row stride H) into y [n, w's output width] (row stride the same),
// the activations gate/up in this thread's kept buffers. A novice or a low-rank projection takes
// mlp_forward itself (allocating; forwards of factorized models only).
void mlp_rows(const MlpWeights& w, const float* x, int64_t n, int64_t H, float* y) {
  if (n == 0) return;
  if (w.novice || w.gate_lr || w.up_lr || w.down_lr) {
    const MatrixRM xm = Eigen::Map<const MatrixRM>(x, n, H);
    const MatrixRM ym = mlp_forward(w, xm);
    std::copy(ym.data(), ym.data() + ym.size(), y);
    return;
  }
  expect_width(w.gate, H, "gate_proj");
  expect_width(w.up, H, "up_proj");
  const int64_t I = w.gate.rows(), out = w.down.rows();
  if (w.up.rows() != I) throw core::Error::internal("mlp: gate_proj and up_proj widths differ");
  expect_width(w.down, I, "down_proj");
  const float* W[3] = {w.gate.data(), w.up.data(), w.down.data()};
  glu_rows(x, n, I, out, y, w.act, ptr(w.gate_bias), ptr(w.up_bias), ptr(w.down_bias),
           [&](int k, const float* in, float* dst) {
             if (k < 2) gemm_nt(n, I, H, 1.0f, in, H, W[k], H, 0.0f, dst, I);
             else gemm_nt(n, out, I, 1.0f, in, I, W[2], I, 0.0f, dst, out);
           });
}

// Streamed expert e (MoeWeights::expert_in_tiles) on n rows x [n, H] into y [n, H]: glu_rows, as
// mlp_rows runs it, with each projection decoded from its stored weight a tile at a time (project_in_tiles), so no f32
// copy of the expert is made. The same checks, in the same order, with the same messages, as the
// whole conversion (MoeWeights::expert): gate, up, down, then the biases (gpt_oss), which are
// converted first (gate and up are added before down) but checked after down.
void expert_rows_in_tiles(const MoeWeights& w, int64_t e, const float* x, int64_t n, int64_t H, float* y) {
  const model::Mlp& m = w.source_expert(e);
  const int64_t I = m.gate.rank() == 2 ? m.gate.dim(0) : -1;
  if (m.gate.rank() != 2 || m.up.rank() != 2 || m.down.rank() != 2 || m.gate.dim(1) != H || m.up.dim(0) != I ||
      m.up.dim(1) != H || m.down.dim(0) != H || m.down.dim(1) != I)
    throw core::Error::internal("expert " + std::to_string(e) + ": projections " + core::shape_str(m.gate.shape()) + ", " +
                                core::shape_str(m.up.shape()) + ", " + core::shape_str(m.down.shape()) +
                                " do not fit hidden_size " + std::to_string(H));
  thread_local std::vector<float> tile;
  const core::Tensor* bias_tensors[3] = {m.gate_bias ? &*m.gate_bias : nullptr, m.up_bias ? &*m.up_bias : nullptr,
                                         m.down_bias ? &*m.down_bias : nullptr};
  std::optional<RowVector> bias[3];
  for (int i = 0; i < 3; ++i)
    if (bias_tensors[i]) {
      bias[i].emplace(bias_tensors[i]->numel());
      bias_tensors[i]->to_f32(bias[i]->data());
    }
  const core::Tensor* W[3] = {&m.gate, &m.up, &m.down};
  core::with_context("layer " + std::to_string(w.layer), [&] {
    core::with_context("expert " + std::to_string(e), [&] {
      glu_rows(x, n, I, H, y, m.act, ptr(bias[0]), ptr(bias[1]), ptr(bias[2]), [&](int k, const float* in, float* dst) {
        static const char* const kNames[3] = {"gate", "up", "down"};
        core::with_context(kNames[k], [&] {
          if (k < 2) project_in_tiles(n, in, H, *W[k], dst, I, tile);
          else project_in_tiles(n, in, I, *W[2], dst, H, tile);
        });
      });
      static const char* const kBiasNames[3] = {"gate bias", "up bias", "down bias"};
      for (int i = 0; i < 3; ++i)
        if (bias[i]) core::with_context(kBiasNames[i], [&] { check_finite(bias[i]->data(), bias[i]->size(), 0, *bias_tensors[i]); });
    });
  });
  w.release_expert(e);
}

// The output width of an expert or MLP (hidden_size).
int64_t output_width(const MlpWeights& w) {
  return w.novice ? w.novice->size() : w.down_lr ? w.down_lr->rows() : w.down.rows();
}

}  // namespace

void mlp_forward_into(const MlpWeights& w, const MatrixRM& x, MatrixRM& y) {
  y.resize(x.rows(), output_width(w));
  mlp_rows(w, x.data(), x.rows(), x.cols(), y.data());
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

void scale_expert_inputs(Eigen::Ref<MatrixRM> xe, const RoutingResult& r, const std::vector<int32_t>& tokens, int64_t e) {
  for (size_t j = 0; j < tokens.size(); ++j)
    for (int64_t s = 0; s < r.ids.cols(); ++s)
      if (r.ids(tokens[j], s) == e) xe.row(static_cast<int64_t>(j)) *= r.weights(tokens[j], s);
}

RoutingResult route_to_every_expert(const MoeWeights& w, const RoutingRule& rule, const MatrixRM& x) {
  if (!rule.scales_input) throw core::Error::internal("route_to_every_expert: " + rule.family + "'s router weighs the outputs");
  RoutingRule all = rule;
  all.top_k = static_cast<int>(w.router.rows());
  return route(all, router_logits(w, all, x), choice_bias(w, all));
}

MatrixRM moe_forward(const MoeWeights& w, const RoutingRule& rule, const MatrixRM& x, MoeDetail* detail,
                     bool keep_intermediates, const std::vector<bool>* active) {
  MatrixRM out;
  MoeWorkspace ws;
  moe_forward(w, rule, x, out, ws, detail, keep_intermediates, active);
  return out;
}

void moe_forward(const MoeWeights& w, const RoutingRule& rule, const MatrixRM& x, MatrixRM& out, MoeWorkspace& ws,
                 MoeDetail* detail, bool keep_intermediates, const std::vector<bool>* active, bool split_experts) {
  const int64_t N = x.rows(), H = x.cols(), E = w.num_experts(), k = rule.top_k;
  mpi::World& world = mpi::World::get();
  const bool split = split_experts && world.split();
  MoeDetail local;
  MoeDetail& d = detail ? *detail : local;
  std::optional<PhaseScope> phase(std::in_place, Phase::Router);
  d.logits = router_logits(w, rule, x);
  d.routing = route(rule, d.logits, choice_bias(w, rule), active);
  d.tokens = tokens_per_expert(d.routing, E);
  const auto& ids = d.routing.ids;
  if (ids.cols() != k)
    throw core::Error::internal("routing gave " + std::to_string(ids.cols()) + " choices, top_k " + std::to_string(k));
  // row[n * k + s]: the row of token n in the list of its s-th expert; first[e]: the first row of
  // expert e in the workspace (the experts' rows one after the other, N·k in all).
  std::vector<int32_t> row(static_cast<size_t>(N * k), -1);
  std::vector<int64_t> first(static_cast<size_t>(E + 1), 0);
  for (int64_t e = 0; e < E; ++e) {
    first[e + 1] = first[e] + static_cast<int64_t>(d.tokens[e].size());
    for (size_t j = 0; j < d.tokens[e].size(); ++j) {
      const int32_t n = d.tokens[e][j];
      for (int64_t s = 0; s < k; ++s)
        if (ids(n, s) == e) row[static_cast<size_t>(n * k + s)] = static_cast<int32_t>(j);
    }
  }
  auto rows_of = [&](MatrixRM& m, int64_t e) { return m.middleRows(first[e], first[e + 1] - first[e]); };

  // Each expert on its own tokens (gather, GEMMs), the experts spread over the threads (each
  // expert's GEMMs are too small to thread well). Every expert's rows are held at once: N·k rows
  // of inputs and of outputs.
  phase.emplace(Phase::GatherScatter);
  ws.xs.resize(first[E], H);
  parallel_for(E, [&](int64_t e) {
    const auto& tok = d.tokens[e];
    auto xe = rows_of(ws.xs, e);
    for (size_t j = 0; j < tok.size(); ++j) xe.row(static_cast<int64_t>(j)) = x.row(tok[j]);
    if (rule.scales_input) scale_expert_inputs(xe, d.routing, tok, e);
  });
  phase.emplace(Phase::ExpertGemms);
  // Largest expert first, so that the last tasks to start are the short ones (less idle time at
  // the end of the region); the order of the tasks does not change any result.
  std::vector<int64_t> by_size(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) by_size[e] = e;
  std::stable_sort(by_size.begin(), by_size.end(), [&](int64_t a, int64_t b) { return d.tokens[a].size() > d.tokens[b].size(); });
  // Outputs: in the workspace, or (keep_intermediates) one matrix per expert handed out with its
  // intermediate activations.
  std::vector<MatrixRM> ys, hs;
  if (keep_intermediates) {
    ys.resize(static_cast<size_t>(E));
    hs.resize(static_cast<size_t>(E));
  } else {
    ws.ys.resize(first[E], H);
  }
  // Split over MPI ranks, a streamed expert's bad weight is met by its owner alone: every rank
  // stops with its error (mpi::World::agree) before the exchange below.
  world.run_agreed(split, [&] {
    parallel_for(E, [&](int64_t i) {
      const int64_t e = by_size[i];
      const int64_t n = first[e + 1] - first[e];
      if (split && !world.owns(e)) return;  // its owner runs it; its y arrives below
      // A streamed expert is decoded here (every one, routed to or not, so a non-finite weight is
      // refused as when the layer is converted up front): a tile at a time when it can be, else
      // converted whole into this thread's buffers.
      if (!keep_intermediates && w.expert_in_tiles(e)) {
        expert_rows_in_tiles(w, e, ws.xs.data() + first[e] * H, n, H, ws.ys.data() + first[e] * H);
        return;
      }
      thread_local MlpWeights scratch;
      const MlpWeights& we = w.expert(e, scratch);
      if (!keep_intermediates) {
        if (output_width(we) != H) throw core::Error::internal("expert " + std::to_string(e) + ": output width is not hidden_size");
        mlp_rows(we, ws.xs.data() + first[e] * H, n, H, ws.ys.data() + first[e] * H);
      } else if (n == 0) {
        hs[e].resize(0, we.width());
        ys[e].resize(0, H);
      } else {
        ys[e] = mlp_forward(we, rows_of(ws.xs, e), &hs[e]);
      }
    });
  });
  if (split) {
    // Every expert's y from its owner, in one exchange per layer and batch.
    if (keep_intermediates)
      for (int64_t e = 0; e < E; ++e)
        if (!world.owns(e)) ys[e].resize(first[e + 1] - first[e], H);
    world.share_owned(E, [&](int64_t e) -> std::pair<void*, size_t> {
      float* p = keep_intermediates ? ys[e].data() : ws.ys.data() + first[e] * H;
      return {p, static_cast<size_t>((first[e + 1] - first[e]) * H) * sizeof(float)};
    });
  }
  // Scatter-add weighted, each row in expert index order (as transformers accumulates; the sum
  // does not depend on which thread ran which expert).
  phase.emplace(Phase::GatherScatter);
  out.resize(N, H);
  parallel_rows(N, 64, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> order(static_cast<size_t>(k));
    for (int64_t n = r0; n < r1; ++n) {
      for (int64_t s = 0; s < k; ++s) order[s] = s;
      std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids(n, a) < ids(n, b); });
      out.row(n).setZero();
      for (int64_t s : order) {
        const int32_t e = ids(n, s);
        const float wt = rule.scales_input ? 1.0f : d.routing.weights(n, s);
        const int64_t j = row[static_cast<size_t>(n * k + s)];
        if (keep_intermediates)
          out.row(n) += wt * ys[e].row(j);
        else
          out.row(n) += wt * ws.ys.row(first[e] + j);
      }
    }
  });
  if (keep_intermediates) {
    d.h = std::move(hs);
    d.y = std::move(ys);
  }
  phase.reset();
  if (w.shared) {
    const PhaseScope timed(Phase::SharedExpert);
    MatrixRM& so = keep_intermediates ? d.shared_out : ws.shared;
    mlp_forward_into(*w.shared, x, so);
    MatrixRM sg(N, 1);
    if (w.shared_gate) {
      gemm_nt(N, 1, H, 1.0f, x.data(), H, w.shared_gate->data(), H, 0.0f, sg.data(), 1);
      sg = (1.0f / (1.0f + (-sg.array()).exp())).matrix();
    } else {
      sg.setOnes();  // deepseek shared experts: added ungated
    }
    parallel_rows(N, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t n = r0; n < r1; ++n) out.row(n) += sg(n, 0) * so.row(n);
    });
    if (keep_intermediates) d.shared_gate = std::move(sg);
  }
}

}  // namespace moe::runtime
