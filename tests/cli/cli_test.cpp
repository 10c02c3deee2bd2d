// The built moe-tool binary: inspect (text, --json, --tensors) and convert (every family,
// bit-identical tensors, dtype round trips, shard cutting, refusals), checked from the outside.
#include <gtest/gtest.h>

#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "core/dtype.h"
#include "support/cli_expect.h"
#include "support/ckpt_util.h"
#include "support/paths.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using core::DType;
using nlohmann::json;
namespace fs = std::filesystem;

// "  key<padding to 24>value\n", the row format of `inspect`.
std::string row(const std::string& key, const std::string& value) {
  return "  " + key + std::string(key.size() < 24 ? 24 - key.size() : 1, ' ') + value + "\n";
}

void expect_ok(const RunResult& r) {
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(r.err, "") << r.describe();
}

// A failure is exit 2 and exactly one line "moe-tool: error: ..." on stderr, nothing on stdout.
void expect_user_error(const RunResult& r, std::initializer_list<std::string> parts) {
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_EQ(r.out, "") << r.describe();
  ASSERT_EQ(r.err_lines().size(), 1u) << r.describe();
  EXPECT_EQ(r.err.back(), '\n');
  EXPECT_EQ(r.err.rfind("moe-tool: error: ", 0), 0u) << r.err;
  for (const auto& p : parts) EXPECT_NE(r.err.find(p), std::string::npos) << "'" << p << "' not in: " << r.err;
}

class Cli : public ::testing::Test {
 protected:
  TempDir tmp{"moe-cli"};
};

// ------------------------------------------------------------------ inspect

