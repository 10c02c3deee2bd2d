// Tiny synthetic MoE layers built in memory for the pass tests.
#pragma once

#include <cstring>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "calib/stats.h"
#include "core/tensor.h"
#include "model/model.h"
#include "passes/pass.h"
#include "runtime/routing.h"
#include "runtime/weights.h"

namespace moe::passes::testing {

using runtime::MatrixRM;

inline MatrixRM random_matrix(int64_t r, int64_t c, std::mt19937_64& rng, float scale = 1.0f) {
  std::normal_distribution<float> nd(0.0f, scale);
  MatrixRM m(r, c);
  for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = nd(rng);
  return m;
}

inline core::Tensor tensor_of(const MatrixRM& m, core::DType dt = core::DType::F32) {
  std::vector<float> v(m.data(), m.data() + m.size());
  return core::Tensor::from_f32(v, {m.rows(), m.cols()}).converted(dt);
}

inline MatrixRM matrix_of(const core::Tensor& t) { return runtime::to_matrix(t); }

inline model::Mlp mlp_of(const runtime::MlpWeights& w, core::DType dt = core::DType::F32) {
  return {tensor_of(w.gate, dt), tensor_of(w.up, dt), tensor_of(w.down, dt)};
}

inline runtime::MlpWeights random_mlp(int64_t H, int64_t I, std::mt19937_64& rng) {
  const float s = 1.0f / std::sqrt(static_cast<float>(H));
  return {random_matrix(I, H, rng, s), random_matrix(I, H, rng, s), random_matrix(H, I, rng, s)};
}

struct LayerSpec {
  int E = 6, H = 8, I = 4;
  uint64_t seed = 1;
  core::DType dtype = core::DType::F32;
  bool shared = false, shared_gate = false, router_bias = false;
};

inline model::Layer make_layer(const LayerSpec& s, int index = 0) {
  std::mt19937_64 rng(s.seed);
  model::Layer l;
  l.index = index;
  model::MoeBlock b;
  b.router = tensor_of(random_matrix(s.E, s.H, rng), s.dtype);
  for (int e = 0; e < s.E; ++e) b.experts.push_back(mlp_of(random_mlp(s.H, s.I, rng), s.dtype));
  if (s.shared) b.shared = mlp_of(random_mlp(s.H, 2 * s.I, rng), s.dtype);
  if (s.shared_gate) b.shared_gate = tensor_of(random_matrix(1, s.H, rng), s.dtype);
  if (s.router_bias) {
    std::vector<float> bias(s.E);
    for (int e = 0; e < s.E; ++e) bias[e] = 0.1f * static_cast<float>(e % 3) - 0.05f * static_cast<float>(e);
    b.router_bias = core::Tensor::from_f32(bias, {s.E});
  }
  l.moe = std::move(b);
  return l;
}

inline runtime::RoutingRule softmax_rule(int E, int k, bool renorm = true) {
  runtime::RoutingRule r;
  r.family = "test";
  r.kind = model::Routing::SoftmaxTopK;
  r.top_k = k;
  r.num_experts = E;
  r.renormalize = renorm;
  return r;
}

inline calib::LayerStats make_stats(int E, int H = 8) {
  calib::LayerStats s;
  s.count.assign(E, 1.0);
  s.prob_sum.assign(E, 1.0);
  s.weight_sum.assign(E, 1.0);
  s.reap.assign(E, 1.0);
  s.out_absmax.assign(E, 1.0f);
  s.out_mean = calib::MatrixF::Zero(E, H);
  s.logit_sim = calib::MatrixF::Constant(E, E, 0.5f);
  s.out_cos = calib::MatrixF::Identity(E, E);
  s.coact = calib::MatrixD::Zero(E, E);
  s.super_expert.assign(E, false);
  return s;
}

// A LayerContext over `layer` (owned by the caller with the model and report).
struct Ctx {
  model::Model model;
  model::Layer layer;
  nlohmann::json report = nlohmann::json::object();
  calib::LayerStats stats;
  MatrixRM x;
  pipeline::LayerContext make(const runtime::RoutingRule& rule, uint64_t seed = 7, bool with_stats = true,
                              bool with_x = false) {
    pipeline::LayerContext c{layer.index, model, layer, with_stats ? &stats : nullptr, with_x ? &x : nullptr,
                             rule, seed, report};
    return c;
  }
};

inline bool same_bytes(const core::Tensor& a, const core::Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

}  // namespace moe::passes::testing
