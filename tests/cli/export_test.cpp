// `export` through the CLI: each fixture and type written, read back by our GGUF reader and
// compared with data/golden/gguf.json (made by data/scripts/check_gguf.py, an independent NumPy
// decoder of the same files); metadata and tensor types as llama.cpp expects them; --tensor-type;
// and every refusal (exit 2, one line, nothing written).
// Then the recipe output formats (pipeline/sink.h): a recipe that prunes, quantizes and writes
// GGUF, compressed-tensors or GPTQ writes the same bytes as `export` of the same recipe's native
// output (the sink stages the native output beside its own and converts it), leaves no staging
// behind, and refuses an encoding the format cannot hold before any work (exit 2, one line naming
// the JSON path or flag and the way out, nothing written). Small synthetic mixtral (hidden 32, 4
// experts of width 32, the fixtures' byte-level tokenizer).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <tuple>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "io/checkpoint.h"
#include "io/env.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "quant/gguf_blocks.h"
#include "support/ckpt_util.h"
#include "support/paths.h"
#include "support/cli_expect.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;


const json& goldens() {
  static const json g = read_json(kSrc / "data/golden/gguf.json");
  return g;
}

fs::path export_model(const TempDir& dir, const std::string& model, const std::string& type,
                      const std::vector<std::string>& extra = {}) {
  const fs::path out = dir / (model + "-" + type + ".gguf");
  // A trailing slash on MODEL: general.name is still the folder's name.
  std::vector<std::string> args = {"-q", "export", (kSrc / "data/models" / model).string() + "/", out.string(), "--type", type};
  args.insert(args.end(), extra.begin(), extra.end());
  const RunResult r = run_tool(args);
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  return out;
}

struct Case {
  std::string model, type;
};
class ExportGolden : public ::testing::TestWithParam<Case> {};

// Our reader's decode of the written file gives the checksums the NumPy decoder computed.
TEST_P(ExportGolden, DecodesAsTheIndependentCheck) {
  const auto& [model, type] = GetParam();
  TempDir dir{"moe-export"};
  // "<type>_down": Q8_0 with the expert down projections (mixtral-tiny's rows of 256) in that type;
  // "<type>_shexp": the same with the shared expert's down projection (qwen2moe-tiny's rows of 256).
  const auto down = type.find("_down"), shexp = type.find("_shexp");
  const fs::path out =
      down != std::string::npos    ? export_model(dir, model, "q8_0", {"--tensor-type", "ffn_down_exps=" + type.substr(0, down)})
      : shexp != std::string::npos ? export_model(dir, model, "q8_0", {"--tensor-type", "ffn_down_shexp=" + type.substr(0, shexp)})
                                   : export_model(dir, model, type);
  const auto f = io::GgufFile::open(io::Env::posix(), out);
  const json& g = goldens().at(model).at(type);
  ASSERT_FALSE(g.empty());
  for (const auto& [name, want] : g.items()) {
    SCOPED_TRACE(name);
    const io::GgufTensorInfo* t = f.find_tensor(name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(quant::ggml_type_info(t->type).name, want.at("type").get<std::string>());
    EXPECT_EQ(t->ne, want.at("ne").get<std::vector<int64_t>>());
    const auto y = f.decode(*t);
    double sum = 0, sum_sq = 0, sum_w = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      sum += y[i];
      sum_sq += static_cast<double>(y[i]) * y[i];
      sum_w += static_cast<double>(y[i]) * static_cast<double>(i % 97 + 1);
    }
    // Float64 sums of the same float32 values: equal up to summation order.
    const double scale = std::sqrt(static_cast<double>(y.size()) * want.at("sum_sq").get<double>()) + 1e-12;
    EXPECT_NEAR(sum, want.at("sum").get<double>(), 1e-9 * scale);
    EXPECT_NEAR(sum_sq, want.at("sum_sq").get<double>(), 1e-9 * want.at("sum_sq").get<double>() + 1e-12);
    EXPECT_NEAR(sum_w, want.at("sum_w").get<double>(), 1e-9 * 97 * scale);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, ExportGolden,
    ::testing::Values(Case{"mixtral-tiny", "f32"}, Case{"mixtral-tiny", "f16"}, Case{"mixtral-tiny", "bf16"},
                      Case{"mixtral-tiny", "q8_0"}, Case{"mixtral-tiny", "q4_0"}, Case{"mixtral-tiny", "q4_1"},
                      Case{"mixtral-tiny", "q5_0"}, Case{"mixtral-tiny", "q5_1"}, Case{"qwen2moe-tiny", "f32"},
                      Case{"qwen2moe-tiny", "q4_0"}, Case{"qwen2moe-tiny", "q5_1"}, Case{"validation-tiny", "f32"},
                      Case{"validation-tiny", "q8_0"}, Case{"validation-tiny", "q4_1"},
                      Case{"mixtral-tiny", "tq1_0_down"}, Case{"mixtral-tiny", "tq2_0_down"},
                      Case{"mixtral-tiny", "q2_k_down"}, Case{"mixtral-tiny", "q3_k_down"}, Case{"mixtral-tiny", "q4_k_down"},
                      Case{"mixtral-tiny", "q5_k_down"}, Case{"mixtral-tiny", "q6_k_down"},
                      Case{"qwen2moe-tiny", "q4_k_shexp"}, Case{"llama-tiny", "f32"}, Case{"llama-tiny", "q8_0"},
                      Case{"llama-tiny", "q4_0"}),
    [](const auto& info) {
      std::string n = info.param.model + "_" + info.param.type;
      for (auto& c : n)
        if (c == '-') c = '_';
      return n;
    });

int64_t meta_int(const io::GgufFile& f, const std::string& key) {
  const io::GgufValue* v = f.find(key);
  EXPECT_NE(v, nullptr) << key;
  return v ? v->as_int(key) : -1;
}

// `moe-tool eval`'s nll_sum of a model on 4 windows of `ctx` tokens of the held-out text.
double nll_sum(const fs::path& model, int ctx) {
  const RunResult e = run_tool({"-q", "eval", model.string(), "--text", (kSrc / "data/text/heldout.txt").string(), "--ctx",
                                std::to_string(ctx), "--max-windows", "4", "--json"});
  EXPECT_EQ(e.exit_code, 0) << e.describe();
  return json::parse(e.out).at("nll_sum").get<double>();
}

// A copy of the fixture data/<fixture> at `to` with `patch` merged into its config.json.
void copy_fixture_with(const std::string& fixture, const fs::path& to, const json& patch) {
  copy_with_config(kSrc / "data" / fixture, to, patch);
}

// The GGUF tensor `gguf` decodes to the checkpoint's tensor `ours` exactly (not permuted).
void expect_same_tensor(const io::GgufFile& f, const std::string& gguf, const io::Checkpoint& ck, const std::string& ours) {
  SCOPED_TRACE(gguf);
  const io::GgufTensorInfo* t = f.find_tensor(gguf);
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(f.decode(*t), ck.tensor(ours).to_f32());
}

std::string type_of(const io::GgufFile& f, const std::string& name) {
  const io::GgufTensorInfo* t = f.find_tensor(name);
  EXPECT_NE(t, nullptr) << name;
  return t ? quant::ggml_type_info(t->type).name : "";
}

TEST(Export, MixtralMetadataAndTypesAsLlamaCppExpects) {
  TempDir dir{"moe-export"};
  const auto f = io::GgufFile::open(io::Env::posix(), export_model(dir, "mixtral-tiny", "q4_0"));
  EXPECT_EQ(f.find("general.architecture")->as_string("a"), "llama");
  EXPECT_EQ(f.find("general.name")->as_string("n"), "mixtral-tiny");
  EXPECT_EQ(meta_int(f, "general.file_type"), 2);  // LLAMA_FTYPE_MOSTLY_Q4_0
  EXPECT_EQ(meta_int(f, "general.alignment"), 32);
  EXPECT_EQ(meta_int(f, "llama.block_count"), 4);
  EXPECT_EQ(meta_int(f, "llama.embedding_length"), 128);
  EXPECT_EQ(meta_int(f, "llama.feed_forward_length"), 256);
  EXPECT_EQ(meta_int(f, "llama.attention.head_count"), 4);
  EXPECT_EQ(meta_int(f, "llama.attention.head_count_kv"), 2);
  EXPECT_EQ(meta_int(f, "llama.expert_count"), 8);
  EXPECT_EQ(meta_int(f, "llama.expert_used_count"), 2);
  EXPECT_EQ(meta_int(f, "llama.rope.dimension_count"), 32);
  EXPECT_EQ(meta_int(f, "llama.context_length"), 4096);
  EXPECT_EQ(f.find("llama.rope.freq_base")->as_double("r"), 10000.0);
  EXPECT_FLOAT_EQ(static_cast<float>(f.find("llama.attention.layer_norm_rms_epsilon")->as_double("e")), 1e-5f);
  EXPECT_EQ(f.find("llama.attention.key_length"), nullptr);  // head_dim == hidden / heads
  EXPECT_EQ(f.find("tokenizer.ggml.model")->as_string("t"), "gpt2");
  EXPECT_EQ(f.find("tokenizer.ggml.pre")->as_string("t"), "qwen2");
  const auto& tokens = f.find("tokenizer.ggml.tokens")->items;
  ASSERT_EQ(tokens.size(), 4096u);
  EXPECT_EQ(tokens[4095].str, "<|endoftext|>");
  EXPECT_EQ(f.find("tokenizer.ggml.token_type")->items[4095].as_int("t"), 3);  // control
  EXPECT_EQ(f.find("tokenizer.ggml.token_type")->items[300].as_int("t"), 1);   // normal
  EXPECT_EQ(f.find("tokenizer.ggml.merges")->items.size(), 3839u);
  EXPECT_EQ(meta_int(f, "tokenizer.ggml.eos_token_id"), 4095);
  EXPECT_EQ(meta_int(f, "tokenizer.ggml.bos_token_id"), 4095);
  EXPECT_EQ(f.find("tokenizer.ggml.add_bos_token")->integer, 0u);
  // The default mix: token_embd and output Q8_0, 1-D tensors and routers F32, the rest Q4_0.
  EXPECT_EQ(type_of(f, "token_embd.weight"), "q8_0");
  EXPECT_EQ(type_of(f, "output.weight"), "q8_0");
  EXPECT_EQ(type_of(f, "output_norm.weight"), "f32");
  EXPECT_EQ(type_of(f, "blk.3.ffn_gate_inp.weight"), "f32");
  EXPECT_EQ(type_of(f, "blk.3.attn_norm.weight"), "f32");
  EXPECT_EQ(type_of(f, "blk.0.attn_q.weight"), "q4_0");
  EXPECT_EQ(type_of(f, "blk.0.ffn_up_exps.weight"), "q4_0");
  EXPECT_EQ(f.find_tensor("blk.2.ffn_down_exps.weight")->ne, (std::vector<int64_t>{256, 128, 8}));
  EXPECT_EQ(f.find_tensor("blk.2.ffn_gate_exps.weight")->ne, (std::vector<int64_t>{128, 256, 8}));
  EXPECT_EQ(f.find_tensor("token_embd.weight")->ne, (std::vector<int64_t>{128, 4096}));
  EXPECT_EQ(f.tensors().size(), 3u + 4u * 10u);
}

TEST(Export, QwenFamiliesWriteTheirKeys) {
  TempDir dir{"moe-export"};
  const auto q2 = io::GgufFile::open(io::Env::posix(), export_model(dir, "qwen2moe-tiny", "f16"));
  EXPECT_EQ(q2.find("general.architecture")->as_string("a"), "qwen2moe");
  EXPECT_EQ(meta_int(q2, "qwen2moe.expert_feed_forward_length"), 128);
  EXPECT_EQ(meta_int(q2, "qwen2moe.expert_shared_feed_forward_length"), 256);
  EXPECT_EQ(meta_int(q2, "qwen2moe.feed_forward_length"), 256);
  EXPECT_EQ(q2.find_tensor("blk.0.ffn_gate_inp_shexp.weight")->ne, (std::vector<int64_t>{128}));
  EXPECT_EQ(type_of(q2, "blk.0.ffn_gate_inp_shexp.weight"), "f32");
  EXPECT_EQ(type_of(q2, "blk.0.ffn_down_shexp.weight"), "f16");
  EXPECT_EQ(type_of(q2, "blk.0.attn_q.bias"), "f32");
  EXPECT_EQ(type_of(q2, "token_embd.weight"), "f16");  // not a block type: kept at the main type
  EXPECT_EQ(q2.find("qwen2moe.rope.dimension_count"), nullptr);
  const auto q3 = io::GgufFile::open(io::Env::posix(), export_model(dir, "validation-tiny", "bf16"));
  EXPECT_EQ(q3.find("general.architecture")->as_string("a"), "qwen3moe");
  EXPECT_EQ(meta_int(q3, "qwen3moe.attention.key_length"), 48);  // head_dim 48 != 160 / 4
  EXPECT_EQ(meta_int(q3, "qwen3moe.attention.value_length"), 48);
  EXPECT_EQ(meta_int(q3, "qwen3moe.expert_feed_forward_length"), 192);
  EXPECT_EQ(q3.find_tensor("blk.1.attn_q_norm.weight")->ne, (std::vector<int64_t>{48}));
  EXPECT_EQ(meta_int(q3, "general.file_type"), 32);
}

// granitemoe (data/granitemoe-tiny) as llama.cpp's granitemoe: the four multipliers as
// ARCH.embedding_scale / residual_scale / attention.scale / logit_scale (f32), the expert width as
// feed_forward_length, q/k rows (and biases) permuted as for arch llama (LlamaModel's converter),
// no output.weight (tied), and input_linear [E,2I,H] split into ffn_gate_exps (its first I rows of
// each expert) and ffn_up_exps (the next I), output_linear as ffn_down_exps. A granitemoe
// llama.cpp's graph would compute differently (rope_scaling) is refused, nothing written.
TEST(Export, GraniteMoeScalesAndSplitExperts) {
  TempDir dir{"moe-export"};
  const fs::path src = kSrc / "data/granitemoe-tiny", out = dir / "g.gguf";
  ASSERT_EQ(run_tool({"-q", "export", src.string(), out.string(), "--type", "f32"}).exit_code, 0);
  const auto f = io::GgufFile::open(io::Env::posix(), out);
  EXPECT_EQ(f.find("general.architecture")->as_string("a"), "granitemoe");
  const std::vector<std::pair<const char*, float>> scales = {{"granitemoe.embedding_scale", 6.0f},
                                                              {"granitemoe.residual_scale", 0.35f},
                                                              {"granitemoe.attention.scale", 0.09f},
                                                              {"granitemoe.logit_scale", 2.5f}};
  for (const auto& [key, want] : scales) {
    const io::GgufValue* v = f.find(key);
    ASSERT_NE(v, nullptr) << key;
    EXPECT_EQ(v->type, io::GgufValueType::F32) << key;
    EXPECT_EQ(static_cast<float>(v->as_double(key)), want) << key;
  }
  EXPECT_EQ(meta_int(f, "granitemoe.feed_forward_length"), 16);
  EXPECT_EQ(f.find("granitemoe.expert_feed_forward_length"), nullptr);
  EXPECT_EQ(meta_int(f, "granitemoe.expert_count"), 8);
  EXPECT_EQ(meta_int(f, "granitemoe.expert_used_count"), 3);
  EXPECT_EQ(meta_int(f, "granitemoe.rope.dimension_count"), 16);
  EXPECT_EQ(f.find_tensor("output.weight"), nullptr);
  EXPECT_EQ(f.find_tensor("blk.1.ffn_gate_exps.weight")->ne, (std::vector<int64_t>{64, 16, 8}));
  EXPECT_EQ(f.find_tensor("blk.1.ffn_down_exps.weight")->ne, (std::vector<int64_t>{16, 64, 8}));
  const auto ck = io::Checkpoint::open(io::Env::posix(), src);
  const auto fused = ck.tensor("model.layers.1.block_sparse_moe.input_linear.weight").to_f32();  // [8, 32, 64]
  const auto gate = f.decode(*f.find_tensor("blk.1.ffn_gate_exps.weight")), up = f.decode(*f.find_tensor("blk.1.ffn_up_exps.weight"));
  const int64_t I = 16, H = 64;
  for (int64_t e = 0; e < 8; ++e)
    for (int64_t r = 0; r < I; ++r)
      for (int64_t c = 0; c < H; ++c) {
        ASSERT_EQ(gate[(e * I + r) * H + c], fused[(e * 2 * I + r) * H + c]) << "expert " << e << " row " << r;
        ASSERT_EQ(up[(e * I + r) * H + c], fused[(e * 2 * I + I + r) * H + c]) << "expert " << e << " row " << r;
      }
  EXPECT_EQ(f.decode(*f.find_tensor("blk.1.ffn_down_exps.weight")),
            ck.tensor("model.layers.1.block_sparse_moe.output_linear.weight").to_f32());
  // The k bias is permuted as the k rows: row 2i + s of each head of 16 <- row s * 8 + i.
  const auto kb = f.decode(*f.find_tensor("blk.0.attn_k.bias"));
  const auto kb_src = ck.tensor("model.layers.0.self_attn.k_proj.bias").to_f32();
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < 8; ++i)
      for (int64_t s = 0; s < 2; ++s) EXPECT_EQ(kb[h * 16 + 2 * i + s], kb_src[h * 16 + s * 8 + i]);
  // rope_scaling: llama.cpp would rope as written in the file, not as the config says.
  TempDir dir2{"moe-export"};
  const fs::path scaled = dir2 / "scaled";
  fs::create_directories(scaled);
  for (const auto& e : fs::directory_iterator(src)) fs::copy_file(e.path(), scaled / e.path().filename());
  json cfg = read_json(scaled / "config.json");
  cfg["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  std::ofstream(scaled / "config.json") << cfg.dump(2);
  expect_clean_failure(run_tool({"export", scaled.string(), (dir2 / "s.gguf").string(), "--type", "f32"}),
                       "rope_scaling 'linear' is not exported to GGUF yet");
  EXPECT_EQ(list_dir(dir2.path()), std::vector<std::string>{"scaled"});
}

// A synthetic checkpoint (hidden 32, 4 heads of 8, 4 experts of width 16) with the fixtures'
// byte-level tokenizer, exported at F32: exact values to compare with the source tensors.
fs::path synth_with_tokenizer(const TempDir& dir, const std::string& family, const SynthCheckpoint& ck) {
  const fs::path d = dir / family;
  write_synth(ck, d);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    fs::copy_file(kSrc / "data/models/mixtral-tiny" / f, d / f);
  return d;
}

std::vector<float> source_f32(const SynthCheckpoint& ck, const std::string& name) {
  const SynthTensor& t = ck.at(name);
  std::vector<float> v(t.data.size() / core::dtype_size(t.dtype));
  core::to_f32(t.dtype, t.data.data(), v.data(), v.size());
  return v;
}

// Mixtral (arch llama): q and k rows permuted within each head (row 2i + s <- row s * d/2 + i),
// v and the experts as stored, experts stacked in order.
TEST(Export, LlamaArchPermutesQKRowsOnly) {
  TempDir dir{"moe-export"};
  const auto ck = make_synth("mixtral", {.config_patch = {{"vocab_size", 4096}}});
  const fs::path out = dir / "m.gguf";
  ASSERT_EQ(run_tool({"-q", "export", synth_with_tokenizer(dir, "mixtral", ck).string(), out.string(), "--type", "f32"}).exit_code, 0);
  const auto f = io::GgufFile::open(io::Env::posix(), out);
  const int64_t H = 32, d = 8;
  for (const auto& [gname, hf, heads] : {std::tuple{"blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight", 4},
                                         std::tuple{"blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", 2}}) {
    const auto y = f.decode(*f.find_tensor(gname));
    const auto x = source_f32(ck, hf);
    ASSERT_EQ(y.size(), static_cast<size_t>(heads * d * H));
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < d / 2; ++i)
        for (int64_t s = 0; s < 2; ++s)
          for (int64_t c = 0; c < H; ++c)
            ASSERT_EQ(y[(h * d + 2 * i + s) * H + c], x[(h * d + s * d / 2 + i) * H + c]) << gname << " head " << h;
  }
  EXPECT_EQ(f.decode(*f.find_tensor("blk.1.attn_v.weight")), source_f32(ck, "model.layers.1.self_attn.v_proj.weight"));
  const auto up = f.decode(*f.find_tensor("blk.0.ffn_up_exps.weight"));
  const auto e3 = source_f32(ck, "model.layers.0.block_sparse_moe.experts.3.w3.weight");
  EXPECT_EQ(std::vector<float>(up.begin() + 3 * static_cast<int64_t>(e3.size()), up.begin() + 4 * static_cast<int64_t>(e3.size())), e3);
}

