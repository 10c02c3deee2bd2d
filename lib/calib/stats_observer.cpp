#include "calib/stats_observer.h"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "core/error.h"
#include "runtime/moe_block.h"
#include "runtime/mpi.h"
#include "runtime/ops.h"

namespace moe::calib {

using core::Error;
using runtime::MatrixRM;

void gram_update(MatrixD& G, const float* A, int64_t n, int64_t d) {
  if (G.rows() != d || G.cols() != d) throw Error::internal("gram_update: size mismatch");
  if (n == 0 || d == 0) return;
  // Convert a block of rows to double, then one DSYRK per block (C += B^T B, upper triangle).
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(n, (int64_t(1) << 22) / std::max<int64_t>(d, 1)));
  std::vector<double> buf(static_cast<size_t>(std::min(block, n) * d));
  for (int64_t r0 = 0; r0 < n; r0 += block) {
    const int64_t m = std::min(block, n - r0);
    for (int64_t i = 0; i < m * d; ++i) buf[i] = static_cast<double>(A[r0 * d + i]);
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, int(d), int(m), 1.0, buf.data(), int(d), 1.0, G.data(), int(d));
  }
}

void gram_symmetrize(MatrixD& G) {
  for (int64_t i = 0; i < G.rows(); ++i)
    for (int64_t j = 0; j < i; ++j) G(i, j) = G(j, i);
}

struct StatsObserver::MoeAcc {
  int64_t E = 0, H = 0, tokens = 0, cos_tokens = 0;
  std::vector<double> count, prob_sum, weight_sum, reap_sum;
  std::vector<float> absmax;
  MatrixD out_sum;     // [E,H] sum over tokens of expert_e(x)
  MatrixD logit_gram;  // [E,E] upper triangle: sum over tokens of logit_i logit_j
  MatrixD cos_sum;     // [E,E] sum over sampled tokens of cos(y_i, y_j)
  MatrixD coact;       // [E,E]
  std::vector<MatrixD> gram_in, gram_mid;
};

StatsObserver::StatsObserver(ObserverOptions o) : opt_(o) {
  if (opt_.out_stride < 1) throw Error::invalid("--out-stride must be at least 1");
}

bool StatsObserver::split() const { return opt_.split_experts && runtime::mpi::World::get().split(); }
bool StatsObserver::mine(int64_t e) const { return !split() || runtime::mpi::World::get().owns(e); }
StatsObserver::~StatsObserver() = default;

