// The synthetic mixtral-layout checkpoint that bench_forward and bench_calibrate both measure:
// random small bf16 weights (seeded xorshift), norms 1.0, written through the project's writer.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <utility>
#include <string>
#include <vector>

#include "io/checkpoint_writer.h"
#include "io/env.h"

namespace moe::bench {

namespace fs = std::filesystem;
using core::DType;

struct Dims {
  int64_t H = 1024, E = 8, k = 2, I = 2816, L = 4, heads = 16, kv = 4, V = 32000;
  int64_t d() const { return H / heads; }
  // Bytes of one decoder layer in bf16.
  uint64_t layer_bytes() const {
    return 2 * static_cast<uint64_t>(E * 3 * H * I + 2 * H * heads * d() + 2 * H * kv * d() + E * H + 2 * H);
  }
};

// Random small bf16 values: sign and mantissa random, exponent around 2^-6 .. 2^-5.
inline void fill_bf16(std::vector<uint8_t>& buf, uint64_t& s) {
  auto* p = reinterpret_cast<uint16_t*>(buf.data());
  for (size_t i = 0; i < buf.size() / 2; ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    const uint16_t sign = (s >> 63) ? 0x8000 : 0;
    const uint16_t exp = static_cast<uint16_t>(121 + ((s >> 40) & 1));
    p[i] = static_cast<uint16_t>(sign | (exp << 7) | ((s >> 20) & 0x7f));
  }
}

// Writes the tensors of `plan` (BF16 or F32) into `dir` (shards of 2 GiB, whole tensors in buffers
// of at most 64 MB): norms (1-D tensors whose name has "norm") 1.0, everything else random small
// values (fill_bf16; F32 tensors hold the same bf16 values widened). Returns the tensor bytes.
inline uint64_t write_weights(const fs::path& dir, const std::vector<moe::io::TensorSpec>& plan) {
  moe::io::CheckpointWriter w(moe::io::Env::posix(), dir, plan, uint64_t(2) << 30);
  uint64_t state = 0x9e3779b97f4a7c15ull, total = 0;
  std::vector<uint8_t> buf, wide;
  for (const auto& t : plan) {
    if (t.dtype != DType::BF16 && t.dtype != DType::F32) throw std::runtime_error("write_weights: BF16 or F32 only");
    const bool f32 = t.dtype == DType::F32;
    const uint64_t n = t.nbytes();
    // bf16 values for `m` bytes of the tensor: half as many bytes when the tensor is F32.
    buf.resize(std::min<uint64_t>(n, uint64_t(64) << 20) / (f32 ? 2 : 1));
    const bool norm = t.shape.size() == 1 && t.name.find("norm") != std::string::npos;
    for (uint64_t off = 0; off < n;) {
      const uint64_t m = std::min<uint64_t>(buf.size() * (f32 ? 2 : 1), n - off);
      if (norm) {  // 1.0
        auto* p = reinterpret_cast<uint16_t*>(buf.data());
        for (size_t i = 0; i < buf.size() / 2; ++i) p[i] = 0x3f80;
      } else {
        fill_bf16(buf, state);
      }
      const uint8_t* src = buf.data();
      if (f32) {
        wide.resize(buf.size() * 2);
        const auto* h = reinterpret_cast<const uint16_t*>(buf.data());
        auto* o = reinterpret_cast<uint32_t*>(wide.data());
        for (size_t i = 0; i < buf.size() / 2; ++i) o[i] = uint32_t(h[i]) << 16;
        src = wide.data();
      }
      w.write(t.name, off, src, m);
      off += m;
    }
    total += n;
  }
  w.finish();
  return total;
}

// Appends a decoder layer's two norms and attention projections (q/k/v biases when `qkv_bias`),
// names prefixed by `p` ("model.layers.<l>.").
inline void add_norms_attention(std::vector<moe::io::TensorSpec>& plan, const Dims& D, const std::string& p, DType dt,
                                bool qkv_bias) {
  auto add = [&](const std::string& n, moe::core::Shape s) { plan.push_back({p + n, dt, s}); };
  add("input_layernorm.weight", {D.H});
  add("post_attention_layernorm.weight", {D.H});
  const std::pair<const char*, int64_t> qkv[] = {{"q", D.heads * D.d()}, {"k", D.kv * D.d()}, {"v", D.kv * D.d()}};
  for (const auto& [name, rows] : qkv) {
    add(std::string("self_attn.") + name + "_proj.weight", {rows, D.H});
    if (qkv_bias) add(std::string("self_attn.") + name + "_proj.bias", {rows});
  }
  add("self_attn.o_proj.weight", {D.H, D.heads * D.d()});
}

// Writes config.json and the weights (write_weights) into `dir`; returns the tensor bytes.
inline uint64_t write_model(const fs::path& dir, const Dims& D) {
  fs::create_directories(dir);
  nlohmann::json cfg = {
      {"architectures", {"MixtralForCausalLM"}}, {"model_type", "mixtral"},
      {"hidden_size", D.H}, {"intermediate_size", D.I}, {"num_hidden_layers", D.L},
      {"num_attention_heads", D.heads}, {"num_key_value_heads", D.kv}, {"num_local_experts", D.E},
      {"num_experts_per_tok", D.k}, {"vocab_size", D.V}, {"max_position_embeddings", 4096},
      {"rms_norm_eps", 1e-5}, {"rope_theta", 1e6}, {"sliding_window", nullptr}, {"hidden_act", "silu"},
      {"tie_word_embeddings", false}, {"torch_dtype", "bfloat16"}};
  moe::io::Env::posix().write_text(dir / "config.json", cfg.dump(2));
  std::vector<moe::io::TensorSpec> plan;
  auto add = [&](const std::string& n, moe::core::Shape s) { plan.push_back({n, DType::BF16, s}); };
  add("model.embed_tokens.weight", {D.V, D.H});
  for (int64_t l = 0; l < D.L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add_norms_attention(plan, D, p, DType::BF16, false);
    add(p + "block_sparse_moe.gate.weight", {D.E, D.H});
    for (int64_t e = 0; e < D.E; ++e) {
      const std::string q = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
      add(q + "w1.weight", {D.I, D.H});
      add(q + "w3.weight", {D.I, D.H});
      add(q + "w2.weight", {D.H, D.I});
    }
  }
  add("model.norm.weight", {D.H});
  add("lm_head.weight", {D.V, D.H});
  return write_weights(dir, plan);
}

}  // namespace moe::bench
