// Benchmark: `moe-tool export` of a synthetic mixtral-layout checkpoint next to `cp` of the OUTPUT
// (the bytes written): GGUF at each --types (round to nearest from the bf16 weights), and the
// compressed-tensors / gptq folders of the same model quantized to int4 groups of 128 (RTN,
// symmetric; the quantize is not timed). Each timing, of the export and of `cp`, starts after
// `sync` (as bench_convert) and, when run as root with --cold 1, with the page cache dropped, so
// each reads its input from the disk; then a user-space copy of the output (pread/pwrite, the
// floor of a program that sees the bytes it writes). Best and median of --repeat rounds; the
// export's peak RSS (getrusage of the child) for each size, to show it does not grow with the
// model. Prints JSON: wall and CPU (user + system of the child) seconds and their ratios, with the
// load average at each row (the machine may be shared).
//   bench_export [--sizes-gb 1,2] [--types f16,q8_0,q4_0] [--formats compressed-tensors,gptq,awq]
//                [--dir /tmp/moe-bench-export] [--tool path/to/moe-tool] [--repeat 2] [--cold 1]
//                [--keep 0]   (1: leave the last size's folders, src/ and int4/, for profiling)
//                [--prefault-mb 0]   (touch this many MiB before each timing: prefault())
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
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

using moe::bench::median;
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