void StatsObserver::on_moe(int layer, const runtime::MoeTrace& t) {
  const int64_t N = t.x.rows(), H = t.x.cols(), E = t.logits.cols(), k = t.routing.ids.cols();
  if (t.weights.num_experts() != E || static_cast<int64_t>(t.tokens.size()) != E)
    throw Error::internal("stats observer: layer " + std::to_string(layer) + ": expert count mismatch");
  auto [it, fresh] = moe_.try_emplace(layer);
  MoeAcc& a = it->second;
  if (fresh) {
    a.E = E;
    a.H = H;
    a.count.assign(E, 0.0);
    a.prob_sum.assign(E, 0.0);
    a.weight_sum.assign(E, 0.0);
    a.reap_sum.assign(E, 0.0);
    a.absmax.assign(E, 0.0f);
    a.logit_gram = MatrixD::Zero(E, E);
    a.coact = MatrixD::Zero(E, E);
    if (opt_.all_token_stats) {
      a.out_sum = MatrixD::Zero(E, H);
      a.cos_sum = MatrixD::Zero(E, E);
    }
    if (opt_.gram) {
      for (int64_t e = 0; e < E; ++e) {
        const int64_t I = t.weights.expert_width(e);
        a.gram_in.push_back(MatrixD::Zero(H, H));
        a.gram_mid.push_back(MatrixD::Zero(I, I));
      }
    }
  } else if (a.E != E || a.H != H) {
    throw Error::internal("stats observer: layer " + std::to_string(layer) + " changed shape between batches");
  }
  a.tokens += N;

  // Routing: count, weight_sum, coact, and the applied weight of every (expert, routed token).
  std::vector<std::vector<float>> wt(E);
  for (int64_t e = 0; e < E; ++e) wt[e].reserve(t.tokens[e].size());
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t s = 0; s < k; ++s) {
      const int32_t e = t.routing.ids(n, s);
      const float w = t.routing.weights(n, s);
      a.count[e] += 1.0;
      a.weight_sum[e] += static_cast<double>(w);
      wt[e].push_back(w);
      a.coact(e, e) += 1.0;
      for (int64_t s2 = 0; s2 < s; ++s2) {
        const int32_t e2 = t.routing.ids(n, s2);
        a.coact(e, e2) += 1.0;
        a.coact(e2, e) += 1.0;
      }
    }
  }
  for (int64_t e = 0; e < E; ++e)
    if (wt[e].size() != t.tokens[e].size() || t.y[e].rows() != static_cast<int64_t>(t.tokens[e].size()))
      throw Error::internal("stats observer: layer " + std::to_string(layer) + ": trace of expert " +
                            std::to_string(e) + " disagrees with the routing");

  // prob_sum: softmax over all E logits.
  if (t.routing.probs.rows() == N && t.routing.probs.cols() == E) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t e = 0; e < E; ++e) a.prob_sum[e] += static_cast<double>(t.routing.probs(n, e));
  } else {
    std::vector<double> p(E);
    for (int64_t n = 0; n < N; ++n) {
      double m = -INFINITY, sum = 0;
      for (int64_t e = 0; e < E; ++e) m = std::max(m, double(t.logits(n, e)));
      for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(double(t.logits(n, e)) - m));
      for (int64_t e = 0; e < E; ++e) a.prob_sum[e] += p[e] / sum;
    }
  }

  // logit_sim: Gram of the logit columns.
  gram_update(a.logit_gram, t.logits.data(), N, E);

  // REAP and out_absmax on the routed tokens.
  for (int64_t e = 0; e < E; ++e) {
    const MatrixRM& y = t.y[e];
    for (int64_t j = 0; j < y.rows(); ++j) {
      double ss = 0;
      float mx = a.absmax[e];
      const float* r = y.data() + j * H;
      for (int64_t i = 0; i < H; ++i) {
        ss += double(r[i]) * double(r[i]);
        mx = std::max(mx, std::fabs(r[i]));
      }
      a.absmax[e] = mx;
      // The weight on the expert's output (llama4: 1, the score scaled its input).
      a.reap_sum[e] += (t.scaled_inputs ? 1.0 : double(wt[e][j])) * std::sqrt(ss);
    }
  }

  // --gram: per-expert Gram matrices over the routed tokens.
  if (opt_.gram) {
    MatrixRM xe;
    for (int64_t e = 0; e < E; ++e) {
      if (!mine(e)) continue;  // its owner's Grams reach this rank in take_layer
      const auto& tok = t.tokens[e];
      const int64_t ne = static_cast<int64_t>(tok.size());
      xe.resize(ne, H);
      for (int64_t j = 0; j < ne; ++j) xe.row(j) = t.x.row(tok[j]);
      if (t.scaled_inputs) runtime::scale_expert_inputs(xe, t.routing, tok, e);
      gram_update(a.gram_in[e], xe.data(), ne, H);
      gram_update(a.gram_mid[e], t.h[e].data(), t.h[e].rows(), t.h[e].cols());
    }
  }

  if (!opt_.all_token_stats) return;
  if (t.scaled_inputs)
    throw Error::unsupported("layer " + std::to_string(layer) + ": out_mean / out_cos (every expert on every sampled "
                             "token) are not defined for a router that scales the experts' inputs (llama4): "
                             "use --routed-only (calibration.routed_only)");
  // The all-experts statistics on the token sample: stream token offset_ + n is sampled when it is
  // a multiple of S = out_stride. For out_mean, rows routed to e count with weight 1 (their h is
  // in the trace); sampled rows not routed to e run through gate/up here and count with weight S.
  // out_cos uses the first out_cos_tokens sampled tokens of the stream. S = 1: every token.
  const int64_t S = opt_.out_stride;
  const int64_t first = (S - offset_ % S) % S;  // first sampled row of this batch
  // Sampled rows of this batch that fall among the first out_cos_tokens samples: stream index
  // < out_cos_tokens * S (saturating), i.e. rows first, first + S, ... below cos_end.
  const int64_t cos_limit =
      opt_.out_cos_tokens > (INT64_MAX - 1) / S ? INT64_MAX : opt_.out_cos_tokens * S;
  const int64_t cos_end = std::clamp<int64_t>(cos_limit - offset_, 0, N);
  const int64_t ns = cos_end > first ? (cos_end - first + S - 1) / S : 0;  // out_cos rows of this batch
  const double weight = static_cast<double>(S);
  std::vector<MatrixRM> ys(E);
  std::vector<int32_t> pos(N);
  std::vector<int32_t> other;
  MatrixRM xo, g, u, hs;
  runtime::MlpWeights scratch;  // a streamed expert in f32 (MoeWeights::expert)
  std::vector<double> hsum;
  constexpr int32_t kSkip = INT32_MIN;  // neither routed to e nor sampled
  for (int64_t e = 0; e < E; ++e) {
    if (!mine(e)) continue;  // its owner's out_sum row reaches this rank in take_layer, its ys below
    const runtime::MlpWeights& W = t.weights.expert(e, scratch);
    const int64_t I = W.width();
    const auto& tok = t.tokens[e];
    // pos[n] >= 0: row of t.h[e]; kSkip: not used; otherwise row -(pos+1) of the locally
    // computed block (sampled rows not routed to e).
    other.clear();
    size_t j = 0;
    for (int64_t n = 0; n < N; ++n) {
      if (j < tok.size() && tok[j] == n) {
        pos[n] = static_cast<int32_t>(j++);
      } else if (n >= first && (n - first) % S == 0) {
        pos[n] = -static_cast<int32_t>(other.size()) - 1;
        other.push_back(static_cast<int32_t>(n));
      } else {
        pos[n] = kSkip;
      }
    }
    if (W.novice) {  // a constant output: its sum is the rows' weight times n_e
      double rows = 0;
      for (int64_t n = 0; n < N; ++n)
        if (pos[n] != kSkip) rows += pos[n] >= 0 ? 1.0 : weight;
      for (int64_t i = 0; i < H; ++i) a.out_sum(e, i) += rows * double((*W.novice)(i));
      if (ns > 0) ys[e] = W.novice->replicate(ns, 1);
      continue;
    }
    const int64_t no = static_cast<int64_t>(other.size());
    xo.resize(no, H);
    for (int64_t r = 0; r < no; ++r) xo.row(r) = t.x.row(other[r]);
    g = no ? runtime::mlp_hidden(W, xo) : MatrixRM(0, I);
    auto hrow = [&](int64_t n) -> const float* {
      return pos[n] >= 0 ? t.h[e].data() + int64_t(pos[n]) * I : g.data() + int64_t(-pos[n] - 1) * I;
    };
    // Weighted sum of h over the batch in token order (routed rows 1, sampled unrouted rows S, in
    // double), then down (linear) applied to the sum.
    hsum.assign(I, 0.0);
    double rows = 0;  // the summed rows' total weight (what the down bias is added with)
    for (int64_t n = 0; n < N; ++n) {
      if (pos[n] == kSkip) continue;
      rows += pos[n] >= 0 ? 1.0 : weight;
      const float* r = hrow(n);
      if (pos[n] >= 0) {
        for (int64_t c = 0; c < I; ++c) hsum[c] += double(r[c]);
      } else {
        for (int64_t c = 0; c < I; ++c) hsum[c] += weight * double(r[c]);
      }
    }
    if (W.down_lr) {
      // Low-rank down projection: A·(B·hsum) (+ base·hsum), in double.
      const auto& lr = *W.down_lr;
      const Eigen::Map<const Eigen::VectorXd> hv(hsum.data(), I);
      const Eigen::VectorXd bh = lr.b.cast<double>() * hv;
      Eigen::VectorXd y = lr.a.cast<double>() * bh;
      if (lr.base.size()) y += lr.base.cast<double>() * hv;
      for (int64_t i = 0; i < H; ++i) a.out_sum(e, i) += y(i);
    } else {
      for (int64_t i = 0; i < H; ++i) {
        const float* wd = W.down.data() + i * I;
        double acc = 0;
        for (int64_t c = 0; c < I; ++c) acc += double(wd[c]) * hsum[c];
        a.out_sum(e, i) += acc;
      }
    }
    if (W.down_bias)
      for (int64_t i = 0; i < H; ++i) a.out_sum(e, i) += rows * double((*W.down_bias)(i));
    if (ns > 0) {
      hs.resize(ns, I);
      for (int64_t q = 0; q < ns; ++q) {
        const float* r = hrow(first + q * S);
        std::copy(r, r + I, hs.data() + q * I);
      }
      ys[e] = runtime::project(hs, W.down, W.down_lr);
      if (W.down_bias) ys[e].rowwise() += *W.down_bias;
    }
  }
  if (split() && ns > 0) {  // every expert's sampled outputs from its owner
    for (int64_t e = 0; e < E; ++e)
      if (!mine(e)) ys[e].resize(ns, H);
    runtime::mpi::World::get().share_owned(E, [&](int64_t e) -> std::pair<void*, size_t> {
      return {ys[e].data(), static_cast<size_t>(ys[e].size()) * sizeof(float)};
    });
  }
  // out_cos on the sampled tokens: normalise every expert's output row, then for a block of tokens
  // the rows of V [E, block*H] are the experts' concatenated unit outputs, and (V V^T)(i,j) is the
  // sum over the block's tokens of cos(y_i, y_j); blocks are summed in double. A zero output
  // counts as cosine 0.
  if (ns > 0) {
    for (int64_t e = 0; e < E; ++e)
      for (int64_t n = 0; n < ns; ++n) {
        float* r = ys[e].data() + n * H;
        double ss = 0;
        for (int64_t i = 0; i < H; ++i) ss += double(r[i]) * double(r[i]);
        const float inv = ss > 0 ? static_cast<float>(1.0 / std::sqrt(ss)) : 0.0f;
        for (int64_t i = 0; i < H; ++i) r[i] *= inv;
      }
    const int64_t block = 32;
    MatrixRM V(E, std::min(block, ns) * H), G(E, E);
    for (int64_t s0 = 0; s0 < ns; s0 += block) {
      const int64_t nb = std::min(block, ns - s0), width = nb * H;
      for (int64_t e = 0; e < E; ++e) std::copy(ys[e].data() + s0 * H, ys[e].data() + (s0 + nb) * H, V.data() + e * V.cols());
      runtime::gemm_nt(E, E, width, 1.0f, V.data(), V.cols(), V.data(), V.cols(), 0.0f, G.data(), E);
      for (int64_t i = 0; i < E; ++i)
        for (int64_t j2 = i + 1; j2 < E; ++j2) a.cos_sum(i, j2) += double(G(i, j2));
    }
    a.cos_tokens += ns;
  }
}

