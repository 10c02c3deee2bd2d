// Benchmark: fp32 CPU forward (prefill) throughput against the machine's measured sgemm peak,
// with the wall time of every phase of the forward (runtime/profile.h) and the process's CPU time.
// Two synthetic shapes (random weights written with the project's checkpoint writer into a temp
// folder), run through runtime::Forward as eval runs it (layer-sequential: per layer dequantise,
// attention, routed experts, no observers):
//   --shape mixtral (default): mixtral layout, hidden 1024, 8 experts top-2, expert width 2816,
//     4 layers, 16 heads / 4 kv heads (head_dim 64), vocab 32000, bf16 weights; 4 windows of ctx 512.
//   --shape small: qwen2_moe layout with many small experts, hidden 256, 16 experts top-4, expert
//     width 512, a shared expert of width 1024 with its sigmoid gate, 4 layers, 4 heads / 2 kv
//     heads (head_dim 64, q/k/v biases), vocab 4096, f32 weights; 8 windows of ctx 256.
// Prints JSON:
//   sgemm peak (GFLOP/s, cblas_sgemm on square 1024..2048 matrices, OpenBLAS threads = --threads),
//   prefill tokens/s and achieved GFLOP/s counting every matmul FLOP (q/k/v/o projections,
//   QK^T and AV over the causal triangle, router, routed experts (top-k only), shared expert and
//   its gate, lm head), the ratio achieved / peak, the MoE block's own GFLOP/s (router, experts,
//   shared expert over the time of those phases), the per-phase wall seconds of the fastest run
//   (`other`: wall minus the timed phases) and its process CPU time (user + sys) over wall, and the
//   cores the process could get before and after the runs (`threads` threads spinning 0.5 s: CPU
//   time over wall; below `threads` when other work shares the machine).
//   bench_forward [--shape mixtral|small] [--windows N] [--ctx T] [--threads 2] [--dir /tmp] [--repeat 3]
//                 [--keep-model DIR] [--codecs LIST] [--tool path/to/moe-tool]
// --codecs (comma-separated; e.g. int4:g128,ternary-tq,sub1bit) also writes the synthetic model
// with its expert and dense MLP weights encoded by `moe-tool quantize --method rtn --codec C`
// (`sub1bit`: ternary-minmax:row with --sub1bit, QMoE's dictionary codes) and times each encoded
// model in the same repeats as the source (runs alternate: source, then each codec), printing under
// "encoded" its tokens/s, its ratio to the source's, its phase times, its weight bytes and the rate
// at which its routed experts decode to f32 on one thread (the source's beside it).
// --keep-model writes the synthetic checkpoint into DIR (which must not exist) and keeps it, so the
// same weights can be run elsewhere, e.g. exported to an F32 GGUF (copy a tokenizer in first:
// data/tokenizer/* for vocab 4096; export pads the vocabulary up to the embedding rows) and timed by
// llama.cpp (docs/benchmarks.md).
#include <cblas.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "child_process.h"
#include "flags.h"
#include "io/checkpoint.h"
#include "sgemm_peak.h"
#include "synthetic_mixtral.h"
#include "io/checkpoint_writer.h"
#include "io/env.h"
#include "model/model.h"
#include "runtime/forward.h"
#include "runtime/profile.h"

namespace fs = std::filesystem;
using moe::core::DType;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Process CPU seconds (user + sys) so far.
double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  auto sec = [](const timeval& t) { return double(t.tv_sec) + 1e-6 * double(t.tv_usec); };
  return sec(u.ru_utime) + sec(u.ru_stime);
}

// Cores this process gets right now: `threads` threads spin for `seconds`; process CPU time over
// wall. Near `threads` on a quiet machine; lower when other work shares the cores (then no
// cpu_over_wall of the forward can exceed it either).
double cores_available(int threads, double seconds) {
  std::vector<std::thread> ts;
  const double c0 = cpu_seconds();
  auto t0 = Clock::now();
  for (int i = 0; i < threads; ++i)
    ts.emplace_back([&] {
      volatile double x = 0;
      while (seconds_since(t0) < seconds)
        for (int j = 0; j < 10000; ++j) x = x + 1.0;
    });
  for (auto& t : ts) t.join();
  return (cpu_seconds() - c0) / seconds_since(t0);
}

