// Benchmark: `moe-tool upcycle` (copy, E experts) of a synthetic dense llama checkpoint next to
// `cp` of a file of the output's size, same run. Prints JSON: wall time and throughput (output
// bytes / s) of both, the ratio, and upcycle's peak RSS (getrusage of the child) for each dense
// size given (default 0.5 and 1 GB, so one sees RSS does not grow with the checkpoint).
//   bench_upcycle [--sizes-gb 0.5,1] [--experts 4] [--method copy] [--dir /tmp/moe-bench-upcycle]
//                 [--tool path/to/moe-tool] [--repeat 1]
#include <cmath>
#include <cstdio>
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

// A dense llama checkpoint of about size_gb (H 2048, I 5632, 16 heads, 8 KV heads, V 32000).
uint64_t make_dense(const fs::path& dir, double size_gb) {
  moe::bench::Dims D;
  D.H = 2048;
  D.I = 5632;
  D.heads = 16;
  D.kv = 8;
  const double layer = 2.0 * static_cast<double>(3 * D.H * D.I + 2 * D.H * D.H + 2 * D.H * D.kv * D.d() + 2 * D.H);
  const double head = 2.0 * 2.0 * static_cast<double>(D.V * D.H);
  D.L = std::max<int64_t>(1, static_cast<int64_t>(std::llround((size_gb * 1e9 - head) / layer)));
  fs::remove_all(dir);
  fs::create_directories(dir);
  nlohmann::json cfg = {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}, {"hidden_size", D.H},
                        {"intermediate_size", D.I}, {"num_hidden_layers", D.L}, {"num_attention_heads", D.heads},
                        {"num_key_value_heads", D.kv}, {"vocab_size", D.V}, {"max_position_embeddings", 4096},
                        {"rms_norm_eps", 1e-5}, {"rope_theta", 1e4}, {"hidden_act", "silu"},
                        {"tie_word_embeddings", false}, {"torch_dtype", "bfloat16"}};
  moe::io::Env::posix().write_text(dir / "config.json", cfg.dump(2));
  std::vector<moe::io::TensorSpec> plan;
  auto add = [&](const std::string& n, moe::core::Shape s) { plan.push_back({n, DType::BF16, s}); };
  add("model.embed_tokens.weight", {D.V, D.H});
  for (int64_t l = 0; l < D.L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {D.H});
    add(p + "post_attention_layernorm.weight", {D.H});
    add(p + "self_attn.q_proj.weight", {D.heads * D.d(), D.H});
    add(p + "self_attn.k_proj.weight", {D.kv * D.d(), D.H});
    add(p + "self_attn.v_proj.weight", {D.kv * D.d(), D.H});
    add(p + "self_attn.o_proj.weight", {D.H, D.heads * D.d()});
    add(p + "mlp.gate_proj.weight", {D.I, D.H});
    add(p + "mlp.up_proj.weight", {D.I, D.H});
    add(p + "mlp.down_proj.weight", {D.H, D.I});
  }
  add("model.norm.weight", {D.H});
  add("lm_head.weight", {D.V, D.H});
  moe::io::CheckpointWriter w(moe::io::Env::posix(), dir, plan, uint64_t(2) << 30);
  uint64_t state = 0x9e3779b97f4a7c15ull, total = 0;
  std::vector<uint8_t> buf;
  for (const auto& t : plan) {
    const uint64_t n = t.nbytes();
    buf.resize(std::min<uint64_t>(n, uint64_t(64) << 20));
    for (uint64_t off = 0; off < n; off += buf.size()) {
      const uint64_t m = std::min<uint64_t>(buf.size(), n - off);
      if (t.shape.size() == 1) {
        auto* q = reinterpret_cast<uint16_t*>(buf.data());
        for (size_t i = 0; i < m / 2; ++i) q[i] = 0x3f80;
      } else {
        moe::bench::fill_bf16(buf, state);
      }
      w.write(t.name, off, buf.data(), m);
    }
    total += n;
  }
  w.finish();
  return total;
}

uint64_t dir_bytes(const fs::path& d) {
  uint64_t n = 0;
  for (const auto& e : fs::directory_iterator(d))
    if (e.is_regular_file() && e.path().extension() == ".safetensors") n += e.file_size();
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<double> sizes = {0.5, 1.0};
  fs::path dir = "/tmp/moe-bench-upcycle";
  std::string tool = (fs::path(argv[0]).parent_path() / "moe-tool").string();
  std::string experts = "4", method = "copy";
  int repeat = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--sizes-gb") {
      sizes.clear();
      std::stringstream ss(v);
      for (std::string x; std::getline(ss, x, ',');) sizes.push_back(std::stod(x));
    } else if (k == "--dir") dir = v;
    else if (k == "--tool") tool = v;
    else if (k == "--experts") experts = v;
    else if (k == "--method") method = v;
    else if (k == "--repeat") repeat = std::stoi(v);
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  nlohmann::json out = {{"benchmark", "upcycle"}, {"experts", std::stoi(experts)}, {"method", method},
                        {"runs", nlohmann::json::array()}};
  for (double gb : sizes) {
    const fs::path in = dir / "dense", up = dir / "upcycled", cp_out = dir / "cp-out";
    std::fprintf(stderr, "generating %.2f GB synthetic dense checkpoint in %s ...\n", gb, in.c_str());
    const uint64_t dense_bytes = make_dense(in, gb);
    double best_up = 1e30, best_cp = 1e30;
    long rss = 0;
    uint64_t out_bytes = 0;
    for (int r = 0; r < repeat; ++r) {
      fs::remove_all(up);
      run_child({"sync"});
      auto u = run_child({tool, "--quiet", "upcycle", in.string(), up.string(), "--to", "mixtral", "--experts", experts,
                          "--top-k", "2", "--method", method});
      if (u.status != 0) {
        std::fprintf(stderr, "upcycle failed with status %d\n", u.status);
        return 1;
      }
      best_up = std::min(best_up, u.seconds);
      rss = std::max(rss, u.max_rss_kb);
      out_bytes = dir_bytes(up);
      // cp of the output's bytes (the upcycled shards themselves), same run.
      fs::remove_all(cp_out);
      run_child({"sync"});
      std::vector<std::string> args = {"cp"};
      for (const auto& e : fs::directory_iterator(up))
        if (e.path().extension() == ".safetensors") args.push_back(e.path().string());
      fs::create_directories(cp_out);
      args.push_back(cp_out.string());
      auto c = run_child(args);
      if (c.status != 0) return 1;
      best_cp = std::min(best_cp, c.seconds);
      fs::remove_all(cp_out);
      fs::remove_all(up);
    }
    out["runs"].push_back({{"dense_bytes", dense_bytes},
                           {"output_bytes", out_bytes},
                           {"upcycle_seconds", best_up},
                           {"cp_seconds", best_cp},
                           {"upcycle_MBps", out_bytes / best_up / 1e6},
                           {"cp_MBps", out_bytes / best_cp / 1e6},
                           {"throughput_ratio_vs_cp", best_cp / best_up},
                           {"upcycle_peak_rss_MB", rss / 1024.0}});
    fs::remove_all(in);
  }
  fs::remove_all(dir);
  std::cout << out.dump(2) << std::endl;
  return 0;
}
