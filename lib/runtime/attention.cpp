#include "runtime/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#include "core/error.h"
#include "runtime/llama4.h"
#include "runtime/parallel.h"
#include "runtime/profile.h"

namespace moe::runtime {

namespace {

// Causal softmax of a block of score rows in place. Row r (query position q0 + r) sees keys
// [lo(q), q]; everything else is set to 0. S is [rows, ldS]. `sink` (gpt_oss): one more logit in
// every row's softmax whose probability is dropped (the row then sums to less than 1).
void masked_softmax(float* S, int64_t rows, int64_t ldS, int64_t q0, int64_t k0, int64_t window, const float* sink,
                    int64_t chunk) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t q = q0 + r;
    float* s = S + r * ldS;
    const int64_t lo = window > 0 ? std::max<int64_t>(0, q - window + 1) : chunk > 0 ? q - q % chunk : 0;
    const int64_t a = lo - k0, b = q - k0 + 1;  // valid [a, b) in block coordinates
    Eigen::Map<Eigen::ArrayXf> v(s + a, b - a);
    const float m = sink ? std::max(v.maxCoeff(), *sink) : v.maxCoeff();
    v = (v - m).exp();
    v *= 1.0f / (v.sum() + (sink ? std::exp(*sink - m) : 0.0f));
    std::fill(s, s + a, 0.0f);
    std::fill(s + b, s + ldS, 0.0f);
  }
}

// qwen3_next: qg [N, heads * 2d] holds query then gate per head; q becomes the queries [N, heads * d]
// and gate the gates [N, heads * d].
void split_query_gate(const MatrixRM& qg, MatrixRM& q, MatrixRM& gate, int64_t heads, int64_t d) {
  if (qg.cols() != heads * 2 * d) throw core::Error::corruption("attention: q_proj width is not heads x 2 x head_dim");
  q.resize(qg.rows(), heads * d);
  gate.resize(qg.rows(), heads * d);
  for (int64_t h = 0; h < heads; ++h) {
    q.middleCols(h * d, d) = qg.middleCols(h * 2 * d, d);
    gate.middleCols(h * d, d) = qg.middleCols(h * 2 * d + d, d);
  }
}

}  // namespace

void causal_attention(const CausalShape& c, const float* q, int64_t ldq, int64_t q_stride, const float* k, int64_t ldk,
                      int64_t k_stride, const float* v, int64_t ldv, int64_t v_stride, float* o, int64_t ldo) {
  if (c.T <= 0 || c.rows % c.T != 0) throw core::Error::internal("attention: rows not a multiple of the window");
  const int64_t windows = c.rows / c.T, T = c.T, rep = c.heads / c.kv_heads;
  // Query blocks: block b only needs keys [lo, end of block) (causal), halving the work.
  const int64_t B = std::min<int64_t>(T, 128);
  // One task per (window, head): each writes its own columns of its own rows of o.
  parallel_for(windows * c.heads, [&](int64_t task) {
    const int64_t wi = task / c.heads, h = task % c.heads;
    thread_local std::vector<float> S;
    S.resize(static_cast<size_t>(B * T));
    const int64_t r0 = wi * T;
    const int64_t g = h / rep;
    for (int64_t q0 = 0; q0 < T; q0 += B) {
      const int64_t rows = std::min(B, T - q0);
      const int64_t kend = q0 + rows;
      const int64_t k0 = c.window > 0 ? std::max<int64_t>(0, q0 - c.window + 1) : c.chunk > 0 ? q0 - q0 % c.chunk : 0;
      const int64_t nk = kend - k0;
      // S = scale * Q_blk K^T  [rows, nk]
      gemm_nt(rows, nk, c.dqk, c.scale, q + (r0 + q0) * ldq + h * q_stride, ldq, k + (r0 + k0) * ldk + g * k_stride,
              ldk, 0.0f, S.data(), nk);
      if (c.k2)
        gemm_nt(rows, nk, c.dqk2, c.scale, q + (r0 + q0) * ldq + h * q_stride + c.dqk, ldq, c.k2 + (r0 + k0) * c.ldk2,
                c.ldk2, 1.0f, S.data(), nk);
      masked_softmax(S.data(), rows, nk, q0, k0, c.window, c.sinks ? c.sinks + h : nullptr, c.chunk);
      // O_blk = P V  [rows, dv]
      gemm_nn(rows, c.dv, nk, 1.0f, S.data(), nk, v + (r0 + k0) * ldv + g * v_stride, ldv, 0.0f,
              o + (r0 + q0) * ldo + h * c.dv, ldo);
    }
  });
}

