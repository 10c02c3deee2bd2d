// `export --format compressed-tensors|gptq|awq` through the CLI: the fixtures quantized by `quantize`
// (int4/int8, symmetric and asymmetric groups) exported, read back with our safetensors reader and
// decoded by the test-local decoders (support/packed_decode.h): every weight equals the native
// checkpoint's dequantized weight exactly, every dense tensor is copied byte for byte, the config
// is the one the libraries write, the figures match data/golden/compressed.json (made by
// data/scripts/check_compressed.py, an independent NumPy decoder), and `eval` of the export decoded
// back equals `eval` of the native checkpoint. Then every refusal: exit 2, one line, nothing written.
#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "io/checkpoint.h"
#include "io/checkpoint_writer.h"
#include "io/env.h"
#include "model/model.h"
#include "support/cli_expect.h"
#include "support/packed_decode.h"
#include "support/packed_fixture.h"
#include "support/paths.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

std::vector<uint8_t> bytes_of(const io::Checkpoint& c, const std::string& name) {
  const core::Tensor t = c.tensor(name);
  return {t.data(), t.data() + t.nbytes()};
}

std::vector<std::string> read_tensors_names(const fs::path& dir) {
  return io::Checkpoint::open(io::Env::posix(), dir).names();
}

// Module name -> decoded [out, in] weight, for every packed Linear of an export.
std::map<std::string, std::vector<float>> decode_export(const fs::path& dir) {
  auto& env = io::Env::posix();
  const auto c = io::Checkpoint::open(env, dir);
  const json q = c.config().at("quantization_config");
  std::map<std::string, std::vector<float>> out;
  const bool gptq = q.at("quant_method") == "gptq", awq = q.at("quant_method") == "awq";
  const int bits = gptq || awq ? q.at("bits").get<int>() : q["config_groups"]["group_0"]["weights"]["num_bits"].get<int>();
  const std::string key = gptq || awq ? ".qweight" : ".weight_packed";
  for (const auto& name : c.names()) {
    if (name.size() <= key.size() || name.compare(name.size() - key.size(), key.size(), key) != 0) continue;
    const std::string mod = name.substr(0, name.size() - key.size());
    if (awq) {
      EXPECT_EQ(bits, 4);
      const int64_t out_f = c.info(mod + ".scales").shape.at(1), in_f = c.info(name).shape.at(0);
      out[mod] = decode_awq(out_f, in_f, bytes_of(c, name), bytes_of(c, mod + ".qzeros"), bytes_of(c, mod + ".scales"));
    } else if (gptq) {
      const int64_t out_f = c.info(mod + ".scales").shape.at(1), in_f = c.info(mod + ".g_idx").shape.at(0);
      out[mod] = decode_gptq(bits, out_f, in_f, bytes_of(c, name), bytes_of(c, mod + ".qzeros"), bytes_of(c, mod + ".scales"),
                             bytes_of(c, mod + ".g_idx"));
    } else {
      const auto shape = bytes_of(c, mod + ".weight_shape");
      int64_t dims[2];
      std::memcpy(dims, shape.data(), 16);
      const bool zp = c.has(mod + ".weight_zero_point");
      out[mod] = decode_compressed_tensors(bits, dims[0], dims[1], bytes_of(c, name), bytes_of(c, mod + ".weight_scale"),
                                           c.info(mod + ".weight_scale").shape.at(1),
                                           zp ? bytes_of(c, mod + ".weight_zero_point") : std::vector<uint8_t>{});
    }
  }
  return out;
}

// Every weight of the export equals the native checkpoint's: packed ones decoded against the
// native dequantization (f32, exact), dense ones byte for byte; nothing else is in the files.
// Returns the number of packed Linears.
size_t expect_same_weights(const fs::path& native, const fs::path& exported) {
  auto& env = io::Env::posix();
  const auto nc = io::Checkpoint::open(env, native);
  const auto model = model::Model::load(nc);
  const auto ec = io::Checkpoint::open(env, exported);
  const auto decoded = decode_export(exported);
  std::set<std::string> dense_names;
  size_t packed = 0;
  for (const auto& o : model.outputs(model::OutputOptions{core::DType::F32, /*materialize=*/true})) {
    const std::string mod = o.name.substr(0, o.name.size() - 7);
    if (auto it = decoded.find(mod); it != decoded.end() && o.name.ends_with(".weight")) {
      const core::Tensor t = o.make();
      EXPECT_EQ(it->second, std::vector<float>(reinterpret_cast<const float*>(t.data()),
                                               reinterpret_cast<const float*>(t.data()) + t.numel()))
          << o.name;
      ++packed;
      continue;
    }
    dense_names.insert(o.name);
    EXPECT_TRUE(ec.has(o.name)) << o.name;
    if (ec.has(o.name)) {
      EXPECT_EQ(bytes_of(ec, o.name), bytes_of(nc, o.name)) << o.name;
    }
  }
  EXPECT_EQ(packed, decoded.size());
  for (const auto& n : ec.names()) {
    const bool part = decoded.count(n.substr(0, n.rfind('.')));
    EXPECT_TRUE(part || dense_names.count(n)) << "unexpected tensor " << n;
  }
  return packed;
}

