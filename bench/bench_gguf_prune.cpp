// Benchmark: a pruned GGUF model written as GGUF (model::write_gguf_like: the kept experts' blocks
// copied byte for byte from the mapped input) next to `cp` of the written file. A synthetic
// mixtral-layout checkpoint (the tokenizer of data/models/mixtral-tiny) is exported to GGUF with
// moe-tool, loaded, cut to the first --keep experts of every layer (router rows too) and written.
// Each run maps the input afresh (as a `prune` process does). Prints JSON: bytes, best wall time of
// each over --repeat runs, throughputs and their ratio.
//   bench_gguf_prune [--size-mb 1024] [--type q8_0] [--keep 6] [--dir /tmp/moe-bench-gguf-prune]
//                    [--tool path/to/moe-tool] [--repeat 3]
#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "child_process.h"
#include "io/checkpoint.h"
#include "io/gguf_model.h"
#include "model/gguf_write.h"
#include "model/model.h"
#include "synthetic_mixtral.h"

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  double size_mb = 1024;
  std::string type = "q8_0";
  int64_t keep = 6;
  int repeat = 3;
  fs::path dir = "/tmp/moe-bench-gguf-prune";
  std::string tool = (fs::path(argv[0]).parent_path() / "moe-tool").string();
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--size-mb") size_mb = std::stod(v);
    else if (k == "--type") type = v;
    else if (k == "--keep") keep = std::stoll(v);
    else if (k == "--dir") dir = v;
    else if (k == "--tool") tool = v;
    else if (k == "--repeat") repeat = std::stoi(v);
    else {
      std::cerr << "unknown option " << k << "\n";
      return 2;
    }
  }
  moe::bench::Dims D;
  D.H = 1024;
  D.I = 2816;
  D.V = 4096;  // the tokenizer of mixtral-tiny
  D.L = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(size_mb * 1e6 / static_cast<double>(D.layer_bytes()))));
  fs::remove_all(dir);
  const fs::path src = dir / "src", in = dir / "in.gguf", out = dir / "out.gguf", copy = dir / "copy.gguf";
  moe::bench::write_model(src, D);
  const fs::path tok = fs::path(MOE_BENCH_SOURCE_DIR) / "data/models/mixtral-tiny";
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) fs::copy_file(tok / f, src / f);
  const auto ex = moe::bench::run_child({tool, "-q", "export", src.string(), in.string(), "--type", type});
  if (ex.status != 0) {
    std::cerr << "export failed (status " << ex.status << ")\n";
    return 1;
  }
  fs::remove_all(src);

  auto& env = moe::io::Env::posix();
  std::vector<int64_t> rows;
  for (int64_t e = 0; e < keep; ++e) rows.push_back(e);
  double best_write = 1e30, best_cp = 1e30;
  uint64_t bytes = 0;
  for (int r = 0; r < repeat; ++r) {
    fs::remove(out);
    fs::remove(copy);
    // A fresh mapping each run, as a `prune` process has: the input's pages are faulted in by the
    // write (they are in the page cache, as they are for cp).
    const auto ck = moe::io::Checkpoint::open(env, in);
    auto m = moe::model::Model::load(ck);
    for (auto& layer : m.layers()) {
      auto& b = *layer.moe;
      b.experts.resize(static_cast<size_t>(keep));
      b.router = b.router.take_rows(rows);
    }
    const auto t0 = std::chrono::steady_clock::now();
    bytes = moe::model::write_gguf_like(env, m, *ck.gguf(), out);
    best_write = std::min(best_write, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    const auto c = moe::bench::run_child({"cp", out.string(), copy.string()});
    if (c.status != 0) return 1;
    best_cp = std::min(best_cp, c.seconds);
  }
  const nlohmann::json j = {{"type", type},
                            {"layers", D.L},
                            {"experts_kept", keep},
                            {"experts", D.E},
                            {"input_bytes", fs::file_size(in)},
                            {"output_bytes", bytes},
                            {"write_seconds", best_write},
                            {"cp_seconds", best_cp},
                            {"write_mb_per_s", static_cast<double>(bytes) / best_write / 1e6},
                            {"cp_mb_per_s", static_cast<double>(bytes) / best_cp / 1e6},
                            {"ratio_to_cp", best_cp / best_write}};
  std::cout << j.dump(2) << "\n";
  fs::remove_all(dir);
  return 0;
}
