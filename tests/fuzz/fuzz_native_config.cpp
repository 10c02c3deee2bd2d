// libFuzzer target: arbitrary bytes as the quantization_config of a native moe-tool checkpoint
// (docs/FORMAT.md). At startup a synthetic mixtral checkpoint (tests/support/synth.h: hidden 32,
// expert width 16) is written whose layer-0 expert-0 w1 is stored as low-rank parts
// `.lr_a` [16, 4] and `.lr_b` [4, 32], and w3 as `.lr_a`, `.lr_b` and `.lr_base` [16, 32]. Each
// input is spliced in as the value of "quantization_config" in its config.json (so inputs that
// are not JSON exercise the config parser's errors too) and goes through what `inspect` and
// `convert --materialize` do: Checkpoint::open, Model::load (the encodings decoded from their
// parts: quant::decode), summarize/render_summary, rewritten_config, and every output made, native
// and materialized (each encoded weight dequantized). Errors must be moe::core::Error; a crash,
// a read out of bounds (ASan), UB, a leak or another exception type is a bug.
// Seeds: tests/fuzz/seeds/fuzz_native_config/ (tests/fuzz/make_seeds.py).
#include <cstddef>
#include <cstdlib>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "core/error.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "model/summary.h"
#include "support/synth.h"

namespace fs = std::filesystem;

namespace {

constexpr const char* kW1 = "model.layers.0.block_sparse_moe.experts.0.w1.weight";
constexpr const char* kW3 = "model.layers.0.block_sparse_moe.experts.0.w3.weight";

// The checkpoint folder, in a temporary folder removed at exit.
struct Fixture {
  moe::test::TempDir tmp{"moe-fuzz-native"};
  fs::path dir = tmp / "native";
  std::string prefix;  // config.json up to the quantization_config value
  Fixture() {
    moe::test::SynthSpec spec;
    spec.drop = {kW1, kW3};
    const std::string w1 = kW1, w3 = kW3;
    for (const auto& [name, shape] : std::vector<std::pair<std::string, moe::core::Shape>>{
             {w1 + ".lr_a", {16, 4}}, {w1 + ".lr_b", {4, 32}}, {w3 + ".lr_a", {16, 4}}, {w3 + ".lr_b", {4, 32}},
             {w3 + ".lr_base", {16, 32}}})
      spec.extra.push_back(moe::test::synth_tensor(name, moe::core::DType::BF16, shape, 7));
    const moe::test::SynthCheckpoint ck = moe::test::make_synth("mixtral", spec);
    moe::test::write_synth(ck, dir);
    nlohmann::json cfg = ck.config;
    cfg.erase("quantization_config");
    std::string text = cfg.dump();
    text.pop_back();  // the closing brace
    prefix = text + ",\"quantization_config\":";
  }
};

const Fixture& fixture() {
  static const Fixture f;
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) { return fixture().prefix.empty() ? 1 : 0; }

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Fixture& fx = fixture();
  const std::string text = fx.prefix + std::string(reinterpret_cast<const char*>(data), size) + "}";
  FILE* out = std::fopen((fx.dir / "config.json").c_str(), "wb");
  if (!out) std::abort();
  if (std::fwrite(text.data(), 1, text.size(), out) != text.size()) std::abort();
  std::fclose(out);
  try {
    auto ck = moe::io::Checkpoint::open(moe::io::Env::posix(), fx.dir);
    auto model = moe::model::Model::load(ck);
    const auto summary = moe::model::summarize(ck, model, true);
    (void)moe::model::render_summary(summary);
    (void)model.rewritten_config(moe::model::OutputOptions{moe::core::DType::F32});
    for (const bool materialize : {false, true})
      for (const auto& o : model.outputs(moe::model::OutputOptions{moe::core::DType::F32, materialize})) {
        const auto t = o.make();
        if (t.shape() != o.shape) std::abort();
      }
  } catch (const moe::core::Error&) {
  }
  return 0;
}
