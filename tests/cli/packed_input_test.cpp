// Checkpoints quantized by other tools as inputs (io/packed_input.h), through the CLI:
//  - round trips: a fixture quantized by `quantize` (int4/int8, symmetric and asymmetric, groups
//    and rows), exported as compressed-tensors or GPTQ, is read back: `convert --dtype f32` of the
//    export equals `convert --dtype f32` of the native checkpoint byte for byte, and `eval` of the
//    export equals `eval` of the native one exactly (perplexity and NLL sum);
//  - inspect reports the stored bits per parameter of the packed tensors;
//  - every command runs on such an input (calibrate, prune, merge, quantize, convert);
//  - the AWQ and FP8 fixtures made by data/scripts/make_packed_inputs.py (NumPy, from the formats'
//    published rules) decode to the goldens that script's own decoder wrote;
//  - bad input: exit 2, one line naming the file and tensor, nothing written.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <functional>
#include <cstring>
#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "io/env.h"
#include "io/gguf.h"
#include "quant/gguf_blocks.h"
#include "model/model.h"
#include "support/ckpt_util.h"
#include "support/cli_expect.h"
#include "support/packed_fixture.h"
#include "support/paths.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

void run_ok(const std::vector<std::string>& args) {
  const RunResult r = run_tool(args);
  EXPECT_EQ(r.exit_code, 0) << r.describe();
}

// Tensor `a` of `oc` is tensor `b` of `ic`: dtype, shape and bytes.
void expect_same_tensor(const io::Checkpoint& oc, const std::string& a, const io::Checkpoint& ic, const std::string& b) {
  ASSERT_TRUE(oc.has(a)) << a;
  const core::Tensor x = oc.tensor(a), y = ic.tensor(b);
  EXPECT_EQ(x.dtype(), y.dtype()) << a;
  EXPECT_EQ(x.shape(), y.shape()) << a;
  EXPECT_TRUE(x.nbytes() == y.nbytes() && std::memcmp(x.data(), y.data(), x.nbytes()) == 0) << a << " != " << b;
}

// Each kept expert's tensors `parts` of w1, w2 and w3 (mixtral names) in the pruned `oc` are those
// of the input expert the report's `kept` list names, as stored; a part the input lacks is absent
// from the output too. `keep` experts per layer. Returns how many tensors were compared.
size_t expect_kept_experts_copied(const io::Checkpoint& oc, const io::Checkpoint& ic, const json& rep,
                                  std::initializer_list<const char*> parts, size_t keep) {
  size_t checked = 0;
  for (const auto& l : rep.at("layers")) {
    const int layer = l.at("layer").get<int>();
    const auto kept = l.at("passes").at(0).at("kept").get<std::vector<int>>();
    EXPECT_EQ(kept.size(), keep);
    const std::string p = "model.layers." + std::to_string(layer) + ".block_sparse_moe.experts.";
    for (size_t e = 0; e < kept.size(); ++e)
      for (const char* w : {"w1", "w2", "w3"})
        for (const char* part : parts) {
          const std::string a = p + std::to_string(e) + "." + w + part, b = p + std::to_string(kept[e]) + "." + w + part;
          EXPECT_EQ(oc.has(a), ic.has(b)) << a;
          if (!ic.has(b) || !oc.has(a)) continue;
          expect_same_tensor(oc, a, ic, b);
          ++checked;
        }
  }
  return checked;
}