AttnOutput attention(const AttnSpec& spec, const AttnWeights& w, const RopeTable& rope, const MatrixRM& x,
                     int64_t T) {
  AttnOutput out;
  AttnWorkspace ws;
  attention(spec, w, rope, x, T, out, ws);
  return out;
}

void attention(const AttnSpec& spec, const AttnWeights& w, const RopeTable& rope, const MatrixRM& x, int64_t T,
               AttnOutput& out, AttnWorkspace& ws) {
  const int64_t N = x.rows(), nH = spec.heads, nKV = spec.kv_heads, d = spec.head_dim;
  std::optional<PhaseScope> phase(std::in_place, Phase::AttnProjections);
  MatrixRM &q = ws.q, &k = ws.k, &v = ws.v, &gate = ws.gate;
  linear_into(x, w.q, w.q_bias ? &*w.q_bias : nullptr, spec.output_gate ? ws.q_gate : q);
  linear_into(x, w.k, w.k_bias ? &*w.k_bias : nullptr, k);
  linear_into(x, w.v, w.v_bias ? &*w.v_bias : nullptr, v);
  if (spec.output_gate) split_query_gate(ws.q_gate, q, gate, nH, d);
  phase.emplace(Phase::RopeQkNorm);
  if (q.cols() != nH * d || k.cols() != nKV * d || v.cols() != nKV * d)
    throw core::Error::corruption("attention: projection widths do not match heads x head_dim");
  switch (spec.qk_norm) {
    case model::QKNorm::None: break;
    case model::QKNorm::PerHead:
      if (!w.q_norm || !w.k_norm) throw core::Error::corruption("attention: q_norm/k_norm missing");
      rms_norm_groups_inplace(q, *w.q_norm, spec.eps);
      rms_norm_groups_inplace(k, *w.k_norm, spec.eps);
      break;
    case model::QKNorm::Full:
      if (!w.q_norm || !w.k_norm) throw core::Error::corruption("attention: q_norm/k_norm missing");
      rms_norm_groups_inplace(q, *w.q_norm, spec.eps);  // one group: the whole projection
      rms_norm_groups_inplace(k, *w.k_norm, spec.eps);
      break;
  }
  if (spec.clip_qkv) {
    const float c = *spec.clip_qkv;
    q = q.cwiseMax(-c).cwiseMin(c);
    k = k.cwiseMax(-c).cwiseMin(c);
    v = v.cwiseMax(-c).cwiseMin(c);
  }
  if (rope.d != spec.rope_dim()) throw core::Error::internal("attention: RoPE table width != rotary width");
  if (spec.use_rope) {
    rope.apply(q.data(), N, q.cols(), nH, d, 0, spec.rope_interleaved);
    rope.apply(k.data(), N, k.cols(), nKV, d, 0, spec.rope_interleaved);
  }
  llama4_qk_after_rope(spec, q, k, T);

  phase.emplace(Phase::AttnCore);
  out.o_input.resize(N, nH * d);
  if (spec.sinks && (!w.sinks || w.sinks->size() != nH)) throw core::Error::corruption("attention: sinks missing");
  const double scale = spec.scale ? *spec.scale : 1.0 / std::sqrt(double(d));
  causal_attention({N, T, nH, nKV, d, d, static_cast<float>(scale), spec.sliding_window,
                    spec.sinks ? w.sinks->data() : nullptr, spec.chunk},
                   q.data(), q.cols(), d, k.data(), k.cols(), d, v.data(), v.cols(), d, out.o_input.data(),
                   out.o_input.cols());
  if (spec.output_gate) out.o_input.array() *= (1.0f + (-gate.array()).exp()).inverse();
  phase.emplace(Phase::AttnProjections);
  linear_into(out.o_input, w.o, w.o_bias ? &*w.o_bias : nullptr, out.out);
}

}  // namespace moe::runtime
