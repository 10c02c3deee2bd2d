// Writes a synthetic checkpoint at a chosen shape (bench/synthetic_checkpoint.h: random bf16 or
// block-scaled FP8 weights, the mixtral, qwen3_moe or deepseek_v3 layout) with the bundled
// byte-level BPE tokenizer of data/tokenizer (vocabulary 4096, so the embeddings stay small and
// data/text tokenizes), and prints JSON describing it: the shapes, parameters, checkpoint bytes,
// one decoder layer's bf16 bytes and the per-layer fp64 Gram reference E*(H^2+I^2)*8.
//   bench_synth --out DIR [--family mixtral|qwen3_moe|deepseek_v3] [--experts 8] [--hidden 1024]
//               [--width 2816] [--top-k 2] [--layers 2] [--heads 16] [--kv-heads 4] [--head-dim 0]
//               [--dtype bf16|fp8] [--force] [--source-dir DIR]
// Exit 2 (one line on stderr, nothing written) for a bad flag or an existing DIR without --force;
// --force replaces DIR.
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "flags.h"
#include "synthetic_checkpoint.h"

namespace fs = std::filesystem;

namespace {

[[noreturn]] void bad(const std::string& msg) { moe::bench::bad_flag("bench_synth", msg); }

// Shape flags: at least 1 (--head-dim at least 0: 0 = hidden / heads).
int64_t parse_int(const std::string& flag, const std::string& v) {
  return moe::bench::flag_int("bench_synth", flag, v, flag == "--head-dim" ? 0 : 1);
}

}  // namespace

int main(int argc, char** argv) {
  moe::bench::SynthSpec s;
  s.D.L = 2;
  fs::path out, src = MOE_BENCH_SOURCE_DIR;
  bool force = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--force") {
      force = true;
      continue;
    }
    if (i + 1 >= argc) bad(a + ": needs a value");
    const std::string v = argv[++i];
    if (a == "--out") out = v;
    else if (a == "--family") s.family = v;
    else if (a == "--dtype") s.dtype = v;
    else if (a == "--source-dir") src = v;
    else if (a == "--experts") s.D.E = parse_int(a, v);
    else if (a == "--hidden") s.D.H = parse_int(a, v);
    else if (a == "--width") s.D.I = parse_int(a, v);
    else if (a == "--top-k") s.D.k = parse_int(a, v);
    else if (a == "--layers") s.D.L = parse_int(a, v);
    else if (a == "--heads") s.D.heads = parse_int(a, v);
    else if (a == "--kv-heads") s.D.kv = parse_int(a, v);
    else if (a == "--head-dim") s.D.head_dim = parse_int(a, v);
    else bad("unknown option " + a);
  }
  if (out.empty()) bad("--out: required (the folder to write)");
  const fs::path tokenizer = src / "data/tokenizer";
  if (!fs::exists(tokenizer / "tokenizer.json"))
    bad("--source-dir: " + (tokenizer / "tokenizer.json").string() + " not found");
  s.D.V = 4096;  // data/tokenizer's vocabulary
  try {
    moe::bench::check_spec(s);
  } catch (const std::invalid_argument& e) {
    bad(e.what());
  }
  if (fs::exists(out) && !force) bad("--out: " + out.string() + " exists (--force replaces it)");
  {  // --force never removes the tokenizer it copies from
    const std::string o = fs::weakly_canonical(out).string(), t = fs::weakly_canonical(tokenizer).string();
    if (t == o || t.starts_with(o + "/")) bad("--out: " + out.string() + " holds the input tokenizer " + tokenizer.string());
  }
  fs::remove_all(out);
  uint64_t bytes = 0;
  try {
    bytes = moe::bench::write_synthetic(out, s, tokenizer);
  } catch (const std::exception& e) {
    fs::remove_all(out);
    std::fprintf(stderr, "bench_synth: %s: %s\n", out.string().c_str(), e.what());
    return 1;
  }
  const auto& D = s.D;
  uint64_t params = 0;
  for (const auto& t : moe::bench::synth_plan_bf16(s)) params += static_cast<uint64_t>(moe::core::shape_numel(t.shape));
  nlohmann::ordered_json j = {
      {"out", out.string()}, {"family", s.family}, {"dtype", s.dtype}, {"layers", D.L}, {"hidden", D.H},
      {"experts", D.E}, {"top_k", D.k}, {"expert_width", D.I}, {"heads", D.heads}, {"kv_heads", D.kv},
      {"head_dim", D.d()}, {"vocab", D.V}, {"params", params}, {"checkpoint_bytes", bytes},
      {"layer_bf16_bytes", moe::bench::layer_bf16_bytes(s)},
      {"per_layer_gram_bytes", moe::bench::per_layer_gram_bytes(D)}};
  std::cout << j.dump(2) << "\n";
  return 0;
}
