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

#include "io/checkpoint_writer.h"

namespace fs = std::filesystem;
using moe::core::DType;

namespace {

struct RunResult {
  double seconds;
  long max_rss_kb;
  int status;
};

RunResult run(const std::vector<std::string>& args) {
  const auto t0 = std::chrono::steady_clock::now();
  pid_t pid = fork();
  if (pid == 0) {
    FILE* null = std::fopen("/dev/null", "w");
    if (null) dup2(fileno(null), STDOUT_FILENO);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execvp(argv[0], argv.data());
    _exit(127);
  }
  int status = 0;
  struct rusage ru {};
  wait4(pid, &status, 0, &ru);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return {secs, ru.ru_maxrss, WIFEXITED(status) ? WEXITSTATUS(status) : -1};
}

// Fast deterministic bf16-ish filler: small random values (exponent around 2^-6).
void fill(std::vector<uint8_t>& buf, uint64_t& state) {
  auto* p = reinterpret_cast<uint16_t*>(buf.data());
  for (size_t i = 0; i < buf.size() / 2; ++i) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    p[i] = static_cast<uint16_t>(0x3c00u | (state & 0x807fu));
  }
}

uint64_t make_checkpoint(const fs::path& dir, double size_gb) {
  const int64_t H = 2048, I = 5632, E = 8, V = 32000, heads = 16, kv = 8;
  const uint64_t per_layer = (E * 3 * H * I + 2 * H * H + 2 * H * (H / heads * kv) + E * H + 2 * H) * 2;
  const int64_t L = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(size_gb * 1e9 / static_cast<double>(per_layer))));
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::vector<moe::io::TensorSpec> plan;
  auto add = [&](const std::string& n, moe::core::Shape s) { plan.push_back({n, DType::BF16, std::move(s)}); };
  add("model.embed_tokens.weight", {V, H});
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "self_attn.q_proj.weight", {H, H});
    add(p + "self_attn.k_proj.weight", {H / heads * kv, H});
    add(p + "self_attn.v_proj.weight", {H / heads * kv, H});
    add(p + "self_attn.o_proj.weight", {H, H});
    add(p + "input_layernorm.weight", {H});
    add(p + "post_attention_layernorm.weight", {H});
    add(p + "block_sparse_moe.gate.weight", {E, H});
    for (int64_t e = 0; e < E; ++e) {
      const std::string q = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
      add(q + "w1.weight", {I, H});
      add(q + "w3.weight", {I, H});
      add(q + "w2.weight", {H, I});
    }
  }
  add("model.norm.weight", {H});
  add("lm_head.weight", {V, H});
  uint64_t total = 0;
  {
    moe::io::CheckpointWriter w(moe::io::Env::posix(), dir, plan, 2'000'000'000ull);
    std::vector<uint8_t> buf;
    uint64_t state = 0x9e3779b97f4a7c15ull;
    for (const auto& t : plan) {
      const uint64_t n = t.nbytes();
      buf.resize(std::min<uint64_t>(n, 64u << 20));
      for (uint64_t off = 0; off < n; off += buf.size()) {
        const uint64_t m = std::min<uint64_t>(buf.size(), n - off);
        fill(buf, state);
        w.write(t.name, off, buf.data(), m);
      }
      total += n;
    }
    w.finish();
  }
  nlohmann::json cfg = {{"architectures", {"MixtralForCausalLM"}}, {"model_type", "mixtral"}, {"hidden_size", H},
                        {"intermediate_size", I}, {"num_hidden_layers", L}, {"num_attention_heads", heads},
                        {"num_key_value_heads", kv}, {"num_local_experts", E}, {"num_experts_per_tok", 2},
                        {"vocab_size", V}, {"rms_norm_eps", 1e-5}, {"rope_theta", 1e6},
                        {"max_position_embeddings", 4096}, {"tie_word_embeddings", false}, {"torch_dtype", "bfloat16"}};
  moe::io::Env::posix().write_text(dir / "config.json", cfg.dump(2));
  return total;
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
      run({"sync"});  // no dirty pages from earlier steps in either timing
      auto c = run({"cp", "-r", in.string(), cp_out.string()});
      if (c.status != 0) return 1;
      best_cp = std::min(best_cp, c.seconds);
      fs::remove_all(cp_out);
      fs::remove_all(conv_out);
      run({"sync"});
      auto v = run({tool, "--quiet", "convert", in.string(), conv_out.string()});
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
