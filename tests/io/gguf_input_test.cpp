// GGUF files as model inputs (io/gguf_model.h, docs/gguf.md "GGUF as an input"): the fixtures
// exported to GGUF by `moe-tool export` and read back as models. F32 exports evaluate exactly as
// the source folders; Q8_0 weights are the blocks' decode (experts viewed per slice, q/k rows
// un-permuted); the tokenizer rebuilt from tokenizer.ggml.* tokenizes as the source's; inspect runs;
// a truncated file and an unknown architecture are refused with one line naming the file and key.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/error.h"
#include "eval/eval.h"
#include "io/checkpoint.h"
#include "io/env.h"
#include "io/gguf.h"
#include "io/gguf_model.h"
#include "model/gguf_write.h"
#include "model/model.h"
#include "support/ckpt_util.h"
#include "support/cli_expect.h"
#include "support/paths.h"
#include "support/run.h"
#include "support/synth.h"
#include "tokenizer/pretokenize.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// llama4-tiny with the attention llama.cpp's llama4 graph computes (attention_chunk_size,
// floor_scale 8192, attn_scale 0.1): the fixture's own 8 / 4 / 0.2 are refused by the export.
fs::path llama4_llamacpp() {
  static TempDir dir{"moe-gguf-llama4"};
  const fs::path to = dir / "llama4-tiny";
  if (!fs::exists(to))
    copy_with_config(kSrc / "data/llama4-tiny", to, {{"attention_chunk_size", 8192}, {"floor_scale", 8192}, {"attn_scale", 0.1}});
  return to;
}

// phimoe-tiny as llama.cpp's phimoe computes it, with a longrope RoPE (phimoe_llamacpp_patch).
fs::path phimoe_llamacpp() {
  static TempDir dir{"moe-gguf-phimoe"};
  const fs::path to = dir / "phimoe-tiny";
  if (!fs::exists(to)) copy_with_config(kSrc / "data/phimoe-tiny", to, phimoe_llamacpp_patch());
  return to;
}

// data/models/<model>, else data/<model> (granitemoe-tiny); llama4-tiny as llama4_llamacpp,
// phimoe-tiny as phimoe_llamacpp.
fs::path fixture(const std::string& model) {
  if (model == "llama4-tiny") return llama4_llamacpp();
  if (model == "phimoe-tiny") return phimoe_llamacpp();
  const fs::path p = kSrc / "data/models" / model;
  return fs::exists(p) ? p : kSrc / "data" / model;
}

// The fixture exported once per test binary run (each export is a fraction of a second).
// glm4-moe-tiny's down projections have rows of 16 (the expert width): f16 in a block-type export.
fs::path exported(const std::string& model, const std::string& type) {
  static TempDir dir{"moe-gguf-in"};
  const fs::path out = dir / (model + "-" + type + ".gguf");
  if (!fs::exists(out)) {
    std::vector<std::string> args = {"-q", "export", fixture(model).string(), out.string(), "--type", type};
    if (model == "glm4-moe-tiny" && type != "f32") args.insert(args.end(), {"--tensor-type", "ffn_down_(exps|shexp)=f16"});
    // granitemoe-tiny's experts are 16 wide: down projection rows narrower than a block stay f16.
    if ((model == "granitemoe-tiny" || model == "qwen3_next-tiny" || model == "phimoe-tiny") && type != "f32")
      args.insert(args.end(), {"--tensor-type", "ffn_down_exps=f16"});
    // llama4-tiny: experts and shared expert 16 wide.
    if (model == "llama4-tiny" && type != "f32") args.insert(args.end(), {"--tensor-type", "ffn_down_(exps|shexp)=f16"});
    // deepseek-v3-tiny's attn_k_b rows are qk_nope_head_dim (16) wide.
    if (model == "deepseek-v3-tiny" && type != "f32") args.insert(args.end(), {"--tensor-type", "attn_k_b=f16"});
    // gpt-oss-tiny's experts are 16 wide (its MXFP4 twin's experts are copied as MXFP4 blocks whatever the type).
    if (model == "gpt-oss-tiny" && type != "f32") args.insert(args.end(), {"--tensor-type", "ffn_down_exps=f16"});
    const RunResult r = run_tool(args);
    EXPECT_EQ(r.exit_code, 0) << r.describe();
  }
  return out;
}

// Whether a source tensor belongs to a multi-token-prediction layer (past num_hidden_layers), which
// the export leaves out (docs/gguf.md).
bool mtp_tensor(const io::Checkpoint& src, const std::string& name) {
  const std::string prefix = "model.layers.";
  if (name.rfind(prefix, 0) != 0) return false;
  return std::stoll(name.substr(prefix.size())) >= src.config().at("num_hidden_layers").get<int64_t>();
}

