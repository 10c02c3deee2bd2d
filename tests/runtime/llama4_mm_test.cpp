// llama4 (Llama4ForConditionalGeneration, the multimodal wrapper of every released Llama-4) read as
// its text model: data/llama4-mm-tiny (data/scripts/llama4_mm_fixture.py) holds data/llama4-tiny's
// text weights under "language_model." with text_config, plus a made-up vision tower and projector
// (vision_model.*, multi_modal_projector.*). The forward equals the text fixture's bit for bit (so
// data/golden/llama4.json holds for it), calibrate counts equal the reference's; prune, merge,
// quantize, factorize and convert write the wrapper back (prefixed names, changed keys inside
// text_config, every other key and the vision tensors as read); a malformed wrapper is refused.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "reference_golden.h"
#include "runtime/forward.h"
#include "runtime_test_util.h"
#include "support/ckpt_util.h"
#include "support/run.h"

namespace moe::test {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const fs::path& mm_fixture() {
  static const fs::path p = source_dir() / "data/llama4-mm-tiny";
  return p;
}
const fs::path& text_fixture() {
  static const fs::path p = source_dir() / "data/llama4-tiny";
  return p;
}

bool is_vision(const std::string& name) {
  return name.starts_with("vision_model.") || name.starts_with("multi_modal_projector.");
}

// The checkpoint `out` written from the wrapper: every tensor name prefixed or a vision one, the
// vision tensors the input's bytes, config.json the input's with `expert_count` experts in
// text_config and nothing else of the text model at the top level.
void expect_wrapper_written(const fs::path& out, int expert_count) {
  const TensorMap in = read_tensors(mm_fixture()), got = read_tensors(out);
  int vision = 0;
  for (const auto& [name, t] : in)
    if (is_vision(name)) {
      ++vision;
      ASSERT_TRUE(got.count(name)) << out << ": " << name;
      EXPECT_EQ(got.at(name).bytes, t.bytes) << out << ": " << name;
      EXPECT_EQ(got.at(name).shape, t.shape) << out << ": " << name;
    }
  EXPECT_EQ(vision, 26);
  for (const auto& [name, t] : got) EXPECT_TRUE(is_vision(name) || name.starts_with("language_model.")) << out << ": " << name;
  const std::string gu = "language_model.model.layers.1.feed_forward.experts.gate_up_proj";
  ASSERT_TRUE(got.count(gu)) << out;
  EXPECT_EQ(got.at(gu).shape, (core::Shape{expert_count, 64, 32})) << out;
  const json cin = json::parse(read_file(mm_fixture() / "config.json"));
  const json cout = json::parse(read_file(out / "config.json"));
  EXPECT_EQ(cout.at("text_config").at("num_local_experts"), expert_count) << out;
  for (const char* key : {"architectures", "model_type", "vision_config", "image_token_index", "boi_token_index",
                          "eoi_token_index", "tie_word_embeddings", "torch_dtype", "transformers_version"})
    EXPECT_EQ(cout.at(key), cin.at(key)) << out << ": " << key;
  for (const char* key : {"num_local_experts", "intermediate_size", "hidden_size", "num_hidden_layers"})
    EXPECT_FALSE(cout.contains(key)) << out << ": " << key;
  expect_eval_runs(out);
}

// What is read: the text model's layers and dims from text_config, the vision tower and projector
// as extras (passed through), the family the llama4 wrapper entry.
TEST(Llama4Mm, ReadsTheTextModel) {
  auto lm = load_model(mm_fixture());
  const model::Model& m = lm->model;
  EXPECT_EQ(m.family().model_type, "llama4");
  EXPECT_EQ(m.family().text_model_type, "llama4_text");
  ASSERT_EQ(m.layers().size(), 4u);
  EXPECT_EQ(m.dims().hidden, 64);
  EXPECT_EQ(m.layers().at(1).moe->num_experts(), 8);
  EXPECT_EQ(m.config().get_int("num_local_experts"), 8);
  EXPECT_EQ(m.wrapper_config().at("model_type"), "llama4");
  EXPECT_EQ(m.extras().size(), 26u);
  for (const auto& [name, t] : m.extras()) EXPECT_TRUE(is_vision(name)) << name;
  // A text token runs the text model: the vision tower counts in the total, not in the active.
  auto text = load_model(text_fixture());
  int64_t vision = 0;
  for (const auto& [name, t] : m.extras()) vision += t.numel();
  EXPECT_EQ(m.total_params(), text->model.total_params() + vision);
  EXPECT_EQ(m.active_params(), text->model.active_params());
}

// The forward on the wrapper equals the text fixture's bit for bit (logits, experts, scores) on the
// golden's window, and so the NumPy reference's golden data/golden/llama4.json holds for it.
TEST(Llama4Mm, ForwardEqualsTheTextModelsAndTheReference) {
  const json g = read_json_or_fail(source_dir() / "data/golden/llama4.json");
  ASSERT_FALSE(g.is_null());
  const auto tokens = g.at("tokens").get<std::vector<int32_t>>();
  const int64_t T = g.at("T").get<int64_t>();
  auto run = [&](const fs::path& dir, RoutingRecorder& rec) {
    auto lm = load_model(dir);
    runtime::Forward fwd(lm->model);
    runtime::Observer* obs[] = {&rec};
    return runtime::MatrixRM(fwd.run(tokens, T, obs));
  };
  RoutingRecorder rm, rt;
  const runtime::MatrixRM mm = run(mm_fixture(), rm), text = run(text_fixture(), rt);
  ASSERT_EQ(mm.rows(), text.rows());
  ASSERT_EQ(mm.cols(), text.cols());
  EXPECT_EQ((mm - text).cwiseAbs().maxCoeff(), 0.0f);
  ASSERT_EQ(rm.routing.size(), 2u);
  for (const auto& [l, r] : rt.routing) {
    ASSERT_TRUE(rm.routing.count(l)) << l;
    EXPECT_TRUE(rm.routing.at(l).ids == r.ids) << l;
    EXPECT_TRUE(rm.routing.at(l).weights == r.weights) << l;
  }
  double diff = 0;
  const int64_t step = g.at("logit_ids_step").get<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    for (size_t j = 0; j < g.at("logits")[t].size(); ++j)
      diff = std::max(diff, std::abs(double(mm(t, static_cast<int64_t>(j) * step)) - g.at("logits")[t][j].get<double>()));
  const double tol = 1e-4 * g.at("logits_abs_max").get<double>();
  EXPECT_LE(diff, tol);
  std::printf("[ llama4 on llama4-mm-tiny ] max |logit diff| = %.3g (|logit| max %.3g)\n", diff,
              g.at("logits_abs_max").get<double>());
}

TEST(Llama4Mm, CalibrateCountsEqualReference) { check_calibrate_counts("llama4", mm_fixture(), 8); }

// Top-level keys do not shadow text_config's (the wrapper's own keys are its, not the text model's).
TEST(Llama4Mm, TopLevelKeysDoNotShadowTextConfig) {
  TempDir dir;
  copy_with_config(mm_fixture(), dir.path(), {{"num_local_experts", 3}, {"hidden_size", 7}, {"num_hidden_layers", 1},
                                              {"rope_theta", 1.0}});
  auto lm = load_model(dir.path());
  EXPECT_EQ(lm->model.layers().size(), 4u);
  EXPECT_EQ(lm->model.dims().hidden, 64);
  EXPECT_EQ(lm->model.layers().at(1).moe->num_experts(), 8);
}

// A malformed wrapper: exit 2 with one line naming config.json and the key.
TEST(Llama4Mm, MalformedWrapperRefused) {
  const std::vector<std::pair<json, std::string>> cases = {
      {{{"text_config", nullptr}}, "config.json: text_config: missing"},
      {{{"text_config", 5}}, "config.json: text_config: expected an object, found number"},
      {{{"text_config", {{"model_type", "llama4_vision_model"}}}},
       "config.json: text_config.model_type: expected \"llama4_text\" (model_type llama4), found \"llama4_vision_model\""},
      {{{"text_config", {{"num_hidden_layers", nullptr}}}}, "config.json: text_config.num_hidden_layers: missing (required)"},
      {{{"text_config", {{"num_local_experts", "8"}}}}, "config.json: text_config.num_local_experts: expected a positive integer"},
      {{{"text_config", {{"quantization_config", {{"quant_method", "fp8"}}}}}},
       "config.json: text_config.quantization_config: not read (transformers reads the top-level quantization_config"},
  };
  for (const auto& [patch, want] : cases) {
    TempDir dir;
    copy_with_config(mm_fixture(), dir.path(), patch);
    const RunResult r = run_tool({"-q", "inspect", dir.path().string()});
    EXPECT_EQ(r.exit_code, 2) << patch.dump() << "\n" << r.describe();
    EXPECT_NE(r.err.find(want), std::string::npos) << patch.dump() << "\n" << r.err;
    EXPECT_LE(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
}

// What the forward reads from text_config is named there too (eval: the forward's own checks).
TEST(Llama4Mm, ForwardConfigErrorsNameTextConfig) {
  const std::vector<std::pair<json, std::string>> cases = {
      {{{"floor_scale", -1}}, "config.json: text_config.floor_scale: expected a positive number"},
      {{{"hidden_act", "gelu"}}, "config.json: text_config.hidden_act 'gelu' not implemented"},
      {{{"layer_types", json::array({"bogus", "bogus", "bogus", "bogus"})}}, "config.json: text_config.layer_types[0]: expected"},
      {{{"moe_layers", json::array({1, 3, 7})}}, "config.json: text_config.moe_layers: layer 7 not in [0, num_hidden_layers 4)"},
      {{{"no_rope_layers", json::array({1, "x"})}}, "config.json: text_config.no_rope_layers: expected a list of integers"},
      {{{"num_experts_per_tok", 99}}, "config.json: text_config.num_experts_per_tok: 99 exceeds"},
      {{{"rope_scaling", {{"rope_type", "weird"}, {"factor", 2.0}}}}, "config.json: text_config.rope_scaling.rope_type 'weird'"},
  };
  for (const auto& [patch, want] : cases) {
    TempDir dir;
    copy_with_config(mm_fixture(), dir.path(), {{"text_config", patch}});
    const RunResult r = run_tool({"-q", "eval", dir.path().string(), "--text", heldout_text(), "--ctx", "16",
                                  "--max-windows", "1"});
    EXPECT_EQ(r.exit_code, 2) << patch.dump() << "\n" << r.describe();
    EXPECT_NE(r.err.find(want), std::string::npos) << patch.dump() << "\n" << r.err;
    EXPECT_LE(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
}

// The text tensors are read under their language_model. names only: a missing one is named, and a
// wrapper config over unprefixed (llama4_text) weights is refused naming the first name it lacks.
TEST(Llama4Mm, TextTensorNamesChecked) {
  auto inspect_error = [](const fs::path& dir) {
    const RunResult r = run_tool({"-q", "inspect", dir.string()});
    EXPECT_EQ(r.exit_code, 2) << r.describe();
    return r.err;
  };
  {
    TempDir dir;
    copy_with_config(mm_fixture(), dir.path(), json::object());
    remove_tensor(dir.path() / "model.safetensors", "language_model.model.layers.1.feed_forward.router.weight");
    const std::string err = inspect_error(dir.path());
    EXPECT_NE(err.find("tensor language_model.model.layers.1.feed_forward.router.weight: missing"), std::string::npos) << err;
  }
  TempDir dir;
  copy_with_config(text_fixture(), dir.path(), json::object());
  write_file(dir.path() / "config.json", read_file(mm_fixture() / "config.json"));
  const std::string err = inspect_error(dir.path());
  EXPECT_NE(err.find("tensor language_model.model.embed_tokens.weight: missing"), std::string::npos) << err;
}

// eval on the wrapper gives the text fixture's perplexity exactly; GGUF export refuses this fixture's
// 8-token attention chunks (llama.cpp's llama4 graph chunks by 8192: docs/gguf.md).
TEST(Llama4MmCli, EvalEqualsTheTextModelsGgufRefused) {
  auto ppl = [](const fs::path& model) {
    const RunResult r = run_tool({"-q", "eval", model.string(), "--text", heldout_text(), "--ctx", "32", "--max-windows", "2", "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return r.exit_code == 0 ? json::parse(r.out).at("perplexity").get<double>() : -1.0;
  };
  const double p = ppl(mm_fixture());
  EXPECT_TRUE(std::isfinite(p) && p > 1.0);
  EXPECT_EQ(p, ppl(text_fixture()));
  TempDir tmp;
  const RunResult r = run_tool({"-q", "export", mm_fixture().string(), (tmp.path() / "m.gguf").string(), "--type", "q8_0"});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_NE(r.err.find("layer 0: attention_chunk_size 8: llama.cpp's llama4 graph chunks the RoPE layers' attention by 8192 tokens"),
            std::string::npos)
      << r.err;
  EXPECT_FALSE(fs::exists(tmp.path() / "m.gguf"));
  // A run with a GGUF sink: gptq's encoded experts are refused on the fused layout, nothing written.
  const fs::path g = tmp.path() / "q.gguf";
  const RunResult q = run_with_calibration({"-q", "quantize", mm_fixture().string(), g.string(), "--method", "gptq", "--format",
                                            "gguf", "--gguf-type", "q8_0"},
                                           {});
  EXPECT_EQ(q.exit_code, 2) << q.describe();
  EXPECT_NE(q.err.find("which the fused llama4 expert layout cannot hold"), std::string::npos) << q.err;
  EXPECT_FALSE(fs::exists(g));
}

// prune --method reap --keep 6 and merge --method msmoe --experts 6 (routed-only statistics) write
// the wrapper with 6 experts in text_config; the pruned layers equal those the text fixture's prune
// writes from its own statistics (the same text, the same forward).
TEST(Llama4MmCli, PruneMergeWriteTheWrapper) {
  TempDir tmp;
  RunResult r;
  const fs::path reap = tmp.path() / "reap", text_reap = tmp.path() / "text-reap";
  for (const auto& [in, out] : {std::pair{mm_fixture(), reap}, {text_fixture(), text_reap}}) {
    const fs::path stats = out.string() + ".stats";
    r = run_tool({"-q", "calibrate", in.string(), "--text", heldout_text(), "-o", stats.string(), "--ctx", "32", "--windows",
                  "2", "--routed-only"});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    r = run_tool({"-q", "prune", in.string(), out.string(), "--method", "reap", "--keep", "6", "--stats", stats.string()});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
  }
  expect_wrapper_written(reap, 6);
  const TensorMap got = read_tensors(reap), text = read_tensors(text_reap);
  for (const auto& [name, t] : text) {
    ASSERT_TRUE(got.count("language_model." + name)) << name;
    EXPECT_EQ(got.at("language_model." + name).bytes, t.bytes) << name;
  }
  const fs::path merged = tmp.path() / "merged";
  r = run_with_calibration({"-q", "merge", mm_fixture().string(), merged.string(), "--method", "msmoe", "--experts", "6"},
                           {"--routed-only"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  expect_wrapper_written(merged, 6);
}

// quantize --method gptq and factorize --method svdllm (--materialize: the fused layout is written
// dense) write the wrapper with 8 experts; the quantized text tensors equal those of the same GPTQ
// on the text fixture (the same calibration inputs, Hessians and codes).
TEST(Llama4MmCli, QuantizeFactorizeWriteTheWrapper) {
  TempDir tmp;
  const fs::path q = tmp.path() / "q", tq = tmp.path() / "tq", f = tmp.path() / "f";
  for (const auto& [in, out] : {std::pair{mm_fixture(), q}, {text_fixture(), tq}}) {
    const RunResult r = run_with_calibration({"-q", "quantize", in.string(), out.string(), "--method", "gptq", "--codec", "int4"},
                                             {"--materialize"});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
  }
  expect_wrapper_written(q, 8);
  const TensorMap got = read_tensors(q), text = read_tensors(tq), in = read_tensors(mm_fixture());
  const std::string gu = "model.layers.1.feed_forward.experts.gate_up_proj";
  EXPECT_NE(got.at("language_model." + gu).bytes, in.at("language_model." + gu).bytes);
  for (const auto& [name, t] : text) EXPECT_EQ(got.at("language_model." + name).bytes, t.bytes) << name;
  const RunResult r = run_with_calibration(
      {"-q", "factorize", mm_fixture().string(), f.string(), "--method", "svdllm", "--ratio", "0.5"}, {"--materialize"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  expect_wrapper_written(f, 8);
}

// convert --dtype f16 of a wrapper whose top level spells the dtype both ways (v5's `dtype`, v4's
// `torch_dtype`) and whose text_config has neither: both top-level keys say float16.
TEST(Llama4MmCli, DtypeChangedAtTheTopLevelToo) {
  TempDir tmp;
  const fs::path in = tmp.path() / "in", out = tmp.path() / "f16";
  copy_folder(mm_fixture(), in);
  json cfg = json::parse(read_file(in / "config.json"));
  cfg["dtype"] = cfg["torch_dtype"] = "bfloat16";
  cfg["text_config"].erase("dtype");
  cfg["text_config"].erase("torch_dtype");
  write_file(in / "config.json", cfg.dump(2));
  const RunResult r = run_tool({"-q", "convert", in.string(), out.string(), "--dtype", "f16"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json got = json::parse(read_file(out / "config.json"));
  EXPECT_EQ(got.at("dtype"), "float16") << got.dump();
  EXPECT_EQ(got.at("torch_dtype"), "float16") << got.dump();
  expect_eval_runs(out);
}

// export --format gptq of a wrapper whose text attention is int4: the GPTQ config's per-layer
// module set is the decoder's (the vision tower's layers are not decoder layers), and the vision
// tower and projector are excluded whole by `dynamic`; their tensors are written as read.
TEST(Llama4MmCli, GptqExportKeepsTheVisionTowerDense) {
  TempDir tmp;
  const fs::path q = tmp.path() / "q", g = tmp.path() / "g";
  RunResult r = run_tool({"-q", "quantize", mm_fixture().string(), q.string(), "--method", "rtn", "--attention", "int4:g32:sym",
                          "--experts", "keep", "--shared", "keep", "--dense", "keep"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  r = run_tool({"-q", "export", q.string(), g.string(), "--format", "gptq"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json qc = json::parse(read_file(g / "config.json")).at("quantization_config");
  EXPECT_EQ(qc.at("modules_in_block_to_quantize"),
            json::parse(R"([["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]])"));
  EXPECT_TRUE(qc.at("dynamic").contains("-:^vision_model\\..*")) << qc.dump();
  EXPECT_TRUE(qc.at("dynamic").contains("-:^multi_modal_projector\\..*")) << qc.dump();
  const TensorMap in = read_tensors(mm_fixture()), got = read_tensors(g);
  for (const auto& [name, t] : in)
    if (is_vision(name)) EXPECT_EQ(got.at(name).bytes, t.bytes) << name;
  EXPECT_TRUE(got.count("language_model.model.layers.0.self_attn.q_proj.qweight"));
}

// convert writes every tensor back byte for byte and config.json as read.
TEST(Llama4MmCli, ConvertRoundTrip) {
  TempDir tmp;
  const fs::path out = tmp.path() / "c";
  const RunResult r = run_tool({"-q", "convert", mm_fixture().string(), out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(first_difference(read_tensors(mm_fixture()), read_tensors(out)), "");
  EXPECT_EQ(json::parse(read_file(out / "config.json")), json::parse(read_file(mm_fixture() / "config.json")));
}

}  // namespace
}  // namespace moe::test
