// parse_safetensors_header: every rule of the format, accepted and rejected, with the error naming
// the tensor and the broken rule; SafetensorsFile on real files; serialize_safetensors_header.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"
#include "support/synth.h"

namespace moe::io {
namespace {

using core::DType;
using core::Error;
using core::ErrorKind;
using nlohmann::json;
using test::raw_safetensors;

SafetensorsHeader parse(const std::string& bytes) {
  return parse_safetensors_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), bytes.size());
}

// A file with header text `h` (padded) and `data_bytes` zero bytes of data.
std::string file(const std::string& h, size_t data_bytes) { return raw_safetensors(h, std::string(data_bytes, '\0')); }

std::string entry(const std::string& dtype, const std::string& shape, uint64_t b, uint64_t e) {
  return "{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" + std::to_string(b) + "," +
         std::to_string(e) + "]}";
}

// Expects a Corruption error whose message contains every one of `parts`.
void expect_reject(const std::string& bytes, std::initializer_list<std::string> parts) {
  try {
    parse(bytes);
    ADD_FAILURE() << "accepted; expected an error containing '" << *parts.begin() << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Corruption) << e.message();
    for (const auto& p : parts) EXPECT_NE(e.message().find(p), std::string::npos) << "'" << p << "' not in: " << e.message();
    EXPECT_EQ(e.message().find('\n'), std::string::npos) << "message spans lines: " << e.message();
  }
}

// ------------------------------------------------------------------ accepted

TEST(SafetensorsHeader, EmptyObjectNoData) {
  auto h = parse(file("{}", 0));
  EXPECT_TRUE(h.tensors.empty());
  EXPECT_TRUE(h.metadata.empty());
  EXPECT_EQ(h.data_start, 16u);  // "{}" padded to 8
  EXPECT_EQ(h.data_size, 0u);
}

TEST(SafetensorsHeader, UnpaddedHeaderIsAccepted) {
  // Padding is what writers should do, not something readers may require.
  auto h = parse(raw_safetensors("{\"a\":" + entry("U8", "[3]", 0, 3) + "}", "xyz", /*pad=*/false));
  ASSERT_EQ(h.tensors.size(), 1u);
  EXPECT_EQ(h.data_size, 3u);
}

TEST(SafetensorsHeader, TensorsSortedByOffsetWithMetadata) {
  const std::string h = "{\"__metadata__\":{\"format\":\"pt\",\"x\":\"y\"},"
                        "\"b\":" + entry("F32", "[2,2]", 8, 24) + ",\"a\":" + entry("BF16", "[4]", 0, 8) +
                        ",\"c\":" + entry("I64", "[]", 24, 32) + "}";
  auto hd = parse(file(h, 32));
  ASSERT_EQ(hd.tensors.size(), 3u);
  EXPECT_EQ(hd.tensors[0].name, "a");
  EXPECT_EQ(hd.tensors[0].dtype, DType::BF16);
  EXPECT_EQ(hd.tensors[0].shape, (core::Shape{4}));
  EXPECT_EQ(hd.tensors[1].name, "b");
  EXPECT_EQ(hd.tensors[1].begin, 8u);
  EXPECT_EQ(hd.tensors[1].end, 24u);
  EXPECT_EQ(hd.tensors[1].nbytes(), 16u);
  EXPECT_EQ(hd.tensors[2].name, "c");
  EXPECT_TRUE(hd.tensors[2].shape.empty());  // scalar: one element
  EXPECT_EQ(hd.metadata.size(), 2u);
  EXPECT_EQ(hd.metadata.at("format"), "pt");
  EXPECT_EQ(hd.metadata.at("x"), "y");
  EXPECT_EQ(hd.data_size, 32u);
  EXPECT_EQ(hd.data_start % 8, 0u);
}

