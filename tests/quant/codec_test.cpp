// The intN and ternary codecs (quant/intn.h, quant/ternary.h, quant/codec.h): packing, exact
// dequantisation, storage cost, slicing, the codec spelling, RTN refit, registry decoding.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/error.h"
#include "quant/codec.h"
#include "quant/intn.h"
#include "quant/pack.h"
#include "quant/registry.h"
#include "quant/ternary.h"
#include "support/expect_error.h"
#include "support/ckpt_util.h"

namespace moe::quant {
namespace {

using test::dequant;

using core::DType;
using core::ErrorKind;
using core::Tensor;

std::vector<float> randn(int64_t n, uint32_t seed, float sigma = 0.05f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(g);
  return v;
}

size_t part_bytes(const core::Encoding& e) {
  size_t b = 0;
  for (const auto& p : e.parts()) b += p.tensor->nbytes();
  return b;
}

TEST(QuantPack, BitsRoundTripWithRowPadding) {
  std::mt19937 g(7);
  for (int bits : {2, 3, 4, 8})
    for (int64_t n : {0, 1, 5, 7, 8, 13, 64, 67}) {
      std::vector<uint8_t> c(static_cast<size_t>(n)), back(c.size());
      for (auto& x : c) x = static_cast<uint8_t>(g() % (1u << bits));
      std::vector<uint8_t> packed(static_cast<size_t>((n * bits + 7) / 8), 0xAA);
      pack_bits(c.data(), n, bits, packed.data());
      unpack_bits(packed.data(), n, bits, back.data());
      EXPECT_EQ(back, c) << bits << " bits, n " << n;
      if (n * bits % 8) {
        EXPECT_EQ(packed.back() >> (n * bits % 8), 0) << "padding bits are 0";
      }
    }
  // LSB first: codes 1, 2, 3 at 3 bits = 0b011'010'001 -> bytes 0xD1, 0x00.
  const uint8_t c3[3] = {1, 2, 3};
  uint8_t p3[2];
  pack_bits(c3, 3, 3, p3);
  EXPECT_EQ(p3[0], 0xD1);
  EXPECT_EQ(p3[1], 0x00);
}

TEST(QuantPack, TritsRoundTripWithRowPadding) {
  std::mt19937 g(9);
  for (int64_t n : {0, 1, 4, 5, 6, 10, 67, 256}) {
    std::vector<uint8_t> t(static_cast<size_t>(n)), back(t.size());
    for (auto& x : t) x = static_cast<uint8_t>(g() % 3);
    std::vector<uint8_t> packed(static_cast<size_t>((n + 4) / 5));
    pack_trits(t.data(), n, packed.data());
    for (uint8_t b : packed) EXPECT_LE(b, 242);
    unpack_trits(packed.data(), n, back.data());
    EXPECT_EQ(back, t) << "n " << n;
  }
  const uint8_t t5[5] = {2, 1, 0, 0, 1};  // 2 + 3 + 81
  uint8_t p;
  pack_trits(t5, 5, &p);
  EXPECT_EQ(p, 86);
  // Whole encodings: random trits and levels through Ternary::pack decode exactly.
  const int64_t rows = 3, cols = 23;
  std::vector<uint8_t> tr(rows * cols);
  for (auto& x : tr) x = static_cast<uint8_t>(g() % 3);
  std::vector<float> lo = {-0.5f, -0.25f, -0.125f, -1.0f, -2.0f, -0.75f}, hi = {0.5f, 1.0f, 0.25f, 2.0f, 0.125f, 4.0f};
  const auto e = Ternary::pack(TernaryGrid::MinMax, 16, false, rows, cols, tr.data(), lo.data(), hi.data());
  const auto v = dequant(*e);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t k = r * 2 + j / 16;
      const float want = tr[r * cols + j] == 0 ? 0.0f : tr[r * cols + j] == 1 ? lo[k] : hi[k];
      EXPECT_EQ(v[r * cols + j], want) << r << "," << j;
    }
}

TEST(QuantIntN, Int8OfValuesOnTheGridIsExact) {
  // Each row: integers k * s for k in [-128, 127] with s a power of two, including both extremes,
  // so the asymmetric scale is exactly s and every value is a grid point.
  const int64_t rows = 4, cols = 256;
  std::vector<float> W(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    const float s = std::ldexp(1.0f, -static_cast<int>(r) - 3);
    for (int64_t j = 0; j < cols; ++j) W[r * cols + j] = s * static_cast<float>((j * 37 + r) % 256 - 128);
    W[r * cols] = -128 * s;
    W[r * cols + 1] = 127 * s;
  }
  EXPECT_EQ(dequant(*rtn(W.data(), rows, cols, parse_codec("int8:row:asym"))), W);
  // Symmetric: values k * s, k in [-127, 127], with max |x| = 127.5 s: scale = 255 s / 255 = s.
  std::vector<float> S(cols);
  for (int64_t j = 0; j < cols; ++j) S[j] = 0.25f * static_cast<float>(j % 255 - 127);
  S[5] = 0.25f * 127.5f;  // sets the scale; itself rounds to 128 -> clamped to 127 (the reference's behaviour)
  const auto e = rtn(S.data(), 1, cols, parse_codec("int8:row:sym"));
  auto v = dequant(*e);
  EXPECT_EQ(v[5], 0.25f * 127);
  v[5] = S[5];
  EXPECT_EQ(v, S);
}

TEST(QuantIntN, AllZeroRowDecodesToZeroAndAsymmetricZeroPoint) {
  std::vector<float> W(2 * 10, 0.0f);
  for (int j = 0; j < 10; ++j) W[10 + j] = 0.1f * j;  // non-negative: zero point 0 asymmetric
  const auto e = rtn(W.data(), 2, 10, parse_codec("int4:row:asym"));
  const auto& n = dynamic_cast<const IntN&>(*e);
  EXPECT_EQ(n.zero(1, 0), 0);
  EXPECT_EQ(n.scale(1, 0), round_f16(W[19] / 15));
  const auto v = dequant(*e);
  for (int j = 0; j < 10; ++j) EXPECT_EQ(v[j], 0.0f);
  EXPECT_EQ(n.zero(0, 0), 8);  // degenerate group: lo, hi = -1, 1 -> zero = round(7.5) = 8
}

// The decoders' table and select paths equal the per-element rule s·(q − z) / {0, lo, hi} for
// every shape: odd and even widths, groups that do not divide the row, odd group lengths, one
// group per row; each code value and trit appears.
TEST(QuantIntN, DecodersEqualThePerElementRule) {
  std::mt19937 g(11);
  for (int bits : {2, 3, 4, 8})
    for (int64_t cols : {1, 7, 33, 128, 129, 300})
      for (int64_t group : {0, 3, 4, 32, 128})
        for (bool sym : {true, false}) {
          const int64_t rows = 3, ng = IntN::num_groups(group, cols);
          std::vector<uint8_t> q(static_cast<size_t>(rows * cols)), z(static_cast<size_t>(rows * ng));
          std::vector<float> sc(static_cast<size_t>(rows * ng));
          for (auto& c : q) c = static_cast<uint8_t>(g() % (1u << bits));
          for (auto& v : z) v = static_cast<uint8_t>(g() % (1u << bits));
          for (auto& v : sc) v = round_f16(0.001f * static_cast<float>(1 + g() % 1000));
          const auto e = IntN::pack(bits, group, sym, rows, cols, q.data(), sc.data(), sym ? nullptr : z.data());
          const auto v = dequant(*e);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < cols; ++j) {
              const int64_t gi = group == 0 ? 0 : j / group;
              const float want = e->scale(r, gi) * static_cast<float>(q[r * cols + j] - e->zero(r, gi));
              ASSERT_EQ(v[r * cols + j], want) << bits << " bits, cols " << cols << ", group " << group << ", row " << r
                                               << ", col " << j;
            }
        }
  for (int64_t cols : {1, 7, 33, 129, 300})
    for (int64_t group : {0, 3, 32}) {
      const int64_t rows = 3, ng = Ternary::num_groups(group, cols);
      std::vector<uint8_t> t(static_cast<size_t>(rows * cols));
      std::vector<float> lo(static_cast<size_t>(rows * ng)), hi(lo.size());
      for (auto& c : t) c = static_cast<uint8_t>(g() % 3);
      for (size_t i = 0; i < lo.size(); ++i) {
        lo[i] = round_f16(-0.001f * static_cast<float>(1 + g() % 1000));
        hi[i] = round_f16(0.001f * static_cast<float>(1 + g() % 1000));
      }
      const auto e = Ternary::pack(TernaryGrid::MinMax, group, false, rows, cols, t.data(), lo.data(), hi.data());
      const auto v = dequant(*e);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < cols; ++j) {
          const int64_t gi = group == 0 ? 0 : j / group;
          const uint8_t c = t[r * cols + j];
          ASSERT_EQ(v[r * cols + j], c == 0 ? 0.0f : c == 1 ? e->lo(r, gi) : e->hi(r, gi)) << "cols " << cols << ", group "
                                                                                           << group << ", col " << j;
        }
    }
}

