// Eval library and CLI: perplexity against the goldens, KL of a model against itself, the
// llama.cpp convention, and the eval/tokenize CLI (outputs, and errors: exit 2, one line).
#include <gtest/gtest.h>

#include <filesystem>

#include "core/error.h"
#include "eval/eval.h"
#include "runtime_test_util.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

namespace fs = std::filesystem;

fs::path synthetic(const std::string& name) { return source_dir() / "data/models/synthetic" / name; }
fs::path heldout() { return source_dir() / "data/text/heldout.txt"; }

TEST(Eval, PerplexityMatchesTheSyntheticGolden) {
  const auto g = read_json_or_fail(source_dir() / "data/golden/synthetic-qwen3moe.json");
  ASSERT_FALSE(g.is_null());
  auto lm = load_model(synthetic("qwen3moe"));
  eval::EvalOptions o;
  o.ctx = g.at("perplexity").at("ctx").get<int64_t>();
  o.max_windows = g.at("perplexity").at("n_windows").get<int64_t>();
  o.quiet = true;
  const auto tok = eval::load_tokenizer(synthetic("qwen3moe"));
  const auto w = eval::make_windows(tok, eval::read_text(heldout()), o);
  const auto r = eval::perplexity(lm->model, w, o);
  EXPECT_EQ(r.tokens_scored, g.at("perplexity").at("token_count").get<int64_t>());
  EXPECT_NEAR(r.nll_sum, g.at("perplexity").at("nll_sum").get<double>(), 1e-3 * g.at("perplexity").at("nll_sum").get<double>());
  EXPECT_LE(std::abs(r.perplexity() / g.at("perplexity").at("ppl").get<double>() - 1), 1e-3);
}

TEST(Eval, ModelAgainstItselfHasZeroKlAndFullAgreement) {
  auto a = load_model(synthetic("olmoe"));
  auto b = load_model(synthetic("olmoe"));
  eval::EvalOptions o;
  o.ctx = 32;
  o.max_windows = 3;
  o.batch_windows = 2;
  o.quiet = true;
  const auto tok = eval::load_tokenizer(synthetic("olmoe"));
  const auto w = eval::make_windows(tok, eval::read_text(heldout()), o);
  const auto c = eval::compare(a->model, b->model, w, o);
  EXPECT_EQ(c.tokens, 3 * 31);
  EXPECT_EQ(c.mean_kl(), 0.0);
  EXPECT_EQ(c.top1_agreement(), 1.0);
  EXPECT_DOUBLE_EQ(c.model.nll_sum, c.reference.nll_sum);
  const auto p = eval::perplexity(a->model, w, o);
  EXPECT_NEAR(p.nll_sum, c.model.nll_sum, 1e-9 * p.nll_sum);
}

TEST(Eval, DifferentModelsHavePositiveKl) {
  auto a = load_model(synthetic("qwen3moe"));
  auto b = load_model(synthetic("olmoe"));
  eval::EvalOptions o;
  o.ctx = 16;
  o.max_windows = 2;
  o.quiet = true;
  const auto tok = eval::load_tokenizer(synthetic("olmoe"));
  const auto w = eval::make_windows(tok, eval::read_text(heldout()), o);
  const auto c = eval::compare(a->model, b->model, w, o);
  EXPECT_GT(c.mean_kl(), 0.0);
  EXPECT_LT(c.top1_agreement(), 1.0);
}