struct PackedCase {
  std::string fixture, format;
  std::vector<std::string> flags;
  std::string tag;
};

void PrintTo(const PackedCase& c, std::ostream* os) { *os << c.tag; }

class ExportPacked : public ::testing::TestWithParam<PackedCase> {};

TEST_P(ExportPacked, DecodesToTheNativeWeightsAndTheGolden) {
  const auto& c = GetParam();
  TempDir dir{"moe-export-packed"};
  const fs::path native = quantize_rtn(dir.path(), c.fixture, "native", c.flags);
  const fs::path out = dir / "out";
  const json r = export_packed(native, out, c.format);
  ASSERT_FALSE(r.is_null());
  const size_t packed = expect_same_weights(native, out);
  EXPECT_EQ(r.at("quantized_linears").get<size_t>(), packed);
  // The golden of the NumPy decoder: modules, and the sum / sum of squares of every decoded value.
  const json g = read_json(kSrc / "data/golden/compressed.json").at(c.tag);
  const auto decoded = decode_export(out);
  double sum = 0, sq = 0;
  for (const auto& [m, w] : decoded)
    for (float x : w) sum += x, sq += static_cast<double>(x) * x;
  EXPECT_EQ(decoded.size(), g.at("modules").get<size_t>());
  EXPECT_NEAR(sum, g.at("sum").get<double>(), 1e-9 * std::max(1.0, std::abs(sum)));
  EXPECT_NEAR(sq, g.at("sum_sq").get<double>(), 1e-9 * sq);
  EXPECT_EQ(r.at("bytes").get<uint64_t>(), g.at("bytes").get<uint64_t>());
  // The copy is complete: side files and config (model keys kept, our block replaced).
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}) EXPECT_TRUE(fs::exists(out / f)) << f;
  EXPECT_FALSE(fs::exists(out / "moe_tool_report.json"));
  const json cfg = read_json(out / "config.json");
  EXPECT_EQ(cfg.at("model_type"), read_json(native / "config.json").at("model_type"));
  const json& q = cfg.at("quantization_config");
  if (c.format == "gptq") {
    EXPECT_EQ(q.at("quant_method"), "gptq");
    EXPECT_EQ(q.at("checkpoint_format"), "gptq");
    EXPECT_EQ(q.at("desc_act"), false);
  } else if (c.format == "awq") {
    // As AutoAWQ writes it; zero points always stored (zero_point true, symmetric ones as 8).
    EXPECT_EQ(q.at("quant_method"), "awq");
    EXPECT_EQ(q.at("version"), "gemm");
    EXPECT_EQ(q.at("bits"), 4);
    EXPECT_EQ(q.at("zero_point"), true);
    EXPECT_EQ(q.at("group_size"), r.at("group_size"));
    EXPECT_FALSE(q.contains("g_idx") || q.contains("desc_act"));
    // Every dense Linear is named (routers, lm_head, attention when kept), full names; none is
    // inside a quantized module's name (the loaders match substrings).
    const auto skip = q.at("modules_to_not_convert").get<std::vector<std::string>>();
    const std::set<std::string> skipped(skip.begin(), skip.end());
    EXPECT_TRUE(skipped.count("lm_head"));
    EXPECT_TRUE(skipped.count("model.layers.0." + std::string(c.fixture == "mixtral-tiny" ? "block_sparse_moe.gate" : "mlp.gate")));
    for (const auto& [m, w] : decoded)
      for (const auto& d : skip) EXPECT_EQ(m.find(d), std::string::npos) << d << " inside " << m;
    for (const auto& n : read_tensors_names(out))
      if (n.ends_with(".g_idx")) ADD_FAILURE() << "AWQ has no g_idx: " << n;
  } else {
    EXPECT_EQ(q.at("quant_method"), "compressed-tensors");
    EXPECT_EQ(q.at("format"), "pack-quantized");
    EXPECT_EQ(q.at("quantization_status"), "compressed");
    EXPECT_EQ(q["config_groups"]["group_0"]["targets"], json::array({"Linear"}));
    // Every dense Linear is ignored: routers, lm_head; nothing quantized is.
    std::set<std::string> ignore = q.at("ignore").get<std::set<std::string>>();
    EXPECT_TRUE(ignore.count("lm_head"));
    EXPECT_TRUE(ignore.count("model.layers.0." + std::string(c.fixture == "mixtral-tiny" ? "block_sparse_moe.gate" : "mlp.gate")));
    for (const auto& [m, w] : decoded) EXPECT_FALSE(ignore.count(m)) << m;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, ExportPacked,
    ::testing::Values(
        PackedCase{"mixtral-tiny", "compressed-tensors", {"--codec", "int4", "--group", "32", "--sym"}, "mixtral-tiny ct int4 g32 sym"},
        PackedCase{"mixtral-tiny", "gptq", {"--codec", "int4", "--group", "32", "--sym"}, "mixtral-tiny gptq int4 g32 sym"},
        PackedCase{"qwen2moe-tiny", "compressed-tensors", {"--codec", "int8", "--group", "64", "--attention", "int8"},
             "qwen2moe-tiny ct int8 g64 asym"},
        PackedCase{"qwen2moe-tiny", "gptq", {"--codec", "int4", "--group", "0", "--sym", "--attention", "int4"},
             "qwen2moe-tiny gptq int4 row sym"},
        PackedCase{"mixtral-tiny", "compressed-tensors", {"--codec", "int4", "--group", "128"}, "mixtral-tiny ct int4 g128 asym"},
        PackedCase{"mixtral-tiny", "awq", {"--codec", "int4", "--group", "32", "--sym"}, "mixtral-tiny awq int4 g32 sym"},
        PackedCase{"qwen2moe-tiny", "awq", {"--codec", "int4", "--group", "64", "--attention", "int4"},
             "qwen2moe-tiny awq int4 g64 asym attention"}),
    [](const auto& info) {
      std::string s = info.param.tag;
      for (char& ch : s)
        if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
      return s;
    });