// The user-space copy this benchmark also times (`bench_export --user-copy FROM TO`, a child as
// the export and `cp` are): every regular file of FROM read with pread and written with pwrite,
// 1 MiB at a time, into the same names under TO. It is the floor of any program that must see the
// bytes it writes (as the GPTQ/AWQ transposes do), where `cp` copies inside the kernel
// (copy_file_range) without mapping a page.
int user_copy(const fs::path& from, const fs::path& to) {
  std::vector<char> buf(1 << 20);
  auto copy_file = [&](const fs::path& a, const fs::path& b) {
    const int in = ::open(a.c_str(), O_RDONLY), out = ::open(b.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (in < 0 || out < 0) return false;
    for (off_t off = 0;;) {
      const ssize_t n = ::pread(in, buf.data(), buf.size(), off);
      if (n < 0) return false;
      if (n == 0) break;
      for (ssize_t w = 0; w < n;) {
        const ssize_t k = ::pwrite(out, buf.data() + w, static_cast<size_t>(n - w), off + w);
        if (k <= 0) return false;
        w += k;
      }
      off += n;
    }
    return ::close(in) == 0 && ::close(out) == 0;
  };
  if (fs::is_regular_file(from)) return copy_file(from, to) ? 0 : 1;
  fs::create_directories(to);
  for (const auto& e : fs::recursive_directory_iterator(from)) {
    const fs::path rel = fs::relative(e.path(), from);
    if (e.is_directory()) fs::create_directories(to / rel);
    else if (e.is_regular_file() && !copy_file(e.path(), to / rel)) return 1;
  }
  return 0;
}

// Touches `mb` MiB of fresh anonymous memory, one write per page, then unmaps it; returns the
// seconds it took. On a virtual machine whose balloon reports freed guest pages to the host
// (virtio-balloon free page reporting; /sys/module/page_reporting), a page the host took back costs
// a host fault on its next use; touching the pages first makes the free pages the next timing
// takes ones the host holds again, so that timing does not pay those faults at random.
double prefault(int64_t mb) {
  if (mb <= 0) return 0;
  const auto t0 = std::chrono::steady_clock::now();
  const size_t n = static_cast<size_t>(mb) << 20;
  void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("prefault: mmap failed");
  for (size_t i = 0; i < n; i += 4096) static_cast<volatile char*>(p)[i] = 1;
  ::munmap(p, n);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// `repeat` rounds, each timing `export_args` (writing `out`), then `cp -r out copy`, then the
// user-space copy of `out` (user_copy), each after settle_page_cache and, with `prefault_mb`,
// prefault(). Best and median of each, and the ratios of the best and of the medians. Without the
// prefault, on a virtual machine whose balloon hands freed pages back to the host, the same copy
// takes 0.3 s or 2 s from one run to the next (docs/compressed-tensors.md, "Export throughput").
nlohmann::json time_export(const std::vector<std::string>& export_args, const fs::path& out, const fs::path& copy,
                           int repeat, bool drop, const std::string& self, int64_t prefault_mb) {
  std::vector<double> ex, cp, uc, pf;
  auto settle = [&] {
    settle_page_cache(drop);
    pf.push_back(prefault(prefault_mb));
  };
  double cpu_export = 1e30, cpu_cp = 1e30;
  long rss = 0;
  uint64_t bytes = 0;
  for (int r = 0; r < repeat; ++r) {
    fs::remove_all(out);
    fs::remove_all(copy);
    settle();
    const auto e = run_child(export_args);
    if (e.status != 0) throw std::runtime_error("export failed: " + export_args.back());
    ex.push_back(e.seconds);
    cpu_export = std::min(cpu_export, e.cpu_seconds);
    rss = std::max(rss, e.max_rss_kb);
    bytes = bytes_of(out);
    settle();
    const auto c = run_child({"cp", "-r", out.string(), copy.string()});
    if (c.status != 0) throw std::runtime_error("cp failed");
    cp.push_back(c.seconds);
    cpu_cp = std::min(cpu_cp, c.cpu_seconds);
    fs::remove_all(copy);
    settle();
    const auto u = run_child({self, "--user-copy", out.string(), copy.string()});
    if (u.status != 0) throw std::runtime_error("user-space copy failed");
    uc.push_back(u.seconds);
  }
  fs::remove_all(out);
  fs::remove_all(copy);
  const double best_export = *std::min_element(ex.begin(), ex.end()), best_cp = *std::min_element(cp.begin(), cp.end());
  const double best_uc = *std::min_element(uc.begin(), uc.end());
  return {{"output_bytes", bytes},
          {"rounds", repeat},
          {"prefault_mb", prefault_mb},
          {"prefault_seconds_median", median(pf)},
          {"export_seconds", best_export},
          {"cp_seconds", best_cp},
          {"user_copy_seconds", best_uc},
          {"export_seconds_median", median(ex)},
          {"cp_seconds_median", median(cp)},
          {"user_copy_seconds_median", median(uc)},
          {"export_seconds_all", ex},
          {"cp_seconds_all", cp},
          {"user_copy_seconds_all", uc},
          {"export_mb_per_s", static_cast<double>(bytes) / best_export / 1e6},
          {"cp_mb_per_s", static_cast<double>(bytes) / best_cp / 1e6},
          {"ratio_to_cp", best_cp / best_export},
          {"ratio_to_cp_median", median(cp) / median(ex)},
          {"ratio_to_user_copy_median", median(uc) / median(ex)},
          {"user_copy_ratio_to_cp_median", median(cp) / median(uc)},
          {"export_cpu_seconds", cpu_export},
          {"cp_cpu_seconds", cpu_cp},
          {"cpu_ratio_to_cp", cpu_cp / cpu_export},
          {"export_peak_rss_mb", static_cast<double>(rss) / 1024.0},
          {"load_average", load_average()}};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "--user-copy") return user_copy(argv[2], argv[3]);
  const std::string self = fs::canonical("/proc/self/exe").string();
  std::vector<double> sizes = {1, 2};
  std::vector<std::string> types = {"f16", "q8_0", "q4_0"}, formats = {"compressed-tensors", "gptq", "awq"};
  fs::path dir = "/tmp/moe-bench-export";
  std::string tool = (fs::path(argv[0]).parent_path() / "moe-tool").string();
  int repeat = 2;
  int64_t prefault_mb = 0;
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
    else if (k == "--prefault-mb") prefault_mb = std::stoll(v);
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
                           dir / "out.gguf", dir / "copy.gguf", repeat, drop, self, prefault_mb);
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
                             drop, self, prefault_mb);
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
