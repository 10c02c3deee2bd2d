#include "calib/input_grams.h"

#include "runtime/moe_block.h"
#include "runtime/ops.h"

namespace moe::pipeline {

namespace {

// G += Xᵀ X in f64.
void add_gram(calib::MatrixD& g, const runtime::MatrixRM& x) {
  if (g.size() == 0) g = calib::MatrixD::Zero(x.cols(), x.cols());
  if (x.rows() == 0) return;
  const calib::MatrixD xd = x.cast<double>();
  g.noalias() += xd.transpose() * xd;
}

}  // namespace

void GramCapture::on_attention(int, const runtime::AttnTrace& t) {
  grams.tokens = t.x.rows();
  add_gram(grams.attn_qkv, t.x);
  add_gram(grams.attn_o, t.o_input);
}

void GramCapture::on_moe(int, const runtime::MoeTrace& t) {
  const int64_t E = t.weights.num_experts(), H = t.x.cols();
  grams.expert_in.resize(static_cast<size_t>(E));
  grams.expert_mid.resize(static_cast<size_t>(E));
  grams.expert_tokens.resize(static_cast<size_t>(E), 0);
  runtime::MatrixRM xe;
  for (int64_t e = 0; e < E; ++e) {
    const auto& tok = t.tokens[e];
    xe.resize(static_cast<int64_t>(tok.size()), H);
    for (size_t j = 0; j < tok.size(); ++j) xe.row(static_cast<int64_t>(j)) = t.x.row(tok[j]);
    add_gram(grams.expert_in[e], xe);
    const int64_t I = t.weights.experts[e].width();
    if (grams.expert_mid[e].size() == 0) grams.expert_mid[e] = calib::MatrixD::Zero(I, I);
    if (!tok.empty()) add_gram(grams.expert_mid[e], t.h[e]);
    grams.expert_tokens[e] += static_cast<int64_t>(tok.size());
  }
  if (t.weights.shared) {
    const auto& s = *t.weights.shared;
    add_gram(grams.shared_in, t.x);
    const runtime::MatrixRM h = runtime::mlp_hidden(s, t.x);
    add_gram(grams.shared_mid, h);
  }
}

void recompute_moe_grams(InputGrams& grams, const runtime::MoeWeights& w, const runtime::RoutingRule& rule,
                         const runtime::MatrixRM& x) {
  runtime::MoeDetail d;
  const runtime::MatrixRM out = runtime::moe_forward(w, rule, x, &d, true);
  const runtime::MoeTrace t{x, d.logits, d.routing, d.tokens, d.h, d.y, d.shared_out, d.shared_gate, out, w};
  GramCapture c;
  c.on_moe(0, t);
  grams.expert_in = std::move(c.grams.expert_in);
  grams.expert_mid = std::move(c.grams.expert_mid);
  grams.expert_tokens = std::move(c.grams.expert_tokens);
  grams.shared_in = std::move(c.grams.shared_in);
  grams.shared_mid = std::move(c.grams.shared_mid);
}

void GramCapture::on_dense_mlp(int, const runtime::DenseMlpTrace& t) {
  add_gram(grams.mlp_in, t.x);
  add_gram(grams.mlp_mid, t.h);
}

}  // namespace moe::pipeline