// GPTQ's config: routers (and attention kept dense) are named by `dynamic` negatives and left out
// of modules_in_block_to_quantize; a model with every in-layer Linear quantized but the router
// still lists the router.
TEST(ExportPackedConfig, GptqNamesTheDenseLinearsOfTheLayers) {
  TempDir dir{"moe-export-packed"};
  const fs::path native = quantize_rtn(dir.path(), "mixtral-tiny", "native", {"--codec", "int4", "--group", "32", "--sym"});
  ASSERT_FALSE(export_packed(native, dir / "out", "gptq").is_null());
  const json q = read_json(dir / "out/config.json").at("quantization_config");
  EXPECT_EQ(q.at("bits"), 4);
  EXPECT_EQ(q.at("group_size"), 32);
  EXPECT_EQ(q.at("sym"), true);
  const auto mods = q.at("modules_in_block_to_quantize").at(0).get<std::vector<std::string>>();
  EXPECT_EQ(mods.size(), 8u * 3);  // 8 experts x w1, w2, w3; attention kept dense
  EXPECT_EQ(mods.front(), "block_sparse_moe.experts.0.w1");
  EXPECT_TRUE(q.at("dynamic").contains("-:.*\\.layers\\.\\d+\\.block_sparse_moe\\.gate$"));
  EXPECT_TRUE(q.at("dynamic").contains("-:.*\\.layers\\.\\d+\\.self_attn\\.q_proj$"));
}

