// io::PackedInput: compressed-tensors (pack-quantized int4/int8, float-quantized FP8), GPTQ and AWQ
// weights read as encodings. Each layout's words are built here by the packing rule of the
// library that writes it (compressed-tensors pack_to_int32; AutoGPTQ QuantLinear.pack; AutoAWQ
// with AWQ_ORDER), from codes, zero points and scales chosen here, and the decode must equal
// scale · (q − z) computed from those; a few values are also checked as numbers worked out by
// hand. Then the refusals: one line naming the file or config key and the tensor.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "io/env.h"
#include "io/packed_input.h"
#include "support/ckpt_util.h"
#include "support/expect_error.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using core::DType;
using core::ErrorKind;
using nlohmann::json;
namespace fs = std::filesystem;

template <typename T>
SynthTensor tensor_of(const std::string& name, DType dtype, const core::Shape& shape, const std::vector<T>& v) {
  SynthTensor t{name, dtype, shape, std::vector<uint8_t>(v.size() * sizeof(T))};
  std::memcpy(t.data.data(), v.data(), t.data.size());
  return t;
}

SynthTensor f16_tensor(const std::string& name, const core::Shape& shape, const std::vector<float>& v) {
  std::vector<uint16_t> h;
  for (float x : v) h.push_back(core::f32_to_f16(x));
  return tensor_of(name, DType::F16, shape, h);
}

// A checkpoint folder holding only `tensors` and a config with this quantization_config.
struct Packed {
  TempDir dir{"moe-packed-input"};
  std::optional<io::Checkpoint> ckpt;
  std::unique_ptr<io::PackedInput> input;
  void write(const json& q, const std::vector<SynthTensor>& tensors) {
    SynthCheckpoint ck;
    ck.family = "mixtral";
    ck.config = {{"model_type", "mixtral"}, {"quantization_config", q}};
    ck.tensors = tensors;
    write_synth(ck, dir.path());
    ckpt = io::Checkpoint::open(io::Env::posix(), dir.path());
  }
  void open() { input = io::PackedInput::open(*ckpt); }
  std::vector<float> decode(const std::string& weight, std::set<std::string>* used_out = nullptr) {
    std::set<std::string> used;
    auto t = input->weight(weight, used);
    EXPECT_TRUE(t.has_value()) << weight;
    if (used_out) *used_out = used;
    return t ? t->to_f32() : std::vector<float>{};
  }
  // io::PackedIntLinear::native_form_problem of the weight (why moe-tool's intN cannot hold its
  // codes; "" when it can), and native_form() must agree.
  std::string native_problem(const std::string& weight, bool* symmetric = nullptr) {
    std::set<std::string> used;
    auto t = input->weight(weight, used);
    const auto* p = t ? dynamic_cast<const io::PackedIntLinear*>(t->encoding()) : nullptr;
    if (!p) return "not a PackedIntLinear";
    const std::string why = p->native_form_problem(symmetric);
    EXPECT_EQ(p->native_form().has_value(), why.empty()) << why;
    return why;
  }
};

json ct_config(int bits, bool symmetric, const json& group_size, const std::string& strategy = "group") {
  return {{"quant_method", "compressed-tensors"},
          {"format", "pack-quantized"},
          {"quantization_status", "compressed"},
          {"ignore", {"lm_head"}},
          {"config_groups",
           {{"group_0",
             {{"targets", {"Linear"}},
              {"weights",
               {{"num_bits", bits}, {"type", "int"}, {"symmetric", symmetric}, {"strategy", strategy},
                {"group_size", group_size}}}}}}}};
}

