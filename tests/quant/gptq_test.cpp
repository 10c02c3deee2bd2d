// GPTQ and RTN against the independent references of data/scripts/make_quant_goldens.py
// (data/golden/quant.json: NumPy RTN, torch GPTQ), and GPTQ's closed-form properties: it never
// loses to RTN on the proxy loss, H = I gives RTN, dead columns quantize to 0, Cholesky failure
// raises the damping and then falls back to RTN (recorded), the weighted refit never hurts.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "core/error.h"
#include "quant/codec.h"
#include "quant/gguf_blocks.h"
#include "quant/gptq.h"
#include "support/expect_error.h"
#include "support/ckpt_util.h"

namespace moe::quant {
namespace {

using test::dequant;

using nlohmann::json;

json golden() {
  const std::filesystem::path path = std::filesystem::path(MOE_SOURCE_DIR) / "data/golden/quant.json";
  std::ifstream in(path);
  EXPECT_TRUE(in) << "missing " << path << " (run data/scripts/make_quant_goldens.py)";
  std::stringstream ss;
  ss << in.rdbuf();
  return json::parse(ss.str());
}

std::vector<float> floats(const json& j) {
  std::vector<float> v;
  for (const auto& x : j) v.push_back(static_cast<float>(x.get<double>()));
  return v;
}

struct Diff {
  double mismatch = 0;  // fraction of elements that differ
  double rel = 0;       // ||got - want|| / ||want||
};
Diff diff(const std::vector<float>& got, const std::vector<float>& want) {
  Diff d;
  double num = 0, den = 0;
  size_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    bad += got[i] != want[i];
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += double(want[i]) * want[i];
  }
  d.mismatch = want.empty() ? 0 : double(bad) / double(want.size());
  d.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return d;
}

TEST(QuantGolden, RtnMatchesNumpyReference) {
  const json g = golden();
  int n = 0;
  for (const json& c : g.at("rtn")) {
    const std::string spec = c.at("codec");
    const json& wj = g.at("weights").at(c.at("weight").get<std::string>());
    const int64_t rows = wj.at("shape")[0], cols = wj.at("shape")[1];
    const std::vector<float> W = floats(wj.at("values")), want = floats(c.at("dequant"));
    const auto got = dequant(*rtn(W.data(), rows, cols, parse_codec(spec)));
    // Both sides do the same f32 operations in the same order (the reference's means are f64, as
    // ours): the results are identical. A tie broken differently (a value exactly between two
    // levels after f16 rounding of the scale) would move one element by one step; none occurs.
    const Diff d = diff(got, want);
    EXPECT_EQ(d.mismatch, 0.0) << spec << ": rel " << d.rel;
    ++n;
  }
  EXPECT_GE(n, 19);
}

TEST(QuantGolden, GptqMatchesTorchReference) {
  const json g = golden();
  const json& layer = g.at("gptq_layer");
  const int64_t rows = layer.at("weight").at("shape")[0], cols = layer.at("weight").at("shape")[1];
  const std::vector<float> W = floats(layer.at("weight").at("values"));
  const std::vector<double> H = layer.at("hessian").get<std::vector<double>>();
  const int64_t dead = layer.at("dead_column");
  for (const json& c : g.at("gptq")) {
    const std::string spec = c.at("codec");
    GptqOptions o;
    o.block = c.at("block");
    o.act_order = c.at("act_order");
    o.damp = c.at("damp");
    GptqInfo info;
    const auto got = dequant(*gptq(W.data(), rows, cols, H.data(), parse_codec(spec), o, &info));
    const std::vector<float> want = floats(c.at("dequant"));
    const std::string what = spec + " block " + std::to_string(o.block) + (o.act_order ? " act-order" : "");
    // The block propagation is an SGEMM here and a torch matmul there: f32 sums in another order
    // (relative differences ~1e-7 in the updated weights). A weight that lands within that of a
    // rounding boundary may take the neighbouring code, and its different error then moves the
    // later columns of its row a little. Allowed: 1% of the codes, 1% relative error overall.
    const Diff d = diff(got, want);
    std::printf("golden gptq %s: %.4f of the values differ, relative error %.2e\n", what.c_str(), d.mismatch, d.rel);
    EXPECT_LE(d.mismatch, 0.01) << what << ": rel " << d.rel;
    EXPECT_LE(d.rel, 0.01) << what << ": mismatch " << d.mismatch;
    EXPECT_EQ(info.dead_columns, 1) << what;
    EXPECT_FALSE(info.rtn_fallback) << what;
    EXPECT_EQ(info.cholesky_retries, 0) << what;
    EXPECT_LE(info.proxy_loss_gptq, info.proxy_loss_rtn) << what;
    for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(got[r * cols + dead], 0.0f) << what << ": dead column";
  }
}

// A layer with strongly correlated inputs: H = Xᵀ X, X = Z M.
struct Layer {
  int64_t rows, cols;
  std::vector<float> W;
  std::vector<double> H;
};
Layer correlated(int64_t rows, int64_t cols, int64_t samples, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  Layer l{rows, cols, std::vector<float>(static_cast<size_t>(rows * cols)), std::vector<double>(static_cast<size_t>(cols * cols))};
  for (auto& w : l.W) w = static_cast<float>(0.05 * nd(g));
  std::vector<double> M(static_cast<size_t>(cols * cols)), X(static_cast<size_t>(samples * cols), 0.0);
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = 0; j < cols; ++j) M[i * cols + j] = (i == j ? 1.0 : 0.0) + 0.3 * nd(g);
  std::vector<double> z(static_cast<size_t>(cols));
  for (int64_t s = 0; s < samples; ++s) {
    for (auto& v : z) v = nd(g);
    for (int64_t i = 0; i < cols; ++i)
      for (int64_t j = 0; j < cols; ++j) X[s * cols + j] += z[i] * M[i * cols + j];
  }
  for (int64_t s = 0; s < samples; ++s)
    for (int64_t i = 0; i < cols; ++i)
      for (int64_t j = 0; j < cols; ++j) l.H[i * cols + j] += X[s * cols + i] * X[s * cols + j];
  return l;
}

