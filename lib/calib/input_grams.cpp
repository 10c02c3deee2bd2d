#include "calib/input_grams.h"

#include "core/error.h"
#include "runtime/moe_block.h"
#include "runtime/ops.h"

namespace moe::pipeline {

using core::Error;

namespace {

// G += Xᵀ X in f64.
template <typename M>
void add_gram(calib::MatrixD& g, const M& x) {
  if (g.size() == 0) g = calib::MatrixD::Zero(x.cols(), x.cols());
  if (x.rows() == 0) return;
  const calib::MatrixD xd = x.template cast<double>();
  g.noalias() += xd.transpose() * xd;
}

using ConstMap = Eigen::Map<const runtime::MatrixRM>;

}  // namespace

void InputGrams::keep_routed(const runtime::MoeTrace& t, const ActivationBudget& budget) {
  const int64_t E = t.weights.num_experts(), N = t.x.rows();
  H_ = t.x.cols();
  N_ = N;
  rows_.assign(static_cast<size_t>(E), {});
  row_scale_.assign(static_cast<size_t>(E), {});
  width_.assign(static_cast<size_t>(E), 0);
  h_offset_.assign(static_cast<size_t>(E), 0);
  in_.assign(static_cast<size_t>(E), {});
  mid_.assign(static_cast<size_t>(E), {});
  scales_.clear();
  size_t n = static_cast<size_t>(N * H_);
  for (int64_t e = 0; e < E; ++e) {
    const size_t i = static_cast<size_t>(e);
    rows_[i] = t.tokens[i];
    if (t.scaled_inputs) {  // llama4: what expert i receives is x times its routing weight
      row_scale_[i].assign(rows_[i].size(), 1.0f);
      for (size_t j = 0; j < rows_[i].size(); ++j)
        for (int64_t s = 0; s < t.routing.ids.cols(); ++s)
          if (t.routing.ids(rows_[i][j], s) == e) row_scale_[i][j] = t.routing.weights(rows_[i][j], s);
    }
    width_[i] = t.weights.expert_width(i);
    h_offset_[i] = n;
    if (!rows_[i].empty()) n += static_cast<size_t>(t.h[i].size());
  }
  acts_ = io::ScratchFloats();  // the previous layer's first
  acts_ = io::ScratchFloats(n, n * sizeof(float) > budget.bytes ? budget.spill_dir : std::filesystem::path());
  float* p = acts_.data();
  if (N * H_ > 0) Eigen::Map<runtime::MatrixRM>(p, N, H_) = t.x;
  for (size_t i = 0; i < rows_.size(); ++i)
    if (!rows_[i].empty()) {
      const runtime::MatrixRM& h = t.h[i];
      Eigen::Map<runtime::MatrixRM>(p + h_offset_[i], h.rows(), h.cols()) = h;
      acts_.evict(h_offset_[i], static_cast<size_t>(h.size()));
    }
}

void InputGrams::compute(size_t e) {
  if (e >= in_.size())
    throw Error::internal("input Grams: expert " + std::to_string(e) + " of " + std::to_string(in_.size()));
  if (in_[e].size()) return;
  const auto& tok = rows_[e];
  const ConstMap x(acts_.data(), N_, H_);
  runtime::MatrixRM xe(static_cast<int64_t>(tok.size()), H_);
  for (size_t j = 0; j < tok.size(); ++j) xe.row(static_cast<int64_t>(j)) = x.row(tok[j]);
  for (size_t j = 0; j < row_scale_[e].size(); ++j) xe.row(static_cast<int64_t>(j)) *= row_scale_[e][j];
  add_gram(in_[e], xe);
  for (const Eigen::VectorXd& s : scales_) in_[e] = s.asDiagonal() * in_[e] * s.asDiagonal();
  const int64_t I = width_[e];
  mid_[e] = calib::MatrixD::Zero(I, I);
  if (!tok.empty()) {
    const ConstMap h(acts_.data() + h_offset_[e], static_cast<int64_t>(tok.size()), I);
    add_gram(mid_[e], h);
    acts_.evict(h_offset_[e], tok.size() * static_cast<size_t>(I));
  }
}

calib::MatrixD& InputGrams::expert_in(int64_t e) {
  compute(static_cast<size_t>(e));
  return in_[static_cast<size_t>(e)];
}

calib::MatrixD& InputGrams::expert_mid(int64_t e) {
  compute(static_cast<size_t>(e));
  return mid_[static_cast<size_t>(e)];
}

void InputGrams::release(int64_t e) {
  const size_t i = static_cast<size_t>(e);
  if (i >= in_.size()) return;
  in_[i] = calib::MatrixD();
  mid_[i] = calib::MatrixD();
}

calib::MatrixD InputGrams::expert_in_sum() {
  calib::MatrixD sum = calib::MatrixD::Zero(H_, H_);
  for (size_t e = 0; e < in_.size(); ++e) {
    const bool kept = in_[e].size() != 0;
    sum += expert_in(static_cast<int64_t>(e));
    if (!kept) release(static_cast<int64_t>(e));
  }
  return sum;
}

void InputGrams::scale_inputs(const Eigen::VectorXd& s) {
  auto rescale = [&](calib::MatrixD& g) {
    if (g.size()) g = s.asDiagonal() * g * s.asDiagonal();
  };
  for (auto& g : in_) rescale(g);
  rescale(shared_in);
  scales_.push_back(s);
}

void GramCapture::on_attention(int, const runtime::AttnTrace& t) {
  grams.tokens = t.x.rows();
  add_gram(grams.attn_qkv, t.x);
  add_gram(grams.attn_o, t.o_input);
}

void GramCapture::on_moe(int, const runtime::MoeTrace& t) {
  grams.keep_routed(t, budget_);
  if (t.weights.shared) {
    const auto& s = *t.weights.shared;
    add_gram(grams.shared_in, t.x);
    const runtime::MatrixRM h = runtime::mlp_hidden(s, t.x);
    add_gram(grams.shared_mid, h);
  }
}

void recompute_moe_grams(InputGrams& grams, const runtime::MoeWeights& w, const runtime::RoutingRule& rule,
                         const runtime::MatrixRM& x, const ActivationBudget& budget) {
  runtime::MoeDetail d;
  const runtime::MatrixRM out = runtime::moe_forward(w, rule, x, &d, true);
  const runtime::MoeTrace t{x, d.logits, d.routing, d.tokens, d.h, d.y, d.shared_out, d.shared_gate, out, w, rule.scales_input};
  grams.shared_in = calib::MatrixD();
  grams.shared_mid = calib::MatrixD();
  GramCapture c(budget);
  c.grams = std::move(grams);
  c.on_moe(0, t);
  grams = std::move(c.grams);
}

void GramCapture::on_dense_mlp(int, const runtime::DenseMlpTrace& t) {
  add_gram(grams.mlp_in, t.x);
  add_gram(grams.mlp_mid, t.h);
}

}  // namespace moe::pipeline