// compressed-tensors int4, asymmetric, groups of 4: weight [3, 8], codes packed along the inputs
// (8 per word, value j at bits 4j), zero points packed along the OUTPUTS (weight_zero_point
// [ceil(3/8), 2]: output o at bits 4o of the group's word).
TEST(PackedInput, CompressedTensorsInt4AsymmetricDecodes) {
  const int64_t out = 3, in = 8, G = 4, ng = 2;
  auto q = [](int64_t o, int64_t i) { return static_cast<uint32_t>((o * 5 + i * 3) % 16); };
  auto z = [](int64_t o, int64_t g) { return static_cast<uint32_t>(1 + o + 2 * g); };
  auto s = [](int64_t o, int64_t g) { return 0.5f * static_cast<float>(o + 1) + 0.25f * static_cast<float>(g); };
  std::vector<uint32_t> packed(out, 0), zp(ng, 0);
  std::vector<float> scales;
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) packed[o] |= q(o, i) << (4 * i);
  for (int64_t g = 0; g < ng; ++g)
    for (int64_t o = 0; o < out; ++o) zp[g] |= z(o, g) << (4 * o);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t g = 0; g < ng; ++g) scales.push_back(s(o, g));
  Packed p;
  const std::string m = "model.layers.0.block_sparse_moe.experts.0.w1";
  p.write(ct_config(4, false, G), {tensor_of(m + ".weight_packed", DType::I32, {out, 1}, packed),
                                   f16_tensor(m + ".weight_scale", {out, ng}, scales),
                                   tensor_of(m + ".weight_shape", DType::I64, {2}, std::vector<int64_t>{out, in}),
                                   tensor_of(m + ".weight_zero_point", DType::I32, {1, ng}, zp)});
  p.open();
  std::set<std::string> used;
  const auto w = p.decode(m + ".weight", &used);
  ASSERT_EQ(w.size(), static_cast<size_t>(out * in));
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i)
      EXPECT_EQ(w[o * in + i], s(o, i / G) * (static_cast<float>(q(o, i)) - static_cast<float>(z(o, i / G)))) << o << "," << i;
  // By hand: o = 2, i = 1: q = (10 + 3) mod 16 = 13, z = 3, scale 1.5 -> 15.
  EXPECT_EQ(w[2 * in + 1], 15.0f);
  // f16 scales, zero points 1..6: moe-tool's asymmetric intN holds these codes exactly.
  bool sym = true;
  EXPECT_EQ(p.native_problem(m + ".weight", &sym), "");
  EXPECT_FALSE(sym);
  EXPECT_EQ(used.size(), 4u);
  // A module that is not quantized is read dense by the caller.
  std::set<std::string> none;
  EXPECT_FALSE(p.input->weight("lm_head.weight", none).has_value());
}

// compressed-tensors int8, symmetric, per channel: 4 values per word; the implied zero point 128
// (signed 0); bf16 scales.
TEST(PackedInput, CompressedTensorsInt8ChannelDecodes) {
  const std::vector<uint8_t> codes = {0, 127, 128, 255, 130, 126, 200, 1};  // [2, 4], unsigned
  std::vector<uint32_t> packed(2, 0);
  for (int o = 0; o < 2; ++o)
    for (int i = 0; i < 4; ++i) packed[o] |= static_cast<uint32_t>(codes[o * 4 + i]) << (8 * i);
  Packed p;
  const std::string m = "model.layers.0.self_attn.q_proj";
  p.write(ct_config(8, true, nullptr, "channel"),
          {tensor_of(m + ".weight_packed", DType::I32, {2, 1}, packed),
           tensor_of(m + ".weight_scale", DType::BF16, {2, 1}, std::vector<uint16_t>{core::f32_to_bf16(0.5f), core::f32_to_bf16(2.0f)}),
           tensor_of(m + ".weight_shape", DType::I64, {2}, std::vector<int64_t>{2, 4})});
  p.open();
  EXPECT_EQ(p.decode(m + ".weight"), (std::vector<float>{-64.0f, -0.5f, 0.0f, 63.5f, 4.0f, -4.0f, 144.0f, -254.0f}));
  // bf16 scales 0.5 and 2 are exact in f16; the implied zero point 128: symmetric.
  bool sym = false;
  EXPECT_EQ(p.native_problem(m + ".weight", &sym), "");
  EXPECT_TRUE(sym);
}

