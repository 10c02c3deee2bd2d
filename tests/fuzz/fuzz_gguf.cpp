// libFuzzer target: arbitrary bytes as a GGUF file (io/gguf.h). moe::io::GgufFile::open must
// either accept a file whose every tensor lies inside the data section, aligned and without
// overlap, and whose tensors decode (or are refused as unsupported types), or throw
// moe::core::Error; so must reading an accepted file as a model (io/gguf_model.h). Anything else
// (another exception, a crash, a sanitizer report, a read outside the mapping) is a bug. The
// bytes go through a file in /dev/shm because the reader maps files.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/env.h"
#include "io/checkpoint.h"
#include "io/gguf.h"
#include "io/gguf_model.h"
#include "model/model.h"

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

// The scratch file, removed when the fuzzer exits.
struct Scratch {
  std::string path = "/dev/shm/moe-fuzz-gguf-" + std::to_string(getpid()) + ".gguf";
  ~Scratch() { unlink(path.c_str()); }
};

const std::string& scratch_path() {
  static const Scratch s;
  return s.path;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  {
    std::ofstream f(scratch_path(), std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  try {
    const moe::io::GgufFile g = moe::io::GgufFile::open(moe::io::Env::posix(), scratch_path());
    // (A file without tensors, or whose tensors are all empty, may end before its aligned data
    // section: nothing is read there.)
    bool reads_data = false;
    for (const auto& t : g.tensors()) reads_data |= t.nbytes() > 0;
    if (reads_data) check(g.data_offset() <= size);
    check(g.alignment() > 0 && (g.alignment() & (g.alignment() - 1)) == 0);
    std::vector<std::pair<uint64_t, uint64_t>> spans;
    for (const auto& t : g.tensors()) {
      check(!t.ne.empty() && t.ne.size() <= static_cast<size_t>(moe::io::kGgufMaxDims));
      check(t.offset % g.alignment() == 0);
      check(t.nbytes() == 0 || g.data_offset() + t.offset + t.nbytes() <= size);
      // Non-empty tensors do not overlap (an empty one holds no bytes, wherever its offset is).
      for (const auto& [b, e] : spans) check(t.offset >= e || t.offset + t.nbytes() <= b || t.nbytes() == 0);
      if (t.nbytes() > 0) spans.emplace_back(t.offset, t.offset + t.nbytes());
      try {
        const std::vector<float> v = g.decode(t);
        check(static_cast<int64_t>(v.size()) == t.numel());
      } catch (const moe::core::Error&) {
      }
    }
  } catch (const moe::core::Error&) {
    return 0;
  }
  // The same file as a model input (io/gguf_model.h): mapped to our config and names, loaded, every
  // weight dequantized, the tokenizer rebuilt; each step succeeds or throws moe::core::Error.
  try {
    const auto ck = moe::io::Checkpoint::open(moe::io::Env::posix(), scratch_path());
    for (const auto& name : ck.names()) {
      const auto t = ck.tensor(name);
      check(static_cast<int64_t>(t.to_f32().size()) == t.numel());
    }
    (void)moe::io::gguf_tokenizer_json(ck.gguf()->file());
    (void)moe::model::Model::load(ck);
  } catch (const moe::core::Error&) {
  }
  return 0;
}
