// io/compressed_tensors.h: the int32 words of the three layouts checked against values worked out
// by hand from the libraries' packing loops, every shape rule, GPTQ's refusal of a zero point of 0,
// and random codes round-tripped through the test-local decoders (support/packed_decode.h).
#include <gtest/gtest.h>

#include <random>

#include "io/compressed_tensors.h"
#include "support/expect_error.h"
#include "support/packed_decode.h"

namespace moe::test {
namespace {

using io::GroupCodes;
using io::PackedFormat;

uint16_t ct_f16_bits(float f) {
  uint16_t h;
  core::convert(core::DType::F32, &f, core::DType::F16, &h, 1);
  return h;
}

// Unpacked codes, f16 scales and zero points of one Linear, and the stored view of them
// (docs/FORMAT.md intN: each row an LSB-first stream of `bits`-bit codes, padded to whole bytes).
struct LinearCodes {
  int bits = 4;
  int64_t out = 0, in = 0, group = 0;
  bool symmetric = true;
  std::vector<uint8_t> codes;    // [out, in]
  std::vector<uint16_t> scales;  // [out, ngroups]
  std::vector<uint8_t> zeros;    // [out, ngroups]
  std::vector<uint8_t> stream;
  GroupCodes view() {
    const int64_t rb = (in * bits + 7) / 8;
    stream.assign(static_cast<size_t>(out * rb), 0);
    for (int64_t o = 0; o < out; ++o)
      for (int64_t j = 0; j < in; ++j)
        for (int b = 0; b < bits; ++b)
          if ((codes[o * in + j] >> b) & 1) stream[o * rb + (j * bits + b) / 8] |= static_cast<uint8_t>(1 << ((j * bits + b) % 8));
    return {bits, out, in, group, symmetric, stream.data(), reinterpret_cast<const uint8_t*>(scales.data()),
            symmetric ? nullptr : zeros.data()};
  }
  std::vector<io::PackedTensor> pack(PackedFormat f) {
    std::vector<io::PackedTensor> t;
    io::pack_linear(f, view(), t);
    return t;
  }
};

const io::PackedTensor& find_part(const std::vector<io::PackedTensor>& ts, const std::string& suffix) {
  for (const auto& t : ts)
    if (t.suffix == suffix) return t;
  throw std::runtime_error("no " + suffix);
}

// One row of 12 int4 codes 1..12, one group: compressed-tensors packs 8 per word along the row,
// the first value in the low nibble; 12 values take two words, the second padded with zeros.
TEST(CompressedTensors, Int4WordsAlongTheRow) {
  LinearCodes c;
  c.bits = 4, c.out = 1, c.in = 12, c.group = 0, c.symmetric = true;
  c.codes = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  c.scales = {ct_f16_bits(0.5f)};
  c.zeros = {8};
  const auto t = c.pack(PackedFormat::CompressedTensors);
  ASSERT_EQ(t.size(), 3u);
  const auto& p = find_part(t, ".weight_packed");
  EXPECT_EQ(p.dtype, core::DType::I32);
  EXPECT_EQ(p.shape, (core::Shape{1, 2}));
  EXPECT_EQ(static_cast<uint32_t>(packed_word(p.data, 0)), 0x87654321u);
  EXPECT_EQ(static_cast<uint32_t>(packed_word(p.data, 1)), 0x0000CBA9u);
  const auto& shape = find_part(t, ".weight_shape");
  EXPECT_EQ(shape.dtype, core::DType::I64);
  int64_t dims[2];
  std::memcpy(dims, shape.data.data(), 16);
  EXPECT_EQ(dims[0], 1);
  EXPECT_EQ(dims[1], 12);
  const auto& s = find_part(t, ".weight_scale");
  EXPECT_EQ(s.dtype, core::DType::F16);
  EXPECT_EQ(f16_value(s.data, 0), 0.5f);
  // signed value = code − 8: code 1 is −7, code 12 is +4.
  const auto w = decode_compressed_tensors(4, 1, 12, p.data, s.data, 1, {});
  EXPECT_EQ(w.front(), -3.5f);
  EXPECT_EQ(w.back(), 2.0f);
}

// Asymmetric int8: the zero points are packed along the OUTPUT dim (packed_dim=0), 4 per word.
TEST(CompressedTensors, Int8ZeroPointsAlongTheOutputs) {
  LinearCodes c;
  c.bits = 8, c.out = 5, c.in = 4, c.group = 2, c.symmetric = false;
  for (int i = 0; i < 20; ++i) c.codes.push_back(static_cast<uint8_t>(10 * i));
  for (int i = 0; i < 10; ++i) c.scales.push_back(ct_f16_bits(1.0f)), c.zeros.push_back(static_cast<uint8_t>(i + 1));
  const auto t = c.pack(PackedFormat::CompressedTensors);
  const auto& z = find_part(t, ".weight_zero_point");
  EXPECT_EQ(z.shape, (core::Shape{2, 2}));  // ceil(5 / 4) x 2 groups
  // word [0, 0]: zeros of rows 0..3 in group 0 = 1, 3, 5, 7; word [1, 1]: row 4 group 1 = 10.
  EXPECT_EQ(static_cast<uint32_t>(packed_word(z.data, 0)), 0x07050301u);
  EXPECT_EQ(static_cast<uint32_t>(packed_word(z.data, 3)), 0x0000000Au);
  EXPECT_EQ(find_part(t, ".weight_packed").shape, (core::Shape{5, 1}));
}

// GPTQ: qweight packs along the INPUT dim ([in/8, out]); qzeros hold zero − 1 along the outputs;
// scales are transposed; g_idx = i / group.
TEST(CompressedTensors, GptqWordsAndTheZeroMinusOne) {
  LinearCodes c;
  c.bits = 4, c.out = 8, c.in = 16, c.group = 8, c.symmetric = false;
  c.codes.resize(8 * 16);
  for (int o = 0; o < 8; ++o)
    for (int i = 0; i < 16; ++i) c.codes[o * 16 + i] = static_cast<uint8_t>((o + i) % 16);
  for (int o = 0; o < 8; ++o)
    for (int g = 0; g < 2; ++g) c.scales.push_back(ct_f16_bits(0.25f * (g + 1))), c.zeros.push_back(static_cast<uint8_t>(o + 1 + g));
  const auto t = c.pack(PackedFormat::Gptq);
  const auto& qw = find_part(t, ".qweight");
  EXPECT_EQ(qw.shape, (core::Shape{2, 8}));
  // word [0, 1]: output 1, inputs 0..7 → codes 1..8.
  EXPECT_EQ(static_cast<uint32_t>(packed_word(qw.data, 1)), 0x87654321u);
  const auto& qz = find_part(t, ".qzeros");
  EXPECT_EQ(qz.shape, (core::Shape{2, 1}));
  // group 0: zeros 1..8 stored 0..7.
  EXPECT_EQ(static_cast<uint32_t>(packed_word(qz.data, 0)), 0x76543210u);
  const auto& sc = find_part(t, ".scales");
  EXPECT_EQ(sc.shape, (core::Shape{2, 8}));
  EXPECT_EQ(f16_value(sc.data, 8), 0.5f);
  const auto& gi = find_part(t, ".g_idx");
  EXPECT_EQ(packed_word(gi.data, 7), 0);
  EXPECT_EQ(packed_word(gi.data, 8), 1);
  // A zero point of 0 has no v1 encoding.
  c.zeros[3] = 0;
  expect_error([&] { c.pack(PackedFormat::Gptq); }, core::ErrorKind::InvalidArgument,
               {"row 1, group 1: zero point 0"});
}

// AWQ GEMM: qweight [in, out/8] packs 8 OUTPUTS per word, nibble k holding output 8c +
// AWQ_ORDER[k] (0, 2, 4, 6, 1, 3, 5, 7), as WQLinear_GEMM.from_linear's order_map loop does;
// qzeros the same, the zero point as it is; scales transposed; no g_idx. Two inputs (fewer than
// the 8 a block of qweight rows takes), one group.
TEST(CompressedTensors, AwqWordsInTheInterleavedOrder) {
  LinearCodes c;
  c.bits = 4, c.out = 8, c.in = 2, c.group = 2, c.symmetric = false;
  for (int o = 0; o < 8; ++o)
    for (int i = 0; i < 2; ++i) c.codes.push_back(static_cast<uint8_t>(o + 8 * i));  // codes 0..15
  for (int o = 0; o < 8; ++o) c.scales.push_back(ct_f16_bits(0.125f * (o + 1))), c.zeros.push_back(static_cast<uint8_t>(o + 1));
  const auto t = c.pack(PackedFormat::Awq);
  ASSERT_EQ(t.size(), 3u);
  const auto& qw = find_part(t, ".qweight");
  EXPECT_EQ(qw.dtype, core::DType::I32);
  EXPECT_EQ(qw.shape, (core::Shape{2, 1}));
  // input 0: nibbles k = 0..7 hold outputs 0, 2, 4, 6, 1, 3, 5, 7, whose codes are those numbers.
  EXPECT_EQ(static_cast<uint32_t>(packed_word(qw.data, 0)), 0x75316420u);
  // input 1: codes 8 + o in the same order: 8, A, C, E, 9, B, D, F from the low nibble up.
  EXPECT_EQ(static_cast<uint32_t>(packed_word(qw.data, 1)), 0xFDB9ECA8u);
  const auto& qz = find_part(t, ".qzeros");
  EXPECT_EQ(qz.shape, (core::Shape{1, 1}));
  // zeros o + 1: outputs 0, 2, 4, 6, 1, 3, 5, 7 → 1, 3, 5, 7, 2, 4, 6, 8, stored as they are.
  EXPECT_EQ(static_cast<uint32_t>(packed_word(qz.data, 0)), 0x86427531u);
  const auto& sc = find_part(t, ".scales");
  EXPECT_EQ(sc.dtype, core::DType::F16);
  EXPECT_EQ(sc.shape, (core::Shape{1, 8}));
  EXPECT_EQ(f16_value(sc.data, 3), 0.5f);
  // Decoded as AutoAWQ's dequantize_gemm does: output 3, input 1 is 0.5 · (11 − 4).
  const auto w = decode_awq(8, 2, qw.data, qz.data, sc.data);
  EXPECT_EQ(w[3 * 2 + 1], 3.5f);
  EXPECT_EQ(w[0], 0.125f * (0 - 1));
  // Symmetric codes store their zero point 8 explicitly.
  c.symmetric = true;
  const auto ts = c.pack(PackedFormat::Awq);
  EXPECT_EQ(static_cast<uint32_t>(packed_word(find_part(ts, ".qzeros").data, 0)), 0x88888888u);
  EXPECT_EQ(find_part(ts, ".qweight").data, qw.data);
}

TEST(CompressedTensors, ShapeRules) {
  EXPECT_EQ(io::packed_shape_problem(PackedFormat::CompressedTensors, 4, 128, 64, 4096), "");
  EXPECT_EQ(io::packed_shape_problem(PackedFormat::CompressedTensors, 4, 0, 3, 5), "");
  EXPECT_NE(io::packed_shape_problem(PackedFormat::CompressedTensors, 2, 32, 64, 64).find("2-bit codes"), std::string::npos);
  EXPECT_NE(io::packed_shape_problem(PackedFormat::Gptq, 4, 48, 64, 128).find("groups of 48, which do not divide the 128 inputs"),
            std::string::npos);
  EXPECT_NE(io::packed_shape_problem(PackedFormat::Gptq, 4, 0, 12, 64).find("multiples of 8"), std::string::npos);
  EXPECT_EQ(io::packed_shape_problem(PackedFormat::Gptq, 8, 0, 12, 64), "");
  // AWQ: 4 bits, a group size, outputs in whole words of 8; any input count the group divides.
  EXPECT_EQ(io::packed_shape_problem(PackedFormat::Awq, 4, 128, 64, 4096), "");
  EXPECT_EQ(io::packed_shape_problem(PackedFormat::Awq, 4, 4, 8, 20), "");
  EXPECT_NE(io::packed_shape_problem(PackedFormat::Awq, 8, 32, 64, 64).find("8-bit codes (AWQ GEMM packs 4 bits only)"),
            std::string::npos);
  EXPECT_NE(io::packed_shape_problem(PackedFormat::Awq, 4, 0, 64, 64).find("one group per row (group 0): AWQ's layout and "
                                                                          "config need a group size"),
            std::string::npos);
  EXPECT_NE(io::packed_shape_problem(PackedFormat::Awq, 4, 32, 12, 64).find("needs a multiple of 8 outputs"), std::string::npos);
  EXPECT_NE(io::packed_shape_problem(PackedFormat::Awq, 4, 48, 64, 128).find("groups of 48"), std::string::npos);
  EXPECT_EQ(io::packed_specs(PackedFormat::Awq, 4, 32, true, 16, 64).size(), 3u);
  EXPECT_EQ(io::packed_format_name(PackedFormat::Awq), std::string("awq"));
}

// Random codes of every bits/format/symmetry: the decoders give scale · (q − z) exactly.
TEST(CompressedTensors, RandomCodesRoundTrip) {
  std::mt19937 rng(7);
  for (int bits : {4, 8})
    for (bool sym : {true, false})
      for (auto fmt : {PackedFormat::CompressedTensors, PackedFormat::Gptq, PackedFormat::Awq}) {
        if (fmt == PackedFormat::Awq && bits != 4) continue;
        SCOPED_TRACE(std::to_string(bits) + (sym ? " sym " : " asym ") + io::packed_format_name(fmt));
        LinearCodes c;
        c.bits = bits, c.out = 16, c.in = 64, c.group = 16, c.symmetric = sym;
        const int maxq = (1 << bits) - 1;
        for (int i = 0; i < 16 * 64; ++i) c.codes.push_back(static_cast<uint8_t>(rng() % (maxq + 1)));
        for (int i = 0; i < 16 * 4; ++i) {
          c.scales.push_back(ct_f16_bits(std::ldexp(1.0f + static_cast<float>(rng() % 1024) / 1024, -static_cast<int>(rng() % 10))));
          c.zeros.push_back(static_cast<uint8_t>(sym ? 1 << (bits - 1) : 1 + rng() % maxq));
        }
        const auto t = c.pack(fmt);
        const auto w = fmt == PackedFormat::Awq
                           ? decode_awq(16, 64, find_part(t, ".qweight").data, find_part(t, ".qzeros").data, find_part(t, ".scales").data)
                       : fmt == PackedFormat::Gptq
                           ? decode_gptq(bits, 16, 64, find_part(t, ".qweight").data, find_part(t, ".qzeros").data,
                                         find_part(t, ".scales").data, find_part(t, ".g_idx").data)
                           : decode_compressed_tensors(bits, 16, 64, find_part(t, ".weight_packed").data, find_part(t, ".weight_scale").data,
                                                       4, sym ? std::vector<uint8_t>{} : find_part(t, ".weight_zero_point").data);
        for (int o = 0; o < 16; ++o)
          for (int i = 0; i < 64; ++i) {
            float s;
            core::convert(core::DType::F16, &c.scales[o * 4 + i / 16], core::DType::F32, &s, 1);
            ASSERT_EQ(w[o * 64 + i], s * static_cast<float>(c.codes[o * 64 + i] - c.zeros[o * 4 + i / 16])) << o << "," << i;
          }
      }
}

// Widths that are not a multiple of the 16 outputs qweight is written in, packed whole and in
// uneven blocks of rows taken in reverse order (as threads may): the same bytes, and the decoders
// give scale · (q − z) exactly. weight_packed left to the caller only when it is the stored codes.
TEST(CompressedTensors, RowBlocksAndOddWidthsGiveTheSameBytes) {
  std::mt19937 rng(11);
  // Blocks of 3 (no whole quad of words: the packers' scalar edge paths) and of 7 (a quad and 3).
  auto blocks_of = [](int64_t k) {
    return io::RowSplit([k](int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
      for (int64_t b = (n - 1) / k; b >= 0; --b) fn(b * k, std::min(n, b * k + k));
    });
  };
  for (int bits : {4, 8})
    for (bool sym : {true, false})
      for (auto fmt : {PackedFormat::CompressedTensors, PackedFormat::Gptq, PackedFormat::Awq})
        for (int64_t in : {96, 100, 232}) {
          if (fmt == PackedFormat::Gptq && in % (32 / bits) != 0) continue;
          if (fmt == PackedFormat::Awq && bits != 4) continue;
          SCOPED_TRACE(std::to_string(bits) + (sym ? " sym " : " asym ") + io::packed_format_name(fmt) + " in " + std::to_string(in));
          LinearCodes c;
          // AWQ needs a group size: 100 inputs in groups of 20 (and a last block of 4 inputs).
          // 232 inputs in groups of 8; 72 outputs: 9 AWQ columns (two tiles of 4 and one alone).
          const int64_t out = in == 232 ? 72 : 40;
          const int64_t group = in == 232 ? 8 : in == 96 ? 32 : fmt == PackedFormat::Awq ? 20 : 0, ng = group ? in / group : 1;
          c.bits = bits, c.out = out, c.in = in, c.group = group, c.symmetric = sym;
          const int maxq = (1 << bits) - 1;
          for (int64_t i = 0; i < out * in; ++i) c.codes.push_back(static_cast<uint8_t>(rng() % (maxq + 1)));
          for (int64_t i = 0; i < out * ng; ++i) {
            c.scales.push_back(ct_f16_bits(std::ldexp(1.0f + static_cast<float>(rng() % 1024) / 1024, -static_cast<int>(rng() % 10))));
            c.zeros.push_back(static_cast<uint8_t>(sym ? 1 << (bits - 1) : 1 + rng() % maxq));
          }
          const auto whole = c.pack(fmt);
          for (int64_t k : {3, 7}) {
            std::vector<io::PackedTensor> split;
            io::pack_linear(fmt, c.view(), split, blocks_of(k));
            ASSERT_EQ(whole.size(), split.size());
            for (size_t t = 0; t < whole.size(); ++t) EXPECT_EQ(whole[t].data, split[t].data) << whole[t].suffix << " blocks of " << k;
          }
          // Rows that fill whole words: weight_packed is the stored codes, left to the caller on request.
          const bool plain = io::packed_rows_are_codes(fmt, c.view());
          EXPECT_EQ(plain, fmt == PackedFormat::CompressedTensors && (in != 100 || bits == 8));
          std::vector<io::PackedTensor> left;
          io::pack_linear(fmt, c.view(), left, {}, /*leave_stored_rows=*/true);
          ASSERT_EQ(left.size(), whole.size());
          EXPECT_EQ(left[0].data, plain ? std::vector<uint8_t>{} : whole[0].data);
          if (plain) {
            EXPECT_EQ(c.stream, whole[0].data);
          }
          for (size_t k = 1; k < whole.size(); ++k) EXPECT_EQ(whole[k].data, left[k].data) << whole[k].suffix;
          const auto w = fmt == PackedFormat::Awq
                             ? decode_awq(out, in, find_part(whole, ".qweight").data, find_part(whole, ".qzeros").data,
                                          find_part(whole, ".scales").data)
                         : fmt == PackedFormat::Gptq
                             ? decode_gptq(bits, out, in, find_part(whole, ".qweight").data, find_part(whole, ".qzeros").data,
                                           find_part(whole, ".scales").data, find_part(whole, ".g_idx").data)
                             : decode_compressed_tensors(bits, out, in, find_part(whole, ".weight_packed").data,
                                                         find_part(whole, ".weight_scale").data, ng,
                                                         sym ? std::vector<uint8_t>{} : find_part(whole, ".weight_zero_point").data);
          for (int64_t o = 0; o < out; ++o)
            for (int64_t i = 0; i < in; ++i) {
              const int64_t g = group ? i / group : 0;
              float s;
              core::convert(core::DType::F16, &c.scales[o * ng + g], core::DType::F32, &s, 1);
              ASSERT_EQ(w[o * in + i], s * static_cast<float>(c.codes[o * in + i] - c.zeros[o * ng + g])) << o << "," << i;
            }
        }
}

}  // namespace
}  // namespace moe::test
