// GGUF reader and writer (io/gguf.h): a written file read back (every value type, arrays, tensor
// data, alignment padding), and the reader's refusals of bad files, each naming the file and the
// field: truncated data, offset past the end, misaligned offset, string / array length past the
// file, unknown value and ggml types, n_dims > 4, huge n_kv / n_tensors, duplicate names and keys.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>

#include "io/env.h"
#include "io/gguf.h"
#include "support/expect_error.h"
#include "support/synth.h"

namespace moe::test {
namespace {

namespace fs = std::filesystem;
using io::GgufValue;
using quant::GgmlType;

TEST(Gguf, WriteThenReadBack) {
  TempDir dir{"moe-gguf"};
  const fs::path p = dir / "m.gguf";
  io::GgufMetadata kv = {{"general.name", GgufValue::string("tiny")},
                         {"a.u32", GgufValue::u32(7)},
                         {"a.i32", GgufValue::i32(-3)},
                         {"a.u64", GgufValue::u64(1ull << 40)},
                         {"a.f32", GgufValue::f32(0.5f)},
                         {"a.bool", GgufValue::boolean(true)},
                         {"a.tokens", GgufValue::strings({"x", "", "Ġy"})},
                         {"a.ints", GgufValue::i32s({1, -2, 3})},
                         {"a.floats", GgufValue::f32s({1.5f, -2.0f})}};
  std::vector<io::GgufTensorInfo> ts = {{"w", {64, 3}, GgmlType::Q8_0, 0}, {"n", {5}, GgmlType::F32, 0},
                                        {"e", {32, 2, 2}, GgmlType::F16, 0}};
  io::GgufWriter w(io::Env::posix(), p, kv, ts);
  std::vector<float> wv(64 * 3), nv = {1, 2, 3, 4, 5}, ev(128);
  for (size_t i = 0; i < wv.size(); ++i) wv[i] = static_cast<float>(i % 32) - 16.0f;
  for (size_t i = 0; i < ev.size(); ++i) ev[i] = static_cast<float>(i) * 0.25f;
  std::vector<uint8_t> wb(quant::ggml_row_bytes(GgmlType::Q8_0, 64) * 3), eb(256);
  for (int r = 0; r < 3; ++r) quant::encode_row(GgmlType::Q8_0, wv.data() + r * 64, 64, wb.data() + r * 68);
  quant::encode_row(GgmlType::F16, ev.data(), 128, eb.data());
  w.append(wb.data(), 100);  // in pieces, across nothing but the one tensor
  w.append(wb.data() + 100, wb.size() - 100);
  w.append(nv.data(), nv.size() * 4);
  w.append(eb.data(), 128);
  w.append(eb.data() + 128, 128);
  const uint64_t size = w.finish();
  EXPECT_EQ(size, fs::file_size(p));

  const auto f = io::GgufFile::open(io::Env::posix(), p);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.data_offset() % 32, 0u);
  EXPECT_EQ(f.find("general.name")->as_string("k"), "tiny");
  EXPECT_EQ(f.find("a.u32")->as_int("k"), 7);
  EXPECT_EQ(f.find("a.i32")->as_int("k"), -3);
  EXPECT_EQ(f.find("a.u64")->as_int("k"), 1ll << 40);
  EXPECT_EQ(f.find("a.f32")->as_double("k"), 0.5);
  EXPECT_EQ(f.find("a.bool")->integer, 1u);
  EXPECT_EQ(f.find("general.alignment")->as_int("k"), 32);  // added by the writer
  const auto& toks = f.find("a.tokens")->items;
  ASSERT_EQ(toks.size(), 3u);
  EXPECT_EQ(toks[2].str, "Ġy");
  EXPECT_EQ(f.find("a.ints")->items[1].as_int("k"), -2);
  EXPECT_EQ(f.find("a.floats")->items[0].as_double("k"), 1.5);
  expect_error([&] { (void)f.find("a.tokens")->as_int("a.tokens"); }, core::ErrorKind::Corruption, {"a.tokens", "array"});