// A compressed-tensors f32 scale that f16 does not hold (0.1) keeps the codes from moe-tool's
// intN; the problem names the row, the group and the value.
TEST(PackedInput, ScaleThatF16DoesNotHoldIsNamed) {
  std::vector<uint32_t> packed = {0x03020100u, 0x07060504u};
  Packed p;
  const std::string m = "model.layers.0.self_attn.q_proj";
  p.write(ct_config(8, true, nullptr, "channel"),
          {tensor_of(m + ".weight_packed", DType::I32, {2, 1}, packed),
           tensor_of(m + ".weight_scale", DType::F32, {2, 1}, std::vector<float>{0.5f, 0.1f}),
           tensor_of(m + ".weight_shape", DType::I64, {2}, std::vector<int64_t>{2, 4})});
  p.open();
  EXPECT_EQ(p.native_problem(m + ".weight"), "row 1, group 0: scale " + json(0.1f).dump() + " is not exact in f16");
}

// GPTQ v1, int4, asymmetric, desc_act with a permuted g_idx: qweight [in/8, out] packed along the
// inputs, qzeros [ngroups, out/8] holding z − 1 along the outputs, scales [ngroups, out].
TEST(PackedInput, GptqActOrderAsymmetricDecodes) {
  const int64_t out = 8, in = 16, G = 8, ng = 2;
  auto q = [](int64_t o, int64_t i) { return static_cast<uint32_t>((o * 7 + i * 5 + 3) % 16); };
  auto z = [](int64_t o, int64_t g) { return static_cast<uint32_t>(1 + (o * 3 + 7 * g) % 16); };  // 1..16
  auto s = [](int64_t o, int64_t g) { return 0.125f * static_cast<float>(o + 1 + 8 * g); };
  std::vector<int32_t> g_idx(in);
  for (int64_t i = 0; i < in; ++i) g_idx[i] = static_cast<int32_t>(((i * 3) % 16) / G);  // 8 inputs per group
  std::vector<uint32_t> qweight(in / 8 * out, 0), qzeros(ng, 0);
  for (int64_t i = 0; i < in; ++i)
    for (int64_t o = 0; o < out; ++o) qweight[(i / 8) * out + o] |= q(o, i) << (4 * (i % 8));
  for (int64_t g = 0; g < ng; ++g)
    for (int64_t o = 0; o < out; ++o) qzeros[g] |= ((z(o, g) - 1) & 15u) << (4 * o);
  std::vector<float> scales;
  for (int64_t g = 0; g < ng; ++g)
    for (int64_t o = 0; o < out; ++o) scales.push_back(s(o, g));
  Packed p;
  const std::string m = "model.layers.0.block_sparse_moe.experts.1.w2";
  p.write({{"quant_method", "gptq"}, {"bits", 4}, {"group_size", G}, {"desc_act", true}, {"sym", false},
           {"checkpoint_format", "gptq"}},
          {tensor_of(m + ".qweight", DType::I32, {in / 8, out}, qweight),
           tensor_of(m + ".qzeros", DType::I32, {ng, 1}, qzeros), f16_tensor(m + ".scales", {ng, out}, scales),
           tensor_of(m + ".g_idx", DType::I32, {in}, g_idx)});
  p.open();
  const auto w = p.decode(m + ".weight");
  ASSERT_EQ(w.size(), static_cast<size_t>(out * in));
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) {
      const int64_t g = g_idx[i];
      EXPECT_EQ(w[o * in + i], s(o, g) * (static_cast<float>(q(o, i)) - static_cast<float>(z(o, g)))) << o << "," << i;
    }
  // By hand: o = 1, i = 3: q = (7 + 15 + 3) mod 16 = 9; g_idx[3] = 9 div 8 = 1 (not 3 div 8 = 0);
  // z = 1 + (3 + 7) = 11; scale 0.125 · 10 = 1.25 -> −2.5.
  EXPECT_EQ(w[1 * in + 3], -2.5f);
  // intN groups are runs of consecutive inputs: act-order codes are read decoded.
  EXPECT_EQ(p.native_problem(m + ".weight"), "act-order: its g_idx puts inputs out of order in the groups");
}