// eval of the export decoded back to a dense f32 checkpoint equals eval of the native checkpoint,
// bit for bit (same codes, same scales).
TEST(ExportPackedEval, DecodedExportEvaluatesAsTheNativeModel) {
  TempDir dir{"moe-export-packed"};
  const fs::path native = quantize_rtn(dir.path(), "qwen2moe-tiny", "native", {"--codec", "int4", "--group", "32", "--sym"});
  for (const std::string format : {"compressed-tensors", "gptq", "awq"}) {
    SCOPED_TRACE(format);
    const fs::path out = dir / ("out-" + format), back = dir / ("back-" + format);
    ASSERT_FALSE(export_packed(native, out, format).is_null());
    auto& env = io::Env::posix();
    const auto ec = io::Checkpoint::open(env, out);
    const auto decoded = decode_export(out);
    std::vector<io::TensorSpec> plan;
    for (const auto& [m, w] : decoded) plan.push_back({m + ".weight", core::DType::F32, {}});
    for (const auto& n : ec.names())
      if (!decoded.count(n.substr(0, n.rfind('.')))) plan.push_back({n, ec.info(n).dtype, ec.info(n).shape});
    for (auto& s : plan)
      if (s.shape.empty()) {
        const std::string mod = s.name.substr(0, s.name.size() - 7);
        const int64_t in = format == "gptq" ? ec.info(mod + ".g_idx").shape.at(0)
                           : format == "awq" ? ec.info(mod + ".qweight").shape.at(0) : [&] {
          const auto b = bytes_of(ec, mod + ".weight_shape");
          int64_t d[2];
          std::memcpy(d, b.data(), 16);
          return d[1];
        }();
        s.shape = {static_cast<int64_t>(decoded.at(mod).size()) / in, in};
      }
    fs::create_directories(back);
    {
      io::CheckpointWriter w(env, back, plan, 5'000'000'000ull);
      for (const auto& s : plan) {
        const std::string mod = s.name.substr(0, s.name.size() - 7);
        if (auto it = decoded.find(mod); it != decoded.end() && s.dtype == core::DType::F32 && !ec.has(s.name))
          w.write(s.name, 0, it->second.data(), it->second.size() * 4);
        else
          w.write(s.name, ec.tensor(s.name));
      }
      w.finish();
    }
    json cfg = read_json(out / "config.json");
    cfg.erase("quantization_config");
    write_file(back / "config.json", cfg.dump(2));
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})
      fs::copy_file(out / f, back / f);
    const json a = eval_json(native, 4), b = eval_json(back, 4);
    ASSERT_TRUE(a.contains("perplexity")) << a.dump();
    EXPECT_EQ(a.at("perplexity"), b.at("perplexity"));
    EXPECT_EQ(a.at("nll_sum"), b.at("nll_sum"));
    EXPECT_EQ(a.at("tokens_scored"), b.at("tokens_scored"));
  }
}

// Refusals: exit 2, one line naming the tensor or flag and the way out, nothing written.
TEST(ExportPackedRefusals, EncodingsAndShapesNeitherLayoutHolds) {
  TempDir dir{"moe-export-packed"};
  const std::string mixtral = (kSrc / "data/models/mixtral-tiny").string();
  auto refused = [&](const std::vector<std::string>& args, const std::string& needle) {
    std::vector<std::string> a = {"export"};
    a.insert(a.end(), args.begin(), args.end());
    expect_clean_failure(run_tool(a), needle);
    EXPECT_FALSE(fs::exists(dir / "out"));
  };
  const std::string out = (dir / "out").string();
  // Dense input: nothing to write.
  refused({mixtral, out, "--format", "compressed-tensors"}, "no weight is quantized (intN)");
  // A folder needs --format; --type is GGUF's.
  refused({mixtral, out}, "OUT '" + out + "': not a .gguf file; give --format compressed-tensors");
  refused({mixtral, out, "--format", "gptq", "--type", "q4_0"}, "--type: gguf only");
  // A .gguf name for a folder format is a slip, not a folder to make.
  refused({mixtral, out + ".gguf", "--format", "gptq"}, "OUT '" + out + ".gguf': a .gguf name, but --format gptq writes a folder");
  EXPECT_FALSE(fs::exists(out + ".gguf"));
  const fs::path ternary = quantize_rtn(dir.path(), "mixtral-tiny", "ternary", {"--codec", "ternary"});
  refused({ternary.string(), out, "--format", "gptq"},
          "model.layers.0.block_sparse_moe.experts.0.w1.weight is encoded as 'ternary'");
  refused({ternary.string(), out, "--format", "gptq"}, "--codec int4 --group 128 --sym");
  const fs::path int2 = quantize_rtn(dir.path(), "mixtral-tiny", "int2", {"--codec", "int2", "--group", "32"});
  refused({int2.string(), out, "--format", "compressed-tensors"}, "2-bit codes (the layout holds 4 and 8 bits)");
  // Groups of 48 leave a shorter last group of the 128 inputs.
  const fs::path g48 = quantize_rtn(dir.path(), "mixtral-tiny", "g48", {"--codec", "int4", "--group", "48", "--sym"});
  refused({g48.string(), out, "--format", "gptq"}, "groups of 48, which do not divide the 128 inputs");
  // Attention at int8, experts at int4: one scheme per export.
  const fs::path mixed = quantize_rtn(dir.path(), "mixtral-tiny", "mixed", {"--codec", "int4", "--group", "32", "--sym", "--attention", "int8:g32:sym"});
  refused({mixed.string(), out, "--format", "compressed-tensors"}, "this export writes one scheme for every quantized Linear");
  // A quantized lm_head has no place in the gptq config here.
  const fs::path head = quantize_rtn(dir.path(), "mixtral-tiny", "head", {"--codec", "int4", "--group", "32", "--sym", "--lm-head", "codec"});
  refused({head.string(), out, "--format", "gptq"}, "lm_head.weight: a quantized lm_head");
  EXPECT_EQ(list_dir(dir.path()), (std::vector<std::string>{"g48", "head", "int2", "mixed", "ternary"}));
}