  ASSERT_EQ(f.tensors().size(), 3u);
  const auto* n = f.find_tensor("n");
  ASSERT_NE(n, nullptr);
  EXPECT_EQ(n->offset % 32, 0u);
  EXPECT_EQ(f.decode(*n), nv);
  EXPECT_EQ(f.decode(*f.find_tensor("e")), ev);  // multiples of 1/4: exact in f16
  const auto wd = f.decode(*f.find_tensor("w"));
  std::vector<float> expect(wv.size());
  for (int r = 0; r < 3; ++r) quant::decode_row(GgmlType::Q8_0, wb.data() + r * 68, 64, expect.data() + r * 64);
  EXPECT_EQ(wd, expect);
  EXPECT_EQ(f.find_tensor("w")->ne, (std::vector<int64_t>{64, 3}));
}

TEST(Gguf, WriterMisuseIsInternal) {
  TempDir dir{"moe-gguf"};
  expect_error([&] { io::GgufWriter(io::Env::posix(), dir / "a.gguf", {}, {{"t", {30}, GgmlType::Q8_0, 0}}); },
               core::ErrorKind::Internal, {"t", "block size 32"});
  io::GgufWriter w(io::Env::posix(), dir / "b.gguf", {}, {{"t", {4}, GgmlType::F32, 0}});
  const float v[4] = {};
  w.append(v, 8);
  expect_error([&] { w.finish(); }, core::ErrorKind::Internal, {"t", "8 of 16"});
}

// A small GGUF built byte by byte, with knobs to break each field.
struct Spec {
  uint32_t magic = io::kGgufMagic, version = 3;
  std::optional<uint64_t> n_kv, n_tensors;  // declared counts (default: the real ones)
  std::optional<uint64_t> string_len;       // the key's declared length
  uint32_t value_type = 8;                  // of the kv (string)
  std::optional<uint64_t> array_len;        // with value_type 9: an array of u32 of this declared length
  uint32_t type_b = 8;                      // ggml type of tensor "b" (Q8_0)
  uint32_t n_dims_b = 1;
  uint64_t offset_b = 64;
  std::string name_b = "b";
  size_t cut = 0;                           // bytes removed from the end
};

std::vector<uint8_t> build(const Spec& s) {
  std::vector<uint8_t> b;
  auto u32 = [&](uint32_t v) { b.insert(b.end(), reinterpret_cast<uint8_t*>(&v), reinterpret_cast<uint8_t*>(&v) + 4); };
  auto u64 = [&](uint64_t v) { b.insert(b.end(), reinterpret_cast<uint8_t*>(&v), reinterpret_cast<uint8_t*>(&v) + 8); };
  auto str = [&](const std::string& x, std::optional<uint64_t> len = {}) {
    u64(len.value_or(x.size()));
    b.insert(b.end(), x.begin(), x.end());
  };
  u32(s.magic);
  u32(s.version);
  u64(s.n_tensors.value_or(2));
  u64(s.n_kv.value_or(1));
  str("general.name", s.string_len);
  u32(s.value_type);
  if (s.value_type == 9) {
    u32(4);
    u64(s.array_len.value_or(2));
    u32(1);
    u32(2);
  } else {
    str("tiny");
  }
  str("a");  // F32 [8, 2] at 0: 64 bytes
  u32(2);
  u64(8);
  u64(2);
  u32(0);
  u64(0);
  str(s.name_b);  // Q8_0 [32] at 64: 34 bytes
  u32(s.n_dims_b);
  for (uint32_t d = 0; d < s.n_dims_b; ++d) u64(d == 0 ? 32 : 1);
  u32(s.type_b);
  u64(s.offset_b);
  b.resize((b.size() + 31) / 32 * 32, 0);
  b.resize(b.size() + 128, 0);  // 64 + 34 bytes of data, padded
  b.resize(b.size() - s.cut);
  return b;
}

std::string open_bad(const Spec& s, std::initializer_list<std::string> parts) {
  static TempDir dir{"moe-gguf-bad"};
  const fs::path p = dir / "bad.gguf";
  const auto bytes = build(s);
  std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  std::vector<std::string> all(parts);
  all.push_back(p.string());
  std::string msg;
  try {
    (void)io::GgufFile::open(io::Env::posix(), p);
    ADD_FAILURE() << "opened a bad file; expected " << *parts.begin();
  } catch (const core::Error& e) {
    msg = e.message();
    EXPECT_EQ(e.exit_code(), 2) << msg;
    for (const auto& x : all) EXPECT_NE(msg.find(x), std::string::npos) << "'" << x << "' not in: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos);
  }
  return msg;
}

TEST(Gguf, TheBuiltFileIsValid) {
  static TempDir dir{"moe-gguf-ok"};
  const auto bytes = build(Spec{});
  std::ofstream(dir / "ok.gguf", std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  const auto f = io::GgufFile::open(io::Env::posix(), dir / "ok.gguf");
  EXPECT_EQ(f.tensors().size(), 2u);
  EXPECT_EQ(f.find_tensor("b")->nbytes(), 34u);
}

TEST(Gguf, RefusesBadFiles) {
  open_bad({.magic = 0x46554746}, {"magic", "not a GGUF file"});
  open_bad({.version = 2}, {"version", "only version 3"});
  open_bad({.cut = 40}, {"tensor 1 (b) offset", "past the data section end", "truncated"});
  open_bad({.offset_b = 4096}, {"tensor 1 (b) offset", "4096", "past the data section end"});
  open_bad({.offset_b = 48}, {"tensor 1 (b) offset", "48", "not a multiple of the alignment 32"});
  open_bad({.offset_b = 32}, {"tensor 1 (b) offset", "overlaps tensor a"});
  open_bad({.string_len = 1ull << 40}, {"kv 0", "string length", "past the end of the file"});
  open_bad({.value_type = 9, .array_len = 1ull << 50}, {"kv 0 (general.name)", "array length", "past the end of the file"});
  open_bad({.value_type = 13}, {"kv 0 (general.name)", "unknown value type 13"});
  open_bad({.type_b = 99}, {"tensor 1 (b) type", "unknown ggml type 99"});
  open_bad({.type_b = 4}, {"tensor 1 (b) type", "unknown ggml type 4"});
  open_bad({.n_dims_b = 5}, {"tensor 1 (b) n_dims", "5 outside 1..4"});
  open_bad({.n_dims_b = 0}, {"tensor 1 (b) n_dims", "0 outside 1..4"});
  open_bad({.n_kv = 1ull << 60}, {"n_kv", "cannot fit"});
  open_bad({.n_tensors = 1ull << 60}, {"n_tensors", "cannot fit"});
  open_bad({.name_b = "a"}, {"tensor 1 (a)", "duplicate tensor name"});
  open_bad({.type_b = 10}, {"tensor 1 (b) ne[0]", "32 is not a multiple of the q2_k block size 256"});
  open_bad({.cut = 200}, {"truncated"});
}

TEST(Gguf, RefusesDuplicateKeysAndAMissingFile) {
  TempDir dir{"moe-gguf"};
  expect_error([&] { (void)io::GgufFile::open(io::Env::posix(), dir / "none.gguf"); }, core::ErrorKind::NotFound,
               {"none.gguf", "no such file"});
  // Two keys of the same name, by hand: the writer refuses to write them.
  std::vector<uint8_t> b;
  auto u32 = [&](uint32_t v) { b.insert(b.end(), reinterpret_cast<uint8_t*>(&v), reinterpret_cast<uint8_t*>(&v) + 4); };
  auto u64 = [&](uint64_t v) { b.insert(b.end(), reinterpret_cast<uint8_t*>(&v), reinterpret_cast<uint8_t*>(&v) + 8); };
  u32(io::kGgufMagic);
  u32(3);
  u64(0);
  u64(2);
  for (int i = 0; i < 2; ++i) {
    u64(1);
    b.push_back('k');
    u32(4);
    u32(static_cast<uint32_t>(i));
  }
  const fs::path p = dir / "dup.gguf";
  std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  expect_error([&] { (void)io::GgufFile::open(io::Env::posix(), p); }, core::ErrorKind::Corruption,
               {"dup.gguf", "kv 1 (k)", "duplicate key"});
}

}  // namespace
}  // namespace moe::test
