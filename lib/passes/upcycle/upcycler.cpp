// The upcycle interface (passes/upcycle.h): Upcycler (the plan, then each layer's tensors for the
// writer above, the config and the report) and check_upcycle (the checks and the output's bytes).
#include <limits>

#include "core/error.h"
#include "passes/upcycle.h"
#include "passes/upcycle/config.h"
#include "passes/upcycle/experts.h"
#include "passes/upcycle/layers.h"
#include "passes/upcycle/plan.h"
#include "passes/upcycle/routers.h"

namespace moe::passes {

using core::Tensor;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// The builder's tensors as the writer's OutTensor (each made already: one layer in memory).
std::vector<model::OutTensor> upcycled_outputs(const std::vector<upcycling::Out>& outs) {
  std::vector<model::OutTensor> v;
  v.reserve(outs.size());
  for (const auto& o : outs) v.push_back({o.name, o.dtype, o.t.shape(), [t = o.t] { return t; }});
  return v;
}

}  // namespace

uint64_t check_upcycle(io::Env& env, const fs::path& model_dir, const UpcycleOptions& opts) {
  // The output's bytes from the shapes alone (nothing built): the bytes of the specs
  // Upcycler::plan() lists. Long double: E x H x width may pass 2^64.
  const upcycling::Plan p = upcycling::make_plan(env, model_dir, opts);
  const long double b = upcycling::Builder(p).output_bytes();
  return b >= 1.8e19L ? UINT64_MAX : static_cast<uint64_t>(b);
}

Upcycler::Upcycler(io::Env& env, const fs::path& model_dir, const UpcycleOptions& opts)
    : p_(std::make_unique<upcycling::Plan>(upcycling::make_plan(env, model_dir, opts))) {
  if (opts.router == "hidden" || opts.router == "ridge") upcycling::compute_prompt_routers(*p_);
  if (opts.method == "split" && opts.segmenting == "coact") upcycling::compute_coact(*p_);
}

Upcycler::~Upcycler() = default;

const io::Checkpoint& Upcycler::source() const { return *p_->src.front().ckpt; }

int64_t Upcycler::layers() const { return p_->L; }

std::vector<io::TensorSpec> Upcycler::plan() const { return upcycling::Builder(*p_).output_specs(); }

std::vector<model::OutTensor> Upcycler::head() const { return upcycled_outputs(upcycling::Builder(*p_).globals(true)); }

std::vector<model::OutTensor> Upcycler::layer(int l) const { return upcycled_outputs(upcycling::Builder(*p_).layer(l)); }

std::vector<model::OutTensor> Upcycler::tail() const { return upcycled_outputs(upcycling::Builder(*p_).globals(false)); }

void Upcycler::release_layer(int l) const { upcycling::release_layer(*p_, l); }

json Upcycler::config() const { return upcycling::target_config(*p_); }

json Upcycler::report(uint64_t tensor_bytes, size_t shards) const {
  const upcycling::Plan& p = *p_;
  int64_t params_after = 0;
  for (const auto& s : plan()) params_after += core::shape_numel(s.shape);
  json sources = json::array();
  for (const auto& s : p.src) sources.push_back({{"path", s.dir.string()}, {"fingerprint", s.ckpt->fingerprint()},
                                                 {"family", s.model->family().model_type}});
  json u = {{"method", p.o.method},
            {"to", p.o.to},
            {"experts", p.o.experts},
            {"top_k", p.o.top_k},
            {"expert_width", p.width},
            {"dense_width", p.I},
            {"router", p.o.router},
            {"seed", p.o.seed},
            {"sources", sources}};
  if (p.o.router == "random") u["router_std"] = p.o.router_std;
  if (!p.router_info.is_null()) u["router_init"] = p.router_info;
  if (p.o.method == "drop") u["drop_ratio"] = p.o.drop_ratio;
  if (p.o.method == "split") {
    u["segments"] = p.o.segments;
    u["segmenting"] = p.o.segmenting;
    if (p.o.segmenting == "coact") u["coact_text"] = p.o.text.string();
    u["split_scale"] = p.o.split_scale;
    u["copies"] = p.o.experts / p.o.segments;
  }
  if (p.o.to != "mixtral") u["norm_topk_prob"] = p.o.norm_topk_prob;
  if (p.o.to == "qwen2_moe")
    u["shared_expert"] = p.o.shared_expert ? "the dense MLP, gate row 0 (sigmoid 0.5), routed experts' down_proj x 0.5"
                                           : "all-zero (adds exactly 0; stock loaders build the tensors)";
  if (p.src.size() > 1) u["attention_from"] = p.o.attention;
  if (p.zero_qkv_bias) u["attention_biases"] = "zero q/k/v biases written (qwen2_moe requires them)";
  // Where the MoE equals the dense model at initialisation (docs/benchmarks.md, upcycle).
  std::string exact;
  const bool renorm = p.o.to == "mixtral" || p.o.norm_topk_prob;
  if (p.o.method == "copy")
    exact = renorm ? "yes: equal experts, top-k weights renormalised to sum 1"
                   : "no: top-k probabilities are not renormalised, the output is their sum times the dense MLP";
  else if (p.o.method == "split")
    exact = (renorm && p.o.split_scale == "down" && p.o.router == "random" && p.o.router_std == 0.0 &&
             (p.o.top_k == p.o.experts || p.o.top_k == p.o.segments))
                ? "yes: equal router logits, the G segments of copy 0 selected with weight 1/G, down_proj x G"
                : "no: needs renormalised weights, split_scale down, router_std 0 (equal logits) and k = G or k = E";
  else
    exact = "no: re-drawn neurons change the output";
  u["equals_dense_at_init"] = exact;
  u["next"] = "continued training: an upcycled model is a start for training (routers untrained" +
              std::string(p.o.method == "copy" ? ", experts identical" : "") + "), not a finished model";
  return {{"tool", std::string("moe-tool ") + MOE_TOOL_VERSION},
          {"input", {{"path", p.src.front().dir.string()}, {"fingerprint", p.src.front().ckpt->fingerprint()},
                     {"family", upcycling::first(p).family().model_type}}},
          {"output_family", p.o.to},
          {"upcycle", u},
          {"params", {{"before", upcycling::first(p).total_params()}, {"after", params_after},
                      {"active_after", params_after - p.L * (p.o.experts - p.o.top_k) * 3 * p.H * p.width}}},
          {"bytes", {{"before", p.src.front().ckpt->total_tensor_bytes()}, {"after", tensor_bytes}}},
          {"shards", shards}};
}

}  // namespace moe::passes
