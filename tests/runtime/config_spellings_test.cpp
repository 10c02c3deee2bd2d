// The forward's hyper-parameters from config.json: transformers v5's rope_parameters read with the
// same rules as v4's rope_theta / rope_scaling, and the family defaults of transformers'
// configuration_<model_type>.py for keys a config leaves out.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "runtime/forward.h"
#include "runtime_test_util.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

runtime::ForwardSpec spec_of(const std::string& family, const json& config_edit) {
  TempDir tmp("moe-spellings");
  write_synth(make_synth(family, {.config_edit = config_edit}), tmp / "m");
  auto l = load_model(tmp / "m");
  return runtime::ForwardSpec::from_model(l->model);
}

std::string error_of(const std::string& family, const json& config_edit) {
  try {
    spec_of(family, config_edit);
  } catch (const core::Error& e) {
    return e.message();
  }
  return "(no error)";
}

// Each family's defaults in transformers (configuration_<model_type>.py).
TEST(ConfigDefaults, RopeThetaAndRmsNormEpsWhenMissing) {
  struct Want {
    const char* family;
    double theta, eps;
  };
  for (const Want& w : {Want{"mixtral", 1e6, 1e-5}, Want{"olmoe", 1e4, 1e-5}, Want{"qwen2_moe", 1e4, 1e-6},
                        Want{"qwen3_moe", 1e4, 1e-6}, Want{"llama", 1e4, 1e-6}, Want{"mistral", 1e4, 1e-6},
                        Want{"qwen2", 1e4, 1e-6}, Want{"qwen3", 1e4, 1e-6}}) {
    SCOPED_TRACE(w.family);
    const auto s = spec_of(w.family, {{"rope_theta", nullptr}, {"rms_norm_eps", nullptr}});
    EXPECT_EQ(s.rope_theta, w.theta);
    EXPECT_EQ(s.eps, w.eps);
    EXPECT_EQ(s.rope_scaling.type, "default");
    // Given values win over the defaults.
    const auto g = spec_of(w.family, {{"rope_theta", 1234.5}, {"rms_norm_eps", 3e-7}});
    EXPECT_EQ(g.rope_theta, 1234.5);
    EXPECT_EQ(g.eps, 3e-7);
  }
}

TEST(ConfigDefaults, MistralSlidingWindowWhenMissing) {
  EXPECT_EQ(spec_of("mistral", {{"sliding_window", nullptr}}).attn.sliding_window, 4096);  // key removed
  EXPECT_EQ(spec_of("mixtral", {{"sliding_window", nullptr}}).attn.sliding_window, 0);
  EXPECT_EQ(spec_of("mistral", {{"sliding_window", 64}}).attn.sliding_window, 64);
}

TEST(ConfigDefaults, Qwen3HeadDimWhenMissing) {
  // transformers' Qwen3Config has head_dim 128, not hidden_size / heads: the synthetic tensors
  // (head dim 8) then disagree with the config, and loading says so.
  TempDir tmp("moe-spellings");
  write_synth(make_synth("qwen3", {.config_edit = {{"head_dim", nullptr}}}), tmp / "m");
  try {
    load_model(tmp / "m");
    ADD_FAILURE() << "loaded";
  } catch (const core::Error& e) {
    EXPECT_NE(e.message().find("head_dim=128"), std::string::npos) << e.message();
  }
}

// transformers v5: rope_parameters {"rope_type", "rope_theta", scaling fields}.
TEST(RopeParameters, ThetaAndScalingReadAsInV4) {
  auto s = spec_of("mixtral", {{"rope_theta", nullptr}, {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 5e5}}}});
  EXPECT_EQ(s.rope_theta, 5e5);
  EXPECT_EQ(s.rope_scaling.type, "default");
  s = spec_of("qwen2_moe", {{"rope_theta", nullptr},
                            {"rope_parameters", {{"rope_type", "linear"}, {"rope_theta", 2e4}, {"factor", 4.0}}}});
  EXPECT_EQ(s.rope_theta, 2e4);
  EXPECT_EQ(s.rope_scaling.type, "linear");
  EXPECT_EQ(s.rope_scaling.factor, 4.0);
  const auto v4 = spec_of("qwen2_moe", {{"rope_theta", 2e4}, {"rope_scaling", {{"type", "linear"}, {"factor", 4.0}}}});
  EXPECT_EQ(v4.rope_theta, s.rope_theta);
  EXPECT_EQ(v4.rope_scaling.type, s.rope_scaling.type);
  EXPECT_EQ(v4.rope_scaling.factor, s.rope_scaling.factor);
  // llama3 fields in rope_parameters.
  s = spec_of("llama", {{"rope_parameters", {{"rope_type", "llama3"}, {"rope_theta", 5e5}, {"factor", 8.0},
                                             {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                                             {"original_max_position_embeddings", 64}}},
                        {"rope_theta", nullptr}});
  EXPECT_EQ(s.rope_scaling.type, "llama3");
  EXPECT_EQ(s.rope_scaling.original_max_positions, 64);
  // rope_parameters without rope_theta: the top-level key, else the family default.
  EXPECT_EQ(spec_of("mixtral", {{"rope_theta", nullptr}, {"rope_parameters", {{"rope_type", "default"}}}}).rope_theta, 1e6);
  EXPECT_EQ(spec_of("mixtral", {{"rope_theta", 3e3}, {"rope_parameters", {{"rope_type", "default"}}}}).rope_theta, 3e3);
}

