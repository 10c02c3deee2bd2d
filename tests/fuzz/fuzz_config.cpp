// libFuzzer target: arbitrary bytes as config.json of a small checkpoint.
// At startup a tiny synthetic checkpoint of every supported family is written to a temporary
// folder; each input is written as the config.json of the family it names (mixtral's when it names
// none) and goes through everything `moe-tool inspect` does: JSON parsing, moe::model::Config,
// family_for, Checkpoint::open, Model::load, summarize/render_summary, outputs() and
// rewritten_config(). Errors must be moe::core::Error; anything else (another exception type, a
// crash, a leak, UB) is a bug.
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "core/error.h"
#include "io/checkpoint.h"
#include "family/config.h"
#include "family/family.h"
#include "model/model.h"
#include "model/summary.h"
#include "support/synth.h"

namespace fs = std::filesystem;

namespace {

struct Fixture {
  fs::path root;
  std::map<std::string, fs::path> dirs;  // model_type -> checkpoint folder
  Fixture() {
    std::string tmpl = (fs::temp_directory_path() / "moe-fuzz-config-XXXXXX").string();
    if (!mkdtemp(tmpl.data())) std::abort();
    root = tmpl;
    // The default synthetic checkpoints: seeds/fuzz_config/valid-<family>.json are their configs.
    for (const auto& fam : moe::test::synth_families()) dirs[fam] = moe::test::synth_to(root / fam, fam);
  }
  ~Fixture() {
    std::error_code ec;
    fs::remove_all(root, ec);
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fixture();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  Fixture& fx = fixture();
  try {
    // What Checkpoint::open does with the text first.
    nlohmann::json j = moe::io::parse_json_file_text(text, "config.json");
    fs::path dir = fx.dirs.at("mixtral");
    if (j.is_object()) {
      moe::model::Config c(j, "config.json");
      try {
        const auto& f = moe::model::family_for(c);
        dir = fx.dirs.at(f.model_type);
      } catch (const moe::core::Error&) {
      }
    }
    FILE* out = std::fopen((dir / "config.json").c_str(), "wb");
    if (!out) std::abort();
    if (size && std::fwrite(data, 1, size, out) != size) std::abort();
    std::fclose(out);

    auto ck = moe::io::Checkpoint::open(moe::io::Env::posix(), dir);
    auto model = moe::model::Model::load(ck);
    const auto summary = moe::model::summarize(ck, model, true);
    (void)moe::model::render_summary(summary);
    (void)model.rewritten_config(moe::core::DType::F32);
    for (const auto& o : model.outputs(moe::core::DType::BF16)) {
      const auto t = o.make();
      if (t.dtype() != o.dtype || t.shape() != o.shape) std::abort();
    }
  } catch (const moe::core::Error&) {
  }
  return 0;
}
