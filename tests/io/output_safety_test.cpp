// Output safety (docs/outputs.md): symbolic links written through (the output, a folder above it,
// a link into an input), force replacing only an earlier output of the tool, the current folder
// never an output, missing parents created and removed again on failure, the free-space check,
// the writer's finite check and JSON errors without the library's internal ids.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "core/dtype.h"
#include "io/checkpoint.h"
#include "io/checkpoint_writer.h"
#include "io/output_dir.h"
#include "support/expect_error.h"
#include "support/synth.h"

namespace moe::io {
namespace {

using core::ErrorKind;
using test::expect_error;

class OutputSafety : public ::testing::Test {
 protected:
  test::TempDir tmp{"moe-safety"};
  fs::path in() const { return tmp / "in"; }
  void SetUp() override {
    fs::create_directories(in());
    test::write_file(in() / "config.json", "{}");
  }
  // Writes and commits an output with the given files through OutputDir.
  void commit_output(const fs::path& out, const std::vector<std::string>& files, bool force = false) {
    OutputDir od(Env::posix(), out, {in()}, force);
    for (const auto& f : files) test::write_file(od.path() / f, f);
    od.commit();
  }
};

// 27.1: an output that is a link to a folder elsewhere is written through; the link stays.
TEST_F(OutputSafety, OutputLinkIsWrittenThrough) {
  fs::create_directories(tmp / "elsewhere");
  fs::create_directory_symlink(tmp / "elsewhere" / "real", tmp / "link");
  fs::create_directories(tmp / "elsewhere" / "real");  // an empty folder: no force needed
  commit_output(tmp / "link", {"a.txt"});
  EXPECT_TRUE(fs::is_symlink(tmp / "link"));
  EXPECT_EQ(test::read_file(tmp / "elsewhere" / "real" / "a.txt"), "a.txt");
  // Replacing it (force): still a link, the new content at its target.
  commit_output(tmp / "link", {"b.txt"}, true);
  EXPECT_TRUE(fs::is_symlink(tmp / "link"));
  EXPECT_EQ(test::list_dir(tmp / "elsewhere" / "real"), (std::vector<std::string>{kListingName, "b.txt"}));
  // Nothing left next to the link or the target.
  EXPECT_EQ(test::list_dir(tmp.path()), (std::vector<std::string>{"elsewhere", "in", "link"}));
  EXPECT_EQ(test::list_dir(tmp / "elsewhere"), std::vector<std::string>{"real"});
}

// Sibling: a link in the parent path; and an output file (statistics) that is a link.
TEST_F(OutputSafety, LinkInParentPathAndFileLink) {
  fs::create_directories(tmp / "disk2");
  fs::create_directory_symlink(tmp / "disk2", tmp / "mnt");
  commit_output(tmp / "mnt" / "out", {"a.txt"});
  EXPECT_TRUE(fs::is_symlink(tmp / "mnt"));
  EXPECT_EQ(test::read_file(tmp / "disk2" / "out" / "a.txt"), "a.txt");

  const std::string stats = test::safetensors_bytes({}, {{"model_fingerprint", "f"}});
  test::write_file(tmp / "disk2" / "s.stats", stats);
  fs::create_symlink(tmp / "disk2" / "s.stats", tmp / "s.stats");
  {
    OutputFile f(Env::posix(), tmp / "s.stats", {in()}, true);
    test::write_file(f.path(), stats + "x");
    f.commit();
  }
  EXPECT_TRUE(fs::is_symlink(tmp / "s.stats"));
  EXPECT_EQ(test::read_file(tmp / "disk2" / "s.stats"), stats + "x");
}

// A link whose target does not exist (the output itself or a folder above it): refused.
TEST_F(OutputSafety, DanglingLinkRefused) {
  fs::create_directory_symlink(tmp / "gone", tmp / "dangling");
  expect_error([&] { OutputDir(Env::posix(), tmp / "dangling", {in()}, true); }, ErrorKind::InvalidArgument,
               {"dangling is a symbolic link to", "which does not exist"});
  expect_error([&] { OutputDir(Env::posix(), tmp / "dangling" / "out", {in()}, false); }, ErrorKind::InvalidArgument,
               {"is a symbolic link to", "which does not exist"});
  expect_error([&] { check_output(tmp / "dangling", {in()}, false, OutputKind::File); }, ErrorKind::InvalidArgument,
               {"which does not exist"});
  EXPECT_FALSE(fs::exists(tmp / "gone"));
  EXPECT_TRUE(fs::is_symlink(tmp / "dangling"));
}

// A link inside an input folder (a shard kept in a cache elsewhere) makes its target an input: an
// output at, inside or around the cache is refused, even with force.
TEST_F(OutputSafety, LinkIntoAnInputFolder) {
  fs::create_directories(tmp / "cache" / "blobs");
  test::write_file(tmp / "cache" / "blobs" / "abc", "weights");
  fs::create_symlink(tmp / "cache" / "blobs" / "abc", in() / "model.safetensors");
  expect_error([&] { OutputDir(Env::posix(), tmp / "cache", {in()}, true); }, ErrorKind::InvalidArgument,
               {"output contains the input", "its link model.safetensors points to"});
  expect_error([&] { OutputFile(Env::posix(), tmp / "cache" / "blobs" / "abc", {in()}, true); },
               ErrorKind::InvalidArgument, {"output is the input", "model.safetensors"});
  // And an output that is a link pointing into the input.
  fs::create_directory_symlink(in(), tmp / "to-in");
  expect_error([&] { OutputDir(Env::posix(), tmp / "to-in" / "sub", {in()}, true); }, ErrorKind::InvalidArgument,
               {"output is inside the input"});
  EXPECT_EQ(test::read_file(tmp / "cache" / "blobs" / "abc"), "weights");
}

// 29.2: force replaces only an earlier output of the tool, and only when it holds nothing else.
TEST_F(OutputSafety, ForceReplacesOnlyEarlierOutputs) {
  const fs::path out = tmp / "out";
  fs::create_directories(out);
  test::write_file(out / "notes.txt", "mine");
  expect_error([&] { OutputDir(Env::posix(), out, {in()}, true, "output.force"); }, ErrorKind::InvalidArgument,
               {out.string() + ": output folder exists and was not written by moe-tool",
                "output.force replaces only an earlier output of moe-tool"});
  EXPECT_EQ(test::read_file(out / "notes.txt"), "mine");
  fs::remove_all(out);
  commit_output(out, {"model.safetensors"});
  test::write_file(out / "recipe.json", "{}");  // the user put a file into an earlier output
  expect_error([&] { OutputDir(Env::posix(), out, {in()}, true); }, ErrorKind::InvalidArgument,
               {"output folder holds recipe.json, which moe-tool did not write there", "move it out"});
  // ... also when it appears while the run writes: commit() checks again and keeps everything.
  fs::remove(out / "recipe.json");
  {
    OutputDir od(Env::posix(), out, {in()}, true);
    test::write_file(od.path() / "new", "new");
    test::write_file(out / "late.txt", "late");
    expect_error([&] { od.commit(); }, ErrorKind::InvalidArgument, {"late.txt, which moe-tool did not write there"});
  }
  EXPECT_EQ(test::read_file(out / "late.txt"), "late");
  EXPECT_TRUE(fs::exists(out / "model.safetensors"));
  fs::remove(out / "late.txt");
  commit_output(out, {"new"}, true);
  EXPECT_EQ(test::list_dir(out), (std::vector<std::string>{kListingName, "new"}));
  EXPECT_TRUE(is_tool_output(out, OutputKind::Folder));
  EXPECT_FALSE(is_tool_output(in(), OutputKind::Folder));
}

// 29.7: ".", "..", the root or a folder holding the current folder are refused before any work.
TEST_F(OutputSafety, CurrentFolderIsNeverAnOutput) {
  const fs::path cwd = fs::current_path();
  fs::create_directories(tmp / "work" / "deeper");
  fs::current_path(tmp / "work" / "deeper");
  try {
    for (const std::string p : {".", "./", "..", "../../work"}) {
      SCOPED_TRACE(p);
      for (bool force : {false, true})
        expect_error([&] { check_output(p, {in()}, force, OutputKind::Folder); }, ErrorKind::InvalidArgument,
                     {"the current folder"});
    }
    // "/" and the temporary folder hold the input too: refused for that first.
    for (const std::string p : {"/", "../.."})
      expect_error([&] { check_output(p, {in()}, true, OutputKind::Folder); }, ErrorKind::InvalidArgument,
                   {"output contains the input"});
    expect_error([&] { OutputDir(Env::posix(), ".", {in()}, true); }, ErrorKind::InvalidArgument,
                 {".: output is the current folder"});
  } catch (...) {
    fs::current_path(cwd);
    throw;
  }
  fs::current_path(cwd);
  EXPECT_EQ(test::list_dir(tmp / "work"), std::vector<std::string>{"deeper"});
}

// 29.9: missing parent folders are created when the writing starts, and removed again (when
// still empty) if the run fails; a check or a dry run creates nothing.
TEST_F(OutputSafety, MissingParentsCreatedAndRemovedOnFailure) {
  const fs::path out = tmp / "build" / "recipes-out" / "x";
  check_output(out, {in()}, false, OutputKind::Folder);
  EXPECT_FALSE(fs::exists(tmp / "build"));
  {
    OutputDir od(Env::posix(), out, {in()}, false);
    EXPECT_TRUE(fs::is_directory(tmp / "build" / "recipes-out"));
  }  // no commit
  EXPECT_FALSE(fs::exists(tmp / "build"));
  {
    OutputFile f(Env::posix(), tmp / "a" / "b.stats", {in()}, false);
  }
  EXPECT_FALSE(fs::exists(tmp / "a"));
  // A parent that existed before stays, even when the run fails.
  fs::create_directories(tmp / "build");
  {
    OutputDir od(Env::posix(), out, {in()}, false);
  }
  EXPECT_TRUE(fs::is_directory(tmp / "build"));
  EXPECT_FALSE(fs::exists(tmp / "build" / "recipes-out"));
  commit_output(out, {"a"});
  EXPECT_EQ(test::read_file(out / "a"), "a");
}

// 29.3: an output larger than the free space of its file system is refused before writing.
TEST_F(OutputSafety, FreeSpace) {
  const fs::path out = tmp / "no" / "such" / "out";
  const uint64_t free = free_space(out);
  ASSERT_GT(free, 0u);
  ASSERT_LT(free, std::numeric_limits<uint64_t>::max());
  check_free_space(out, 1, "OUT");
  // Half, not all of it: other processes (a parallel build, other tests) write to the same file
  // system while this runs.
  check_free_space(out, free / 2, "OUT");
  expect_error([&] { check_free_space(out, free + (uint64_t{1} << 40), "OUT"); }, ErrorKind::IOError,
               {"OUT " + out.string() + ": the output needs about", "free; nothing written"});
  expect_error([&] { check_free_space(out, std::numeric_limits<uint64_t>::max(), "output.path"); }, ErrorKind::IOError,
               {"output.path"});
}

// 29.6: every checkpoint the tool writes goes through CheckpointWriter::write, which refuses NaN
// and Inf of the planned dtype, naming the tensor and the element (chunked writes included).
TEST(CheckpointWriterFinite, RefusesNonFiniteValues) {
  test::TempDir tmp("moe-finite");
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  std::vector<float> ok(12, 1.0f), bad = ok;
  bad[7] = nan;
  {
    CheckpointWriter w(Env::posix(), tmp.path(), {{"a", core::DType::F32, {3, 4}}}, 1000);
    w.write("a", 0, ok.data(), 16);  // elements 0-3
    expect_error([&] { w.write("a", 16, bad.data() + 4, 32); }, ErrorKind::InvalidArgument,
                 {"output tensor a: non-finite value at index 7 (of [3, 4])", "which the output would carry"});
  }
  for (core::DType dt : {core::DType::BF16, core::DType::F16, core::DType::F64, core::DType::F8_E5M2}) {
    SCOPED_TRACE(core::dtype_name(dt));
    std::vector<uint8_t> bytes(5 * core::dtype_size(dt));
    std::vector<float> src = {0.5f, 1.0f, -2.0f, inf, 3.0f};
    core::convert(core::DType::F32, src.data(), dt, bytes.data(), 5);
    CheckpointWriter w(Env::posix(), tmp.path(), {{"t", dt, {5}}}, 1000);
    expect_error([&] { w.write("t", 0, bytes.data(), bytes.size()); }, ErrorKind::InvalidArgument,
                 {"output tensor t: non-finite value at index 3"});
  }
  // Integer tensors (codes, indices) are not floats: any bit pattern is written.
  std::vector<uint8_t> codes(4, 0xFF);
  CheckpointWriter w(Env::posix(), tmp.path(), {{"c", core::DType::U8, {4}}}, 1000);
  w.write("c", 0, codes.data(), codes.size());
  w.finish();
}

// The finite check scans blocks of elements: the first NaN / Inf is found wherever it lies (in
// the first block, across a block's end, in the tail), from any byte offset, and never one past n.
TEST(CheckpointWriterFinite, FirstNonFiniteAtEveryPosition) {
  for (core::DType dt : {core::DType::F32, core::DType::BF16, core::DType::F16}) {
    SCOPED_TRACE(core::dtype_name(dt));
    const size_t es = core::dtype_size(dt), n = 200;
    std::vector<float> src(n + 1, 1.5f);
    src[n] = std::numeric_limits<float>::infinity();  // just past the range: never reported
    std::vector<uint8_t> bytes(1 + (n + 1) * es);     // from byte 1: not aligned to the element
    core::convert(core::DType::F32, src.data(), dt, bytes.data() + 1, n + 1);
    EXPECT_EQ(core::first_non_finite(dt, bytes.data() + 1, n), -1);
    for (size_t at : {size_t{0}, size_t{5}, size_t{63}, size_t{64}, size_t{127}, size_t{130}, n - 1}) {
      std::vector<uint8_t> b = bytes;
      float nan = std::numeric_limits<float>::quiet_NaN();
      core::convert(core::DType::F32, &nan, dt, b.data() + 1 + at * es, 1);
      EXPECT_EQ(core::first_non_finite(dt, b.data() + 1, n), static_cast<int64_t>(at)) << at;
      if (at + 10 < n) {  // a second one later: the first is reported
        core::convert(core::DType::F32, &nan, dt, b.data() + 1 + (at + 10) * es, 1);
        EXPECT_EQ(core::first_non_finite(dt, b.data() + 1, n), static_cast<int64_t>(at)) << at;
      }
    }
  }
}

// CheckpointWriter::copy writes the bytes of a mapped file as write would (at an offset inside
// the tensor, the rest written), with the same finite check and size check.
TEST(CheckpointWriterFinite, CopyFromAMappedFile) {
  test::TempDir tmp("moe-writer-copy");
  std::vector<float> vals(64);
  for (size_t i = 0; i < vals.size(); ++i) vals[i] = static_cast<float>(i) * 0.25f;
  vals[50] = std::numeric_limits<float>::quiet_NaN();
  {
    auto f = Env::posix().create_file(tmp / "src.bin");
    f->write_at(0, vals.data(), vals.size() * 4);
    f->close();
  }
  const auto m = Env::posix().map_file(tmp / "src.bin");
  fs::create_directories(tmp / "out");
  {
    CheckpointWriter w(Env::posix(), tmp / "out", {{"a", core::DType::F32, {8}}, {"b", core::DType::F32, {4}}}, 1 << 20);
    w.write("a", 0, vals.data() + 4, 8);
    w.copy("a", 8, *m, 24, 24);  // elements 6..11 of the file as elements 2..7 of a
    expect_error([&] { w.copy("b", 0, *m, 48 * 4, 16); }, ErrorKind::InvalidArgument,
                 {"output tensor b: non-finite value at index 2 (of [4])"});
    expect_error([&] { w.copy("b", 0, *m, 4, 20); }, ErrorKind::Internal, {"writer: tensor b: write past its planned size"});
    expect_error([&] { w.copy("b", 0, *m, 250, 16); }, ErrorKind::Internal, {"writer: tensor b: copy from outside"});
    w.copy("b", 0, *m, 0, 16);
    w.finish();
  }
  const auto out = SafetensorsFile::open(Env::posix(), tmp / "out" / "model.safetensors");
  const core::Tensor a = out->tensor(*out->find("a")), b = out->tensor(*out->find("b"));
  for (int i = 0; i < 8; ++i) EXPECT_EQ(reinterpret_cast<const float*>(a.data())[i], vals[4 + i]) << i;
  for (int i = 0; i < 4; ++i) EXPECT_EQ(reinterpret_cast<const float*>(b.data())[i], vals[i]) << i;
}

// 29.10: JSON errors say where and why, without the library's internal id.
TEST(JsonErrors, NoInternalIds) {
  const std::string m = expect_error([] { parse_json_file_text("{\"a\": tru}", "r.json"); }, ErrorKind::Corruption,
                                     {"r.json: not valid JSON: parse error at line 1, column"});
  EXPECT_EQ(m.find("json.exception"), std::string::npos) << m;
}

}  // namespace
}  // namespace moe::io
