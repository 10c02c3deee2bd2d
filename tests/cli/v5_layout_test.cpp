// transformers v5's fused-expert layout (conversion_mapping.py): the per-expert families read
// from `mlp.experts.gate_up_proj` [E,2I,H] / `mlp.experts.down_proj` [E,H,I] (mixtral's router
// renamed to mlp.gate), run as their per-expert spelling runs, and written back in the layout they
// came in — fused for dense experts, per expert for encoded ones.
#include <gtest/gtest.h>

#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "core/dtype.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "support/cli_expect.h"
#include "support/ckpt_util.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

struct V4Names {
  std::string experts, gate, up, down, router, v5_router;
};
// The per-expert spelling each family's checkpoints use and what v5's conversion mapping makes of
// it, written out here from transformers' conversion_mapping.py (not from lib/family).
V4Names v4_names(const std::string& family) {
  if (family == "mixtral")
    return {"block_sparse_moe.experts.", "w1", "w3", "w2", "block_sparse_moe.gate.weight", "mlp.gate.weight"};
  return {"mlp.experts.", "gate_proj", "up_proj", "down_proj", "mlp.gate.weight", "mlp.gate.weight"};
}

// The v5 layout of a per-expert synthetic checkpoint, as transformers' WeightConverter builds it:
// MergeModulelist(dim=0) then Concatenate(dim=1) for gate/up (so [E, 2I, H], each expert's gate
// rows then its up rows), MergeModulelist(dim=0) for down. A multi-token-prediction layer after
// the decoder layers (deepseek_v3) keeps its per-expert tensors (v5 does not load it).
SynthCheckpoint fuse_v5(const SynthCheckpoint& v4) {
  const V4Names n = v4_names(v4.family);
  const int decoder_layers = v4.config.value("num_hidden_layers", std::numeric_limits<int>::max());
  SynthCheckpoint out{v4.family, v4.config, {}};
  std::map<int, std::map<int, std::map<std::string, const SynthTensor*>>> experts;  // layer -> e -> part
  for (const auto& t : v4.tensors) {
    int l = -1, e = -1;
    char part[32] = {0};
    const std::string pat = "model.layers.%d." + n.experts + "%d.%31[a-z_0-9].weight";
    if (std::sscanf(t.name.c_str(), pat.c_str(), &l, &e, part) == 3 && l < decoder_layers) {
      experts[l][e][part] = &t;
      continue;
    }
    SynthTensor c = t;
    const std::string router_suffix = "." + n.router;
    if (c.name.ends_with(router_suffix))
      c.name = c.name.substr(0, c.name.size() - n.router.size()) + n.v5_router;
    out.tensors.push_back(std::move(c));
  }
  for (const auto& [l, by_e] : experts) {
    const int64_t E = static_cast<int64_t>(by_e.size());
    const SynthTensor& g0 = *by_e.at(0).at(n.gate);
    const int64_t I = g0.shape[0], H = g0.shape[1];
    SynthTensor gu{"model.layers." + std::to_string(l) + ".mlp.experts.gate_up_proj", g0.dtype, {E, 2 * I, H}, {}};
    SynthTensor dn{"model.layers." + std::to_string(l) + ".mlp.experts.down_proj", g0.dtype, {E, H, I}, {}};
    for (const auto& [e, parts] : by_e) {
      for (const auto* p : {parts.at(n.gate), parts.at(n.up)}) gu.data.insert(gu.data.end(), p->data.begin(), p->data.end());
      const auto* d = parts.at(n.down);
      dn.data.insert(dn.data.end(), d->data.begin(), d->data.end());
    }
    out.tensors.push_back(std::move(gu));
    out.tensors.push_back(std::move(dn));
  }
  return out;
}

class V5Layout : public ::testing::Test {
 protected:
  TempDir tmp_{"moe-v5"};
  fs::path write_pair(const std::string& family, const std::string& tag = "") {
    const SynthCheckpoint v4 = make_synth(family);
    write_synth(v4, tmp_ / (family + tag + "-v4"));
    write_synth(fuse_v5(v4), tmp_ / (family + tag + "-v5"));
    return tmp_ / (family + tag + "-v5");
  }
};

const std::vector<std::string> kFamilies = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"};

TEST_F(V5Layout, ReadsTheSameExpertsRouterAndSharedExpertsAsThePerExpertLayout) {
  for (const auto& fam : kFamilies) {
    SCOPED_TRACE(fam);
    write_pair(fam);
    const io::Checkpoint c4 = io::Checkpoint::open(io::Env::posix(), tmp_ / (fam + "-v4"));
    const io::Checkpoint c5 = io::Checkpoint::open(io::Env::posix(), tmp_ / (fam + "-v5"));
    const model::Model a = model::Model::load(c4), b = model::Model::load(c5);
    EXPECT_FALSE(a.family().v5_layout);
    EXPECT_TRUE(b.family().v5_layout);
    ASSERT_EQ(a.layers().size(), b.layers().size());
    int moe_layers = 0;
    for (size_t l = 0; l < a.layers().size(); ++l) {
      const auto& la = a.layers()[l];
      const auto& lb = b.layers()[l];
      ASSERT_EQ(la.moe.has_value(), lb.moe.has_value());
      if (!la.moe) continue;
      ++moe_layers;
      EXPECT_TRUE(la.moe->router.to_f32() == lb.moe->router.to_f32());
      ASSERT_EQ(la.moe->num_experts(), lb.moe->num_experts());
      for (int64_t e = 0; e < la.moe->num_experts(); ++e) {
        const auto& x = la.moe->experts[e];
        const auto& y = lb.moe->experts[e];
        EXPECT_TRUE(x.gate.to_f32() == y.gate.to_f32()) << "layer " << l << " expert " << e;
        EXPECT_TRUE(x.up.to_f32() == y.up.to_f32()) << "layer " << l << " expert " << e;
        EXPECT_TRUE(x.down.to_f32() == y.down.to_f32()) << "layer " << l << " expert " << e;
      }
      EXPECT_EQ(la.moe->shared.has_value(), lb.moe->shared.has_value());
    }
    EXPECT_GT(moe_layers, 0);
  }
}