// OLMoE: no permutation (NeoX RoPE), whole-projection q/k norms, clip_qkv as clamp_kqv, the expert
// width as feed_forward_length. llama.cpp's olmoe loader wants attn_k_norm as wide as the hidden
// size, so grouped-query attention (a narrower k_norm) is refused.
TEST(Export, OlmoeKeysAndUnpermutedAttention) {
  TempDir dir{"moe-export"};
  const auto ck = make_synth("olmoe", {.config_patch = {{"vocab_size", 4096}, {"clip_qkv", 8.0}, {"num_key_value_heads", 4}}});
  const fs::path out = dir / "o.gguf";
  ASSERT_EQ(run_tool({"-q", "export", synth_with_tokenizer(dir, "olmoe", ck).string(), out.string(), "--type", "f32"}).exit_code, 0);
  const auto f = io::GgufFile::open(io::Env::posix(), out);
  EXPECT_EQ(f.find("general.architecture")->as_string("a"), "olmoe");
  EXPECT_EQ(f.find("olmoe.attention.clamp_kqv")->as_double("c"), 8.0);
  EXPECT_EQ(meta_int(f, "olmoe.feed_forward_length"), 16);
  EXPECT_EQ(meta_int(f, "olmoe.expert_count"), 4);
  EXPECT_EQ(f.find("olmoe.expert_feed_forward_length"), nullptr);
  EXPECT_EQ(f.find_tensor("blk.0.attn_q_norm.weight")->ne, (std::vector<int64_t>{32}));
  EXPECT_EQ(f.decode(*f.find_tensor("blk.0.attn_q.weight")), source_f32(ck, "model.layers.0.self_attn.q_proj.weight"));
  EXPECT_EQ(f.decode(*f.find_tensor("blk.0.attn_k_norm.weight")), source_f32(ck, "model.layers.0.self_attn.k_norm.weight"));
  // llama.cpp's olmoe graph does not renormalize the top-k weights: a config that does is refused.
  const auto renorm = make_synth("olmoe", {.config_patch = {{"vocab_size", 4096}, {"norm_topk_prob", true}}});
  TempDir dir2{"moe-export"};
  expect_clean_failure(run_tool({"export", synth_with_tokenizer(dir2, "olmoe", renorm).string(), (dir2 / "r.gguf").string(),
                                 "--type", "f32"}),
                       "renormalizes the top-k weights (norm_topk_prob) but llama.cpp's olmoe graph does not");
  EXPECT_EQ(list_dir(dir2.path()), std::vector<std::string>{"olmoe"});
  const auto gqa = make_synth("olmoe", {.config_patch = {{"vocab_size", 4096}}});
  TempDir dir3{"moe-export"};
  expect_clean_failure(run_tool({"export", synth_with_tokenizer(dir3, "olmoe", gqa).string(), (dir3 / "g.gguf").string(),
                                 "--type", "f32"}),
                       "num_key_value_heads 2 != num_attention_heads 4: llama.cpp's olmoe graph needs a k_norm as wide as the "
                       "hidden size");
  EXPECT_EQ(list_dir(dir3.path()), std::vector<std::string>{"olmoe"});
}

// glm4moe (glm4-moe-tiny: 3 layers, the first dense, 8 experts in 4 groups of which 2 are used,
// one shared expert, partial rotary 0.5, q/k norms, q/k/v biases, one MTP layer): the keys llama.cpp's
// glm4moe loader reads (the routing from metadata: sigmoid gating, weights norm and scale, expert
// groups), the leading dense layer as ffn_gate/ffn_up/ffn_down, the choice bias as exp_probs_b, the
// post-attention norm as post_attention_norm, no q/k permutation (NeoX RoPE) and no MTP layer.
TEST(Export, Glm4MoeKeysAsLlamaCppExpects) {
  TempDir dir{"moe-export"};
  const fs::path src = kSrc / "data/glm4-moe-tiny", out = dir / "g.gguf";
  ASSERT_EQ(run_tool({"-q", "export", src.string(), out.string(), "--type", "f32"}).exit_code, 0);
  const auto f = io::GgufFile::open(io::Env::posix(), out);
  EXPECT_EQ(f.find("general.architecture")->as_string("a"), "glm4moe");
  const std::vector<std::pair<std::string, int64_t>> ints = {
      {"block_count", 3}, {"leading_dense_block_count", 1}, {"feed_forward_length", 64}, {"expert_feed_forward_length", 16},
      {"expert_count", 8}, {"expert_used_count", 3}, {"expert_shared_count", 1}, {"expert_gating_func", 2},
      {"expert_group_count", 4}, {"expert_group_used_count", 2}, {"rope.dimension_count", 12}, {"attention.key_length", 24},
      {"attention.head_count", 4}, {"attention.head_count_kv", 2}};
  for (const auto& [key, want] : ints) EXPECT_EQ(meta_int(f, "glm4moe." + key), want) << key;
  EXPECT_EQ(f.find("glm4moe.expert_weights_scale")->as_double("s"), 1.5);
  EXPECT_EQ(f.find("glm4moe.expert_weights_norm")->type, io::GgufValueType::BOOL);
  EXPECT_EQ(f.find("glm4moe.expert_weights_norm")->integer, 1u);
  EXPECT_EQ(f.find("glm4moe.nextn_predict_layers"), nullptr);
  EXPECT_EQ(f.find("glm4moe.expert_shared_feed_forward_length"), nullptr);
  const auto ck = io::Checkpoint::open(io::Env::posix(), src);
  auto same = [&](const std::string& gguf, const std::string& ours) { expect_same_tensor(f, gguf, ck, ours); };
  same("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight");
  same("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight");
  same("blk.1.exp_probs_b.bias", "model.layers.1.mlp.gate.e_score_correction_bias");
  same("blk.1.post_attention_norm.weight", "model.layers.1.post_attention_layernorm.weight");
  same("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight");  // not permuted
  same("blk.1.attn_k.bias", "model.layers.1.self_attn.k_proj.bias");
  same("blk.2.ffn_up_shexp.weight", "model.layers.2.mlp.shared_experts.up_proj.weight");
  EXPECT_EQ(f.find_tensor("blk.0.ffn_gate_inp.weight"), nullptr);
  EXPECT_EQ(f.find_tensor("blk.1.ffn_norm.weight"), nullptr);
  EXPECT_EQ(f.find_tensor("blk.1.exp_probs_b.bias")->type, quant::GgmlType::F32);
  for (const auto& t : f.tensors()) EXPECT_NE(t.name.rfind("blk.3.", 0), 0u) << t.name << ": the MTP layer is left out";
}

// glm4moe refusals: expert groups of one expert (llama.cpp's group score is the sum of a group's
// top 2, and it asserts fewer groups than experts); no q/k/v biases (llama.cpp's glm4moe loader
// requires them). Exit 2, one line, nothing written.
TEST(Export, Glm4MoeRefusalsWriteNothing) {
  TempDir dir{"moe-export"};
  const fs::path groups = dir / "groups", nobias = dir / "nobias";
  auto copy_with = [](const fs::path& to, const json& patch) { copy_fixture_with("glm4-moe-tiny", to, patch); };
  copy_with(groups, {{"n_group", 8}});
  expect_clean_failure(run_tool({"export", groups.string(), (dir / "g.gguf").string(), "--type", "f32"}),
                       "n_group 8 makes groups of one expert of 8: llama.cpp's glm4moe graph scores a group by its top 2");
  copy_with(nobias, {{"attention_bias", false}});
  for (int l = 0; l < 4; ++l)  // the 3 decoder layers and the MTP layer
    for (const char* p : {"q", "k", "v"})
      remove_tensor(nobias / "model.safetensors", "model.layers." + std::to_string(l) + ".self_attn." + p + "_proj.bias");
  expect_clean_failure(run_tool({"export", nobias.string(), (dir / "b.gguf").string(), "--type", "f32"}),
                       "attention_bias false (no q_bias): llama.cpp's glm4moe loader requires attn_q/k/v biases");
  EXPECT_EQ(list_dir(dir.path()), (std::vector<std::string>{"groups", "nobias"}));
}

// ernie4_5-moe (ernie4_5_moe-tiny: 3 layers, the first dense, 8 experts, top 2, one shared expert
// of the expert width, tied embeddings, the choice bias moe_statics.e_score_correction_bias): the
// keys llama.cpp's ernie4_5-moe loader requires (leading_dense_block_count, interleave_moe_layer_step,
// expert_feed_forward_length; the shared width as expert_shared_feed_forward_length), the dense
// layer as ffn_gate/ffn_up/ffn_down, the bias as exp_probs_b, no q/k permutation (its RoPE is on
// adjacent pairs, as ours), no output.weight.
TEST(Export, Ernie45MoeKeysAsLlamaCppExpects) {
  TempDir dir{"moe-export"};
  const fs::path src = kSrc / "data/ernie4_5_moe-tiny", out = dir / "e.gguf";
  ASSERT_EQ(run_tool({"-q", "export", src.string(), out.string(), "--type", "f32"}).exit_code, 0);
  const auto f = io::GgufFile::open(io::Env::posix(), out);
  const std::string A = "ernie4_5-moe";
  EXPECT_EQ(f.find("general.architecture")->as_string("a"), A);
  const std::vector<std::pair<std::string, int64_t>> ints = {
      {"block_count", 3}, {"leading_dense_block_count", 1}, {"interleave_moe_layer_step", 1}, {"feed_forward_length", 96},
      {"expert_feed_forward_length", 32}, {"expert_shared_feed_forward_length", 32}, {"expert_count", 8},
      {"expert_used_count", 2}, {"attention.head_count", 4}, {"attention.head_count_kv", 2}};
  for (const auto& [key, want] : ints) EXPECT_EQ(meta_int(f, A + "." + key), want) << key;
  for (const char* absent : {"expert_gating_func", "expert_weights_norm", "expert_shared_count", "expert_group_count"})
    EXPECT_EQ(f.find(A + "." + absent), nullptr) << absent;
  const auto ck = io::Checkpoint::open(io::Env::posix(), src);
  auto same = [&](const std::string& gguf, const std::string& ours) { expect_same_tensor(f, gguf, ck, ours); };
  same("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight");
  same("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight");
  same("blk.1.exp_probs_b.bias", "model.layers.1.mlp.moe_statics.e_score_correction_bias");
  same("blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight");
  same("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight");  // not permuted
  same("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight");
  same("blk.2.ffn_up_shexp.weight", "model.layers.2.mlp.shared_experts.up_proj.weight");
  EXPECT_EQ(f.find_tensor("blk.1.exp_probs_b.bias")->ne, std::vector<int64_t>{8});
  EXPECT_EQ(f.find_tensor("blk.0.ffn_gate_inp.weight"), nullptr);
  EXPECT_EQ(f.find_tensor("output.weight"), nullptr);
}

