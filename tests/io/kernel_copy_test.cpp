// Byte-identical copies from a mapped input (io::WritableFile::copy_from, MappedFile::read_at):
// PosixEnv copies inside the kernel and reads through the descriptor, the defaults (any other Env,
// e.g. the fault-injecting one) through the mapping; both give the source's bytes. And the GGUF
// scale check (io::gguf_scales_finite) that lets a copied block skip the decode: a non-finite f16
// scale in any field it reads is exactly what makes the decoded values non-finite.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <random>

#include "io/env.h"
#include "io/gguf.h"
#include "quant/gguf_blocks.h"
#include "support/expect_error.h"
#include "support/fault_env.h"
#include "support/synth.h"

namespace moe::test {
namespace {

namespace fs = std::filesystem;
using quant::GgmlType;

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<uint8_t> b(n);
  for (auto& x : b) x = static_cast<uint8_t>(g());
  return b;
}

std::vector<uint8_t> read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void copy_ranges(io::Env& env, const fs::path& src, const fs::path& dst) {
  const auto m = env.map_file(src);
  auto f = env.create_file(dst);
  f->write_at(0, "head", 4);
  f->copy_from(4, *m, 1000, 300000);   // a range inside the file
  f->copy_from(300004, *m, 0, 1000);   // then its start, after it
  f->close();
}

TEST(KernelCopy, CopyFromWritesTheSourceBytesInEveryEnv) {
  TempDir dir{"moe-kernel-copy"};
  const auto bytes = random_bytes(400000, 7);
  {
    std::ofstream(dir / "src", std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
  std::vector<uint8_t> want = {'h', 'e', 'a', 'd'};
  want.insert(want.end(), bytes.begin() + 1000, bytes.begin() + 301000);
  want.insert(want.end(), bytes.begin(), bytes.begin() + 1000);
  copy_ranges(io::Env::posix(), dir / "src", dir / "posix");
  EXPECT_EQ(read_all(dir / "posix"), want);
  FaultEnv faults;  // its files take the default copy_from: write_at from the mapping
  copy_ranges(faults, dir / "src", dir / "fault");
  EXPECT_EQ(read_all(dir / "fault"), want);
  // Env::copy_file goes through copy_from.
  io::Env::posix().copy_file(dir / "src", dir / "whole");
  EXPECT_EQ(read_all(dir / "whole"), bytes);
}

TEST(KernelCopy, ReadAtReadsTheMappedBytesAndRefusesRangesPastTheEnd) {
  TempDir dir{"moe-kernel-read"};
  const auto bytes = random_bytes(10000, 9);
  {
    std::ofstream(dir / "src", std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
  const auto m = io::Env::posix().map_file(dir / "src");
  std::vector<uint8_t> got(5000);
  m->read_at(4000, got.data(), got.size());
  EXPECT_TRUE(std::equal(got.begin(), got.end(), bytes.begin() + 4000));
  expect_error([&] { m->read_at(6000, got.data(), got.size()); }, core::ErrorKind::Internal, {"src", "past its end 10000"});
  auto f = io::Env::posix().create_file(dir / "dst");
  expect_error([&] { f->copy_from(0, *m, 9999, 2); }, core::ErrorKind::Internal, {"src", "past its end"});
}

// For every type gguf_scales_finite reads: random finite values encode to blocks it passes; an Inf
// or a NaN in any one scale field (found as the f16 fields whose change changes the decode) makes
// it fail and the decode non-finite; other types are left to the decode.
TEST(KernelCopy, GgufScaleCheckMatchesTheDecode) {
  const GgmlType types[] = {GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::Q2_K,
                            GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::TQ1_0, GgmlType::TQ2_0};
  for (const GgmlType t : types) {
    SCOPED_TRACE(quant::ggml_type_info(t).name);
    const int64_t n = 512;
    std::mt19937 g(3);
    std::normal_distribution<float> d;
    std::vector<float> x(n), y(n);
    for (auto& v : x) v = d(g);
    std::vector<uint8_t> row(quant::ggml_row_bytes(t, n));
    quant::encode_row(t, x.data(), n, row.data());
    ASSERT_EQ(io::gguf_scales_finite(t, row.data(), row.size()), std::optional<bool>(true));
    const uint64_t bs = quant::ggml_type_info(t).type_size;
    // Every 2-byte field of the last block that reads as the scale: setting it to Inf / NaN.
    int fields = 0;
    for (uint64_t o = 0; o + 2 <= bs; o += 2) {
      for (const uint16_t bad : {uint16_t{0x7c00}, uint16_t{0x7e00}}) {
        auto b = row;
        std::memcpy(b.data() + row.size() - bs + o, &bad, 2);
        const bool flagged = !io::gguf_scales_finite(t, b.data(), b.size()).value();
        quant::decode_row(t, b.data(), n, y.data());
        bool finite = true;
        for (const float v : y) finite = finite && std::isfinite(v);
        if (flagged) {
          EXPECT_FALSE(finite) << "offset " << o;  // a flagged scale makes a value non-finite
          fields += bad == 0x7c00;
        }
      }
    }
    const bool two = t == GgmlType::Q4_1 || t == GgmlType::Q5_1 || t == GgmlType::Q2_K || t == GgmlType::Q4_K ||
                     t == GgmlType::Q5_K;
    EXPECT_EQ(fields, two ? 2 : 1);
  }
  // IQ4_NL / IQ4_XS (read, never encoded): hand-built blocks, d at offset 0 of each block.
  for (const GgmlType t : {GgmlType::IQ4_NL, GgmlType::IQ4_XS}) {
    SCOPED_TRACE(quant::ggml_type_info(t).name);
    const int64_t n = 512;
    const uint64_t bs = quant::ggml_type_info(t).type_size;
    std::vector<uint8_t> row(quant::ggml_row_bytes(t, n));
    std::mt19937 g(5);
    for (auto& v : row) v = static_cast<uint8_t>(g());
    for (uint64_t b = 0; b < row.size(); b += bs) {
      const uint16_t d = 0x2000;  // f16 0.0078125
      std::memcpy(row.data() + b, &d, 2);
    }
    ASSERT_EQ(io::gguf_scales_finite(t, row.data(), row.size()), std::optional<bool>(true));
    std::vector<float> y(n);
    for (const uint16_t bad : {uint16_t{0x7c00}, uint16_t{0x7e00}}) {
      auto b = row;
      std::memcpy(b.data() + row.size() - bs, &bad, 2);
      EXPECT_FALSE(io::gguf_scales_finite(t, b.data(), b.size()).value());
      quant::decode_row(t, b.data(), n, y.data());
      EXPECT_FALSE(std::isfinite(y[n - 1]));
    }
  }
  const uint8_t none[66] = {};
  EXPECT_FALSE(io::gguf_scales_finite(GgmlType::IQ2_XXS, none, 66).has_value());
}

}  // namespace
}  // namespace moe::test
