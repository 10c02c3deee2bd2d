// Dense -> MoE layer mapping (passes/upcycle/layers.h).
#include "passes/upcycle/layers.h"

#include <cmath>

#include "passes/upcycle/experts.h"

namespace moe::passes::upcycling {

using core::Tensor;

core::DType Builder::dtype_of(const Tensor& t) const { return p_.o.dtype ? *p_.o.dtype : t.dtype(); }

std::vector<Out> Builder::globals(bool head) const {
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

std::vector<io::TensorSpec> Builder::global_specs(bool head) const {
  std::vector<io::TensorSpec> specs;
  const auto& m = first(p_);
  for (const auto& r : m.family().globals) {
    if ((r.role == "embed") != head) continue;
    const auto it = m.globals().find(r.role);
    if (it != m.globals().end()) specs.push_back({r.name, dtype_of(it->second), it->second.shape()});
  }
  return specs;
}

std::vector<io::TensorSpec> Builder::output_specs() const {
  std::vector<io::TensorSpec> specs = global_specs(true);
  for (int l = 0; l < p_.L; ++l)
    for (auto& s : layer_specs(l)) specs.push_back(std::move(s));
  for (auto& s : global_specs(false)) specs.push_back(std::move(s));
  return specs;
}

long double Builder::output_bytes() const {
  long double b = 0;
  for (const bool head : {true, false})
    for (const auto& s : global_specs(head)) b += static_cast<long double>(s.nbytes());
  for (int l = 0; l < p_.L; ++l) {
    for (const auto& s : layer_specs(l, false)) b += static_cast<long double>(s.nbytes());
    long double expert = 0;
    for (const auto& s : expert_specs(l, 0)) expert += static_cast<long double>(s.nbytes());
    b += expert * static_cast<long double>(p_.o.experts);
  }
  return b;
}

Tensor Builder::attention_like(const std::string& role, int layer) const {
  std::vector<const Tensor*> ts;
  for (const auto& s : p_.src) {
    const auto& m = *s.model;
    ts.push_back(layer < 0 ? &m.globals().at(role) : m.layers()[layer].find(role));
  }
  if (p_.o.attention == "first" || ts.size() == 1) return *ts.front();
  return mean_of(ts);
}

std::vector<Out> Builder::layer(int l) const {
  std::vector<Out> out;
  const auto& f = *p_.target;
  const auto& m0 = first(p_);
  const auto& L0 = m0.layers()[l];
  const std::string prefix = model::expand(f.layer_prefix, l);
  const core::DType wd = dtype_of(L0.mlp->gate);
  for (const auto& r : f.layer_roles) {
    const Tensor* t = L0.find(r.role);
    if (t) {
      out.push_back({prefix + r.name, dtype_of(*t), attention_like(r.role, l)});
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
    std::vector<float> v;
    if (!p_.routers.empty()) {
      v = p_.routers[l];
    } else {
      v.resize(static_cast<size_t>(E * H));
      Normal z(mix(p_.o.seed, 1, static_cast<uint64_t>(l)));
      for (auto& x : v) x = static_cast<float>(p_.o.router_std * z());
    }
    router = Tensor::from_f32(v, {E, H});
    out.push_back({prefix + f.router, wd, router});
  }
  const double routed_scale = p_.o.shared_expert ? 0.5 : 1.0;
  const int64_t G = p_.o.method == "split" ? p_.o.segments : 1;
  std::vector<std::vector<std::vector<int64_t>>> segs(p_.src.size());
  if (p_.o.method == "split")
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
    if (p_.o.method == "copy") {
      x = {dense.gate, dense.up, scaled(dense.down, routed_scale)};
    } else if (p_.o.method == "drop") {
      x = drop_expert(dense, p_.o.drop_ratio, mix(p_.o.seed, 3, static_cast<uint64_t>(l), static_cast<uint64_t>(e)));
      if (routed_scale != 1.0) x.down = scaled(x.down, routed_scale);
    } else {
      x = segment_expert(dense, segs[s][g], sg, su, sd * routed_scale);
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
    if (p_.o.shared_expert) {
      sh = dense;
    } else {
      sh = {Tensor::zeros(dense.gate.dtype(), {SW, H}), Tensor::zeros(dense.up.dtype(), {SW, H}),
            Tensor::zeros(dense.down.dtype(), {H, SW})};
    }
    out.push_back({prefix + f.shared_gate, dtype_of(dense.gate), sh.gate});
    out.push_back({prefix + f.shared_up, dtype_of(dense.up), sh.up});
    out.push_back({prefix + f.shared_down, dtype_of(dense.down), sh.down});
    out.push_back({prefix + f.shared_expert_gate, wd, Tensor::zeros(wd, {1, H})});
  }
  return out;
}

std::vector<io::TensorSpec> Builder::expert_specs(int l, int64_t e) const {
  const auto& f = *p_.target;
  const auto& L0 = first(p_).layers()[l];
  const std::string prefix = model::expand(f.layer_prefix, l);
  const int64_t H = p_.H, W = p_.width;
  const int ei = static_cast<int>(e);
  return {{prefix + model::expand(f.expert_gate, l, ei), dtype_of(L0.mlp->gate), {W, H}},
          {prefix + model::expand(f.expert_up, l, ei), dtype_of(L0.mlp->up), {W, H}},
          {prefix + model::expand(f.expert_down, l, ei), dtype_of(L0.mlp->down), {H, W}}};
}

std::vector<io::TensorSpec> Builder::layer_specs(int l, bool with_experts) const {
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
  if (with_experts)
    for (int64_t e = 0; e < E; ++e)
      for (auto& s : expert_specs(l, e)) specs.push_back(std::move(s));
  if (f.has_shared()) {
    const int64_t SW = p_.o.shared_expert ? p_.I : W;
    specs.push_back({prefix + f.shared_gate, dtype_of(L0.mlp->gate), {SW, H}});
    specs.push_back({prefix + f.shared_up, dtype_of(L0.mlp->up), {SW, H}});
    specs.push_back({prefix + f.shared_down, dtype_of(L0.mlp->down), {H, SW}});
    specs.push_back({prefix + f.shared_expert_gate, wd, {1, H}});
  }
  return specs;
}

void release_layer(const Plan& p, int l) {
  for (const auto& s : p.src) {
    const auto& layer = s.model->layers()[l];
    layer.for_each_tensor([&](const Tensor& t) {
      if (t.data() && !t.owns_data()) s.ckpt->release_range(t.data(), t.nbytes());
    });
  }
}

}  // namespace moe::passes::upcycling