// ernie4_5-moe refusals: a dense layer after an MoE one (moe_layer_interval 2 makes layer 2 dense;
// llama.cpp's loader gives every layer from leading_dense_block_count on the MoE tensors);
// moe_norm_min above llama.cpp's clamp of the top-k weight sum (2^-14). Exit 2, one line, nothing
// written.
TEST(Export, Ernie45MoeRefusalsWriteNothing) {
  TempDir dir{"moe-export"};
  const fs::path interval = dir / "interval", norm = dir / "norm";
  auto copy_with = [](const fs::path& to, const json& patch) { copy_fixture_with("ernie4_5_moe-tiny", to, patch); };
  copy_with(interval, {{"moe_layer_interval", 2}});
  {  // layer 2 as a dense layer: its MoE tensors out, layer 0's dense MLP in
    TensorMap t = read_tensors(interval);
    std::erase_if(t, [](const auto& kv) { return kv.first.rfind("model.layers.2.mlp.", 0) == 0; });
    for (const char* p : {"gate_proj", "up_proj", "down_proj"})
      t["model.layers.2.mlp." + std::string(p) + ".weight"] = t.at("model.layers.0.mlp." + std::string(p) + ".weight");
    std::vector<io::TensorInfo> infos;
    std::string data;
    for (const auto& [name, b] : t) {
      infos.push_back({name, b.dtype, b.shape, data.size(), data.size() + b.bytes.size()});
      data += b.bytes;
    }
    write_file(interval / "model.safetensors", io::serialize_safetensors_header(infos, {}) + data);
  }
  expect_clean_failure(run_tool({"export", interval.string(), (dir / "i.gguf").string(), "--type", "f32"}),
                       "layer 2 is a dense layer; llama.cpp's ernie4_5-moe needs experts in every layer after the leading dense ones");
  copy_with(norm, {{"moe_norm_min", 0.001}});
  expect_clean_failure(run_tool({"export", norm.string(), (dir / "n.gguf").string(), "--type", "f32"}),
                       "moe_norm_min 0.001: llama.cpp's ernie4_5-moe graph clamps the top-k weight sum at 6.103515625e-05 only");
  EXPECT_EQ(list_dir(dir.path()), (std::vector<std::string>{"interval", "norm"}));
}

// qwen3next (qwen3_next-tiny: 4 layers, 0-2 Gated DeltaNet and 3 gated full attention; head_dim
// 16, partial rotary 0.25; 8 experts top 2 of width 16, a shared expert of 32 with its sigmoid
// gate): the keys llama.cpp's qwen3next loader reads (ssm.conv_kernel, ssm.state_size,
// ssm.group_count, ssm.time_step_rank, ssm.inner_size, rope.dimension_count, the expert widths) and
// the tensors as convert_hf_to_gguf.py's Qwen3NextModel writes them: in_proj_qkvz / in_proj_ba /
// out_proj / the gated norm as stored (ssm_in, ssm_ba, ssm_out, ssm_norm), dt_bias as ssm_dt.bias,
// A_log as ssm_a = -exp(A_log), conv1d squeezed to ssm_conv1d {K, conv_dim} (f32 in a block-type
// export, as llama-quantize keeps it), the zero-centred norms as 1 + w (attn_norm,
// post_attention_norm, attn_q_norm / attn_k_norm, output_norm), q_proj (query and gate per head) as
// attn_q unpermuted.
TEST(Export, Qwen3NextKeysAsLlamaCppExpects) {
  TempDir dir{"moe-export"};
  const fs::path src = kSrc / "data/qwen3_next-tiny", out = dir / "n.gguf", q8 = dir / "q8.gguf";
  ASSERT_EQ(run_tool({"-q", "export", src.string(), out.string(), "--type", "f32"}).exit_code, 0);
  const auto f = io::GgufFile::open(io::Env::posix(), out);
  const std::string A = "qwen3next";
  EXPECT_EQ(f.find("general.architecture")->as_string("a"), A);
  const std::vector<std::pair<std::string, int64_t>> ints = {
      {"block_count", 4}, {"feed_forward_length", 48}, {"expert_feed_forward_length", 16},
      {"expert_shared_feed_forward_length", 32}, {"expert_count", 8}, {"expert_used_count", 2},
      {"attention.head_count", 4}, {"attention.head_count_kv", 2}, {"rope.dimension_count", 4},
      {"ssm.conv_kernel", 4}, {"ssm.state_size", 8}, {"ssm.group_count", 2}, {"ssm.time_step_rank", 4},
      {"ssm.inner_size", 32}};
  for (const auto& [key, want] : ints) EXPECT_EQ(meta_int(f, A + "." + key), want) << key;
  EXPECT_EQ(f.find(A + ".rope.freq_base")->as_double("r"), 1e7);
  for (const char* absent : {"expert_gating_func", "expert_weights_norm", "leading_dense_block_count", "attention.key_length"})
    EXPECT_EQ(f.find(A + "." + absent), nullptr) << absent;
  const auto ck = io::Checkpoint::open(io::Env::posix(), src);
  auto same = [&](const std::string& gguf, const std::string& ours) { expect_same_tensor(f, gguf, ck, ours); };
  const std::string l0 = "model.layers.0.linear_attn.";
  same("blk.0.ssm_in.weight", l0 + "in_proj_qkvz.weight");
  same("blk.0.ssm_ba.weight", l0 + "in_proj_ba.weight");
  same("blk.0.ssm_out.weight", l0 + "out_proj.weight");
  same("blk.0.ssm_norm.weight", l0 + "norm.weight");  // the gated norm is not zero-centred
  same("blk.2.ssm_dt.bias", "model.layers.2.linear_attn.dt_bias");
  same("blk.0.ssm_conv1d.weight", l0 + "conv1d.weight");  // [64, 1, 4] squeezed: the same values
  same("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight");
  same("blk.3.ffn_gate_inp_shexp.weight", "model.layers.3.mlp.shared_expert_gate.weight");
  EXPECT_EQ(f.find_tensor("blk.0.ssm_conv1d.weight")->ne, (std::vector<int64_t>{4, 64}));
  EXPECT_EQ(f.find_tensor("blk.0.ssm_in.weight")->ne, (std::vector<int64_t>{64, 96}));
  EXPECT_EQ(f.find_tensor("blk.0.ssm_a")->ne, (std::vector<int64_t>{4}));
  EXPECT_EQ(f.find_tensor("blk.3.attn_q.weight")->ne, (std::vector<int64_t>{64, 128}));
  EXPECT_EQ(f.find_tensor("blk.3.ffn_gate_inp_shexp.weight")->ne, (std::vector<int64_t>{64}));
  // A = -exp(A_log).
  const std::vector<float> a = f.decode(*f.find_tensor("blk.1.ssm_a")), alog = ck.tensor("model.layers.1.linear_attn.A_log").to_f32();
  ASSERT_EQ(a.size(), alog.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], static_cast<float>(-std::exp(static_cast<double>(alog[i])))) << i;
  // The zero-centred norms as 1 + w.
  auto plus_one = [&](const std::string& gguf, const std::string& ours) {
    SCOPED_TRACE(gguf);
    const std::vector<float> g = f.decode(*f.find_tensor(gguf)), w = ck.tensor(ours).to_f32();
    ASSERT_EQ(g.size(), w.size());
    for (size_t i = 0; i < g.size(); ++i) EXPECT_EQ(g[i], w[i] + 1.0f) << i;
  };
  plus_one("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight");
  plus_one("blk.2.post_attention_norm.weight", "model.layers.2.post_attention_layernorm.weight");
  plus_one("blk.3.attn_q_norm.weight", "model.layers.3.self_attn.q_norm.weight");
  plus_one("blk.3.attn_k_norm.weight", "model.layers.3.self_attn.k_norm.weight");
  plus_one("output_norm.weight", "model.norm.weight");
  // Each layer has the tensors of its kind only.
  for (const char* absent : {"blk.0.attn_q.weight", "blk.3.ssm_in.weight", "blk.0.ffn_norm.weight", "blk.3.ssm_a"})
    EXPECT_EQ(f.find_tensor(absent), nullptr) << absent;
  EXPECT_EQ(f.tensors().size(), 3u + 3u * (2u + 7u + 8u) + (2u + 6u + 8u));
  // Q8_0: ssm_conv1d stays f32 (rows of 4), the narrow expert rows f16 by --tensor-type.
  ASSERT_EQ(run_tool({"-q", "export", src.string(), q8.string(), "--type", "q8_0", "--tensor-type", "ffn_down_exps=f16"}).exit_code, 0);
  const auto g = io::GgufFile::open(io::Env::posix(), q8);
  EXPECT_EQ(type_of(g, "blk.0.ssm_conv1d.weight"), "f32");
  EXPECT_EQ(type_of(g, "blk.0.ssm_a"), "f32");
  EXPECT_EQ(type_of(g, "blk.0.ssm_in.weight"), "q8_0");
  EXPECT_EQ(type_of(g, "blk.0.ssm_out.weight"), "q8_0");
  EXPECT_EQ(type_of(g, "blk.3.attn_q.weight"), "q8_0");
}

// qwen3next refusals: a full-attention layer where llama.cpp's loader puts a linear one (it takes
// layer i as linear attention iff (i + 1) % 4 != 0: here 2 layers, full_attention_interval 2);
// no renormalization of the top-k weights (llama.cpp's graph always renormalizes). Exit 2, one
// line, nothing written.
TEST(Export, Qwen3NextRefusalsWriteNothing) {
  TempDir dir{"moe-export"};
  const fs::path interval = dir / "interval", norm = dir / "norm";
  copy_fixture_with("qwen3_next-tiny", interval, {{"num_hidden_layers", 2}, {"full_attention_interval", 2}});
  {  // layer 0 (linear) kept, layer 3 (full) as layer 1
    TensorMap t = read_tensors(interval), kept;
    for (auto& [name, b] : t) {
      if (name.rfind("model.layers.", 0) != 0) kept[name] = b;
      else if (name.rfind("model.layers.0.", 0) == 0) kept[name] = b;
      else if (name.rfind("model.layers.3.", 0) == 0) kept["model.layers.1." + name.substr(15)] = b;
    }
    std::vector<io::TensorInfo> infos;
    std::string data;
    for (const auto& [name, b] : kept) {
      infos.push_back({name, b.dtype, b.shape, data.size(), data.size() + b.bytes.size()});
      data += b.bytes;
    }
    write_file(interval / "model.safetensors", io::serialize_safetensors_header(infos, {}) + data);
  }
  expect_clean_failure(run_tool({"export", interval.string(), (dir / "i.gguf").string(), "--type", "f32"}),
                       "layer 1 is full attention (layer_types / full_attention_interval): llama.cpp's qwen3next takes every "
                       "4th layer (3, 7, ...) as full attention and the others as linear");
  copy_fixture_with("qwen3_next-tiny", norm, {{"norm_topk_prob", false}});
  expect_clean_failure(run_tool({"export", norm.string(), (dir / "n.gguf").string(), "--type", "f32"}),
                       "routing does not renormalize the top-k weights (norm_topk_prob) but llama.cpp's qwen3next graph does");
  EXPECT_EQ(list_dir(dir.path()), (std::vector<std::string>{"interval", "norm"}));
}

// llama4-tiny with the attention llama.cpp's llama4 graph computes (its loader fixes it): chunks of
// 8192 tokens, temperature tuning with floor_scale 8192 and attn_scale 0.1.
const json kLlama4LlamaCpp = {{"attention_chunk_size", 8192}, {"floor_scale", 8192}, {"attn_scale", 0.1}};

// llama4 as convert_hf_to_gguf.py's Llama4Model writes it: the dense layers (0, 2) as ffn_*, the MoE
// ones (1, 3) with the fused gate_up_proj [E,H,2I] split into gate (first half) and up and
// transposed, down_proj [E,I,H] transposed, the shared expert as *_shexp; q/k not permuted; the
// llama3 scaling as rope_freqs.weight (1 below wavelength 8192, the factor 16 above); the keys
// llama.cpp's loader reads and none it does not.
TEST(Export, Llama4KeysAsLlamaCppExpects) {
  TempDir dir{"moe-export"};
  const fs::path src = dir / "l4", out = dir / "l4.gguf";
  copy_fixture_with("llama4-tiny", src, kLlama4LlamaCpp);
  ASSERT_EQ(run_tool({"-q", "export", src.string(), out.string(), "--type", "f32"}).exit_code, 0);
  const auto f = io::GgufFile::open(io::Env::posix(), out);
  const std::string A = "llama4";
  EXPECT_EQ(f.find("general.architecture")->as_string("a"), A);
  const std::vector<std::pair<std::string, int64_t>> ints = {
      {"block_count", 4}, {"interleave_moe_layer_step", 2}, {"feed_forward_length", 32}, {"expert_feed_forward_length", 16},
      {"expert_count", 8}, {"expert_used_count", 1}, {"attention.head_count", 4}, {"attention.head_count_kv", 2},
      {"rope.dimension_count", 16}};
  for (const auto& [key, want] : ints) EXPECT_EQ(meta_int(f, A + "." + key), want) << key;
  EXPECT_FLOAT_EQ(static_cast<float>(f.find(A + ".rope.freq_base")->as_double("b")), 500000.0f);
  for (const char* absent : {"expert_shared_feed_forward_length", "expert_gating_func", "expert_weights_norm", "leading_dense_block_count",
                             "attention.sliding_window", "rope.scaling.type", "rope.scaling.factor"})
    EXPECT_EQ(f.find(A + "." + absent), nullptr) << absent;
  const auto ck = io::Checkpoint::open(io::Env::posix(), src);
  auto same = [&](const std::string& gguf, const std::string& ours) { expect_same_tensor(f, gguf, ck, ours); };
  same("blk.0.ffn_gate.weight", "model.layers.0.feed_forward.gate_proj.weight");
  same("blk.2.ffn_down.weight", "model.layers.2.feed_forward.down_proj.weight");
  same("blk.1.ffn_gate_shexp.weight", "model.layers.1.feed_forward.shared_expert.gate_proj.weight");
  same("blk.3.ffn_down_shexp.weight", "model.layers.3.feed_forward.shared_expert.down_proj.weight");
  same("blk.1.ffn_gate_inp.weight", "model.layers.1.feed_forward.router.weight");
  same("blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight");
  same("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight");  // not permuted
  same("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight");
  same("output.weight", "lm_head.weight");
  EXPECT_EQ(f.find_tensor("blk.0.ffn_gate_inp.weight"), nullptr);
  EXPECT_EQ(f.find_tensor("blk.1.ffn_gate.weight"), nullptr);
  // Experts: gate_up_proj[e][h][j] (gate j < 16, up j >= 16) is row j of expert e's gate / up.
  const std::vector<float> gu = ck.tensor("model.layers.3.feed_forward.experts.gate_up_proj").to_f32(),
                           dn = ck.tensor("model.layers.3.feed_forward.experts.down_proj").to_f32();
  const io::GgufTensorInfo* g = f.find_tensor("blk.3.ffn_gate_exps.weight");
  ASSERT_NE(g, nullptr);
  EXPECT_EQ(g->ne, (std::vector<int64_t>{64, 16, 8}));
  EXPECT_EQ(f.find_tensor("blk.3.ffn_down_exps.weight")->ne, (std::vector<int64_t>{16, 64, 8}));
  const auto gate = f.decode(*g), up = f.decode(*f.find_tensor("blk.3.ffn_up_exps.weight")),
             down = f.decode(*f.find_tensor("blk.3.ffn_down_exps.weight"));
  for (int64_t e = 0; e < 8; ++e)
    for (int64_t j = 0; j < 16; ++j)
      for (int64_t h = 0; h < 64; ++h) {
        ASSERT_EQ(gate[(e * 16 + j) * 64 + h], gu[(e * 64 + h) * 32 + j]);
        ASSERT_EQ(up[(e * 16 + j) * 64 + h], gu[(e * 64 + h) * 32 + 16 + j]);
        ASSERT_EQ(down[(e * 64 + h) * 16 + j], dn[(e * 16 + j) * 64 + h]);
      }
  const io::GgufTensorInfo* rf = f.find_tensor("rope_freqs.weight");
  ASSERT_NE(rf, nullptr);
  EXPECT_EQ(f.decode(*rf), (std::vector<float>{1, 1, 1, 1, 1, 16, 16, 16}));
}

