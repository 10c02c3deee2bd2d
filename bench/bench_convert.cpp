// Benchmark: `moe-tool convert` of a synthetic mixtral-layout checkpoint next to `cp` of the same
// files. Prints JSON: wall time and throughput of both, the ratio, and convert's peak RSS
// (getrusage of the child), for each size given (default 4 and 8 GB, so one can see RSS does not
// grow with the checkpoint).
//   bench_convert [--sizes-gb 4,8] [--dir /tmp/moe-bench] [--tool path/to/moe-tool] [--repeat 2]
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "child_process.h"
#include "synthetic_mixtral.h"

namespace fs = std::filesystem;
using moe::core::DType;

namespace {

using moe::bench::run_child;

// A synthetic mixtral-layout checkpoint of about size_gb (H 2048, I 5632, 8 experts).
uint64_t make_checkpoint(const fs::path& dir, double size_gb) {
  moe::bench::Dims D;
  D.H = 2048;
  D.I = 5632;
  D.heads = 16;
  D.kv = 8;
  D.L = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(size_gb * 1e9 / static_cast<double>(D.layer_bytes()))));
  fs::remove_all(dir);
  return moe::bench::write_model(dir, D);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<double> sizes = {4, 8};
  fs::path dir = "/tmp/moe-bench-convert";
  std::string tool = (fs::path(argv[0]).parent_path() / "moe-tool").string();
  int repeat = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--sizes-gb") {
      sizes.clear();
      std::stringstream ss(v);
      for (std::string x; std::getline(ss, x, ',');) sizes.push_back(std::stod(x));
    } else if (k == "--dir") dir = v;
    else if (k == "--tool") tool = v;
    else if (k == "--repeat") repeat = std::stoi(v);
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  nlohmann::json out = {{"benchmark", "convert"}, {"runs", nlohmann::json::array()}};
  for (double gb : sizes) {
    const fs::path in = dir / "in", cp_out = dir / "cp-out", conv_out = dir / "convert-out";
    std::fprintf(stderr, "generating %.1f GB synthetic checkpoint in %s ...\n", gb, in.c_str());
    const uint64_t bytes = make_checkpoint(in, gb);
    double best_cp = 1e30, best_conv = 1e30;
    long rss = 0;
    for (int r = 0; r < repeat; ++r) {
      fs::remove_all(cp_out);
      run_child({"sync"});  // no dirty pages from earlier steps in either timing
      auto c = run_child({"cp", "-r", in.string(), cp_out.string()});
      if (c.status != 0) return 1;
      best_cp = std::min(best_cp, c.seconds);
      fs::remove_all(cp_out);
      fs::remove_all(conv_out);
      run_child({"sync"});
      auto v = run_child({tool, "--quiet", "convert", in.string(), conv_out.string()});
      if (v.status != 0) {
        std::fprintf(stderr, "convert failed with status %d\n", v.status);
        return 1;
      }
      best_conv = std::min(best_conv, v.seconds);
      rss = std::max(rss, v.max_rss_kb);
      fs::remove_all(conv_out);
    }
    out["runs"].push_back({{"checkpoint_bytes", bytes},
                           {"cp_seconds", best_cp},
                           {"convert_seconds", best_conv},
                           {"cp_MBps", bytes / best_cp / 1e6},
                           {"convert_MBps", bytes / best_conv / 1e6},
                           {"throughput_ratio_vs_cp", best_cp / best_conv},
                           {"convert_peak_rss_MB", rss / 1024.0}});
    fs::remove_all(in);
  }
  fs::remove_all(dir);
  std::cout << out.dump(2) << std::endl;
  return 0;
}