TEST(QuantGptq, BeatsRtnOnTheProxyLoss) {
  const Layer l = correlated(24, 80, 300, 1);
  for (const char* spec : {"int8:g32:asym", "int4:g32:asym", "int4:row:sym", "int3:g16:sym", "int2:row:asym",
                           "ternary-minmax:row", "ternary-absmean:g32", "ternary-tq"}) {
    const CodecSpec c = parse_codec(spec);
    for (bool ao : {false, true}) {
      GptqOptions o;
      o.block = 32;
      o.act_order = ao;
      o.damp = c.kind == CodecSpec::Kind::Ternary ? 0.1 : 0.01;
      GptqInfo info;
      const auto e = gptq(l.W.data(), l.rows, l.cols, l.H.data(), c, o, &info);
      EXPECT_LT(info.proxy_loss_gptq, info.proxy_loss_rtn) << spec << (ao ? " act-order" : "");
      EXPECT_DOUBLE_EQ(info.proxy_loss_gptq, proxy_loss(l.W.data(), l.rows, l.cols, l.H.data(), *e)) << spec;
      EXPECT_DOUBLE_EQ(info.proxy_loss_rtn, proxy_loss(l.W.data(), l.rows, l.cols, l.H.data(), *rtn(l.W.data(), l.rows, l.cols, c)));
      EXPECT_EQ(info.damp_used, o.damp);
      EXPECT_EQ(e->name(), c.kind == CodecSpec::Kind::Int ? "intN" : "ternary");
    }
  }
}

TEST(QuantGptq, IdentityHessianGivesRtn) {
  const Layer l = correlated(6, 40, 10, 2);
  std::vector<double> I(40 * 40, 0.0);
  for (int i = 0; i < 40; ++i) I[i * 40 + i] = 3.0;
  for (const char* spec : {"int4:g16:asym", "int3:row:sym", "ternary-minmax:row", "ternary-absmean:g16:asym"}) {
    const CodecSpec c = parse_codec(spec);
    GptqOptions o;
    o.block = 16;
    EXPECT_EQ(dequant(*gptq(l.W.data(), 6, 40, I.data(), c, o, nullptr)), dequant(*rtn(l.W.data(), 6, 40, c))) << spec;
  }
}