// The multimodal llama4 (Llama4ForConditionalGeneration): its text model is written, the same
// tensors as llama4_text's; the vision tower and projector are left out with one warning (llama.cpp
// reads them from an mmproj file, which moe-tool does not write).
TEST(Export, Llama4MultimodalWritesTheTextModel) {
  TempDir dir{"moe-export"};
  const fs::path mm = dir / "mm", text = dir / "text";
  copy_fixture_with("llama4-mm-tiny", mm, {{"text_config", kLlama4LlamaCpp}});
  copy_fixture_with("llama4-tiny", text, kLlama4LlamaCpp);
  const RunResult r = run_tool({"export", mm.string(), (dir / "mm.gguf").string(), "--type", "f32"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.err.find("vision tower and projector (26 tensors"), std::string::npos) << r.err;
  ASSERT_EQ(run_tool({"-q", "export", text.string(), (dir / "text.gguf").string(), "--type", "f32"}).exit_code, 0);
  const auto a = io::GgufFile::open(io::Env::posix(), dir / "mm.gguf"), b = io::GgufFile::open(io::Env::posix(), dir / "text.gguf");
  ASSERT_EQ(a.tensors().size(), b.tensors().size());
  for (size_t i = 0; i < a.tensors().size(); ++i) {
    EXPECT_EQ(a.tensors()[i].name, b.tensors()[i].name);
    EXPECT_EQ(a.tensors()[i].ne, b.tensors()[i].ne);
  }
  EXPECT_EQ(a.find("llama4.interleave_moe_layer_step")->as_int("s"), 2);
}

// llama4 refusals, each where llama.cpp's llama4 graph computes otherwise (its loader fixes the
// attention): the fixture's own attention_chunk_size 8, floor_scale 4, attn_scale 0.2,
// attn_temperature_tuning false, use_qk_norm false with 8 experts, NoPE on another layer than each
// 4th. Exit 2, one line, nothing written.
TEST(Export, Llama4RefusalsWriteNothing) {
  TempDir dir{"moe-export"};
  auto refused = [&](const std::string& name, const json& patch, const std::string& needle) {
    const fs::path m = dir / name;
    json p = kLlama4LlamaCpp;
    p.merge_patch(patch);
    copy_fixture_with("llama4-tiny", m, p);
    expect_clean_failure(run_tool({"export", m.string(), (dir / (name + ".gguf")).string(), "--type", "f32"}), needle);
  };
  refused("chunk", {{"attention_chunk_size", 8}},
          "layer 0: attention_chunk_size 8: llama.cpp's llama4 graph chunks the RoPE layers' attention by 8192 tokens");
  refused("floor", {{"floor_scale", 4}}, "floor_scale 4: llama.cpp's llama4 graph's temperature tuning has floor_scale 8192");
  refused("scale", {{"attn_scale", 0.2}}, "attn_scale 0.2: llama.cpp's llama4 graph's temperature tuning has attn_scale 0.1");
  refused("tuning", {{"attn_temperature_tuning", false}}, "attn_temperature_tuning false: llama.cpp's llama4 graph scales q");
  refused("qknorm", {{"use_qk_norm", false}}, "use_qk_norm false: llama.cpp's llama4 graph normalizes q/k unless the model has 128 experts");
  refused("nope", {{"no_rope_layers", {1, 0, 1, 1}}}, "layer 1: NoPE (no_rope_layers): llama.cpp's llama4 graph uses RoPE");
  // The fixture as it is: its 8-token chunks first.
  expect_clean_failure(run_tool({"export", (kSrc / "data/llama4-tiny").string(), (dir / "own.gguf").string(), "--type", "f32"}),
                       "attention_chunk_size 8: llama.cpp's llama4 graph chunks");
  EXPECT_EQ(list_dir(dir.path()), (std::vector<std::string>{"chunk", "floor", "nope", "qknorm", "scale", "tuning"}));
}

// deepseek2 (deepseek-v3-tiny: 3 layers, the first dense, q_lora_rank 32, kv_lora_rank 32,
// qk_nope/qk_rope/v_head 16, 8 experts in 4 groups of which 2 are used, one shared expert, sigmoid
// routing with e_score_correction_bias, yarn factor 4 with mscale 0.9 / mscale_all_dim 0.8): the keys
// llama.cpp's deepseek2 loader reads (MLA sizes as the converter writes them: key/value_length of
// the absorbed MQA head, *_mla of the decompressed one, head_count_kv 1), kv_b_proj split into
// attn_k_b (transposed) and attn_v_b, the other MLA tensors as stored, no attn_q / attn_kv_b, and
// the yarn keys solved so that llama.cpp's cos/sin factor and softmax scale are transformers'.
TEST(Export, DeepseekV3KeysAsLlamaCppExpects) {
  TempDir dir{"moe-export"};
  const fs::path src = kSrc / "data/deepseek-v3-tiny", out = dir / "d.gguf";
  ASSERT_EQ(run_tool({"-q", "export", src.string(), out.string(), "--type", "f32"}).exit_code, 0);
  const auto f = io::GgufFile::open(io::Env::posix(), out);
  const std::string A = "deepseek2";
  EXPECT_EQ(f.find("general.architecture")->as_string("a"), A);
  const std::vector<std::pair<std::string, int64_t>> ints = {
      {"context_length", 256}, {"block_count", 3}, {"leading_dense_block_count", 1}, {"feed_forward_length", 96},
      {"expert_feed_forward_length", 32}, {"expert_count", 8}, {"expert_used_count", 3}, {"expert_shared_count", 1},
      {"expert_gating_func", 2}, {"expert_group_count", 4}, {"expert_group_used_count", 2}, {"attention.head_count", 4},
      {"attention.head_count_kv", 1}, {"attention.q_lora_rank", 32}, {"attention.kv_lora_rank", 32},
      {"attention.key_length", 48}, {"attention.value_length", 32}, {"attention.key_length_mla", 32},
      {"attention.value_length_mla", 16}, {"rope.dimension_count", 16}, {"rope.scaling.original_context_length", 64}};
  for (const auto& [key, want] : ints) EXPECT_EQ(meta_int(f, A + "." + key), want) << key;
  EXPECT_EQ(f.find(A + ".expert_weights_scale")->as_double("s"), 2.5);
  EXPECT_EQ(f.find(A + ".expert_weights_norm")->integer, 1u);
  EXPECT_EQ(f.find(A + ".rope.scaling.type")->as_string("t"), "yarn");
  EXPECT_EQ(f.find(A + ".rope.scaling.factor")->as_double("f"), 4.0);
  // cos/sin factor R = get_mscale(4, 0.9) / get_mscale(4, 0.8); (R (1 + 0.1 L ln 4))^2 =
  // get_mscale(4, 0.8)^2, the key holding 0.1 L.
  auto g = [](double m) { return 1 + 0.1 * m * std::log(4.0); };
  const double R = g(0.9) / g(0.8), L = (g(0.8) / R - 1) / (0.1 * std::log(4.0));
  EXPECT_FLOAT_EQ(static_cast<float>(f.find(A + ".rope.scaling.attn_factor")->as_double("r")), static_cast<float>(R));
  EXPECT_FLOAT_EQ(static_cast<float>(f.find(A + ".rope.scaling.yarn_log_multiplier")->as_double("l")), static_cast<float>(0.1 * L));
  const auto ck = io::Checkpoint::open(io::Env::posix(), src);
  auto same = [&](const std::string& gguf, const std::string& ours) { expect_same_tensor(f, gguf, ck, ours); };
  same("blk.1.attn_q_a.weight", "model.layers.1.self_attn.q_a_proj.weight");
  same("blk.1.attn_q_a_norm.weight", "model.layers.1.self_attn.q_a_layernorm.weight");
  same("blk.1.attn_q_b.weight", "model.layers.1.self_attn.q_b_proj.weight");  // not permuted
  same("blk.1.attn_kv_a_mqa.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight");
  same("blk.1.attn_kv_a_norm.weight", "model.layers.1.self_attn.kv_a_layernorm.weight");
  same("blk.1.attn_output.weight", "model.layers.1.self_attn.o_proj.weight");
  same("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight");
  same("blk.1.exp_probs_b.bias", "model.layers.1.mlp.gate.e_score_correction_bias");
  same("blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight");
  same("blk.2.ffn_down_shexp.weight", "model.layers.2.mlp.shared_experts.down_proj.weight");
  // kv_b_proj [4 * (16 + 16), 32]: attn_k_b[h][l][i] = kv_b[32 h + i][l], attn_v_b[h][j][l] = kv_b[32 h + 16 + j][l].
  const std::vector<float> kv = ck.tensor("model.layers.2.self_attn.kv_b_proj.weight").to_f32();
  const io::GgufTensorInfo *kb = f.find_tensor("blk.2.attn_k_b.weight"), *vb = f.find_tensor("blk.2.attn_v_b.weight");
  ASSERT_NE(kb, nullptr);
  ASSERT_NE(vb, nullptr);
  EXPECT_EQ(kb->ne, (std::vector<int64_t>{16, 32, 4}));
  EXPECT_EQ(vb->ne, (std::vector<int64_t>{32, 16, 4}));
  const std::vector<float> k = f.decode(*kb), v = f.decode(*vb);
  for (size_t h = 0; h < 4; ++h)
    for (size_t l = 0; l < 32; ++l)
      for (size_t i = 0; i < 16; ++i) {
        ASSERT_EQ(k[(h * 32 + l) * 16 + i], kv[(h * 32 + i) * 32 + l]) << h << " " << l << " " << i;
        ASSERT_EQ(v[(h * 16 + i) * 32 + l], kv[(h * 32 + 16 + i) * 32 + l]) << h << " " << i << " " << l;
      }
  for (const char* absent : {"blk.1.attn_q.weight", "blk.1.attn_kv_b.weight", "blk.0.ffn_gate_inp.weight"})
    EXPECT_EQ(f.find_tensor(absent), nullptr) << absent;
  EXPECT_NE(f.find_tensor("output.weight"), nullptr);
}

// deepseek2 refusals, exit 2, one line, nothing written: q_lora_rank null (deepseek-v2-tiny) with a
// layer count other than 26 / 27 (llama.cpp's loader reads attn_q only for those, taking them as
// DeepSeek-V2-Lite); rms_norm_eps other than the 1e-6 transformers normalizes q_a / kv_a with;
// yarn beta_fast other than 32 (the loader reads none).
TEST(Export, DeepseekRefusalsWriteNothing) {
  TempDir dir{"moe-export"};
  expect_clean_failure(run_tool({"export", (kSrc / "data/deepseek-v2-tiny").string(), (dir / "v2.gguf").string(), "--type", "f32"}),
                       "q_lora_rank null with 3 layers: llama.cpp's deepseek2 loader reads q as one projection (attn_q) only "
                       "for 26 or 27 layers");
  const fs::path eps = dir / "eps", beta = dir / "beta";
  copy_fixture_with("deepseek-v3-tiny", eps, {{"rms_norm_eps", 1e-5}});
  expect_clean_failure(run_tool({"export", eps.string(), (dir / "e.gguf").string(), "--type", "f32"}),
                       "rms_norm_eps 1e-05: llama.cpp's deepseek2 graph normalizes q_a and kv_a with it, transformers with 1e-06");
  copy_fixture_with("deepseek-v3-tiny", beta, {{"rope_scaling", {{"beta_fast", 16}}}});
  expect_clean_failure(run_tool({"export", beta.string(), (dir / "b.gguf").string(), "--type", "f32"}),
                       "beta_fast 16, beta_slow 1: llama.cpp's deepseek2 loader reads no yarn_beta_fast");
  EXPECT_EQ(list_dir(dir.path()), (std::vector<std::string>{"beta", "eps"}));
}

// gpt-oss (gpt-oss-tiny: 2 layers sliding / full, window 8, 8 experts top 4 of width 16, head_dim
// 24, yarn factor 4 over 64 positions, attention sinks, q/k/v/o, router and expert biases, untied):
// the keys llama.cpp's gpt-oss loader reads (expert_feed_forward_length, attention.sliding_window,
// the yarn keys TextModel writes), the sinks as attn_sinks.weight, the router bias as
// ffn_gate_inp.bias, the fused gate_up de-interleaved into ffn_gate_exps (even columns) and
// ffn_up_exps (odd), transposed to [out, in] rows, their biases likewise as [I, E], no q/k permutation.
TEST(Export, GptOssKeysAsLlamaCppExpects) {
  TempDir dir{"moe-export"};
  const fs::path src = kSrc / "data/gpt-oss-tiny", out = dir / "g.gguf";
  ASSERT_EQ(run_tool({"-q", "export", src.string(), out.string(), "--type", "f32"}).exit_code, 0);
  const auto f = io::GgufFile::open(io::Env::posix(), out);
  const std::string A = "gpt-oss";
  EXPECT_EQ(f.find("general.architecture")->as_string("a"), A);
  const std::vector<std::pair<std::string, int64_t>> ints = {
      {"block_count", 2}, {"context_length", 256}, {"embedding_length", 64}, {"feed_forward_length", 16},
      {"expert_feed_forward_length", 16}, {"expert_count", 8}, {"expert_used_count", 4}, {"attention.head_count", 4},
      {"attention.head_count_kv", 2}, {"attention.key_length", 24}, {"attention.value_length", 24},
      {"attention.sliding_window", 8}, {"rope.scaling.original_context_length", 64}};
  for (const auto& [key, want] : ints) EXPECT_EQ(meta_int(f, A + "." + key), want) << key;
  EXPECT_EQ(f.find(A + ".rope.scaling.type")->as_string("t"), "yarn");
  EXPECT_EQ(f.find(A + ".rope.scaling.factor")->as_double("f"), 4.0);
  EXPECT_EQ(f.find(A + ".rope.freq_base")->as_double("b"), 150000.0);
  EXPECT_EQ(f.find(A + ".attention.layer_norm_rms_epsilon")->as_double("e"), static_cast<double>(1e-5f));
  for (const char* absent : {"expert_gating_func", "expert_weights_norm", "rope.dimension_count"})
    EXPECT_EQ(f.find(A + "." + absent), nullptr) << absent;
  const auto ck = io::Checkpoint::open(io::Env::posix(), src);
  auto same = [&](const std::string& gguf, const std::string& ours) { expect_same_tensor(f, gguf, ck, ours); };
  same("blk.0.attn_sinks.weight", "model.layers.0.self_attn.sinks");
  same("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight");  // not permuted
  same("blk.1.attn_k.bias", "model.layers.1.self_attn.k_proj.bias");
  same("blk.1.attn_output.bias", "model.layers.1.self_attn.o_proj.bias");
  same("blk.1.post_attention_norm.weight", "model.layers.1.post_attention_layernorm.weight");
  same("blk.1.ffn_gate_inp.weight", "model.layers.1.mlp.router.weight");
  same("blk.1.ffn_gate_inp.bias", "model.layers.1.mlp.router.bias");
  same("output.weight", "lm_head.weight");
  EXPECT_EQ(f.find_tensor("blk.1.exp_probs_b.bias"), nullptr);
  EXPECT_EQ(f.find_tensor("blk.1.ffn_norm.weight"), nullptr);
  const int64_t E = 8, I = 16, H = 64;
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".mlp.experts.", blk = "blk." + std::to_string(l) + ".";
    const std::vector<float> gu = ck.tensor(p + "gate_up_proj").to_f32(), dn = ck.tensor(p + "down_proj").to_f32();
    const std::vector<float> gub = ck.tensor(p + "gate_up_proj_bias").to_f32(), dnb = ck.tensor(p + "down_proj_bias").to_f32();
    auto decoded = [&](const std::string& name, std::vector<int64_t> ne) {
      const io::GgufTensorInfo* t = f.find_tensor(blk + name);
      EXPECT_NE(t, nullptr) << name;
      if (!t) return std::vector<float>{};
      EXPECT_EQ(t->ne, ne) << name;
      EXPECT_EQ(t->type, quant::GgmlType::F32) << name;
      return f.decode(*t);
    };
    const auto gate = decoded("ffn_gate_exps.weight", {H, I, E}), up = decoded("ffn_up_exps.weight", {H, I, E});
    const auto down = decoded("ffn_down_exps.weight", {I, H, E});
    const auto gb = decoded("ffn_gate_exps.bias", {I, E}), ub = decoded("ffn_up_exps.bias", {I, E});
    const auto db = decoded("ffn_down_exps.bias", {H, E});
    ASSERT_EQ(gate.size(), static_cast<size_t>(E * I * H));
    for (int64_t e = 0; e < E; ++e)
      for (int64_t i = 0; i < I; ++i) {
        for (int64_t h = 0; h < H; ++h) {  // gate_up_proj [E, H, 2I], down_proj [E, I, H]
          ASSERT_EQ(gate[(e * I + i) * H + h], gu[(e * H + h) * 2 * I + 2 * i]) << l << " " << e << " " << i << " " << h;
          ASSERT_EQ(up[(e * I + i) * H + h], gu[(e * H + h) * 2 * I + 2 * i + 1]);
          ASSERT_EQ(down[(e * H + h) * I + i], dn[(e * I + i) * H + h]);
        }
        ASSERT_EQ(gb[e * I + i], gub[e * 2 * I + 2 * i]);
        ASSERT_EQ(ub[e * I + i], gub[e * 2 * I + 2 * i + 1]);
      }
    for (int64_t e = 0; e < E; ++e)
      for (int64_t h = 0; h < H; ++h) ASSERT_EQ(db[e * H + h], dnb[e * H + h]);
  }
}

