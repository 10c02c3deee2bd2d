#include "passes/novices.h"

#include "core/error.h"
#include "runtime/moe_block.h"
#include "runtime/ops.h"

namespace moe::passes {

using core::Error;

std::vector<NoviceValue> novice_values(const runtime::MoeWeights& w, const runtime::RoutingRule& rule,
                                       const runtime::MatrixRM& x, const std::vector<int>& experts) {
  const int64_t N = x.rows(), H = x.cols(), E = w.num_experts();
  if (N == 0) throw Error::invalid("novices: no calibration tokens at this layer");
  if (H != w.router.cols())
    throw Error::invalid("novices: block inputs have width " + std::to_string(H) + " but the router takes " +
                         std::to_string(w.router.cols()));
  const runtime::MatrixRM logits = runtime::router_logits(w, rule, x);
  const runtime::RoutingResult r = runtime::route(rule, logits, runtime::choice_bias(w, rule), nullptr);
  const auto tokens = runtime::tokens_per_expert(r, E);
  std::vector<NoviceValue> out;
  for (int e : experts) {
    if (e < 0 || e >= E) throw Error::internal("novices: expert " + std::to_string(e) + " of " + std::to_string(E));
    const auto& tok = tokens[static_cast<size_t>(e)];
    NoviceValue v;
    v.expert = e;
    v.routed_tokens = static_cast<int64_t>(tok.size());
    runtime::MatrixRM y;
    if (tok.empty()) {
      y = runtime::mlp_forward(w.experts[static_cast<size_t>(e)], x);
    } else {
      runtime::MatrixRM xe(static_cast<int64_t>(tok.size()), H);
      for (size_t j = 0; j < tok.size(); ++j) xe.row(static_cast<int64_t>(j)) = x.row(tok[j]);
      y = runtime::mlp_forward(w.experts[static_cast<size_t>(e)], xe);
    }
    const Eigen::VectorXd mean = y.cast<double>().colwise().mean().transpose();
    v.value.resize(static_cast<size_t>(H));
    for (int64_t i = 0; i < H; ++i) v.value[static_cast<size_t>(i)] = static_cast<float>(mean(i));
    out.push_back(std::move(v));
  }
  return out;
}

void make_novices(model::MoeBlock& block, const std::vector<NoviceValue>& values) {
  for (const auto& v : values) {
    model::Mlp m;
    m.novice = core::Tensor::from_f32(v.value, {static_cast<int64_t>(v.value.size())});
    block.experts.at(static_cast<size_t>(v.expert)) = std::move(m);
  }
}

}  // namespace moe::passes
