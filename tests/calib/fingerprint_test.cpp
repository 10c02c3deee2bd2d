// Statistics files are checked against the model's sampled tensor contents, not only its config
// and tensor shapes: a stats file of another fine-tune of the same base is refused, naming the
// tensor that differs.
#include <gtest/gtest.h>

#include "calib/calibrate.h"
#include "calib/stats.h"
#include "calib_test_util.h"
#include "io/checkpoint.h"
#include "support/expect_error.h"
#include "support/synth.h"

namespace moe::calib {
namespace {

using core::ErrorKind;
using moe::test::expect_error;
namespace fs = std::filesystem;

const char* kExpert = "model.layers.1.block_sparse_moe.experts.3.w1.weight";

// A mixtral synth written to `dir`; the tensors named in `changed` get other values (same name,
// dtype and shape).
io::Checkpoint write_model(const fs::path& dir, const std::vector<std::string>& changed = {},
                           const std::vector<moe::test::SynthTensor>& extra = {}) {
  moe::test::SynthSpec spec;
  spec.extra = extra;
  auto ck = moe::test::make_synth("mixtral", spec);
  for (auto& t : ck.tensors)
    if (std::find(changed.begin(), changed.end(), t.name) != changed.end())
      t = moe::test::synth_tensor(t.name, t.dtype, t.shape, 1234);
  moe::test::write_synth(ck, dir);
  return io::Checkpoint::open(io::Env::posix(), dir);
}

Stats stats_of(const io::Checkpoint& ck) {
  Stats s;
  s.metadata["model_fingerprint"] = ck.fingerprint();
  s.metadata["model_content"] = content_digest_text(ck.content_digests());
  return s;
}

TEST(ModelContent, StatsOfAModelDifferingInOneExpertAreRefusedNamingIt) {
  moe::test::TempDir a_dir("moe-fp-a"), b_dir("moe-fp-b");
  const auto a = write_model(a_dir.path());
  const auto b = write_model(b_dir.path(), {kExpert});
  // What the old check saw: nothing differs.
  ASSERT_EQ(a.fingerprint(), b.fingerprint());
  const Stats s = stats_of(a);
  EXPECT_NO_THROW(s.check_model(a, "a.stats"));
  const std::string msg = expect_error([&] { s.check_model(b, "a.stats"); }, ErrorKind::InvalidArgument,
                                       {"a.stats: ", "other values: tensor " + std::string(kExpert) + " differs",
                                        "moe-tool calibrate"});
  EXPECT_EQ(msg.find("more of"), std::string::npos) << msg;
}

TEST(ModelContent, CountsTheOtherTensorsThatDiffer) {
  moe::test::TempDir a_dir("moe-fp-a"), b_dir("moe-fp-b");
  const auto a = write_model(a_dir.path());
  const auto b = write_model(b_dir.path(), {kExpert, "model.norm.weight", "model.embed_tokens.weight"});
  const size_t n = a.names().size();
  // Sorted by name, the embeddings come first.
  expect_error([&] { stats_of(a).check_model(b, "a.stats"); }, ErrorKind::InvalidArgument,
               {"tensor model.embed_tokens.weight differs", "(and 2 more of " + std::to_string(n) + " tensors)"});
}

TEST(ModelContent, OldStatsFilesAreAcceptedWithOneWarningLine) {
  moe::test::TempDir a_dir("moe-fp-a"), b_dir("moe-fp-b");
  const auto a = write_model(a_dir.path());
  const auto b = write_model(b_dir.path(), {kExpert});
  Stats s = stats_of(a);
  s.metadata.erase("model_content");
  testing::internal::CaptureStderr();
  EXPECT_NO_THROW(s.check_model(b, "old.stats"));
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("moe-tool: warning: old.stats: made before stats files recorded sampled tensor values"),
            std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  // The structure is still checked.
  moe::test::TempDir q_dir("moe-fp-q");
  moe::test::synth_to(q_dir.path(), "qwen2_moe");
  const auto q = io::Checkpoint::open(io::Env::posix(), q_dir.path());
  expect_error([&] { s.check_model(q, "old.stats"); }, ErrorKind::InvalidArgument, {a.fingerprint(), q.fingerprint()});
}

TEST(ModelContent, UnknownSamplingAndWrongLengthAreRefused) {
  moe::test::TempDir a_dir("moe-fp-a");
  const auto a = write_model(a_dir.path());
  Stats s = stats_of(a);
  s.metadata["model_content"] = "sha1-all:00";
  expect_error([&] { s.check_model(a, "x.stats"); }, ErrorKind::InvalidArgument, {"unknown sampling \"sha1-all:\""});
  s.metadata["model_content"] = std::string(kContentDigestVersion) + "0011aabb";
  expect_error([&] { s.check_model(a, "x.stats"); }, ErrorKind::InvalidArgument,
               {"1 tensor digests, but the model has " + std::to_string(a.names().size())});
}

TEST(ModelContent, LargeTensorsAreSampledInBoundedBlocks) {
  // 256 KiB F32: above the whole-tensor limit, so 4 blocks of 1 KiB are hashed: a change in the
  // last byte is seen, a change between the blocks is not (the documented limit of sampling).
  const core::Shape shape{256, 256};
  auto big = moe::test::synth_tensor("zz.big", core::DType::F32, shape, 7);
  ASSERT_GT(big.data.size(), io::Checkpoint::kDigestWholeBytes);
  auto digest = [&](const moe::test::SynthTensor& t) {
    moe::test::TempDir d("moe-fp-big");
    const auto ck = write_model(d.path(), {}, {t});
    const auto all = ck.content_digests();
    return all.back().digest;  // "zz.big" sorts last
  };
  const uint32_t base = digest(big);
  auto last = big;
  last.data.back() ^= 1;
  EXPECT_NE(digest(last), base);
  auto between = big;
  between.data[big.data.size() / 6] ^= 1;  // inside no block: blocks start at 0, 1/3, 2/3 and end at the end
  EXPECT_EQ(digest(between), base);
}

TEST(ModelContent, CalibrateRecordsTheSampledContents) {
  auto fx = test::load_fixture(test::source_dir() / "data/models/synthetic/qwen3moe");
  moe::test::TempDir tmp;
  CalibrateOptions o;
  o.ctx = 64;
  o.windows = 2;
  o.quiet = true;
  calibrate(fx->ckpt, fx->model, fx->tokens, fx->text_sha, o, tmp / "s.stats");
  const Stats s = Stats::load(tmp / "s.stats");
  EXPECT_EQ(s.meta("model_content"), content_digest_text(fx->ckpt.content_digests()));
  testing::internal::CaptureStderr();
  EXPECT_NO_THROW(s.check_model(fx->ckpt, tmp / "s.stats"));
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");
}

}  // namespace
}  // namespace moe::calib