// gpt-oss-tiny-mxfp4 (the released checkpoints' MXFP4 experts, tied embeddings): the experts are
// written as MXFP4 blocks from their codes, whatever --type says, nothing re-quantized: each block
// is the checkpoint's E8M0 scale byte and its 16 code bytes reordered (value j low nibble, j + 16
// high, as the converter's transform_nibble_layout), so the blocks decode to the checkpoint's
// decoded experts exactly; output.weight (required by llama.cpp) is the embedding again.
TEST(Export, GptOssMxfp4ExpertsCopiedAsBlocks) {
  TempDir dir{"moe-export"};
  const fs::path src = kSrc / "data/gpt-oss-tiny-mxfp4", out = dir / "m.gguf";
  ASSERT_EQ(run_tool({"-q", "export", src.string(), out.string(), "--type", "q8_0"}).exit_code, 0);
  const auto f = io::GgufFile::open(io::Env::posix(), out);
  auto& env = io::Env::posix();
  const auto ck = io::Checkpoint::open(env, src);
  const auto m = model::Model::load(ck);
  const int64_t E = 8, I = 32, H = 64;
  for (int l = 0; l < 2; ++l) {
    const std::string blk = "blk." + std::to_string(l) + ".";
    const auto& experts = m.layers()[static_cast<size_t>(l)].moe->experts;
    for (const auto& [name, which, rows, cols] : {std::tuple{"ffn_gate_exps.weight", 0, I, H}, {"ffn_up_exps.weight", 1, I, H},
                                                 {"ffn_down_exps.weight", 2, H, I}}) {
      SCOPED_TRACE(blk + name);
      const io::GgufTensorInfo* t = f.find_tensor(blk + name);
      ASSERT_NE(t, nullptr);
      EXPECT_EQ(type_of(f, blk + name), "mxfp4");
      EXPECT_EQ(t->ne, (std::vector<int64_t>{cols, rows, E}));
      EXPECT_EQ(t->nbytes(), static_cast<uint64_t>(E * rows * cols / 32 * 17));
      const std::vector<float> got = f.decode(*t);
      for (int64_t e = 0; e < E; ++e) {
        const model::Mlp& x = experts[static_cast<size_t>(e)];
        const std::vector<float> want = (which == 0 ? x.gate : which == 1 ? x.up : x.down).to_f32();
        ASSERT_TRUE(std::equal(want.begin(), want.end(), got.begin() + e * rows * cols)) << "expert " << e;
      }
    }
    // The first block of expert 0's gate (gate_up row 0) byte for byte: the scale, then the codes reordered.
    const std::string hf = "model.layers." + std::to_string(l) + ".mlp.experts.gate_up_proj_";
    const core::Tensor blocks = ck.tensor(hf + "blocks"), scales = ck.tensor(hf + "scales");
    const uint8_t* b = f.tensor_data(*f.find_tensor(blk + "ffn_gate_exps.weight"));
    EXPECT_EQ(b[0], scales.data()[0]);
    for (int j = 0; j < 16; ++j) {
      auto code = [&](int k) { return (blocks.data()[k / 2] >> (4 * (k % 2))) & 0xF; };
      EXPECT_EQ(b[1 + j], code(j) | code(j + 16) << 4) << "byte " << j;
    }
    EXPECT_EQ(type_of(f, blk + "attn_q.weight"), "q8_0");
    EXPECT_EQ(type_of(f, blk + "ffn_gate_exps.bias"), "f32");
  }
  const auto* emb = f.find_tensor("token_embd.weight");
  const auto* outw = f.find_tensor("output.weight");
  ASSERT_NE(outw, nullptr);
  EXPECT_EQ(f.decode(*outw), f.decode(*emb));
}

// gpt-oss refusals: a swiglu_limit other than llama.cpp's fixed 7; layer_types not in llama.cpp's
// pattern (layer l slides when l % 2 == 0); yarn betas llama.cpp's gpt-oss loader does not read.
// Exit 2, one line, nothing written.
TEST(Export, GptOssRefusalsWriteNothing) {
  TempDir dir{"moe-export"};
  const fs::path limit = dir / "limit", types = dir / "types", beta = dir / "beta";
  auto copy_with = [](const fs::path& to, const json& patch) { copy_fixture_with("gpt-oss-tiny", to, patch); };
  copy_with(limit, {{"swiglu_limit", 8.0}});
  expect_clean_failure(run_tool({"export", limit.string(), (dir / "l.gguf").string(), "--type", "f32"}),
                       "swiglu_alpha 1.702, swiglu_limit 8: llama.cpp's gpt-oss graph clamps with alpha 1.702 and limit 7");
  copy_with(types, {{"layer_types", {"full_attention", "sliding_attention"}}});
  expect_clean_failure(run_tool({"export", types.string(), (dir / "t.gguf").string(), "--type", "f32"}),
                       "layer_types[0] full_attention (or sliding_window null): llama.cpp's gpt-oss slides layer l when l % 2 < 1");
  copy_with(beta, {{"rope_scaling", {{"beta_fast", 16.0}}}});
  expect_clean_failure(run_tool({"export", beta.string(), (dir / "b.gguf").string(), "--type", "f32"}),
                       "rope_scaling beta_fast 16 / beta_slow 1: llama.cpp's gpt-oss loader uses 32 / 1");
  EXPECT_EQ(list_dir(dir.path()), (std::vector<std::string>{"beta", "limit", "types"}));
}

// phimoe (phimoe-tiny with phimoe_llamacpp_patch: 2 layers, H 64, 4 heads / 2 kv heads of 16, 8
// experts top 2 of width 16, q/k/v/o and lm_head biases): the keys and tensors llama.cpp's phimoe
// loader reads (PhiMoeModel / Phi3MiniModel of convert_hf_to_gguf.py): the LayerNorm biases as
// attn_norm.bias / ffn_norm.bias / output_norm.bias, output.bias, q/k not permuted (NeoX RoPE), the
// longrope divisors as rope_factors_long / rope_factors_short with rope.scaling.attn_factor (the
// mscale) and original_context_length; the residual stream's writers mean-centred (token_embd rows,
// attn_output columns and bias, each expert's ffn_down columns), every other tensor as stored; the
// routing warning printed; read back, the config has the source's longrope, biases and jitter, and
// the file evaluates as the source folder (centring leaves the model unchanged: every read is a LayerNorm).
TEST(Export, PhimoeKeysAndCentredWritersAsLlamaCppExpects) {
  TempDir dir{"moe-export"};
  const fs::path src = dir / "phimoe", out = dir / "p.gguf";
  copy_fixture_with("phimoe-tiny", src, phimoe_llamacpp_patch());
  const RunResult r = run_tool({"export", src.string(), out.string(), "--type", "f32"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.err.find("warning: phimoe: llama.cpp's graph weighs the top-2 experts by their softmax renormalized"), std::string::npos)
      << r.err;
  const auto f = io::GgufFile::open(io::Env::posix(), out);
  const std::string A = "phimoe";
  EXPECT_EQ(f.find("general.architecture")->as_string("a"), A);
  const std::vector<std::pair<std::string, int64_t>> ints = {
      {"context_length", 256}, {"block_count", 2}, {"feed_forward_length", 16}, {"expert_count", 8},
      {"expert_used_count", 2}, {"attention.head_count", 4}, {"attention.head_count_kv", 2},
      {"rope.dimension_count", 16}, {"rope.scaling.original_context_length", 64}};
  for (const auto& [key, want] : ints) EXPECT_EQ(meta_int(f, A + "." + key), want) << key;
  EXPECT_FLOAT_EQ(static_cast<float>(f.find(A + ".rope.scaling.attn_factor")->as_double("a")), 1.15f);
  EXPECT_FLOAT_EQ(static_cast<float>(f.find(A + ".attention.layer_norm_rms_epsilon")->as_double("e")), 1e-5f);
  EXPECT_FLOAT_EQ(static_cast<float>(f.find("moe_tool.router_jitter_noise")->as_double("j")), 0.2f);
  for (const char* absent : {"expert_feed_forward_length", "attention.sliding_window", "rope.scaling.type", "attention.key_length"})
    EXPECT_EQ(f.find(A + "." + absent), nullptr) << absent;
  const std::vector<float> lf = f.decode(*f.find_tensor("rope_factors_long.weight")), sf = f.decode(*f.find_tensor("rope_factors_short.weight"));
  EXPECT_EQ(lf, (std::vector<float>{1.0f, 1.3f, 1.7f, 2.5f, 4.0f, 6.0f, 8.0f, 9.0f}));
  EXPECT_EQ(sf, (std::vector<float>{1.0f, 1.1f, 1.2f, 1.5f, 2.0f, 3.0f, 4.0f, 5.0f}));
  const auto ck = io::Checkpoint::open(io::Env::posix(), src);
  auto same = [&](const std::string& gguf, const std::string& ours) { expect_same_tensor(f, gguf, ck, ours); };
  const std::string l1 = "model.layers.1.";
  same("blk.1.attn_norm.weight", l1 + "input_layernorm.weight");
  same("blk.1.attn_norm.bias", l1 + "input_layernorm.bias");
  same("blk.1.ffn_norm.bias", l1 + "post_attention_layernorm.bias");
  same("output_norm.bias", "model.norm.bias");
  same("output.weight", "lm_head.weight");
  same("output.bias", "lm_head.bias");
  same("blk.1.attn_q.weight", l1 + "self_attn.q_proj.weight");  // NeoX RoPE: not permuted
  same("blk.1.attn_k.bias", l1 + "self_attn.k_proj.bias");
  same("blk.1.ffn_gate_inp.weight", l1 + "block_sparse_moe.gate.weight");
  // The writers, centred: [V, H] rows, [H, in] columns, the bias as one row.
  auto expect_centred = [&](const std::vector<float>& got, const std::string& ours, size_t rows, size_t cols, bool rows_mean) {
    SCOPED_TRACE(ours);
    const std::vector<float> want = centred(ck.tensor(ours).to_f32(), rows, cols, rows_mean);
    ASSERT_EQ(got.size(), want.size());
    float scale = 0;
    for (float w : want) scale = std::max(scale, std::abs(w));
    for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-6f * scale) << i;
  };
  expect_centred(f.decode(*f.find_tensor("token_embd.weight")), "model.embed_tokens.weight", 4096, 64, true);
  expect_centred(f.decode(*f.find_tensor("blk.1.attn_output.weight")), l1 + "self_attn.o_proj.weight", 64, 64, false);
  expect_centred(f.decode(*f.find_tensor("blk.1.attn_output.bias")), l1 + "self_attn.o_proj.bias", 1, 64, true);
  const std::vector<float> down = f.decode(*f.find_tensor("blk.1.ffn_down_exps.weight"));
  for (size_t e : {0u, 5u})
    expect_centred(std::vector<float>(down.begin() + e * 64 * 16, down.begin() + (e + 1) * 64 * 16),
                   l1 + "block_sparse_moe.experts." + std::to_string(e) + ".w2.weight", 64, 16, false);
  EXPECT_EQ(f.tensors().size(), 5u + 2u + 2u * 16u);
  // Read back: the source's longrope, biases and jitter; the same model.
  const auto m = model::Model::load(io::Checkpoint::open(io::Env::posix(), out));
  const json c = m.config().json(), rs = c.at("rope_scaling");
  EXPECT_EQ(rs.at("rope_type"), "longrope");
  EXPECT_EQ(rs.at("long_factor").get<std::vector<double>>(), (std::vector<double>{1.0, 1.3, 1.7, 2.5, 4.0, 6.0, 8.0, 9.0}));
  EXPECT_EQ(rs.at("short_mscale"), 1.15);
  EXPECT_EQ(rs.at("long_mscale"), 1.15);
  EXPECT_EQ(c.at("original_max_position_embeddings"), 64);
  EXPECT_EQ(c.at("router_jitter_noise"), 0.2);
  EXPECT_EQ(c.at("lm_head_bias"), true);
  EXPECT_EQ(c.at("attention_bias"), true);
  // ctx 96 > 64: the long factors and mscale.
  const double a = nll_sum(src, 96), b = nll_sum(out, 96);
  EXPECT_GT(a, 0);
  EXPECT_NEAR(b, a, 1e-6 * a);
}

