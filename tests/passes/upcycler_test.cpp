// passes::Upcycler, the interface the pipeline writes an upcycle through (pipeline/upcycle_run.cpp):
// the plan it declares before anything is made is exactly the tensors it hands out (names, dtypes,
// shapes, order), check_upcycle's byte count is the plan's, and the report accounts for the same
// tensors. Small synthetic dense checkpoints (tests/support/synth.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <optional>

#include "io/env.h"
#include "passes/upcycle.h"
#include "support/synth.h"

namespace moe::passes {
namespace {

using test::synth_to;
using test::TempDir;

// Every tensor of head(), layer(0..L-1), tail() against plan(), in order; returns the plan's bytes.
uint64_t expect_plan_is_output(const Upcycler& up) {
  const std::vector<io::TensorSpec> plan = up.plan();
  std::vector<model::OutTensor> outs = up.head();
  for (int l = 0; l < up.layers(); ++l) {
    auto v = up.layer(l);
    outs.insert(outs.end(), v.begin(), v.end());
  }
  const auto tail = up.tail();
  outs.insert(outs.end(), tail.begin(), tail.end());
  EXPECT_EQ(outs.size(), plan.size());
  uint64_t bytes = 0;
  for (size_t i = 0; i < std::min(outs.size(), plan.size()); ++i) {
    EXPECT_EQ(outs[i].name, plan[i].name) << i;
    EXPECT_EQ(outs[i].dtype, plan[i].dtype) << plan[i].name;
    EXPECT_EQ(outs[i].shape, plan[i].shape) << plan[i].name;
    EXPECT_EQ(outs[i].make().shape(), plan[i].shape) << plan[i].name;
    bytes += plan[i].nbytes();
  }
  return bytes;
}

TEST(Upcycler, PlanIsWhatItMakesAndWhatCheckUpcycleCounts) {
  TempDir tmp("moe-upcycler");
  const auto dense = synth_to(tmp.path() / "llama", "llama");
  auto& env = io::Env::posix();
  struct Case {
    std::string to, method;
    int64_t experts, top_k;
    bool shared;
    std::optional<core::DType> dtype;
  };
  for (const Case& c : {Case{"mixtral", "split", 4, 2, false, std::nullopt},
                        Case{"mixtral", "copy", 3, 1, false, core::DType::F32},
                        Case{"qwen2_moe", "drop", 2, 2, true, std::nullopt},
                        // Without --shared-expert qwen2_moe still writes an all-zero shared expert.
                        Case{"qwen2_moe", "copy", 3, 2, false, core::DType::BF16}}) {
    SCOPED_TRACE(c.to + " " + c.method);
    UpcycleOptions o;
    o.to = c.to;
    o.method = c.method;
    o.experts = c.experts;
    o.top_k = c.top_k;
    o.shared_expert = c.shared;
    o.dtype = c.dtype;
    const Upcycler up(env, dense, o);
    const uint64_t bytes = expect_plan_is_output(up);
    EXPECT_EQ(check_upcycle(env, dense, o), bytes);
    const nlohmann::json r = up.report(bytes, 1);
    EXPECT_EQ(r.at("bytes").at("after").get<uint64_t>(), bytes);
    EXPECT_EQ(r.at("upcycle").at("experts").get<int64_t>(), c.experts);
    // The router of every layer is [E, H] and the config declares E and k.
    const nlohmann::json cfg = up.config();
    EXPECT_EQ(cfg.at("model_type"), c.to);
    EXPECT_EQ(cfg.at("num_experts_per_tok").get<int64_t>(), c.top_k);
  }
}

}  // namespace
}  // namespace moe::passes
