// Memory stays one layer: after the forward has converted a layer, the mapped pages of that
// layer's weights leave the process's resident set (model::Model::page_releaser). Measured with
// the Rss of the checkpoint's mapping in /proc/self/smaps (Linux).
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "io/checkpoint.h"
#include "model/model.h"
#include "runtime/forward.h"
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

}  // namespace
}  // namespace moe::test