json eval_json(const fs::path& model) {
  const RunResult r = run_tool({"-q", "eval", model.string(), "--text", (kSrc / "data/text/heldout.txt").string(), "--ctx",
                                "64", "--max-windows", "8", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  return json::parse(r.out);
}

class GgufInput : public ::testing::TestWithParam<std::string> {};

// F32 GGUF: every weight is the source's bf16 value exactly, so eval scores the same NLL.
TEST_P(GgufInput, F32EvaluatesAsTheSourceFolder) {
  MOE_SKIP_UNDER_SANITIZERS();
  const json src = eval_json(fixture(GetParam())), gg = eval_json(exported(GetParam(), "f32"));
  ASSERT_EQ(gg.at("tokens_scored"), src.at("tokens_scored"));
  const double a = src.at("nll_sum").get<double>(), b = gg.at("nll_sum").get<double>();
  EXPECT_GT(a, 0);
  EXPECT_NEAR(b, a, 1e-6 * a);
}

// A folder written from a GGUF input carries the tokenizer the GGUF held as metadata: convert
// (F32 kept f32) gives a folder that evaluates exactly as the GGUF itself.
TEST_P(GgufInput, FolderOutputCarriesTheTokenizerAndEvaluatesTheSame) {
  TempDir tmp{"moe-gguf-folder"};
  const fs::path out = tmp / "m";
  const RunResult r = run_tool({"-q", "convert", exported(GetParam(), "f32").string(), out.string(), "--dtype", "f32"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_TRUE(fs::exists(out / "tokenizer.json"));
  EXPECT_TRUE(fs::exists(out / "tokenizer_config.json"));
  const json a = eval_json(exported(GetParam(), "f32")), b = eval_json(out);
  ASSERT_EQ(a.at("tokens_scored"), b.at("tokens_scored"));
  EXPECT_EQ(a.at("nll_sum").get<double>(), b.at("nll_sum").get<double>());
}

// The source's `v` as GgufArch::centre_residual writes it (centred: token_embd and attn_output.bias
// by rows, attn_output and ffn_down by columns), else as it is.
std::vector<float> as_written(const model::FamilyDesc& fam, const std::string& name, std::vector<float> v, const core::Shape& shape) {
  if (!fam.gguf || !fam.gguf->centre_residual) return v;
  const bool rows_mean = name.ends_with("embed_tokens.weight") || name.ends_with("o_proj.bias");
  if (!rows_mean && !name.ends_with("o_proj.weight") && !name.ends_with(".w2.weight")) return v;
  const size_t cols = static_cast<size_t>(shape.back()), rows = v.size() / cols;
  return centred(std::move(v), rows, cols, rows_mean);
}

// Equal, or within 1e-6 of the largest magnitude (a centred tensor: the same sums in another order).
void expect_values(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  float scale = 0;
  for (float w : want) scale = std::max(scale, std::abs(w));
  for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-6f * scale) << i;
}

// F32 GGUF read as a checkpoint: every tensor of the source under its own name, values equal
// (q/k rows un-permuted for arch llama and granitemoe, experts sliced out of the stacked tensors;
// phimoe's residual writers centred: as_written).
// granitemoe's fused experts (input_linear [E,2I,H], output_linear [E,H,I]) are stored split, as
// llama.cpp's converter splits them: the loaded models' experts are compared instead.
TEST_P(GgufInput, F32TensorsEqualTheSource) {
  auto& env = io::Env::posix();
  const auto src = io::Checkpoint::open(env, fixture(GetParam()));
  const auto gg = io::Checkpoint::open(env, exported(GetParam(), "f32"));
  ASSERT_NE(gg.gguf(), nullptr);
  const auto m = model::Model::load(gg), ms = model::Model::load(src);
  const auto& fam = ms.family();
  size_t kept = 0, fused = 0;
  for (const auto& name : src.names()) {
    if (mtp_tensor(src, name)) continue;
    ++kept;
    SCOPED_TRACE(name);
    // gpt_oss's expert biases are fused as the weights (gate_up_proj_bias [E,2I], down_proj_bias [E,H]).
    if (fam.fused() && (name.ends_with(fam.fused_gate_up) || name.ends_with(fam.fused_down) ||
                        (!fam.fused_gate_up_bias.empty() && (name.ends_with(fam.fused_gate_up_bias) || name.ends_with(fam.fused_down_bias))))) {
      ++fused;
      continue;
    }
    ASSERT_TRUE(gg.has(name));
    const core::Tensor a = src.tensor(name), b = gg.tensor(name);
    ASSERT_EQ(b.shape(), a.shape());
    if (name.ends_with(".A_log")) {  // stored as -exp(A_log), read back as log(-A): to an f32 rounding
      const auto va = a.to_f32(), vb = b.to_f32();
      for (size_t i = 0; i < va.size(); ++i) EXPECT_NEAR(vb[i], va[i], 2e-7 * std::max(1.0f, std::abs(va[i]))) << i;
      continue;
    }
    if (fam.gguf->centre_residual) {
      expect_values(b.to_f32(), as_written(fam, name, a.to_f32(), a.shape()));
      continue;
    }
    EXPECT_EQ(b.to_f32(), a.to_f32());
  }
  int64_t E = 0;
  for (const auto& layer : ms.layers())
    if (layer.moe) E = layer.moe->num_experts();
  // 2 fused tensors -> 3 per expert (gpt_oss: their 2 biases -> 3 more)
  EXPECT_EQ(gg.names().size(), kept + fused / 2 * static_cast<size_t>(3 * E - 2));
  for (const auto& layer : ms.layers()) {
    if (!layer.moe || static_cast<size_t>(layer.index) >= m.layers().size()) continue;  // dense and MTP layers
    for (size_t e = 0; e < static_cast<size_t>(E); ++e) {
      const model::Mlp &a = layer.moe->experts[e], &b = m.layers()[static_cast<size_t>(layer.index)].moe->experts[e];
      SCOPED_TRACE("layer " + std::to_string(layer.index) + " expert " + std::to_string(e));
      EXPECT_EQ(b.gate.to_f32(), a.gate.to_f32());
      EXPECT_EQ(b.up.to_f32(), a.up.to_f32());
      if (fam.gguf->centre_residual)
        expect_values(b.down.to_f32(), as_written(fam, ".w2.weight", a.down.to_f32(), a.down.shape()));
      else
        EXPECT_EQ(b.down.to_f32(), a.down.to_f32());
      ASSERT_EQ(b.has_bias(), a.has_bias());
      if (a.has_bias()) {
        EXPECT_EQ(b.gate_bias->to_f32(), a.gate_bias->to_f32());
        EXPECT_EQ(b.up_bias->to_f32(), a.up_bias->to_f32());
        EXPECT_EQ(b.down_bias->to_f32(), a.down_bias->to_f32());
        EXPECT_EQ(b.act, a.act);
      }
    }
  }
  EXPECT_EQ(m.config().json().at("rms_norm_eps"), src.config().at("rms_norm_eps"));
  EXPECT_EQ(m.config().json().at("rope_theta"), src.config().at("rope_theta"));
  // granitemoe's multipliers come back as config.json gave them (ARCH.embedding_scale, ...).
  if (fam.scalar_multipliers) {
    for (const char* k : {"embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"})
      EXPECT_EQ(m.config().json().at(k), src.config().at(k)) << k;
  }
}

// Q8_0: the model's weights are the decode of the file's blocks (quant::decode_row), expert e of a
// stacked tensor its e-th slice, without a copy of the file's bytes.
TEST_P(GgufInput, Q8WeightsAreTheBlocksDecode) {
  auto& env = io::Env::posix();
  const fs::path path = exported(GetParam(), "q8_0");
  const auto ck = io::Checkpoint::open(env, path);
  const auto m = model::Model::load(ck);
  const io::GgufFile& f = ck.gguf()->file();
  const io::GgufTensorInfo* gate = f.find_tensor("blk.1.ffn_gate_exps.weight");
  ASSERT_NE(gate, nullptr);
  ASSERT_EQ(gate->type, quant::GgmlType::Q8_0);
  const std::vector<float> all = f.decode(*gate);
  const int64_t E = gate->ne[2], per = gate->ne[0] * gate->ne[1];
  ASSERT_EQ(m.layers()[1].moe->num_experts(), E);
  for (int64_t e = 0; e < E; ++e) {
    const core::Tensor& t = m.layers()[1].moe->experts[e].gate;
    const auto* enc = dynamic_cast<const quant::GgufBlocks*>(t.encoding());
    ASSERT_NE(enc, nullptr);
    EXPECT_EQ(enc->bytes().data(), f.tensor_data(*gate) + e * (gate->nbytes() / E));  // a view, not a copy
    const std::vector<float> got = t.to_f32();
    EXPECT_TRUE(std::equal(got.begin(), got.end(), all.begin() + e * per)) << "expert " << e;
  }
  // q rows: our row i is the file's row whose converter source row is i (the first layer with
  // attention: qwen3next's layers 0-2 are linear attention).
  // MLA: q_b_proj, not permuted.
  const bool mla = m.family().gguf->mla;
  const std::string qname = mla ? ".attn_q_b.weight" : ".attn_q.weight";
  size_t ql = 0;
  while (ql < m.layers().size() && !f.find_tensor("blk." + std::to_string(ql) + qname)) ++ql;
  ASSERT_LT(ql, m.layers().size());
  const io::GgufTensorInfo* q = f.find_tensor("blk." + std::to_string(ql) + qname);
  const std::vector<float> qf = f.decode(*q), ours = m.layers()[ql].tensors.at(mla ? "q_b_proj" : "q_proj").to_f32();
  const int64_t rows = q->ne[1], cols = q->ne[0];
  const bool permuted = m.family().gguf->permute_qk;
  const int64_t heads = m.dims().heads;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = permuted ? io::gguf_permuted_source_row(r, heads, rows) : r;
    ASSERT_TRUE(std::equal(qf.begin() + r * cols, qf.begin() + (r + 1) * cols, ours.begin() + i * cols)) << "row " << r;
  }
}

// The tokenizer rebuilt from tokenizer.ggml.* gives the source tokenizer's ids.
TEST_P(GgufInput, TokenizerAsTheSource) {
  const auto a = eval::load_tokenizer(fixture(GetParam()));
  const auto b = eval::load_tokenizer(exported(GetParam(), "q8_0"));
  const std::string text = eval::read_text(kSrc / "data/text/heldout.txt").substr(0, 20000) + " <|endoftext|> x";
  EXPECT_EQ(b.encode(text, true), a.encode(text, true));
  EXPECT_EQ(b.encode(text, true, true), a.encode(text, true, true));
  EXPECT_EQ(b.eos_id(), a.eos_id());
  EXPECT_EQ(b.adds_bos(), a.adds_bos());
}

TEST_P(GgufInput, InspectRuns) {
  const RunResult r = run_tool({"inspect", exported(GetParam(), "q8_0").string(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json j = json::parse(r.out);
  EXPECT_EQ(j.at("family"), model::Model::load(io::Checkpoint::open(io::Env::posix(), fixture(GetParam()))).family().model_type);
  EXPECT_EQ(j.at("experts_per_layer"), 8);
  // Every stored byte of the file's tensors, the q8_0 blocks as U8.
  const auto f = io::GgufFile::open(io::Env::posix(), exported(GetParam(), "q8_0"));
  uint64_t bytes = 0, blocks = 0;
  for (const auto& t : f.tensors()) {
    bytes += t.nbytes();
    // MLA: kv_b_proj is read as F32 rebuilt from attn_k_b (f16 here) and attn_v_b, stored after it.
    if (t.type == quant::GgmlType::Q8_0 && !t.name.ends_with("attn_v_b.weight")) blocks += t.nbytes();
  }
  EXPECT_EQ(j.at("bytes_total"), bytes);
  EXPECT_EQ(j.at("bytes_by_dtype").at("U8"), blocks);
}

// The test name of a fixture: "glm4-moe-tiny" -> "glm4moe", "ernie4_5_moe-tiny" -> "ernie45moe".
std::string fixture_test_name(const ::testing::TestParamInfo<std::string>& i) {
  std::string n = i.param.substr(0, i.param.find("-tiny"));
  std::erase_if(n, [](char c) { return c == '-' || c == '_'; });
  return n;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GgufInput,
                         ::testing::Values("mixtral-tiny", "qwen2moe-tiny", "glm4-moe-tiny", "granitemoe-tiny",
                                           "ernie4_5_moe-tiny", "qwen3_next-tiny", "llama4-tiny",
                                           "deepseek-v3-tiny", "gpt-oss-tiny", "phimoe-tiny"),
                         fixture_test_name);

// A copy of the Q8_0 export with `n` bytes, or with `from` replaced by `to` (same length).
fs::path altered(const TempDir& dir, const std::string& name, size_t keep, const std::string& from = "",
                 const std::string& to = "") {
  std::ifstream in(exported("mixtral-tiny", "q8_0"), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!from.empty()) {
    const auto pos = bytes.find(from);
    EXPECT_NE(pos, std::string::npos);
    bytes.replace(pos, from.size(), to);
  }
  const fs::path p = dir / name;
  std::ofstream(p, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(std::min(keep, bytes.size())));
  return p;
}

// Prune of a GGUF model written as GGUF: kept experts' blocks byte for byte, router rows kept,
// every other tensor's bytes unchanged, expert_count the kept count; the file reads back as a model.
TEST(GgufInputPrune, KeptExpertsCopiedByteForByte) {
  auto& env = io::Env::posix();
  const fs::path in = exported("qwen2moe-tiny", "q8_0");
  const auto ck = io::Checkpoint::open(env, in);
  auto m = model::Model::load(ck);
  const std::vector<int64_t> keep = {6, 0, 3};  // any order: the output follows the model's
  for (auto& layer : m.layers()) {
    auto& b = *layer.moe;
    std::vector<model::Mlp> kept;
    for (int64_t e : keep) kept.push_back(b.experts[static_cast<size_t>(e)]);
    b.experts = kept;
    b.router = b.router.take_rows(keep);
  }
  TempDir dir{"moe-gguf-prune"};
  const fs::path out = dir / "pruned.gguf";
  const uint64_t size = model::write_gguf_like(env, m, *ck.gguf(), out);
  EXPECT_EQ(size, fs::file_size(out));
  const auto a = io::GgufFile::open(env, in), b = io::GgufFile::open(env, out);
  EXPECT_EQ(b.find("qwen2moe.expert_count")->integer, 3u);
  EXPECT_EQ(b.find("qwen2moe.expert_used_count")->integer, 2u);
  ASSERT_EQ(b.tensors().size(), a.tensors().size());
  int stacked = 0;
  for (size_t i = 0; i < a.tensors().size(); ++i) {
    const auto &ta = a.tensors()[i], &tb = b.tensors()[i];
    SCOPED_TRACE(ta.name);
    ASSERT_EQ(tb.name, ta.name);
    EXPECT_EQ(tb.type, ta.type);
    const uint8_t *pa = a.tensor_data(ta), *pb = b.tensor_data(tb);
    if (ta.name.find("_exps.") != std::string::npos) {
      ++stacked;
      ASSERT_EQ(tb.ne[2], 3);
      const uint64_t slice = ta.nbytes() / static_cast<uint64_t>(ta.ne[2]);
      for (size_t k = 0; k < keep.size(); ++k)
        EXPECT_TRUE(std::equal(pb + k * slice, pb + (k + 1) * slice, pa + keep[k] * slice)) << "kept expert " << keep[k];
    } else if (ta.name.find("ffn_gate_inp.") != std::string::npos) {
      ASSERT_EQ(tb.ne[1], 3);
      const uint64_t row = ta.nbytes() / static_cast<uint64_t>(ta.ne[1]);
      for (size_t k = 0; k < keep.size(); ++k)
        EXPECT_TRUE(std::equal(pb + k * row, pb + (k + 1) * row, pa + keep[k] * row)) << "router row " << keep[k];
    } else {
      ASSERT_EQ(tb.ne, ta.ne);
      EXPECT_TRUE(std::equal(pb, pb + tb.nbytes(), pa));
    }
  }
  EXPECT_EQ(stacked, 12);
  const auto back = model::Model::load(io::Checkpoint::open(env, out));
  EXPECT_EQ(back.layers()[2].moe->num_experts(), 3);
}

// granitemoe (fused experts, read from GGUF as views of the split stacked tensors): `prune
// --format gguf` of its Q8_0 export (down projections f16) keeps 3 experts, each with its gate, up
// and down blocks copied from one input expert's slices, every other tensor's bytes unchanged, and
// the file reads back as a model that evaluates.
TEST(GgufInputPrune, GraniteQ8PruneReadsBack) {
  auto& env = io::Env::posix();
  const fs::path in = exported("granitemoe-tiny", "q8_0");
  TempDir dir{"moe-gguf-prune-granite"};
  const fs::path out = dir / "pruned.gguf";
  const RunResult r = run_tool({"-q", "prune", in.string(), out.string(), "--method", "random", "--keep", "3", "--seed", "4",
                                "--format", "gguf"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto a = io::GgufFile::open(env, in), b = io::GgufFile::open(env, out);
  EXPECT_EQ(b.find("granitemoe.expert_count")->integer, 3u);
  EXPECT_EQ(b.find("granitemoe.expert_used_count")->integer, 3u);
  EXPECT_NE(b.find("granitemoe.residual_scale"), nullptr);
  for (int layer = 0; layer < 2; ++layer) {
    auto slice = [&](const io::GgufFile& f, const char* what, int64_t e) {
      const io::GgufTensorInfo* t = f.find_tensor("blk." + std::to_string(layer) + "." + what + ".weight");
      EXPECT_EQ(t->type, std::string(what) == "ffn_down_exps" ? quant::GgmlType::F16 : quant::GgmlType::Q8_0);
      const uint64_t n = t->nbytes() / static_cast<uint64_t>(t->ne[2]);
      return std::string(reinterpret_cast<const char*>(f.tensor_data(*t)) + e * n, n);
    };
    for (int64_t k = 0; k < 3; ++k) {
      int64_t from = -1;
      for (int64_t e = 0; e < 8 && from < 0; ++e)
        if (slice(b, "ffn_gate_exps", k) == slice(a, "ffn_gate_exps", e)) from = e;
      ASSERT_GE(from, 0) << "layer " << layer << " kept expert " << k;
      EXPECT_EQ(slice(b, "ffn_up_exps", k), slice(a, "ffn_up_exps", from));
      EXPECT_EQ(slice(b, "ffn_down_exps", k), slice(a, "ffn_down_exps", from));
    }
  }
  // Every other tensor as stored, the q/k biases permuted back to the converter's order included.
  for (const auto& ta : a.tensors()) {
    if (ta.name.find("_exps.") != std::string::npos || ta.name.find("ffn_gate_inp.") != std::string::npos) continue;
    const io::GgufTensorInfo* tb = b.find_tensor(ta.name);
    ASSERT_NE(tb, nullptr) << ta.name;
    ASSERT_EQ(tb->nbytes(), ta.nbytes()) << ta.name;
    EXPECT_TRUE(std::equal(b.tensor_data(*tb), b.tensor_data(*tb) + tb->nbytes(), a.tensor_data(ta))) << ta.name;
  }
  const auto back = model::Model::load(io::Checkpoint::open(env, out));
  EXPECT_EQ(back.layers()[1].moe->num_experts(), 3);
  EXPECT_GT(eval_json(out).at("nll_sum").get<double>(), 0);
}

// `prune --format gguf` of a GGUF input: the file equals model::write_gguf_like of the input with
// the kept experts the same prune writes into a folder (so every kept expert's blocks and router
// rows are the input's, as the test above checks); what would change a weight or need a type is
// refused before any work, nothing written.
TEST(GgufInputPrune, PruneCommandCopiesTheInputsBlocks) {
  auto& env = io::Env::posix();
  const fs::path in = exported("qwen2moe-tiny", "q8_0");
  TempDir dir{"moe-gguf-prune-cli"};
  const fs::path out = dir / "pruned.gguf", folder = dir / "pruned", ref = dir / "reference.gguf";
  const std::vector<std::string> prune = {"-q", "prune", in.string(), "", "--method", "random", "--keep", "3", "--seed", "4"};
  auto run = [&](const fs::path& to, std::vector<std::string> extra) {
    std::vector<std::string> a = prune;
    a[3] = to.string();
    a.insert(a.end(), extra.begin(), extra.end());
    return run_tool(a);
  };
  const RunResult r = run(out, {"--format", "gguf", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const json summary = json::parse(r.out);
  EXPECT_EQ(summary.at("output_format").at("format"), "gguf");
  EXPECT_EQ(summary.at("output_format").at("types").at("q8_0").get<int>(), 42);  // the input's 42 q8_0 tensors, stacked experts sliced
  // Without --format the prune follows its input: the same file; run again, it asks for --force
  // (a file, not a folder) and replaces the file with it.
  const fs::path implied = dir / "implied.gguf";
  ASSERT_EQ(run(implied, {}).exit_code, 0);
  EXPECT_TRUE(read_file(implied) == read_file(out));
  expect_clean_failure(run(implied, {}), "output file exists (use --force");
  ASSERT_EQ(run(implied, {"--force"}).exit_code, 0);
  EXPECT_TRUE(read_file(implied) == read_file(out));
  // An hf option keeps the input's format out: a folder, which a .gguf name does not fit.
  expect_clean_failure(run(dir / "sharded.gguf", {"--max-shard-size", "100KB"}),
                       "a .gguf name, but the output is a folder (format hf): output: format hf, the weights dequantized "
                       "(--max-shard-size is an hf option; --format gguf keeps the input's blocks)");
  EXPECT_FALSE(fs::exists(dir / "sharded.gguf"));
  ASSERT_EQ(run(folder, {"--format", "hf"}).exit_code, 0);
  const json report = json::parse(std::ifstream(folder / "moe_tool_report.json"));
  const auto ck = io::Checkpoint::open(env, in);
  auto m = model::Model::load(ck);
  for (auto& layer : m.layers()) {
    const json& kept = report.at("layers").at(static_cast<size_t>(layer.index)).at("passes").at(0).at("kept");
    const std::vector<int64_t> keep = kept.get<std::vector<int64_t>>();
    ASSERT_EQ(keep.size(), 3u);
    auto& b = *layer.moe;
    std::vector<model::Mlp> experts;
    for (int64_t e : keep) experts.push_back(b.experts[static_cast<size_t>(e)]);
    b.experts = experts;
    b.router = b.router.take_rows(keep);
  }
  model::write_gguf_like(env, m, *ck.gguf(), ref);
  std::ifstream fa(out, std::ios::binary), fb(ref, std::ios::binary);
  const std::string a{std::istreambuf_iterator<char>(fa), {}}, b{std::istreambuf_iterator<char>(fb), {}};
  EXPECT_EQ(a.size(), b.size());
  EXPECT_TRUE(a == b) << "the CLI's GGUF differs from write_gguf_like of the same keep-maps";
  // Refusals, before any work.
  const fs::path none = dir / "none.gguf";
  expect_clean_failure(run(none, {"--format", "gguf", "--gguf-type", "q4_0"}), "--gguf-type: a GGUF input's blocks are copied as they are stored");
  expect_clean_failure(run(none, {"--format", "gguf", "--dtype", "f32"}), "a GGUF input's blocks are copied as they are stored");
  expect_clean_failure(run_tool({"-q", "merge", in.string(), none.string(), "--method", "msmoe", "--experts", "4", "--text",
                                 (kSrc / "data/text/calib.txt").string(), "--format", "gguf"}),
                       "of a GGUF input takes prune passes only");
  expect_clean_failure(run_tool({"-q", "quantize", in.string(), none.string(), "--method", "rtn", "--codec", "int4:g32:sym",
                                 "--format", "gguf"}),
                       "of a GGUF input takes prune passes only");
  expect_clean_failure(run_tool({"-q", "prune", in.string(), none.string(), "--method", "random", "--keep-ratio", "0.5",
                                 "--no-uniform", "--format", "gguf"}),
                       "--no-uniform: layers would keep different expert counts");
  // export converts folders; a GGUF input is pointed to prune (blocks copied) or convert.
  expect_clean_failure(run_tool({"export", in.string(), none.string(), "--type", "q8_0"}),
                       in.string() + ": already a GGUF file; export converts a folder");
  EXPECT_FALSE(fs::exists(none));
}

// Families with a leading dense layer and a choice bias (glm4moe, ernie4_5-moe, deepseek2): a Q8_0 export
// pruned to 3 experts as GGUF keeps the dense layer's tensors, the kept experts' exp_probs_b
// entries and stacked slices, and drops glm4moe's expert groups (blocks of the input's experts, as
// a folder output writes n_group 1); the file reads back and evaluates.
class GgufInputPruneDense : public ::testing::TestWithParam<std::string> {};

TEST_P(GgufInputPruneDense, KeepsTheDenseLayerAndTheKeptExpertsBias) {
  auto& env = io::Env::posix();
  const fs::path in = exported(GetParam(), "q8_0");
  TempDir dir{"moe-gguf-prune-dense"};
  const fs::path out = dir / "pruned.gguf", folder = dir / "pruned";
  auto prune = [&](const fs::path& to, const std::string& format) {
    return run_tool({"-q", "prune", in.string(), to.string(), "--method", "random", "--keep", "3", "--seed", "4", "--format", format});
  };
  ASSERT_EQ(prune(out, "gguf").exit_code, 0);
  ASSERT_EQ(prune(folder, "hf").exit_code, 0);  // the same keep-maps, in its report
  const json report = json::parse(std::ifstream(folder / "moe_tool_report.json"));
  const auto src = io::GgufFile::open(env, in), f = io::GgufFile::open(env, out);
  const std::string A = src.find("general.architecture")->as_string("a");
  EXPECT_EQ(f.find(A + ".expert_count")->as_int("c"), 3);
  if (A == "glm4moe" || A == "deepseek2") {
    EXPECT_NE(src.find(A + ".expert_group_count"), nullptr);
  }
  EXPECT_EQ(f.find(A + ".expert_group_count"), nullptr);
  EXPECT_EQ(f.find(A + ".expert_group_used_count"), nullptr);
  EXPECT_EQ(f.find(A + ".leading_dense_block_count")->as_int("l"), 1);
  for (const char* dense : {"blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"})
    EXPECT_EQ(f.decode(*f.find_tensor(dense)), src.decode(*src.find_tensor(dense))) << dense;
  if (A == "deepseek2")  // kv_b_proj's stored halves, copied as stored
    for (const char* mla : {"blk.1.attn_k_b.weight", "blk.2.attn_v_b.weight"})
      EXPECT_EQ(f.decode(*f.find_tensor(mla)), src.decode(*src.find_tensor(mla))) << mla;
  for (const int layer : {1, 2}) {
    SCOPED_TRACE(layer);
    const std::vector<int64_t> keep =
        report.at("layers").at(static_cast<size_t>(layer)).at("passes").at(0).at("kept").get<std::vector<int64_t>>();
    ASSERT_EQ(keep.size(), 3u);
    const std::string blk = "blk." + std::to_string(layer) + ".";
    const auto bias = f.decode(*f.find_tensor(blk + "exp_probs_b.bias")), all = src.decode(*src.find_tensor(blk + "exp_probs_b.bias"));
    ASSERT_EQ(bias.size(), 3u);
    const auto gate = f.decode(*f.find_tensor(blk + "ffn_gate_exps.weight")), gall = src.decode(*src.find_tensor(blk + "ffn_gate_exps.weight"));
    const size_t per = gate.size() / 3;
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_EQ(bias[i], all[static_cast<size_t>(keep[i])]) << "expert " << keep[i];
      EXPECT_TRUE(std::equal(gate.begin() + i * per, gate.begin() + (i + 1) * per, gall.begin() + keep[i] * per));
    }
  }
  const json e = eval_json(out);
  EXPECT_GT(e.at("nll_sum").get<double>(), 0);
}

// `in` pruned by `prune --method random --keep K --seed 4` twice: as GGUF (`out`) and as a folder
// (`folder`, whose report names each layer's kept experts).
struct PrunedTwice {
  fs::path out, folder;
  json report;
  // The experts layer `layer` kept.
  std::vector<int64_t> kept(int layer) const {
    return report.at("layers").at(static_cast<size_t>(layer)).at("passes").at(0).at("kept").get<std::vector<int64_t>>();
  }
};
PrunedTwice prune_twice(const fs::path& in, const TempDir& dir, int keep) {
  PrunedTwice p{dir / "pruned.gguf", dir / "pruned", {}};
  for (const auto& [to, format] : {std::pair{p.out, "gguf"}, {p.folder, "hf"}}) {
    const RunResult r = run_tool({"-q", "prune", in.string(), to.string(), "--method", "random", "--keep", std::to_string(keep),
                                  "--seed", "4", "--format", format});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
  }
  p.report = read_json(p.folder / "moe_tool_report.json");
  return p;
}

// Stacked tensor `name` of the pruned file `f`: the slices of the `keep` experts of `src`'s, in
// order, of the same type.
void expect_kept_slices(const io::GgufFile& f, const io::GgufFile& src, const std::string& name, const std::vector<int64_t>& keep) {
  SCOPED_TRACE(name);
  const io::GgufTensorInfo* t = f.find_tensor(name);
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->type, src.find_tensor(name)->type);
  ASSERT_EQ(t->ne.back(), static_cast<int64_t>(keep.size()));
  const auto got = f.decode(*t), all = src.decode(*src.find_tensor(name));
  const size_t per = got.size() / keep.size();
  for (size_t i = 0; i < keep.size(); ++i)
    EXPECT_TRUE(std::equal(got.begin() + i * per, got.begin() + (i + 1) * per, all.begin() + keep[i] * per)) << "expert " << keep[i];
}

// llama4: a Q8_0 export pruned to 3 experts as GGUF keeps the interleaved dense layers (0, 2), the
// shared experts and the rope_freqs divisors as stored, the kept experts' slices; the file reads
// back and evaluates near the same pruning written as a (bf16) folder.
TEST(GgufInputPrune, Llama4KeepsDenseLayersSharedExpertsAndRopeFreqs) {
  auto& env = io::Env::posix();
  const fs::path in = exported("llama4-tiny", "q8_0");
  TempDir dir{"moe-gguf-prune-llama4"};
  const PrunedTwice p = prune_twice(in, dir, 3);
  const auto src = io::GgufFile::open(env, in), f = io::GgufFile::open(env, p.out);
  EXPECT_EQ(f.find("llama4.expert_count")->as_int("c"), 3);
  EXPECT_EQ(f.find("llama4.interleave_moe_layer_step")->as_int("s"), 2);
  EXPECT_EQ(f.tensors().size(), src.tensors().size());
  std::vector<std::string> same = {"rope_freqs.weight"};
  for (const char* dense : {"ffn_gate", "ffn_up", "ffn_down"})
    for (const char* layer : {"blk.0.", "blk.2."}) same.push_back(std::string(layer) + dense + ".weight");
  for (const char* shexp : {"ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"})
    for (const char* layer : {"blk.1.", "blk.3."}) same.push_back(std::string(layer) + shexp + ".weight");
  for (const auto& name : same) {
    ASSERT_NE(f.find_tensor(name), nullptr) << name;
    EXPECT_EQ(f.decode(*f.find_tensor(name)), src.decode(*src.find_tensor(name))) << name;
  }
  for (const int layer : {1, 3})
    for (const char* t : {"ffn_gate_exps.weight", "ffn_down_exps.weight"})
      expect_kept_slices(f, src, "blk." + std::to_string(layer) + "." + t, p.kept(layer));
  // Evaluates (the folder holds the same pruning dequantized to bf16, so its figure is near, not equal).
  const json a = eval_json(p.out), b = eval_json(p.folder);
  EXPECT_GT(a.at("nll_sum").get<double>(), 0);
  EXPECT_NEAR(a.at("nll_sum").get<double>(), b.at("nll_sum").get<double>(), 1e-2 * b.at("nll_sum").get<double>());
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GgufInputPruneDense, ::testing::Values("glm4-moe-tiny", "ernie4_5_moe-tiny", "deepseek-v3-tiny"),
                         fixture_test_name);

// gpt-oss-tiny-mxfp4 (MXFP4 experts, tied embeddings): its export holds the experts as MXFP4 blocks
// (copied from the checkpoint's codes), read back as such (the blocks decoded, views of the file),
// and evaluates exactly as the folder (the same values: E2M1 codes times powers of two); the tied
// embedding written twice reads back untied with the same rows.
TEST(GgufInputGptOss, Mxfp4ExportEvaluatesAsTheSourceFolder) {
  MOE_SKIP_UNDER_SANITIZERS();
  auto& env = io::Env::posix();
  const fs::path in = exported("gpt-oss-tiny-mxfp4", "f32");
  const auto ck = io::Checkpoint::open(env, in);
  const auto m = model::Model::load(ck), ms = model::Model::load(io::Checkpoint::open(env, fixture("gpt-oss-tiny-mxfp4")));
  for (size_t l = 0; l < 2; ++l)
    for (size_t e = 0; e < 8; ++e) {
      const model::Mlp &a = ms.layers()[l].moe->experts[e], &b = m.layers()[l].moe->experts[e];
      const auto* enc = dynamic_cast<const quant::GgufBlocks*>(b.gate.encoding());
      ASSERT_NE(enc, nullptr);
      EXPECT_EQ(enc->type(), quant::GgmlType::MXFP4);
      EXPECT_EQ(b.gate.to_f32(), a.gate.to_f32());
      EXPECT_EQ(b.up.to_f32(), a.up.to_f32());
      EXPECT_EQ(b.down.to_f32(), a.down.to_f32());
      EXPECT_EQ(b.gate_bias->to_f32(), a.gate_bias->to_f32());
      EXPECT_EQ(b.down_bias->to_f32(), a.down_bias->to_f32());
    }
  EXPECT_EQ(m.globals().at("lm_head").to_f32(), ms.globals().at("embed").to_f32());
  const json a = eval_json(fixture("gpt-oss-tiny-mxfp4")), b = eval_json(in);
  ASSERT_EQ(b.at("tokens_scored"), a.at("tokens_scored"));
  EXPECT_NEAR(b.at("nll_sum").get<double>(), a.at("nll_sum").get<double>(), 1e-6 * a.at("nll_sum").get<double>());
  // The config read back: layer_types from llama.cpp's pattern, the window, yarn as the source's.
  const json c = m.config().json(), sc = ms.config().json();
  EXPECT_EQ(c.at("layer_types"), sc.at("layer_types"));
  EXPECT_EQ(c.at("sliding_window"), sc.at("sliding_window"));
  for (const char* k : {"rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate"})
    EXPECT_EQ(c.at("rope_scaling").at(k), sc.at("rope_scaling").at(k)) << k;
}

// gpt-oss GGUF-to-GGUF prune (the MXFP4 export, 5 of 8 experts kept; top-k 4): the kept experts' MXFP4 slices,
// expert biases ([I, E] / [H, E] columns) and router-bias entries (ffn_gate_inp.bias) are copied;
// the file reads back and evaluates as the folder pruned with the same keep-maps.
TEST(GgufInputGptOss, PruneKeepsTheKeptExpertsBiases) {
  auto& env = io::Env::posix();
  const fs::path in = exported("gpt-oss-tiny-mxfp4", "f32");
  TempDir dir{"moe-gguf-prune-gptoss"};
  const PrunedTwice p = prune_twice(in, dir, 5);
  const auto src = io::GgufFile::open(env, in), f = io::GgufFile::open(env, p.out);
  EXPECT_EQ(f.find("gpt-oss.expert_count")->as_int("c"), 5);
  EXPECT_EQ(f.find("gpt-oss.expert_used_count")->as_int("c"), 4);
  for (const int layer : {0, 1})
    for (const char* name : {"ffn_gate_inp.bias", "ffn_gate_exps.bias", "ffn_up_exps.bias", "ffn_down_exps.bias",
                             "ffn_gate_exps.weight", "ffn_down_exps.weight"})
      expect_kept_slices(f, src, "blk." + std::to_string(layer) + "." + name, p.kept(layer));
  const json a = eval_json(p.out), b = eval_json(p.folder);
  ASSERT_EQ(a.at("tokens_scored"), b.at("tokens_scored"));
  EXPECT_NEAR(a.at("nll_sum").get<double>(), b.at("nll_sum").get<double>(), 1e-6 * b.at("nll_sum").get<double>());
}

// The plan of a GGUF-to-GGUF prune counts the file it will write (blocks copied), not a dequantized
// output: --dry-run's bytes.after is the run's bytes.after exactly (the tensors' data), disk.needs
// the written file's size exactly (nothing staged without an evaluation), and no "larger than its
// input" warning. With --eval the native output is staged (dequantized) and the disk check counts it.
TEST(GgufInputPrune, DryRunCountsTheCopiedBlocks) {
  const fs::path in = exported("qwen2moe-tiny", "q8_0");
  TempDir dir{"moe-gguf-prune-plan"};
  const fs::path out = dir / "pruned.gguf";
  auto run = [&](std::vector<std::string> extra) {
    std::vector<std::string> a = {"-q", "prune", in.string(), out.string(), "--method", "random", "--keep", "3",
                                  "--seed", "4", "--format", "gguf", "--json"};
    a.insert(a.end(), extra.begin(), extra.end());
    const RunResult r = run_tool(a);
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return json::parse(r.out);
  };
  const json dry = run({"--dry-run"});
  EXPECT_FALSE(fs::exists(out));
  const json real = run({});
  const uint64_t file = fs::file_size(out);
  EXPECT_EQ(dry.at("bytes").at("after"), real.at("bytes").at("after"));
  EXPECT_EQ(dry.at("disk").at("needs").get<uint64_t>(), file);
  EXPECT_NEAR(dry.at("bytes").at("after").get<double>(), static_cast<double>(file), 0.06 * static_cast<double>(file));
  EXPECT_LT(dry.at("bytes").at("after").get<uint64_t>(), dry.at("bytes").at("before").get<uint64_t>());
  for (const auto& w : dry.at("warnings")) EXPECT_EQ(w.get<std::string>().find("larger than its input"), std::string::npos) << w;
  EXPECT_FALSE(real.at("output_format").contains("staged")) << real.at("output_format");  // nothing dequantized
  const json dry_eval = run({"--dry-run", "--force", "--eval", (kSrc / "data/text/heldout.txt").string()});
  EXPECT_GT(dry_eval.at("disk").at("needs").get<uint64_t>(), file + real.at("bytes").at("after").get<uint64_t>());
  const json with_eval = run({"--force", "--eval", (kSrc / "data/text/heldout.txt").string(), "--eval-ctx", "32",
                              "--eval-max-windows", "2"});
  EXPECT_TRUE(with_eval.at("output_format").contains("staged"));
  EXPECT_EQ(fs::file_size(out), file);  // the same file either way
  EXPECT_TRUE(temp_leftovers(dir.path()).empty());
}

// Sets the f16 scale at the start of every expert's first block of the stacked tensor `tensor` (of
// type `type`) in the GGUF file `path` to NaN: whichever experts a prune keeps, one of its blocks is
// non-finite.
void nan_scale_in_every_expert(const fs::path& path, const std::string& tensor, quant::GgmlType type) {
  const auto f = io::GgufFile::open(io::Env::posix(), path);
  const io::GgufTensorInfo* t = f.find_tensor(tensor);
  ASSERT_NE(t, nullptr);
  ASSERT_EQ(t->type, type);
  const uint64_t slice = t->nbytes() / static_cast<uint64_t>(t->ne[2]);
  std::fstream io(path, std::ios::in | std::ios::out | std::ios::binary);
  for (int64_t e = 0; e < t->ne[2]; ++e) {
    io.seekp(static_cast<std::streamoff>(f.data_offset() + t->offset + static_cast<uint64_t>(e) * slice));
    io.write("\x00\x7e", 2);  // f16 NaN
  }
}

// Blocks copied from a GGUF input are checked for NaN/Inf as every written tensor is: a kept
// expert's q8_0 scale set to NaN is refused with one line naming the input and the tensor, nothing
// written (whether or not the native output is staged).
TEST(GgufInputPrune, NanScaleInACopiedBlockRefused) {
  TempDir dir{"moe-gguf-prune-nan"};
  const fs::path in = dir / "nan.gguf";
  fs::copy_file(exported("qwen2moe-tiny", "q8_0"), in);
  ASSERT_NO_FATAL_FAILURE(nan_scale_in_every_expert(in, "blk.2.ffn_up_exps.weight", quant::GgmlType::Q8_0));
  const fs::path out = dir / "out.gguf";
  for (const std::vector<std::string>& extra : {std::vector<std::string>{}, {"--eval", (kSrc / "data/text/heldout.txt").string()}}) {
    std::vector<std::string> a = {"-q", "prune", in.string(), out.string(), "--method", "random", "--keep", "3", "--format", "gguf"};
    a.insert(a.end(), extra.begin(), extra.end());
    const RunResult r = run_tool(a);
    // Copied: the GGUF tensor; staged for the evaluation: the dequantized expert, caught first.
    expect_clean_failure(r, extra.empty() ? "tensor blk.2.ffn_up_exps.weight (copied from the input): non-finite"
                                          : "model.layers.2.mlp.experts.");
    EXPECT_NE(r.err.find(in.string()), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(out));
    EXPECT_TRUE(temp_leftovers(dir.path()).empty());
  }
}

// An IQ4_NL model: qwen2moe-tiny's Q4_0 export with every Q4_0 tensor's type id set to IQ4_NL (20),
// whose blocks have the same size ({f16 d; u8 qs[16]}), so the same bytes are now indices into
// IQ4_NL's non-linear grid. Each decoded value is d * grid[code] of its block; inspect and eval
// read the file; prune to GGUF copies the kept experts' blocks byte for byte, and a NaN scale in
// a kept IQ4_NL block is refused naming the tensor.
TEST(GgufInputPrune, Iq4NlModelIsReadAndPruned) {
  auto& env = io::Env::posix();
  TempDir dir{"moe-gguf-iq4nl"};
  const fs::path in = dir / "iq4nl.gguf";
  {
    std::ifstream is(exported("qwen2moe-tiny", "q4_0"), std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(is)), std::istreambuf_iterator<char>());
    const auto f = io::GgufFile::open(env, exported("qwen2moe-tiny", "q4_0"));
    int retyped = 0;
    for (const auto& t : f.tensors()) {
      if (t.type != quant::GgmlType::Q4_0) continue;
      // The tensor info: name (u64 length, bytes), n_dims (u32), dims (u64 each), type (u32).
      const size_t at = bytes.find(t.name + std::string(1, static_cast<char>(t.ne.size())));
      ASSERT_NE(at, std::string::npos) << t.name;
      const size_t type_at = at + t.name.size() + 4 + 8 * t.ne.size();
      ASSERT_EQ(bytes[type_at], 2) << t.name;  // q4_0
      bytes[type_at] = 20;                      // iq4_nl
      ++retyped;
    }
    EXPECT_GE(retyped, 30);
    std::ofstream(in, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  constexpr int kGrid[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
  const auto f = io::GgufFile::open(env, in);
  const io::GgufTensorInfo* t = f.find_tensor("blk.1.ffn_up_exps.weight");
  ASSERT_NE(t, nullptr);
  ASSERT_EQ(t->type, quant::GgmlType::IQ4_NL);
  const std::vector<float> y = f.decode(*t);
  const uint8_t* b = f.tensor_data(*t);
  for (size_t blk = 0; blk < y.size() / 32; ++blk, b += 18) {
    uint16_t h;
    std::memcpy(&h, b, 2);
    const float d = core::f16_to_f32(h);
    for (int j = 0; j < 32; ++j) {
      const int q = j < 16 ? b[2 + j] & 0xF : b[2 + j - 16] >> 4;
      ASSERT_EQ(y[blk * 32 + static_cast<size_t>(j)], d * static_cast<float>(kGrid[q])) << "block " << blk << " value " << j;
    }
  }

  RunResult r = run_tool({"-q", "inspect", in.string(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("iq4_nl"), std::string::npos);
  const json e = eval_json(in);
  EXPECT_TRUE(std::isfinite(e.at("perplexity").get<double>())) << e.dump();

  const fs::path out = dir / "pruned.gguf";
  r = run_tool({"-q", "prune", in.string(), out.string(), "--method", "random", "--keep", "3", "--format", "gguf"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto p = io::GgufFile::open(env, out);
  const io::GgufTensorInfo* pt = p.find_tensor("blk.1.ffn_up_exps.weight");
  ASSERT_NE(pt, nullptr);
  EXPECT_EQ(pt->type, quant::GgmlType::IQ4_NL);
  EXPECT_EQ(pt->ne[2], 3);
  const uint64_t slice = t->nbytes() / static_cast<uint64_t>(t->ne[2]);
  for (int64_t k = 0; k < 3; ++k) {  // each kept expert is one of the input's, bytes equal
    const uint8_t* kept = p.tensor_data(*pt) + static_cast<uint64_t>(k) * slice;
    bool found = false;
    for (int64_t e2 = 0; e2 < t->ne[2] && !found; ++e2)
      found = std::equal(kept, kept + slice, f.tensor_data(*t) + static_cast<uint64_t>(e2) * slice);
    EXPECT_TRUE(found) << "kept expert " << k;
  }

  ASSERT_NO_FATAL_FAILURE(nan_scale_in_every_expert(in, "blk.1.ffn_up_exps.weight", quant::GgmlType::IQ4_NL));
  const fs::path out2 = dir / "pruned-nan.gguf";
  r = run_tool({"-q", "prune", in.string(), out2.string(), "--method", "random", "--keep", "3", "--format", "gguf"});
  expect_clean_failure(r, "tensor blk.1.ffn_up_exps.weight (copied from the input): non-finite");
  EXPECT_FALSE(fs::exists(out2));
}

// A NaN scale in a q row of arch llama (written in the converter's order, gathered from the loaded
// rows): refused naming the tensor and the file's row, nothing written.
TEST(GgufInputPrune, NanScaleInAPermutedRowRefused) {
  TempDir dir{"moe-gguf-prune-nan-q"};
  const fs::path in = dir / "nan.gguf";
  fs::copy_file(exported("mixtral-tiny", "q8_0"), in);
  {
    const auto f = io::GgufFile::open(io::Env::posix(), in);
    const io::GgufTensorInfo* t = f.find_tensor("blk.1.attn_q.weight");
    ASSERT_NE(t, nullptr);
    ASSERT_EQ(t->type, quant::GgmlType::Q8_0);
    const uint64_t rb = quant::ggml_row_bytes(t->type, t->ne[0]);
    std::fstream io(in, std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(static_cast<std::streamoff>(f.data_offset() + t->offset + 5 * rb + 34));  // row 5, second block
    io.write("\x00\x7e", 2);                                                           // f16 NaN
  }
  const fs::path out = dir / "out.gguf";
  const RunResult r = run_tool({"-q", "prune", in.string(), out.string(), "--method", "random", "--keep", "3", "--format", "gguf"});
  expect_clean_failure(r, "tensor blk.1.attn_q.weight (copied from the input): non-finite value in row 5 at column 32");
  EXPECT_NE(r.err.find(in.string()), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(out));
  EXPECT_TRUE(temp_leftovers(dir.path()).empty());
}

// The q/k rows of arch llama go back to the converter's order: a write of the unchanged model is
// the source file's tensors byte for byte.
TEST(GgufInputPrune, UnchangedLlamaModelWritesTheSameBytes) {
  auto& env = io::Env::posix();
  const fs::path in = exported("mixtral-tiny", "q8_0");
  const auto ck = io::Checkpoint::open(env, in);
  const auto m = model::Model::load(ck);
  TempDir dir{"moe-gguf-same"};
  model::write_gguf_like(env, m, *ck.gguf(), dir / "same.gguf");
  const auto a = io::GgufFile::open(env, in), b = io::GgufFile::open(env, dir / "same.gguf");
  for (size_t i = 0; i < a.tensors().size(); ++i) {
    const auto &ta = a.tensors()[i], &tb = b.tensors()[i];
    ASSERT_EQ(tb.ne, ta.ne) << ta.name;
    EXPECT_TRUE(std::equal(b.tensor_data(tb), b.tensor_data(tb) + tb.nbytes(), a.tensor_data(ta))) << ta.name;
  }
  // A weight a pass changed is refused, naming it, and nothing is written.
  auto changed = m;
  changed.layers()[0].tensors.at("o_proj") = core::Tensor::from_f32(changed.layers()[0].tensors.at("o_proj").to_f32(),
                                                                     changed.layers()[0].tensors.at("o_proj").shape());
  try {
    model::write_gguf_like(env, changed, *ck.gguf(), dir / "changed.gguf");
    ADD_FAILURE() << "not refused";
  } catch (const core::Error& e) {
    EXPECT_NE(std::string(e.what()).find("blk.0.attn_output.weight: changed by a pass"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir / "changed.gguf"));
}

// deepseek2: attn_k_b / attn_v_b are copied as stored, so an unchanged model writes them byte for
// byte and a kv_b_proj a pass changed is refused, naming the tensor; nothing is written.
TEST(GgufInputPrune, MlaKvBChangedByAPassIsRefused) {
  auto& env = io::Env::posix();
  const fs::path in = exported("deepseek-v3-tiny", "q8_0");
  const auto ck = io::Checkpoint::open(env, in);
  const auto m = model::Model::load(ck);
  TempDir dir{"moe-gguf-mla"};
  model::write_gguf_like(env, m, *ck.gguf(), dir / "same.gguf");
  const auto a = io::GgufFile::open(env, in), b = io::GgufFile::open(env, dir / "same.gguf");
  for (const char* name : {"blk.1.attn_k_b.weight", "blk.1.attn_v_b.weight"}) {
    const auto &ta = *a.find_tensor(name), &tb = *b.find_tensor(name);
    EXPECT_TRUE(std::equal(b.tensor_data(tb), b.tensor_data(tb) + tb.nbytes(), a.tensor_data(ta))) << name;
  }
  auto changed = m;
  std::vector<float> w = changed.layers()[1].tensors.at("kv_b_proj").to_f32();
  w[0] += 1.0f;
  changed.layers()[1].tensors.at("kv_b_proj") = core::Tensor::from_f32(w, changed.layers()[1].tensors.at("kv_b_proj").shape());
  try {
    model::write_gguf_like(env, changed, *ck.gguf(), dir / "changed.gguf");
    ADD_FAILURE() << "not refused";
  } catch (const core::Error& e) {
    EXPECT_NE(std::string(e.what()).find("blk.1.attn_k_b.weight: kv_b_proj changed by a pass"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir / "changed.gguf"));
}

// A copy of GGUF `in` at `out` with `edit` applied to its metadata and tensor list; the tensors
// left in the list are copied as stored.
void rewrite_gguf(const fs::path& in, const fs::path& out,
                  const std::function<void(io::GgufMetadata&, std::vector<io::GgufTensorInfo>&)>& edit) {
  auto& env = io::Env::posix();
  const auto f = io::GgufFile::open(env, in);
  io::GgufMetadata kv = f.metadata();
  std::vector<io::GgufTensorInfo> ts = f.tensors();
  edit(kv, ts);
  io::GgufWriter w(env, out, kv, ts);
  for (const auto& t : ts) w.append(f.tensor_data(*f.find_tensor(t.name)), f.find_tensor(t.name)->nbytes());
  w.finish();
}

// A copy of data/<fixture> at `to` whose tokenizer.json pre_tokenizer is `splits` (each an Isolated
// Split), then ByteLevel.
void copy_with_splits(const std::string& fixture, const fs::path& to, const std::vector<std::string>& splits) {
  copy_folder(kSrc / "data" / fixture, to);
  json tj = read_json(to / "tokenizer.json");
  json steps = json::array();
  for (const auto& r : splits) steps.push_back({{"type", "Split"}, {"pattern", {{"Regex", r}}}, {"behavior", "Isolated"}, {"invert", false}});
  steps.push_back(tj["pre_tokenizer"]["pretokenizers"].back());  // ByteLevel
  tj["pre_tokenizer"]["pretokenizers"] = steps;
  write_file(to / "tokenizer.json", tj.dump());
}

// Named pre-tokenizers beyond the fixtures' qwen2: o200k (gpt-oss's and Llama 4's tokenizer.json)
// exported as llama.cpp's "gpt-4o", DeepSeek-V3's three Splits as "deepseek-v3"; each read back
// from its name with the same regexes (the text, capitals inside words, digit runs and CJK
// included, tokenizes as the source's; a folder written from the file carries the Splits); a file
// naming o200k "llama4" (llama.cpp's converter for Llama 4) is read the same. Splits no name has are
// refused: exit 2, one line, nothing written.
TEST(GgufInputTokenizer, NamedPreTokenizersWrittenAndReadBack) {
  TempDir dir{"moe-gguf-pre"};
  const std::string o200k =
      "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
      "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
      "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
  const std::vector<std::string> deepseek = {
      "\\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|"
      "\\s*[\r\n]+|\\s+(?!\\S)|\\s+"};
  const std::string text = eval::read_text(kSrc / "data/text/heldout.txt").substr(0, 20000) +
                           " CamelCaseWords HTTPServer 1234567 it'S 東京とカタカナ 한국\r\n\n  x";
  struct Case {
    std::string fixture, name;
    std::vector<std::string> splits;
  };
  for (const Case& c : {Case{"gpt-oss-tiny", "gpt-4o", {o200k}}, Case{"deepseek-v3-tiny", "deepseek-v3", deepseek}}) {
    SCOPED_TRACE(c.name);
    const fs::path src = dir / c.name, out = dir / (c.name + ".gguf"), folder = dir / (c.name + "-folder");
    copy_with_splits(c.fixture, src, c.splits);
    ASSERT_EQ(run_tool({"-q", "export", src.string(), out.string(), "--type", "f32"}).exit_code, 0);
    const auto f = io::GgufFile::open(io::Env::posix(), out);
    EXPECT_EQ(f.find("tokenizer.ggml.pre")->as_string("p"), c.name);
    const auto ids = eval::load_tokenizer(src).encode(text, true);
    EXPECT_EQ(eval::load_tokenizer(out).encode(text, true), ids);
    // The Splits taken back by name (these fixtures' vocabularies have no merge across the pieces
    // where the regexes cut differently, so the ids alone would not tell).
    ASSERT_EQ(run_tool({"-q", "convert", out.string(), folder.string(), "--dtype", "f32"}).exit_code, 0);
    std::vector<std::string> back;
    const json written = read_json(folder / "tokenizer.json");
    for (const auto& st : written.at("pre_tokenizer").at("pretokenizers"))
      if (st.at("type") == "Split") back.push_back(st.at("pattern").at("Regex").get<std::string>());
    EXPECT_EQ(back, c.splits);
    if (c.name != "gpt-4o") continue;
    // "llama4" names the same pre-tokenizer.
    std::string bytes = read_file(out);
    const std::string from = std::string("\x06\x00\x00\x00\x00\x00\x00\x00gpt-4o", 14), to = std::string("\x06\x00\x00\x00\x00\x00\x00\x00llama4", 14);
    const auto pos = bytes.find(from);
    ASSERT_NE(pos, std::string::npos);
    bytes.replace(pos, from.size(), to);
    write_file(dir / "l4.gguf", bytes);
    EXPECT_EQ(eval::load_tokenizer(dir / "l4.gguf").encode(text, true), ids);
  }
  // DeepSeek-V3's Splits in another order, and o200k's with a Split before it: no name.
  copy_with_splits("deepseek-v3-tiny", dir / "order", {deepseek[1], deepseek[0], deepseek[2]});
  copy_with_splits("gpt-oss-tiny", dir / "extra", {"\\p{N}{1,3}", o200k});
  for (const char* bad : {"order", "extra"}) {
    expect_clean_failure(run_tool({"export", (dir / bad).string(), (dir / (std::string(bad) + ".gguf")).string(), "--type", "f32"}),
                         "tokenizer.json: pre_tokenizer: its Split regexes are none llama.cpp knows by name here (qwen2, llama-bpe, "
                         "gpt-2, olmo, gpt-4o, llama4, deepseek-v3); llama.cpp would tokenize differently");
    EXPECT_FALSE(fs::exists(dir / (std::string(bad) + ".gguf")));
  }
}

// A SentencePiece-style tokenizer (data/tokenizer-sp: Metaspace "▁", byte_fallback BPE, as
// transformers converts Llama 2's / Mistral's) on mixtral-tiny: exported as llama.cpp's "llama"
// vocabulary (each piece scored minus the rank of the first merge that makes it, the merges' own
// order; unk / control / byte types; add_space_prefix), read back into a tokenizer that tokenizes
// as the source's (spaces, digits, bytes outside the vocabulary) and, on text starting with a space,
// as llama.cpp (the legacy form); the legacy form (normalizer Prepend + Replace, no pre_tokenizer)
// is the same vocabulary; a repeated merge takes its later rank. Refused at export: a piece no
// merge makes, an added token whose id is another piece; when read (tokenize, convert): token types
// llama.cpp does not have, a byte type on another piece, a non-bool add_space_prefix.
TEST(GgufInputTokenizer, SentencePieceWrittenAsLlamaAndReadBack) {
  TempDir dir{"moe-gguf-spm"};
  const fs::path src = dir / "src", legacy = dir / "legacy", out = dir / "s.gguf", out2 = dir / "l.gguf";
  for (const fs::path& d : {src, legacy}) {
    copy_folder(kSrc / "data/models/mixtral-tiny", d);
    for (const char* name : {"tokenizer.json", "tokenizer_config.json"})
      fs::copy_file(kSrc / "data/tokenizer-sp" / name, d / name, fs::copy_options::overwrite_existing);
    fs::remove(d / "special_tokens_map.json");
  }
  json tj = read_json(legacy / "tokenizer.json");
  tj["pre_tokenizer"] = nullptr;
  tj["normalizer"] = {{"type", "Sequence"},
                      {"normalizers", {{{"type", "Prepend"}, {"prepend", "\u2581"}},
                                       {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\u2581"}}}}};
  write_file(legacy / "tokenizer.json", tj.dump());
  ASSERT_EQ(run_tool({"-q", "export", src.string(), out.string(), "--type", "f32"}).exit_code, 0);
  ASSERT_EQ(run_tool({"-q", "export", legacy.string(), out2.string(), "--type", "f32"}).exit_code, 0);
  const auto f = io::GgufFile::open(io::Env::posix(), out);
  EXPECT_EQ(f.find("tokenizer.ggml.model")->as_string("m"), "llama");
  EXPECT_EQ(f.find("tokenizer.ggml.pre"), nullptr);
  EXPECT_EQ(f.find("tokenizer.ggml.merges"), nullptr);
  EXPECT_EQ(f.find("tokenizer.ggml.add_space_prefix")->integer, 1u);
  EXPECT_EQ(f.find("tokenizer.ggml.unknown_token_id")->as_int("u"), 0);
  const auto& tokens = f.find("tokenizer.ggml.tokens")->items;
  const auto& scores = f.find("tokenizer.ggml.scores")->items;
  const auto& types = f.find("tokenizer.ggml.token_type")->items;
  ASSERT_EQ(scores.size(), tokens.size());
  const json src_tj = read_json(src / "tokenizer.json");
  const auto& vocab = src_tj.at("model").at("vocab");
  const auto& merges = src_tj.at("model").at("merges");
  // The first merge ("▁" + "t") makes score -1; "he" (the second) -2; a character no merge makes 0.
  EXPECT_EQ(scores[vocab.at(merges[0][0].get<std::string>() + merges[0][1].get<std::string>()).get<size_t>()].as_double("s"), -1.0);
  EXPECT_EQ(scores[vocab.at(merges[1][0].get<std::string>() + merges[1][1].get<std::string>()).get<size_t>()].as_double("s"), -2.0);
  EXPECT_EQ(scores[vocab.at("e").get<size_t>()].as_double("s"), 0.0);
  EXPECT_EQ(types[0].as_int("t"), 2);                                      // <unk>
  EXPECT_EQ(types[1].as_int("t"), 3);                                      // <s>
  EXPECT_EQ(types[vocab.at("<0x41>").get<size_t>()].as_int("t"), 6);       // a byte
  EXPECT_EQ(types[vocab.at("e").get<size_t>()].as_int("t"), 1);
  EXPECT_EQ(types.back().as_int("t"), 5);                                  // padding up to the embedding rows
  // (No special token inside the text: after one, the legacy form prepends "▁" again, as
  // llama.cpp does, and Metaspace's prepend_scheme "first" does not: docs/gguf.md.)
  const std::string text = eval::read_text(kSrc / "data/text/heldout.txt").substr(0, 20000) + " 12345 ünïcödé 東京 x  y\n\n z";
  const auto ids = eval::load_tokenizer(src).encode(text, true);
  EXPECT_EQ(eval::load_tokenizer(out).encode(text, true), ids);
  EXPECT_EQ(eval::load_tokenizer(out2).encode(text, true), ids);
  EXPECT_EQ(eval::load_tokenizer(legacy).encode(text, true), ids);
  // The GGUF's metadata is the same for both forms.
  const auto g = io::GgufFile::open(io::Env::posix(), out2);
  EXPECT_EQ(g.find("tokenizer.ggml.scores")->items.size(), scores.size());
  const auto& scores2 = g.find("tokenizer.ggml.scores")->items;
  for (size_t i = 0; i < scores.size(); ++i) ASSERT_EQ(scores2[i].as_double("s"), scores[i].as_double("s")) << i;
  // Read back as llama.cpp tokenizes: "▁" before the text even where it starts with a space (the
  // legacy form; Metaspace's "first" adds none there: docs/gguf.md).
  for (const std::string t : {" x", "  leading spaces"})
    EXPECT_EQ(eval::load_tokenizer(out).encode(t, true), eval::load_tokenizer(legacy).encode(t, true)) << t;
  // A repeated merge takes its later rank, as the BPE does.
  const fs::path dup = dir / "dup";
  copy_folder(src, dup);
  json dj = read_json(dup / "tokenizer.json");
  dj["model"]["merges"].push_back(dj["model"]["merges"][0]);
  write_file(dup / "tokenizer.json", dj.dump());
  ASSERT_EQ(run_tool({"-q", "export", dup.string(), (dir / "dup.gguf").string(), "--type", "f32"}).exit_code, 0);
  EXPECT_EQ(eval::load_tokenizer(dir / "dup.gguf").encode(text, true), eval::load_tokenizer(dup).encode(text, true));
  // Refused at export: a piece of several characters no merge makes (llama.cpp would join it), an
  // added token whose id is another vocabulary piece.
  const fs::path orphan = dir / "orphan", clash = dir / "clash";
  copy_folder(src, orphan);
  json oj = read_json(orphan / "tokenizer.json");
  oj["model"]["vocab"]["xq"] = oj["model"]["vocab"].size();  // a new id past the others
  write_file(orphan / "tokenizer.json", oj.dump());
  expect_clean_failure(run_tool({"export", orphan.string(), (dir / "o.gguf").string(), "--type", "f32"}),
                       "model.vocab: piece 'xq' (id 1000) is made by no merge: llama.cpp's SentencePiece tokenizer would still join it");
  copy_folder(kSrc / "data/gpt-oss-tiny", clash);
  json cj = read_json(clash / "tokenizer.json");
  cj["added_tokens"].push_back({{"id", 100}, {"content", "zzqq"}, {"special", false}, {"normalized", false}, {"lstrip", false},
                                {"rstrip", false}, {"single_word", false}});
  write_file(clash / "tokenizer.json", cj.dump());
  expect_clean_failure(run_tool({"export", clash.string(), (dir / "c.gguf").string(), "--type", "f32"}),
                       "' with id 100, which is the vocabulary's '");
  EXPECT_FALSE(fs::exists(dir / "o.gguf"));
  EXPECT_FALSE(fs::exists(dir / "c.gguf"));
  // Refused when read (tokenize, and convert writes no folder): a token type llama.cpp does not
  // have, a byte type on a piece that is not <0xXX>, add_space_prefix that is not a bool.
  auto set = [&](const std::string& name, const std::function<void(io::GgufMetadata&)>& edit) {
    rewrite_gguf(out, dir / name, [&](io::GgufMetadata& kv, auto&) { edit(kv); });
  };
  auto type_of_token = [](io::GgufMetadata& kv, size_t id, int32_t ty) {
    for (auto& [k, v] : kv)
      if (k == "tokenizer.ggml.token_type") v.items[id] = io::GgufValue::i32(ty);
  };
  const size_t e = vocab.at("e").get<size_t>();
  set("t7.gguf", [&](auto& kv) { type_of_token(kv, e, 7); });
  set("t6.gguf", [&](auto& kv) { type_of_token(kv, e, 6); });
  set("asp.gguf", [](auto& kv) {
    for (auto& [k, v] : kv)
      if (k == "tokenizer.ggml.add_space_prefix") v = io::GgufValue::string("true");
  });
  // One token fewer than token_embd's rows (llama.cpp's loader refuses it too).
  const int64_t vocab_rows = f.find_tensor("token_embd.weight")->ne[1];
  set("short.gguf", [](auto& kv) {
    for (auto& [k, v] : kv)
      if (k == "tokenizer.ggml.tokens" || k == "tokenizer.ggml.token_type" || k == "tokenizer.ggml.scores") v.items.pop_back();
  });
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"short.gguf", "tokenizer.ggml.tokens: " + std::to_string(vocab_rows - 1) + " tokens, but token_embd.weight has " +
                         std::to_string(vocab_rows) + " rows"},
      {"t7.gguf", "tokenizer.ggml.token_type[" + std::to_string(e) + "]: 7 is not a token type read here"},
      {"t6.gguf", "tokenizer.ggml.token_type[" + std::to_string(e) + "]: 6 (byte) for 'e', which is not <0xXX>"},
      {"asp.gguf", "metadata key tokenizer.ggml.add_space_prefix: expected a bool"}};
  for (const auto& [name, message] : bad) {
    SCOPED_TRACE(name);
    const fs::path t = dir / "t.txt";
    write_file(t, "hello");
    expect_clean_failure(run_tool({"tokenize", (dir / name).string(), "--text", t.string()}), message);
    expect_clean_failure(run_tool({"convert", (dir / name).string(), (dir / (name + "-folder")).string(), "--dtype", "f32"}), message);
    EXPECT_FALSE(fs::exists(dir / (name + "-folder")));
  }
}

// RoPE keys llama.cpp's loader applies for every architecture, which the reader does not take into
// the model: refused naming the key, not read as a model llama.cpp does not run (a dense llama:
// rope.scaling.attn_factor, rope.scaling.factor without a type, rope.scale_linear; qwen2moe's yarn:
// betas other than 32 / 1, which its loader does not read, and an original context whose ratio to
// the context is not the factor, which transformers' yarn would use instead).
TEST(GgufInputRefusals, RopeKeysLlamaCppAppliesAreRefused) {
  TempDir dir{"moe-gguf-rope-keys"};
  const fs::path llama = dir / "llama.gguf", yarn_src = dir / "yarn", yarn = dir / "yarn.gguf";
  ASSERT_EQ(run_tool({"-q", "export", (kSrc / "data/models/llama-tiny").string(), llama.string(), "--type", "f32"}).exit_code, 0);
  copy_with_config(kSrc / "data/models/qwen2moe-tiny", yarn_src,
                   {{"rope_scaling", {{"type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 1024}}}});
  ASSERT_EQ(run_tool({"-q", "export", yarn_src.string(), yarn.string(), "--type", "f32"}).exit_code, 0);
  ASSERT_EQ(run_tool({"-q", "inspect", yarn.string()}).exit_code, 0);
  auto with = [&](const fs::path& in, const std::string& name, const std::string& key, const io::GgufValue& v) {
    rewrite_gguf(in, dir / name, [&](io::GgufMetadata& kv, auto&) {
      std::erase_if(kv, [&](const auto& e) { return e.first == key; });
      kv.emplace_back(key, v);
    });
    return dir / name;
  };
  const std::vector<std::pair<fs::path, std::string>> bad = {
      {with(llama, "attn.gguf", "llama.rope.scaling.attn_factor", io::GgufValue::f32(2)),
       "metadata key llama.rope.scaling.attn_factor: 2.0: llama.cpp applies it; not read here"},
      {with(llama, "factor.gguf", "llama.rope.scaling.factor", io::GgufValue::f32(2)),
       "metadata key llama.rope.scaling.factor: 2.0: llama.cpp applies it; not read here"},
      {with(llama, "linear.gguf", "llama.rope.scale_linear", io::GgufValue::f32(2)),
       "metadata key llama.rope.scale_linear: 2.0: llama.cpp applies it; not read here"},
      {with(yarn, "beta.gguf", "qwen2moe.rope.scaling.yarn_beta_fast", io::GgufValue::f32(16)),
       "qwen2moe.rope.scaling.yarn_beta_fast / yarn_beta_slow: 16.0 / 1.0"},
      {with(yarn, "orig.gguf", "qwen2moe.rope.scaling.original_context_length", io::GgufValue::u32(2048)),
       "qwen2moe.rope.scaling.original_context_length: 2048: context_length / it is not qwen2moe.rope.scaling.factor 4.0"},
  };
  for (const auto& [path, message] : bad) {
    SCOPED_TRACE(path.filename().string());
    expect_clean_failure(run_tool({"inspect", path.string()}), message);
  }
  // 1 is no scaling: read.
  EXPECT_EQ(run_tool({"-q", "inspect", with(llama, "one.gguf", "llama.rope.scaling.attn_factor", io::GgufValue::f32(1)).string()}).exit_code, 0);
}

// phimoe files our reader would read as another model than llama.cpp runs: attn_output.bias
// stored without the q/k/v biases (attention_bias covers all four), rope.scaling.attn_factor
// without the longrope divisors (llama.cpp applies it anyway), an original_context_length outside
// 1..context_length. Each refused in one line naming the file and the tensor or key.
TEST(GgufInputRefusals, PhimoeFilesReadOtherwiseThanLlamaCpp) {
  TempDir dir{"moe-gguf-phimoe-bad"};
  const fs::path in = exported("phimoe-tiny", "f32");
  auto drop = [](std::vector<io::GgufTensorInfo>& ts, const std::vector<std::string>& names) {
    std::erase_if(ts, [&](const io::GgufTensorInfo& t) { return std::find(names.begin(), names.end(), t.name) != names.end(); });
  };
  auto set_u32 = [](io::GgufMetadata& kv, const std::string& key, uint32_t v) {
    for (auto& [k, val] : kv)
      if (k == key) val = io::GgufValue::u32(v);
  };
  rewrite_gguf(in, dir / "bias.gguf", [&](auto&, auto& ts) { drop(ts, {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"}); });
  rewrite_gguf(in, dir / "factor.gguf", [&](auto&, auto& ts) { drop(ts, {"rope_factors_long.weight", "rope_factors_short.weight"}); });
  rewrite_gguf(in, dir / "orig0.gguf", [&](auto& kv, auto&) { set_u32(kv, "phimoe.rope.scaling.original_context_length", 0); });
  rewrite_gguf(in, dir / "orig_big.gguf", [&](auto& kv, auto&) { set_u32(kv, "phimoe.rope.scaling.original_context_length", 4096); });
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"bias.gguf", "bias.gguf: tensor blk.0.attn_q.bias: missing, but blk.0.attn_output.bias is stored (both or neither: attention_bias)"},
      {"factor.gguf", "factor.gguf: metadata key phimoe.rope.scaling.attn_factor: without rope_factors_long.weight and "
                      "rope_factors_short.weight (a longrope) it is not read here"},
      {"orig0.gguf", "orig0.gguf: metadata key phimoe.rope.scaling.original_context_length: 0, expected 1 to phimoe.context_length (256)"},
      {"orig_big.gguf", "orig_big.gguf: metadata key phimoe.rope.scaling.original_context_length: 4096, expected 1 to "
                        "phimoe.context_length (256)"}};
  for (const auto& [file, message] : cases) {
    SCOPED_TRACE(file);
    expect_clean_failure(run_tool({"inspect", (dir / file).string()}), message);
  }
}

// A ByteLevel pre-tokenizer with its own regex (use_regex true: GPT-2's, as OLMoE's GPT-NeoX
// tokenizer.json has it): exported as llama.cpp's "gpt-2", read back as that regex's Split before a
// ByteLevel without one, which tokenizes the same; a file naming it "olmo" (the converter's name
// for OLMo tokenizers) is read the same.
TEST(GgufInputTokenizer, ByteLevelRegexWrittenAsGpt2AndReadBack) {
  TempDir dir{"moe-gguf-gpt2"};
  const fs::path src = dir / "src", out = dir / "g.gguf", olmo = dir / "o.gguf";
  copy_folder(kSrc / "data/gpt-oss-tiny", src);
  json tj = read_json(src / "tokenizer.json");
  tj["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  write_file(src / "tokenizer.json", tj.dump());
  ASSERT_EQ(run_tool({"-q", "export", src.string(), out.string(), "--type", "f32"}).exit_code, 0);
  EXPECT_EQ(io::GgufFile::open(io::Env::posix(), out).find("tokenizer.ggml.pre")->as_string("p"), "gpt-2");
  rewrite_gguf(out, olmo, [](io::GgufMetadata& kv, auto&) {
    for (auto& [k, v] : kv)
      if (k == "tokenizer.ggml.pre") v = io::GgufValue::string("olmo");
  });
  const std::string text = eval::read_text(kSrc / "data/text/heldout.txt").substr(0, 20000) + " 1234567 it's   x\n\n  y ";
  const auto ids = eval::load_tokenizer(src).encode(text, true);
  EXPECT_EQ(eval::load_tokenizer(out).encode(text, true), ids);
  EXPECT_EQ(eval::load_tokenizer(olmo).encode(text, true), ids);
  // The regex is the tokenizer's own GPT-2 pattern.
  EXPECT_EQ(std::string(io::gguf_pre_tokenizer_splits("gpt-2")->front()), tokenizer::kGpt2Pattern);
}

TEST(GgufInputRefusals, TruncatedAndUnknownArchOneLine) {
  TempDir dir{"moe-gguf-bad"};
  const fs::path trunc = altered(dir, "trunc.gguf", 200000);
  RunResult r = run_tool({"inspect", trunc.string()});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  ASSERT_EQ(r.err_lines().size(), 1u) << r.err;
  EXPECT_NE(r.err.find(trunc.string()), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("truncated"), std::string::npos) << r.err;

  // "llama" as general.architecture (the u64 length 5, then the bytes) becomes "gemma".
  const fs::path arch = altered(dir, "arch.gguf", SIZE_MAX, std::string("\x05\0\0\0\0\0\0\0llama", 13),
                                std::string("\x05\0\0\0\0\0\0\0gemma", 13));
  for (const char* cmd : {"inspect", "eval"}) {
    std::vector<std::string> args = {cmd, arch.string()};
    if (std::string(cmd) == "eval") args.insert(args.end(), {"--text", (kSrc / "data/text/heldout.txt").string()});
    r = run_tool(args);
    EXPECT_EQ(r.exit_code, 2) << r.describe();
    ASSERT_EQ(r.err_lines().size(), 1u) << r.err;
    EXPECT_NE(r.err.find(arch.string()), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("general.architecture 'gemma'"), std::string::npos) << r.err;
  }

  // The Q8_0 export of `model` with the byte `skip` bytes after `name` (a key or tensor name in the
  // header) checked to be `type`, and `to` written `value_at` bytes after that byte: `inspect` of it
  // is refused in one line containing `name` + `message`.
  auto refused_when_patched = [&](const std::string& model, const std::string& name, size_t skip, char type, size_t value_at,
                                  const std::string& to, const std::string& file, const std::string& message) {
    SCOPED_TRACE(name);
    std::ifstream in(exported(model, "q8_0"), std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t at = bytes.find(name) + name.size() + skip;
    ASSERT_EQ(bytes[at], type);
    bytes.replace(at + value_at, to.size(), to);
    const fs::path p = dir / file;
    std::ofstream(p, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    const RunResult res = run_tool({"inspect", p.string()});
    EXPECT_EQ(res.exit_code, 2) << res.describe();
    ASSERT_EQ(res.err_lines().size(), 1u) << res.err;
    EXPECT_NE(res.err.find(name + message), std::string::npos) << res.err;
  };
  // A block type without a decoder: blk.0.ffn_down_exps.weight's type id (after its name, n_dims
  // and three u64 dims; 8, q8_0) set to iq2_xxs (16), whose rows of 256 are smaller than q8_0's.
  refused_when_patched("mixtral-tiny", "blk.0.ffn_down_exps.weight", 4 + 3 * 8, 8, 0, "\x10", "iq.gguf",
                       ": type iq2_xxs has no decoder");
  // A real hyper-parameter that is NaN (it reached config.json as null): the f32 after the key's
  // name and its value type (6, f32).
  refused_when_patched("mixtral-tiny", "llama.attention.layer_norm_rms_epsilon", 0, 6, 4, std::string("\x00\x00\xc0\x7f", 4),
                       "nan-eps.gguf", ": expected a positive finite number, found nan");
  // glm4moe: a gating function other than sigmoid (the u32 after the key's name and its value
  // type, 4: 2 made 1, softmax) is refused naming the key.
  refused_when_patched("glm4-moe-tiny", "glm4moe.expert_gating_func", 0, 4, 4, "\x01", "softmax.gguf",
                       ": 1: only sigmoid gating (2) is read for glm4moe");

  // A missing hyper-parameter: the key renamed.
  const fs::path key = altered(dir, "key.gguf", SIZE_MAX, "llama.expert_count", "llama.expert_cOunt");
  r = run_tool({"inspect", key.string()});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  // Without expert_count, llama.cpp's llama is a dense llama: the experts' tensors have no place.
  EXPECT_NE(r.err.find("tensor blk.0.ffn_gate_inp.weight: an MoE tensor, but metadata key llama.expert_count is missing or 0"),
            std::string::npos)
      << r.err;
}

// qwen3next (qwen3_next-tiny: layers 0-2 Gated DeltaNet, layer 3 full attention, a shared expert
// with its gate in every layer): `prune --format gguf` of its Q8_0 export keeps 3 experts and every
// other tensor's bytes: the ssm_* tensors (ssm_a as -exp(A_log), ssm_conv1d f32), the norms stored
// as 1 + w (the reader's w given back as the file's bytes), the shared expert and its gate; the
// file reads back and evaluates as the folder prune of the same experts does.
TEST(GgufInputPrune, Qwen3NextKeepsLinearAttentionAndSharedExpert) {
  auto& env = io::Env::posix();
  const fs::path in = exported("qwen3_next-tiny", "q8_0");
  TempDir dir{"moe-gguf-prune-qwen3next"};
  const fs::path out = dir / "pruned.gguf", folder = dir / "pruned";
  auto prune = [&](const fs::path& to, const std::string& format) {
    return run_tool({"-q", "prune", in.string(), to.string(), "--method", "random", "--keep", "3", "--seed", "4", "--format", format});
  };
  ASSERT_EQ(prune(out, "gguf").exit_code, 0);
  ASSERT_EQ(run_tool({"-q", "prune", in.string(), folder.string(), "--method", "random", "--keep", "3", "--seed", "4", "--format",
                      "hf", "--dtype", "f32"}).exit_code, 0);
  const auto a = io::GgufFile::open(env, in), b = io::GgufFile::open(env, out);
  EXPECT_EQ(b.find("qwen3next.expert_count")->integer, 3u);
  EXPECT_EQ(b.find("qwen3next.ssm.inner_size")->integer, 32u);
  ASSERT_EQ(b.tensors().size(), a.tensors().size());
  size_t ssm = 0;
  for (const auto& ta : a.tensors()) {
    if (ta.name.find("_exps.") != std::string::npos || ta.name.find("ffn_gate_inp.") != std::string::npos) continue;
    SCOPED_TRACE(ta.name);
    const io::GgufTensorInfo* tb = b.find_tensor(ta.name);
    ASSERT_NE(tb, nullptr);
    ASSERT_EQ(tb->ne, ta.ne);
    EXPECT_EQ(tb->type, ta.type);
    EXPECT_TRUE(std::equal(b.tensor_data(*tb), b.tensor_data(*tb) + tb->nbytes(), a.tensor_data(ta)));
    if (ta.name.find(".ssm_") != std::string::npos) ++ssm;
  }
  EXPECT_EQ(ssm, 3u * 7u);
  EXPECT_EQ(b.find_tensor("blk.0.ssm_conv1d.weight")->type, quant::GgmlType::F32);
  for (const char* shared : {"blk.3.ffn_up_shexp.weight", "blk.3.ffn_gate_inp_shexp.weight"}) EXPECT_NE(b.find_tensor(shared), nullptr);
  const json e = eval_json(out), ef = eval_json(folder);
  ASSERT_EQ(e.at("tokens_scored"), ef.at("tokens_scored"));
  EXPECT_NEAR(e.at("nll_sum").get<double>(), ef.at("nll_sum").get<double>(), 1e-6 * ef.at("nll_sum").get<double>());
}

// phimoe GGUF-to-GGUF prune (the Q8_0 export of phimoe_llamacpp, 3 of 8 experts kept): the
// longrope divisors, the LayerNorm and lm_head biases, the centred writers and the jitter key are
// copied as stored, the kept experts' slices; the file reads back with the source's longrope and
// jitter and evaluates near the same pruning written as a (bf16) folder.
TEST(GgufInputPrune, PhimoeKeepsRopeFactorsBiasesAndJitter) {
  auto& env = io::Env::posix();
  const fs::path in = exported("phimoe-tiny", "q8_0");
  TempDir dir{"moe-gguf-prune-phimoe"};
  const PrunedTwice p = prune_twice(in, dir, 3);
  const auto src = io::GgufFile::open(env, in), f = io::GgufFile::open(env, p.out);
  EXPECT_EQ(f.find("phimoe.expert_count")->as_int("c"), 3);
  EXPECT_EQ(f.find("moe_tool.router_jitter_noise")->as_double("j"), src.find("moe_tool.router_jitter_noise")->as_double("j"));
  EXPECT_EQ(f.tensors().size(), src.tensors().size());
  for (const char* name : {"rope_factors_long.weight", "rope_factors_short.weight", "output_norm.bias", "output.bias", "token_embd.weight",
                           "blk.0.attn_norm.bias", "blk.1.ffn_norm.bias", "blk.1.attn_output.weight", "blk.1.attn_output.bias"}) {
    ASSERT_NE(f.find_tensor(name), nullptr) << name;
    EXPECT_EQ(f.decode(*f.find_tensor(name)), src.decode(*src.find_tensor(name))) << name;
  }
  for (const int layer : {0, 1})
    for (const char* t : {"ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"})
      expect_kept_slices(f, src, "blk." + std::to_string(layer) + "." + t, p.kept(layer));
  const auto m = model::Model::load(io::Checkpoint::open(env, p.out));
  EXPECT_EQ(m.config().json().at("rope_scaling").at("rope_type"), "longrope");
  EXPECT_EQ(m.config().json().at("router_jitter_noise"), 0.2);
  const json a = eval_json(p.out), b = eval_json(p.folder);
  EXPECT_GT(a.at("nll_sum").get<double>(), 0);
  EXPECT_NEAR(a.at("nll_sum").get<double>(), b.at("nll_sum").get<double>(), 1e-2 * b.at("nll_sum").get<double>());
}

}  // namespace
}  // namespace moe::test