// phimoe refusals: the fixture's sliding window of 8 (llama.cpp's phimoe attends fully), a
// longrope whose short and long mscale differ (llama.cpp has one attn_factor) or are not positive,
// a ByteLevel adding a prefix space. Exit 2, one line, nothing written. Tied embeddings are
// written twice (output.weight uncentred) and evaluate as the folder. A residual writer stored as
// codes (attn_output as q8_0 blocks) is not refused: its codes are copied as they are, not centred
// (that would re-quantize them), with one warning, while the plain writers are still centred.
TEST(Export, PhimoeRefusalsWriteNothing) {
  TempDir dir{"moe-export"};
  expect_clean_failure(run_tool({"export", (kSrc / "data/phimoe-tiny").string(), (dir / "w.gguf").string(), "--type", "f32"}),
                       "sliding_window 8: llama.cpp's phimoe graph has no sliding window");
  json patch = phimoe_llamacpp_patch();
  patch["rope_scaling"]["long_mscale"] = 1.2;
  copy_fixture_with("phimoe-tiny", dir / "mscale", patch);
  expect_clean_failure(run_tool({"export", (dir / "mscale").string(), (dir / "m.gguf").string(), "--type", "f32"}),
                       "the short window's factor on cos and sin (1.15) differs from the long window's (1.2): llama.cpp's phimoe "
                       "applies one rope.scaling.attn_factor to both");
  patch["rope_scaling"]["short_mscale"] = patch["rope_scaling"]["long_mscale"] = -1.15;
  copy_fixture_with("phimoe-tiny", dir / "negative", patch);
  expect_clean_failure(run_tool({"export", (dir / "negative").string(), (dir / "n.gguf").string(), "--type", "f32"}),
                       "rope_scaling: the factor on cos and sin (short_mscale / long_mscale, else the attention factor) is -1.15: "
                       "llama.cpp's rope.scaling.attn_factor must be positive");
  // A ByteLevel that adds a space before the text: llama.cpp's gpt2 tokenizer does not.
  copy_fixture_with("phimoe-tiny", dir / "prefix", phimoe_llamacpp_patch());
  json tj = read_json(dir / "prefix" / "tokenizer.json");
  tj["pre_tokenizer"]["pretokenizers"].back()["add_prefix_space"] = true;
  write_file(dir / "prefix" / "tokenizer.json", tj.dump());
  expect_clean_failure(run_tool({"export", (dir / "prefix").string(), (dir / "p.gguf").string(), "--type", "f32"}),
                       "tokenizer.json: pre_tokenizer: ByteLevel add_prefix_space true: llama.cpp's gpt2 tokenizer adds no space "
                       "before the text, so it would tokenize differently");
  EXPECT_EQ(list_dir(dir.path()), (std::vector<std::string>{"mscale", "negative", "prefix"}));
  // Tied embeddings: token_embd centred, output.weight (required by llama.cpp's loader) the
  // embedding as it is, so the file evaluates as the folder.
  json tied = phimoe_llamacpp_patch();
  tied["tie_word_embeddings"] = true;
  copy_fixture_with("phimoe-tiny", dir / "tied", tied);
  ASSERT_EQ(run_tool({"-q", "export", (dir / "tied").string(), (dir / "t.gguf").string(), "--type", "f32"}).exit_code, 0);
  const auto t = io::GgufFile::open(io::Env::posix(), dir / "t.gguf");
  const auto tied_ck = io::Checkpoint::open(io::Env::posix(), dir / "tied");
  EXPECT_EQ(t.decode(*t.find_tensor("output.weight")), tied_ck.tensor("model.embed_tokens.weight").to_f32());
  const double tied_nll = nll_sum(dir / "tied", 64);
  EXPECT_NEAR(nll_sum(dir / "t.gguf", 64), tied_nll, 1e-6 * tied_nll);
  copy_fixture_with("phimoe-tiny", dir / "plain", phimoe_llamacpp_patch());
  ASSERT_EQ(run_tool({"-q", "quantize", (dir / "plain").string(), (dir / "q").string(), "--method", "rtn", "--codec", "q8_0",
                      "--tensor-type", "w2=keep", "--attention", "q8_0"})
                .exit_code,
            0);
  const RunResult r = run_tool({"export", (dir / "q").string(), (dir / "q.gguf").string(), "--type", "q8_0", "--tensor-type",
                                "ffn_down_exps=f16"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.err.find("warning: phimoe: blk.0.attn_output.weight and 1 more are stored as codes, copied as they are without the "
                       "export's mean-centring"),
            std::string::npos)
      << r.err;
  const auto f = io::GgufFile::open(io::Env::posix(), dir / "q.gguf");
  const auto m = model::Model::load(io::Checkpoint::open(io::Env::posix(), dir / "q"));
  EXPECT_EQ(type_of(f, "blk.1.attn_output.weight"), "q8_0");
  EXPECT_EQ(f.decode(*f.find_tensor("blk.1.attn_output.weight")), m.layers()[1].tensors.at("o_proj").to_f32());
  const std::vector<float> down = f.decode(*f.find_tensor("blk.1.ffn_down_exps.weight")),
                           want = centred(m.layers()[1].moe->experts[0].down.to_f32(), 64, 16, false);
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(down[i], want[i], 2e-3f * std::abs(want[i]) + 1e-6f) << i;  // f16
}

// Symmetric int8 groups of 32 from `quantize` (experts and attention) are Q8_0 blocks exactly:
// copied without re-quantizing, so the GGUF decodes to the quantized model's own values (q and k
// rows permuted for arch llama), whatever --type says for the dense tensors.
TEST(Export, SymmetricGroupsOf32AreCopiedAsBlocks) {
  TempDir dir{"moe-export"};
  const fs::path q8 = dir / "q8";
  ASSERT_EQ(run_tool({"-q", "quantize", (kSrc / "data/models/mixtral-tiny").string(), q8.string(), "--method", "rtn",
                      "--codec", "int8", "--group", "32", "--sym", "--attention", "int8"}).exit_code, 0);
  const fs::path out = dir / "q8.gguf";
  ASSERT_EQ(run_tool({"-q", "export", q8.string(), out.string(), "--type", "f16"}).exit_code, 0);
  const auto f = io::GgufFile::open(io::Env::posix(), out);
  EXPECT_EQ(type_of(f, "blk.2.ffn_down_exps.weight"), "q8_0");
  EXPECT_EQ(type_of(f, "blk.2.attn_q.weight"), "q8_0");
  EXPECT_EQ(type_of(f, "token_embd.weight"), "f16");
  auto& env = io::Env::posix();
  const auto ckpt = io::Checkpoint::open(env, q8);
  const auto model = model::Model::load(ckpt);
  const auto& layer = model.layers().at(2);
  ASSERT_NE(layer.moe->experts.at(5).down.encoding(), nullptr);
  const auto e5 = layer.moe->experts.at(5).down.to_f32();
  const auto down = f.decode(*f.find_tensor("blk.2.ffn_down_exps.weight"));
  EXPECT_EQ(std::vector<float>(down.begin() + 5 * static_cast<int64_t>(e5.size()), down.begin() + 6 * static_cast<int64_t>(e5.size())), e5);
  const auto q = layer.find("q_proj")->to_f32();
  const auto y = f.decode(*f.find_tensor("blk.2.attn_q.weight"));
  const int64_t H = 128, d = 32;
  for (int64_t h = 0; h < 4; ++h)
    for (int64_t i = 0; i < d / 2; ++i)
      for (int64_t s = 0; s < 2; ++s)
        for (int64_t c = 0; c < H; ++c) ASSERT_EQ(y[(h * d + 2 * i + s) * H + c], q[(h * d + s * d / 2 + i) * H + c]);
  // A --tensor-type for copied codes does not apply, and says so once.
  const RunResult o = run_tool({"export", q8.string(), (dir / "o.gguf").string(), "--type", "f16", "--tensor-type", "ffn_down_exps=q4_0"});
  ASSERT_EQ(o.exit_code, 0) << o.describe();
  EXPECT_NE(o.err.find("--tensor-type ffn_down_exps=q4_0 does not apply to 4 tensor(s) whose codes are copied, not re-quantized "
                       "(blk.0.ffn_down_exps.weight as q8_0, ...)"),
            std::string::npos) << o.err;
  EXPECT_EQ(o.err_lines().size(), 1u) << o.err;  // one line for the rule, not one per layer
  EXPECT_EQ(type_of(io::GgufFile::open(env, dir / "o.gguf"), "blk.0.ffn_down_exps.weight"), "q8_0");
  // Groups of 64 have no block type: refused, naming the encoding.
  const fs::path q64 = dir / "q64";
  ASSERT_EQ(run_tool({"-q", "quantize", (kSrc / "data/models/mixtral-tiny").string(), q64.string(), "--method", "rtn",
                      "--codec", "int4", "--group", "64", "--sym"}).exit_code, 0);
  expect_clean_failure(run_tool({"export", q64.string(), (dir / "x.gguf").string(), "--type", "q4_0"}),
                       "blk.0.ffn_gate_exps.weight: expert 0 is encoded as 'intN' {\"bits\":4,\"cols\":128,\"group\":64");
}

// ternary-tq trits (groups of 256, one f16 d) are TQ1_0 / TQ2_0 blocks exactly: copied, not
// re-rounded, as the type --tensor-type gives (tq1_0 by default, the smaller), decoding to the
// native weights bit for bit; in a recipe's GGUF output too.
TEST(Export, TernaryTqTritsAreCopiedAsTqBlocks) {
  TempDir dir{"moe-export"};
  const fs::path tq = dir / "tq";
  ASSERT_EQ(run_tool({"-q", "quantize", (kSrc / "data/models/mixtral-tiny").string(), tq.string(), "--method", "rtn",
                      "--codec", "ternary-tq", "--experts", "keep", "--tensor-type", "experts\\.[0-9]+\\.w2=ternary-tq"})
                .exit_code,
            0);
  auto& env = io::Env::posix();
  const auto ckpt = io::Checkpoint::open(env, tq);
  const auto model = model::Model::load(ckpt);
  const auto& e3 = model.layers().at(1).moe->experts.at(3).down;
  ASSERT_NE(e3.encoding(), nullptr);
  ASSERT_EQ(e3.encoding()->name(), "ternary");
  const auto want = e3.to_f32();
  const auto n = static_cast<int64_t>(want.size());
  for (const std::string type : {"", "tq1_0", "tq2_0"}) {
    SCOPED_TRACE(type);
    const fs::path out = dir / ("tq" + type + ".gguf");
    std::vector<std::string> args = {"-q", "export", tq.string(), out.string(), "--type", "f32"};
    if (!type.empty()) args.insert(args.end(), {"--tensor-type", "ffn_down_exps=" + type});
    ASSERT_EQ(run_tool(args).exit_code, 0);
    const auto f = io::GgufFile::open(env, out);
    EXPECT_EQ(type_of(f, "blk.1.ffn_down_exps.weight"), type.empty() ? "tq1_0" : type);
    const auto down = f.decode(*f.find_tensor("blk.1.ffn_down_exps.weight"));
    EXPECT_EQ(std::vector<float>(down.begin() + 3 * n, down.begin() + 4 * n), want);
  }
  const fs::path direct = dir / "direct.gguf";
  ASSERT_EQ(run_tool({"-q", "quantize", (kSrc / "data/models/mixtral-tiny").string(), direct.string(), "--method", "rtn",
                      "--codec", "ternary-tq", "--experts", "keep", "--tensor-type", "experts\\.[0-9]+\\.w2=ternary-tq",
                      "--format", "gguf", "--gguf-type", "f32", "--gguf-tensor-type", "ffn_down_exps=tq2_0"})
                .exit_code,
            0);
  const auto f = io::GgufFile::open(env, direct);
  EXPECT_EQ(type_of(f, "blk.1.ffn_down_exps.weight"), "tq2_0");
  const auto down = f.decode(*f.find_tensor("blk.1.ffn_down_exps.weight"));
  EXPECT_TRUE(std::equal(want.begin(), want.end(), down.begin() + 3 * n));
}

// GPTQ within the K-quant grid: `quantize --codec q4_k` (the routed experts' down projections, the
// mixtral fixture's 256-wide rows) keeps GGUF blocks in the native folder ("gguf-q4_k"), `export`
// copies those bytes as q4_k whatever --type says, and the GGUF read back evaluates exactly as the
// native checkpoint (every other tensor f32). GPTQ's blocks differ from RTN's (error feedback) and
// the refusals: rows that are not whole blocks, options on a block type.
TEST(Export, GptqWithinTheKQuantGridIsCopiedAsItsBlocks) {
  TempDir dir{"moe-export"};
  const std::string src = (kSrc / "data/models/mixtral-tiny").string();
  auto quantize = [&](const std::string& method, const fs::path& out, std::vector<std::string> extra = {}) {
    std::vector<std::string> a = {"-q", "quantize", src, out.string(), "--method", method, "--experts", "keep",
                                  "--tensor-type", "experts\\.[0-9]+\\.w2=q4_k", "--text", (kSrc / "data/text/calib.txt").string(),
                                  "--ctx", "64", "--windows", "4"};
    a.insert(a.end(), extra.begin(), extra.end());
    const RunResult r = run_tool(a);
    EXPECT_EQ(r.exit_code, 0) << r.describe();
  };
  const fs::path gq = dir / "gptq", rq = dir / "rtn";
  quantize("gptq", gq);
  quantize("rtn", rq);
  auto& env = io::Env::posix();
  const auto cfg = read_json(gq / "config.json");
  const std::string w2 = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
  EXPECT_NE(cfg.dump().find("\"gguf-q4_k\""), std::string::npos) << "the native manifest names the encoding";
  const auto gm = model::Model::load(io::Checkpoint::open(env, gq)), rm = model::Model::load(io::Checkpoint::open(env, rq));
  const auto* gb = dynamic_cast<const quant::GgufBlocks*>(gm.layers().at(1).moe->experts.at(3).down.encoding());
  const auto* rb = dynamic_cast<const quant::GgufBlocks*>(rm.layers().at(1).moe->experts.at(3).down.encoding());
  ASSERT_NE(gb, nullptr);
  ASSERT_NE(rb, nullptr);
  EXPECT_EQ(gb->name(), "gguf-q4_k");
  EXPECT_EQ(gm.layers().at(1).moe->experts.at(3).gate.encoding(), nullptr);  // only w2 quantized
  const auto& gbytes = gb->bytes();
  ASSERT_EQ(gbytes.nbytes(), rb->bytes().nbytes());
  EXPECT_FALSE(std::equal(gbytes.data(), gbytes.data() + gbytes.nbytes(), rb->bytes().data()))
      << "GPTQ's error feedback changed no code of " << w2;
  // RTN's blocks are export --type q4_k's rounding of the same weight.
  {
    const auto in = model::Model::load(io::Checkpoint::open(env, src));
    const auto x = in.layers().at(1).moe->experts.at(3).down.to_f32();
    const int64_t cols = gb->cols();
    std::vector<uint8_t> want(rb->bytes().nbytes());
    const uint64_t row = quant::ggml_row_bytes(quant::GgmlType::Q4_K, cols);
    for (int64_t r = 0; r < gb->rows(); ++r) quant::encode_row(quant::GgmlType::Q4_K, x.data() + r * cols, cols, want.data() + r * row);
    EXPECT_TRUE(std::equal(want.begin(), want.end(), rb->bytes().data()));
  }
  // export copies the blocks; read back, the GGUF evaluates as the native checkpoint.
  const fs::path out = dir / "gptq.gguf";
  ASSERT_EQ(run_tool({"-q", "export", gq.string(), out.string(), "--type", "f32"}).exit_code, 0);
  const auto f = io::GgufFile::open(env, out);
  EXPECT_EQ(type_of(f, "blk.1.ffn_down_exps.weight"), "q4_k");
  EXPECT_EQ(type_of(f, "blk.1.ffn_gate_exps.weight"), "f32");
  const io::GgufTensorInfo& t = *f.find_tensor("blk.1.ffn_down_exps.weight");
  const uint8_t* stored = f.tensor_data(t) + 3 * gbytes.nbytes();
  EXPECT_TRUE(std::equal(gbytes.data(), gbytes.data() + gbytes.nbytes(), stored));
  const json a = eval_json(gq, 2), b = eval_json(out, 2);
  ASSERT_TRUE(a.contains("nll_sum")) << a.dump();
  EXPECT_EQ(a.at("nll_sum"), b.at("nll_sum"));
  EXPECT_EQ(a.at("perplexity"), b.at("perplexity"));
  // The same in one run, written as GGUF by the quantize command.
  const fs::path direct = dir / "direct.gguf";
  quantize("gptq", direct, {"--format", "gguf", "--gguf-type", "f32"});
  const auto fd = io::GgufFile::open(env, direct);
  EXPECT_TRUE(std::equal(gbytes.data(), gbytes.data() + gbytes.nbytes(), fd.tensor_data(*fd.find_tensor("blk.1.ffn_down_exps.weight")) + 3 * gbytes.nbytes()));
  // A block whose f16 scale is NaN (the first two bytes of a q4_k block) is refused by export,
  // naming the tensor and row, as non-finite weights are.
  {
    const fs::path bad = dir / "nan-scale";
    fs::copy(gq, bad);
    std::string st = read_file(bad / "model.safetensors");
    uint64_t n = 0;
    std::memcpy(&n, st.data(), 8);
    const json h = json::parse(st.substr(8, n));
    const uint64_t at = 8 + n + h.at(w2).at("data_offsets").at(0).get<uint64_t>();
    st[at] = '\x00', st[at + 1] = '\x7e';  // f16 NaN, little-endian
    write_file(bad / "model.safetensors", st);
    expect_clean_failure(run_tool({"export", bad.string(), (dir / "nan.gguf").string(), "--type", "q8_0"}),
                         "blk.1.ffn_down_exps.weight: row 0: gguf-q4_k block 0 decodes to nan (a scale is not finite)");
    EXPECT_FALSE(fs::exists(dir / "nan.gguf"));
  }
  // Refusals before any work: 128-wide rows (w1 reads the hidden size 128), options on a block type.
  expect_clean_failure(run_tool({"quantize", src, (dir / "bad").string(), "--method", "rtn", "--codec", "q4_k"}),
                       "rows of 128 values are not whole q4_k blocks of 256");
  EXPECT_FALSE(fs::exists(dir / "bad"));
  expect_clean_failure(run_tool({"quantize", src, (dir / "bad").string(), "--method", "rtn", "--codec", "q4_k:g32"}),
                       "q4_k is a ggml block type with a fixed layout");
  expect_clean_failure(run_tool({"quantize", src, (dir / "bad").string(), "--method", "rtn", "--avg-bits", "5", "--widths",
                                 "q4_k,int8", "--text", (kSrc / "data/text/calib.txt").string()}),
                       "--widths: q4_k needs rows of whole blocks of 256, but the routed experts of layer 0 have rows of 128");
  EXPECT_FALSE(fs::exists(dir / "bad"));
}

// Rows of 256 (a synthetic mixtral of hidden and expert width 256): every weight in the K-quant
// main type, token_embd and output at Q6_K as llama-quantize puts output (Q8_0 when the main type
// is Q8_0, and for rows of 128, as MixtralMetadataAndTypesAsLlamaCppExpects checks).
TEST(Export, KQuantsAndTheQ6KDefaultForEmbeddingAndOutput) {
  TempDir dir{"moe-export"};
  const auto ck = make_synth("mixtral", {.config_patch = {{"vocab_size", 4096}, {"hidden_size", 256}, {"intermediate_size", 256}}});
  const std::string model = synth_with_tokenizer(dir, "mixtral", ck).string();
  // Main type, llama_ftype, largest error allowed on attn_v (one step: |x| < 0.5, so a sub-block's
  // range is under 1: q4_k 1/15, q2_k 1/3, q8_0 0.5/127).
  for (const auto& [type, ftype, step] : {std::tuple{"q4_k", 14, 0.07}, std::tuple{"q2_k", 10, 0.34}, std::tuple{"q8_0", 7, 0.004}}) {
    SCOPED_TRACE(type);
    const fs::path out = dir / (std::string(type) + ".gguf");
    ASSERT_EQ(run_tool({"-q", "export", model, out.string(), "--type", type}).exit_code, 0);
    const auto f = io::GgufFile::open(io::Env::posix(), out);
    EXPECT_EQ(meta_int(f, "general.file_type"), ftype);
    const std::string embd = std::string(type) == "q8_0" ? "q8_0" : "q6_k";
    EXPECT_EQ(type_of(f, "token_embd.weight"), embd);
    EXPECT_EQ(type_of(f, "output.weight"), embd);
    EXPECT_EQ(type_of(f, "blk.1.ffn_down_exps.weight"), type);
    EXPECT_EQ(type_of(f, "blk.0.attn_q.weight"), type);
    EXPECT_EQ(type_of(f, "blk.0.ffn_gate_inp.weight"), "f32");
    const auto y = f.decode(*f.find_tensor("blk.0.attn_v.weight"));
    const auto x = source_f32(ck, "model.layers.0.self_attn.v_proj.weight");
    ASSERT_EQ(y.size(), x.size());
    double worst = 0;
    for (size_t i = 0; i < x.size(); ++i) worst = std::max(worst, static_cast<double>(std::fabs(y[i] - x[i])));
    EXPECT_GT(worst, 0.0);
    EXPECT_LT(worst, step);
  }
}

TEST(Export, TensorTypeOverridesFirstMatchWins) {
  TempDir dir{"moe-export"};
  const auto f = io::GgufFile::open(
      io::Env::posix(), export_model(dir, "mixtral-tiny", "q4_0",
                                     {"--tensor-type", "ffn_down_exps=q8_0", "--tensor-type", "ffn_.*_exps=q5_1",
                                      "--tensor-type", "token_embd=f16", "--tensor-type", "norm=q8_0"}));
  EXPECT_EQ(type_of(f, "blk.1.ffn_down_exps.weight"), "q8_0");
  EXPECT_EQ(type_of(f, "blk.1.ffn_gate_exps.weight"), "q5_1");
  EXPECT_EQ(type_of(f, "token_embd.weight"), "f16");
  EXPECT_EQ(type_of(f, "output.weight"), "q8_0");
  EXPECT_EQ(type_of(f, "blk.1.attn_v.weight"), "q4_0");
  EXPECT_EQ(type_of(f, "blk.1.ffn_norm.weight"), "f32");  // 1-D: never quantized
}

// The dense families as convert_hf_to_gguf.py writes them (LlamaModel for llama and mistral, as
// llama.cpp's llama; Qwen2Model, Qwen3Model): no expert keys, feed_forward_length the MLP's width,
// every layer's MLP as blk.N.ffn_{gate,up,down}, q/k rows (and llama's attention biases) permuted
// for llama only, qwen2's q/k/v biases and qwen3's per-head q/k norms under llama.cpp's names, tied
// embeddings (qwen2, qwen3) without output.weight. Read back as the family (mistral as llama: the
// file does not tell them apart) with every source tensor and the same nll.
TEST(Export, DenseFamiliesAsLlamaCppNamesThem) {
  TempDir dir{"moe-export-dense"};
  auto& env = io::Env::posix();
  for (const auto& [family, arch, read_as] : {std::tuple{"llama", "llama", "llama"}, std::tuple{"mistral", "llama", "llama"},
                                              std::tuple{"qwen2", "qwen2", "qwen2"}, std::tuple{"qwen3", "qwen3", "qwen3"}}) {
    SCOPED_TRACE(family);
    json patch = {{"vocab_size", 4096}};
    if (std::string(family) == "llama") patch["attention_bias"] = true;
    const auto ck = make_synth(family, {.config_patch = patch});
    const fs::path src = synth_with_tokenizer(dir, family, ck), out = dir / (std::string(family) + ".gguf");
    const RunResult r = run_tool({"-q", "export", src.string(), out.string(), "--type", "f32"});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    const auto f = io::GgufFile::open(env, out);
    const std::string A = arch;
    EXPECT_EQ(f.find("general.architecture")->str, A);
    for (const char* absent : {"expert_count", "expert_used_count", "expert_feed_forward_length"})
      EXPECT_EQ(f.find(A + "." + absent), nullptr) << absent;
    EXPECT_EQ(meta_int(f, A + ".feed_forward_length"), ck.config.at("intermediate_size").get<int64_t>());
    EXPECT_EQ(meta_int(f, A + ".block_count"), 2);
    EXPECT_EQ(f.find_tensor("output.weight") != nullptr, !ck.config.value("tie_word_embeddings", false));
    const bool permuted = A == "llama";
    for (int l = 0; l < 2; ++l) {
      const std::string blk = "blk." + std::to_string(l) + ".", hf = "model.layers." + std::to_string(l) + ".";
      EXPECT_EQ(f.find_tensor(blk + "ffn_gate_inp.weight"), nullptr);
      EXPECT_EQ(f.decode(*f.find_tensor(blk + "ffn_gate.weight")), source_f32(ck, hf + "mlp.gate_proj.weight"));
      EXPECT_EQ(f.decode(*f.find_tensor(blk + "ffn_up.weight")), source_f32(ck, hf + "mlp.up_proj.weight"));
      EXPECT_EQ(f.decode(*f.find_tensor(blk + "ffn_down.weight")), source_f32(ck, hf + "mlp.down_proj.weight"));
      EXPECT_EQ(f.decode(*f.find_tensor(blk + "attn_v.weight")), source_f32(ck, hf + "self_attn.v_proj.weight"));
      const auto q = f.decode(*f.find_tensor(blk + "attn_q.weight")), qs = source_f32(ck, hf + "self_attn.q_proj.weight");
      EXPECT_EQ(q == qs, !permuted);
      if (std::string(family) == "qwen2" || std::string(family) == "llama")
        for (const char* b : {"attn_q.bias", "attn_k.bias", "attn_v.bias"}) EXPECT_NE(f.find_tensor(blk + b), nullptr) << b;
      if (std::string(family) == "qwen2")
        EXPECT_EQ(f.decode(*f.find_tensor(blk + "attn_q.bias")), source_f32(ck, hf + "self_attn.q_proj.bias"));
      if (std::string(family) == "qwen3")
        EXPECT_EQ(f.decode(*f.find_tensor(blk + "attn_k_norm.weight")), source_f32(ck, hf + "self_attn.k_norm.weight"));
    }
    const auto gg = io::Checkpoint::open(env, out);
    const auto m = model::Model::load(gg);
    EXPECT_EQ(m.family().model_type, read_as);
    for (const auto& layer : m.layers()) EXPECT_FALSE(layer.moe.has_value()) << layer.index;
    for (const auto& name : ck.names()) {
      SCOPED_TRACE(name);
      ASSERT_TRUE(gg.has(name));
      EXPECT_EQ(gg.tensor(name).to_f32(), source_f32(ck, name));
    }
    const double a = nll_sum(src, 48), b = nll_sum(out, 48);
    EXPECT_NEAR(b, a, 1e-9 * a);
  }
}

// llama3 RoPE scaling as rope_freqs.weight, read back. Llama 3.1's keys (factor 8, low_freq_factor
// 1, high_freq_factor 4, original 8192, theta 500000, head_dim 128) come back as written. Keys with
// the same band in another form (low 2, high 8, original 16384: the same divisors) come back as
// low 1, high 4, original 8192, an equal model. A band of one divisor is refused: it does not fix
// the smoothing.
TEST(Export, Llama3RopeScalingReadBackFromItsDivisors) {
  TempDir dir{"moe-export-llama3"};
  auto& env = io::Env::posix();
  auto config_back = [&](const json& rs, int64_t head_dim, const std::string& name) {
    json patch = {{"vocab_size", 4096}, {"head_dim", head_dim}, {"rope_scaling", rs}, {"max_position_embeddings", 131072}};
    const auto ck = make_synth("llama", {.layers = 1, .config_patch = patch});
    const fs::path src = synth_with_tokenizer(dir, name, ck), out = dir / (name + ".gguf");
    const RunResult r = run_tool({"-q", "export", src.string(), out.string(), "--type", "f32"});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return std::pair{src, out};
  };
  const json llama31 = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                        {"original_max_position_embeddings", 8192}};
  const auto [src, out] = config_back(llama31, 128, "llama31");
  const auto f = io::GgufFile::open(env, out);
  EXPECT_EQ(f.find_tensor("rope_freqs.weight")->ne, std::vector<int64_t>{64});
  EXPECT_EQ(model::Model::load(io::Checkpoint::open(env, out)).config().json().at("rope_scaling"), llama31);
  json other = llama31;
  other["low_freq_factor"] = 2.0;
  other["high_freq_factor"] = 8.0;
  other["original_max_position_embeddings"] = 16384;
  const auto [src2, out2] = config_back(other, 128, "other");
  EXPECT_EQ(model::Model::load(io::Checkpoint::open(env, out2)).config().json().at("rope_scaling"), llama31);
  const double a = nll_sum(src2, 48), b = nll_sum(out2, 48);
  EXPECT_NEAR(b, a, 1e-6 * a);
  // Refused at export, since the file would not read back: head_dim 8 (4 frequencies, wavelengths
  // 6.3, 167, 4.4e3, 1.2e5 at theta 500000) with original 5000 (the band 1250..5000) has only the
  // third in the band; a factor below 1.
  json one = llama31;
  one["original_max_position_embeddings"] = 5000;
  json below = llama31;
  below["factor"] = 0.5;
  for (const auto& [rs, head_dim, message] :
       {std::tuple{one, 8, std::string("its divisors would not read back from the file (rope_freqs.weight: one divisor (2")},
        std::tuple{below, 128, std::string("its divisors would not read back from the file (rope_freqs.weight: divisor ")}}) {
    const auto ck = make_synth("llama", {.layers = 1, .config_patch = {{"vocab_size", 4096}, {"head_dim", head_dim},
                                                                        {"rope_scaling", rs}, {"max_position_embeddings", 131072}}});
    const fs::path src3 = synth_with_tokenizer(dir, "refused", ck), out3 = dir / "refused.gguf";
    expect_clean_failure(run_tool({"export", src3.string(), out3.string(), "--type", "f32"}), message);
    EXPECT_FALSE(fs::exists(out3));
    fs::remove_all(src3);
  }
}