// Every routed expert weight of m converted to f32 (Tensor::to_f32, as the forward's conversion
// does before its finite check) on one thread: G parameters per second, best of 3 passes.
double expert_decode_gparams(const moe::model::Model& m) {
  std::vector<float> buf;
  double best = 1e30;
  int64_t params = 0;
  for (int rep = 0; rep < 3; ++rep) {
    params = 0;
    const auto t0 = Clock::now();
    for (const auto& l : m.layers()) {
      if (!l.moe) continue;
      for (const auto& e : l.moe->experts)
        e.for_each_tensor([&](const moe::core::Tensor& t) {
          if (static_cast<int64_t>(buf.size()) < t.numel()) buf.resize(static_cast<size_t>(t.numel()));
          t.to_f32(buf.data());
          params += t.numel();
        });
    }
    best = std::min(best, seconds_since(t0));
  }
  return double(params) / best / 1e9;
}

using moe::bench::sgemm_gflops;
using moe::bench::Dims;

// A benchmark model: the mixtral Dims plus a shared expert (width 0: none) and the layout.
struct Shape {
  std::string name, family;
  Dims D;
  int64_t shared = 0;  // shared expert width (qwen2_moe)
  DType dtype = DType::BF16;
  int64_t windows = 4, ctx = 512;
};

Shape mixtral_shape() { return {"mixtral", "mixtral", Dims{}, 0, DType::BF16, 4, 512}; }

Shape small_shape() {
  Shape s{"small", "qwen2_moe", Dims{}, 1024, DType::F32, 8, 256};
  s.D.H = 256;
  s.D.E = 16;
  s.D.k = 4;
  s.D.I = 512;
  s.D.L = 4;
  s.D.heads = 4;
  s.D.kv = 2;
  s.D.V = 4096;
  return s;
}

// The qwen2_moe-layout checkpoint of `S` (transformers' Qwen2MoeForCausalLM names).
void write_qwen2_moe(const fs::path& dir, const Shape& S) {
  const Dims& D = S.D;
  fs::create_directories(dir);
  nlohmann::json cfg = {
      {"architectures", {"Qwen2MoeForCausalLM"}}, {"model_type", "qwen2_moe"}, {"hidden_size", D.H},
      {"intermediate_size", S.shared}, {"moe_intermediate_size", D.I}, {"shared_expert_intermediate_size", S.shared},
      {"num_hidden_layers", D.L}, {"num_attention_heads", D.heads}, {"num_key_value_heads", D.kv},
      {"num_experts", D.E}, {"num_experts_per_tok", D.k}, {"norm_topk_prob", false}, {"decoder_sparse_step", 1},
      {"mlp_only_layers", nlohmann::json::array()}, {"vocab_size", D.V}, {"max_position_embeddings", 4096},
      {"rms_norm_eps", 1e-6}, {"rope_theta", 1e6}, {"use_sliding_window", false}, {"hidden_act", "silu"},
      {"tie_word_embeddings", false}, {"torch_dtype", "float32"}};
  moe::io::Env::posix().write_text(dir / "config.json", cfg.dump(2));
  std::vector<moe::io::TensorSpec> plan;
  auto add = [&](const std::string& n, moe::core::Shape s) { plan.push_back({n, S.dtype, s}); };
  auto mlp = [&](const std::string& q, int64_t width) {
    add(q + "gate_proj.weight", {width, D.H});
    add(q + "up_proj.weight", {width, D.H});
    add(q + "down_proj.weight", {D.H, width});
  };
  add("model.embed_tokens.weight", {D.V, D.H});
  for (int64_t l = 0; l < D.L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    moe::bench::add_norms_attention(plan, D, p, S.dtype, true);
    add(p + "mlp.gate.weight", {D.E, D.H});
    for (int64_t e = 0; e < D.E; ++e) mlp(p + "mlp.experts." + std::to_string(e) + ".", D.I);
    mlp(p + "mlp.shared_expert.", S.shared);
    add(p + "mlp.shared_expert_gate.weight", {1, D.H});
  }
  add("model.norm.weight", {D.H});
  add("lm_head.weight", {D.V, D.H});
  moe::bench::write_weights(dir, plan);
}

