// The wire form of exchanged encodings (passes/encoding_exchange.h): what one MPI rank sends is
// decoded by the others into encodings with the same parameters and the same stored bytes, and the
// report entries come back as sent (doubles exactly); a damaged buffer or a shared part is refused.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "core/tensor.h"
#include "passes/encoding_exchange.h"
#include "quant/codec.h"
#include "quant/lowrank.h"
#include "support/expect_error.h"

namespace moe::test {
namespace {

using nlohmann::json;

std::vector<float> values(int64_t n, float phase) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = std::sin(0.37f * static_cast<float>(i) + phase);
  return v;
}

std::shared_ptr<const core::Encoding> coded(const std::string& codec, int64_t rows, int64_t cols, float phase) {
  const auto w = values(rows * cols, phase);
  return quant::rtn(w.data(), rows, cols, quant::parse_codec(codec));
}

std::string bytes(const core::Tensor& t) { return std::string(reinterpret_cast<const char*>(t.data()), t.nbytes()); }

void expect_same(const core::Encoding& a, const core::Encoding& b) {
  EXPECT_EQ(a.name(), b.name());
  EXPECT_EQ(a.params(), b.params());
  EXPECT_EQ(a.rows(), b.rows());
  EXPECT_EQ(a.cols(), b.cols());
  const auto pa = a.parts(), pb = b.parts();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_EQ(pa[i].role, pb[i].role);
    EXPECT_EQ(pa[i].tensor->dtype(), pb[i].tensor->dtype());
    EXPECT_EQ(pa[i].tensor->shape(), pb[i].tensor->shape());
    EXPECT_TRUE(bytes(*pa[i].tensor) == bytes(*pb[i].tensor)) << a.name() << " part " << pa[i].role;
  }
}

TEST(EncodingExchange, RoundTripKeepsParamsBytesAndReports) {
  const auto a = core::Tensor::from_f32(values(12 * 4, 0.1f), {12, 4});
  const auto b = core::Tensor::from_f32(values(4 * 40, 0.2f), {4, 40});
  std::vector<passes::EncodedSlot> sent = {
      {0, coded("int4:g16:asym", 12, 40, 0.0f), {{"method", "gptq"}, {"proxy_loss", 0.1 + 0.2}, {"tokens", 7}}},
      {2, coded("int3:row:sym", 5, 33, 1.0f), json::object()},
      {7, coded("ternary", 6, 21, 2.0f), {{"damp", 1.0 / 3.0}}},
      {9, std::make_shared<quant::LowRank>(std::make_shared<const core::Tensor>(a.converted(core::DType::BF16)),
                                           std::make_shared<const core::Tensor>(b.converted(core::DType::BF16))),
       {{"rank", 4}}},
      {11, nullptr, {{"matrices", json::array({{{"rank", "dense"}}})}}}};  // kept as it was: the report only
  const auto got = passes::unpack_encodings(passes::pack_encodings(sent));
  ASSERT_EQ(got.size(), sent.size());
  for (size_t i = 0; i < sent.size(); ++i) {
    EXPECT_EQ(got[i].slot, sent[i].slot);
    EXPECT_EQ(got[i].report, sent[i].report);  // 0.1 + 0.2 and 1/3 exactly
    ASSERT_EQ(got[i].encoding == nullptr, sent[i].encoding == nullptr);
    if (sent[i].encoding) expect_same(*got[i].encoding, *sent[i].encoding);
  }
  EXPECT_TRUE(passes::unpack_encodings(passes::pack_encodings({})).empty());
}

TEST(EncodingExchange, DamagedBufferIsRefused) {
  auto buf = passes::pack_encodings({{3, coded("int4:g16:asym", 8, 32, 0.5f), json::object()}});
  auto cut = buf;
  cut.pop_back();
  expect_error([&] { passes::unpack_encodings(cut); }, core::ErrorKind::Corruption, {"mpi: exchanged encodings", "past the end"});
  auto longer = buf;
  longer.push_back(0);
  expect_error([&] { passes::unpack_encodings(longer); }, core::ErrorKind::Corruption, {"1 bytes after the last part"});
  expect_error([&] { passes::unpack_encodings({1, 2, 3}); }, core::ErrorKind::Corruption, {"8-byte header length"});
}

TEST(EncodingExchange, SharedPartIsRefused) {
  const auto a = std::make_shared<const core::Tensor>(core::Tensor::from_f32(values(8 * 2, 0.3f), {8, 2}));
  const auto b = std::make_shared<const core::Tensor>(core::Tensor::from_f32(values(2 * 8, 0.4f), {2, 8}));
  const auto enc = std::make_shared<quant::LowRank>(a, b, nullptr, true, false, false);
  expect_error([&] { passes::pack_encodings({{5, enc, json::object()}}); }, core::ErrorKind::NotSupported,
               {"slot 5", "shared by several weights (a)"});
}

}  // namespace
}  // namespace moe::test