TEST(SafetensorsHeader, EveryDtypeWithItsSize) {
  const std::pair<const char*, uint64_t> dts[] = {{"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2},
                                                  {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"I64", 8}, {"I32", 4},
                                                  {"I16", 2}, {"I8", 1}, {"U8", 1}, {"BOOL", 1}};
  std::string h = "{";
  uint64_t off = 0;
  int i = 0;
  for (const auto& [name, size] : dts) {
    if (i) h += ",";
    h += "\"t" + std::to_string(i++) + "\":" + entry(name, "[3,1]", off, off + 3 * size);
    off += 3 * size;
  }
  h += "}";
  auto hd = parse(file(h, off));
  ASSERT_EQ(hd.tensors.size(), std::size(dts));
  for (size_t k = 0; k < std::size(dts); ++k) {
    EXPECT_STREQ(core::dtype_name(hd.tensors[k].dtype), dts[k].first);
    EXPECT_EQ(hd.tensors[k].nbytes(), 3 * dts[k].second);
  }
}

TEST(SafetensorsHeader, ZeroSizedTensors) {
  const std::string h = "{\"a\":" + entry("F32", "[0,4]", 0, 0) + ",\"b\":" + entry("F32", "[1]", 0, 4) +
                        ",\"c\":" + entry("F16", "[2,0]", 4, 4) + "}";
  auto hd = parse(file(h, 4));
  ASSERT_EQ(hd.tensors.size(), 3u);
  EXPECT_EQ(hd.tensors.back().end, 4u);
}

TEST(SafetensorsHeader, PrefixBufferIsEnough) {
  const std::string bytes = file("{\"a\":" + entry("U8", "[100]", 0, 100) + "}", 100);
  const uint64_t prefix = bytes.size() - 100;
  auto hd = parse_safetensors_header(reinterpret_cast<const uint8_t*>(bytes.data()), prefix, bytes.size());
  EXPECT_EQ(hd.data_size, 100u);
  // A prefix shorter than the header itself is an error, not a read past the buffer.
  EXPECT_THROW(parse_safetensors_header(reinterpret_cast<const uint8_t*>(bytes.data()), prefix - 1, bytes.size()), Error);
}

// ------------------------------------------------------------------ length prefix

TEST(SafetensorsHeader, FileShorterThanEightBytes) {
  expect_reject("", {"0 bytes", "shorter than the 8-byte header length"});
  expect_reject(std::string(7, '\0'), {"7 bytes", "shorter than the 8-byte header length"});
}

TEST(SafetensorsHeader, HeaderLengthPastEndOfFile) {
  std::string b = file("{}", 0);
  b[0] = static_cast<char>(b.size() - 8 + 1);  // one byte too long
  expect_reject(b, {"header length 9", "runs past the end of the file (16 bytes)"});
  std::string big = raw_safetensors("{}", "");
  big[3] = 1;  // 16 MB + 8
  expect_reject(big, {"runs past the end of the file"});
}

TEST(SafetensorsHeader, HeaderLongerThan100MB) {
  std::string b = file("{}", 0);
  const uint64_t n = kMaxSafetensorsHeader + 1;
  for (int i = 0; i < 8; ++i) b[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  expect_reject(b, {"header length 100000001", "exceeds the 100 MB limit"});
  for (int i = 0; i < 8; ++i) b[i] = static_cast<char>(0xff);
  expect_reject(b, {"exceeds the 100 MB limit"});
  // Exactly 100 MB is allowed by the limit (then fails only because the file is short).
  for (int i = 0; i < 8; ++i) b[i] = static_cast<char>((kMaxSafetensorsHeader >> (8 * i)) & 0xff);
  expect_reject(b, {"runs past the end of the file"});
}

TEST(SafetensorsHeader, ZeroLengthHeader) { expect_reject(raw_safetensors("", "", false), {"does not start with '{'"}); }

TEST(SafetensorsHeader, HeaderNotStartingWithBrace) {
  expect_reject(file(" {}", 0), {"does not start with '{'"});
  expect_reject(file("[]", 0), {"does not start with '{'"});
  expect_reject(file("[{\"a\":1}]", 0), {"does not start with '{'"});
  expect_reject(file("\"str\"", 0), {"does not start with '{'"});
}

TEST(SafetensorsHeader, HeaderNotJson) {
  expect_reject(file("{\"a\":", 0), {"header is not valid JSON"});
  expect_reject(file("{} trailing", 0), {"header is not valid JSON"});
  expect_reject(file("{'a':1}", 0), {"header is not valid JSON"});
}

// The header is JSON text padded with spaces; a NUL byte is not JSON (the reference Rust reader
// rejects it) and must not silently end the header, hiding whatever follows it.
TEST(SafetensorsHeader, NulByteInHeader) {
  expect_reject(raw_safetensors(std::string("{}\0\0\0\0\0\0", 8), "", false), {"header"});
  const std::string hidden = "{}" + std::string(1, '\0') + "{\"w\":" + entry("F32", "[1]", 0, 4) + "}";
  expect_reject(file(hidden, 0), {"header"});
}

// ------------------------------------------------------------------ entries

TEST(SafetensorsHeader, EntryNotAnObject) {
  expect_reject(file("{\"w\":5}", 0), {"tensor w", "entry is not an object"});
  expect_reject(file("{\"w\":[1,2]}", 0), {"tensor w", "entry is not an object"});
}

TEST(SafetensorsHeader, MissingFields) {
  expect_reject(file("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4), {"tensor w", "missing \"dtype\""});
  expect_reject(file("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4), {"tensor w", "missing \"shape\""});
  expect_reject(file("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4), {"tensor w", "missing \"data_offsets\""});
}

TEST(SafetensorsHeader, BadDtype) {
  expect_reject(file("{\"w\":" + entry("F8", "[1]", 0, 1) + "}", 1), {"tensor w", "unknown dtype 'F8'"});
  expect_reject(file("{\"w\":" + entry("f32", "[1]", 0, 4) + "}", 4), {"tensor w", "unknown dtype 'f32'"});
  expect_reject(file("{\"w\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 4), {"tensor w", "\"dtype\" is not a string"});
}

TEST(SafetensorsHeader, BadShape) {
  expect_reject(file("{\"w\":" + entry("F32", "[-1]", 0, 4) + "}", 4), {"tensor w", "not a non-negative integer: -1"});
  expect_reject(file("{\"w\":" + entry("F32", "[2.5]", 0, 4) + "}", 4), {"tensor w", "not a non-negative integer: 2.5"});
  expect_reject(file("{\"w\":" + entry("F32", "[\"1\"]", 0, 4) + "}", 4), {"tensor w", "not a non-negative integer"});
  expect_reject(file("{\"w\":" + entry("F32", "[1e0]", 0, 4) + "}", 4), {"tensor w", "not a non-negative integer"});
  expect_reject(file("{\"w\":" + entry("F32", "4", 0, 4) + "}", 4), {"tensor w", "\"shape\" is not an array"});
  expect_reject(file("{\"w\":" + entry("F32", "[18446744073709551615]", 0, 4) + "}", 4), {"tensor w", "non-negative integer"});
  expect_reject(file("{\"w\":" + entry("F32", "[1099511627776,1099511627776]", 0, 4) + "}", 4),
                {"tensor w", "too many elements"});
}

// A shape whose byte size overflows 64 bits must not pass as a tensor of 0 bytes: [2^62] of F32
// is 2^64 bytes, which wraps to 0 in uint64 arithmetic.
TEST(SafetensorsHeader, ShapeWhoseByteSizeOverflows) {
  expect_reject(file("{\"w\":" + entry("F32", "[4611686018427387904]", 0, 0) + "}", 0), {"tensor w"});
  expect_reject(file("{\"w\":" + entry("F64", "[2305843009213693952]", 0, 0) + "}", 0), {"tensor w"});
  expect_reject(file("{\"w\":" + entry("BF16", "[2147483648,2147483648,2]", 0, 0) + "}", 0), {"tensor w"});
}

TEST(SafetensorsHeader, BadDataOffsets) {
  auto with = [](const std::string& offs) {
    return file("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":" + offs + "}}", 4);
  };
  expect_reject(with("[0]"), {"tensor w", "\"data_offsets\" is not a pair"});
  expect_reject(with("[0,4,8]"), {"tensor w", "\"data_offsets\" is not a pair"});
  expect_reject(with("[-4,0]"), {"tensor w", "\"data_offsets\" is not a pair"});
  expect_reject(with("[0,4.0]"), {"tensor w", "\"data_offsets\" is not a pair"});
  expect_reject(with("{\"b\":0}"), {"tensor w", "\"data_offsets\" is not a pair"});
  expect_reject(with("[4,0]"), {"tensor w", "data_offsets end 0 before begin 4"});
}

TEST(SafetensorsHeader, SizeMismatch) {
  expect_reject(file("{\"w\":" + entry("F32", "[2,3]", 0, 20) + "}", 20),
                {"tensor w", "data_offsets span 20 bytes but shape [2, 3] of F32 needs 24"});
  expect_reject(file("{\"w\":" + entry("BF16", "[3]", 0, 8) + "}", 8), {"tensor w", "needs 6"});
}

TEST(SafetensorsHeader, Hole) {
  const std::string h = "{\"a\":" + entry("F32", "[1]", 0, 4) + ",\"b\":" + entry("F32", "[1]", 8, 12) + "}";
  expect_reject(file(h, 12), {"tensor b", "data_offsets begin 8 leaves a hole (expected 4)"});
  // A hole at the start.
  expect_reject(file("{\"a\":" + entry("F32", "[1]", 4, 8) + "}", 8), {"tensor a", "begin 4 leaves a hole (expected 0)"});
}

TEST(SafetensorsHeader, Overlap) {
  const std::string h = "{\"a\":" + entry("F32", "[2]", 0, 8) + ",\"b\":" + entry("F32", "[1]", 4, 8) + "}";
  expect_reject(file(h, 8), {"tensor b", "data_offsets begin 4 overlaps the previous tensor (expected 8)"});
  // Two tensors at the same place.
  const std::string h2 = "{\"a\":" + entry("F32", "[1]", 0, 4) + ",\"b\":" + entry("F32", "[1]", 0, 4) + "}";
  expect_reject(file(h2, 4), {"overlaps the previous tensor"});
}

TEST(SafetensorsHeader, EndPastDataSection) {
  expect_reject(file("{\"w\":" + entry("F32", "[4]", 0, 16) + "}", 12),
                {"tensor w", "data_offsets end 16 past the data section (12)"});
}

TEST(SafetensorsHeader, LastEndShortOfData) {
  expect_reject(file("{\"w\":" + entry("F32", "[1]", 0, 4) + "}", 8), {"data section is 8 bytes but the tensors cover 4"});
  expect_reject(file("{}", 3), {"data section is 3 bytes but the tensors cover 0"});
}

TEST(SafetensorsHeader, DuplicateNames) {
  const std::string h = "{\"w\":" + entry("F32", "[1]", 0, 4) + ",\"w\":" + entry("F32", "[1]", 4, 8) + "}";
  expect_reject(file(h, 8), {"duplicate tensor name 'w'"});
  // Also when the duplicate is identical (nlohmann would silently keep one).
  const std::string h2 = "{\"w\":" + entry("F32", "[1]", 0, 4) + ",\"w\":" + entry("F32", "[1]", 0, 4) + "}";
  expect_reject(file(h2, 4), {"duplicate tensor name 'w'"});
  // Duplicate keys inside an entry are not tensor names.
  auto ok = parse(file("{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4));
  EXPECT_EQ(ok.tensors.size(), 1u);
}

TEST(SafetensorsHeader, MetadataMustBeStringToString) {
  expect_reject(file("{\"__metadata__\":{\"format\":1}}", 0), {"__metadata__.format is not a string"});
  expect_reject(file("{\"__metadata__\":{\"a\":\"b\",\"n\":null}}", 0), {"__metadata__.n is not a string"});
  expect_reject(file("{\"__metadata__\":{\"o\":{}}}", 0), {"__metadata__.o is not a string"});
  expect_reject(file("{\"__metadata__\":[\"pt\"]}", 0), {"__metadata__ is not an object"});
  expect_reject(file("{\"__metadata__\":\"pt\"}", 0), {"__metadata__ is not an object"});
  auto ok = parse(file("{\"__metadata__\":{}}", 0));
  EXPECT_TRUE(ok.metadata.empty());
}

// ------------------------------------------------------------------ files

class SafetensorsFileTest : public ::testing::Test {
 protected:
  test::TempDir tmp{"moe-st"};
};

TEST_F(SafetensorsFileTest, OpenFindAndViewTensors) {
  std::vector<test::SynthTensor> ts = {test::synth_tensor("z.weight", DType::BF16, {3, 5}, 7),
                                       test::synth_tensor("a.bias", DType::F32, {5}, 7),
                                       test::synth_tensor("m.idx", DType::I64, {2}, 7)};
  const auto path = tmp / "x.safetensors";
  test::write_file(path, test::safetensors_bytes(ts));
  auto f = SafetensorsFile::open(Env::posix(), path);
  EXPECT_EQ(f->path(), path);
  EXPECT_EQ(f->header().tensors.size(), 3u);
  EXPECT_EQ(f->header().metadata.at("format"), "pt");
  EXPECT_EQ(f->find("nope"), nullptr);
  for (const auto& t : ts) {
    const TensorInfo* info = f->find(t.name);
    ASSERT_NE(info, nullptr) << t.name;
    core::Tensor v = f->tensor(*info);
    EXPECT_EQ(v.dtype(), t.dtype);
    EXPECT_EQ(v.shape(), t.shape);
    ASSERT_EQ(v.nbytes(), t.data.size());
    EXPECT_EQ(std::memcmp(v.data(), t.data.data(), t.data.size()), 0) << t.name;
  }
  // Views stay valid after the file object is gone (they share the mapping).
  core::Tensor keep = f->tensor(*f->find("a.bias"));
  f.reset();
  EXPECT_EQ(std::memcmp(keep.data(), ts[1].data.data(), 20), 0);
}

TEST_F(SafetensorsFileTest, ErrorsNameTheFile) {
  const auto path = tmp / "bad.safetensors";
  test::write_file(path, file("{\"w\":" + entry("F32", "[2]", 0, 4) + "}", 4));
  try {
    SafetensorsFile::open(Env::posix(), path);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.message().rfind(path.string() + ": tensor w: ", 0), 0u) << e.message();
  }
  try {
    SafetensorsFile::open(Env::posix(), tmp / "missing.safetensors");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::NotFound);
    EXPECT_NE(e.message().find("missing.safetensors: no such file"), std::string::npos) << e.message();
  }
  test::write_file(tmp / "empty.safetensors", "");
  try {
    SafetensorsFile::open(Env::posix(), tmp / "empty.safetensors");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("empty.safetensors: file is 0 bytes"), std::string::npos) << e.message();
  }
  std::filesystem::create_directory(tmp / "dir.safetensors");
  try {
    SafetensorsFile::open(Env::posix(), tmp / "dir.safetensors");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("dir.safetensors: not a regular file"), std::string::npos) << e.message();
  }
}