TEST(Eval, WindowsAndConventions) {
  const auto tok = eval::load_tokenizer(synthetic("mistral"));
  const std::string text = eval::read_text(heldout());
  eval::EvalOptions o;
  o.ctx = 100;
  o.max_windows = 3;
  auto w = eval::make_windows(tok, text, o);
  EXPECT_EQ(w.windows, 3);
  EXPECT_EQ(w.tokens.size(), 300u);
  EXPECT_EQ(w.scored_per_window(), 99);
  const auto all = tok.encode(text, false);
  EXPECT_TRUE(std::equal(w.tokens.begin(), w.tokens.end(), all.begin()));
  o.max_windows = 0;
  w = eval::make_windows(tok, text, o);
  EXPECT_EQ(w.windows, static_cast<int64_t>(all.size()) / 100);
  o.llama_cpp = true;
  o.ctx = 64;
  o.max_windows = 2;
  w = eval::make_windows(tok, text, o);
  EXPECT_EQ(w.score_begin, 32);
  EXPECT_EQ(w.scored_per_window(), 31);
  if (tok.adds_bos()) {
    EXPECT_EQ(w.tokens[0], *tok.bos_id());
    EXPECT_EQ(w.tokens[64], *tok.bos_id());
  }
  // A SentencePiece-style tokenizer that adds BOS: the stream starts with BOS (as llama.cpp
  // tokenizes) and every window's first token is BOS.
  const auto sp = eval::load_tokenizer(source_dir() / "data/tokenizer-sp");
  ASSERT_TRUE(sp.adds_bos());
  const auto sp_all = sp.encode(text, true);
  w = eval::make_windows(sp, text, o);
  ASSERT_EQ(w.windows, 2);
  EXPECT_EQ(w.tokens[0], *sp.bos_id());
  EXPECT_EQ(w.tokens[64], *sp.bos_id());
  EXPECT_TRUE(std::equal(w.tokens.begin() + 1, w.tokens.begin() + 64, sp_all.begin() + 1));
  EXPECT_TRUE(std::equal(w.tokens.begin() + 65, w.tokens.end(), sp_all.begin() + 65));
  EXPECT_NE(w.convention.find("BOS"), std::string::npos);

  o.ctx = static_cast<int64_t>(all.size()) + 1;
  o.llama_cpp = false;
  try {
    eval::make_windows(tok, text, o);
    FAIL();
  } catch (const core::Error& e) {
    EXPECT_NE(e.message().find(std::to_string(all.size()) + " tokens"), std::string::npos) << e.message();
  }
}

// Trained fixtures: held-out perplexity at ctx 128 over the first 8 windows (T-1 per window),
// within 0.1% of the reference. Missing model or golden FAILS.
void check_trained_ppl(const std::string& name) {
  const auto g = read_json_or_fail(source_dir() / "data/golden" / (name + ".json"));
  ASSERT_FALSE(g.is_null());
  const fs::path dir = source_dir() / "data/models" / name;
  ASSERT_TRUE(fs::exists(dir / "config.json")) << "missing fixture model " << dir;
  auto lm = load_model(dir);
  eval::EvalOptions o;
  o.ctx = g.at("perplexity").at("ctx").get<int64_t>();
  o.max_windows = g.at("perplexity").at("n_windows").get<int64_t>();
  o.quiet = true;
  const auto tok = eval::load_tokenizer(fs::exists(dir / "tokenizer.json") ? dir : source_dir() / "data/tokenizer");
  const auto w = eval::make_windows(tok, eval::read_text(heldout()), o);
  const auto r = eval::perplexity(lm->model, w, o);
  EXPECT_EQ(r.tokens_scored, g.at("perplexity").at("token_count").get<int64_t>());
  const double ref = g.at("perplexity").at("ppl").get<double>();
  EXPECT_LE(std::abs(r.perplexity() / ref - 1), 1e-3) << name << ": " << r.perplexity() << " vs " << ref;
  std::printf("[ %s ] perplexity %.6f (golden %.6f), %.0f tokens/s\n", name.c_str(), r.perplexity(), ref,
              r.tokens_per_second);
}

TEST(EvalTrained, MixtralTiny) { check_trained_ppl("mixtral-tiny"); }
TEST(EvalTrained, Qwen2MoeTiny) { check_trained_ppl("qwen2moe-tiny"); }
TEST(EvalTrained, LlamaTiny) { check_trained_ppl("llama-tiny"); }

// ---------------------------------------------------------------- CLI

void expect_one_line_error(const RunResult& r, const std::string& needle) {
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  const auto lines = r.err_lines();
  ASSERT_EQ(lines.size(), 1u) << r.describe();
  EXPECT_NE(lines[0].find("moe-tool: error: "), std::string::npos) << lines[0];
  EXPECT_NE(lines[0].find(needle), std::string::npos) << "expected '" << needle << "' in: " << lines[0];
  EXPECT_TRUE(r.out.empty()) << r.out;
}

