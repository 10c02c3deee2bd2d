// Benchmark: a pruned GGUF model written as GGUF (model::write_gguf_like: the kept experts' blocks
// copied byte for byte from the input file, inside the kernel) next to `cp` of the written file. A
// synthetic mixtral-layout checkpoint (the tokenizer of data/models/mixtral-tiny) is exported to
// GGUF with moe-tool, loaded, cut to the first --keep experts of every layer (router rows too) and
// written. Each run maps the input afresh (as a `prune` process does). For each layer count, two
// timings of each, best and median over --repeat runs (the medians are the figures to read on a
// machine whose page costs vary from run to run: docs/compressed-tensors.md): page cache warm
// (input and cp's source just written or read), and cold (`sync`, then the page cache dropped
// before each timing, when run as root; else `"cold": "not root"`). Prints JSON: bytes, wall and
// CPU (user + system) seconds, throughputs, the ratios, the load average.
//   bench_gguf_prune [--layers 4,8,28] [--type q8_0] [--keep 6] [--dir /tmp/moe-bench-gguf-prune]
//                    [--tool path/to/moe-tool] [--repeat 3] [--cold 1]
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <sstream>
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

namespace {

// Best-of-`repeat` seconds of the write and of `cp` of its output, and every run's; `cold`: each
// timing starts with the page cache written out and dropped.
struct Timing {
  double write = 1e30, cp = 1e30;          // wall seconds
  double write_cpu = 1e30, cp_cpu = 1e30;  // user + system seconds (steadier on a shared machine)
  std::vector<double> writes, cps;         // every run's wall seconds, for the medians
  uint64_t bytes = 0;
};

double cpu_seconds() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

Timing time_prune(const fs::path& in, const fs::path& dir, int64_t keep, int repeat, bool cold) {
  auto& env = moe::io::Env::posix();
  const fs::path out = dir / "out.gguf", copy = dir / "copy.gguf";
  std::vector<int64_t> rows;
  for (int64_t e = 0; e < keep; ++e) rows.push_back(e);
  Timing t;
  for (int r = 0; r < repeat; ++r) {
    fs::remove(out);
    fs::remove(copy);
    // A fresh mapping each run, as a `prune` process has.
    const auto ck = moe::io::Checkpoint::open(env, in);
    auto m = moe::model::Model::load(ck);
    for (auto& layer : m.layers()) {
      auto& b = *layer.moe;
      b.experts.resize(static_cast<size_t>(keep));
      b.router = b.router.take_rows(rows);
    }
    moe::bench::settle_page_cache(cold);
    const auto t0 = std::chrono::steady_clock::now();
    const double c0 = cpu_seconds();
    t.bytes = moe::model::write_gguf_like(env, m, *ck.gguf(), out);
    t.write_cpu = std::min(t.write_cpu, cpu_seconds() - c0);
    t.writes.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    t.write = std::min(t.write, t.writes.back());
    moe::bench::settle_page_cache(cold);
    const auto c = moe::bench::run_child({"cp", out.string(), copy.string()});
    if (c.status != 0) throw std::runtime_error("cp failed");
    t.cps.push_back(c.seconds);
    t.cp = std::min(t.cp, c.seconds);
    t.cp_cpu = std::min(t.cp_cpu, c.cpu_seconds);
  }
  fs::remove(out);
  fs::remove(copy);
  return t;
}

double load_average() {
  double l = -1;
  getloadavg(&l, 1);
  return l;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> layer_counts = {4, 8, 28};
  std::string type = "q8_0";
  int64_t keep = 6;
  int repeat = 3;
  bool cold = true;
  fs::path dir = "/tmp/moe-bench-gguf-prune";
  std::string tool = (fs::path(argv[0]).parent_path() / "moe-tool").string();
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--layers") {
      layer_counts.clear();
      std::stringstream ss(v);
      for (std::string x; std::getline(ss, x, ',');) layer_counts.push_back(std::stoll(x));
    } else if (k == "--type") type = v;
    else if (k == "--keep") keep = std::stoll(v);
    else if (k == "--dir") dir = v;
    else if (k == "--tool") tool = v;
    else if (k == "--repeat") repeat = std::stoi(v);
    else if (k == "--cold") cold = v != "0";
    else {
      std::cerr << "unknown option " << k << "\n";
      return 2;
    }
  }
  // Dropping the page cache needs root: try once, say so when it fails.
  const bool can_drop = cold && moe::bench::settle_page_cache(true);
  nlohmann::json runs = nlohmann::json::array();
  for (const int64_t layers : layer_counts) {
    moe::bench::Dims D;
    D.H = 1024;
    D.I = 2816;
    D.V = 4096;  // the tokenizer of mixtral-tiny
    D.L = layers;
    fs::remove_all(dir);
    const fs::path src = dir / "src", in = dir / "in.gguf";
    moe::bench::write_model(src, D);
    const fs::path tok = fs::path(MOE_BENCH_SOURCE_DIR) / "data/models/mixtral-tiny";
    for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) fs::copy_file(tok / f, src / f);
    const auto ex = moe::bench::run_child({tool, "-q", "export", src.string(), in.string(), "--type", type});
    if (ex.status != 0) {
      std::cerr << "export failed (status " << ex.status << ")\n";
      return 1;
    }
    fs::remove_all(src);
    nlohmann::json j = {{"type", type}, {"layers", D.L}, {"experts_kept", keep}, {"experts", D.E},
                        {"input_bytes", fs::file_size(in)}};
    auto put = [&](const char* key, const Timing& t, double load) {
      j["output_bytes"] = t.bytes;
      j[key] = {{"write_seconds", t.write},
                {"cp_seconds", t.cp},
                {"write_mb_per_s", static_cast<double>(t.bytes) / t.write / 1e6},
                {"cp_mb_per_s", static_cast<double>(t.bytes) / t.cp / 1e6},
                {"ratio_to_cp", t.cp / t.write},
                {"write_seconds_median", moe::bench::median(t.writes)},
                {"cp_seconds_median", moe::bench::median(t.cps)},
                {"ratio_to_cp_median", moe::bench::median(t.cps) / moe::bench::median(t.writes)},
                {"write_cpu_seconds", t.write_cpu},
                {"cp_cpu_seconds", t.cp_cpu},
                {"cpu_ratio_to_cp", t.cp_cpu / t.write_cpu},
                {"load_average", load}};
    };
    put("warm", time_prune(in, dir, keep, repeat, false), load_average());
    if (can_drop) put("cold", time_prune(in, dir, keep, repeat, true), load_average());
    else if (cold) j["cold"] = "not root: /proc/sys/vm/drop_caches not writable";
    std::cerr << j.dump() << "\n";  // each row as soon as measured
    runs.push_back(j);
    fs::remove_all(dir);
  }
  std::cout << nlohmann::json{{"benchmark", "gguf_prune"}, {"runs", runs}}.dump(2) << "\n";
  return 0;
}