// The ggml block types (codec "q4_k", ...): GPTQ within the grid of scales chosen first. Rows of
// 512 (two K-quant super-blocks), a correlated Hessian: the proxy loss below RTN's (RTN: the
// blocks export --type writes), every value on its block's grid; with a diagonal Hessian there is
// no error feedback, and the bytes are RTN's exactly for the K-quants (whose RTN codes are the
// same nearest-on-the-decoded-grid rule; the 32-blocks' RTN rounds x/d directly).
TEST(QuantGptq, WithinTheGgmlBlockGrids) {
  const Layer l = correlated(12, 512, 600, 5);
  std::vector<double> D(512 * 512, 0.0);
  for (int i = 0; i < 512; ++i) D[i * 512 + i] = 1.0 + i % 7;
  for (const char* spec : {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}) {
    SCOPED_TRACE(spec);
    const CodecSpec c = parse_codec(spec);
    ASSERT_EQ(c.kind, CodecSpec::Kind::Ggml);
    EXPECT_EQ(to_string(c), spec);
    EXPECT_EQ(parse_codec(to_string(c)), c);
    const auto& info = ggml_type_info(c.ggml);
    EXPECT_DOUBLE_EQ(bits_per_param(c, 12, 512), 8.0 * static_cast<double>(info.type_size) / static_cast<double>(info.block));
    for (bool ao : {false, true}) {
      GptqOptions o;
      o.block = 64;
      o.act_order = ao;
      GptqInfo gi;
      const auto e = gptq(l.W.data(), l.rows, l.cols, l.H.data(), c, o, &gi);
      EXPECT_EQ(e->name(), "gguf-" + std::string(spec));
      EXPECT_LT(gi.proxy_loss_gptq, gi.proxy_loss_rtn) << (ao ? "act-order" : "");
      EXPECT_DOUBLE_EQ(gi.proxy_loss_gptq, proxy_loss(l.W.data(), l.rows, l.cols, l.H.data(), *e));
      // Every decoded value is a point of its sub-block's grid: its own nearest code gives it back,
      // and writing those codes into the block changes no byte.
      const auto* gb = dynamic_cast<const GgufBlocks*>(e.get());
      ASSERT_NE(gb, nullptr);
      const GgmlGridInfo g = *ggml_grid_info(c.ggml);
      std::vector<float> y(512);
      std::vector<uint8_t> block(info.type_size);
      float step[16], offset[16];
      std::vector<int> q(static_cast<size_t>(info.block));
      for (int64_t r = 0; r < l.rows; ++r) {
        gb->dequantize_rows(r, r + 1, y.data());
        for (int64_t b0 = 0; b0 < 512; b0 += info.block) {
          const uint8_t* stored = gb->bytes().data() + r * gb->bytes().dim(1) + b0 / info.block * info.type_size;
          std::copy_n(stored, info.type_size, block.data());
          ggml_block_grid(c.ggml, block.data(), step, offset);
          for (int64_t k = 0; k < info.block; ++k) {
            float v;
            q[k] = ggml_grid_code(step[k / g.sub], offset[k / g.sub], g, y[b0 + k], &v);
            ASSERT_EQ(v, y[b0 + k]) << "row " << r << " value " << b0 + k;
          }
          ggml_set_block_codes(c.ggml, block.data(), q.data());
          ASSERT_TRUE(std::equal(block.begin(), block.end(), stored)) << "row " << r << " block " << b0 / info.block;
        }
      }
    }
    GptqOptions o;
    o.block = 64;
    const auto diag = gptq(l.W.data(), l.rows, l.cols, D.data(), c, o, nullptr);
    if (info.block == 256) {
      EXPECT_EQ(dequant(*diag), dequant(*rtn(l.W.data(), l.rows, l.cols, c)));
    }
  }
  test::expect_error([] { parse_codec("q4_k:g32"); }, core::ErrorKind::InvalidArgument, {"fixed layout"});
  test::expect_error([] { parse_codec("tq1_0"); }, core::ErrorKind::InvalidArgument, {"unknown codec"});
  test::expect_error([] { bits_per_param(parse_codec("q4_k"), 4, 128); }, core::ErrorKind::InvalidArgument, {"block size 256"});
  const Layer n = correlated(2, 128, 200, 6);
  test::expect_error([&] { gptq(n.W.data(), 2, 128, n.H.data(), parse_codec("q6_k"), GptqOptions{}, nullptr); },
               core::ErrorKind::InvalidArgument, {"block size 256"});
}

TEST(QuantGptq, DeadColumnsQuantizeToZero) {
  Layer l = correlated(8, 48, 100, 3);
  for (int64_t dc : {0, 17, 47}) {
    for (int64_t k = 0; k < 48; ++k) l.H[dc * 48 + k] = l.H[k * 48 + dc] = 0.0;
    for (int64_t r = 0; r < 8; ++r) l.W[r * 48 + dc] = 0.3f;  // large: would dominate the range if kept
  }
  for (const char* spec : {"int4:g16:asym", "int4:row:sym", "ternary-minmax:row"}) {
    for (bool ao : {false, true}) {
      GptqOptions o;
      o.block = 16;
      o.act_order = ao;
      GptqInfo info;
      const auto v = dequant(*gptq(l.W.data(), 8, 48, l.H.data(), parse_codec(spec), o, &info));
      EXPECT_EQ(info.dead_columns, 3);
      for (int64_t r = 0; r < 8; ++r)
        for (int64_t dc : {0, 17, 47}) EXPECT_EQ(v[r * 48 + dc], 0.0f) << spec << " row " << r << " col " << dc;
    }
  }
}

