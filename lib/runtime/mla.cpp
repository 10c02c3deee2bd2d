#include "runtime/mla.h"

#include <string>

#include "core/error.h"

namespace moe::runtime {

namespace {

void expect_shape(const MatrixRM& m, int64_t rows, int64_t cols, const char* what) {
  if (m.rows() != rows || m.cols() != cols)
    throw core::Error::corruption(std::string("multi-head latent attention: ") + what + " is [" +
                                  std::to_string(m.rows()) + ", " + std::to_string(m.cols()) + "], the config implies [" +
                                  std::to_string(rows) + ", " + std::to_string(cols) + "]");
}

}  // namespace

AttnOutput mla_attention(const MlaSpec& s, const AttnWeights& w, const RopeTable& rope, const MatrixRM& x,
                         int64_t T) {
  AttnOutput out;
  AttnWorkspace ws;
  mla_attention(s, w, rope, x, T, out, ws);
  return out;
}

void mla_attention(const MlaSpec& s, const AttnWeights& w, const RopeTable& rope, const MatrixRM& x, int64_t T,
                   AttnOutput& out, AttnWorkspace& ws) {
  const int64_t N = x.rows(), H = x.cols(), nH = s.heads;
  const int64_t dn = s.qk_nope_head_dim, dr = s.qk_rope_head_dim, dv = s.v_head_dim, dqk = s.qk_head_dim();
  const int64_t r = s.kv_lora_rank;
  if (rope.d != dr) throw core::Error::internal("mla_attention: RoPE table width != qk_rope_head_dim");

  // Queries [N, nH*dqk], per head [nope | rope].
  MatrixRM& q = ws.q;
  if (s.q_lora_rank > 0) {
    expect_shape(w.q_a, s.q_lora_rank, H, "q_a_proj");
    expect_shape(w.q_b, nH * dqk, s.q_lora_rank, "q_b_proj");
    if (!w.q_a_norm || w.q_a_norm->size() != s.q_lora_rank)
      throw core::Error::corruption("multi-head latent attention: q_a_layernorm missing or not [q_lora_rank]");
    linear_into(x, w.q_a, nullptr, ws.q_a);
    rms_norm_groups_inplace(ws.q_a, *w.q_a_norm, s.lora_norm_eps);  // one group: the whole row
    linear_into(ws.q_a, w.q_b, nullptr, q);
  } else {
    expect_shape(w.q, nH * dqk, H, "q_proj");
    linear_into(x, w.q, nullptr, q);
  }
  // Compressed kv [N, r] and the shared rope key [N, dr].
  expect_shape(w.kv_a, r + dr, H, "kv_a_proj_with_mqa");
  expect_shape(w.kv_b, nH * (dn + dv), r, "kv_b_proj");
  expect_shape(w.o, H, nH * dv, "o_proj");
  if (w.kv_a_norm.size() != r) throw core::Error::corruption("multi-head latent attention: kv_a_layernorm not [kv_lora_rank]");
  MatrixRM &ckv = ws.ckv, &kv = ws.kv;
  linear_into(x, w.kv_a, nullptr, ckv);
  rms_norm_into(ckv.data(), N, r, ckv.cols(), w.kv_a_norm, s.lora_norm_eps, ws.c);
  linear_into(ws.c, w.kv_b, nullptr, kv);  // per head [k_nope | v]

  rope.apply(q.data(), N, q.cols(), nH, dqk, dn, s.interleaved);
  rope.apply(ckv.data(), N, ckv.cols(), 1, dr, r, s.interleaved);

  // Keys per head: k_nope_h from kv, then the rope key every head shares (ckv's last dr columns),
  // as a second key part rather than a copy per head.
  out.o_input.resize(N, nH * dv);
  CausalShape shape{N, T, nH, nH, dn, dv, static_cast<float>(s.scale), 0};
  shape.k2 = ckv.data() + r;
  shape.ldk2 = ckv.cols();
  shape.dqk2 = dr;
  causal_attention(shape, q.data(), q.cols(), dqk, kv.data(), kv.cols(), dn + dv, kv.data() + dn, kv.cols(), dn + dv,
                   out.o_input.data(), out.o_input.cols());
  linear_into(out.o_input, w.o, nullptr, out.out);
}

}  // namespace moe::runtime