TEST(EvalCli, JsonOutput) {
  const auto r = run_tool({"-q", "eval", synthetic("qwen2").string(), "--text", heldout().string(), "--ctx", "32",
                           "--max-windows", "2", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto j = nlohmann::json::parse(r.out);
  for (const char* k : {"perplexity", "nll_sum", "tokens_scored", "windows", "ctx", "convention", "tokens_per_second"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_EQ(j.at("tokens_scored"), 62);
  EXPECT_EQ(j.at("windows"), 2);
  EXPECT_EQ(j.at("ctx"), 32);
}

TEST(EvalCli, TextOutputAndAgainst) {
  auto r = run_tool({"-q", "eval", synthetic("qwen2").string(), "--text", heldout().string(), "--ctx", "32",
                     "--max-windows", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("perplexity: "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("tokens scored: 31"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("tokens/s"), std::string::npos) << r.out;
  r = run_tool({"-q", "eval", synthetic("qwen2").string(), "--against", synthetic("qwen2").string(), "--text",
                heldout().string(), "--ctx", "32", "--max-windows", "1", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("kl_mean").get<double>(), 0.0);
  EXPECT_EQ(j.at("top1_agreement").get<double>(), 1.0);
  EXPECT_EQ(j.at("perplexity"), j.at("reference").at("perplexity"));
}

TEST(EvalCli, LlamaCppConvention) {
  const auto r = run_tool({"-q", "eval", synthetic("mistral").string(), "--text", heldout().string(), "--ctx", "64",
                           "--max-windows", "2", "--llama-cpp-compatible", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("tokens_scored"), 2 * 31);
  EXPECT_NE(j.at("convention").get<std::string>().find("llama.cpp"), std::string::npos);
}

TEST(EvalCli, Errors) {
  TempDir dir;
  write_file(dir / "empty.txt", "");
  write_file(dir / "short.txt", "just a few words");
  expect_one_line_error(run_tool({"eval", synthetic("qwen2").string(), "--text", (dir / "empty.txt").string()}),
                        "empty");
  expect_one_line_error(run_tool({"eval", synthetic("qwen2").string(), "--text", (dir / "nope.txt").string()}),
                        "nope.txt");
  expect_one_line_error(run_tool({"eval", synthetic("qwen2").string(), "--text", (dir / "short.txt").string(),
                                  "--ctx", "64"}),
                        (dir / "short.txt").string() + ": text has 4 tokens, fewer than one window of --ctx 64");
  expect_one_line_error(run_tool({"eval", synthetic("qwen2").string(), "--text", heldout().string(), "--ctx", "5000"}),
                        "max_position_embeddings 4096");
  // --force: a warning line, then the run goes on (here into the too-few-tokens error).
  auto r = run_tool({"eval", synthetic("qwen2").string(), "--text", (dir / "short.txt").string(), "--ctx", "5000",
                     "--force"});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  ASSERT_EQ(r.err_lines().size(), 2u) << r.describe();
  EXPECT_NE(r.err_lines()[0].find("warning"), std::string::npos);
  // A model folder without tokenizer.
  synth_to(dir / "notok", "qwen2");
  expect_one_line_error(run_tool({"eval", (dir / "notok").string(), "--text", heldout().string(), "--ctx", "32"}),
                        (dir / "notok").string());
  expect_one_line_error(run_tool({"tokenize", (dir / "notok").string(), "--text", heldout().string()}), "tokenizer");
  // Vocabulary mismatch with --against.
  expect_one_line_error(run_tool({"eval", (dir / "notok").string(), "--against", synthetic("qwen2").string(), "--text",
                                  heldout().string(), "--ctx", "32", "--max-windows", "1"}),
                        "vocabulary");
  // A setting the forward does not implement (longrope outside phimoe).
  synth_to(dir / "longrope", "qwen2_moe",
           {.config_patch = {{"rope_scaling", {{"rope_type", "longrope"}, {"short_factor", {1.0}}, {"long_factor", {1.0}},
                                               {"short_mscale", 1.0}, {"long_mscale", 1.0}}}}},
           {.tokenizer = true});
  expect_one_line_error(run_tool({"eval", (dir / "longrope").string(), "--text", heldout().string(), "--ctx", "32"}),
                        "rope_scaling.rope_type 'longrope' not implemented by the forward");
}

TEST(TokenizeCli, IdsAndJson) {
  const auto g = read_json_or_fail(source_dir() / "data/golden/tokenizer_bytelevel.json");
  ASSERT_FALSE(g.is_null());
  auto r = run_tool({"tokenize", synthetic("qwen2").string(), "--text", heldout().string(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("count"), g.at("heldout_token_count"));
  EXPECT_EQ(j.at("ids").size(), g.at("heldout_token_count").get<size_t>());
  TempDir dir;
  write_file(dir / "t.txt", g.at("cases")[1].at("text").get<std::string>());
  r = run_tool({"tokenize", synthetic("qwen2").string(), "--text", (dir / "t.txt").string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  std::string expect;
  for (const auto& id : g.at("cases")[1].at("ids")) expect += (expect.empty() ? "" : " ") + std::to_string(id.get<int>());
  EXPECT_EQ(r.out, expect + "\n");
}

}  // namespace
}  // namespace moe::test