TEST(QuantCodec, BitsPerParamEqualsThePartsBytes) {
  const int64_t rows = 5, cols = 67;
  const auto W = randn(rows * cols, 3);
  for (const char* spec : {"int8:g16:asym", "int4:g16:sym", "int4:g128:asym", "int3:row:sym", "int3:g32:asym",
                           "int2:g16:asym", "ternary", "ternary-absmean:g16", "ternary-minmax:g32:asym",
                           "ternary-minmax:row:sym", "ternary-tq"}) {
    const CodecSpec c = parse_codec(spec);
    const auto e = rtn(W.data(), rows, cols, c);
    EXPECT_DOUBLE_EQ(bits_per_param(c, rows, cols), 8.0 * part_bytes(*e) / (rows * cols)) << spec;
    EXPECT_EQ(e->rows(), rows);
    EXPECT_EQ(e->cols(), cols);
  }
  // The familiar numbers at a wide row: int4 g128 sym = 4 + 16/128 bits.
  EXPECT_DOUBLE_EQ(bits_per_param(parse_codec("int4"), 8, 4096), 4.125);
  EXPECT_DOUBLE_EQ(bits_per_param(parse_codec("int4:g128:asym"), 8, 4096), 4.1875);
  EXPECT_DOUBLE_EQ(bits_per_param(parse_codec("ternary-tq"), 8, 4096), (8.0 * 820 + 16 * 16) / 4096);
}