// AWQ: int4 groups only, whole words of 8 outputs, no quantized lm_head. Each refused before the
// folder is made, exit 2, one line naming the weight and the way out.
TEST(ExportPackedRefusals, AwqGroupBitsWidthAndLmHead) {
  TempDir dir{"moe-export-packed"};
  const std::string out = (dir / "out").string();
  auto refused = [&](const fs::path& in, const std::string& needle) {
    expect_clean_failure(run_tool({"export", in.string(), out, "--format", "awq"}), needle);
    EXPECT_FALSE(fs::exists(out));
  };
  const fs::path row = quantize_rtn(dir.path(), "mixtral-tiny", "row", {"--codec", "int4", "--group", "0", "--sym"});
  refused(row, "one group per row (group 0): AWQ's layout and config need a group size");
  refused(row, "--codec int4 --group 128 --sym");  // the way out names a group the shape takes
  const fs::path int8 = quantize_rtn(dir.path(), "mixtral-tiny", "int8", {"--codec", "int8", "--group", "32", "--sym"});
  refused(int8, "8-bit codes (AWQ GEMM packs 4 bits only): export --format gptq or compressed-tensors");
  const fs::path head = quantize_rtn(dir.path(), "mixtral-tiny", "head", {"--codec", "int4", "--group", "32", "--sym", "--lm-head", "codec"});
  refused(head, "lm_head.weight: a quantized lm_head, which the awq config does not hold here");
  // A synthetic mixtral with `patch` applied, quantized to int4 groups of 4 (and `more` flags).
  auto patched_int4 = [&](const std::string& name, const json& patch, std::vector<std::string> more) {
    SynthSpec spec;
    spec.config_patch = patch;
    const fs::path src = dir / name, q = dir / (name + "-q");
    write_synth(make_synth("mixtral", spec), src);
    std::vector<std::string> args = {"-q", "quantize", src.string(), q.string(), "--method", "rtn", "--codec", "int4", "--group", "4",
                                     "--sym"};
    args.insert(args.end(), more.begin(), more.end());
    EXPECT_EQ(run_tool(args).exit_code, 0) << name;
    return q;
  };
  // Experts 20 wide: w1 and w3 have 20 outputs, not whole words of 8.
  const fs::path narrow_q = patched_int4("narrow", {{"intermediate_size", 20}}, {});
  refused(narrow_q, "AWQ packs 8 outputs per int32 and needs a multiple of 8 outputs");
  // No group size helps a width that is not whole words: the way out is compressed-tensors (and,
  // for a router, keeping it dense), not a re-quantization.
  refused(narrow_q, "no group size makes this shape fit: export --format compressed-tensors");
  const fs::path routed_q = patched_int4("six", {{"num_local_experts", 6}}, {"--router", "codec"});
  refused(routed_q, "gate.weight (intN");
  refused(routed_q, "quantize with `--router keep` (kept dense), or export --format compressed-tensors");
  // The flags of a run: refused before any pass runs (--dry-run too).
  const RunResult r = run_tool({"quantize", (kSrc / "data/models/mixtral-tiny").string(), out, "--method", "rtn", "--codec",
                                "int8", "--group", "32", "--format", "awq", "--dry-run"});
  expect_clean_failure(r, "awq cannot hold (AWQ GEMM packs 4 bits only)");
  EXPECT_FALSE(fs::exists(out));
}