// AWQ GEMM int4: qweight [in, out/8] packed along the OUTPUTS in AWQ_ORDER (shift 4k holds output
// 8c + ORDER[k]), qzeros likewise, scales [in/G, out], zero points as stored.
TEST(PackedInput, AwqInterleavedOrderDecodes) {
  const int64_t out = 16, in = 8, G = 4, ng = 2;
  const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  auto q = [](int64_t o, int64_t i) { return static_cast<uint32_t>((o * 3 + i * 11 + 1) % 16); };
  auto z = [](int64_t o, int64_t g) { return static_cast<uint32_t>((o + 5 * g) % 16); };
  auto s = [](int64_t o, int64_t g) { return 0.0625f * static_cast<float>(1 + o + 16 * g); };
  std::vector<uint32_t> qweight(in * 2, 0), qzeros(ng * 2, 0);
  for (int64_t i = 0; i < in; ++i)
    for (int64_t c = 0; c < 2; ++c)
      for (int k = 0; k < 8; ++k) qweight[i * 2 + c] |= q(8 * c + order[k], i) << (4 * k);
  for (int64_t g = 0; g < ng; ++g)
    for (int64_t c = 0; c < 2; ++c)
      for (int k = 0; k < 8; ++k) qzeros[g * 2 + c] |= z(8 * c + order[k], g) << (4 * k);
  std::vector<float> scales;
  for (int64_t g = 0; g < ng; ++g)
    for (int64_t o = 0; o < out; ++o) scales.push_back(s(o, g));
  Packed p;
  const std::string m = "model.layers.1.block_sparse_moe.experts.3.w3";
  p.write({{"quant_method", "awq"}, {"bits", 4}, {"group_size", G}, {"zero_point", true}, {"version", "gemm"}},
          {tensor_of(m + ".qweight", DType::I32, {in, 2}, qweight), tensor_of(m + ".qzeros", DType::I32, {ng, 2}, qzeros),
           f16_tensor(m + ".scales", {ng, out}, scales)});
  p.open();
  const auto w = p.decode(m + ".weight");
  ASSERT_EQ(w.size(), static_cast<size_t>(out * in));
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i)
      EXPECT_EQ(w[o * in + i], s(o, i / G) * (static_cast<float>(q(o, i)) - static_cast<float>(z(o, i / G)))) << o << "," << i;
  // By hand: output 1 sits at shift 16 (k = 4) of word [i, 0]: with i = 0, q = 4, z = 1,
  // scale 0.125 -> 0.375. Read at shift 4 (the plain order) it would be output 2's code.
  EXPECT_EQ(qweight[0] >> 16 & 15u, 4u);
  EXPECT_EQ(w[1 * in + 0], 0.375f);
}

json fp8_config(const std::string& strategy) {
  return {{"quant_method", "compressed-tensors"},
          {"format", "float-quantized"},
          {"ignore", {"lm_head"}},
          {"config_groups",
           {{"group_0",
             {{"targets", {"Linear"}},
              {"weights", {{"num_bits", 8}, {"type", "float"}, {"symmetric", true}, {"strategy", strategy}}},
              {"input_activations", {{"num_bits", 8}, {"type", "float"}, {"dynamic", true}, {"strategy", "token"}}}}}}}};
}