TEST(QuantCodec, SliceRowsEqualsRowsOfTheWhole) {
  const int64_t rows = 7, cols = 45;
  const auto W = randn(rows * cols, 4);
  for (const char* spec : {"int4:g16:asym", "int3:row:sym", "ternary-minmax:g16:asym", "ternary-absmean:row"}) {
    const auto e = rtn(W.data(), rows, cols, parse_codec(spec));
    const auto whole = dequant(*e);
    const auto s = e->slice_rows(2, 5);
    EXPECT_EQ(dequant(*s), std::vector<float>(whole.begin() + 2 * cols, whole.begin() + 5 * cols)) << spec;
    std::vector<float> part(2 * cols);
    e->dequantize_rows(4, 6, part.data());
    EXPECT_EQ(part, std::vector<float>(whole.begin() + 4 * cols, whole.begin() + 6 * cols)) << spec;
    // Through a Tensor, as every command reads it.
    const Tensor t = Tensor::encoded(e, DType::U8);
    EXPECT_EQ(t.to_f32(), whole);
    EXPECT_EQ(t.slice0(2, 5).to_f32(), dequant(*s));
  }
}

TEST(QuantCodec, ParsesAndPrintsSpellings) {
  const CodecSpec a = parse_codec("int4");
  EXPECT_EQ(a.kind, CodecSpec::Kind::Int);
  EXPECT_EQ(a.bits, 4);
  EXPECT_EQ(a.group, 128);
  EXPECT_TRUE(a.symmetric);
  EXPECT_EQ(to_string(a), "int4:g128:sym");
  const CodecSpec t = parse_codec("ternary");
  EXPECT_EQ(t.grid, TernaryGrid::MinMax);
  EXPECT_EQ(t.group, 0);
  EXPECT_FALSE(t.symmetric);
  EXPECT_EQ(to_string(t), "ternary-minmax:row:asym");
  EXPECT_EQ(to_string(parse_codec("ternary-tq")), "ternary-tq:g256:sym");
  EXPECT_EQ(to_string(parse_codec("ternary-absmean:g64:refit")), "ternary-absmean:g64:sym:refit");
  for (const char* s : {"int8:row:asym", "int3:g32:sym", "int2:g64:asym", "ternary-absmean:row:asym:refit7",
                        "ternary-minmax:g128:sym:t0.4", "ternary-tq:g256:sym:refit"})
    EXPECT_EQ(parse_codec(to_string(parse_codec(s))), parse_codec(s)) << s;
  EXPECT_EQ(parse_codec("ternary-minmax:t0.35").threshold, 0.35);
}