// Qwen's long-context yarn (qwen2, qwen3 and their MoE families) as rope.scaling.* keys, which
// llama.cpp's loader reads for every architecture; read back as the same yarn and the same nll. A
// factor other than max_position_embeddings / original_max_position_embeddings is refused:
// transformers' yarn uses that ratio, llama.cpp the factor.
TEST(Export, QwenYarnAsRopeScalingKeys) {
  TempDir dir{"moe-export-yarn"};
  auto& env = io::Env::posix();
  for (const char* family : {"qwen3", "qwen2_moe"}) {
    SCOPED_TRACE(family);
    const json rs = {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32}};
    json patch = {{"vocab_size", 4096}, {"max_position_embeddings", 128}, {"rope_scaling", rs}};
    if (std::string(family) == "qwen2_moe") patch.update({{"decoder_sparse_step", 1}, {"mlp_only_layers", json::array()}});
    const auto ck = make_synth(family, {.config_patch = patch});
    const fs::path src = synth_with_tokenizer(dir, family, ck), out = dir / (std::string(family) + ".gguf");
    const RunResult r = run_tool({"-q", "export", src.string(), out.string(), "--type", "f32"});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    const auto f = io::GgufFile::open(env, out);
    const std::string A = f.find("general.architecture")->str;
    EXPECT_EQ(f.find(A + ".rope.scaling.type")->str, "yarn");
    EXPECT_EQ(f.find(A + ".rope.scaling.factor")->as_double("f"), 4.0);
    EXPECT_EQ(meta_int(f, A + ".rope.scaling.original_context_length"), 32);
    const json back = model::Model::load(io::Checkpoint::open(env, out)).config().json().at("rope_scaling");
    EXPECT_EQ(back.at("rope_type"), "yarn");
    EXPECT_EQ(back.at("factor"), 4.0);
    EXPECT_EQ(back.at("original_max_position_embeddings"), 32);
    const double a = nll_sum(src, 48), b = nll_sum(out, 48);
    EXPECT_NEAR(b, a, 1e-9 * a);
    EXPECT_NE(b, nll_sum(synth_with_tokenizer(dir, std::string(family) + "-plain",
                                              make_synth(family, {.config_patch = [&] {
                                                json plain = patch;
                                                plain["rope_scaling"] = nullptr;  // removed: no scaling
                                                return plain;
                                              }()})),
                         48))
        << "yarn left the model unchanged";
  }
  const fs::path bad = synth_with_tokenizer(
      dir, "ratio",
      make_synth("qwen3", {.config_patch = {{"vocab_size", 4096}, {"max_position_embeddings", 160},
                                            {"rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32}}}}}));
  expect_clean_failure(run_tool({"export", bad.string(), (dir / "ratio.gguf").string(), "--type", "f32"}),
                       "rope_scaling yarn: factor 4 is not max_position_embeddings / original_max_position_embeddings (5)");
  EXPECT_FALSE(fs::exists(dir / "ratio.gguf"));
}

TEST(Export, RefusalsWriteNothing) {
  TempDir dir{"moe-export"};
  const std::string mixtral = (kSrc / "data/models/mixtral-tiny").string();
  const std::string out = (dir / "o.gguf").string();
  expect_clean_failure(run_tool({"export", mixtral, out, "--type", "iq2_xs"}), "--type: iq2_xs is not written yet");
  expect_clean_failure(run_tool({"export", mixtral, out, "--type", "q4_k"}),
                       "blk.0.attn_k.weight: rows of 128 values are not a multiple of the q4_k block size 256");
  expect_clean_failure(run_tool({"export", mixtral, out, "--type", "tq2_0"}),
                       "blk.0.attn_k.weight: rows of 128 values are not a multiple of the tq2_0 block size 256");
  expect_clean_failure(run_tool({"export", mixtral, out, "--type", "q3_x"}), "--type: unknown ggml type 'q3_x'");
  // A folder name for the one file: refused, nothing made.
  expect_clean_failure(run_tool({"export", mixtral, (dir / "slash").string() + "/", "--format", "gguf", "--type", "q8_0"}),
                       "a folder name (a trailing '/'), but --format gguf writes one file");
  EXPECT_FALSE(fs::exists(dir / "slash"));
  expect_clean_failure(run_tool({"export", mixtral, out, "--type", "q4_0", "--tensor-type", "([=q8_0"}), "bad regex");
  expect_clean_failure(run_tool({"export", mixtral, out, "--type", "q4_0", "--tensor-type", "exps"}), "expected REGEX=TYPE");
  // What llama.cpp's loaders cannot take: qwen3's attention biases (its loader has none), qwen2's
  // attn_q other than [hidden, hidden] (4 heads of 16 on hidden 32).
  const fs::path qb = dir / "qb", qw = dir / "qw";
  write_synth(make_synth("qwen3", {.config_patch = {{"attention_bias", true}}}), qb);
  expect_clean_failure(run_tool({"export", qb.string(), out, "--type", "f32"}),
                       "layer 0: attention biases (attention_bias): llama.cpp's qwen3 loader has none");
  write_synth(make_synth("qwen2", {.config_patch = {{"head_dim", 16}}}), qw);
  expect_clean_failure(run_tool({"export", qw.string(), out, "--type", "f32"}),
                       "num_attention_heads x head_dim = 64 is not hidden_size 32: llama.cpp's qwen2 loader fixes attn_q");
  // A sliding window shorter than the context: llama.cpp's llama graph has none.
  const fs::path windowed = dir / "windowed";
  write_synth(make_synth("mistral", {.config_patch = {{"sliding_window", 64}}}), windowed);
  expect_clean_failure(run_tool({"export", windowed.string(), out, "--type", "f16"}),
                       "sliding_window 64: llama.cpp's llama graph has no sliding window");
  expect_clean_failure(run_tool({"export", mixtral, mixtral + "/model.safetensors", "--type", "f16"}), "model.safetensors");
  // Rows narrower than a block: the synthetic mixtral's experts are 16 wide.
  const fs::path synth = dir / "synth";
  write_synth(make_synth("mixtral"), synth);
  expect_clean_failure(run_tool({"export", synth.string(), out, "--type", "q4_0"}),
                       "ffn_down_exps.weight: rows of 16 values are not a multiple of the q4_0 block size 32");
  // A model quantized by moe-tool: refused naming the encoding and the way out.
  const fs::path quantized = dir / "int4";
  ASSERT_EQ(run_tool({"-q", "quantize", mixtral, quantized.string(), "--method", "rtn", "--codec", "int4"}).exit_code, 0);
  const RunResult q = run_tool({"export", quantized.string(), out, "--type", "q4_0"});
  expect_clean_failure(q, "is encoded as 'intN'");
  EXPECT_NE(q.err.find("convert " + quantized.string() + " DENSE --materialize"), std::string::npos) << q.err;
  EXPECT_EQ(list_dir(dir.path()), (std::vector<std::string>{"int4", "qb", "qw", "synth", "windowed"})) << "something was written";
  // An existing output needs --force.
  ASSERT_EQ(run_tool({"-q", "export", mixtral, out, "--type", "f16"}).exit_code, 0);
  const auto size = fs::file_size(out);
  expect_clean_failure(run_tool({"export", mixtral, out, "--type", "f32"}), "--force");
  EXPECT_EQ(fs::file_size(out), size);
}

// ---- recipe output formats ----

// The synthetic model with the fixtures' tokenizer (GGUF's tokenizer metadata needs one).
fs::path synth_with_calib_tokenizer(const TempDir& dir) {
  const fs::path d = dir / "model";
  write_synth(make_synth("mixtral", {.config_patch = {{"vocab_size", 4096}, {"intermediate_size", 32}}}), d);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    fs::copy_file(kSrc / "data/models/mixtral-tiny" / f, d / f);
  return d;
}

// prune (frequency, 4 -> 3 experts) then quantize (RTN int4, symmetric groups of 32).
json sink_recipe(const fs::path& model, const json& output) {
  return {{"model", model.string()},
          {"calibration", {{"text", (kSrc / "data/text/calib.txt").string()}, {"ctx", 32}, {"windows", 4}}},
          {"passes", json::array({{{"pass", "prune"}, {"method", "frequency"}, {"keep", 3}},
                                  {{"pass", "quantize"}, {"method", "rtn"}, {"codec", "int4:g32:sym"}}})},
          {"output", output}};
}

RunResult run_recipe_file(const TempDir& dir, const std::string& name, const json& r, const std::vector<std::string>& extra = {}) {
  const fs::path file = dir / (name + ".json");
  write_file(file, r.dump(2));
  std::vector<std::string> args = {"-q", "run", file.string()};
  args.insert(args.end(), extra.begin(), extra.end());
  return run_tool(args);
}

std::vector<std::string> dir_entries(const fs::path& dir) {
  std::vector<std::string> v;
  for (const auto& e : fs::directory_iterator(dir)) v.push_back(e.path().filename().string());
  std::sort(v.begin(), v.end());
  return v;
}

// The recipe's GGUF equals, byte for byte, `export` of the recipe's native output (the general.name
// is the output's name without .gguf, here the native folder's name); int4 groups of 32 are q4_0
// blocks; the staged native output is gone.
TEST(RecipeSink, GgufEqualsExportOfTheNativeOutput) {
  TempDir dir{"moe-sink"};
  const fs::path model = synth_with_calib_tokenizer(dir);
  const fs::path native = dir / "a" / "m", exported = dir / "a" / "m.gguf", direct = dir / "b" / "m.gguf";
  ASSERT_EQ(run_recipe_file(dir, "hf", sink_recipe(model, {{"path", native.string()}})).exit_code, 0);
  ASSERT_EQ(run_tool({"-q", "export", native.string(), exported.string(), "--type", "q8_0"}).exit_code, 0);
  const RunResult r = run_recipe_file(dir, "gguf", sink_recipe(model, {{"path", direct.string()}, {"format", "gguf"}, {"type", "q8_0"}}),
                                 {"--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(read_file(direct), read_file(exported));
  EXPECT_EQ(dir_entries(direct.parent_path()), std::vector<std::string>{"m.gguf"});  // no staging left
  const auto f = io::GgufFile::open(io::Env::posix(), direct);
  EXPECT_EQ(f.find_tensor("blk.0.ffn_up_exps.weight")->type, quant::GgmlType::Q4_0);
  EXPECT_EQ(f.find_tensor("blk.0.ffn_up_exps.weight")->ne.back(), 3);  // pruned to 3 experts
  EXPECT_EQ(f.find_tensor("blk.0.attn_q.weight")->type, quant::GgmlType::Q8_0);
  // The summary's output section: the GGUF's accounting, not the staged folder's.
  const json s = json::parse(r.out);
  EXPECT_EQ(s.at("output_format").at("format"), "gguf");
  EXPECT_EQ(s.at("output_format").at("tensors").get<size_t>(), f.tensors().size());
  EXPECT_EQ(s.at("output_format").at("file_bytes").get<uint64_t>(), fs::file_size(direct));
  EXPECT_TRUE(s.at("report").is_null());
}

// The same for the packed folders: tensors and config.json equal those of `export`.
class RecipePackedSink : public ::testing::TestWithParam<std::string> {};

TEST_P(RecipePackedSink, EqualsExportOfTheNativeOutput) {
  const std::string format = GetParam();
  TempDir dir{"moe-sink"};
  const fs::path model = synth_with_calib_tokenizer(dir);
  const fs::path native = dir / "a" / "m", exported = dir / "a" / "x", direct = dir / "b" / "x";
  ASSERT_EQ(run_recipe_file(dir, "hf", sink_recipe(model, {{"path", native.string()}})).exit_code, 0);
  ASSERT_EQ(run_tool({"-q", "export", native.string(), exported.string(), "--format", format}).exit_code, 0);
  const RunResult r = run_recipe_file(dir, "packed", sink_recipe(model, {{"path", direct.string()}, {"format", format}}));
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  for (const char* f : {"model.safetensors", "config.json", "tokenizer.json"})
    EXPECT_EQ(read_file(direct / f), read_file(exported / f)) << f;
  EXPECT_EQ(read_json(direct / "config.json").at("quantization_config").at("quant_method"),
            format == "compressed-tensors" ? "compressed-tensors" : format);
  // The report is in the folder, its output section the packed one.
  const json rep = read_json(direct / "moe_tool_report.json");
  EXPECT_EQ(rep.at("output").at("format"), format);
  EXPECT_EQ(rep.at("output").at("bits"), 4);
  EXPECT_EQ(rep.at("bytes").at("after").get<uint64_t>(), rep.at("output").at("tensor_bytes").get<uint64_t>());
  EXPECT_EQ(dir_entries(direct.parent_path()), std::vector<std::string>{"x"});  // no staging left
}

INSTANTIATE_TEST_SUITE_P(Formats, RecipePackedSink, ::testing::Values("compressed-tensors", "gptq", "awq"));

// Ternary experts cannot be held by compressed-tensors: refused by the checks (a dry run, which
// computes nothing, refuses it too), one line naming the format key and the codec key, nothing written.
TEST(RecipeSink, TernaryToCompressedTensorsIsRefusedBeforeAnyWork) {
  TempDir dir{"moe-sink"};
  const fs::path model = synth_with_calib_tokenizer(dir);
  const fs::path out = dir / "out" / "ct";
  json r = sink_recipe(model, {{"path", out.string()}, {"format", "compressed-tensors"}});
  r["passes"][1]["codec"] = "ternary";
  for (const std::vector<std::string>& extra : {std::vector<std::string>{}, {"--dry-run"}}) {
    const RunResult res = run_recipe_file(dir, "ternary", r, extra);
    expect_clean_failure(res, "output.format compressed-tensors: passes[1].codec writes experts as ternary");
    EXPECT_NE(res.err.find("or write output.format hf"), std::string::npos) << res.err;
    EXPECT_FALSE(fs::exists(out.parent_path()));
  }
  // The one-pass commands name their flags.
  const RunResult q = run_tool({"-q", "quantize", model.string(), out.string(), "--method", "rtn", "--codec", "ternary",
                                "--format", "gguf", "--gguf-type", "q8_0"});
  expect_clean_failure(q, "--format gguf: --codec writes experts as ternary");
  EXPECT_NE(q.err.find("let --gguf-type round it"), std::string::npos) << q.err;
  EXPECT_FALSE(fs::exists(out.parent_path()));
}

// GGUF copies only symmetric groups of 32; other groups, and rows that are not whole blocks,
// are refused in the checks; the GGUF-only keys are refused for other formats.
TEST(RecipeSink, GgufRefusalsNameTheKey) {
  TempDir dir{"moe-sink"};
  const fs::path model = synth_with_calib_tokenizer(dir);
  const fs::path out = dir / "out" / "m.gguf";
  json r = sink_recipe(model, {{"path", out.string()}, {"format", "gguf"}, {"type", "q8_0"}});
  r["passes"][1]["codec"] = "int4:g16:sym";
  expect_clean_failure(run_recipe_file(dir, "g16", r), "passes[1].codec writes experts as int4:g16:sym, which has no GGUF block type");
  r["passes"][1]["codec"] = "int4:g32:sym";
  r["passes"][1]["tensor_type"] = json::array({"w2=int8:g32:sym"});  // down: [32, 32] rows of 32, fine
  r["passes"][1]["attention"] = "int4:g32:sym";
  r["output"].erase("type");
  expect_clean_failure(run_recipe_file(dir, "notype", r), "output.type: required for output.format gguf");
  r["output"] = {{"path", (dir / "out" / "m").string()}, {"type", "q8_0"}};
  expect_clean_failure(run_recipe_file(dir, "hftype", r), "output.type: GGUF only");
  EXPECT_FALSE(fs::exists(out.parent_path()));
}

// The hf folder's keys a GGUF file has no use for are refused before any work (a dry run too):
// max_shard_size (one file, nothing to cut) and materialize (the types are output.type's), naming
// the JSON path in a recipe and the flag on a command; nothing written.
TEST(RecipeSink, GgufRefusesShardSizeAndMaterialize) {
  TempDir dir{"moe-sink"};
  const fs::path model = synth_with_calib_tokenizer(dir);
  const fs::path out = dir / "out" / "m.gguf";
  for (const auto& [key, value] : {std::pair<std::string, json>{"max_shard_size", "1MB"}, {"materialize", true}}) {
    SCOPED_TRACE(key);
    json r = sink_recipe(model, {{"path", out.string()}, {"format", "gguf"}, {"type", "q8_0"}, {key, value}});
    for (const std::vector<std::string>& extra : {std::vector<std::string>{}, {"--dry-run"}}) {
      const RunResult res = run_recipe_file(dir, key, r, extra);
      expect_clean_failure(res, key + ".json: output." + key + ": output.format gguf ");
    }
    const std::string flag = key == "max_shard_size" ? "--max-shard-size" : "--materialize";
    std::vector<std::string> args = {"-q", "prune", model.string(), out.string(), "--method", "random", "--keep", "3",
                                     "--format", "gguf", "--gguf-type", "q8_0", flag};
    if (key == "max_shard_size") args.push_back("1MB");
    expect_clean_failure(run_tool(args), flag + ": --format gguf ");
    EXPECT_FALSE(fs::exists(out.parent_path()));
  }
}

// The packed folders are safetensors shards: output.max_shard_size cuts them (it was ignored,
// every packed output one shard up to 5GB), a tensor never split; the report counts them.
TEST(RecipeSink, PackedFolderHonoursMaxShardSize) {
  TempDir dir{"moe-sink"};
  const fs::path model = synth_with_calib_tokenizer(dir);
  const fs::path out = dir / "out" / "ct";
  const RunResult r = run_recipe_file(
      dir, "sharded", sink_recipe(model, {{"path", out.string()}, {"format", "compressed-tensors"}, {"max_shard_size", "100KB"}}));
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json rep = read_json(out / "moe_tool_report.json");
  const size_t shards = rep.at("output").at("shards").get<size_t>();
  EXPECT_GT(shards, 1u);
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(out))
    if (e.path().extension() == ".safetensors") ++files;
  EXPECT_EQ(files, shards);
  EXPECT_TRUE(fs::exists(out / "model.safetensors.index.json"));
  EXPECT_EQ(read_json(out / "config.json").at("quantization_config").at("format"), "pack-quantized");
}

// A refusal only the values decide (GPTQ's v1 layout cannot store a zero point of 0: here every
// gate projection is made non-negative, so min-max groups get zero point 0) comes after the passes
// ran: exit 2, one line naming the run's output (not the staged temporary), and neither the staged
// native output nor the output is left behind.
TEST(RecipeSink, RefusalAfterStagingLeavesNothing) {
  TempDir dir{"moe-sink"};
  const fs::path model = synth_with_calib_tokenizer(dir);
  // Clear the sign bit of every bf16 value of the experts' w1 in model.safetensors.
  const fs::path st = model / "model.safetensors";
  std::string bytes = read_file(st);
  uint64_t n = 0;
  for (int b = 7; b >= 0; --b) n = (n << 8) | static_cast<uint8_t>(bytes[static_cast<size_t>(b)]);
  const json header = json::parse(bytes.substr(8, n));
  int changed = 0;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__" || name.find(".w1.weight") == std::string::npos) continue;
    const auto off = info.at("data_offsets");
    for (uint64_t p = 8 + n + off[0].get<uint64_t>() + 1; p < 8 + n + off[1].get<uint64_t>(); p += 2) bytes[p] &= 0x7f;
    ++changed;
  }
  ASSERT_GT(changed, 0);
  write_file(st, bytes);
  json r = sink_recipe(model, {{"path", (dir / "out" / "g").string()}, {"format", "gptq"}});
  r["passes"] = json::array({{{"pass", "quantize"}, {"method", "rtn"}, {"codec", "int4:g32:asym"}}});
  const RunResult res = run_recipe_file(dir, "zero", r);
  expect_clean_failure(res, "zero point 0");
  EXPECT_NE(res.err.find("the native output staged for " + (dir / "out" / "g").string()), std::string::npos) << res.err;
  EXPECT_EQ(res.err.find("moe-tool-tmp"), std::string::npos) << res.err;
  EXPECT_FALSE(fs::exists(dir / "out"));  // the parent the run made is removed with the staged output
}

}  // namespace
}  // namespace moe::test