struct Flops {
  double total = 0, moe = 0;  // moe: router, routed experts, shared expert and gate
};

// Matmul FLOPs of one window of T tokens.
Flops flops_per_window(const Shape& S, int64_t T) {
  const Dims& D = S.D;
  const double t = double(T), H = double(D.H), d = double(D.d());
  const double proj = 2.0 * t * H * double(2 * D.heads * D.d() + 2 * D.kv * D.d());
  const double causal = t * (t + 1) / 2.0;  // query-key pairs actually needed
  const double attn = 2.0 * 2.0 * double(D.heads) * d * causal;  // QK^T and AV
  const double router = 2.0 * t * H * double(D.E);
  const double experts = t * double(D.k) * 3.0 * 2.0 * H * double(D.I);
  const double shared = S.shared ? t * (3.0 * 2.0 * H * double(S.shared) + 2.0 * H) : 0.0;
  const double moe = router + experts + shared;
  const double head = 2.0 * t * H * double(D.V);
  return {double(D.L) * (proj + attn + moe) + head, double(D.L) * moe};
}

}  // namespace

int main(int argc, char** argv) {
  int64_t windows = 0, ctx = 0, repeat = 3;
  int threads = 2;
  std::string shape_name = "mixtral";
  fs::path base = fs::temp_directory_path();
  fs::path keep;
  std::vector<std::string> codecs;
  std::string tool = (fs::path(argv[0]).parent_path() / "moe-tool").string();
  const char* prog = "bench_forward";
  using moe::bench::bad_flag;
  using moe::bench::flag_int;
  for (int i = 1; i < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::printf("bench_forward [--shape mixtral|small] [--windows N] [--ctx T] [--threads 2] [--dir /tmp] [--repeat 3]\n"
                  "              [--keep-model DIR] [--codecs LIST] [--tool path/to/moe-tool]   (see the source's header)\n");
      return 0;
    }
    if (i + 1 >= argc) bad_flag(prog, a + ": expected a value");
    const std::string v = argv[i + 1];
    if (a == "--windows") windows = flag_int(prog, a, v, 1);
    else if (a == "--ctx") ctx = flag_int(prog, a, v, 2);
    else if (a == "--threads") threads = static_cast<int>(flag_int(prog, a, v, 1));
    else if (a == "--repeat") repeat = flag_int(prog, a, v, 1);
    else if (a == "--dir") base = v;
    else if (a == "--shape") shape_name = v;
    else if (a == "--keep-model") keep = v;
    else if (a == "--tool") tool = v;
    else if (a == "--codecs") {
      for (size_t at = 0; at <= v.size();) {
        const size_t comma = std::min(v.find(',', at), v.size());
        if (comma > at) codecs.push_back(v.substr(at, comma - at));
        at = comma + 1;
      }
      if (codecs.empty()) bad_flag(prog, "--codecs: expected a comma-separated list of codecs, got '" + v + "'");
    } else {
      bad_flag(prog, "unknown option " + a);
    }
  }
  if (!fs::is_directory(base)) bad_flag(prog, "--dir: " + base.string() + " is not a directory");
  if (shape_name != "mixtral" && shape_name != "small") {
    std::fprintf(stderr, "--shape: expected mixtral or small, found %s\n", shape_name.c_str());
    return 2;
  }
  const Shape S = shape_name == "small" ? small_shape() : mixtral_shape();
  const Dims& D = S.D;
  if (windows <= 0) windows = S.windows;
  if (ctx <= 0) ctx = S.ctx;
  moe::runtime::set_blas_threads(threads);
  nlohmann::json out;
  out["threads"] = threads;
  nlohmann::json by_size;
  double peak = 0;
  for (int n : {1024, 1536, 2048}) {
    const double g = sgemm_gflops(n, 3);
    by_size[std::to_string(n)] = g;
    peak = std::max(peak, g);
  }
  out["sgemm_gflops_by_size"] = by_size;
  out["sgemm_peak_gflops"] = peak;

  if (!keep.empty() && fs::exists(keep)) {
    std::fprintf(stderr, "--keep-model: %s exists\n", keep.c_str());
    return 2;
  }
  const fs::path dir = keep.empty() ? base / ("moe-bench-forward-" + std::to_string(::getpid())) : keep;
  auto t0 = Clock::now();
  try {
    if (S.family == "mixtral") moe::bench::write_model(dir, D);
    else write_qwen2_moe(dir, S);
  } catch (const std::exception& e) {
    std::error_code ec;
    fs::remove_all(dir, ec);
    std::fprintf(stderr, "bench_forward: writing the model into %s: %s\n", dir.c_str(), e.what());
    return 1;
  }
  out["model_write_seconds"] = seconds_since(t0);
  // Encoded copies of the model (removed at the end with it).
  std::vector<fs::path> encoded_dirs;
  auto remove_all_models = [&] {
    for (const auto& d : encoded_dirs) fs::remove_all(d);
  };
  try {
    for (const auto& c : codecs) {
      const fs::path edir = dir.string() + "-codec" + std::to_string(encoded_dirs.size());
      encoded_dirs.push_back(edir);
      std::vector<std::string> args = {tool, "-q", "quantize", dir.string(), edir.string(), "--method", "rtn", "--codec",
                                       c == "sub1bit" ? std::string("ternary-minmax:row") : c};
      if (c == "sub1bit") args.push_back("--sub1bit");
      const auto r = moe::bench::run_child(args);
      if (r.status != 0) {  // moe-tool said why on stderr
        remove_all_models();
        fs::remove_all(dir);
        bad_flag(prog, "--codecs " + c + ": moe-tool quantize failed (exit " + std::to_string(r.status) + ")");
      }
    }
    struct Run {
      std::string name;
      std::unique_ptr<moe::io::Checkpoint> ckpt;
      std::unique_ptr<moe::model::Model> model;
      std::unique_ptr<moe::runtime::Forward> fwd;
      double best = 1e30, best_cpu = 0;
      std::vector<double> runs, cpu_ratio;
      moe::runtime::PhaseTimes best_phases;
      uint64_t weight_bytes = 0;
      double decode_gparams = 0;  // routed experts' weights to f32, one thread, G params/s
    };
    std::vector<Run> models;
    auto add_model = [&](const std::string& name, const fs::path& d) {
      Run r;
      r.name = name;
      r.ckpt = std::make_unique<moe::io::Checkpoint>(moe::io::Checkpoint::open(moe::io::Env::posix(), d));
      r.model = std::make_unique<moe::model::Model>(moe::model::Model::load(*r.ckpt));
      r.fwd = std::make_unique<moe::runtime::Forward>(*r.model);
      for (const auto& f : fs::directory_iterator(d))
        if (f.path().extension() == ".safetensors") r.weight_bytes += fs::file_size(f.path());
      r.decode_gparams = expert_decode_gparams(*r.model);
      models.push_back(std::move(r));
    };
    add_model("source", dir);
    for (size_t i = 0; i < codecs.size(); ++i) add_model(codecs[i], encoded_dirs[i]);
    std::vector<int32_t> tokens(size_t(windows * ctx));
    std::mt19937 g(5);
    for (auto& t : tokens) t = static_cast<int32_t>(g() % D.V);
    const double cores_before = cores_available(threads, 0.5);
    for (int64_t r = 0; r < repeat; ++r)
      for (auto& m : models) {
        moe::runtime::PhaseTimes phases;
        moe::runtime::set_phase_times(&phases);
        const double c0 = cpu_seconds();
        auto t1 = Clock::now();
        (void)m.fwd->run_kept(tokens, ctx);
        const double s = seconds_since(t1);
        const double cpu = cpu_seconds() - c0;
        moe::runtime::set_phase_times(nullptr);
        m.runs.push_back(s);
        m.cpu_ratio.push_back(cpu / s);
        if (s < m.best) {
          m.best = s;
          m.best_phases = phases;
          m.best_cpu = cpu;
        }
      }
    const Run& src = models.front();
    const double best = src.best, best_cpu = src.best_cpu;
    const moe::runtime::PhaseTimes& best_phases = src.best_phases;
    const std::vector<double>& runs = src.runs;
    const std::vector<double>& cpu_ratio = src.cpu_ratio;
    auto phases_json = [](const Run& m) {
      nlohmann::json j;
      for (int p = 0; p < static_cast<int>(moe::runtime::Phase::Count); ++p)
        j[moe::runtime::phase_name(static_cast<moe::runtime::Phase>(p))] = m.best_phases.seconds[p];
      j["other"] = m.best - m.best_phases.total();
      return j;
    };
    if (models.size() > 1) {
      nlohmann::json enc = nlohmann::json::array();
      for (size_t i = 1; i < models.size(); ++i) {
        const Run& m = models[i];
        enc.push_back({{"codec", m.name}, {"tokens_per_second", double(windows * ctx) / m.best},
                       {"ratio_to_source", src.best / m.best}, {"run_seconds", m.runs},
                       {"cpu_over_wall", m.best_cpu / m.best}, {"weight_bytes", m.weight_bytes},
                       {"expert_decode_gparams_per_second", m.decode_gparams},
                       {"breakdown_seconds", phases_json(m)}});
      }
      out["encoded"] = enc;
      out["source_weight_bytes"] = src.weight_bytes;
      out["source_expert_decode_gparams_per_second"] = src.decode_gparams;
    }
    using moe::runtime::Phase;
    out["breakdown_seconds"] = phases_json(src);
    out["cores_available_before_after"] = {cores_before, cores_available(threads, 0.5)};
    // Peak again after the run (the machine may be shared): the higher of the two is the peak.
    for (int n : {1024, 1536, 2048}) peak = std::max(peak, sgemm_gflops(n, 3));
    out["sgemm_peak_gflops"] = peak;
    const Flops f1 = flops_per_window(S, ctx);
    const double flops = f1.total * double(windows), moe_flops = f1.moe * double(windows);
    auto sec = [&](Phase p) { return best_phases.seconds[static_cast<int>(p)]; };
    const double moe_seconds =
        sec(Phase::Router) + sec(Phase::ExpertGemms) + sec(Phase::GatherScatter) + sec(Phase::SharedExpert);
    out["model"] = {{"shape", S.name}, {"family", S.family}, {"hidden", D.H}, {"experts", D.E}, {"top_k", D.k},
                    {"expert_width", D.I}, {"shared_expert_width", S.shared}, {"layers", D.L},
                    {"heads", D.heads}, {"kv_heads", D.kv}, {"vocab", D.V},
                    {"weights", S.dtype == DType::F32 ? "f32" : "bf16 (dequantised per layer to f32)"}};
    out["windows"] = windows;
    out["ctx"] = ctx;
    out["tokens"] = windows * ctx;
    out["run_seconds"] = runs;
    out["cpu_over_wall_by_run"] = cpu_ratio;
    out["seconds"] = best;
    out["cpu_over_wall"] = best_cpu / best;
    out["tokens_per_second"] = double(windows * ctx) / best;
    out["gflop_per_token"] = flops / double(windows * ctx) / 1e9;
    out["flop_count"] =
        "q/k/v/o projections, QK^T and AV over the causal triangle, router, top-k experts, shared expert and gate, lm head";
    out["achieved_gflops"] = flops / best / 1e9;
    out["ratio_to_peak"] = flops / best / 1e9 / peak;
    out["moe_block_gflops"] = moe_flops / moe_seconds / 1e9;
    out["moe_block_ratio_to_peak"] = moe_flops / moe_seconds / 1e9 / peak;
  } catch (const std::exception& e) {
    remove_all_models();
    fs::remove_all(dir);  // a kept model too: it may be half written
    std::fprintf(stderr, "bench_forward: %s\n", e.what());
    return 1;
  }
  remove_all_models();
  if (keep.empty()) fs::remove_all(dir);
  else out["model_dir"] = dir.string();
  std::cout << out.dump(2) << "\n";
  return 0;
}