// compressed-tensors FP8: E4M3 codes (0x38 = 1, 0x40 = 2, 0xB8 = −1, 0x3C = 1.5) times a scale
// per channel ([out, 1]) or per tensor ([1]).
TEST(PackedInput, CompressedTensorsFp8Decodes) {
  const std::vector<uint8_t> codes = {0x38, 0x40, 0xB8, 0x3C, 0x40, 0x38};  // [2, 3]
  const std::string m = "model.layers.0.block_sparse_moe.experts.0.w1";
  {
    Packed p;
    p.write(fp8_config("channel"), {tensor_of(m + ".weight", DType::F8_E4M3, {2, 3}, codes),
                                    tensor_of(m + ".weight_scale", DType::F32, {2, 1}, std::vector<float>{0.5f, 3.0f})});
    p.open();
    EXPECT_EQ(p.decode(m + ".weight"), (std::vector<float>{0.5f, 1.0f, -0.5f, 4.5f, 6.0f, 3.0f}));
  }
  {
    Packed p;
    p.write(fp8_config("tensor"), {tensor_of(m + ".weight", DType::F8_E4M3, {2, 3}, codes),
                                   tensor_of(m + ".weight_scale", DType::F32, {1}, std::vector<float>{0.25f}),
                                   tensor_of(m + ".input_scale", DType::F32, {1}, std::vector<float>{1.0f})});
    p.open();
    std::set<std::string> used;
    EXPECT_EQ(p.decode(m + ".weight", &used), (std::vector<float>{0.25f, 0.5f, -0.25f, 0.375f, 0.5f, 0.25f}));
    EXPECT_TRUE(used.count(m + ".input_scale"));
  }
  {
    // Static input activations (dynamic false) name an input_scale per module: one missing is refused.
    json q = fp8_config("tensor");
    q["config_groups"]["group_0"]["input_activations"]["dynamic"] = false;
    q["config_groups"]["group_0"]["input_activations"]["strategy"] = "tensor";
    Packed p;
    p.write(q, {tensor_of(m + ".weight", DType::F8_E4M3, {2, 3}, codes),
                tensor_of(m + ".weight_scale", DType::F32, {1}, std::vector<float>{0.25f})});
    p.open();
    std::set<std::string> used;
    expect_error([&] { (void)p.input->weight(m + ".weight", used); }, ErrorKind::Corruption,
                 {"model.safetensors: tensor " + m + ".input_scale: missing (", "config_groups.group_0.input_activations are static"});
  }
}

// --- Refusals: one line naming the file or config key and the tensor ---

const std::string kMod = "model.layers.0.block_sparse_moe.experts.0.w1";

std::vector<SynthTensor> gptq_tensors(int64_t out, int64_t in, int64_t ng, const std::vector<int32_t>& g_idx) {
  std::vector<SynthTensor> v = {tensor_of(kMod + ".qweight", DType::I32, {in / 8, out}, std::vector<uint32_t>(in / 8 * out, 0x76543210u)),
                                tensor_of(kMod + ".qzeros", DType::I32, {ng, out / 8}, std::vector<uint32_t>(ng * out / 8, 0x77777777u)),
                                f16_tensor(kMod + ".scales", {ng, out}, std::vector<float>(ng * out, 1.0f))};
  if (!g_idx.empty()) v.push_back(tensor_of(kMod + ".g_idx", DType::I32, {static_cast<int64_t>(g_idx.size())}, g_idx));
  return v;
}

json gptq_config(int bits, bool desc_act) {
  return {{"quant_method", "gptq"}, {"bits", bits}, {"group_size", 8}, {"desc_act", desc_act}, {"sym", true}};
}