TEST_F(V5Layout, ConvertWritesTheFusedLayoutBackByteForByte) {
  for (const auto& fam : kFamilies) {
    SCOPED_TRACE(fam);
    const fs::path in = write_pair(fam), out = tmp_ / (fam + "-conv");
    const RunResult r = run_tool({"-q", "convert", in.string(), out.string()});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    EXPECT_EQ(first_difference(read_tensors(in), read_tensors(out)), "");
  }
}

TEST_F(V5Layout, LogitsEqualThePerExpertLayouts) {
  for (const std::string fam : {"mixtral", "qwen2_moe", "deepseek_v3"}) {
    SCOPED_TRACE(fam);
    const fs::path v5 = write_pair(fam);
    EXPECT_TRUE(fixed_logits(tmp_ / (fam + "-v4")) == fixed_logits(v5));
  }
}

// Dense outputs (prune) stay fused; encoded ones (quantize) are written per expert, in the
// family's per-expert spelling (mixtral's router back under block_sparse_moe.gate), byte for byte
// what the same command writes from the per-expert input; --materialize writes the fused layout
// (the same logits as the per-expert input's materialized output).
TEST_F(V5Layout, PruneStaysFusedQuantizeWritesPerExpertMaterializeFuses) {
  for (const std::string fam : {"mixtral", "qwen2_moe"}) {
    SCOPED_TRACE(fam);
    const fs::path v5 = write_pair(fam), v4 = tmp_ / (fam + "-v4");
    auto run = [&](const fs::path& in, const std::string& out, std::vector<std::string> args) {
      std::vector<std::string> a = {"-q", args.at(0), in.string(), (tmp_ / out).string()};
      a.insert(a.end(), args.begin() + 1, args.end());
      const RunResult r = run_tool(a);
      EXPECT_EQ(r.exit_code, 0) << r.describe();
      return read_tensors(tmp_ / out);
    };
    const std::vector<std::string> prune = {"prune", "--method", "random", "--keep", "3"};
    const TensorMap p5 = run(v5, fam + "-p5", prune), p4 = run(v4, fam + "-p4", prune);
    int fused = 0;
    for (const auto& [name, t] : p5) {
      EXPECT_EQ(name.find(".experts.0."), std::string::npos) << name;
      if (name.ends_with(".mlp.experts.gate_up_proj")) EXPECT_EQ(t.shape.at(0), 3) << name;
      fused += name.ends_with(".mlp.experts.gate_up_proj");
    }
    EXPECT_GT(fused, 0);
    // The same experts kept: the fused output re-fused by hand equals the per-expert output's.
    SynthCheckpoint ck{fam, nlohmann::json::object(), {}};
    for (const auto& [name, t] : p4) ck.tensors.push_back({name, t.dtype, t.shape, {t.bytes.begin(), t.bytes.end()}});
    TensorMap refused;
    for (const auto& t : fuse_v5(ck).tensors) refused[t.name] = {t.dtype, t.shape, std::string(t.data.begin(), t.data.end())};
    EXPECT_EQ(first_difference(refused, p5), "");

    const std::vector<std::string> quant = {"quantize", "--method", "rtn", "--codec", "int4", "--group", "16", "--sym"};
    EXPECT_EQ(first_difference(run(v4, fam + "-q4", quant), run(v5, fam + "-q5", quant)), "");
    EXPECT_TRUE(fixed_logits(tmp_ / (fam + "-q4")) == fixed_logits(tmp_ / (fam + "-q5")));

    std::vector<std::string> mat = quant;
    mat.push_back("--materialize");
    const TensorMap m5 = run(v5, fam + "-m5", mat), m4 = run(v4, fam + "-m4", mat);
    EXPECT_NE(m5.size(), m4.size());  // fused: two tensors per layer instead of three per expert
    EXPECT_TRUE(fixed_logits(tmp_ / (fam + "-m5")) == fixed_logits(tmp_ / (fam + "-m4")));
  }
}

TEST_F(V5Layout, AFusedTensorOfTheWrongShapeIsRefusedNamingIt) {
  SynthCheckpoint v5 = fuse_v5(make_synth("qwen3_moe"));
  for (auto& t : v5.tensors)
    if (t.name == "model.layers.1.mlp.experts.down_proj") {
      t.shape = {t.shape[0], t.shape[1] / 2, t.shape[2] * 2};
    }
  write_synth(v5, tmp_ / "bad");
  const RunResult r = run_tool({"-q", "inspect", (tmp_ / "bad").string()});
  expect_clean_failure(r, "model.layers.1.mlp.experts.down_proj");
}

}  // namespace
}  // namespace moe::test
