// Memory stays one layer: after the forward has converted a layer, the mapped pages of that
// layer's weights leave the process's resident set (model::Model::page_releaser). Measured with
// the Rss of the checkpoint's mapping in /proc/self/smaps (Linux).
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "runtime/forward.h"
#include "runtime/observer.h"
#include "support/synth.h"

namespace moe::test {
namespace {

// Resident KB of the mappings of `file` in this process (0 when not mapped or unknown).
int64_t resident_kb(const fs::path& file) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool in = false;
  int64_t kb = 0;
  const std::string name = fs::canonical(file).string();
  while (std::getline(smaps, line)) {
    // Mapping header lines: "start-end perms offset dev inode path".
    std::istringstream is(line);
    std::string range, perms;
    is >> range >> perms;
    if (range.find('-') != std::string::npos && perms.size() == 4) {
      in = line.size() >= name.size() && line.compare(line.size() - name.size(), name.size(), name) == 0;
      continue;
    }
    if (in && line.rfind("Rss:", 0) == 0) kb += std::stoll(line.substr(4));
  }
  return kb;
}

TEST(Resident, ForwardHandsBackEachConvertedLayer) {
  if (!fs::exists("/proc/self/smaps")) GTEST_SKIP() << "no /proc/self/smaps";
  TempDir tmp;
  // Wide experts so the weights span thousands of pages: 2 layers x 4 experts x 3 x 8192 x 32 bf16.
  synth_to(tmp / "m", "mixtral", {.config_patch = {{"intermediate_size", 8192}}});
  const fs::path file = tmp / "m" / "model.safetensors";
  const int64_t file_kb = static_cast<int64_t>(fs::file_size(file) / 1024);
  ASSERT_GT(file_kb, 8000);
  const io::Checkpoint ckpt = io::Checkpoint::open(io::Env::posix(), tmp / "m");
  const model::Model m = model::Model::load(ckpt);
  const runtime::Forward f(m);
  for (int l = 0; l < m.dims().layers; ++l) {
    const runtime::LayerWeights w = f.load_layer(l);  // reads every byte of the layer
    EXPECT_LT(resident_kb(file), file_kb / 4) << "layer " << l << ": the converted layer's pages stayed resident";
  }
  // Control: reading the same bytes without the forward leaves them resident, so the check above
  // measures what it claims.
  const model::Layer& layer = m.layers().at(0);
  volatile uint8_t sink = 0;
  layer.for_each_tensor([&](const core::Tensor& t) {
    for (size_t i = 0; i < t.nbytes(); i += 4096) sink = sink + t.data()[i];
  });
  EXPECT_GT(resident_kb(file), file_kb / 3);
}

// Keeps copies of what the MoE block computed (the per-expert intermediates and outputs).
struct MoeCopy : runtime::Observer {
  std::vector<runtime::MatrixRM> h, y, out;
  bool wants_moe_trace() const override { return true; }
  void on_moe(int, const runtime::MoeTrace& t) override {
    h.insert(h.end(), t.h.begin(), t.h.end());
    y.insert(y.end(), t.y.begin(), t.y.end());
    out.push_back(t.out);
  }
};

bool same_bits(const runtime::MatrixRM& a, const runtime::MatrixRM& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<size_t>(a.size())) == 0;
}

std::vector<int32_t> window_tokens(int64_t vocab, int64_t n) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = static_cast<int32_t>((i * 37 + 11) % vocab);
  return t;
}