TEST(PackedInputRefusals, ConfigProblemsNameTheKey) {
  {
    Packed p;
    p.write(gptq_config(3, false), gptq_tensors(8, 16, 2, {}));
    expect_error([&] { p.open(); }, ErrorKind::NotSupported, {"config.json: quantization_config.bits: 3 (4 and 8 are read)"});
  }
  {
    Packed p;
    p.write(gptq_config(4, true), gptq_tensors(8, 16, 2, {}));
    expect_error([&] { p.open(); }, ErrorKind::Corruption,
                 {"tensor " + kMod + ".g_idx: missing, but quantization_config.desc_act is true"});
  }
  {
    Packed p;
    json q = gptq_config(4, false);
    q["checkpoint_format"] = "marlin";
    p.write(q, gptq_tensors(8, 16, 2, {}));
    expect_error([&] { p.open(); }, ErrorKind::NotSupported, {"checkpoint_format: \"marlin\" is not read"});
  }
  {
    Packed p;
    json q = ct_config(4, true, 8);
    q["format"] = "marlin-24";
    p.write(q, {});
    expect_error([&] { p.open(); }, ErrorKind::NotSupported, {"quantization_config.format: \"marlin-24\""});
  }
  {
    Packed p;
    p.write({{"quant_method", "awq"}, {"bits", 4}, {"group_size", 8}, {"version", "gemv"}}, {});
    expect_error([&] { p.open(); }, ErrorKind::NotSupported, {"quantization_config.version: \"gemv\" is not read"});
  }
  {
    Packed p;  // a config that quantizes nothing stored
    p.write(gptq_config(4, false), {tensor_of(kMod + ".weight", DType::F32, {1}, std::vector<float>{1.0f})});
    expect_error([&] { p.open(); }, ErrorKind::Corruption, {"no quantized module is stored (no <module>.qweight)"});
  }
  {
    Packed p;  // quantized, yet ignored
    json q = ct_config(4, true, 8);
    q["ignore"] = {"re:.*experts\\.0\\.w1$"};
    p.write(q, {tensor_of(kMod + ".weight_packed", DType::I32, {8, 2}, std::vector<uint32_t>(16, 0))});
    expect_error([&] { p.open(); }, ErrorKind::Corruption, {"model.safetensors: module " + kMod + ": stored quantized but"});
  }
  {
    Packed p;  // a target naming a module that is not stored
    json q = ct_config(4, true, 8);
    q["config_groups"]["group_0"]["targets"] = {kMod, "model.layers.0.block_sparse_moe.experts.9.w1"};
    p.write(q, {tensor_of(kMod + ".weight_packed", DType::I32, {8, 2}, std::vector<uint32_t>(16, 0))});
    expect_error([&] { p.open(); }, ErrorKind::Corruption, {"experts.9.w1\" names no quantized module stored"});
  }
}

TEST(PackedInputRefusals, TensorProblemsNameFileAndTensor) {
  auto refused = [](const json& q, const std::vector<SynthTensor>& t, std::initializer_list<std::string> parts) {
    Packed p;
    p.write(q, t);
    p.open();
    std::set<std::string> used;
    expect_error([&] { (void)p.input->weight(kMod + ".weight", used); }, ErrorKind::Corruption, parts);
  };
  std::vector<int32_t> bad(16, 0);
  bad[5] = 2;  // group 2 of 2
  refused(gptq_config(4, true), gptq_tensors(8, 16, 2, bad),
          {"model.safetensors: weight " + kMod + ".weight (gptq): g_idx: value 2 at input 5 is outside [0, 2)"});
  std::vector<int32_t> lopsided(16, 0);
  lopsided[15] = 1;
  refused(gptq_config(4, true), gptq_tensors(8, 16, 2, lopsided), {"g_idx: group 0 holds 15 inputs, expected 8"});
  // qzeros of the wrong shape; scales of a group size that does not divide.
  auto t = gptq_tensors(8, 16, 2, {});
  t[1] = tensor_of(kMod + ".qzeros", DType::I32, {3, 1}, std::vector<uint32_t>(3, 0));
  refused(gptq_config(4, false), t, {"qzeros: shape [3, 1], expected [2, 1]"});
  json g12 = gptq_config(4, false);
  g12["group_size"] = 12;
  refused(g12, gptq_tensors(8, 16, 2, {}), {"group size 12 does not divide the 16 inputs"});
  // compressed-tensors: packed length against weight_shape; an asymmetric scheme without zero points.
  const std::vector<SynthTensor> ct = {tensor_of(kMod + ".weight_packed", DType::I32, {4, 2}, std::vector<uint32_t>(8, 0)),
                                       f16_tensor(kMod + ".weight_scale", {4, 2}, std::vector<float>(8, 1.0f)),
                                       tensor_of(kMod + ".weight_shape", DType::I64, {2}, std::vector<int64_t>{4, 24})};
  refused(ct_config(4, true, 8), ct, {"tensor " + kMod + ".weight_packed: shape [4, 2] does not hold 24 inputs"});
  auto ct16 = ct;
  ct16[2] = tensor_of(kMod + ".weight_shape", DType::I64, {2}, std::vector<int64_t>{4, 16});
  refused(ct_config(4, false, 8), ct16, {"tensor " + kMod + ".weight_zero_point: missing"});
}

