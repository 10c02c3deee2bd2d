#include "runtime/mtp.h"

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"
#include "runtime/finite.h"
#include "runtime/ops.h"
#include "runtime/weights.h"

namespace moe::runtime {

using core::Error;

namespace {

std::map<std::string, const core::Tensor*> extras_by_name(const model::Model& m) {
  std::map<std::string, const core::Tensor*> by_name;
  for (const auto& [name, t] : m.extras()) by_name[name] = &t;
  return by_name;
}

}  // namespace

model::Layer mtp_decoder_block(const model::Model& m, int l, std::set<std::string>* used) {
  if (l >= 0 && static_cast<size_t>(l) < m.layers().size()) return m.layers()[static_cast<size_t>(l)];
  const model::FamilyDesc& f = m.family();
  const model::Config& c = m.config();
  const auto by_name = extras_by_name(m);
  const std::string prefix = model::expand(f.layer_prefix, l);
  const std::string where = " (multi-token-prediction layer " + std::to_string(l) + ")";
  auto find = [&](const std::string& name) -> const core::Tensor* {
    auto it = by_name.find(name);
    if (it == by_name.end()) return nullptr;
    if (used) used->insert(name);
    return it->second;
  };
  auto need = [&](const std::string& name) -> core::Tensor {
    const core::Tensor* t = find(name);
    if (!t) throw Error::corruption(c.source() + ": tensor " + name + ": missing" + where);
    return *t;
  };
  model::Layer layer;
  layer.index = l;
  for (const auto& r : f.layer_roles) {
    // A tensor the config turns off (use_qk_norm false, ...) is not read, as for the decoder layers.
    if (r.presence.kind == model::Presence::IfConfig && !r.presence.negate && !r.presence.required(c)) continue;
    if (const core::Tensor* t = find(prefix + r.name)) {
      layer.tensors[r.role] = *t;
    } else if (r.presence.required(c)) {
      throw Error::corruption(c.source() + ": tensor " + prefix + r.name + ": missing" + where);
    }
  }
  model::MoeBlock b;
  b.router = need(prefix + f.router);
  if (!f.router_bias.empty()) b.router_bias = need(prefix + f.router_bias);
  for (int e = 0; e < static_cast<int>(b.router.dim(0)); ++e)
    b.experts.push_back(model::Mlp{need(prefix + model::expand(f.expert_gate, l, e)), need(prefix + model::expand(f.expert_up, l, e)),
                                   need(prefix + model::expand(f.expert_down, l, e))});
  if (f.has_shared() && find(prefix + f.shared_gate))
    b.shared = model::Mlp{need(prefix + f.shared_gate), need(prefix + f.shared_up), need(prefix + f.shared_down)};
  layer.moe = std::move(b);
  return layer;
}

namespace {

// The model's one MTP layer with an MoE block (L); Error::unsupported for none or chained ones.
int the_mtp_layer(const model::Model& m) {
  const model::Config& c = m.config();
  const int64_t nextn = c.get_int_or("num_nextn_predict_layers", 0);
  if (m.mtp_moe_layers().empty())
    throw Error::unsupported(c.source() + ": " + m.family().model_type +
                             ": no multi-token-prediction layer with an MoE block (num_nextn_predict_layers " + std::to_string(nextn) + ")");
  if (nextn > 1)
    throw Error::unsupported(c.source() + ": num_nextn_predict_layers " + std::to_string(nextn) +
                             ": chained multi-token-prediction layers are not run (one is: DeepSeek-V3, Kimi-K2, GLM-4.5)");
  return m.mtp_moe_layers().front();
}

}  // namespace

int adopted_mtp_layer(const model::Model& m) {
  const int64_t L = m.dims().layers;
  return static_cast<int64_t>(m.layers().size()) > L ? static_cast<int>(L) : -1;
}

int adopt_mtp_layer(model::Model& m) {
  if (m.mtp_moe_layers().empty() || adopted_mtp_layer(m) >= 0) return -1;
  const int l = the_mtp_layer(m);
  if (static_cast<size_t>(l) != m.layers().size())
    throw Error::internal("multi-token-prediction layer " + std::to_string(l) + " does not follow the " +
                          std::to_string(m.layers().size()) + " decoder layers");
  std::set<std::string> used;
  model::Layer block = mtp_decoder_block(m, l, &used);
  std::erase_if(m.mutable_extras(), [&](const auto& x) { return used.count(x.first) > 0; });
  m.layers().push_back(std::move(block));
  return l;
}

MtpForward::MtpForward(const Forward& f) : f_(f) {
  const model::Model& m = f.model();
  const model::Config& c = m.config();
  index_ = the_mtp_layer(m);
  block_ = mtp_decoder_block(m, index_);
  const auto by_name = extras_by_name(m);
  const std::string prefix = model::expand(m.family().layer_prefix, index_);
  const int64_t H = m.dims().hidden;
  auto need = [&](const std::string& rest, const core::Shape& shape) -> const core::Tensor& {
    auto it = by_name.find(prefix + rest);
    if (it == by_name.end())
      throw Error::corruption(c.source() + ": tensor " + prefix + rest + ": missing (multi-token-prediction layer " +
                              std::to_string(index_) + ")");
    if (it->second->shape() != shape)
      throw Error::corruption(c.source() + ": tensor " + prefix + rest + ": shape " + core::shape_str(it->second->shape()) +
                              " but hidden_size implies " + core::shape_str(shape));
    return *it->second;
  };
  naming_non_finite(m, index_, [&] {
    enorm_ = to_row(need("enorm.weight", {H}));
    hnorm_ = to_row(need("hnorm.weight", {H}));
    head_norm_ = to_row(need("shared_head.norm.weight", {H}));
    eh_proj_ = to_matrix(need("eh_proj.weight", {H, 2 * H}));
  });
  const auto head = by_name.find(prefix + "shared_head.head.weight");
  const auto& g = m.globals();
  head_ = head != by_name.end() ? head->second : g.count("lm_head") ? &g.at("lm_head") : &g.at("embed");
  if (head_->shape() != core::Shape{m.dims().vocab, H})
    throw Error::corruption(c.source() + ": tensor " + prefix + "shared_head.head.weight: shape " + core::shape_str(head_->shape()) +
                            " but vocab_size, hidden_size imply " + core::shape_str({m.dims().vocab, H}));
}

MatrixRM MtpForward::input(std::span<const int32_t> tokens, const MatrixRM& hn, int64_t T) const {
  const int64_t H = hn.cols(), N = hn.rows();
  if (T < 2 || N % T != 0 || static_cast<int64_t>(tokens.size()) != N)
    throw Error::internal("MtpForward::input: " + std::to_string(tokens.size()) + " tokens, " + std::to_string(N) +
                          " hidden rows, window " + std::to_string(T));
  const int64_t windows = N / T, S = T - 1;
  // Position i gets token t_{i+1} (the shifted window), its embedding zeroed at position 0.
  std::vector<int32_t> shifted;
  shifted.reserve(static_cast<size_t>(windows * S));
  for (int64_t w = 0; w < windows; ++w)
    for (int64_t i = 0; i < S; ++i) shifted.push_back(tokens[static_cast<size_t>(w * T + i + 1)]);
  MatrixRM e = f_.embed(shifted);
  MatrixRM h(windows * S, H);
  for (int64_t w = 0; w < windows; ++w) {
    e.row(w * S).setZero();
    h.middleRows(w * S, S) = hn.middleRows(w * T, S);
  }
  const double eps = f_.spec().eps;
  MatrixRM cat(windows * S, 2 * H);
  cat.leftCols(H) = rms_norm(e, enorm_, eps);
  cat.rightCols(H) = rms_norm(h, hnorm_, eps);
  return linear(cat, eh_proj_);
}

MtpLayerInput mtp_layer_input(const Forward& f, std::span<const int32_t> tokens, const MatrixRM& X, int64_t T) {
  return {MtpForward(f).input(tokens, f.final_norm(X), T), T - 1};
}

LayerWeights MtpForward::load_block() const {
  if (adopted_mtp_layer(f_.model()) == index_) return f_.load_layer(index_);  // as the passes left it
  LayerWeights w;
  naming_non_finite(f_.model(), index_, [&] { convert_layer_into(block_, w, /*factored=*/true); });
  return w;
}

void MtpForward::apply_block(const LayerWeights& w, MatrixRM& Y, int64_t T, std::span<Observer* const> observers) const {
  f_.apply_layer(w, Y, T - 1, observers);
}

MatrixRM MtpForward::logits(const MatrixRM& Y) const {
  const MatrixRM Yn = rms_norm(Y, head_norm_, f_.spec().eps);
  const int64_t V = head_->dim(0), H = head_->dim(1), N = Yn.rows();
  MatrixRM out(N, V);
  const int64_t chunk = std::min<int64_t>(V, 4096);
  std::vector<float> w(static_cast<size_t>(chunk * H));
  for (int64_t r0 = 0; r0 < V; r0 += chunk) {
    const int64_t r1 = std::min(V, r0 + chunk);
    head_->slice0(r0, r1).to_f32(w.data());
    check_finite(w.data(), (r1 - r0) * H, H, *head_);
    gemm_nt(N, r1 - r0, H, 1.0f, Yn.data(), H, w.data(), H, 0.0f, out.data() + r0, V);
  }
  return out;
}

MatrixRM MtpForward::run(std::span<const int32_t> tokens, const MatrixRM& X, int64_t T, std::span<Observer* const> observers) const {
  MatrixRM Y = input(tokens, f_.final_norm(X), T);
  apply_block(load_block(), Y, T, observers);
  return logits(Y);
}

}  // namespace moe::runtime