TEST(QuantGptq, CholeskyFailureRaisesDampingThenFallsBackToRtn) {
  const int64_t n = 8, rows = 5;
  const Layer l = correlated(rows, n, 20, 4);
  // Pairs [[1, a], [a, 1]]: eigenvalues 1 ± a. mean(diag) = 1, so damping p adds p.
  auto pairs = [&](double a) {
    std::vector<double> H(n * n, 0.0);
    for (int64_t i = 0; i < n; i += 2) {
      H[i * n + i] = H[(i + 1) * n + i + 1] = 1.0;
      H[i * n + i + 1] = H[(i + 1) * n + i] = a;
    }
    return H;
  };
  const CodecSpec c = parse_codec("int4:row:asym");
  GptqOptions o;
  GptqInfo info;
  // a = 100: λ_min = −99, more than 0.01 · 1000 = 10 of damping: every attempt fails.
  const auto H1 = pairs(100.0);
  const auto e = gptq(l.W.data(), rows, n, H1.data(), c, o, &info);
  EXPECT_TRUE(info.rtn_fallback);
  EXPECT_EQ(info.cholesky_retries, 3);
  EXPECT_DOUBLE_EQ(info.damp_used, 10.0);
  EXPECT_EQ(dequant(*e), dequant(*rtn(l.W.data(), rows, n, c)));
  EXPECT_EQ(info.proxy_loss_gptq, info.proxy_loss_rtn);
  // a = 9.5: λ_min = −8.5; damping 0.01, 0.1, 1 fail, 10 succeeds.
  const auto H2 = pairs(9.5);
  gptq(l.W.data(), rows, n, H2.data(), c, o, &info);
  EXPECT_FALSE(info.rtn_fallback);
  EXPECT_EQ(info.cholesky_retries, 3);
  EXPECT_DOUBLE_EQ(info.damp_used, 10.0);
  // a = 0.5: positive definite, no retry.
  const auto H3 = pairs(0.5);
  gptq(l.W.data(), rows, n, H3.data(), c, o, &info);
  EXPECT_FALSE(info.rtn_fallback);
  EXPECT_EQ(info.cholesky_retries, 0);
}

TEST(QuantGptq, WeightedRefitIsNeverWorse) {
  const Layer l = correlated(16, 64, 200, 5);
  for (const char* spec : {"ternary-minmax:row", "ternary-minmax:g16:asym", "ternary-absmean:row", "ternary-absmean:g32:asym",
                           "ternary-minmax:row:sym"}) {
    CodecSpec c = parse_codec(spec);
    GptqOptions o;
    o.damp = 0.1;
    o.block = 16;
    GptqInfo plain, refit;
    gptq(l.W.data(), 16, 64, l.H.data(), c, o, &plain);
    c.refit_iters = 3;
    gptq(l.W.data(), 16, 64, l.H.data(), c, o, &refit);
    EXPECT_LE(refit.proxy_loss_gptq, plain.proxy_loss_gptq * (1 + 1e-12)) << spec;
    if (c.grid == TernaryGrid::MinMax) {
      EXPECT_LT(refit.proxy_loss_gptq, plain.proxy_loss_gptq) << spec;
    }
  }
}

TEST(QuantGptq, RefusesBadInput) {
  const Layer l = correlated(2, 4, 8, 6);
  GptqOptions o;
  o.block = 0;
  test::expect_error([&] { gptq(l.W.data(), 2, 4, l.H.data(), parse_codec("int4"), o, nullptr); },
                     core::ErrorKind::InvalidArgument, {"block"});
  o.block = 128;
  auto H = l.H;
  H[5] = std::nan("");
  test::expect_error([&] { gptq(l.W.data(), 2, 4, H.data(), parse_codec("int4"), o, nullptr); },
                     core::ErrorKind::InvalidArgument, {"Hessian [1, 1] is not finite"});
  auto W = l.W;
  W[6] = INFINITY;
  test::expect_error([&] { gptq(W.data(), 2, 4, l.H.data(), parse_codec("int4"), o, nullptr); },
                     core::ErrorKind::InvalidArgument, {"weight [1, 2] is not finite"});
  test::expect_error([&] { rtn(W.data(), 2, 4, parse_codec("int4")); }, core::ErrorKind::InvalidArgument,
                     {"weight [1, 2] is not finite"});
}

}  // namespace
}  // namespace moe::quant