TEST_F(Cli, InspectMixtralText) {
  const auto dir = synth_to(tmp / "mixtral", "mixtral");
  const RunResult r = run_tool({"inspect", dir.string()});
  expect_ok(r);
  EXPECT_EQ(r.out.rfind(dir.string() + "\n", 0), 0u) << r.out;
  EXPECT_NE(r.out.find(row("family", "mixtral [\"MixtralForCausalLM\"]")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(row("layers", "2")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(row("hidden size", "32")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(row("heads / kv heads", "4 / 2 (head dim 8, standard)")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(row("vocabulary", "64")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(row("experts per layer", "4")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(row("experts per token", "2")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(row("expert width", "16")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(row("shared experts", "0")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(row("routing", "softmax -> top-k")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(row("MoE layers", "2")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(row("dense layers", "none")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(row("tensors / shards", "41 / 1")), std::string::npos) << r.out;
  // 2*64*32 (embed, lm_head) + 2 layers x (q 1024 + k 512 + v 512 + o 1024 + norms 64 + router 128
  // + 4 experts x 1536) + final norm 32 = 4096 + 2*9408 + 32 = 22944 parameters; active per token:
  // minus 2 unselected experts x 1536 in each of 2 layers = 16800.
  EXPECT_NE(r.out.find(row("parameters", "22.9K total, 16.8K active per token")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(row("bytes", "45.89 KB (BF16 45.89 KB)")), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("tensors:\n"), std::string::npos);
}

TEST_F(Cli, InspectJsonMixtral) {
  const auto dir = synth_to(tmp / "mixtral", "mixtral");
  const RunResult r = run_tool({"inspect", dir.string(), "--json"});
  expect_ok(r);
  const json s = json::parse(r.out);
  EXPECT_EQ(s.at("path"), dir.string());
  EXPECT_EQ(s.at("family"), "mixtral");
  EXPECT_EQ(s.at("architectures"), json({"MixtralForCausalLM"}));
  EXPECT_EQ(s.at("layers"), 2);
  EXPECT_EQ(s.at("hidden_size"), 32);
  EXPECT_EQ(s.at("attention_heads"), 4);
  EXPECT_EQ(s.at("kv_heads"), 2);
  EXPECT_EQ(s.at("head_dim"), 8);
  EXPECT_EQ(s.at("vocab_size"), 64);
  EXPECT_EQ(s.at("tied_embeddings"), false);
  EXPECT_EQ(s.at("attention"), "standard");
  EXPECT_EQ(s.at("moe"), true);
  EXPECT_EQ(s.at("routing"), "softmax -> top-k");
  EXPECT_EQ(s.at("experts_per_layer"), 4);
  EXPECT_EQ(s.at("experts_per_token"), 2);
  EXPECT_EQ(s.at("expert_width"), 16);
  EXPECT_EQ(s.at("shared_experts"), 0);
  EXPECT_EQ(s.at("moe_layers"), 2);
  EXPECT_EQ(s.at("dense_layers"), json::array());
  EXPECT_EQ(s.at("params_total"), 22944);
  EXPECT_EQ(s.at("params_active_per_token"), 22944 - 2 * 2 * 1536);
  EXPECT_EQ(s.at("bytes_total"), 2 * 22944);
  EXPECT_EQ(s.at("bytes_by_dtype"), (json{{"BF16", 2 * 22944}}));
  EXPECT_EQ(s.at("tensors"), 41);
  EXPECT_EQ(s.at("shards"), 1);
  EXPECT_FALSE(s.contains("tensor_list"));
}

TEST_F(Cli, InspectJsonQwen2MoeSharded) {
  const auto dir = synth_to(tmp / "q", "qwen2_moe", {}, {.max_shard_bytes = 20000});
  const RunResult r = run_tool({"inspect", "--json", dir.string()});
  expect_ok(r);
  const json s = json::parse(r.out);
  EXPECT_EQ(s.at("family"), "qwen2_moe");
  EXPECT_EQ(s.at("architectures"), json({"Qwen2MoeForCausalLM"}));
  EXPECT_EQ(s.at("layers"), 3);
  EXPECT_EQ(s.at("experts_per_layer"), 4);
  EXPECT_EQ(s.at("experts_per_token"), 2);
  EXPECT_EQ(s.at("expert_width"), 16);
  EXPECT_EQ(s.at("shared_experts"), 1);
  EXPECT_EQ(s.at("shared_expert_width"), 32);
  EXPECT_EQ(s.at("moe_layers"), 2);
  EXPECT_EQ(s.at("dense_layers"), json::array({0}));
  // embed + lm_head 4096; per layer attention 3072 + qkv biases 64 + norms 64 = 3200;
  // dense layer 0: 3 x 64 x 32 = 6144; MoE layers: router 128 + 4 x 1536 + shared 3072 + gate 32.
  const int64_t total = 4096 + 3 * 3200 + 6144 + 2 * (128 + 6144 + 3072 + 32) + 32;
  EXPECT_EQ(s.at("params_total"), total);
  EXPECT_EQ(s.at("params_active_per_token"), total - 2 * 2 * 1536);
  EXPECT_GT(s.at("shards").get<int>(), 1);
  EXPECT_EQ(s.at("tensors"), make_synth("qwen2_moe").tensors.size());
  const RunResult t = run_tool({"inspect", dir.string()});
  expect_ok(t);
  EXPECT_NE(t.out.find(row("shared experts", "1 (width 32)")), std::string::npos) << t.out;
  EXPECT_NE(t.out.find(row("dense layers", "[0]")), std::string::npos) << t.out;
}

// gpt-oss-tiny-mxfp4: 2 layers of 8 experts, H 64, I 32, the experts' weights stored as MXFP4
// (gate_up_proj_blocks [8, 64, 2, 16] + _scales [8, 64, 2], down_proj_blocks [8, 64, 1, 16] +
// _scales [8, 64, 1], all U8): 98304 weights in 49152 + 3072 bytes, 4.25 bits each; with the BF16
// expert biases (2 x 8 x (64 + 64)) the experts class is 56320 bytes for 100352 parameters.
// Everything else is BF16, so the model's bits per parameter are its file's tensor bytes over
// its parameters (658096 x 8 / 401240 = 13.12), not the 16 of the decoded experts.
TEST_F(Cli, InspectCountsMxfp4ExpertsAsStored) {
  const std::string dir = (kSrc / "data/gpt-oss-tiny-mxfp4").string();
  const RunResult r = run_tool({"inspect", "--json", dir});
  expect_ok(r);
  const json s = json::parse(r.out);
  const json& experts = s.at("tensor_classes").at("experts");
  EXPECT_EQ(experts.at("params"), 100352);
  EXPECT_EQ(experts.at("bytes"), 49152 + 3072 + 2 * 2 * 8 * (64 + 64));
  EXPECT_DOUBLE_EQ(experts.at("bits_per_param").get<double>(), 8.0 * 56320 / 100352);
  const json& q = s.at("quantization");
  EXPECT_EQ(q.at("weights"), 4);  // gate_up_proj and down_proj of 2 layers
  EXPECT_EQ(q.at("block"), 32);
  EXPECT_DOUBLE_EQ(q.at("bits_per_weight").get<double>(), 4.25);
  EXPECT_EQ(s.at("bytes_total"), 658096);
  EXPECT_EQ(s.at("params_total"), 401240);
  EXPECT_DOUBLE_EQ(s.at("bits_per_param").get<double>(), 8.0 * 658096 / 401240);
  const RunResult t = run_tool({"inspect", dir});
  expect_ok(t);
  EXPECT_NE(t.out.find("13.121 overall; attention 16, embeddings 16, experts 4.49, norms 16, router 16"), std::string::npos)
      << t.out;
  EXPECT_NE(t.out.find(", 4 weights, 4.250 bits per weight"), std::string::npos) << t.out;
}

TEST_F(Cli, InspectTensors) {
  const auto ck = make_synth("granitemoe");
  const auto dir = tmp / "g";
  write_synth(ck, dir, {.max_shard_bytes = 10000});
  const RunResult r = run_tool({"inspect", dir.string(), "--tensors"});
  expect_ok(r);
  ASSERT_NE(r.out.find("tensors:\n"), std::string::npos) << r.out;
  const json ix = json::parse(read_file(dir / "model.safetensors.index.json"));
  for (const auto& t : ck.tensors) {
    json shape = t.shape;
    const std::string line = "  " + t.name + "  " + core::dtype_name(t.dtype) + " " + shape.dump() + "  " +
                             ix.at("weight_map").at(t.name).get<std::string>() + "\n";
    EXPECT_NE(r.out.find(line), std::string::npos) << line;
  }
  const RunResult j = run_tool({"inspect", dir.string(), "--tensors", "--json"});
  expect_ok(j);
  const json s = json::parse(j.out);
  ASSERT_EQ(s.at("tensor_list").size(), ck.tensors.size());
  std::set<std::string> names;
  for (const auto& t : s.at("tensor_list")) {
    names.insert(t.at("name").get<std::string>());
    const auto& st = ck.at(t.at("name"));
    EXPECT_EQ(t.at("dtype"), core::dtype_name(st.dtype));
    EXPECT_EQ(t.at("shape"), json(st.shape));
    EXPECT_EQ(t.at("shard"), ix.at("weight_map").at(st.name));
  }
  EXPECT_EQ(names.size(), ck.tensors.size());
}

TEST_F(Cli, InspectEveryFamily) {
  for (const auto& fam : synth_families()) {
    SCOPED_TRACE(fam);
    const auto dir = synth_to(tmp / fam, fam);
    const RunResult r = run_tool({"inspect", "--json", dir.string()});
    expect_ok(r);
    const json s = json::parse(r.out);
    EXPECT_EQ(s.at("family"), fam);
    EXPECT_EQ(s.at("moe"), synth_is_moe(fam));
    EXPECT_EQ(s.at("tensors"), make_synth(fam).tensors.size());
    EXPECT_EQ(s.at("attention"), fam.rfind("deepseek", 0) == 0 ? "mla" : "standard");
  }
}

// ------------------------------------------------------------------ convert

TEST_F(Cli, ConvertEveryFamilyIsBitIdentical) {
  for (const auto& fam : synth_families()) {
    SCOPED_TRACE(fam);
    const auto ck = make_synth(fam, {.seed = 5});
    const auto in = tmp / (fam + "-in");
    const auto out = tmp / (fam + "-out");
    // Hand-rolled input (header keys sorted by name, as Python's safetensors writes them), sharded.
    write_synth(ck, in, {.max_shard_bytes = 16000, .writer = Writer::HandRolled, .tokenizer = true});
    const RunResult r = run_tool({"-q", "convert", in.string(), out.string()});
    expect_ok(r);
    EXPECT_EQ(r.out.rfind("wrote " + out.string() + ": " + std::to_string(ck.tensors.size()) + " tensors in 1 shard(s)", 0), 0u)
        << r.out;
    EXPECT_EQ(first_difference(read_tensors(out), synth_tensors(ck)), "");
    EXPECT_EQ(json::parse(read_file(out / "config.json")), ck.config);
    for (const char* side : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"})
      EXPECT_EQ(read_file(out / side), read_file(in / side)) << side;
    EXPECT_EQ(list_dir(out), (std::vector<std::string>{".moe-tool-output.json", "config.json", "generation_config.json",
                                                       "model.safetensors", "moe_tool_report.json", "tokenizer.json",
                                                       "tokenizer_config.json"}));
    const json report = json::parse(read_file(out / "moe_tool_report.json"));
    EXPECT_EQ(report.at("command"), "convert");
    EXPECT_EQ(report.at("input").at("family"), fam);
    EXPECT_EQ(temp_leftovers(tmp.path()), std::vector<std::string>{});
    // And back through the tool again: still identical (its own output is valid input).
    const RunResult r2 = run_tool({"-q", "convert", out.string(), (tmp / (fam + "-again")).string()});
    expect_ok(r2);
    EXPECT_EQ(first_difference(read_tensors(tmp / (fam + "-again")), synth_tensors(ck)), "");
  }
}

TEST_F(Cli, DtypeRoundTripBf16F32Bf16IsExact) {
  for (const auto& fam : synth_families()) {
    SCOPED_TRACE(fam);
    const auto ck = make_synth(fam, {.seed = 11});
    const auto in = tmp / (fam + "-bf16"), f32 = tmp / (fam + "-f32"), back = tmp / (fam + "-back");
    write_synth(ck, in);
    expect_ok(run_tool({"-q", "convert", in.string(), f32.string(), "--dtype", "f32"}));
    const TensorMap m32 = read_tensors(f32);
    ASSERT_EQ(m32.size(), ck.tensors.size());
    for (const auto& t : ck.tensors) {
      const auto& o = m32.at(t.name);
      EXPECT_EQ(o.dtype, DType::F32) << t.name;
      EXPECT_EQ(o.shape, t.shape);
      // Exact widening: each f32 is the bf16 with 16 zero bits appended (or the F32 input itself).
      for (size_t i = 0; i < t.data.size() / core::dtype_size(t.dtype); ++i) {
        uint32_t v;
        std::memcpy(&v, o.bytes.data() + 4 * i, 4);
        uint32_t expect;
        if (t.dtype == DType::BF16) expect = static_cast<uint32_t>(t.data[2 * i] | (t.data[2 * i + 1] << 8)) << 16;
        else std::memcpy(&expect, t.data.data() + 4 * i, 4);
        ASSERT_EQ(v, expect) << t.name << "[" << i << "]";
      }
    }
    EXPECT_EQ(json::parse(read_file(f32 / "config.json"))["torch_dtype"], "float32");
    expect_ok(run_tool({"-q", "convert", f32.string(), back.string(), "--dtype", "bf16"}));
    TensorMap expect = synth_tensors(ck);
    // F32 inputs (DeepSeek-V3's correction bias) stay F32 through --dtype bf16; everything else is
    // back to its original bits.
    EXPECT_EQ(first_difference(read_tensors(back), expect), "");
    EXPECT_EQ(json::parse(read_file(back / "config.json")), ck.config);
  }
}

TEST_F(Cli, ConvertToF16RoundsEachValue) {
  const auto ck = make_synth("olmoe", {.seed = 3});
  write_synth(ck, tmp / "in");
  expect_ok(run_tool({"-q", "convert", (tmp / "in").string(), (tmp / "out").string(), "--dtype", "f16"}));
  const TensorMap m = read_tensors(tmp / "out");
  for (const auto& t : ck.tensors) {
    const auto& o = m.at(t.name);
    ASSERT_EQ(o.dtype, DType::F16);
    for (size_t i = 0; i < t.data.size() / 2; ++i) {
      const uint16_t b = static_cast<uint16_t>(t.data[2 * i] | (t.data[2 * i + 1] << 8));
      uint16_t h;
      std::memcpy(&h, o.bytes.data() + 2 * i, 2);
      ASSERT_EQ(h, core::f32_to_f16(core::bf16_to_f32(b))) << t.name << "[" << i << "]";
    }
  }
  EXPECT_EQ(json::parse(read_file(tmp / "out" / "config.json"))["torch_dtype"], "float16");
}

TEST_F(Cli, ConvertKeepsF8AndIntegerTensors) {
  SynthSpec spec;
  spec.dtypes = {{"model.layers.0.block_sparse_moe.experts.1.w2.weight", DType::F8_E4M3},
                 {"model.layers.1.block_sparse_moe.experts.0.w1.weight", DType::F8_E5M2},
                 {"model.layers.1.self_attn.o_proj.weight", DType::F16},
                 {"model.norm.weight", DType::F64}};
  spec.extra = {synth_tensor("model.rotary_emb.positions", DType::I64, {16}, 1),
                synth_tensor("model.mask", DType::BOOL, {4, 4}, 1), synth_tensor("model.codes", DType::U8, {7}, 1),
                synth_tensor("model.i32", DType::I32, {3}, 1), synth_tensor("model.i16", DType::I16, {3}, 1),
                synth_tensor("model.i8", DType::I8, {3}, 1)};
  const auto ck = make_synth("mixtral", spec);
  write_synth(ck, tmp / "in");
  expect_ok(run_tool({"-q", "convert", (tmp / "in").string(), (tmp / "same").string()}));
  EXPECT_EQ(first_difference(read_tensors(tmp / "same"), synth_tensors(ck)), "");
  expect_ok(run_tool({"-q", "convert", (tmp / "in").string(), (tmp / "bf").string(), "--dtype", "bf16"}));
  const TensorMap m = read_tensors(tmp / "bf");
  const TensorMap src = synth_tensors(ck);
  for (const char* kept : {"model.layers.0.block_sparse_moe.experts.1.w2.weight", "model.layers.1.block_sparse_moe.experts.0.w1.weight",
                           "model.rotary_emb.positions", "model.mask", "model.codes", "model.i32", "model.i16", "model.i8"})
    EXPECT_EQ(m.at(kept), src.at(kept)) << kept << " must be kept as is";
  EXPECT_EQ(m.at("model.layers.1.self_attn.o_proj.weight").dtype, DType::BF16);
  EXPECT_EQ(m.at("model.norm.weight").dtype, DType::BF16);
  // F64 -> BF16: each value rounded once to nearest even, computed here on the f64 bits (the
  // synthetic norm weights are positive normals in [1, 2)).
  const auto& f64 = ck.at("model.norm.weight");
  for (size_t i = 0; i < 32; ++i) {
    uint64_t u;
    std::memcpy(&u, f64.data.data() + 8 * i, 8);
    const uint64_t exp = (u >> 52) & 0x7ff, mant = u & ((uint64_t{1} << 52) - 1);
    ASSERT_EQ(exp, 1023u);
    uint64_t keep = mant >> 45;
    const uint64_t rest = mant & ((uint64_t{1} << 45) - 1), half = uint64_t{1} << 44;
    if (rest > half || (rest == half && (keep & 1))) ++keep;
    const uint16_t expect = static_cast<uint16_t>(((exp - 1023 + 127) << 7) + keep);
    uint16_t h;
    std::memcpy(&h, m.at("model.norm.weight").bytes.data() + 2 * i, 2);
    EXPECT_EQ(h, expect) << "element " << i;
  }
}

TEST_F(Cli, MaxShardSizeCutsShardsWithACorrectIndex) {
  const auto ck = make_synth("deepseek_v3");
  write_synth(ck, tmp / "in");
  uint64_t total = 0;
  for (const auto& t : ck.tensors) total += t.data.size();
  for (const char* limit : {"10KB", "4096", "1KiB", "1MB"}) {
    SCOPED_TRACE(limit);
    const auto out = tmp / (std::string("out-") + limit);
    const RunResult r = run_tool({"-q", "convert", (tmp / "in").string(), out.string(), "--max-shard-size", limit, "--json"});
    expect_ok(r);
    const json res = json::parse(r.out);
    const uint64_t max = std::string(limit) == "10KB" ? 10000 : std::string(limit) == "4096" ? 4096
                         : std::string(limit) == "1KiB" ? 1024 : 1000000;
    const int shards = res.at("shards").get<int>();
    EXPECT_EQ(res.at("tensors"), ck.tensors.size());
    EXPECT_EQ(res.at("bytes_before"), total);
    EXPECT_EQ(res.at("bytes_after"), total);
    EXPECT_EQ(first_difference(read_tensors(out), synth_tensors(ck)), "");
    if (std::string(limit) == "1MB") {
      EXPECT_EQ(shards, 1);
      EXPECT_TRUE(fs::exists(out / "model.safetensors"));
      EXPECT_FALSE(fs::exists(out / "model.safetensors.index.json"));
      continue;
    }
    ASSERT_GT(shards, 1);
    const json ix = json::parse(read_file(out / "model.safetensors.index.json"));
    EXPECT_EQ(ix.at("metadata").at("total_size"), total);
    EXPECT_EQ(ix.at("weight_map").size(), ck.tensors.size());
    // Shard files are model-0000i-of-0000N and nothing else holds weights.
    std::vector<std::string> expect_files;
    char buf[64];
    for (int i = 1; i <= shards; ++i) {
      std::snprintf(buf, sizeof buf, "model-%05d-of-%05d.safetensors", i, shards);
      expect_files.push_back(buf);
    }
    std::vector<std::string> got_files;
    for (const auto& n : list_dir(out))
      if (n.ends_with(".safetensors")) got_files.push_back(n);
    EXPECT_EQ(got_files, expect_files);
    // Each shard holds exactly the tensors the index says; greedy cutting: a shard is within the
    // limit unless it holds a single tensor, and could not have taken the next shard's first tensor.
    std::vector<uint64_t> sizes;
    std::vector<uint64_t> first_sizes;
    for (const auto& f : expect_files) {
      const std::string bytes = read_file(out / f);
      uint64_t n = 0;
      for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
      const json h = json::parse(bytes.substr(8, n));
      uint64_t data = 0, first = UINT64_MAX;
      int count = 0;
      for (const auto& [name, e] : h.items()) {
        if (name == "__metadata__") continue;
        EXPECT_EQ(ix.at("weight_map").at(name), f) << name;
        const uint64_t b = e.at("data_offsets")[0], en = e.at("data_offsets")[1];
        data += en - b;
        if (b == 0) first = en - b;
        ++count;
      }
      EXPECT_EQ(bytes.size(), 8 + n + data);
      EXPECT_TRUE(data <= max || count == 1) << f << " holds " << data << " bytes in " << count << " tensors";
      sizes.push_back(data);
      first_sizes.push_back(first);
    }
    for (size_t i = 0; i + 1 < sizes.size(); ++i) EXPECT_GT(sizes[i] + first_sizes[i + 1], max) << "shard " << i;
  }
}

TEST_F(Cli, ConvertRefusesDangerousOutputs) {
  const auto in = synth_to(tmp / "in", "qwen3_moe");
  const auto before = read_tensors(in);
  const auto in_files = list_dir(in);
  expect_user_error(run_tool({"convert", in.string(), in.string()}), {"output is the input"});
  expect_user_error(run_tool({"convert", in.string(), in.string(), "--force"}), {"output is the input"});
  expect_user_error(run_tool({"convert", in.string(), (in / "sub").string(), "--force"}), {"output is inside the input"});
  expect_user_error(run_tool({"convert", in.string(), tmp.path().string(), "--force"}), {"output contains the input"});
  // A relative spelling of the input.
  expect_user_error(run_tool({"convert", "in", "./in/../in", "--force"}, tmp.path()), {"output is the input"});
  EXPECT_EQ(list_dir(in), in_files);
  EXPECT_EQ(read_tensors(in), before);

  const auto out = tmp / "out";
  fs::create_directory(out);
  write_file(out / "precious.txt", "keep me");
  expect_user_error(run_tool({"convert", in.string(), out.string()}),
                    {out.string() + ": output folder exists and is not empty (use --force to replace it)"});
  EXPECT_EQ(list_dir(out), std::vector<std::string>{"precious.txt"});
  EXPECT_EQ(temp_leftovers(tmp.path()), std::vector<std::string>{});

  // --force replaces only an earlier output of moe-tool: a folder of the user's is never deleted.
  expect_user_error(run_tool({"convert", in.string(), out.string(), "--force"}),
                    {out.string() + ": output folder exists and was not written by moe-tool"});
  EXPECT_EQ(list_dir(out), std::vector<std::string>{"precious.txt"});
  fs::remove(out / "precious.txt");
  expect_ok(run_tool({"-q", "convert", in.string(), out.string()}));
  const RunResult ok = run_tool({"-q", "convert", in.string(), out.string(), "--force"});
  expect_ok(ok);
  EXPECT_EQ(read_tensors(out), before);
  EXPECT_EQ(temp_leftovers(tmp.path()), std::vector<std::string>{});

  // An empty existing folder needs no --force.
  fs::create_directory(tmp / "empty");
  expect_ok(run_tool({"-q", "convert", in.string(), (tmp / "empty").string()}));
  EXPECT_EQ(read_tensors(tmp / "empty"), before);

  write_file(tmp / "afile", "x");
  expect_user_error(run_tool({"convert", in.string(), (tmp / "afile").string(), "--force"}), {"output exists and is not a folder"});
  expect_user_error(run_tool({"convert", in.string(), (tmp / "afile" / "out").string()}),
                    {"parent folder", "cannot be made", "afile is not a folder"});
  // Missing parents are made (recipes write under build/recipes-out on a fresh checkout).
  expect_ok(run_tool({"-q", "convert", in.string(), (tmp / "nope" / "out").string()}));
  EXPECT_EQ(read_tensors(tmp / "nope" / "out"), before);
}

TEST_F(Cli, ConvertOutputWithTrailingSlash) {
  const auto in = synth_to(tmp / "in", "mixtral");
  expect_ok(run_tool({"-q", "convert", in.string(), (tmp / "out").string() + "/"}));
  EXPECT_EQ(first_difference(read_tensors(tmp / "out"), read_tensors(in)), "");
  EXPECT_EQ(temp_leftovers(tmp.path()), std::vector<std::string>{});
  expect_ok(run_tool({"-q", "convert", in.string() + "/", (tmp / "out").string() + "/", "--force"}));
  EXPECT_EQ(temp_leftovers(tmp.path()), std::vector<std::string>{});
  EXPECT_EQ(temp_leftovers(tmp / "out"), std::vector<std::string>{});
}

TEST_F(Cli, BadArguments) {
  const auto in = synth_to(tmp / "in", "llama");
  expect_user_error(run_tool({"convert", in.string(), (tmp / "o").string(), "--dtype", "int8"}),
                    {"--dtype: 'int8' is not one of bf16, f16, f32"});
  expect_user_error(run_tool({"convert", in.string(), (tmp / "o").string(), "--max-shard-size", "lots"}),
                    {"--max-shard-size: size 'lots'"});
  expect_user_error(run_tool({"convert", in.string(), (tmp / "o").string(), "--max-shard-size", "5XB"}),
                    {"--max-shard-size: size '5XB': unknown unit"});
  EXPECT_FALSE(fs::exists(tmp / "o"));
  expect_user_error(run_tool({"frobnicate"}), {"unknown command 'frobnicate'", "inspect", "convert"});
  expect_user_error(run_tool({"inspect"}), {"MODEL"});
  expect_user_error(run_tool({"convert", in.string()}), {"OUT"});
  expect_user_error(run_tool({"inspect", (tmp / "missing").string()}), {"no such checkpoint folder"});
  expect_user_error(run_tool({"inspect", (in / "config.json").string()}), {"not a folder"});
  const RunResult v = run_tool({"--version"});
  EXPECT_EQ(v.exit_code, 0);
  EXPECT_EQ(v.out.rfind("moe-tool ", 0), 0u) << v.out;
  const RunResult h = run_tool({"--help"});
  EXPECT_EQ(h.exit_code, 0);
  EXPECT_NE(h.out.find("inspect"), std::string::npos);
  EXPECT_NE(h.out.find("convert"), std::string::npos);
}


TEST_F(Cli, PruningDeepSeekV3DropsTheGroupLimit) {
  // deepseek_v3 routes within n_group contiguous groups of experts; once experts are dropped those
  // blocks are not the trained groups (and 3 experts do not split into 2 groups), so the written
  // config routes plain top-k and the run says so.
  const auto dir = synth_to(tmp / "ds3", "deepseek_v3");
  ASSERT_EQ(read_json(dir / "config.json")["n_group"], 2);
  const RunResult r = run_tool({"-q", "prune", dir.string(), (tmp / "out3").string(), "--method", "random", "--keep", "3", "--json"});
  expect_ok(r);
  const json cfg = read_json(tmp / "out3" / "config.json");
  EXPECT_EQ(cfg.at("n_routed_experts"), 3);
  EXPECT_EQ(cfg.at("n_group"), 1);
  EXPECT_EQ(cfg.at("topk_group"), 1);
  const json s = json::parse(r.out);
  // (The multi-token-prediction layer is pruned like the others: tests/cli/field_test.cpp.)
  ASSERT_EQ(s.at("notes").size(), 1u);
  EXPECT_NE(s.at("notes")[0].get<std::string>().find("n_group 2 -> 1"), std::string::npos) << s.at("notes");
  EXPECT_EQ(read_json(tmp / "out3" / "moe_tool_report.json").at("notes"), s.at("notes"));
  // Keeping every expert keeps the groups.
  const RunResult same = run_tool({"-q", "prune", dir.string(), (tmp / "out4").string(), "--method", "random", "--keep", "4", "--json"});
  expect_ok(same);
  EXPECT_EQ(read_json(tmp / "out4" / "config.json")["n_group"], 2);
  EXPECT_FALSE(json::parse(same.out).contains("notes"));
}

}  // namespace
}  // namespace moe::test