// Streamed experts (Forward::set_stream_experts): the layer is converted without its routed
// experts, each expert is converted when the block runs it, and the results are the same bits.
TEST(Resident, StreamedExpertsGiveTheSameBitsAndHandBackEachExpertsPages) {
  if (!fs::exists("/proc/self/smaps")) GTEST_SKIP() << "no /proc/self/smaps";
  TempDir tmp;
  for (const char* family : {"mixtral", "qwen2_moe", "deepseek_v3"}) {
    SCOPED_TRACE(family);
    const fs::path dir = tmp / family;
    synth_to(dir, family, {.config_patch = {{"moe_intermediate_size", 2048}, {"intermediate_size", 2048}}});
    const io::Checkpoint ckpt = io::Checkpoint::open(io::Env::posix(), dir);
    const model::Model m = model::Model::load(ckpt);
    runtime::Forward eager(m), streamed(m);
    streamed.set_stream_experts(true);
    const int64_t T = 8;
    const std::vector<int32_t> toks = window_tokens(m.dims().vocab, 3 * T);
    runtime::MatrixRM Xe = eager.embed(toks), Xs = streamed.embed(toks);
    MoeCopy ce, cs;
    runtime::Observer* oe[] = {&ce};
    runtime::Observer* os[] = {&cs};
    int moe_layers = 0;
    for (int l = 0; l < m.dims().layers; ++l) {
      const runtime::LayerWeights we = eager.load_layer(l);
      const runtime::LayerWeights ws = streamed.load_layer(l);
      if (ws.moe) {
        ++moe_layers;
        EXPECT_TRUE(ws.moe->streamed());
        EXPECT_TRUE(ws.moe->experts.empty()) << "layer " << l << ": the routed experts were converted up front";
        EXPECT_EQ(ws.moe->num_experts(), we.moe->num_experts());
        for (int64_t e = 0; e < we.moe->num_experts(); ++e) EXPECT_EQ(ws.moe->expert_width(e), we.moe->experts[e].width());
      }
      eager.apply_layer(we, Xe, T, oe);
      streamed.apply_layer(ws, Xs, T, os);
    }
    ASSERT_GT(moe_layers, 0);
    EXPECT_TRUE(same_bits(eager.logits(Xe), streamed.logits(Xs)));
    ASSERT_EQ(ce.h.size(), cs.h.size());
    for (size_t i = 0; i < ce.h.size(); ++i) {
      EXPECT_TRUE(same_bits(ce.h[i], cs.h[i])) << "expert intermediates " << i;
      EXPECT_TRUE(same_bits(ce.y[i], cs.y[i])) << "expert outputs " << i;
    }
    for (size_t i = 0; i < ce.out.size(); ++i) EXPECT_TRUE(same_bits(ce.out[i], cs.out[i]));
    // Every byte of the checkpoint was read by the two forwards; the streamed one handed back each
    // expert's pages after converting it, the eager one each layer's.
    const int64_t file_kb = static_cast<int64_t>(fs::file_size(dir / "model.safetensors") / 1024);
    EXPECT_LT(resident_kb(dir / "model.safetensors"), file_kb / 4);
  }
}

// A NaN in a routed expert's weight is refused by the streamed forward too, with the same message
// (layer, expert, projection, index, the on-disk tensor name) as when the layer is converted whole.
TEST(Resident, StreamedExpertsRefuseANonFiniteWeightAsTheWholeLayerDoes) {
  TempDir tmp;
  auto ck = make_synth("mixtral");
  bool hit = false;
  for (auto& t : ck.tensors)
    if (t.name == "model.layers.1.block_sparse_moe.experts.2.w3.weight") {
      t.data[6] = 0xc0, t.data[7] = 0x7f;  // bf16 NaN at element 3
      hit = true;
    }
  ASSERT_TRUE(hit);
  write_synth(ck, tmp / "nan", {.writer = Writer::HandRolled});  // the project writer refuses NaN
  const io::Checkpoint ckpt = io::Checkpoint::open(io::Env::posix(), tmp / "nan");
  const model::Model m = model::Model::load(ckpt);
  auto message = [&](bool stream) {
    runtime::Forward f(m);
    f.set_stream_experts(stream);
    runtime::MatrixRM X = f.embed(window_tokens(m.dims().vocab, 8));
    try {
      for (int l = 0; l < m.dims().layers; ++l) f.apply_layer(f.load_layer(l), X, 8);
    } catch (const core::Error& e) {
      EXPECT_EQ(e.kind(), core::ErrorKind::InvalidArgument);
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string whole = message(false), streamed = message(true);
  EXPECT_NE(whole.find("expert 2"), std::string::npos) << whole;
  EXPECT_NE(whole.find("non-finite value nan"), std::string::npos) << whole;
  EXPECT_NE(whole.find("experts.2.w3.weight"), std::string::npos) << whole;
  EXPECT_EQ(streamed, whole);
}

}  // namespace
}  // namespace moe::test
