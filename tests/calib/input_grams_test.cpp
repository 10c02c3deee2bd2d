// The routed experts' Grams computed one expert at a time from the layer's activations
// (calib/input_grams.h): equal to Σ x xᵀ over each expert's routed tokens computed here by hand,
// the same bytes whether the activations stay in RAM or are spilled, recomputed after release,
// and scaled by smoothing whenever they are computed.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <sstream>

#include "calib/input_grams.h"
#include "core/tensor.h"
#include "core/tensor_arena.h"
#include "io/scratch.h"
#include "runtime/moe_block.h"
#include "support/expect_error.h"
#include "support/synth.h"

namespace moe::pipeline {
namespace {

namespace fs = std::filesystem;
using runtime::MatrixRM;

MatrixRM random_matrix(int64_t r, int64_t c, std::mt19937& g, float scale = 0.3f) {
  std::normal_distribution<float> nd(0.0f, scale);
  MatrixRM m(r, c);
  for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = nd(g);
  return m;
}

struct Block {
  runtime::MoeWeights w;
  runtime::RoutingRule rule;
  MatrixRM x;
};

// E experts of width I at hidden H, N tokens routed top-2 by a softmax router.
Block block(int64_t E = 6, int64_t H = 16, int64_t I = 12, int64_t N = 40) {
  std::mt19937 g(7);
  Block b;
  b.w.router = random_matrix(E, H, g, 1.0f);
  for (int64_t e = 0; e < E; ++e) {
    runtime::MlpWeights m;
    m.gate = random_matrix(I, H, g);
    m.up = random_matrix(I, H, g);
    m.down = random_matrix(H, I, g);
    b.w.experts.push_back(std::move(m));
  }
  b.rule.kind = model::Routing::SoftmaxTopK;
  b.rule.top_k = 2;
  b.rule.num_experts = static_cast<int>(E);
  b.rule.renormalize = true;
  b.x = random_matrix(N, H, g, 1.0f);
  return b;
}

// A fresh, empty folder for spill files.
fs::path spill_folder(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("moe-input-grams-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

TEST(InputGrams, ExpertGramsAreSumsOverTheRoutedTokens) {
  const Block b = block();
  InputGrams g;
  recompute_moe_grams(g, b.w, b.rule, b.x, {});
  runtime::MoeDetail d;
  runtime::moe_forward(b.w, b.rule, b.x, &d, true);
  ASSERT_EQ(g.num_experts(), 6);
  int64_t routed = 0;
  calib::MatrixD sum = calib::MatrixD::Zero(16, 16);
  for (int64_t e = 0; e < g.num_experts(); ++e) {
    const auto& tok = d.tokens[static_cast<size_t>(e)];
    ASSERT_EQ(g.expert_tokens(e), static_cast<int64_t>(tok.size()));
    routed += g.expert_tokens(e);
    // By hand, in double, token by token.
    calib::MatrixD in = calib::MatrixD::Zero(16, 16), mid = calib::MatrixD::Zero(12, 12);
    for (size_t j = 0; j < tok.size(); ++j) {
      const Eigen::RowVectorXd xr = b.x.row(tok[j]).cast<double>();
      in += xr.transpose() * xr;
      const Eigen::RowVectorXd hr = d.h[static_cast<size_t>(e)].row(static_cast<int64_t>(j)).cast<double>();
      mid += hr.transpose() * hr;
    }
    sum += in;
    EXPECT_LT((g.expert_in(e) - in).norm(), 1e-9 * (1 + in.norm())) << "expert " << e;
    EXPECT_LT((g.expert_mid(e) - mid).norm(), 1e-9 * (1 + mid.norm())) << "expert " << e;
    g.release(e);
  }
  EXPECT_EQ(routed, 40 * 2);  // every token reached two experts
  EXPECT_LT((g.expert_in_sum() - sum).norm(), 1e-9 * sum.norm());
}

TEST(InputGrams, SpilledActivationsGiveTheSameBytesInAnyOrder) {
  const Block b = block();
  InputGrams ram, spilled;
  recompute_moe_grams(ram, b.w, b.rule, b.x, {});
  const fs::path dir = spill_folder("spill");
  recompute_moe_grams(spilled, b.w, b.rule, b.x, {1, dir});  // a 1-byte budget: every layer spills
  EXPECT_FALSE(ram.spilled());
  EXPECT_TRUE(spilled.spilled());
  EXPECT_EQ(ram.activation_bytes(), spilled.activation_bytes());
  EXPECT_EQ(ram.activation_bytes(), sizeof(float) * (40 * 16 + 40 * 2 * 12));  // x, then h_e of 80 routed rows
  EXPECT_TRUE(fs::is_empty(dir)) << "the spill file is unlinked once mapped";
  for (int64_t e = ram.num_experts() - 1; e >= 0; --e) {  // the other order than ram's
    const calib::MatrixD a = spilled.expert_in(e), m = spilled.expert_mid(e);
    spilled.release(e);
    EXPECT_EQ(a, ram.expert_in(e)) << "expert " << e;
    EXPECT_EQ(m, ram.expert_mid(e)) << "expert " << e;
  }
  EXPECT_EQ(spilled.expert_in_sum(), ram.expert_in_sum());
  fs::remove_all(dir);
}

TEST(InputGrams, ReleasedGramsAreRecomputedAndSmoothingScalesEveryGram) {
  const Block b = block();
  InputGrams g;
  recompute_moe_grams(g, b.w, b.rule, b.x, {});
  const calib::MatrixD g1 = g.expert_in(1), g3 = g.expert_in(3);
  g.release(3);
  g.expert_in(1)(0, 0) += 5.0;  // a pass's in-place change (GPTQ's top-up) lasts until release
  EXPECT_EQ(g.expert_in(1)(0, 0), g1(0, 0) + 5.0);
  g.release(1);
  EXPECT_EQ(g.expert_in(1), g1);  // recomputed from the activations
  // Expert 1's Gram is held while the inputs are scaled, expert 3's is computed after: both are
  // diag(s) G diag(s).
  Eigen::VectorXd s(16);
  for (int j = 0; j < 16; ++j) s(j) = j % 3 == 0 ? 0.5 : 2.0;
  g.scale_inputs(s);
  const calib::MatrixD want1 = s.asDiagonal() * g1 * s.asDiagonal(), want3 = s.asDiagonal() * g3 * s.asDiagonal();
  EXPECT_EQ(g.expert_in(1), want1);
  EXPECT_EQ(g.expert_in(3), want3);
  g.release(1);
  EXPECT_EQ(g.expert_in(1), want1);
  test::expect_error([&] { g.expert_in(6); }, core::ErrorKind::Internal, {"expert 6 of 6"});
}

TEST(ScratchFloats, AFolderThatCannotHoldTheSpillFileIsAnIoErrorNamingIt) {
  test::expect_error([] { io::ScratchFloats s(100, "/nonexistent-moe-folder/sub"); }, core::ErrorKind::IOError,
                     {"/nonexistent-moe-folder/sub", "spilled calibration activations"});
  io::ScratchFloats ram(5, {});
  EXPECT_FALSE(ram.spilled());
  EXPECT_EQ(ram.data()[4], 0.0f);
}

// Resident KB of the mapping that holds `p` in this process (/proc/self/smaps; -1 when unknown).
int64_t resident_kb_at(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool in = false;
  const auto a = reinterpret_cast<uintptr_t>(p);
  while (std::getline(smaps, line)) {
    std::istringstream is(line);
    std::string range, perms;
    is >> range >> perms;
    if (const auto dash = range.find('-'); dash != std::string::npos && perms.size() == 4) {
      const uintptr_t b = std::stoull(range.substr(0, dash), nullptr, 16), e = std::stoull(range.substr(dash + 1), nullptr, 16);
      in = a >= b && a < e;
      continue;
    }
    if (in && line.rfind("Rss:", 0) == 0) return std::stoll(line.substr(4));
  }
  return -1;
}

// Tensors a pass makes while a SpillArena is installed live in its temporary file: zero when made,
// their bytes kept when their pages are dropped from the process, the small ones on the heap, no
// file left in the folder, and the arena's storage alive as long as a tensor in it.
TEST(SpillArena, TensorsInTheTemporaryFileKeepTheirBytesWhenTheirPagesAreDropped) {
  if (!fs::exists("/proc/self/smaps")) GTEST_SKIP() << "no /proc/self/smaps";
  test::TempDir tmp;
  std::vector<core::Tensor> made;
  core::Tensor small;
  {
    io::SpillArena arena(tmp.path(), 4096, size_t{1} << 40);  // no eviction but evict_all()
    {
      const core::ScopedTensorArena scope(&arena);
      EXPECT_EQ(core::installed_arena(), &arena);
      small = core::Tensor::zeros(core::DType::U8, {100});
      for (int i = 0; i < 3; ++i) {
        core::Tensor t = core::Tensor::zeros(core::DType::F32, {1000, 300 + i});
        float* v = reinterpret_cast<float*>(t.mutable_data());
        for (int64_t j = 0; j < t.numel(); ++j) {
          EXPECT_EQ(v[j], 0.0f);
          v[j] = static_cast<float>(j % 977) * 0.5f + static_cast<float>(i);
        }
        made.push_back(std::move(t));
      }
    }
    EXPECT_EQ(core::installed_arena(), nullptr);
    EXPECT_FALSE(arena.release_range(small.data(), small.nbytes()));  // on the heap
    EXPECT_TRUE(arena.release_range(made[1].data(), made[1].nbytes()));
    EXPECT_EQ(arena.bytes_allocated(), size_t{4} * (300000 + 301000 + 302000));
    EXPECT_GT(resident_kb_at(made[0].data()), 1000);
    arena.evict_all();
    EXPECT_EQ(resident_kb_at(made[0].data()), 0);
    EXPECT_EQ(std::distance(fs::directory_iterator(tmp.path()), fs::directory_iterator{}), 0);
  }  // the arena object goes; its chunks stay while the tensors hold them
  for (int i = 0; i < 3; ++i) {
    const float* v = reinterpret_cast<const float*>(made[static_cast<size_t>(i)].data());
    for (int64_t j = 0; j < made[static_cast<size_t>(i)].numel(); j += 97)
      ASSERT_EQ(v[j], static_cast<float>(j % 977) * 0.5f + static_cast<float>(i)) << i << " " << j;
  }
  const core::Tensor heap = core::Tensor::zeros(core::DType::F32, {1000, 300});  // no arena now
  EXPECT_GT(resident_kb_at(heap.data()), -1);
}

TEST(SpillArena, AFolderThatCannotHoldTheFileIsAnIoErrorNamingIt) {
  io::SpillArena arena("/nonexistent-moe-folder/sub", 16);
  const core::ScopedTensorArena scope(&arena);
  test::expect_error([] { (void)core::Tensor::zeros(core::DType::F32, {64}); }, core::ErrorKind::IOError,
                     {"/nonexistent-moe-folder/sub", "encoded layer"});
  EXPECT_NO_THROW((void)core::Tensor::zeros(core::DType::F32, {2}));  // below min_bytes: the heap
}

}  // namespace
}  // namespace moe::pipeline