TEST(QuantCodec, RefusesBadSpellings) {
  test::expect_error([] { parse_codec("int5"); }, ErrorKind::InvalidArgument, {"unknown codec \"int5\"", "did you mean"});
  test::expect_error([] { parse_codec("ternay"); }, ErrorKind::InvalidArgument, {"did you mean \"ternary\""});
  test::expect_error([] { parse_codec("int4:g0"); }, ErrorKind::InvalidArgument, {"group 0: expected >= 1"});
  test::expect_error([] { parse_codec("int4:g32:row"); }, ErrorKind::InvalidArgument, {"repeats"});
  test::expect_error([] { parse_codec("int4:refit"); }, ErrorKind::InvalidArgument, {"ternary codecs only"});
  test::expect_error([] { parse_codec("int4:fast"); }, ErrorKind::InvalidArgument, {"unknown option \"fast\""});
  test::expect_error([] { parse_codec("ternary-tq:g128"); }, ErrorKind::InvalidArgument, {"groups of 256"});
  test::expect_error([] { parse_codec("ternary-tq:asym"); }, ErrorKind::InvalidArgument, {"symmetric"});
  test::expect_error([] { parse_codec("ternary:t1.5"); }, ErrorKind::InvalidArgument, {"threshold"});
}

TEST(QuantTernary, RefitIsNeverWorse) {
  const int64_t rows = 16, cols = 300;
  auto W = randn(rows * cols, 11);
  for (int i = 0; i < 20; ++i) W[(i * 997) % W.size()] *= 8;  // outliers: minmax / tq levels far from LS
  auto sse = [&](const core::Encoding& e) {
    const auto v = dequant(e);
    double s = 0;
    for (size_t i = 0; i < v.size(); ++i) s += (double(W[i]) - v[i]) * (double(W[i]) - v[i]);
    return s;
  };
  for (const char* spec : {"ternary-minmax:row", "ternary-minmax:g32:sym", "ternary-absmean:row", "ternary-absmean:g64:asym",
                           "ternary-tq"}) {
    const CodecSpec c = parse_codec(spec);
    CodecSpec r = c;
    r.refit_iters = 4;
    const double base = sse(*rtn(W.data(), rows, cols, c)), refit = sse(*rtn(W.data(), rows, cols, r));
    EXPECT_LE(refit, base) << spec;
    if (c.grid != TernaryGrid::AbsMean) {
      EXPECT_LT(refit, base) << spec << ": outliers leave room to gain";
    }
  }
}

TEST(QuantTernary, TqFollowsLlamaCppRule) {
  // d = max|x| = 1 here: t = lround(x), ties away from zero (0.5 -> 1, unlike absmean's ties to 0).
  std::vector<float> x(256, 0.0f);
  x[0] = 1.0f;
  x[1] = 0.5f;
  x[2] = -0.5f;
  x[3] = 0.49f;
  x[4] = -1.0f;
  const auto e = rtn(x.data(), 1, 256, parse_codec("ternary-tq"));
  const auto v = dequant(*e);
  EXPECT_EQ(v[0], 1.0f);
  EXPECT_EQ(v[1], 1.0f);
  EXPECT_EQ(v[2], -1.0f);
  EXPECT_EQ(v[3], 0.0f);
  EXPECT_EQ(v[4], -1.0f);
  const auto a = dequant(*rtn(x.data(), 1, 256, parse_codec("ternary-minmax:row:sym")));
  EXPECT_EQ(a[1], 0.0f);  // x > hi / 2 strictly
}

TEST(QuantTernary, VectorCodesEqualTheScalarRule) {
  auto x = randn(103, 12, 1.0f);
  TernaryLevels l;
  l.lo = -0.75f;
  l.hi = 1.25f;
  l.inv = 0.8f;
  x[0] = 0.625f;   // hi * 0.5 exactly: not above
  x[1] = -0.375f;  // lo * 0.5 exactly: not below
  x[2] = 0.625f;   // x * inv = 0.5: tq rounds away from zero
  x[3] = -0.625f;
  for (TernaryGrid g : {TernaryGrid::AbsMean, TernaryGrid::MinMax, TernaryGrid::TQ})
    for (double tau : {0.5, 0.3}) {
      std::vector<uint8_t> t(x.size());
      ternary_codes(x.data(), static_cast<int64_t>(x.size()), l, g, tau, t.data());
      for (size_t j = 0; j < x.size(); ++j) EXPECT_EQ(t[j], ternary_code(x[j], l, g, tau)) << grid_name(g) << " " << j;
    }
}