// A dense first layer among MoE layers (deepseek_v3, glm4_moe: first_k_dense_replace 1): the gptq
// config names one module set for every decoder layer. `quantize --format gptq` is refused before
// the pass runs (--dry-run too), `export --format gptq` before the folder is made; one line
// naming the dense layer's tensor and compressed-tensors as the way out, nothing written.
TEST(ExportPackedRefusals, GptqRefusesDenseLayersAmongMoeLayers) {
  TempDir dir{"moe-export-packed"};
  const std::string out = (dir / "out").string();
  const std::string why = "model.layers.0.mlp.gate_proj.weight: layer 0 has a dense MLP and layer 1 an MoE block, but the "
                          "gptq config names one set of quantized modules for every decoder layer: write --format "
                          "compressed-tensors";
  std::vector<std::string> natives;
  for (const std::string fixture : {"deepseek-v3-tiny", "glm4-moe-tiny"}) {
    SCOPED_TRACE(fixture);
    const std::string in = (kSrc / "data" / fixture).string();
    const std::vector<std::string> q = {"quantize", in, out, "--method", "rtn", "--group", "16", "--format", "gptq"};
    for (const bool dry : {true, false}) {
      std::vector<std::string> a = q;
      if (dry) a.push_back("--dry-run");
      const RunResult r = run_tool(a);
      expect_clean_failure(r, "--format gptq: " + why);
      EXPECT_EQ(r.out, "") << r.describe();
      EXPECT_TRUE(list_dir(dir.path()) == natives) << r.describe();
    }
    // The same model quantized in the native format, then exported.
    const fs::path native = dir / ("native-" + fixture);
    ASSERT_EQ(run_tool({"-q", "quantize", in, native.string(), "--method", "rtn", "--group", "16"}).exit_code, 0);
    natives.push_back(native.filename().string());
    expect_clean_failure(run_tool({"export", native.string(), out, "--format", "gptq"}),
                         native.string() + ": --format gptq: " + why);
    EXPECT_EQ(list_dir(dir.path()), natives);
    // compressed-tensors, the way out, holds it; so does awq (no per-layer module set: its
    // modules_to_not_convert names the dense Linears one by one).
    ASSERT_FALSE(export_packed(native, dir / "ct", "compressed-tensors").is_null());
    fs::remove_all(dir / "ct");
    ASSERT_FALSE(export_packed(native, dir / "awq", "awq").is_null());
    EXPECT_EQ(expect_same_weights(native, dir / "awq"), fixture == "deepseek-v3-tiny" ? 57u : 84u);
    fs::remove_all(dir / "awq");
  }
}

// What the export formats cannot hold but the statistics decide only at run time is refused from the
// flags, before any work (--dry-run too), nothing written: a merge whose experts stay dense
// (gptq / compressed-tensors), novices and ragged counts (every export format).
TEST(ExportPackedRefusals, MergeNovicesAndRaggedCountsBeforeAnyWork) {
  TempDir dir{"moe-export-packed"};
  const fs::path native = quantize_rtn(dir.path(), "mixtral-tiny", "native", {"--codec", "int4", "--group", "32", "--sym"});
  const std::string in = native.string(), out = (dir / "out").string(), calib = kCalib.string();
  const std::vector<std::string> text = {"--text", calib, "--ctx", "32", "--windows", "4"};
  struct Case {
    std::vector<std::string> args;
    std::string needle;
  };
  std::vector<Case> cases = {
      {{"merge", in, out, "--method", "msmoe", "--experts", "5", "--format", "gptq"}, "writes the merged experts dense"},
      {{"merge", in, out, "--method", "msmoe", "--experts", "5", "--format", "compressed-tensors"}, "writes the merged experts dense"},
      {{"prune", in, out, "--method", "reap", "--keep", "5", "--novices", "--format", "compressed-tensors"}, "constant (novice) expert"},
      {{"prune", in, out + ".gguf", "--method", "reap", "--keep", "5", "--novices", "--format", "gguf", "--gguf-type", "q8_0"},
       "constant (novice) expert"},
      {{"prune", in, out, "--method", "reap", "--keep-ratio", "0.6", "--no-uniform", "--format", "gptq"},
       "layers would keep different expert counts"},
  };
  for (auto& c : cases) {
    c.args.insert(c.args.end(), text.begin(), text.end());
    for (const bool dry : {true, false}) {
      SCOPED_TRACE(c.args[0] + " " + c.args.back() + (dry ? " --dry-run" : ""));
      std::vector<std::string> a = c.args;
      if (dry) a.push_back("--dry-run");
      const RunResult r = run_tool(a);
      expect_clean_failure(r, c.needle);
      EXPECT_EQ(list_dir(dir.path()), std::vector<std::string>{"native"}) << r.describe();
    }
  }
}

