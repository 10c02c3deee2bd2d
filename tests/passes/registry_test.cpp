// passes.def registry and the strict option parser: unknown names and keys, wrong types, ranges.
#include <gtest/gtest.h>

#include <set>

#include "core/error.h"
#include "passes/options.h"
#include "passes/pass.h"

namespace moe::pipeline {
namespace {

using nlohmann::json;

// The message of the Error::invalid that make_pass throws (fails the test otherwise).
std::string error_of(const json& spec) {
  try {
    make_pass(spec, "passes[0]");
  } catch (const core::Error& e) {
    EXPECT_EQ(e.kind(), core::ErrorKind::InvalidArgument) << e.what();
    return e.message();
  }
  ADD_FAILURE() << "no error for " << spec.dump();
  return "";
}

#define EXPECT_HAS(haystack, needle) EXPECT_NE((haystack).find(needle), std::string::npos) << (haystack)

TEST(Registry, EveryListedPassBuilds) {
  const auto& table = registered_passes();
  EXPECT_EQ(table.size(), 19u);
  std::set<std::string> names;
  for (const auto& p : table) {
    names.insert(std::string(p.pass) + "/" + p.method);
    EXPECT_GT(std::string(p.description).size(), 10u);
    json spec = {{"pass", p.pass}, {"method", p.method}};
    if (std::string(p.pass) == "prune") spec["keep"] = 4;
    if (std::string(p.pass) == "merge") spec["experts"] = 4;
    if (std::string(p.pass) == "factorize") spec["ratio"] = 0.5;
    if (std::string(p.pass) == "share") spec["share"] = 0.25;
    auto pass = make_pass(spec, "passes[0]");
    ASSERT_TRUE(pass);
    EXPECT_EQ(pass->name(), p.pass);
    EXPECT_EQ(pass->method(), p.method);
    EXPECT_EQ(pass->params()["pass"], p.pass);
    EXPECT_EQ(pass->params()["method"], p.method);
  }
  EXPECT_EQ(names.size(), table.size());  // no duplicates
  EXPECT_TRUE(names.count("prune/reap"));
  EXPECT_TRUE(names.count("prune/search"));
  EXPECT_TRUE(names.count("merge/submoe"));
  EXPECT_TRUE(names.count("factorize/svdllm"));
  EXPECT_TRUE(names.count("quantize/gptq"));
  EXPECT_TRUE(names.count("quantize/delta-ternary"));
  EXPECT_TRUE(names.count("share/pairs"));
}

TEST(Registry, UnknownPassAndMethodSuggest) {
  std::string m = error_of({{"pass", "prun"}, {"method", "reap"}});
  EXPECT_HAS(m, "passes[0].pass: unknown pass \"prun\"");
  EXPECT_HAS(m, "allowed: prune, merge");
  EXPECT_HAS(m, "did you mean \"prune\"?");
  m = error_of({{"pass", "prune"}, {"method", "reep"}, {"keep", 4}});
  EXPECT_HAS(m, "passes[0].method: unknown method \"reep\" for pass prune");
  EXPECT_HAS(m, "frequency, soft, reap, random, enumerate");
  EXPECT_HAS(m, "did you mean \"reap\"?");
  m = error_of({{"pass", "merge"}, {"method", "hc-smoe"}, {"experts", 4}});
  EXPECT_HAS(m, "did you mean \"hcsmoe\"?");
  m = error_of({{"pass", "quantise"}, {"method", "x"}});
  EXPECT_HAS(m, "did you mean \"quantize\"?");
  m = error_of({{"pass", "distill"}, {"method", "x"}});
  EXPECT_EQ(m.find("did you mean"), std::string::npos) << m;  // nothing close
}

TEST(Registry, MissingAndMistypedNames) {
  EXPECT_HAS(error_of({{"method", "reap"}}), "passes[0]: missing key \"pass\" (passes: prune, merge, factorize, quantize, share)");
  EXPECT_HAS(error_of({{"pass", "prune"}, {"keep", 2}}), "passes[0]: missing key \"method\" (prune methods: frequency");
  EXPECT_HAS(error_of({{"pass", 3}, {"method", "reap"}}), "passes[0].pass: expected a string");
  EXPECT_HAS(error_of(json::array({1, 2})), "passes[0]: expected a pass object");
}

TEST(Registry, UnknownKeySuggests) {
  const std::string m = error_of({{"pass", "prune"}, {"method", "reap"}, {"kep", 4}});
  EXPECT_HAS(m, "passes[0].kep: unknown key for prune/reap");
  EXPECT_HAS(m, "did you mean \"keep\"?");
  EXPECT_HAS(m, "allowed: pass, method, seed, keep, keep_ratio, uniform, protect_super_experts");
  // Method-specific keys are unknown for other methods.
  EXPECT_HAS(error_of({{"pass", "prune"}, {"method", "reap"}, {"keep", 4}, {"max_subsets", 10}}),
             "passes[0].max_subsets: unknown key for prune/reap");
  EXPECT_HAS(error_of({{"pass", "merge"}, {"method", "msmoe"}, {"experts", 4}, {"rank_ratio", 0.5}}),
             "passes[0].rank_ratio: unknown key for merge/msmoe");
  EXPECT_HAS(error_of({{"pass", "merge"}, {"method", "submoe"}, {"experts", 4}, {"whitten", true}}),
             "did you mean \"whiten\"?");
  // "uniform" only goes with keep_ratio.
  EXPECT_HAS(error_of({{"pass", "prune"}, {"method", "reap"}, {"keep", 4}, {"uniform", false}}),
             "passes[0].uniform: applies only with \"keep_ratio\"");
}

TEST(Registry, WrongTypesAndRanges) {
  EXPECT_HAS(error_of({{"pass", "prune"}, {"method", "reap"}, {"keep", "six"}}),
             "passes[0].keep: expected an integer in [1, 1048576], found \"six\"");
  EXPECT_HAS(error_of({{"pass", "prune"}, {"method", "reap"}, {"keep", 6.5}}), "passes[0].keep: expected an integer");
  EXPECT_HAS(error_of({{"pass", "prune"}, {"method", "reap"}, {"keep", 0}}), "passes[0].keep: expected an integer");
  EXPECT_HAS(error_of({{"pass", "prune"}, {"method", "reap"}, {"keep_ratio", 0}}),
             "passes[0].keep_ratio: expected a number in (0, 1], found 0");
  EXPECT_HAS(error_of({{"pass", "prune"}, {"method", "reap"}, {"keep_ratio", 1.5}}), "passes[0].keep_ratio");
  EXPECT_HAS(error_of({{"pass", "prune"}, {"method", "reap"}, {"keep", 4}, {"protect_super_experts", "yes"}}),
             "passes[0].protect_super_experts: expected true or false, found \"yes\"");
  EXPECT_HAS(error_of({{"pass", "prune"}, {"method", "random"}, {"keep", 4}, {"seed", -1}}),
             "passes[0].seed: expected an integer in [0, 2^64)");
  EXPECT_HAS(error_of({{"pass", "merge"}, {"method", "hcsmoe"}, {"experts", 4}, {"router", "refitt"}}),
             "passes[0].router: unknown value \"refitt\" (allowed: dominant, mean, refit); did you mean \"refit\"?");
  EXPECT_HAS(error_of({{"pass", "merge"}, {"method", "hcsmoe"}, {"experts", 4}, {"router", 1}}),
             "passes[0].router: expected one of dominant, mean, refit");
  EXPECT_HAS(error_of({{"pass", "merge"}, {"method", "submoe"}, {"experts", 4}, {"rank_ratio", 0}}),
             "passes[0].rank_ratio: expected a number in (0, 1]");
  // DERN: retained experts keep their router rows, so no router options; threshold is a cosine.
  EXPECT_HAS(error_of({{"pass", "merge"}, {"method", "dern"}, {"experts", 4}, {"router", "mean"}}),
             "passes[0].router: unknown key for merge/dern");
  EXPECT_HAS(error_of({{"pass", "merge"}, {"method", "dern"}, {"experts", 4}, {"align", false}}),
             "passes[0].align: unknown key for merge/dern");
  EXPECT_HAS(error_of({{"pass", "merge"}, {"method", "dern"}, {"experts", 4}, {"threshold", 1.5}}),
             "passes[0].threshold: expected a number in [-1, 1]");
  EXPECT_HAS(error_of({{"pass", "merge"}, {"method", "dern"}, {"experts", 4}, {"treshold", 0.5}}),
             "did you mean \"threshold\"?");
  EXPECT_HAS(error_of({{"pass", "merge"}, {"method", "msmoe"}, {"experts", 4}, {"threshold", 0.5}}),
             "passes[0].threshold: unknown key for merge/msmoe");
  EXPECT_HAS(error_of({{"pass", "merge"}, {"method", "dern"}}), "passes[0]: missing key \"experts\"");
}

TEST(Registry, BudgetsAreExclusiveAndRequired) {
  EXPECT_HAS(error_of({{"pass", "prune"}, {"method", "reap"}}), "give exactly one of \"keep\"");
  EXPECT_HAS(error_of({{"pass", "prune"}, {"method", "reap"}, {"keep", 4}, {"keep_ratio", 0.5}}), "not both");
  EXPECT_HAS(error_of({{"pass", "prune"}, {"method", "enumerate"}, {"keep_ratio", 0.5}}),
             "passes[0].keep_ratio: enumerate cannot rank experts across layers");
  EXPECT_HAS(error_of({{"pass", "merge"}, {"method", "msmoe"}}), "passes[0]: missing key \"experts\"");
}

TEST(Registry, ParamsRecordDefaults) {
  auto p = make_pass({{"pass", "merge"}, {"method", "submoe"}, {"experts", 3}}, "passes[1]");
  const json params = p->params();
  EXPECT_EQ(params.at("router"), "mean");  // the default, chosen by bench_quality
  EXPECT_EQ(params.at("router_bias"), "max");
  EXPECT_EQ(params.at("rank_ratio"), 1.0);
  EXPECT_EQ(params.at("whiten"), false);
  EXPECT_EQ(params.at("importance"), "saliency");  // count * reap, chosen by bench_quality
  EXPECT_FALSE(params.contains("seed"));
  EXPECT_FALSE(p->requirements().block_inputs);  // only the refit router runs the block on inputs
  EXPECT_EQ(p->requirements().stats_fields, (std::vector<std::string>{"count", "reap", "out_cos"}));

  auto q = make_pass({{"pass", "prune"}, {"method", "enumerate"}, {"keep", 3}, {"seed", 5}}, "passes[0]");
  EXPECT_EQ(q->params()["max_subsets"], 5000);
  EXPECT_EQ(q->params()["seed"], 5);
  EXPECT_TRUE(q->requirements().block_inputs);
  EXPECT_TRUE(q->requirements().stats_fields.empty());

  auto r = make_pass({{"pass", "prune"}, {"method", "soft"}, {"keep_ratio", 0.5}, {"protect_super_experts", true}},
                     "passes[0]");
  EXPECT_EQ(r->params()["uniform"], true);
  EXPECT_EQ(r->requirements().stats_fields, (std::vector<std::string>{"weight_sum", "out_absmax"}));
  EXPECT_FALSE(r->requirements().block_inputs);

  auto s = make_pass({{"pass", "merge"}, {"method", "hcsmoe"}, {"experts", 3}, {"router", "mean"}}, "passes[0]");
  EXPECT_FALSE(s->requirements().block_inputs);
}

TEST(Registry, ExpertsAfterChecksBudgets) {
  auto p = make_pass({{"pass", "prune"}, {"method", "reap"}, {"keep", 4}}, "passes[0]");
  EXPECT_EQ(p->experts_after(0, 8, 2), 4);
  EXPECT_THROW(p->experts_after(0, 3, 2), core::Error);  // keep > E
  EXPECT_THROW(p->experts_after(0, 8, 5), core::Error);  // keep < top_k
  auto m = make_pass({{"pass", "merge"}, {"method", "hcsmoe"}, {"experts", 6}}, "passes[0]");
  EXPECT_EQ(m->experts_after(3, 8, 2), 6);
  EXPECT_THROW(m->experts_after(3, 4, 2), core::Error);
  auto r = make_pass({{"pass", "prune"}, {"method", "reap"}, {"keep_ratio", 0.5}}, "passes[0]");
  EXPECT_EQ(r->experts_after(0, 8, 2), 4);  // estimate before planning
  EXPECT_EQ(r->experts_after(0, 8, 6), 6);  // never below top_k
}

TEST(Options, EditDistanceAndNearest) {
  using passes::edit_distance;
  EXPECT_EQ(edit_distance("kitten", "sitting"), 3u);
  EXPECT_EQ(edit_distance("", "abc"), 3u);
  EXPECT_EQ(edit_distance("Keep", "keep"), 0u);
  EXPECT_EQ(passes::nearest("kep", {"keep", "keep_ratio", "seed"}), "keep");
  EXPECT_EQ(passes::nearest("zzzzzz", {"keep", "seed"}), "");
}

TEST(Options, LayerSeed) {
  EXPECT_EQ(passes::layer_seed(std::nullopt, 77, 3), 77u);
  EXPECT_EQ(passes::layer_seed(5, 77, 3), passes::layer_seed(5, 99, 3));  // pass seed wins
  EXPECT_NE(passes::layer_seed(5, 77, 3), passes::layer_seed(5, 77, 4));  // differs per layer
}

}  // namespace
}  // namespace moe::pipeline