TEST(RopeParameters, RefusalsNameTheKey) {
  // yarn where the forward has none (mixtral; the qwen families and gpt_oss have it).
  EXPECT_NE(error_of("mixtral", {{"rope_parameters", {{"rope_type", "yarn"}, {"rope_theta", 1e6}, {"factor", 4.0}}}})
                .find("rope_parameters.rope_type 'yarn' not implemented"),
            std::string::npos);
  EXPECT_NE(error_of("mixtral", {{"rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}}})
                .find("rope_scaling.rope_type 'yarn' not implemented"),
            std::string::npos);
  EXPECT_NE(error_of("qwen2_moe", {{"rope_theta", 1e6}, {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 1e4}}}})
                .find("rope_parameters.rope_theta 10000.0 disagrees with rope_theta 1000000.0"),
            std::string::npos);
  EXPECT_NE(error_of("qwen2_moe", {{"rope_scaling", {{"type", "linear"}, {"factor", 2.0}}},
                                   {"rope_parameters", {{"rope_type", "default"}}}})
                .find("disagrees with rope_scaling"),
            std::string::npos);
  EXPECT_NE(error_of("qwen2_moe", {{"rope_parameters", {{"rope_type", "default"}, {"rope_theta", "big"}}}})
                .find("rope_parameters.rope_theta: expected a positive number, found \"big\""),
            std::string::npos);
  EXPECT_NE(error_of("qwen2_moe", {{"rope_parameters", {{"full_attention", {{"rope_type", "default"}}}}}})
                .find("rope_parameters.full_attention"),
            std::string::npos);
}

// The qwen2moe-tiny fixture rewritten with rope_parameters evaluates exactly as the original.
TEST(RopeParameters, Qwen2MoeTinyRewrittenEvaluatesTheSame) {
  TempDir tmp("moe-spellings");
  const fs::path src = source_dir() / "data/models/qwen2moe-tiny";
  auto copy_with = [&](const std::string& name, const json& edit) {
    const fs::path d = tmp / name;
    fs::create_directories(d);
    for (const auto& e : fs::directory_iterator(src))
      if (e.path().filename() != "config.json") fs::create_symlink(e.path(), d / e.path().filename());
    json c = json::parse(read_file(src / "config.json"));
    c.merge_patch(edit);
    write_file(d / "config.json", c.dump(2));
    return d;
  };
  const json orig = json::parse(read_file(src / "config.json"));
  ASSERT_EQ(orig.at("rope_theta"), 1e6);
  const fs::path v5 = copy_with("v5", {{"rope_theta", nullptr},
                                       {"rope_scaling", nullptr},
                                       {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 1e6}}}});
  const fs::path missing = copy_with("missing", {{"rope_theta", nullptr}});
  auto ppl = [&](const fs::path& m) {
    const RunResult r = run_tool({"-q", "eval", m.string(), "--text", (source_dir() / "data/text/heldout.txt").string(),
                                  "--ctx", "64", "--max-windows", "4", "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return json::parse(r.out)["perplexity"].get<double>();
  };
  const double p_orig = ppl(src), p_v5 = ppl(v5), p_missing = ppl(missing);
  EXPECT_EQ(p_v5, p_orig);
  EXPECT_NE(p_missing, p_orig);  // qwen2_moe's default theta is 10000, not the fixture's 1e6
}

}  // namespace
}  // namespace moe::test