// ------------------------------------------------------------------ serialization

TEST(SafetensorsSerialize, PaddedObjectThatParsesBack) {
  for (size_t name_len = 1; name_len <= 9; ++name_len) {
    std::vector<TensorInfo> infos = {{std::string(name_len, 'n'), DType::F16, {3}, 0, 6},
                                     {"b", DType::F32, {1, 1}, 6, 10}};
    const std::string s = serialize_safetensors_header(infos, {{"format", "pt"}});
    ASSERT_GE(s.size(), 9u);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(s[i]);
    EXPECT_EQ(n, s.size() - 8);
    EXPECT_EQ(n % 8, 0u) << "header not padded to a multiple of 8";
    EXPECT_EQ(s[8], '{');
    // The padding is spaces and the JSON ends right before it.
    const std::string body = s.substr(8);
    const size_t last = body.find_last_not_of(' ');
    EXPECT_EQ(body[last], '}');
    EXPECT_LT(body.size() - last - 1, 8u);
    const json j = json::parse(body);
    EXPECT_EQ(j.at("__metadata__"), (json{{"format", "pt"}}));
    EXPECT_EQ(j.at("b").at("data_offsets"), (json{6, 10}));
    EXPECT_EQ(j.at("b").at("dtype"), "F32");
    EXPECT_EQ(j.at("b").at("shape"), (json{1, 1}));
    auto hd = parse(s + std::string(10, '\x01'));
    ASSERT_EQ(hd.tensors.size(), 2u);
    EXPECT_EQ(hd.tensors[0].name, std::string(name_len, 'n'));
    EXPECT_EQ(hd.data_start, s.size());
  }
}

}  // namespace
}  // namespace moe::io