// A group the layout cannot take: the way out names one this weight's shape takes.
TEST(ExportPackedRefusals, GroupThatDoesNotDivideNamesOneThatDoes) {
  TempDir dir{"moe-export-packed"};
  const fs::path native = dir / "native";
  ASSERT_EQ(run_tool({"-q", "quantize", (kSrc / "data/deepseek-v2-tiny").string(), native.string(), "--method", "rtn",
                      "--codec", "int4", "--sym"})
                .exit_code,
            0);
  const RunResult r = run_tool({"export", native.string(), (dir / "ct").string(), "--format", "compressed-tensors"});
  expect_clean_failure(r, "cannot hold groups of 128, which do not divide the 64 inputs");
  EXPECT_NE(r.err.find("--codec int4 --group 64 --sym"), std::string::npos) << r.err;
}

// Low-rank factors have no integer layout: refused naming the weight.
TEST(ExportPackedRefusals, LowRankFactors) {
  TempDir dir{"moe-export-packed"};
  const fs::path in = dir / "in", lr = dir / "lr";
  write_synth(make_synth("mixtral"), in);  // tiny: the factorization takes milliseconds
  ASSERT_EQ(run_tool({"-q", "factorize", in.string(), lr.string(), "--method", "svd", "--ratio", "0.5"}).exit_code, 0);
  expect_clean_failure(run_tool({"export", lr.string(), (dir / "out").string(), "--format", "compressed-tensors"}),
                       "experts.0.w1.weight is encoded as 'lowrank'");
  EXPECT_FALSE(fs::exists(dir / "out"));
}

// Ragged expert counts and novice experts (constant MoNE experts) have no stock layout: refused
// naming the layer or the novices, after `quantize` made every expert int4.
TEST(ExportPackedRefusals, RaggedCountsAndNovices) {
  TempDir dir{"moe-export-packed"};
  const fs::path native = quantize_rtn(dir.path(), "mixtral-tiny", "native", {"--codec", "int4", "--group", "32", "--sym"});
  const std::string calib = kCalib.string();
  const fs::path ragged = dir / "ragged", novices = dir / "novices";
  ASSERT_EQ(run_tool({"-q", "prune", native.string(), ragged.string(), "--method", "reap", "--keep-ratio", "0.6", "--no-uniform",
                      "--text", calib, "--ctx", "32", "--windows", "4"}).exit_code, 0);
  expect_clean_failure(run_tool({"export", ragged.string(), (dir / "out").string(), "--format", "gptq"}),
                       "(ragged counts); stock loaders need one expert count per model");
  ASSERT_EQ(run_tool({"-q", "prune", native.string(), novices.string(), "--method", "frequency", "--keep", "6", "--novices",
                      "--text", calib, "--ctx", "32", "--windows", "4"}).exit_code, 0);
  expect_clean_failure(run_tool({"export", novices.string(), (dir / "out").string(), "--format", "compressed-tensors"}),
                       "novice experts");
  EXPECT_FALSE(fs::exists(dir / "out"));
}

// GPTQ v1 cannot store an asymmetric zero point of 0: every zero point is checked before the
// folder is created (one is set to 0 in the file here); compressed-tensors holds it.
TEST(ExportPackedRefusals, GptqZeroPointZeroIsCheckedBeforeWriting) {
  TempDir dir{"moe-export-packed"};
  const fs::path native = quantize_rtn(dir.path(), "mixtral-tiny", "native", {"--codec", "int4", "--group", "32"});
  const std::string zeros = "model.layers.1.block_sparse_moe.experts.2.w2.weight.zeros";
  {
    auto& env = io::Env::posix();
    const auto c = io::Checkpoint::open(env, native);
    const auto& info = c.info(zeros);
    const auto file = c.shard_path(zeros);
    const uint64_t at = c.shards().front()->header().data_start + info.begin + 3 * 8 + 1;  // row 3, group 1 (8 groups: 256 inputs / 32)
    std::string bytes = read_file(file);
    ASSERT_NE(bytes[at], 0);
    bytes[at] = 0;
    write_file(file, bytes);
  }
  expect_clean_failure(run_tool({"export", native.string(), (dir / "out").string(), "--format", "gptq"}),
                       "experts.2.w2.weight: row 3, group 1: zero point 0, which GPTQ's v1 layout (zero − 1) cannot hold");
  EXPECT_FALSE(fs::exists(dir / "out"));
  ASSERT_FALSE(export_packed(native, dir / "ct", "compressed-tensors").is_null());
  EXPECT_EQ(expect_same_weights(native, dir / "ct"), 96u);
}