// A module whose scales are stored without its packed codes names the missing packed tensor and
// the file of its scales, not the logical weight; a config without bits says so.
TEST(PackedInputRefusals, MissingCodesNameThePackedTensorAndTheFile) {
  {
    Packed p;
    auto t = gptq_tensors(8, 16, 2, {});
    t.erase(t.begin());  // the qweight
    p.write(gptq_config(4, false), t);
    expect_error([&] { p.open(); }, ErrorKind::Corruption,
                 {"model.safetensors: tensor " + kMod + ".qweight: missing (", " is stored; weight " + kMod + ".weight, gptq)"});
  }
  {
    Packed p;
    p.write(ct_config(4, true, 8), {f16_tensor(kMod + ".weight_scale", {4, 2}, std::vector<float>(8, 1.0f)),
                                    tensor_of(kMod + ".weight_shape", DType::I64, {2}, std::vector<int64_t>{4, 16})});
    expect_error([&] { p.open(); }, ErrorKind::Corruption,
                 {"model.safetensors: tensor " + kMod + ".weight_packed: missing (", "compressed-tensors)"});
  }
  {  // an FP8 weight without its scale (read as plain codes before)
    Packed p;
    p.write(fp8_config("channel"), {tensor_of(kMod + ".weight", DType::F8_E4M3, {2, 3}, std::vector<uint8_t>(6, 0x38))});
    expect_error([&] { p.open(); }, ErrorKind::Corruption,
                 {"model.safetensors: tensor " + kMod + ".weight_scale: missing (" + kMod + ".weight is stored as F8_E4M3"});
  }
  for (const std::string method : {"gptq", "awq"}) {
    SCOPED_TRACE(method);
    Packed p;
    json q = gptq_config(4, false);
    q["quant_method"] = method;
    q.erase("bits");
    p.write(q, gptq_tensors(8, 16, 2, {}));
    expect_error([&] { p.open(); }, ErrorKind::Corruption, {"config.json: quantization_config.bits: missing"});
  }
}

// A NaN or infinite scale is refused as the stored tensor it is in (file, tensor, index) when the
// weight is read, for every layout. (The values are patched into the file: the writer refuses them.)
TEST(PackedInputRefusals, NonFiniteScalesNameTheStoredTensor) {
  auto refused = [](const json& q, const std::vector<SynthTensor>& t, const std::string& scale, const std::string& f16) {
    Packed p;
    p.write(q, t);
    patch_tensor_bytes(p.dir / "model.safetensors", kMod + scale, 2 * 3, f16);  // element 3
    p.ckpt = io::Checkpoint::open(io::Env::posix(), p.dir.path());
    p.open();
    std::set<std::string> used;
    expect_error([&] { (void)p.input->weight(kMod + ".weight", used); }, ErrorKind::Corruption,
                 {"model.safetensors: tensor " + kMod + scale + ": non-finite value at index 3"});
  };
  refused(gptq_config(4, false), gptq_tensors(8, 16, 2, {}), ".scales", std::string("\x00\x7e", 2));  // f16 NaN
  const std::vector<SynthTensor> ct = {tensor_of(kMod + ".weight_packed", DType::I32, {4, 2}, std::vector<uint32_t>(8, 0)),
                                       f16_tensor(kMod + ".weight_scale", {4, 2}, std::vector<float>(8, 1.0f)),
                                       tensor_of(kMod + ".weight_shape", DType::I64, {2}, std::vector<int64_t>{4, 16})};
  refused(ct_config(4, true, 8), ct, ".weight_scale", std::string("\x00\x7c", 2));  // f16 +inf
}

}  // namespace
}  // namespace moe::test
