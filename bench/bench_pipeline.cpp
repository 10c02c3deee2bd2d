// Benchmark: memory and time of the pipeline on checkpoints of growing depth. For each layer count
// it writes a synthetic mixtral-layout checkpoint (bench/synthetic_mixtral.h: H 1024, 8 experts of
// width 2816, random bf16 weights; the vocabulary and tokenizer of data/models/mixtral-tiny so the
// calibration text tokenizes) and runs, as child processes, `moe-tool prune --method reap` and
// `moe-tool merge --method hcsmoe` (statistics computed on the calibration text, hidden states
// propagated through the compressed layers; merge with the refit router so the block inputs are
// kept too). Prints JSON: checkpoint bytes, and per command seconds and peak RSS (getrusage of the
// child). Memory bounded by one layer means RSS stays flat while the checkpoint grows.
//   bench_pipeline [--layers 4,8,16] [--windows 16] [--ctx 128] [--dir /tmp/moe-bench-pipeline]
//                  [--source-dir DIR] [--tool path/to/moe-tool]
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "child_process.h"
#include "synthetic_mixtral.h"

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  std::vector<int64_t> layer_counts = {4, 8, 16};
  int64_t windows = 16, ctx = 128;
  fs::path dir = "/tmp/moe-bench-pipeline";
  fs::path src = MOE_BENCH_SOURCE_DIR;
  std::string tool = (fs::path(argv[0]).parent_path() / "moe-tool").string();
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--layers") {
      layer_counts.clear();
      std::stringstream ss(v);
      for (std::string x; std::getline(ss, x, ',');) layer_counts.push_back(std::stoll(x));
    } else if (k == "--windows") windows = std::stoll(v);
    else if (k == "--ctx") ctx = std::stoll(v);
    else if (k == "--dir") dir = v;
    else if (k == "--source-dir") src = v;
    else if (k == "--tool") tool = v;
    else {
      std::cerr << "unknown option " << k << "\n";
      return 2;
    }
  }
  const fs::path tokenizer_from = src / "data/models/mixtral-tiny";
  const fs::path text = src / "data/text/calib.txt";
  nlohmann::json out = {{"benchmark", "pipeline"}, {"windows", windows}, {"ctx", ctx}, {"runs", nlohmann::json::array()}};
  for (int64_t L : layer_counts) {
    moe::bench::Dims D;
    D.L = L;
    D.V = 4096;  // mixtral-tiny's tokenizer
    const fs::path model = dir / ("model-" + std::to_string(L));
    fs::remove_all(dir);
    const uint64_t bytes = moe::bench::write_model(model, D);
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})
      fs::copy_file(tokenizer_from / f, model / f);
    nlohmann::json row = {{"layers", L}, {"checkpoint_bytes", bytes}, {"layer_bytes", D.layer_bytes()}};
    const std::vector<std::pair<std::string, std::vector<std::string>>> commands = {
        {"prune reap 8->6", {"prune", "--method", "reap", "--keep", "6"}},
        {"merge hcsmoe 8->6, refit router", {"merge", "--method", "hcsmoe", "--experts", "6", "--router", "refit"}},
    };
    for (const auto& [name, args] : commands) {
      std::vector<std::string> a = {tool, "--quiet", args[0], model.string(), (dir / "out").string()};
      a.insert(a.end(), args.begin() + 1, args.end());
      for (const std::string& x : {std::string("--text"), text.string(), std::string("--ctx"), std::to_string(ctx),
                                   std::string("--windows"), std::to_string(windows), std::string("--force")})
        a.push_back(x);
      const auto r = moe::bench::run_child(a);
      if (r.status != 0) {
        std::cerr << name << " on " << L << " layers failed with status " << r.status << "\n";
        return 1;
      }
      row[name] = {{"seconds", r.seconds}, {"peak_rss_mb", static_cast<double>(r.max_rss_kb) / 1024.0}};
      std::cerr << L << " layers (" << bytes / 1e9 << " GB), " << name << ": " << r.seconds << " s, peak RSS "
                << r.max_rss_kb / 1024 << " MB\n";
      fs::remove_all(dir / "out");
    }
    out["runs"].push_back(row);
  }
  fs::remove_all(dir);
  std::cout << out.dump(2) << std::endl;
  return 0;
}