// The output rules of every folder the tool writes: never inside the input, an earlier export
// replaced only with --force.
TEST(ExportPackedOutput, InputAndForce) {
  TempDir dir{"moe-export-packed"};
  const fs::path native = quantize_rtn(dir.path(), "mixtral-tiny", "native", {"--codec", "int8", "--group", "0", "--sym"});
  const RunResult inside = run_tool({"export", native.string(), (native / "ct").string(), "--format", "compressed-tensors"});
  EXPECT_EQ(inside.exit_code, 2) << inside.describe();
  EXPECT_FALSE(fs::exists(native / "ct"));
  ASSERT_FALSE(export_packed(native, dir / "ct", "compressed-tensors").is_null());
  const json q = read_json(dir / "ct/config.json").at("quantization_config");
  EXPECT_EQ(q["config_groups"]["group_0"]["weights"]["strategy"], "channel");
  EXPECT_EQ(q["config_groups"]["group_0"]["weights"]["group_size"], nullptr);
  const RunResult again = run_tool({"export", native.string(), (dir / "ct").string(), "--format", "gptq"});
  EXPECT_EQ(again.exit_code, 2) << again.describe();
  EXPECT_EQ(read_json(dir / "ct/config.json").at("quantization_config").at("quant_method"), "compressed-tensors");
  const RunResult forced = run_tool({"-q", "export", native.string(), (dir / "ct").string(), "--format", "gptq", "--force"});
  EXPECT_EQ(forced.exit_code, 0) << forced.describe();
  EXPECT_EQ(read_json(dir / "ct/config.json").at("quantization_config").at("group_size"), -1);
  EXPECT_EQ(expect_same_weights(native, dir / "ct"), 96u);
  // --max-shard-size: shards of at most that size, listed in the index, the same weights.
  const RunResult sharded =
      run_tool({"-q", "export", native.string(), (dir / "sh").string(), "--format", "gptq", "--max-shard-size", "200KB"});
  ASSERT_EQ(sharded.exit_code, 0) << sharded.describe();
  // HF's rule: a shard passes the size only when it holds one tensor.
  std::map<std::string, int> per_shard;
  const json index = read_json(dir / "sh/model.safetensors.index.json");
  for (const auto& [tensor, file] : index.at("weight_map").items()) ++per_shard[file.get<std::string>()];
  EXPECT_GT(per_shard.size(), 1u);
  for (const auto& [file, n] : per_shard)
    if (fs::file_size(dir / "sh" / file) > 200'000u) {
      EXPECT_EQ(n, 1) << file;
    }
  EXPECT_EQ(expect_same_weights(native, dir / "sh"), 96u);
  expect_clean_failure(run_tool({"export", native.string(), (dir / "sz").string(), "--format", "gptq", "--max-shard-size", "lots"}),
                       "--max-shard-size");
  expect_clean_failure(run_tool({"export", native.string(), (dir / "x.gguf").string(), "--type", "q8_0", "--max-shard-size", "1GB"}),
                       "--max-shard-size: --format gguf writes one file, never shards");
  EXPECT_FALSE(fs::exists(dir / "sz"));
  EXPECT_FALSE(fs::exists(dir / "x.gguf"));
  // An output that cannot be made is named as the user gave it, never as its temporary sibling.
  for (const std::vector<std::string>& extra : {std::vector<std::string>{"--format", "gptq"}, {"--type", "q8_0"}}) {
    const bool gguf = extra[0] == "--type";  // a dense model for GGUF (int8 rows have no block type)
    std::vector<std::string> a = {"export", gguf ? (kSrc / "data/models/mixtral-tiny").string() : native.string(),
                                  "/proc/moe-export-out" + std::string(gguf ? ".gguf" : "")};
    a.insert(a.end(), extra.begin(), extra.end());
    const RunResult r = run_tool(a);
    expect_clean_failure(r, "/proc/moe-export-out");
    EXPECT_EQ(r.err.find("moe-tool-tmp"), std::string::npos) << r.err;
  }
}

}  // namespace
}  // namespace moe::test
