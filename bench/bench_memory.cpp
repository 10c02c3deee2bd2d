// Peak memory of the calibrated passes at real expert counts and widths (issue 25). For each shape
// it writes a synthetic checkpoint (bench/synthetic_checkpoint.h: random weights, the bundled
// tokenizer of data/tokenizer) into a temporary folder and runs the real CLI as child processes:
//   quantize   moe-tool quantize IN OUT --method gptq --codec int4
//   factorize  moe-tool factorize IN OUT --method svdllm --ratio 0.25
// both calibrated on the first --windows windows of --ctx tokens of data/text/calib.txt. Per run:
// peak RSS (getrusage of the child, so not this process), wall and CPU seconds, exit status, and
// the child's last stderr line when it failed (a flag the CLI does not know yet exits 2: reported
// as a failure, never as a figure). Per shape: the checkpoint bytes, one decoder layer's bf16
// bytes, and the fp64 Grams of every expert of a layer held at once, E*(H^2+I^2)*8 bytes, the
// reference the peak RSS is compared against. Per pair of shapes differing only in the expert
// count: the peak RSS ratio (flat memory: close to 1 as experts double).
//   --budget SIZE passes --memory-budget SIZE to every run. --spill runs every shape and command
//   twice, without a budget and with --memory-budget --spill-budget (default 1MB, which forces the
//   calibration activations to a memory-mapped file), and prints the wall and CPU ratio spilled /
//   in RAM.
// Shapes (--shape FAMILY:EXPERTS:WIDTH:HIDDEN:TOPK, repeatable; heads of dim 128, kv heads a
// quarter of them): by default qwen3_moe:64:1408:2048:8, qwen3_moe:128:1408:2048:8 and
// mixtral:16:8192:2048:2; --quick: qwen3_moe:8:352:512:2 and qwen3_moe:16:352:512:2 (under a
// minute: a test of the benchmark itself).
//   bench_memory [--quick] [--shape ...] [--commands quantize,factorize] [--layers 1] [--dtype bf16|fp8]
//                [--windows 4] [--ctx 256] [--budget SIZE] [--spill] [--spill-budget 1MB]
//                [--dir /tmp] [--tool path/to/moe-tool] [--source-dir DIR]
// Exit status: 0 every run succeeded; 1 a run failed (the JSON says which and why); 2 a bad flag.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "child_process.h"
#include "flags.h"
#include "io/checkpoint_writer.h"
#include "synthetic_checkpoint.h"

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace {

[[noreturn]] void bad(const std::string& msg) { moe::bench::bad_flag("bench_memory", msg); }

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> v;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, sep);) v.push_back(x);
  return v;
}

int64_t parse_int(const std::string& what, const std::string& v) { return moe::bench::flag_int("bench_memory", what, v, 1); }

// FAMILY:EXPERTS:WIDTH:HIDDEN:TOPK, heads of dimension 128 (at least one), kv heads a quarter.
moe::bench::SynthSpec parse_shape(const std::string& text, int64_t layers, const std::string& dtype) {
  const auto f = split(text, ':');
  if (f.size() != 5) bad("--shape: expected FAMILY:EXPERTS:WIDTH:HIDDEN:TOPK, got '" + text + "'");
  moe::bench::SynthSpec s;
  s.family = f[0];
  s.dtype = dtype;
  auto& D = s.D;
  D.E = parse_int("--shape " + text + ": experts", f[1]);
  D.I = parse_int("--shape " + text + ": width", f[2]);
  D.H = parse_int("--shape " + text + ": hidden", f[3]);
  D.k = parse_int("--shape " + text + ": top-k", f[4]);
  D.L = layers;
  D.V = 4096;  // data/tokenizer's vocabulary
  D.head_dim = 128;
  D.heads = std::max<int64_t>(1, D.H / 128);
  D.kv = std::max<int64_t>(1, D.heads / 4);
  if (D.heads % D.kv != 0) D.kv = 1;
  try {
    moe::bench::check_spec(s);
  } catch (const std::invalid_argument& e) {
    bad("--shape " + text + ": " + e.what());
  }
  return s;
}

std::string label(const moe::bench::SynthSpec& s) {
  return s.family + " E" + std::to_string(s.D.E) + " I" + std::to_string(s.D.I) + " H" + std::to_string(s.D.H) + " k" +
         std::to_string(s.D.k);
}

// The last non-empty line of a file ("" when none).
std::string last_line(const fs::path& p) {
  std::ifstream in(p);
  std::string line, last;
  while (std::getline(in, line))
    if (line.find_first_not_of(" \t\r") != std::string::npos) last = line;
  return last;
}

double mb(long kb) { return static_cast<double>(kb) / 1024.0; }

}  // namespace

