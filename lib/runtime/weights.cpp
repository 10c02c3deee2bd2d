#include "runtime/weights.h"

#include <algorithm>
#include <thread>

#include "core/error.h"
#include "quant/lowrank.h"
#include "runtime/ops.h"
#include "runtime/finite.h"
#include "runtime/mpi.h"

namespace moe::runtime {

using core::Error;

namespace {

// Converts t into m, reusing m's storage when the element count is unchanged.
void assign(MatrixRM& m, const core::Tensor& t) {
  if (t.rank() != 2) throw Error::internal("to_matrix: expected a 2-D tensor, got " + core::shape_str(t.shape()));
  if (m.rows() != t.dim(0) || m.cols() != t.dim(1)) m.resize(t.dim(0), t.dim(1));
  t.to_f32(m.data());
  check_finite(m.data(), m.size(), m.cols(), t);
}

void assign(RowVector& v, const core::Tensor& t) {
  if (v.size() != t.numel()) v.resize(t.numel());
  t.to_f32(v.data());
  check_finite(v.data(), v.size(), 0, t);
}

void assign(std::optional<RowVector>& v, const core::Tensor* t) {
  if (!t) {
    v.reset();
    return;
  }
  if (!v) v.emplace();
  assign(*v, *t);
}

// A projection: its factors when `factored` and the tensor is low-rank, else dense.
void assign(MatrixRM& dense, std::optional<LowRankWeights>& lr, const core::Tensor& t, bool factored) {
  const auto* enc = factored ? dynamic_cast<const quant::LowRank*>(t.encoding()) : nullptr;
  if (!enc) {
    lr.reset();
    assign(dense, t);
    return;
  }
  dense.resize(0, 0);
  if (!lr) lr.emplace();
  assign(lr->a, enc->a());
  assign(lr->b, enc->b());
  if (enc->base()) assign(lr->base, *enc->base());
  else lr->base.resize(0, 0);
}

void assign(MlpWeights& w, const model::Mlp& m, bool factored) {
  if (m.novice) {
    core::with_context("novice", [&] { w.novice = to_row(*m.novice); });
    w.gate.resize(0, 0);
    w.up.resize(0, 0);
    w.down.resize(0, 0);
    w.gate_lr.reset();
    w.up_lr.reset();
    w.down_lr.reset();
    w.gate_bias.reset();
    w.up_bias.reset();
    w.down_bias.reset();
    return;
  }
  w.novice.reset();
  w.act = m.act;
  core::with_context("gate", [&] { assign(w.gate, w.gate_lr, m.gate, factored); });
  core::with_context("up", [&] { assign(w.up, w.up_lr, m.up, factored); });
  core::with_context("down", [&] { assign(w.down, w.down_lr, m.down, factored); });
  core::with_context("gate bias", [&] { assign(w.gate_bias, m.gate_bias ? &*m.gate_bias : nullptr); });
  core::with_context("up bias", [&] { assign(w.up_bias, m.up_bias ? &*m.up_bias : nullptr); });
  core::with_context("down bias", [&] { assign(w.down_bias, m.down_bias ? &*m.down_bias : nullptr); });
}

void assign_expert(MlpWeights& w, const model::Mlp& m, size_t e, bool factored) {
  core::with_context("expert " + std::to_string(e), [&] { assign(w, m, factored); });
}

void assign(MoeWeights& w, const model::MoeBlock& b, bool factored, bool stream = false, bool owned_only = false) {
  core::with_context("router", [&] { assign(w.router, b.router); });
  assign(w.router_bias, b.router_bias ? &*b.router_bias : nullptr);
  // Streamed: no expert converted here, only their widths kept (MoeWeights::expert converts one).
  const size_t E = stream ? 0 : b.experts.size();
  w.source = stream ? &b : nullptr;
  w.factored = factored;
  w.widths.clear();
  const mpi::World& world = mpi::World::get();
  owned_only = owned_only && !stream && world.split();
  if (stream || owned_only)
    for (const auto& e : b.experts) w.widths.push_back(e.width());
  w.experts.resize(E);
  // Over MPI ranks (owned_only): the experts of the other ranks stay empty, never converted.
  std::vector<size_t> todo;
  for (size_t e = 0; e < E; ++e) {
    if (owned_only && !world.owns(static_cast<int64_t>(e))) w.experts[e] = MlpWeights{};
    else todo.push_back(e);
  }
  auto convert = [&](size_t i) { assign_expert(w.experts[todo[i]], b.experts[todo[i]], todo[i], factored); };
  // Dequantising is memory bound and single-threaded per tensor: split the experts over 2 threads.
  int64_t params = 0;
  for (const size_t e : todo) params += b.experts[e].params();
  if (todo.size() >= 2 && params >= (int64_t{1} << 20)) {
    std::exception_ptr err;
    std::thread t([&] {
      try {
        for (size_t i = 1; i < todo.size(); i += 2) convert(i);
      } catch (...) {
        err = std::current_exception();
      }
    });
    try {
      for (size_t i = 0; i < todo.size(); i += 2) convert(i);
    } catch (...) {
      t.join();
      throw;
    }
    t.join();
    if (err) std::rethrow_exception(err);
  } else {
    for (size_t i = 0; i < todo.size(); ++i) convert(i);
  }
  if (b.shared) {
    if (!w.shared) w.shared.emplace();
    core::with_context("shared expert", [&] { assign(*w.shared, *b.shared, factored); });
  } else {
    w.shared.reset();
  }
  assign(w.shared_gate, b.shared_gate ? &*b.shared_gate : nullptr);
}

void assign_delta_net(DeltaNetWeights& w, const core::Tensor& qkvz, const core::Tensor& ba, const core::Tensor& conv,
                      const core::Tensor& dt_bias, const core::Tensor& a_log, const core::Tensor& norm,
                      const core::Tensor& out) {
  assign(w.in_proj_qkvz, qkvz);
  assign(w.in_proj_ba, ba);
  if (conv.rank() != 3 || conv.dim(1) != 1)
    throw Error::internal("conv1d: expected [channels, 1, kernel], got " + core::shape_str(conv.shape()));
  assign(w.conv1d, conv.reshaped({conv.dim(0), conv.dim(2)}));
  assign(w.dt_bias, dt_bias);
  assign(w.A_log, a_log);
  assign(w.norm, norm);
  assign(w.out_proj, out);
}

}  // namespace

const MlpWeights& MoeWeights::expert(int64_t e, MlpWeights& scratch) const {
  if (!source) return experts.at(static_cast<size_t>(e));
  const model::Mlp& m = source_expert(e);
  core::with_context("layer " + std::to_string(layer), [&] { assign_expert(scratch, m, static_cast<size_t>(e), factored); });
  release_expert(e);
  return scratch;
}

bool MoeWeights::expert_in_tiles(int64_t e) const {
  if (!source) return false;
  const model::Mlp& m = source_expert(e);
  if (m.novice) return false;
  for (const core::Tensor* t : {&m.gate, &m.up, &m.down}) {
    const core::Encoding* enc = t->encoding();
    if (enc && (!enc->decodes_row_ranges_alone() || (factored && dynamic_cast<const quant::LowRank*>(enc)))) return false;
  }
  return true;
}

void MoeWeights::release_expert(int64_t e) const {
  if (!release) return;
  source_expert(e).for_each_tensor([&](const core::Tensor& t) {
    for (const core::Tensor* p : t.stored_tensors()) release(p->data(), p->nbytes());
  });
}

void project_in_tiles(int64_t n, const float* X, int64_t ldx, const core::Tensor& W, float* Y, int64_t ldy,
                      std::vector<float>& tile) {
  if (W.rank() != 2) throw Error::internal("project_in_tiles: expected a 2-D weight, got " + core::shape_str(W.shape()));
  const int64_t out = W.dim(0), in = W.dim(1);
  // About 4 MB of f32 a tile (in the shared cache while it is multiplied), a multiple of 64 rows.
  const int64_t rows = std::max<int64_t>(64, ((int64_t{1} << 20) / std::max<int64_t>(in, 1)) / 64 * 64);
  const int64_t size = std::min(rows, out) * in;
  if (static_cast<int64_t>(tile.size()) < size) tile.resize(static_cast<size_t>(size));
  for (int64_t r0 = 0; r0 < out; r0 += rows) {
    const int64_t r1 = std::min(out, r0 + rows);
    W.rows_to_f32(r0, r1, tile.data());
    check_finite(tile.data(), (r1 - r0) * in, in, W, r0 * in);
    gemm_nt(n, r1 - r0, in, 1.0f, X, ldx, tile.data(), in, 0.0f, Y + r0, ldy);
  }
}

MatrixRM to_matrix(const core::Tensor& t) {
  MatrixRM m;
  assign(m, t);
  return m;
}

RowVector to_row(const core::Tensor& t) {
  RowVector v;
  assign(v, t);
  return v;
}

MatrixRM project(const MatrixRM& X, const MatrixRM& w, const std::optional<LowRankWeights>& lr) {
  if (!lr) return linear(X, w);
  MatrixRM y = lr->rows() && lr->b.rows() ? linear(linear(X, lr->b), lr->a) : MatrixRM::Zero(X.rows(), lr->rows());
  if (lr->base.size()) y += linear(X, lr->base);
  return y;
}

MlpWeights convert_mlp(const model::Mlp& m) {
  MlpWeights w;
  assign(w, m, false);
  return w;
}

MoeWeights convert_moe(const model::MoeBlock& b) {
  MoeWeights w;
  assign(w, b, false);
  return w;
}

LayerWeights convert_layer(const model::Layer& l, bool factored) {
  LayerWeights w;
  convert_layer_into(l, w, factored);
  return w;
}

void convert_layer_into(const model::Layer& l, LayerWeights& w, bool factored, bool stream_experts,
                        const model::Model::PageReleaser& release, bool owned_experts_only) {
  core::with_context("layer " + std::to_string(l.index), [&] {
    w.index = l.index;
    auto need = [&](const char* role) -> const core::Tensor& {
      const core::Tensor* t = l.find(role);
      if (!t) throw Error::unsupported(std::string("no '") + role + "' tensor (attention kind not supported by the forward)");
      return *t;
    };
    assign(w.input_norm, need("input_norm"));
    assign(w.post_attn_norm, need("post_attn_norm"));
    assign(w.input_norm_bias, l.find("input_norm_bias"));
    assign(w.post_attn_norm_bias, l.find("post_attn_norm_bias"));
    if (l.find("in_proj_qkvz")) {  // qwen3_next Gated DeltaNet (a linear-attention layer): no attention
      if (!w.delta_net) w.delta_net.emplace();
      assign_delta_net(*w.delta_net, need("in_proj_qkvz"), need("in_proj_ba"), need("conv1d"), need("dt_bias"),
                       need("A_log"), need("linear_norm"), need("out_proj"));
      w.attn = AttnWeights{};
    } else {
      w.delta_net.reset();
      assign(w.attn.o, need("o_proj"));
      if (l.find("kv_a_proj")) {  // MLA
        auto matrix_or_empty = [&](MatrixRM& m, const char* role) {
          if (const core::Tensor* t = l.find(role)) assign(m, *t);
          else m.resize(0, 0);
        };
        matrix_or_empty(w.attn.q, "q_proj");
        matrix_or_empty(w.attn.q_a, "q_a_proj");
        matrix_or_empty(w.attn.q_b, "q_b_proj");
        assign(w.attn.q_a_norm, l.find("q_a_norm"));
        assign(w.attn.kv_a, need("kv_a_proj"));
        assign(w.attn.kv_a_norm, need("kv_a_norm"));
        assign(w.attn.kv_b, need("kv_b_proj"));
        w.attn.k.resize(0, 0);
        w.attn.v.resize(0, 0);
      } else {
        assign(w.attn.q, need("q_proj"));
        assign(w.attn.k, need("k_proj"));
        assign(w.attn.v, need("v_proj"));
        w.attn.kv_a.resize(0, 0);
      }
      assign(w.attn.q_bias, l.find("q_bias"));
      assign(w.attn.k_bias, l.find("k_bias"));
      assign(w.attn.v_bias, l.find("v_bias"));
      assign(w.attn.o_bias, l.find("o_bias"));
      assign(w.attn.q_norm, l.find("q_norm"));
      assign(w.attn.k_norm, l.find("k_norm"));
      assign(w.attn.sinks, l.find("sinks"));
    }
    if (l.moe) {
      if (!w.moe) w.moe.emplace();
      assign(*w.moe, *l.moe, factored, stream_experts, owned_experts_only);
      w.moe->layer = l.index;
      w.moe->release = stream_experts ? release : model::Model::PageReleaser{};
    } else {
      w.moe.reset();
    }
    if (l.mlp) {
      if (!w.mlp) w.mlp.emplace();
      assign(*w.mlp, *l.mlp, factored);
    } else {
      w.mlp.reset();
    }
  });
}

}  // namespace moe::runtime