void StatsObserver::on_attention(int layer, const runtime::AttnTrace& t) {
  if (!opt_.gram) return;
  LayerGrams& g = grams_[layer];
  g.layer = layer;
  if (g.attn_qkv.size() == 0) {
    g.attn_qkv = MatrixD::Zero(t.x.cols(), t.x.cols());
    g.attn_o = MatrixD::Zero(t.o_input.cols(), t.o_input.cols());
  }
  gram_update(g.attn_qkv, t.x.data(), t.x.rows(), t.x.cols());
  gram_update(g.attn_o, t.o_input.data(), t.o_input.rows(), t.o_input.cols());
}

void StatsObserver::on_dense_mlp(int layer, const runtime::DenseMlpTrace& t) {
  if (!opt_.gram) return;
  LayerGrams& g = grams_[layer];
  g.layer = layer;
  if (g.mlp_in.size() == 0) {
    g.mlp_in = MatrixD::Zero(t.x.cols(), t.x.cols());
    g.mlp_mid = MatrixD::Zero(t.h.cols(), t.h.cols());
  }
  gram_update(g.mlp_in, t.x.data(), t.x.rows(), t.x.cols());
  gram_update(g.mlp_mid, t.h.data(), t.h.rows(), t.h.cols());
}

std::optional<LayerStats> StatsObserver::take_layer(int l) {
  auto it = moe_.find(l);
  if (it == moe_.end()) return std::nullopt;
  MoeAcc& a = it->second;
  const int64_t E = a.E;
  if (split()) {  // the per-expert sums each rank kept for the experts it owns, from their owners
    auto& world = runtime::mpi::World::get();
    if (opt_.all_token_stats)
      world.share_owned(E, [&](int64_t e) -> std::pair<void*, size_t> {
        return {a.out_sum.data() + e * a.H, static_cast<size_t>(a.H) * sizeof(double)};
      });
    if (opt_.gram)
      for (std::vector<MatrixD>* g : {&a.gram_in, &a.gram_mid})
        world.share_owned(E, [&](int64_t e) -> std::pair<void*, size_t> {
          return {(*g)[e].data(), static_cast<size_t>((*g)[e].size()) * sizeof(double)};
        });
  }
  LayerStats s;
  s.layer = l;
  s.tokens = a.tokens;
  s.count = a.count;
  s.prob_sum = a.prob_sum;
  s.weight_sum = a.weight_sum;
  s.reap.assign(E, 0.0);
  for (int64_t e = 0; e < E; ++e) s.reap[e] = a.count[e] > 0 ? a.reap_sum[e] / a.count[e] : 0.0;
  s.out_absmax = a.absmax;
  // logit_sim = (cos + 1) / 2 with exact unit diagonal and exact symmetry.
  s.logit_sim = MatrixF::Ones(E, E);
  for (int64_t i = 0; i < E; ++i)
    for (int64_t j = i + 1; j < E; ++j) {
      const double d = std::sqrt(a.logit_gram(i, i)) * std::sqrt(a.logit_gram(j, j));
      const double c = d > 0 ? a.logit_gram(i, j) / d : 0.0;
      s.logit_sim(i, j) = s.logit_sim(j, i) = static_cast<float>((c + 1.0) / 2.0);
    }
  if (opt_.all_token_stats) {
    s.out_mean = (a.out_sum / static_cast<double>(std::max<int64_t>(a.tokens, 1))).cast<float>();
    s.out_cos = MatrixF::Ones(E, E);
    for (int64_t i = 0; i < E; ++i)
      for (int64_t j = i + 1; j < E; ++j)
        s.out_cos(i, j) = s.out_cos(j, i) =
            static_cast<float>(a.cos_tokens > 0 ? a.cos_sum(i, j) / static_cast<double>(a.cos_tokens) : 0.0);
  }
  s.coact = a.coact;
  for (auto& g : a.gram_in) gram_symmetrize(g);
  for (auto& g : a.gram_mid) gram_symmetrize(g);
  s.gram_in = std::move(a.gram_in);
  s.gram_mid = std::move(a.gram_mid);
  s.super_expert.assign(E, false);
  moe_.erase(it);
  return s;
}