int main(int argc, char** argv) {
  fs::path src = MOE_BENCH_SOURCE_DIR, base = fs::temp_directory_path();
  std::string tool = (fs::path(argv[0]).parent_path() / "moe-tool").string();
  std::vector<std::string> shape_texts, commands = {"quantize", "factorize"};
  std::string dtype = "bf16", spill_budget = "1MB";
  std::optional<std::string> budget;
  int64_t layers = 1, windows = 4, ctx = 256;
  bool quick = false, spill = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      quick = true;
      continue;
    }
    if (a == "--spill") {
      spill = true;
      continue;
    }
    if (i + 1 >= argc) bad(a + ": needs a value");
    const std::string v = argv[++i];
    if (a == "--shape") shape_texts.push_back(v);
    else if (a == "--commands") commands = split(v, ',');
    else if (a == "--layers") layers = parse_int(a, v);
    else if (a == "--dtype") dtype = v;
    else if (a == "--windows") windows = parse_int(a, v);
    else if (a == "--ctx") ctx = parse_int(a, v);
    else if (a == "--budget") budget = v;
    else if (a == "--spill-budget") spill_budget = v;
    else if (a == "--dir") base = v;
    else if (a == "--tool") tool = v;
    else if (a == "--source-dir") src = v;
    else bad("unknown option " + a);
  }
  for (const auto& c : commands)
    if (c != "quantize" && c != "factorize") bad("--commands: '" + c + "' is not quantize or factorize");
  for (const auto& [flag, v] : {std::pair<std::string, std::optional<std::string>>{"--budget", budget},
                                {"--spill-budget", spill_budget}}) {
    if (!v) continue;
    try {
      moe::io::parse_size(*v);
    } catch (const std::exception& e) {
      bad(flag + ": " + e.what());
    }
  }
  if (spill && budget) bad("--spill: runs without a budget and with --spill-budget; drop --budget");
  if (shape_texts.empty())
    shape_texts = quick ? std::vector<std::string>{"qwen3_moe:8:352:512:2", "qwen3_moe:16:352:512:2"}
                        : std::vector<std::string>{"qwen3_moe:64:1408:2048:8", "qwen3_moe:128:1408:2048:8",
                                                   "mixtral:16:8192:2048:2"};
  std::vector<moe::bench::SynthSpec> shapes;
  for (const auto& t : shape_texts) shapes.push_back(parse_shape(t, layers, dtype));
  const fs::path text = src / "data/text/calib.txt", tokenizer = src / "data/tokenizer";
  if (!fs::exists(text)) bad("--source-dir: " + text.string() + " not found");
  if (!fs::exists(tokenizer / "tokenizer.json")) bad("--source-dir: " + (tokenizer / "tokenizer.json").string() + " not found");
  if (!fs::exists(tool)) bad("--tool: " + tool + " not found");

  const fs::path dir = base / ("moe-bench-memory-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  // Budget settings each shape and command runs under: the label in the JSON and the value passed.
  std::vector<std::optional<std::string>> settings = {budget};
  if (spill) settings = {std::nullopt, spill_budget};

  json out = {{"benchmark", "memory"},
              {"tool", tool},
              {"machine_ram_gb", static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE)) / 1e9},
              {"calibration", {{"text", "data/text/calib.txt"}, {"windows", windows}, {"ctx", ctx}}},
              {"layers", layers},
              {"dtype", dtype},
              {"shapes", json::array()},
              {"runs", json::array()}};
  // (command, budget label, shape index) -> run row index in out["runs"].
  std::map<std::tuple<std::string, std::string, size_t>, size_t> row_of;
  int failed = 0;
  for (size_t si = 0; si < shapes.size(); ++si) {
    const auto& s = shapes[si];
    const fs::path model = dir / "model";
    fs::remove_all(model);
    uint64_t bytes = 0;
    try {
      bytes = moe::bench::write_synthetic(model, s, tokenizer);
    } catch (const std::exception& e) {
      fs::remove_all(dir);
      std::fprintf(stderr, "bench_memory: writing %s: %s\n", label(s).c_str(), e.what());
      return 1;
    }
    const uint64_t grams = moe::bench::per_layer_gram_bytes(s.D);
    out["shapes"].push_back({{"label", label(s)}, {"family", s.family}, {"experts", s.D.E}, {"expert_width", s.D.I},
                             {"hidden", s.D.H}, {"top_k", s.D.k}, {"heads", s.D.heads}, {"kv_heads", s.D.kv},
                             {"head_dim", s.D.d()}, {"checkpoint_bytes", bytes},
                             {"layer_bf16_bytes", moe::bench::layer_bf16_bytes(s)},
                             {"per_layer_gram_bytes", grams}});
    for (const auto& cmd : commands) {
      for (const auto& setting : settings) {
        std::vector<std::string> a = {tool, "--quiet", cmd, model.string(), (dir / "out").string()};
        const std::vector<std::string> method = cmd == "quantize"
                                                    ? std::vector<std::string>{"--method", "gptq", "--codec", "int4"}
                                                    : std::vector<std::string>{"--method", "svdllm", "--ratio", "0.25"};
        a.insert(a.end(), method.begin(), method.end());
        for (const std::string& x : {std::string("--text"), text.string(), std::string("--ctx"), std::to_string(ctx),
                                     std::string("--windows"), std::to_string(windows), std::string("--force")})
          a.push_back(x);
        if (setting) {
          a.push_back("--memory-budget");
          a.push_back(*setting);
        }
        const fs::path err = dir / "stderr.txt";
        const auto r = moe::bench::run_child(a, err.string());
        fs::remove_all(dir / "out");
        const std::string what = cmd + " " + method[1];
        json row = {{"shape", label(s)}, {"command", what}, {"memory_budget", setting ? json(*setting) : json(nullptr)},
                    {"status", r.status}, {"signal", r.signal}, {"seconds", r.seconds}, {"cpu_seconds", r.cpu_seconds},
                    {"peak_rss_mb", mb(r.max_rss_kb)},
                    {"peak_rss_over_per_layer_grams", static_cast<double>(r.max_rss_kb) * 1024.0 / static_cast<double>(grams)}};
        if (r.status != 0) {
          ++failed;
          row["error"] = r.signal ? "killed by signal " + std::to_string(r.signal) : last_line(err);
          // A failed run's time and memory are not figures of the pass.
          for (const char* k : {"seconds", "cpu_seconds", "peak_rss_mb", "peak_rss_over_per_layer_grams"}) row[k] = nullptr;
        }
        std::cerr << label(s) << ", " << what << (setting ? " --memory-budget " + *setting : std::string()) << ": ";
        if (r.status == 0)
          std::cerr << r.seconds << " s (" << r.cpu_seconds << " s CPU), peak RSS " << mb(r.max_rss_kb) << " MB (per-layer Grams "
                    << static_cast<double>(grams) / 1048576.0 << " MB)\n";
        else
          std::cerr << "FAILED (status " << r.status << "): " << row["error"].get<std::string>() << "\n";
        row_of[{what, setting.value_or(""), si}] = out["runs"].size();
        out["runs"].push_back(row);
      }
    }
    fs::remove_all(model);
  }
  fs::remove_all(dir);

  // Peak RSS ratios between shapes that differ only in the expert count (more experts / fewer).
  json ratios = json::array();
  const json runs = out["runs"];  // a copy: adding keys to `out` below may move its members
  for (const auto& [key, i] : row_of) {
    const auto& [what, setting, si] = key;
    for (size_t sj = 0; sj < shapes.size(); ++sj) {
      const auto &A = shapes[si].D, &B = shapes[sj].D;
      if (shapes[si].family != shapes[sj].family || A.H != B.H || A.I != B.I || A.k != B.k || B.E <= A.E) continue;
      const json &ra = runs[i], &rb = runs[row_of.at({what, setting, sj})];
      const bool ok = ra["status"] == 0 && rb["status"] == 0;
      ratios.push_back({{"command", what}, {"memory_budget", ra["memory_budget"]}, {"from", label(shapes[si])},
                        {"to", label(shapes[sj])}, {"experts_ratio", static_cast<double>(B.E) / static_cast<double>(A.E)},
                        {"peak_rss_ratio", ok ? json(rb["peak_rss_mb"].get<double>() / ra["peak_rss_mb"].get<double>())
                                              : json(nullptr)}});
    }
  }
  out["peak_rss_ratios"] = ratios;
  if (spill) {
    json sp = json::array();
    for (const auto& [key, i] : row_of) {
      const auto& [what, setting, si] = key;
      if (!setting.empty()) continue;
      const json &in_ram = runs[i], &spilled = runs[row_of.at({what, spill_budget, si})];
      const bool ok = in_ram["status"] == 0 && spilled["status"] == 0;
      auto ratio = [&](const char* k) {
        return ok ? json(spilled[k].get<double>() / in_ram[k].get<double>()) : json(nullptr);
      };
      sp.push_back({{"shape", in_ram["shape"]}, {"command", what}, {"spill_budget", spill_budget},
                    {"wall_ratio_spilled_over_in_ram", ratio("seconds")},
                    {"cpu_ratio_spilled_over_in_ram", ratio("cpu_seconds")},
                    {"peak_rss_ratio_spilled_over_in_ram", ratio("peak_rss_mb")}});
    }
    out["spill"] = sp;
  }
  out["failed_runs"] = failed;
  std::cout << out.dump(2) << "\n";
  if (failed) std::fprintf(stderr, "bench_memory: %d run(s) failed (see \"error\" in the JSON)\n", failed);
  return failed ? 1 : 0;
}
