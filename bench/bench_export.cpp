// Benchmark: `moe-tool export` of a synthetic mixtral-layout checkpoint next to `cp` of the OUTPUT
// (the bytes written): GGUF at each --types (round to nearest from the bf16 weights), and the
// compressed-tensors / gptq folders of the same model quantized to int4 groups of 128 (RTN,
// symmetric; the quantize is not timed). Each timing, of the export and of `cp`, starts after
// `sync` (as bench_convert) and, when run as root with --cold 1, with the page cache dropped, so
// each reads its input from the disk. Best of --repeat; the export's peak RSS (getrusage of the
// child) for each size, to show it does not grow with the model. Prints JSON: wall and CPU (user +
// system of the child) seconds and their ratios, with the load average at each row (the machine
// may be shared).
//   bench_export [--sizes-gb 1,2] [--types f16,q8_0,q4_0] [--formats compressed-tensors,gptq,awq]
//                [--dir /tmp/moe-bench-export] [--tool path/to/moe-tool] [--repeat 2] [--cold 1]
//                [--keep 0]   (1: leave the last size's folders, src/ and int4/, for profiling)
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "child_process.h"
#include "synthetic_mixtral.h"

namespace fs = std::filesystem;

namespace {

using moe::bench::run_child;
using moe::bench::settle_page_cache;

std::vector<std::string> split(const std::string& v) {
  std::vector<std::string> out;
  std::stringstream ss(v);
  for (std::string x; std::getline(ss, x, ',');)
    if (!x.empty()) out.push_back(x);
  return out;
}

uint64_t bytes_of(const fs::path& p) {
  if (fs::is_regular_file(p)) return fs::file_size(p);
  uint64_t n = 0;
  for (const auto& e : fs::recursive_directory_iterator(p)) n += e.is_regular_file() ? e.file_size() : 0;
  return n;
}

double load_average() {
  double l = -1;
  getloadavg(&l, 1);
  return l;
}

// Best-of-`repeat` timing of `export_args` (writing `out`) and of `cp -r out copy`.
nlohmann::json time_export(const std::vector<std::string>& export_args, const fs::path& out, const fs::path& copy,
                           int repeat, bool drop) {
  double best_export = 1e30, best_cp = 1e30, cpu_export = 1e30, cpu_cp = 1e30;
  long rss = 0;
  uint64_t bytes = 0;
  for (int r = 0; r < repeat; ++r) {
    fs::remove_all(out);
    fs::remove_all(copy);
    settle_page_cache(drop);
    const auto e = run_child(export_args);
    if (e.status != 0) throw std::runtime_error("export failed: " + export_args.back());
    best_export = std::min(best_export, e.seconds);
    cpu_export = std::min(cpu_export, e.cpu_seconds);
    rss = std::max(rss, e.max_rss_kb);
    bytes = bytes_of(out);
    settle_page_cache(drop);
    const auto c = run_child({"cp", "-r", out.string(), copy.string()});
    if (c.status != 0) throw std::runtime_error("cp failed");
    best_cp = std::min(best_cp, c.seconds);
    cpu_cp = std::min(cpu_cp, c.cpu_seconds);
  }
  fs::remove_all(out);
  fs::remove_all(copy);
  return {{"output_bytes", bytes},
          {"export_seconds", best_export},
          {"cp_seconds", best_cp},
          {"export_mb_per_s", static_cast<double>(bytes) / best_export / 1e6},
          {"cp_mb_per_s", static_cast<double>(bytes) / best_cp / 1e6},
          {"ratio_to_cp", best_cp / best_export},
          {"export_cpu_seconds", cpu_export},
          {"cp_cpu_seconds", cpu_cp},
          {"cpu_ratio_to_cp", cpu_cp / cpu_export},
          {"export_peak_rss_mb", static_cast<double>(rss) / 1024.0},
          {"load_average", load_average()}};
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<double> sizes = {1, 2};
  std::vector<std::string> types = {"f16", "q8_0", "q4_0"}, formats = {"compressed-tensors", "gptq", "awq"};
  fs::path dir = "/tmp/moe-bench-export";
  std::string tool = (fs::path(argv[0]).parent_path() / "moe-tool").string();
  int repeat = 2;
  bool cold = true, keep = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--sizes-gb") {
      sizes.clear();
      for (const auto& x : split(v)) sizes.push_back(std::stod(x));
    } else if (k == "--types") types = split(v);
    else if (k == "--formats") formats = split(v);
    else if (k == "--dir") dir = v;
    else if (k == "--tool") tool = v;
    else if (k == "--repeat") repeat = std::stoi(v);
    else if (k == "--cold") cold = v != "0";
    else if (k == "--keep") keep = v != "0";
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  const bool drop = cold && settle_page_cache(true);
  nlohmann::json out = {{"benchmark", "export"},
                        {"page_cache", drop ? "dropped before each timing" : "sync only (not root or --cold 0)"},
                        {"runs", nlohmann::json::array()}};
  const fs::path src = dir / "src", quantized = dir / "int4", res = dir / "out", copy = dir / "copy";
  for (const double gb : sizes) {
    moe::bench::Dims D;
    D.H = 2048;
    D.I = 5632;
    D.heads = 16;
    D.kv = 8;
    D.V = 4096;  // the tokenizer of mixtral-tiny
    D.L = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(gb * 1e9 / static_cast<double>(D.layer_bytes()))));
    fs::remove_all(dir);
    std::fprintf(stderr, "generating %.1f GB synthetic checkpoint in %s ...\n", gb, src.c_str());
    const uint64_t in_bytes = moe::bench::write_model(src, D);
    const fs::path tok = fs::path(MOE_BENCH_SOURCE_DIR) / "data/models/mixtral-tiny";
    for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) fs::copy_file(tok / f, src / f);
    for (const auto& t : types) {
      std::fprintf(stderr, "export --type %s ...\n", t.c_str());
      auto j = time_export({tool, "-q", "export", src.string(), (dir / "out.gguf").string(), "--type", t},
                           dir / "out.gguf", dir / "copy.gguf", repeat, drop);
      j["input_bytes"] = in_bytes;
      j["layers"] = D.L;
      j["format"] = "gguf " + t;
      std::fprintf(stderr, "%s\n", j.dump().c_str());  // each row as soon as measured
      out["runs"].push_back(j);
    }
    if (!formats.empty()) {
      const auto q = run_child({tool, "-q", "quantize", src.string(), quantized.string(), "--method", "rtn", "--codec",
                                "int4", "--group", "128", "--sym"});
      if (q.status != 0) {
        std::fprintf(stderr, "quantize failed (status %d)\n", q.status);
        return 1;
      }
      for (const auto& f : formats) {
        std::fprintf(stderr, "export --format %s ...\n", f.c_str());
        auto j = time_export({tool, "-q", "export", quantized.string(), res.string(), "--format", f}, res, copy, repeat,
                             drop);
        j["input_bytes"] = bytes_of(quantized);
        j["layers"] = D.L;
        j["format"] = f + " (int4, groups of 128, symmetric)";
        std::fprintf(stderr, "%s\n", j.dump().c_str());
        out["runs"].push_back(j);
      }
    }
    if (!keep) fs::remove_all(dir);
  }
  std::cout << out.dump(2) << std::endl;
  return 0;
}