TEST(QuantRegistry, DecodesIntNAndTernaryAndNamesWhatIsWrong) {
  const auto W = randn(4 * 37, 5);
  auto stored = [](const core::Encoding& e) {
    std::map<std::string, StoredPart> m;
    for (const auto& p : e.parts()) m[p.role] = {p.tensor, false};
    return m;
  };
  for (const char* spec : {"int4:g16:asym", "int3:row:sym", "ternary-minmax:g16:asym", "ternary-absmean:row"}) {
    const auto e = rtn(W.data(), 4, 37, parse_codec(spec));
    nlohmann::json entry = e->params();
    entry["encoding"] = e->name();
    const auto d = decode(entry, stored(*e));
    EXPECT_EQ(d->name(), e->name());
    EXPECT_EQ(dequant(*d), dequant(*e)) << spec;
  }
  const auto e = rtn(W.data(), 4, 37, parse_codec("int4:g16:asym"));
  nlohmann::json entry = e->params();
  entry["encoding"] = "intN";
  const auto parts = stored(*e);
  using test::expect_error;
  auto with = [&](const char* key, nlohmann::json v) {
    auto j = entry;
    j[key] = v;
    return j;
  };
  expect_error([&] { decode(with("bits", 5), parts); }, ErrorKind::Corruption, {"bits", "2, 3, 4 or 8", "5"});
  expect_error([&] { decode(with("cols", 40), parts); }, ErrorKind::Corruption, {"part \"codes\"", "[4, 20]"});
  expect_error([&] { decode(with("group", 8), parts); }, ErrorKind::Corruption, {"part \"scales\"", "[4, 5]"});
  expect_error([&] { decode(with("symmetric", true), parts); }, ErrorKind::Corruption, {"zeros"});
  expect_error([&] { decode(with("symmetric", "no"), parts); }, ErrorKind::Corruption, {"symmetric"});
  auto no_zeros = parts;
  no_zeros.erase("zeros");
  expect_error([&] { decode(entry, no_zeros); }, ErrorKind::Corruption, {"part \"zeros\" missing"});
  auto bad_zero = parts;
  auto zt = std::make_shared<Tensor>(Tensor::zeros(DType::U8, {4, 3}));
  zt->mutable_data()[1] = 16;
  bad_zero["zeros"] = {zt, false};
  expect_error([&] { decode(entry, bad_zero); }, ErrorKind::Corruption, {"zero point 16 above 15"});
  auto f32_scales = parts;
  f32_scales["scales"] = {std::make_shared<const Tensor>(parts.at("scales").tensor->converted(DType::F32)), false};
  expect_error([&] { decode(entry, f32_scales); }, ErrorKind::Corruption, {"part \"scales\"", "F16"});

  const auto t = rtn(W.data(), 4, 37, parse_codec("ternary-minmax:g16:asym"));
  nlohmann::json te = t->params();
  te["encoding"] = "ternary";
  const auto tparts = stored(*t);
  auto twith = [&](const char* key, nlohmann::json v) {
    auto j = te;
    j[key] = v;
    return j;
  };
  expect_error([&] { decode(twith("grid", "maxmin"), tparts); }, ErrorKind::Corruption, {"grid", "\"maxmin\""});
  expect_error([&] { decode(twith("symmetric", true), tparts); }, ErrorKind::Corruption, {"part \"scales\"", "[4, 3]"});
  expect_error([&] { decode(twith("grid", "tq"), tparts); }, ErrorKind::Corruption, {"tq needs group 256"});
  expect_error([&] { decode(twith("cols", 50), tparts); }, ErrorKind::Corruption, {"part \"codes\"", "[rows, 10]"});
  auto bad_trits = tparts;
  auto ct = std::make_shared<Tensor>(Tensor::zeros(DType::U8, {4, 8}));
  ct->mutable_data()[3] = 243;
  bad_trits["codes"] = {ct, false};
  expect_error([&] { decode(te, bad_trits); }, ErrorKind::Corruption, {"byte 243", "five trits"});
  auto extra = tparts;
  extra["zeros"] = tparts.at("codes");
  expect_error([&] { decode(te, extra); }, ErrorKind::Corruption, {"unexpected part \"zeros\""});
}

}  // namespace
}  // namespace moe::quant