std::optional<LayerGrams> StatsObserver::take_grams(int l) {
  auto it = grams_.find(l);
  if (it == grams_.end()) return std::nullopt;
  LayerGrams g = std::move(it->second);
  grams_.erase(it);
  for (MatrixD* m : {&g.attn_qkv, &g.attn_o, &g.mlp_in, &g.mlp_mid}) gram_symmetrize(*m);
  return g;
}

LayerStats block_stats(int layer, const runtime::MoeWeights& w, const runtime::RoutingRule& rule, const runtime::MatrixRM& x,
                       int64_t batch_rows, const ObserverOptions& o) {
  if (batch_rows < 1) throw Error::internal("block_stats: batch_rows must be at least 1");
  runtime::RoutingRule r = rule;
  r.num_experts = static_cast<int>(w.num_experts());
  StatsObserver obs(o);
  for (int64_t first = 0; first < x.rows(); first += batch_rows) {
    const runtime::MatrixRM xs = x.middleRows(first, std::min(batch_rows, x.rows() - first));
    runtime::MoeDetail det;
    const runtime::MatrixRM out = runtime::moe_forward(w, r, xs, &det, /*keep_intermediates=*/true);
    const runtime::MoeTrace t{xs, det.logits, det.routing, det.tokens, det.h, det.y, det.shared_out, det.shared_gate, out, w,
                              r.scales_input};
    obs.set_token_offset(first);
    obs.on_moe(layer, t);
  }
  auto st = obs.take_layer(layer);
  if (!st) throw Error::internal("block_stats: no statistics for layer " + std::to_string(layer) + " (no input rows)");
  return std::move(*st);
}

}  // namespace moe::calib