json eval_json(const fs::path& m) {
  const RunResult r =
      run_tool({"-q", "eval", m.string(), "--text", kHeldout.string(), "--ctx", "32", "--max-windows", "4", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  return r.exit_code == 0 ? json::parse(r.out) : json();
}

struct RoundTrip {
  std::string fixture, format;
  std::vector<std::string> flags;
  std::string tag;
};
void PrintTo(const RoundTrip& c, std::ostream* os) { *os << c.tag; }

class PackedInputRoundTrip : public ::testing::TestWithParam<RoundTrip> {};

TEST_P(PackedInputRoundTrip, ExportReadBackEqualsTheNativeModel) {
  const auto& c = GetParam();
  TempDir dir{"moe-packed-in"};
  const fs::path native = quantize_rtn(dir.path(), c.fixture, "native", c.flags);
  const fs::path exported = dir / "export";
  ASSERT_FALSE(export_packed(native, exported, c.format).is_null());
  // Every weight decoded as the native model decodes it (f32: exact), every other tensor too.
  run_ok({"-q", "convert", native.string(), (dir / "native-f32").string(), "--dtype", "f32", "--materialize"});
  run_ok({"-q", "convert", exported.string(), (dir / "export-f32").string(), "--dtype", "f32", "--materialize"});
  EXPECT_EQ(first_difference(read_tensors(dir / "native-f32"), read_tensors(dir / "export-f32")), "");
  EXPECT_FALSE(read_json(dir / "export-f32/config.json").contains("quantization_config"));
  // eval: the same numbers, bit for bit.
  const json a = eval_json(native), b = eval_json(exported);
  ASSERT_TRUE(a.contains("nll_sum")) << a.dump();
  EXPECT_EQ(a.at("nll_sum"), b.at("nll_sum"));
  EXPECT_EQ(a.at("perplexity"), b.at("perplexity"));
  EXPECT_EQ(a.at("tokens_scored"), b.at("tokens_scored"));
  // inspect: the packed experts' bits per parameter are their stored bytes over their parameters.
  const RunResult ins = run_tool({"inspect", exported.string(), "--json"});
  ASSERT_EQ(ins.exit_code, 0) << ins.describe();
  const json s = json::parse(ins.out);
  const auto ck = io::Checkpoint::open(io::Env::posix(), exported);
  const bool gptq_like = c.format == "gptq" || c.format == "awq";  // qweight / scales [groups, out]
  const std::string key = gptq_like ? ".qweight" : ".weight_packed";
  uint64_t bytes = 0;
  int64_t params = 0, linears = 0;
  for (const auto& n : ck.names()) {
    if (!n.ends_with(key) || n.find(".experts.") == std::string::npos) continue;
    const std::string mod = n.substr(0, n.size() - key.size());
    ++linears;
    for (const auto& m : ck.names())
      if (m.rfind(mod + ".", 0) == 0 && m.find('.', mod.size() + 1) == std::string::npos) bytes += ck.tensor(m).nbytes();
    const auto& sc = ck.info(mod + (gptq_like ? ".scales" : ".weight_scale")).shape;
    const int64_t out = gptq_like ? sc.at(1) : sc.at(0);
    int64_t in = 0;
    if (c.format == "gptq") in = ck.info(mod + ".g_idx").shape.at(0);
    else if (c.format == "awq") in = ck.info(mod + ".qweight").shape.at(0);
    else std::memcpy(&in, ck.tensor(mod + ".weight_shape").data() + 8, 8);
    params += out * in;
  }
  ASSERT_GT(linears, 0);
  EXPECT_DOUBLE_EQ(s.at("tensor_classes").at("experts").at("bits_per_param").get<double>(),
                   8.0 * static_cast<double>(bytes) / static_cast<double>(params));
  int64_t encoded = 0;
  for (const auto& [name, n] : s.at("encodings").items()) {
    EXPECT_EQ(name.rfind(c.format == "compressed-tensors" ? "compressed-tensors-int" : c.format + "-int", 0), 0u) << name;
    encoded += n.get<int64_t>();
  }
  EXPECT_GE(encoded, linears);
}

INSTANTIATE_TEST_SUITE_P(
    Formats, PackedInputRoundTrip,
    ::testing::Values(
        RoundTrip{"qwen2moe-tiny", "compressed-tensors", {"--codec", "int4", "--group", "32", "--sym"}, "ct int4 g32 sym"},
        RoundTrip{"qwen2moe-tiny", "gptq", {"--codec", "int4", "--group", "32", "--sym"}, "gptq int4 g32 sym"},
        RoundTrip{"qwen2moe-tiny", "compressed-tensors", {"--codec", "int8", "--group", "64", "--attention", "int8"},
                  "ct int8 g64 asym attention"},
        RoundTrip{"qwen2moe-tiny", "gptq", {"--codec", "int4", "--group", "32"}, "gptq int4 g32 asym"},
        RoundTrip{"mixtral-tiny", "gptq", {"--codec", "int8", "--group", "0", "--sym"}, "gptq int8 row sym"},
        RoundTrip{"mixtral-tiny", "compressed-tensors", {"--codec", "int4", "--group", "0"}, "ct int4 row asym"},
        RoundTrip{"qwen2moe-tiny", "awq", {"--codec", "int4", "--group", "32", "--sym"}, "awq int4 g32 sym"},
        RoundTrip{"mixtral-tiny", "awq", {"--codec", "int4", "--group", "64", "--attention", "int4"}, "awq int4 g64 asym attention"}),
    [](const auto& info) {
      std::string s = info.param.tag;
      for (char& ch : s)
        if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
      return s;
    });

// Every command on a GPTQ input: calibrate, prune, merge, quantize, convert; outputs load.
TEST(PackedInputCommands, EveryCommandRunsOnAGptqInput) {
  TempDir dir{"moe-packed-in"};
  const fs::path native = quantize_rtn(dir.path(), "qwen2moe-tiny", "native", {"--codec", "int4", "--group", "32", "--sym"});
  const fs::path in = dir / "gptq";
  ASSERT_FALSE(export_packed(native, in, "gptq").is_null());
  const std::string calib = (kSrc / "data/text/calib.txt").string();
  run_ok({"-q", "calibrate", in.string(), "--text", calib, "--ctx", "32", "--windows", "2", "-o", (dir / "stats.safetensors").string()});
  run_ok({"-q", "prune", in.string(), (dir / "pruned").string(), "--method", "random", "--keep", "2"});
  run_ok({"-q", "merge", in.string(), (dir / "merged").string(), "--method", "hcsmoe", "--experts", "2", "--no-align", "--text",
          calib, "--ctx", "32", "--windows", "2"});
  run_ok({"-q", "quantize", in.string(), (dir / "requant").string(), "--method", "rtn", "--codec", "int8", "--group", "32"});
  for (const char* out : {"pruned", "merged", "requant"}) {
    SCOPED_TRACE(out);
    const json e = eval_json(dir / out);
    EXPECT_TRUE(e.contains("perplexity"));
  }
  // The pruned model keeps 2 experts, in the input's format (a prune without --format); the merged
  // one is written dense (bf16), without the GPTQ config.
  const json cfg = read_json(dir / "pruned/config.json");
  EXPECT_EQ(cfg.at("quantization_config").at("quant_method"), "gptq");
  EXPECT_EQ(cfg.at("num_experts"), 2);
  EXPECT_FALSE(read_json(dir / "merged/config.json").contains("quantization_config"));
}

// The AWQ and FP8 fixtures written by data/scripts/make_packed_inputs.py decode to its goldens
// (the script's own NumPy decoder of the published rules), exactly.
TEST(PackedInputFixtures, AwqAndFp8DecodeToTheNumPyGoldens) {
  for (const std::string name : {"awq-tiny", "fp8-tiny"}) {
    SCOPED_TRACE(name);
    TempDir dir{"moe-packed-in"};
    const fs::path src = kSrc / "data/packed-inputs" / name;
    run_ok({"-q", "convert", src.string(), (dir / "f32").string(), "--dtype", "f32"});
    const TensorMap got = read_tensors(dir / "f32");
    const TensorMap golden = read_tensors(kSrc / "data/golden/packed-inputs" / name);
    ASSERT_GT(golden.size(), 10u);
    for (const auto& [t, want] : golden) {
      auto it = got.find(t);
      ASSERT_NE(it, got.end()) << t;
      EXPECT_TRUE(it->second == want) << t;
    }
    // Commands run on it.
    run_ok({"-q", "prune", src.string(), (dir / "pruned").string(), "--method", "random", "--keep", "2"});
    run_ok({"-q", "quantize", src.string(), (dir / "q").string(), "--method", "rtn", "--codec", "int4", "--group", "16", "--sym"});
  }
}

// Bad input through the CLI: exit 2, one line naming the file and tensor, nothing written.
TEST(PackedInputRefusals, BadInputFailsWithOneLine) {
  TempDir dir{"moe-packed-in"};
  const fs::path native = quantize_rtn(dir.path(), "qwen2moe-tiny", "native", {"--codec", "int4", "--group", "32", "--sym"});
  const fs::path in = dir / "gptq";
  ASSERT_FALSE(export_packed(native, in, "gptq").is_null());
  auto refused = [&](const fs::path& model, const std::string& needle) {
    const RunResult r = run_tool({"convert", model.string(), (dir / "out").string(), "--dtype", "bf16"});
    EXPECT_EQ(r.exit_code, 2) << r.describe();
    EXPECT_EQ(r.err_lines().size(), 1u) << r.describe();
    EXPECT_NE(r.err.find(needle), std::string::npos) << r.describe();
    EXPECT_FALSE(fs::exists(dir / "out"));
  };
  // Unsupported bits in the config.
  {
    const fs::path bad = dir / "bits";
    copy_folder(in, bad);
    json cfg = read_json(bad / "config.json");
    cfg["quantization_config"]["bits"] = 3;
    write_file(bad / "config.json", cfg.dump());
    refused(bad, "quantization_config.bits: 3 (4 and 8 are read)");
  }
  {
    // A g_idx value out of range, patched into the file.
    const fs::path bad = dir / "gidx";
    copy_folder(in, bad);
    const std::string t = "model.layers.0.mlp.experts.0.up_proj.g_idx";
    patch_tensor_bytes(bad / "model.safetensors", t, 4, std::string("\x63\x00\x00\x00", 4));  // input 1 -> group 99
    refused(bad, "model.safetensors: weight model.layers.0.mlp.experts.0.up_proj.weight (gptq): g_idx: value 99 at input 1");
  }
  {
    const fs::path bad = dir / "method";
    copy_folder(in, bad);
    json cfg = read_json(bad / "config.json");
    cfg["quantization_config"]["checkpoint_format"] = "gptq_marlin";
    write_file(bad / "config.json", cfg.dump());
    refused(bad, "quantization_config.checkpoint_format: \"gptq_marlin\" is not read");
  }
  {
    const fs::path bad = dir / "no-bits";
    copy_folder(in, bad);
    json cfg = read_json(bad / "config.json");
    cfg["quantization_config"].erase("bits");
    write_file(bad / "config.json", cfg.dump());
    refused(bad, "config.json: quantization_config.bits: missing");
  }
  const std::string mod = "model.layers.0.mlp.experts.0.gate_proj";
  {
    // The packed codes deleted: the missing tensor is the qweight, in the file of its scales.
    const fs::path bad = dir / "no-qweight";
    copy_folder(in, bad);
    remove_tensor(bad / "model.safetensors", mod + ".qweight");
    refused(bad, (bad / "model.safetensors").string() + ": tensor " + mod + ".qweight: missing (");
  }
  {
    const fs::path ct = dir / "ct", bad = dir / "no-weight-packed";
    ASSERT_FALSE(export_packed(native, ct, "compressed-tensors").is_null());
    copy_folder(ct, bad);
    remove_tensor(bad / "model.safetensors", mod + ".weight_packed");
    refused(bad, (bad / "model.safetensors").string() + ": tensor " + mod + ".weight_packed: missing (");
  }
  {
    // A NaN scale (f16 0x7E00): refused as the input tensor when the model is read, by every
    // command (not later as a layer's expert in eval, or as an output tensor in convert).
    const fs::path bad = dir / "nan-scale";
    copy_folder(in, bad);
    patch_tensor_bytes(bad / "model.safetensors", mod + ".scales", 2 * 5, std::string("\x00\x7e", 2));
    const std::string needle = (bad / "model.safetensors").string() + ": tensor " + mod + ".scales: non-finite value at index 5";
    refused(bad, needle);
    expect_clean_failure(run_tool({"eval", bad.string(), "--text", kHeldout.string(), "--ctx", "32", "--max-windows", "2"}),
                         needle);
    expect_clean_failure(run_tool({"inspect", bad.string()}), needle);
  }
}

// A GPTQ input's codes pass through: export --format writes them in the other layout, and a prune
// written as gptq keeps the kept experts' codes unchanged — the same bytes as the prune of the
// native checkpoint they were exported from.
TEST(PackedInputCodes, ExportAndPruneOfAGptqInputKeepItsCodes) {
  TempDir dir{"moe-packed-in"};
  const fs::path native = quantize_rtn(dir.path(), "qwen2moe-tiny", "native", {"--codec", "int4", "--group", "32", "--sym"});
  const fs::path in = dir / "gptq";
  ASSERT_FALSE(export_packed(native, in, "gptq").is_null());
  ASSERT_FALSE(export_packed(in, dir / "ct", "compressed-tensors").is_null());
  EXPECT_EQ(read_file(dir / "ct" / "model.safetensors"), [&] {
    EXPECT_FALSE(export_packed(native, dir / "ct-native", "compressed-tensors").is_null());
    return read_file(dir / "ct-native" / "model.safetensors");
  }());
  for (const std::string format : {"gptq", "compressed-tensors"}) {
    SCOPED_TRACE(format);
    const fs::path a = dir / ("pruned-" + format), b = dir / ("pruned-native-" + format);
    for (const auto& [src, out] : {std::pair{in, a}, std::pair{native, b}}) {
      const RunResult r = run_tool({"-q", "prune", src.string(), out.string(), "--method", "random", "--keep", "6", "--format", format});
      ASSERT_EQ(r.exit_code, 0) << r.describe();
    }
    EXPECT_EQ(read_file(a / "model.safetensors"), read_file(b / "model.safetensors"));
    EXPECT_EQ(json::parse(read_file(a / "config.json")), json::parse(read_file(b / "config.json")));
  }
}

// Makes one weight of a GPTQ folder act-order: inputs 0 and 32 swap groups (every group still
// holds 32 inputs, so the input reads; its codes decode with the lookup).
void make_act_order(const fs::path& in) {
  const std::string t = "model.layers.0.mlp.experts.0.up_proj.g_idx";
  patch_tensor_bytes(in / "model.safetensors", t, 0, std::string("\x01\x00\x00\x00", 4));
  patch_tensor_bytes(in / "model.safetensors", t, 4 * 32, std::string("\x00\x00\x00\x00", 4));
}

// Without --format, a prune of a GPTQ / AWQ / compressed-tensors input writes the input's format (the
// same bytes as with --format), and says so; a run that does more than prune, or a prune the
// input's format cannot hold (act-order codes), writes hf, the latter with a warning saying why.
TEST(PackedInputCodes, PruneWithoutFormatWritesTheInputsFormat) {
  TempDir dir{"moe-packed-in"};
  const fs::path native = quantize_rtn(dir.path(), "qwen2moe-tiny", "native", {"--codec", "int4", "--group", "32", "--sym"});
  for (const std::string format : {"gptq", "awq", "compressed-tensors"}) {
    SCOPED_TRACE(format);
    const fs::path in = dir / format;
    ASSERT_FALSE(export_packed(native, in, format).is_null());
    const fs::path given = dir / ("given-" + format), followed = dir / ("followed-" + format);
    run_ok({"-q", "prune", in.string(), given.string(), "--method", "random", "--keep", "6", "--format", format});
    const RunResult r = run_tool({"prune", in.string(), followed.string(), "--method", "random", "--keep", "6"});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    EXPECT_NE(r.out.find("output: format " + format + ", the input's (the kept experts' codes written unchanged)"),
              std::string::npos) << r.out;
    EXPECT_EQ(read_file(followed / "model.safetensors"), read_file(given / "model.safetensors"));
    EXPECT_EQ(json::parse(read_file(followed / "config.json")), json::parse(read_file(given / "config.json")));
    // --format hf: the weights dequantized, as before.
    const fs::path hf = dir / ("hf-" + format);
    run_ok({"-q", "prune", in.string(), hf.string(), "--method", "random", "--keep", "6", "--format", "hf"});
    EXPECT_FALSE(read_json(hf / "config.json").contains("quantization_config"));
  }
  // Act-order codes: the gptq output cannot hold them; hf, with the reason.
  const fs::path act = dir / "act";
  ASSERT_FALSE(export_packed(native, act, "gptq").is_null());
  make_act_order(act);
  const RunResult r = run_tool({"prune", act.string(), (dir / "pruned-act").string(), "--method", "random", "--keep", "6"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("output: written as hf (the weights dequantized), not in the input's format gptq, which cannot hold it"),
            std::string::npos) << r.out;
  EXPECT_NE(r.out.find("act-order"), std::string::npos) << r.out;
  EXPECT_FALSE(read_json(dir / "pruned-act" / "config.json").contains("quantization_config"));
}

// Two GGUF files hold the same tensors: names, types, shapes and stored bytes.
void expect_same_gguf_tensors(const fs::path& a, const fs::path& b) {
  auto& env = io::Env::posix();
  const auto fa = io::GgufFile::open(env, a), fb = io::GgufFile::open(env, b);
  ASSERT_EQ(fa.tensors().size(), fb.tensors().size());
  for (const auto& t : fa.tensors()) {
    const io::GgufTensorInfo* u = fb.find_tensor(t.name);
    ASSERT_NE(u, nullptr) << t.name;
    EXPECT_EQ(t.type, u->type) << t.name;
    EXPECT_EQ(t.ne, u->ne) << t.name;
    EXPECT_EQ(0, std::memcmp(fa.tensor_data(t), fb.tensor_data(*u), t.nbytes())) << t.name;
  }
}

// A GPTQ input's symmetric int4 groups of 32 are Q4_0 blocks: export and a prune written as gguf copy
// them, the same tensors as from the native checkpoint they were exported from.
TEST(PackedInputCodes, GptqGroupsOf32AreWrittenToGgufAsQ4_0) {
  TempDir dir{"moe-packed-in"};
  const fs::path native = quantize_rtn(dir.path(), "mixtral-tiny", "native", {"--codec", "int4", "--group", "32", "--sym"});
  const fs::path in = dir / "gptq";
  ASSERT_FALSE(export_packed(native, in, "gptq").is_null());
  fs::create_directories(dir / "a");
  fs::create_directories(dir / "b");
  run_ok({"-q", "export", in.string(), (dir / "a" / "m.gguf").string(), "--type", "q8_0"});
  run_ok({"-q", "export", native.string(), (dir / "b" / "m.gguf").string(), "--type", "q8_0"});
  expect_same_gguf_tensors(dir / "a" / "m.gguf", dir / "b" / "m.gguf");
  for (const auto& [src, sub] : {std::pair{in, "a"}, std::pair{native, "b"}})
    run_ok({"-q", "prune", src.string(), (dir / sub / "p.gguf").string(), "--method", "random", "--keep", "6", "--format",
            "gguf", "--gguf-type", "q8_0"});
  expect_same_gguf_tensors(dir / "a" / "p.gguf", dir / "b" / "p.gguf");
  const auto f = io::GgufFile::open(io::Env::posix(), dir / "a" / "p.gguf");
  const io::GgufTensorInfo* t = f.find_tensor("blk.1.ffn_down_exps.weight");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(std::string(quant::ggml_type_info(t->type).name), "q4_0");
}

// An AWQ input (asymmetric groups of 16) pruned and written as gptq: every expert of the output
// decodes to exactly one of the input's experts of its layer (codes, zero points and scales kept,
// nothing re-quantized), and its experts are GPTQ codes.
TEST(PackedInputCodes, PruneOfAnAwqInputWritesItsCodesAsGptq) {
  TempDir dir{"moe-packed-in"};
  const fs::path src = kSrc / "data/packed-inputs/awq-tiny", out = dir / "pruned";
  run_ok({"-q", "prune", src.string(), out.string(), "--method", "random", "--keep", "3", "--format", "gptq"});
  auto& env = io::Env::posix();
  const auto ic = io::Checkpoint::open(env, src), oc = io::Checkpoint::open(env, out);
  const auto in = model::Model::load(ic), pr = model::Model::load(oc);
  EXPECT_EQ(read_json(out / "config.json")["quantization_config"]["quant_method"], "gptq");
  size_t checked = 0;
  for (size_t l = 0; l < pr.layers().size(); ++l) {
    if (!pr.layers()[l].moe) continue;
    const auto& ie = in.layers()[l].moe->experts;
    for (const auto& e : pr.layers()[l].moe->experts) {
      ASSERT_NE(e.up.encoding(), nullptr);
      EXPECT_EQ(e.up.encoding()->name(), "gptq-int4");
      const auto up = e.up.to_f32(), gate = e.gate.to_f32(), down = e.down.to_f32();
      const bool found = std::any_of(ie.begin(), ie.end(), [&](const model::Mlp& x) {
        return x.up.to_f32() == up && x.gate.to_f32() == gate && x.down.to_f32() == down;
      });
      EXPECT_TRUE(found) << "layer " << l;
      ++checked;
    }
  }
  EXPECT_GT(checked, 0u);
}

// An AWQ input (the NumPy-made fixture: asymmetric groups of 16) pruned without --format is written
// as AWQ again: every kept expert's qweight, qzeros and scales are the input's bytes (the report's
// kept ids say which input expert each one is), the config is AutoAWQ's, nothing else is packed.
TEST(PackedInputCodes, PruneOfAnAwqInputWithoutFormatKeepsItsTensors) {
  TempDir dir{"moe-packed-in"};
  const fs::path src = kSrc / "data/packed-inputs/awq-tiny", out = dir / "pruned";
  const RunResult r = run_tool({"prune", src.string(), out.string(), "--method", "random", "--keep", "3"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("output: format awq, the input's (the kept experts' codes written unchanged)"), std::string::npos) << r.out;
  const json q = read_json(out / "config.json").at("quantization_config");
  EXPECT_EQ(q.at("quant_method"), "awq");
  EXPECT_EQ(q.at("version"), "gemm");
  EXPECT_EQ(q.at("zero_point"), true);
  EXPECT_EQ(q.at("group_size"), 16);
  auto& env = io::Env::posix();
  const auto ic = io::Checkpoint::open(env, src), oc = io::Checkpoint::open(env, out);
  const json rep = read_json(out / "moe_tool_report.json");
  EXPECT_EQ(expect_kept_experts_copied(oc, ic, rep, {".qweight", ".qzeros", ".scales"}, 3), 2u * 3 * 3 * 3);
  // The report counts the AWQ files written (4 + 16/16 + 4/16 bits at groups of 16: codes, F16
  // scales, packed zero points), as the input's: a prune changes no expert's bits.
  EXPECT_EQ(rep.at("expert_bits_per_param").at("after"), 5.25);
  EXPECT_EQ(rep.at("expert_bits_per_param").at("before"), 5.25);
  // Only the experts are packed: the attention stays dense, as in the input, and is named.
  for (const auto& n : oc.names()) {
    if (n.ends_with(".qweight")) {
      EXPECT_NE(n.find(".experts."), std::string::npos) << n;
    }
  }
  const auto skip = q.at("modules_to_not_convert").get<std::vector<std::string>>();
  EXPECT_NE(std::find(skip.begin(), skip.end(), "model.layers.1.self_attn.q_proj"), skip.end());
  EXPECT_NE(std::find(skip.begin(), skip.end(), "model.layers.0.block_sparse_moe.gate"), skip.end());
}

// The compressed-tensors FP8 fixture pruned without --format is written as compressed-tensors
// float-quantized: every kept FP8 Linear's weight, weight_scale (its stored dtype and shape) and
// input_scale byte for byte the input's module it came from, the removed experts absent, the
// input's quantization_config; eval equals that of the same prune written the old way (--format
// hf: the FP8 codes under moe-tool's own config), so the codes and scales are unchanged.
TEST(PackedInputCodes, PruneOfAnFp8InputWithoutFormatKeepsItsTensors) {
  TempDir dir{"moe-packed-in"};
  const fs::path src = kSrc / "data/packed-inputs/fp8-tiny", out = dir / "pruned", hf = dir / "pruned-hf";
  const RunResult r = run_tool({"prune", src.string(), out.string(), "--method", "random", "--keep", "3"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("output: format compressed-tensors, the input's (float-quantized: the kept FP8 Linears' weight, "
                       "weight_scale and input_scale copied as stored)"),
            std::string::npos) << r.out;
  const json cin = read_json(src / "config.json"), cout = read_json(out / "config.json");
  const json q = cout.at("quantization_config");
  EXPECT_EQ(q.at("quant_method"), "compressed-tensors");
  EXPECT_EQ(q.at("format"), "float-quantized");
  EXPECT_EQ(q.at("config_groups"), cin.at("quantization_config").at("config_groups"));
  EXPECT_EQ(q, cin.at("quantization_config"));  // its ignore names no expert: nothing renumbered
  EXPECT_EQ(cout.at("num_local_experts"), 3);
  auto& env = io::Env::posix();
  const auto ic = io::Checkpoint::open(env, src), oc = io::Checkpoint::open(env, out);
  const json rep = read_json(out / "moe_tool_report.json");
  size_t checked = expect_kept_experts_copied(oc, ic, rep, {".weight", ".weight_scale", ".input_scale"}, 3);
  EXPECT_EQ(rep.at("expert_bits_per_param").at("after"), rep.at("expert_bits_per_param").at("before"));
  for (const auto& l : rep.at("layers")) {
    const int layer = l.at("layer").get<int>();
    // The attention projections (strategy tensor): BF16 [1] weight_scale and the static input_scale kept.
    for (const char* m : {"q_proj", "k_proj", "v_proj", "o_proj"})
      for (const char* part : {".weight", ".weight_scale", ".input_scale"}) {
        const std::string a = "model.layers." + std::to_string(layer) + ".self_attn." + m + part;
        expect_same_tensor(oc, a, ic, a);
        ++checked;
      }
  }
  EXPECT_EQ(checked, 2u * 3 * 3 * 2 + 2u * 4 * 3);
  for (const auto& n : oc.names()) {
    EXPECT_EQ(n.find(".experts.3."), std::string::npos) << n;  // 3 experts kept: indices 0..2
    EXPECT_FALSE(n.ends_with("_scale_inv")) << n;
  }
  // Read back as the same encodings: eval equals the prune written as hf (FP8 codes, moe-tool's config).
  run_ok({"-q", "prune", src.string(), hf.string(), "--method", "random", "--keep", "3", "--format", "hf"});
  EXPECT_NE(read_json(hf / "config.json").at("quantization_config").at("quant_method"), "compressed-tensors");
  EXPECT_EQ(read_json(hf / "moe_tool_report.json").at("layers"), rep.at("layers"));
  // The fixture (vocabulary 64) has no tokenizer: one of single characters, no merges, is added to
  // both outputs, and a text of those characters scored.
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {"\u0120", 3}};
  for (char c = 'a'; c <= 'z'; ++c) vocab[std::string(1, c)] = 4 + (c - 'a');
  const json tok = {{"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr},
                    {"added_tokens", json::array({{{"id", 0}, {"content", "<unk>"}, {"special", true}},
                                                  {{"id", 1}, {"content", "<s>"}, {"special", true}},
                                                  {{"id", 2}, {"content", "</s>"}, {"special", true}}})},
                    {"normalizer", nullptr}, {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}}},
                    {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}, {"unk_token", "<unk>"}}}};
  for (const fs::path& m : {out, hf}) {
    write_file(m / "tokenizer.json", tok.dump(2) + "\n");
    write_file(m / "tokenizer_config.json", json{{"bos_token", "<s>"}, {"eos_token", "</s>"}}.dump() + "\n");
  }
  std::string text;
  for (int i = 0; i < 8; ++i) text += "the quick brown fox jumps over the lazy dog and keeps running ";
  write_file(dir / "text.txt", text);
  auto eval_of = [&](const fs::path& m) {
    const RunResult e =
        run_tool({"-q", "eval", m.string(), "--text", (dir / "text.txt").string(), "--ctx", "32", "--max-windows", "4", "--json"});
    EXPECT_EQ(e.exit_code, 0) << e.describe();
    return e.exit_code == 0 ? json::parse(e.out) : json();
  };
  const json a = eval_of(out), b = eval_of(hf);
  ASSERT_TRUE(a.contains("nll_sum")) << a.dump();
  EXPECT_GT(a.at("tokens_scored").get<int64_t>(), 64);
  EXPECT_EQ(a.at("nll_sum"), b.at("nll_sum"));
  EXPECT_EQ(a.at("perplexity"), b.at("perplexity"));
  const RunResult ins = run_tool({"inspect", out.string()});
  ASSERT_EQ(ins.exit_code, 0) << ins.describe();
  EXPECT_NE(ins.out.find("fp8-block"), std::string::npos) << ins.out;
}

// The fixture with the experts' weight_scale stored F16 [out] (as vLLM's channel scales may be)
// and a static input_scale per expert: both kept as stored by a prune, the scales not widened to
// [out, 1] or F32; eval of the output equals that of the hf prune.
// A copy of the FP8 fixture whose experts carry a static input_scale and F16 [out] weight scales
// (`mixed`: the odd experts BF16 [out, 1] instead, so that experts are stored unlike each other),
// pruned to 2 experts without --format: every kept expert's tensors as stored, decoded as the hf
// prune decodes.
void prune_fp8_copy(bool mixed) {
  TempDir dir{"moe-packed-in"};
  const fs::path fixture = kSrc / "data/packed-inputs/fp8-tiny", src = dir / "fp8", out = dir / "pruned";
  const auto fc = io::Checkpoint::open(io::Env::posix(), fixture);
  SynthCheckpoint ck;
  ck.family = "mixtral";
  ck.config = read_json(fixture / "config.json");
  json& g0 = ck.config["quantization_config"]["config_groups"]["group_0"];
  g0["input_activations"] = {{"num_bits", 8}, {"type", "float"}, {"symmetric", true}, {"dynamic", false}, {"strategy", "tensor"}};
  auto add = [&](const std::string& name, const core::Tensor& t) {
    ck.tensors.push_back({name, t.dtype(), t.shape(), std::vector<uint8_t>(t.data(), t.data() + t.nbytes())});
  };
  for (const auto& n : fc.names()) {
    const core::Tensor t = fc.tensor(n);
    if (n.find(".experts.") != std::string::npos && n.ends_with(".weight_scale")) {
      const bool odd = mixed && std::stoi(n.substr(n.find(".experts.") + 9)) % 2 == 1;
      add(n, odd ? t.converted(core::DType::BF16) : t.converted(core::DType::F16).reshaped({t.dim(0)}));
      const float in_scale = 0.02f + 0.001f * static_cast<float>(ck.tensors.size());
      core::Tensor is = core::Tensor::zeros(core::DType::F32, {1});
      std::memcpy(is.mutable_data(), &in_scale, 4);
      add(n.substr(0, n.size() - std::string("weight_scale").size()) + "input_scale", is);
    } else {
      add(n, t);
    }
  }
  write_synth(ck, src);
  const RunResult r = run_tool({"prune", src.string(), out.string(), "--method", "random", "--keep", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(read_json(out / "config.json").at("quantization_config"), ck.config.at("quantization_config"));
  const auto ic = io::Checkpoint::open(io::Env::posix(), src), oc = io::Checkpoint::open(io::Env::posix(), out);
  const json rep = read_json(out / "moe_tool_report.json");
  EXPECT_EQ(expect_kept_experts_copied(oc, ic, rep, {".weight", ".weight_scale", ".input_scale"}, 2), 2u * 2 * 3 * 3);
  bool moved = false;  // an expert written at an index of the other parity (stored unlike the input's there)
  for (const auto& l : rep.at("layers")) {
    const auto kept = l.at("passes").at(0).at("kept").get<std::vector<int>>();
    for (size_t e = 0; e < kept.size(); ++e) moved = moved || kept[e] % 2 != static_cast<int>(e % 2);
  }
  if (mixed) {
    EXPECT_TRUE(moved) << rep.at("layers").dump();
  }
  if (!mixed) {
    EXPECT_EQ(oc.info("model.layers.0.block_sparse_moe.experts.0.w1.weight_scale").dtype, core::DType::F16);
    EXPECT_EQ(oc.info("model.layers.0.block_sparse_moe.experts.0.w1.weight_scale").shape, (core::Shape{64}));
  }
  // Decoded as the hf prune decodes (the F16 scales read as F32 either way).
  run_ok({"-q", "prune", src.string(), (dir / "hf").string(), "--method", "random", "--keep", "2", "--format", "hf"});
  run_ok({"-q", "convert", out.string(), (dir / "a").string(), "--dtype", "f32", "--materialize"});
  run_ok({"-q", "convert", (dir / "hf").string(), (dir / "b").string(), "--dtype", "f32", "--materialize"});
  EXPECT_EQ(first_difference(read_tensors(dir / "a"), read_tensors(dir / "b")), "");
}

TEST(PackedInputCodes, PruneOfAnFp8InputKeepsF16RowScalesAndStaticInputScales) { prune_fp8_copy(false); }

// The FP8 fixture with a kv_cache_scheme and each attention module's k_scale / v_scale (shape [1],
// BF16 in layer 0 and F32 in layer 1, as compressed-tensors' _initialize_attn_scales stores them in
// the module's dtype): every command reads it, the scales are not applied (eval and the experts'
// decoded weights equal the fixture's), a prune without --format copies them as stored under the
// input's quantization_config, --format hf writes neither them nor the scheme, and a bad scale,
// a missing or stray one, or a scale without a scheme is refused naming the tensor or the key.
TEST(PackedInputCodes, KvCacheScalesAreReadAndCopiedByAPruneOfAnFp8Input) {
  TempDir dir{"moe-packed-in"};
  const fs::path fixture = kSrc / "data/packed-inputs/fp8-tiny", src = dir / "kv", out = dir / "pruned";
  const auto fc = io::Checkpoint::open(io::Env::posix(), fixture);
  auto make = [&](const fs::path& to, const std::function<void(SynthCheckpoint&)>& edit) {
    SynthCheckpoint ck;
    ck.family = "mixtral";
    ck.config = read_json(fixture / "config.json");
    ck.config["quantization_config"]["kv_cache_scheme"] = {{"num_bits", 8}, {"type", "float"}, {"symmetric", true},
                                                          {"dynamic", false}, {"strategy", "tensor"}};
    for (const auto& n : fc.names()) {
      const core::Tensor t = fc.tensor(n);
      ck.tensors.push_back({n, t.dtype(), t.shape(), std::vector<uint8_t>(t.data(), t.data() + t.nbytes())});
    }
    for (int l = 0; l < 2; ++l)
      for (const char* kv : {"k_scale", "v_scale"}) {
        const float v = 0.01f * static_cast<float>(l + 1) + (kv[0] == 'v' ? 0.005f : 0.0f);
        core::Tensor t = core::Tensor::zeros(core::DType::F32, {1});
        std::memcpy(t.mutable_data(), &v, 4);
        if (l == 0) t = t.converted(core::DType::BF16);
        ck.tensors.push_back({"model.layers." + std::to_string(l) + ".self_attn." + kv, t.dtype(), t.shape(),
                              std::vector<uint8_t>(t.data(), t.data() + t.nbytes())});
      }
    edit(ck);
    WriteOptions o;
    o.writer = Writer::HandRolled;  // writes a NaN scale as given
    write_synth(ck, to, o);
  };
  make(src, [](SynthCheckpoint&) {});
  // Read like the fixture: its weights decode to the same values.
  run_ok({"-q", "convert", src.string(), (dir / "a").string(), "--dtype", "f32", "--materialize"});
  run_ok({"-q", "convert", fixture.string(), (dir / "b").string(), "--dtype", "f32", "--materialize"});
  EXPECT_EQ(first_difference(read_tensors(dir / "a"), read_tensors(dir / "b")), "");
  const auto ac = io::Checkpoint::open(io::Env::posix(), dir / "a");
  for (const auto& n : ac.names()) EXPECT_FALSE(n.ends_with("_scale")) << n;
  // A prune without --format: the input's quantization_config (with the scheme) and its four scales as stored.
  const RunResult r = run_tool({"prune", src.string(), out.string(), "--method", "random", "--keep", "3"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(read_json(out / "config.json").at("quantization_config"), read_json(src / "config.json").at("quantization_config"));
  const auto ic = io::Checkpoint::open(io::Env::posix(), src), oc = io::Checkpoint::open(io::Env::posix(), out);
  for (int l = 0; l < 2; ++l)
    for (const char* kv : {"k_scale", "v_scale"}) {
      const std::string n = "model.layers." + std::to_string(l) + ".self_attn." + kv;
      expect_same_tensor(oc, n, ic, n);
      EXPECT_EQ(oc.info(n).dtype, l == 0 ? core::DType::BF16 : core::DType::F32);
    }
  EXPECT_EQ(read_json(out / "moe_tool_report.json").at("output").at("kv_cache_scales"), 4);
  run_ok({"-q", "inspect", out.string()});
  // Written hf: the FP8 codes under moe-tool's config, no scheme and no scales.
  run_ok({"-q", "prune", src.string(), (dir / "hf").string(), "--method", "random", "--keep", "3", "--format", "hf"});
  EXPECT_FALSE(read_json(dir / "hf" / "config.json").at("quantization_config").contains("kv_cache_scheme"));
  const auto hc = io::Checkpoint::open(io::Env::posix(), dir / "hf");
  for (const auto& n : hc.names())
    EXPECT_FALSE(n.ends_with(".k_scale") || n.ends_with(".v_scale")) << n;
  // Refusals, nothing written.
  auto refused = [&](const std::string& what, const std::function<void(SynthCheckpoint&)>& edit, const std::string& want) {
    const fs::path bad = dir / ("bad-" + what), o = dir / ("out-" + what);
    make(bad, edit);
    const RunResult b = run_tool({"prune", bad.string(), o.string(), "--method", "random", "--keep", "3"});
    EXPECT_EQ(b.exit_code, 2) << what << ": " << b.describe();
    EXPECT_NE(b.err.find(want), std::string::npos) << what << ": " << b.err;
    EXPECT_FALSE(fs::exists(o)) << what;
  };
  auto scale_of = [](SynthCheckpoint& ck, const std::string& n) -> SynthTensor& {
    for (auto& t : ck.tensors)
      if (t.name == n) return t;
    throw std::out_of_range(n);
  };
  refused("nan", [&](SynthCheckpoint& ck) {
    SynthTensor& t = scale_of(ck, "model.layers.1.self_attn.v_scale");
    const float nan = std::nanf("");
    std::memcpy(t.data.data(), &nan, 4);
  }, "model.layers.1.self_attn.v_scale: KV-cache scale nan");
  refused("zero", [&](SynthCheckpoint& ck) { std::fill(scale_of(ck, "model.layers.1.self_attn.k_scale").data.begin(),
                                                       scale_of(ck, "model.layers.1.self_attn.k_scale").data.end(), 0); },
          "model.layers.1.self_attn.k_scale: KV-cache scale 0");
  refused("shape", [&](SynthCheckpoint& ck) {
    SynthTensor& t = scale_of(ck, "model.layers.1.self_attn.k_scale");
    t.shape = {1, 1};
  }, "model.layers.1.self_attn.k_scale: KV-cache scale of shape [1, 1]");
  refused("no-scheme", [&](SynthCheckpoint& ck) { ck.config["quantization_config"]["kv_cache_scheme"] = nullptr; },
          "a KV-cache scale, but");
  refused("head", [&](SynthCheckpoint& ck) { ck.config["quantization_config"]["kv_cache_scheme"]["strategy"] = "attn_head"; },
          "kv_cache_scheme.strategy: \"attn_head\" is not read");
  refused("missing-one", [&](SynthCheckpoint& ck) {
    std::erase_if(ck.tensors, [](const SynthTensor& t) { return t.name == "model.layers.0.self_attn.v_scale"; });
  }, "model.layers.0.self_attn.v_scale: missing (quantization_config.kv_cache_scheme is set");
  refused("stray", [&](SynthCheckpoint& ck) {
    ck.tensors.push_back(scale_of(ck, "model.layers.1.self_attn.k_scale"));
    ck.tensors.back().name = "model.layers.1.self_attn.k_proj.k_scale";
  }, "model.layers.1.self_attn.k_proj.k_scale: not expected for mixtral");
  refused("no-scales", [&](SynthCheckpoint& ck) {
    std::erase_if(ck.tensors, [](const SynthTensor& t) { return t.name.ends_with(".k_scale") || t.name.ends_with(".v_scale"); });
  }, "a KV-cache scheme, but no tensor ends in .k_scale or .v_scale");
}

// Experts stored unlike each other are planned after the prune decides (they were planned by
// index: "write past its planned size", exit 1).
TEST(PackedInputCodes, PruneOfExpertsStoredUnlikeEachOther) { prune_fp8_copy(true); }

// Entries of the quantization_config that name an expert module exactly follow the prune: a kept
// expert's renumbered, a removed one's dropped (a group left with no target goes); patterns stay.
TEST(PackedInputCodes, PruneOfAnFp8InputRenumbersExactTargets) {
  TempDir dir{"moe-packed-in"};
  const fs::path src = dir / "fp8", out = dir / "pruned";
  copy_folder(kSrc / "data/packed-inputs/fp8-tiny", src);
  json cfg = read_json(src / "config.json");
  json& groups = cfg["quantization_config"]["config_groups"];
  const std::string p = "model.layers.0.block_sparse_moe.experts.";
  groups["group_2"] = groups["group_0"];
  groups["group_2"]["targets"] = {p + "0.w1", p + "1.w1", p + "2.w1", p + "3.w1"};
  groups["group_3"] = groups["group_0"];
  groups["group_3"]["targets"] = {p + "3.w2"};
  write_file(src / "config.json", cfg.dump(2) + "\n");
  const RunResult r = run_tool({"prune", src.string(), out.string(), "--method", "random", "--keep", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto kept = read_json(out / "moe_tool_report.json").at("layers").at(0).at("passes").at(0).at("kept").get<std::vector<int>>();
  ASSERT_EQ(kept.size(), 2u);
  const json q = read_json(out / "config.json").at("quantization_config");
  auto w1 = q.at("config_groups").at("group_2").at("targets").get<std::vector<std::string>>();
  std::sort(w1.begin(), w1.end());
  EXPECT_EQ(w1, (std::vector<std::string>{p + "0.w1", p + "1.w1"}));
  EXPECT_EQ(q.at("config_groups").at("group_0"), groups.at("group_0"));
  EXPECT_EQ(q.at("config_groups").contains("group_3"), std::find(kept.begin(), kept.end(), 3) != kept.end());
  if (q.at("config_groups").contains("group_3")) {
    const size_t k = static_cast<size_t>(std::find(kept.begin(), kept.end(), 3) - kept.begin());
    EXPECT_EQ(q.at("config_groups").at("group_3").at("targets"), json({p + std::to_string(k) + ".w2"}));
  }
  // The output reads back (a target naming no stored module would be refused).
  const RunResult ins = run_tool({"inspect", out.string()});
  EXPECT_EQ(ins.exit_code, 0) << ins.describe();
  // A `re:` target naming an expert by its index that the same prune renumbers: refused (it would
  // match another expert after the prune), nothing written.
  size_t e = 0;
  while (e < kept.size() && kept[e] == static_cast<int>(e)) ++e;
  ASSERT_LT(e, kept.size()) << "the prune moved no expert of layer 0";
  groups["group_4"] = groups["group_0"];
  groups["group_4"]["targets"] = {"re:model\\.layers\\.0\\.block_sparse_moe\\.experts\\." + std::to_string(kept[e]) + "\\..*"};
  write_file(src / "config.json", cfg.dump(2) + "\n");
  const RunResult m = run_tool({"prune", src.string(), (dir / "re").string(), "--method", "random", "--keep", "2"});
  EXPECT_EQ(m.exit_code, 2) << m.describe();
  EXPECT_NE(m.err.find("quantization_config.config_groups.group_4.targets[0]"), std::string::npos) << m.err;
  EXPECT_NE(m.err.find("the pattern names experts by index"), std::string::npos) << m.err;
  EXPECT_FALSE(fs::exists(dir / "re"));
}

// --dtype given: an hf option, the weights dequantized, said in the summary; so is a prune the
// format cannot hold (novices), with a warning.
TEST(PackedInputCodes, PruneOfAnFp8InputWithDtypeIsWrittenHf) {
  TempDir dir{"moe-packed-in"};
  const fs::path src = kSrc / "data/packed-inputs/fp8-tiny", out = dir / "pruned";
  const RunResult r = run_tool({"prune", src.string(), out.string(), "--method", "random", "--keep", "3", "--dtype", "bf16"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("output: format hf, the weights dequantized (--dtype is an hf option; --format compressed-tensors "
                       "keeps the input's codes)"),
            std::string::npos) << r.out;
  EXPECT_FALSE(read_json(out / "config.json").contains("quantization_config"));
  const auto oc = io::Checkpoint::open(io::Env::posix(), out);
  EXPECT_EQ(oc.info("model.layers.0.block_sparse_moe.experts.0.w1.weight").dtype, core::DType::BF16);
  EXPECT_FALSE(oc.has("model.layers.0.self_attn.q_proj.input_scale"));
  // Ragged counts: compressed-tensors names one expert count; hf (the FP8 codes), with the reason.
  const RunResult g = run_tool({"prune", src.string(), (dir / "ragged").string(), "--method", "random", "--keep-ratio", "0.5",
                                "--no-uniform"});
  ASSERT_EQ(g.exit_code, 0) << g.describe();
  EXPECT_NE(g.out.find("output: written as hf (the FP8 codes under moe-tool's own config), not in the input's format "
                       "compressed-tensors, which cannot hold it: --no-uniform"),
            std::string::npos) << g.out;
  EXPECT_EQ(read_json(dir / "ragged" / "config.json").at("quantization_config").at("quant_method"), "moe_tool");
  // --format compressed-tensors with a dtype: refused (a dense folder under the input's FP8 config
  // was written before, which no reader loads), nothing written.
  for (const char* opt : {"--dtype", "--materialize"}) {
    std::vector<std::string> args = {"prune", src.string(), (dir / "ct").string(), "--method", "random", "--keep", "3",
                                     "--format", "compressed-tensors", opt};
    if (std::string(opt) == "--dtype") args.push_back("f16");
    const RunResult c = run_tool(args);
    EXPECT_EQ(c.exit_code, 2) << c.describe();
    EXPECT_NE(c.err.find(opt), std::string::npos) << c.err;
    EXPECT_FALSE(fs::exists(dir / "ct"));
  }
}

// A GPTQ input whose codes moe-tool's intN cannot hold (act-order: a g_idx that is not i div G) is
// refused by export --format, saying so and naming a way out; the way out named works.
TEST(PackedInputRefusals, ExportOfAnActOrderInputNamesTheWayOut) {
  TempDir dir{"moe-packed-in"};
  const fs::path native = quantize_rtn(dir.path(), "qwen2moe-tiny", "native", {"--codec", "int4", "--group", "32", "--sym"});
  const fs::path in = dir / "gptq";
  ASSERT_FALSE(export_packed(native, in, "gptq").is_null());
  make_act_order(in);
  for (const std::string format : {"compressed-tensors", "gptq"}) {
    SCOPED_TRACE(format);
    const RunResult r = run_tool({"export", in.string(), (dir / "out").string(), "--format", format});
    expect_clean_failure(r, in.string() + ": model.layers.0.mlp.experts.0.up_proj.weight is in the GPTQ format already");
    // The one cause, not the list of possible ones.
    EXPECT_NE(r.err.find("cannot hold (act-order: its g_idx puts inputs out of order in the groups), read decoded"),
              std::string::npos) << r.err;
    EXPECT_NE(r.err.find("moe-tool quantize " + in.string() + " OUT --method rtn --codec int4 --group 128 --sym"), std::string::npos)
        << r.err;
    EXPECT_EQ(r.err.find("no weight is quantized"), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(dir / "out"));
  }
  const RunResult again = run_tool({"-q", "quantize", in.string(), (dir / "requant").string(), "--method", "rtn", "--codec",
                                    "int4", "--group", "128", "--sym"});
  ASSERT_EQ(again.exit_code, 0) << again.describe();
  EXPECT_FALSE(export_packed(dir / "requant", dir / "out", "compressed-tensors").is_null());
}

}  // namespace
}  // namespace moe::test
