#include "io/gguf_model.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>

#include "core/error.h"
#include "io/gguf_names.h"
#include "family/family.h"

namespace moe::io {

using core::DType;
using core::Error;
using core::Tensor;
using nlohmann::json;
using quant::GgmlType;

bool has_gguf_name(const fs::path& path) {
  std::string ext = path.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return ext == ".gguf";
}

bool is_gguf_path(const fs::path& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return false;
  if (path.extension() == ".gguf") return true;
  std::ifstream in(path, std::ios::binary);
  uint8_t b[4] = {0, 0, 0, 0};
  in.read(reinterpret_cast<char*>(b), 4);
  if (in.gcount() != 4) return false;
  const uint32_t magic = uint32_t(b[0]) | uint32_t(b[1]) << 8 | uint32_t(b[2]) << 16 | uint32_t(b[3]) << 24;
  return magic == kGgufMagic;
}

int64_t gguf_permuted_source_row(int64_t r, int64_t heads, int64_t rows) {
  const int64_t d = rows / heads, h = r / d, i = (r % d) / 2, s = r % 2;
  return h * d + s * (d / 2) + i;
}

int64_t gguf_permute_heads(const GgufArch& arch, const std::string& role, int64_t heads, int64_t kv_heads) {
  if (!arch.permute_qk) return 0;
  if (role == "q_proj" || role == "q_bias") return heads;
  if (role == "k_proj" || role == "k_bias") return kv_heads;
  return 0;
}

std::string gguf_fused_expert_name(const model::FamilyDesc& fam, const std::string& field) {
  auto stem = [](const std::string& name) {
    const std::string w = ".weight";
    return name.size() > w.size() && name.compare(name.size() - w.size(), w.size(), w) == 0 ? name.substr(0, name.size() - w.size())
                                                                                              : name;
  };
  if (field == "expert_gate") return stem(fam.fused_gate_up) + ".{e}.gate.weight";
  if (field == "expert_up") return stem(fam.fused_gate_up) + ".{e}.up.weight";
  if (field == "expert_down") return stem(fam.fused_down) + ".{e}.weight";
  if (field == "expert_gate_bias") return stem(fam.fused_gate_up) + ".{e}.gate.bias";
  if (field == "expert_up_bias") return stem(fam.fused_gate_up) + ".{e}.up.bias";
  if (field == "expert_down_bias") return stem(fam.fused_down) + ".{e}.bias";
  throw Error::internal("no fused expert field " + field);
}

const model::FamilyDesc& gguf_split_layout(const model::FamilyDesc& fam) {
  static std::mutex mu;
  static std::map<std::string, model::FamilyDesc> split;
  const std::lock_guard<std::mutex> lock(mu);
  auto it = split.find(fam.model_type);
  if (it != split.end()) return it->second;
  model::FamilyDesc f = fam;
  f.expert_gate = gguf_fused_expert_name(fam, "expert_gate");
  f.expert_up = gguf_fused_expert_name(fam, "expert_up");
  f.expert_down = gguf_fused_expert_name(fam, "expert_down");
  f.fused_gate_up.clear();
  f.fused_down.clear();
  return split.emplace(fam.model_type, std::move(f)).first->second;
}

// ---- GgufModel ----

namespace {

std::string arch_key(const GgufArch& arch, const char* key) { return std::string(arch.arch) + "." + key; }

const GgufValue& meta_need(const GgufFile& f, const std::string& key) {
  const GgufValue* v = f.find(key);
  if (!v) throw Error::corruption(f.path().string() + ": metadata key " + key + ": missing");
  return *v;
}

// The shortest decimal that rounds to the same f32 as v: the value config.json held before the
// export stored it as f32 (1e-05, not 9.99999974737875e-06).
double f32_decimal(double v) {
  const float f = static_cast<float>(v);
  for (int p = 1; p <= 9; ++p) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%.*g", p, static_cast<double>(f));
    const double d = std::strtod(buf, nullptr);
    if (static_cast<float>(d) == f) return d;
  }
  return f;
}

const model::FamilyDesc& family_of(const std::string& model_type) {
  for (const auto& f : model::all_families())
    if (f.model_type == model_type) return f;
  throw Error::internal("no family " + model_type);
}

// The family's config key for a {field} of GgufHparam::config_key, or the key itself.
std::string config_key(const model::FamilyDesc& fam, const std::string& k) {
  if (k == "{expert_count}") return fam.expert_count_key;
  if (k == "{topk}") return fam.topk_key;
  if (k == "{expert_width}") return fam.expert_width_key;
  if (k == "{shared_width}") return fam.shared_width_key;
  if (k == "{shared_count}") return fam.shared_count_key;
  if (k == "{dense_lead}")
    return fam.moe_layers == model::MoeLayerRule::StartEndInterval ? "moe_layer_start_index" : "first_k_dense_replace";
  // feed_forward_length is the dense layers' width where the experts have their own key
  // (llama4: intermediate_size_mlp; the others: intermediate_size).
  if (k == "intermediate_size") return fam.dense_width_key;
  if (k == "moe_layer_interval" && fam.moe_layers == model::MoeLayerRule::Interleave) return "interleave_moe_layer_step";
  return k;
}

// The family's name template of an MoE field (io/gguf_names.h gguf_moe_field).
const std::string& moe_template(const model::FamilyDesc& fam, const std::string& field) {
  if (field == "router") return fam.router;
  if (field == "expert_gate") return fam.expert_gate;
  if (field == "expert_up") return fam.expert_up;
  if (field == "expert_down") return fam.expert_down;
  if (field == "shared_gate") return fam.shared_gate;
  if (field == "shared_up") return fam.shared_up;
  if (field == "shared_down") return fam.shared_down;
  if (field == "shared_expert_gate") return fam.shared_expert_gate;
  if (field == "router_bias") return fam.router_bias;
  if (field == "dense_gate") return fam.dense_gate;
  if (field == "dense_up") return fam.dense_up;
  if (field == "dense_down") return fam.dense_down;
  static const std::string none;  // the expert biases: named by gguf_fused_expert_name
  if (field == "expert_gate_bias" || field == "expert_up_bias" || field == "expert_down_bias") return none;
  throw Error::internal("no MoE field " + field);
}

const char* config_torch_dtype(uint32_t file_type) {
  switch (file_type) {
    case 0: return "float32";
    case 1: return "float16";
    default: return "bfloat16";
  }
}

// longrope (GgufArch::longrope) from rope_factors_long / rope_factors_short ([head_dim / 2] f32,
// both or neither), rope.scaling.attn_factor (absent: transformers' default factor, which the
// converter writes) as both windows' mscale, and rope.scaling.original_context_length.
void longrope_config(const GgufFile& f, const GgufArch& arch, json& c, int64_t head_dim) {
  const std::string file = f.path().string(), A = arch.arch;
  const GgufTensorInfo* lf = f.find_tensor(kGgufRopeFactorsLong);
  const GgufTensorInfo* sf = f.find_tensor(kGgufRopeFactorsShort);
  if (!lf && !sf) {
    // llama.cpp multiplies cos and sin by rope.scaling.attn_factor with or without the factors.
    if (f.find(A + ".rope.scaling.attn_factor"))
      throw Error::unsupported(file + ": metadata key " + A + ".rope.scaling.attn_factor: without " + kGgufRopeFactorsLong +
                               " and " + kGgufRopeFactorsShort + " (a longrope) it is not read here");
    return;
  }
  auto factors = [&](const GgufTensorInfo* t, const char* name) {
    if (!t) throw Error::corruption(file + ": tensor " + name + ": missing (the other longrope factors are given)");
    if (t->type != GgmlType::F32 || t->ne.size() != 1 || t->ne[0] != head_dim / 2)
      throw Error::corruption(file + ": tensor " + name + ": expected f32 [" + std::to_string(head_dim / 2) + "] (head_dim / 2)");
    std::vector<float> v(static_cast<size_t>(t->ne[0]));
    std::memcpy(v.data(), f.tensor_data(*t), v.size() * sizeof(float));
    json a = json::array();
    for (size_t i = 0; i < v.size(); ++i) {
      if (!std::isfinite(v[i]) || v[i] <= 0)
        throw Error::corruption(file + ": tensor " + name + ": factor " + std::to_string(i) + " is " + std::to_string(v[i]) +
                                ", expected a positive finite number");
      a.push_back(f32_decimal(v[i]));
    }
    return a;
  };
  json rs = {{"rope_type", "longrope"},
             {"long_factor", factors(lf, kGgufRopeFactorsLong)},
             {"short_factor", factors(sf, kGgufRopeFactorsShort)}};
  if (const GgufValue* a = f.find(A + ".rope.scaling.attn_factor")) {
    const double v = a->as_double(file + ": " + A + ".rope.scaling.attn_factor");
    if (!std::isfinite(v) || v <= 0)
      throw Error::corruption(file + ": metadata key " + A + ".rope.scaling.attn_factor: expected a positive finite number");
    rs["short_mscale"] = rs["long_mscale"] = f32_decimal(v);
  }
  const std::string ok = A + ".rope.scaling.original_context_length";
  const GgufValue* o = f.find(ok);
  if (!o) throw Error::corruption(file + ": metadata key " + ok + ": missing (longrope factors are given)");
  const int64_t orig = o->as_int(file + ": " + ok), max_pos = c.value("max_position_embeddings", int64_t{0});
  if (orig < 1 || (max_pos > 0 && orig > max_pos))
    throw Error::corruption(file + ": metadata key " + ok + ": " + std::to_string(orig) + ", expected 1 to " + A +
                            ".context_length (" + std::to_string(max_pos) + ")");
  c["original_max_position_embeddings"] = orig;
  c["rope_scaling"] = rs;
}

// llama.cpp's llama4 attention as llama4_text config keys (GgufArch::llama4_graph: fixed by its
// loader, no key).
void llama4_config(const GgufFile& f, const GgufArch& arch, json& c) {
  const std::string file = f.path().string();
  const int64_t layers = c.at("num_hidden_layers").get<int64_t>();
  json no_rope = json::array();
  for (int64_t l = 0; l < layers; ++l) no_rope.push_back((l + 1) % 4 != 0 ? 1 : 0);
  c["no_rope_layers"] = no_rope;
  c["attention_chunk_size"] = 8192;
  c["attn_temperature_tuning"] = true;
  c["floor_scale"] = 8192;
  c["attn_scale"] = 0.1;
  c["use_qk_norm"] = c.at("num_local_experts").get<int64_t>() != 128;
  c["attention_bias"] = false;
  c["moe_layers"] = nullptr;
  if (!c.contains("interleave_moe_layer_step"))
    throw Error::corruption(file + ": metadata key " + arch.arch + ".interleave_moe_layer_step: missing");
}

// The llama3 RoPE scaling rope_freqs.weight holds (GgufArch::rope_freqs; absent: none). The
// divisors are 1, then a smoothed band, then the factor (gguf_llama3_rope_divisors). The band is a
// line in 1 / wavelength: s = (orig / wavelength - low) / (high - low) fixes orig / (high - low) and
// low / (high - low), not the three keys, and every triple with the same two gives the same
// divisors. They are given back with low_freq_factor 1 (Llama 3.1's and 3.2's): high_freq_factor
// and original_max_position_embeddings from a least-squares fit of the band's points, rounded
// (f32 decimals, a whole length), and the divisors they give checked against the file's to 1e-5.
// Without a band (Llama 4 Scout's low = high = 1), original_max_position_embeddings is any length
// between the last unscaled and the first scaled wavelength (the geometric mean, rounded, is taken).
// Refused: a single divisor in the band (the line is not determined), divisors that fall, or that
// the fitted keys do not reproduce.
void rope_freqs_config(const GgufFile& f, json& c, int64_t head_dim) {
  const std::string file = f.path().string();
  const GgufTensorInfo* rf = f.find_tensor(kGgufRopeFreqs);
  if (!rf) return;
  const std::string where = file + ": tensor " + std::string(kGgufRopeFreqs) + ": ";
  if (rf->type != GgmlType::F32 || rf->ne.size() != 1 || rf->ne[0] != head_dim / 2)
    throw Error::corruption(where + "expected f32 [" + std::to_string(head_dim / 2) + "] (head_dim / 2)");
  std::vector<float> div(static_cast<size_t>(rf->ne[0]));
  std::memcpy(div.data(), f.tensor_data(*rf), div.size() * sizeof(float));
  const json rs = gguf_llama3_scaling(div, c.at("rope_theta").get<double>(), head_dim, where);
  if (!rs.is_null()) c["rope_scaling"] = rs;
}

}  // namespace

json gguf_llama3_scaling(const std::vector<float>& div, double theta, int64_t head_dim, const std::string& where) {
  const float factor = *std::max_element(div.begin(), div.end());
  std::vector<size_t> band;  // divisors strictly between 1 and the factor
  size_t first = div.size();  // the first divisor equal to the factor
  for (size_t i = 0; i < div.size(); ++i) {
    if (!std::isfinite(div[i]) || div[i] < 1)
      throw Error::corruption(where + "divisor " + std::to_string(i) + " is " + std::to_string(div[i]) + ", expected >= 1");
    if (i > 0 && div[i] < div[i - 1])
      throw Error::unsupported(where + "divisor " + std::to_string(i) + " (" + std::to_string(div[i]) + ") is below divisor " +
                               std::to_string(i - 1) + " (" + std::to_string(div[i - 1]) + "): not a llama3 scaling");
    if (div[i] == factor && first == div.size()) first = i;
    if (div[i] != 1 && div[i] != factor) band.push_back(i);
  }
  if (factor == 1) return nullptr;  // no scaling
  auto wavelength = [&](size_t i) { return gguf_rope_wavelength(theta, head_dim, static_cast<int64_t>(i)); };
  double low = 1, high = 1;
  int64_t orig = 0;
  if (band.empty()) {
    const double hi = wavelength(first), lo = first > 0 ? wavelength(first - 1) : hi / 4;
    orig = static_cast<int64_t>(std::llround(std::sqrt(lo * hi)));
    if (!(double(orig) > lo && double(orig) < hi)) orig = static_cast<int64_t>(std::floor(hi - 1e-9));
  } else {
    if (band.size() < 2)
      throw Error::unsupported(where + "one divisor (" + std::to_string(band[0]) + ": " + std::to_string(div[band[0]]) +
                               ") between 1 and the factor: the llama3 smoothing is not determined by one point");
    // s = A x + B, x = 1 / wavelength: A = orig / (high - low), B = -low / (high - low).
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    for (size_t i : band) {
      const double x = 1 / wavelength(i), y = (1 / double(div[i]) - 1 / double(factor)) / (1 - 1 / double(factor));
      sx += x, sy += y, sxx += x * x, sxy += x * y;
    }
    const double n = double(band.size()), A = (n * sxy - sx * sy) / (n * sxx - sx * sx), B = (sy - A * sx) / n;
    high = 1 - 1 / B;
    orig = static_cast<int64_t>(std::llround(-A / B));
    if (!(B < 0) || !(A > 0) || !(high > 1) || orig <= 0)
      throw Error::unsupported(where + "the divisors between 1 and the factor are not a llama3 smoothing");
    // The fewest significant digits of high_freq_factor that give the file's divisors to f32
    // precision (4, not the fit's 3.9999998).
    for (int p = 1; p <= 9; ++p) {
      char buf[40];
      std::snprintf(buf, sizeof buf, "%.*g", p, high);
      const double h = std::strtod(buf, nullptr);
      const std::vector<float> d = gguf_llama3_rope_divisors(theta, head_dim, factor, low, h, double(orig));
      bool same = true;
      for (size_t i = 0; i < div.size() && same; ++i) same = std::abs(double(d[i]) - double(div[i])) <= 2e-7 * double(div[i]);
      if (same) {
        high = h;
        break;
      }
    }
  }
  const std::vector<float> again = gguf_llama3_rope_divisors(theta, head_dim, factor, low, high, double(orig));
  for (size_t i = 0; i < div.size(); ++i)
    if (std::abs(double(again[i]) - double(div[i])) > 1e-5 * double(div[i]))
      throw Error::unsupported(where + "divisor " + std::to_string(i) + " (" + std::to_string(div[i]) +
                               ") is not what a llama3 scaling gives (factor " + std::to_string(factor) + ", low_freq_factor 1, " +
                               "high_freq_factor " + std::to_string(high) + ", original_max_position_embeddings " +
                               std::to_string(orig) + ": " + std::to_string(again[i]) + ")");
  return {{"rope_type", "llama3"}, {"factor", f32_decimal(factor)}, {"low_freq_factor", low},
          {"high_freq_factor", high}, {"original_max_position_embeddings", orig}};
}

namespace {

// Multi-head Latent Attention (GgufArch::mla): the deepseek2 keys back to config.json (the
// export's mla_keys, pipeline/gguf_export.cpp, backwards). With yarn: llama.cpp's cos/sin factor
// and softmax-scale factor from rope.scaling.attn_factor R and yarn_log_multiplier (0.1 L), given
// back as attention_factor and mscale_all_dim (mscale = mscale_all_dim = L where R is 1, as the
// converter's files have it).
void read_mla_keys(const GgufFile& f, const std::string& A, bool yarn, json& c) {
  const std::string file = f.path().string();
  auto need = [&](const char* key) { return meta_need(f, A + "." + key).as_int(file + ": " + A + "." + key); };
  auto real = [&](const char* key, double fallback) {
    const GgufValue* v = f.find(A + "." + key);
    if (!v) return fallback;
    const double d = v->as_double(file + ": " + A + "." + key);
    if (!std::isfinite(d)) throw Error::corruption(file + ": metadata key " + A + "." + key + ": not a finite number");
    return d;
  };
  const GgufValue* q = f.find(A + ".attention.q_lora_rank");
  c["q_lora_rank"] = q ? json(q->as_int(file + ": " + A + ".attention.q_lora_rank")) : json(nullptr);
  c["kv_lora_rank"] = need("attention.kv_lora_rank");
  const int64_t k = need("attention.key_length_mla"), rope = need("rope.dimension_count");
  if (rope <= 0 || rope >= k || rope % 2 != 0)
    throw Error::corruption(file + ": metadata key " + A + ".rope.dimension_count: " + std::to_string(rope) +
                            " is not an even part of attention.key_length_mla (" + std::to_string(k) + ")");
  c["qk_rope_head_dim"] = rope;
  c["qk_nope_head_dim"] = k - rope;
  c["v_head_dim"] = need("attention.value_length_mla");
  c["num_key_value_heads"] = c.at("num_attention_heads");  // stored as 1: the latent kv head
  if (!yarn) return;
  const double factor = real("rope.scaling.factor", 0);
  if (!(factor > 1)) throw Error::corruption(file + ": metadata key " + A + ".rope.scaling.factor: yarn needs a factor above 1");
  const double R = real("rope.scaling.attn_factor", 1.0), L = real("rope.scaling.yarn_log_multiplier", 0.0) / 0.1;
  const double lnf = std::log(factor), g1 = 1 + 0.1 * lnf;
  json rs = {{"type", "yarn"}, {"factor", f32_decimal(factor)}, {"original_max_position_embeddings", need("rope.scaling.original_context_length")},
             {"beta_fast", 32}, {"beta_slow", 1}};
  if (L != 0 && R == 1) {
    rs["mscale"] = rs["mscale_all_dim"] = f32_decimal(L);
  } else {
    rs["attention_factor"] = L != 0 ? R : R * g1;  // on cos/sin
    const double root = L != 0 ? R * (1 + 0.1 * L * lnf) : R * g1;  // sqrt of the softmax scale's factor
    if (root != 1) rs["mscale_all_dim"] = (root - 1) / (0.1 * lnf);
  }
  c["rope_scaling"] = rs;
}

json build_config(const GgufFile& f, const GgufArch& arch, const model::FamilyDesc& fam) {
  const std::string file = f.path().string();
  const std::string A = arch.arch;
  json c = json::object();
  std::optional<int64_t> rope_dim;  // rope.dimension_count ({rope_dim}): head_dim or the partial rotary width
  // The shared experts' total width where the family counts them in expert widths but the
  // architecture gives the width (ernie4_5-moe: expert_shared_feed_forward_length, no count).
  const bool shared_width_as_count = fam.shared_width_key.empty() && !fam.shared_count_key.empty() && !arch.shared_count;
  std::optional<int64_t> shared_width;
  std::optional<int64_t> ssm_inner;  // ssm.inner_size ({ssm_inner}): linear_num_value_heads x linear_value_head_dim
  c["model_type"] = arch.model_type;
  c["architectures"] = json::array({fam.architectures.empty() ? std::string(arch.model_type) : fam.architectures.front()});
  for_each_gguf_hparam([&](const GgufHparam& h) {
    using W = GgufHparam::When;
    if (!gguf_hparam_applies(h, arch)) return;
    const std::string key = A + "." + h.key;
    // MLA: key/value_length are the absorbed head sizes and rope.dimension_count the rope part
    // (read below).
    if (arch.mla && (std::string(h.config_key) == "head_dim" || std::string(h.config_key) == "{rope_dim}")) return;
    const GgufValue* v = f.find(key);
    if (!v) {
      if (h.when == W::Optional) return;
      throw Error::corruption(file + ": metadata key " + key + ": missing");
    }
    if (std::string(h.config_key) == "{rope_dim}") {
      rope_dim = v->as_int(file + ": " + key);
      if (*rope_dim <= 0 || *rope_dim % 2 != 0)
        throw Error::corruption(file + ": metadata key " + key + ": " + std::to_string(*rope_dim) + ", expected a positive even width");
      return;
    }
    if (std::string(h.config_key) == "{ssm_inner}") {
      ssm_inner = v->as_int(file + ": " + key);
      return;
    }
    if (shared_width_as_count && std::string(h.config_key) == "{shared_width}") {
      shared_width = v->as_int(file + ": " + key);
      return;
    }
    const std::string ck = config_key(fam, h.config_key);
    if (ck.empty())
      throw Error::unsupported(file + ": metadata key " + key + ": the " + fam.model_type + " layout has no config key for it");
    if (h.real) {
      const double d = v->as_double(file + ": " + key);
      // Every real hyper-parameter read (norm epsilon, RoPE base, scales) is a positive number;
      // NaN/Inf would reach config.json as null.
      if (!std::isfinite(d) || d <= 0)
        throw Error::corruption(file + ": metadata key " + key + ": expected a positive finite number, found " +
                                (std::isnan(d) ? std::string("nan") : json(d).dump()));
    }
    if (h.boolean && v->type != GgufValueType::BOOL)
      throw Error::corruption(file + ": metadata key " + key + ": expected a bool");
    const json value = h.boolean ? json(v->integer != 0)
                       : h.real  ? json(f32_decimal(v->as_double(file + ": " + key)))
                                 : json(v->as_int(file + ": " + key));
    if (c.contains(ck) && c[ck] != value)
      throw Error::corruption(file + ": metadata key " + key + ": " + value.dump() + " disagrees with " + c[ck].dump() +
                              " given for " + ck + " by another key");
    c[ck] = value;
  });
  if (const GgufValue* v = f.find(A + ".attention.value_length"); v && c.contains("head_dim") &&
                                                                   v->as_int(file + ": " + A + ".attention.value_length") != c["head_dim"])
    throw Error::unsupported(file + ": metadata key " + A + ".attention.value_length: differs from attention.key_length; "
                             "not read here");
  c["rope_scaling"] = nullptr;
  const GgufValue* rope_type = f.find(A + ".rope.scaling.type");
  // deepseek2's yarn keys are read with its MLA keys (read_mla_keys).
  const bool mla_yarn = arch.mla && rope_type && rope_type->as_string(file + ": " + A + ".rope.scaling.type") == "yarn";
  if (const GgufValue* v = rope_type; v && !mla_yarn && v->as_string(file + ": " + A + ".rope.scaling.type") != "none") {
    if (!arch.yarn || v->str != "yarn")
      throw Error::unsupported(file + ": metadata key " + A + ".rope.scaling.type: '" + v->str + "' is not read yet");
    // yarn (GgufArch::yarn): factor and original context as written; the betas llama.cpp's loader
    // takes as 32 / 1 when absent; transformers' truncate as the family's configs give it (gpt-oss:
    // false, what the export came from; llama.cpp itself always rounds the correction range).
    auto real = [&](const char* key, std::optional<double> dflt) {
      const GgufValue* r = f.find(A + "." + key);
      if (!r && !dflt) throw Error::corruption(file + ": metadata key " + A + "." + key + ": missing (rope.scaling.type yarn)");
      const double d = r ? r->as_double(file + ": " + A + "." + key) : *dflt;
      if (!std::isfinite(d) || d <= 0)
        throw Error::corruption(file + ": metadata key " + A + "." + key + ": expected a positive finite number");
      return f32_decimal(d);
    };
    json rs = {{"rope_type", "yarn"}, {"factor", real("rope.scaling.factor", std::nullopt)},
               {"beta_fast", real("rope.scaling.yarn_beta_fast", 32.0)}, {"beta_slow", real("rope.scaling.yarn_beta_slow", 1.0)}};
    // As the export refuses them (pipeline/gguf_export.cpp refuse_yarn): other betas, which these
    // architectures' loaders do not read, and a factor other than context / original, which
    // transformers' yarn (our forward) would replace by that ratio.
    if (rs["beta_fast"] != 32.0 || rs["beta_slow"] != 1.0)
      throw Error::unsupported(file + ": metadata key " + A + ".rope.scaling.yarn_beta_fast / yarn_beta_slow: " + rs["beta_fast"].dump() +
                               " / " + rs["beta_slow"].dump() + ": llama.cpp's " + A + " uses 32 / 1, which moe-tool would not");
    const std::string ok = A + ".rope.scaling.original_context_length";
    if (const GgufValue* o = f.find(ok)) {
      const int64_t orig = o->as_int(file + ": " + ok), ctx = c.value("max_position_embeddings", int64_t{0});
      rs["original_max_position_embeddings"] = orig;
      if (orig <= 0 || std::abs(double(ctx) / double(orig) - rs["factor"].get<double>()) > 1e-6 * rs["factor"].get<double>())
        throw Error::unsupported(file + ": metadata key " + ok + ": " + std::to_string(orig) + ": context_length / it is not " +
                                 A + ".rope.scaling.factor " + rs["factor"].dump() + " (llama.cpp scales by the factor, " +
                                 "transformers' yarn by that ratio)");
    }
    if (fam.default_rope_parameters.is_object() && fam.default_rope_parameters.contains("truncate"))
      rs["truncate"] = fam.default_rope_parameters["truncate"];
    c["rope_scaling"] = rs;
  }
  // RoPE keys llama.cpp's loader applies for every architecture, which this reader would not:
  // rope.scale_linear and a rope.scaling.factor without a type (both linear scaling), and
  // rope.scaling.attn_factor on cos/sin where the architecture's reading takes none (longrope and
  // deepseek2's yarn read it).
  auto unread_real = [&](const std::string& key) {
    const GgufValue* v = f.find(A + "." + key);
    if (v && v->as_double(file + ": " + A + "." + key) != 1.0)
      throw Error::unsupported(file + ": metadata key " + A + "." + key + ": " + json(v->as_double(file + ": " + A + "." + key)).dump() +
                               ": llama.cpp applies it; not read here");
  };
  unread_real("rope.scale_linear");
  if (!rope_type) unread_real("rope.scaling.factor");
  if (!arch.longrope && !arch.mla) unread_real("rope.scaling.attn_factor");
  if (f.find(A + ".attention.sliding_window") && arch.swa_pattern == 0)
    throw Error::unsupported(file + ": metadata key " + A + ".attention.sliding_window: a sliding window is not read for " + A);
  const GgufTensorInfo* embd = f.find_tensor("token_embd.weight");
  if (!embd || embd->ne.size() != 2) throw Error::corruption(file + ": tensor token_embd.weight: missing or not 2-D");
  c["vocab_size"] = embd->ne[1];
  c["tie_word_embeddings"] = f.find_tensor("output.weight") == nullptr;
  if (arch.swa_pattern > 0) {
    // llama.cpp's pattern (llama_hparams::set_swa_pattern): layer l slides when l % n < n - 1.
    if (!c.contains("sliding_window") || c["sliding_window"].get<int64_t>() <= 0)
      throw Error::corruption(file + ": metadata key " + A + ".attention.sliding_window: missing or 0 (" + A +
                              " slides every other layer)");
    json types = json::array();
    for (int64_t l = 0; l < c.at("num_hidden_layers").get<int64_t>(); ++l)
      types.push_back(l % arch.swa_pattern < arch.swa_pattern - 1 ? "sliding_attention" : "full_attention");
    c["layer_types"] = types;
  } else {
    c["sliding_window"] = nullptr;
  }
  if (arch.mla) read_mla_keys(f, A, mla_yarn, c);
  // The RoPE width: the head's (a rope.dimension_count that says otherwise disagrees), or for a
  // partial-rotary family the rotated share of it (llama.cpp's n_rot; absent: the whole head).
  const int64_t head_dim = c.contains("head_dim") ? c["head_dim"].get<int64_t>()
                                                  : c.at("hidden_size").get<int64_t>() / std::max<int64_t>(1, c.at("num_attention_heads").get<int64_t>());
  // llama.cpp's head width without attention.key_length is n_embd / n_head; a family whose own
  // default differs (qwen3_next: 256) is given it.
  if (fam.default_head_dim != 0 && !c.contains("head_dim")) c["head_dim"] = head_dim;
  if (fam.hybrid_linear_attention) {
    // llama.cpp's qwen3next: the DeltaNet's sizes (required), every 4th layer full attention
    // (full_attention_interval is not read: (i + 1) % 4), an MoE block in every layer.
    for (const char* k : {"linear_conv_kernel_dim", "linear_key_head_dim", "linear_num_key_heads", "linear_num_value_heads"})
      if (!c.contains(k)) throw Error::corruption(file + ": metadata key " + A + ".ssm.*: missing (" + k + ")");
    const int64_t vh = c["linear_num_value_heads"].get<int64_t>();
    if (!ssm_inner || vh <= 0 || *ssm_inner <= 0 || *ssm_inner % vh != 0)
      throw Error::corruption(file + ": metadata key " + A + ".ssm.inner_size: missing or not a multiple of " + A +
                              ".ssm.time_step_rank");
    c["linear_value_head_dim"] = *ssm_inner / vh;
    c["full_attention_interval"] = 4;
    c["decoder_sparse_step"] = 1;
    c["mlp_only_layers"] = json::array();
  }
  if (fam.partial_rotary) {
    const int64_t n_rot = rope_dim.value_or(head_dim);
    const double factor = static_cast<double>(n_rot) / static_cast<double>(head_dim);
    if (n_rot <= 0 || n_rot > head_dim || n_rot % 2 != 0 || static_cast<int64_t>(static_cast<double>(head_dim) * factor) != n_rot)
      throw Error::corruption(file + ": metadata key " + A + ".rope.dimension_count: " + std::to_string(n_rot) +
                              " is not an even part of the head (" + std::to_string(head_dim) + ")");
    c["partial_rotary_factor"] = factor;
  } else if (rope_dim) {
    if (c.contains("head_dim") && c["head_dim"] != *rope_dim)
      throw Error::corruption(file + ": metadata key " + A + ".rope.dimension_count: " + std::to_string(*rope_dim) +
                              " disagrees with " + c["head_dim"].dump() + " given for head_dim by another key");
    c["head_dim"] = *rope_dim;
  }
  if (arch.routing_keys) {
    const std::string gk = A + ".expert_gating_func";
    const bool softmax = fam.routing == model::Routing::DeepSeekV2;  // deepseek2 with softmax gating (gguf_family)
    if (const GgufValue* v = f.find(gk); v && v->as_int(file + ": " + gk) != (softmax ? kGgufGatingSoftmax : kGgufGatingSigmoid))
      throw Error::unsupported(file + ": metadata key " + gk + ": " + std::to_string(v->as_int(file + ": " + gk)) +
                               ": only " + (softmax ? "softmax" : "sigmoid") + " gating (" +
                               std::to_string(softmax ? kGgufGatingSoftmax : kGgufGatingSigmoid) + ") is read for " + A);
    // llama.cpp's defaults for the optional keys: no renormalization, no leading dense layer.
    if (!c.contains("norm_topk_prob")) c["norm_topk_prob"] = false;
  }
  if (shared_width_as_count) {  // absent: no shared expert (llama.cpp's n_ff_shexp 0)
    const int64_t ew = c.at(fam.expert_width_key).get<int64_t>(), w = shared_width.value_or(0);
    if (w < 0 || (ew > 0 && w % ew != 0))
      throw Error::corruption(file + ": metadata key " + A + ".expert_shared_feed_forward_length: " + std::to_string(w) +
                              " is not a multiple of the expert width " + std::to_string(ew));
    c[fam.shared_count_key] = ew > 0 ? w / ew : 0;
  }
  if (arch.leading_dense) {
    const std::string lead = config_key(fam, "{dense_lead}");
    if (!c.contains(lead)) c[lead] = 0;
  }
  // MoE layers from the leading dense ones to the last (llama.cpp: il >= n_layer_dense_lead).
  if (fam.moe_layers == model::MoeLayerRule::StartEndInterval) c["moe_layer_end_index"] = -1;
  const std::string nk = A + ".nextn_predict_layers";
  if (const GgufValue* v = f.find(nk); v && v->as_int(file + ": " + nk) != 0)
    throw Error::unsupported(file + ": metadata key " + nk + ": " + std::to_string(v->as_int(file + ": " + nk)) +
                             " multi-token-prediction layers are not read here");
  if (arch.llama4_graph) llama4_config(f, arch, c);
  if (arch.rope_freqs) rope_freqs_config(f, c, head_dim);
  // granitemoe (softmax over the top-k logits) and llama4 (sigmoid of each) have no norm_topk_prob.
  if (fam.moe && !fam.norm_topk_forced && fam.routing != model::Routing::TopKSoftmax && fam.routing != model::Routing::TopKSigmoid &&
      !c.contains("norm_topk_prob"))
    c["norm_topk_prob"] = arch.renormalizes;
  // A bias whose presence a config key decides (llama's attention_bias): true when stored.
  // Every role a key decides must agree (q/k/v/o biases: all stored or none), else the model read
  // would not be the file's.
  std::map<std::string, std::pair<bool, std::string>> decided;  // key -> (stored, the tensor that decided)
  for (const auto& r : fam.layer_roles)
    if (r.presence.kind == model::Presence::IfConfig && r.presence.key)
      if (const char* g = gguf_layer_name(arch, r.role)) {
        const std::string name = "blk.0." + std::string(g);
        const bool stored = f.find_tensor(name) != nullptr;
        const auto [it, fresh] = decided.emplace(r.presence.key, std::pair{stored, name});
        if (!fresh && it->second.first != stored)
          throw Error::corruption(file + ": tensor " + (stored ? it->second.second : name) + ": missing, but " +
                                  (stored ? name : it->second.second) + " is stored (both or neither: " + r.presence.key + ")");
        if (fresh && !c.contains(r.presence.key)) c[r.presence.key] = stored != r.presence.negate;
      }
  for (const auto& g : fam.globals)  // phimoe's lm_head_bias
    if (g.presence.kind == model::Presence::IfConfig && g.presence.key && !c.contains(g.presence.key))
      if (const char* n = gguf_global_name(g.role)) c[g.presence.key] = (f.find_tensor(n) != nullptr) != g.presence.negate;
  if (arch.sparsemixer_differs)  // absent (a converter's file): transformers' default
    if (const GgufValue* v = f.find(kGgufRouterJitterKey)) {
      const double j = v->as_double(file + ": " + kGgufRouterJitterKey);
      if (!std::isfinite(j) || j < 0) throw Error::corruption(file + ": metadata key " + kGgufRouterJitterKey + ": expected a finite number >= 0");
      c["router_jitter_noise"] = f32_decimal(j);
    }
  if (arch.longrope) longrope_config(f, arch, c, head_dim);
  const GgufValue* ft = f.find("general.file_type");
  c["torch_dtype"] = config_torch_dtype(ft ? static_cast<uint32_t>(ft->as_int(file + ": general.file_type")) : 1);
  for (const char* id : {"bos_token_id", "eos_token_id"})
    if (const GgufValue* v = f.find(std::string("tokenizer.ggml.") + id)) c[id] = v->as_int(file + ": tokenizer.ggml." + id);
  return c;
}

}  // namespace

std::optional<DType> gguf_plain_dtype(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return DType::F32;
    case GgmlType::F16: return DType::F16;
    case GgmlType::BF16: return DType::BF16;
    default: return std::nullopt;
  }
}

std::shared_ptr<const GgufModel> GgufModel::open(Env& env, const fs::path& path) {
  std::shared_ptr<GgufModel> m(new GgufModel());
  m->file_ = std::make_shared<const GgufFile>(GgufFile::open(env, path));
  const GgufFile& f = *m->file_;
  const std::string file = path.string();
  const std::string arch_name = meta_need(f, "general.architecture").as_string(file + ": general.architecture");
  // Experts or not (llama.cpp's "llama" holds both: a dense llama has no expert_count, or 0).
  const GgufValue* count = f.find(arch_name + ".expert_count");
  const bool experts = count && count->as_int(file + ": " + arch_name + ".expert_count") != 0;
  const GgufArch* arch = gguf_arch_for_arch(arch_name, experts);
  if (!arch) {
    if (gguf_arch_for_arch(arch_name, !experts))
      throw Error::unsupported(file + ": metadata key " + arch_name + ".expert_count: " +
                               (experts ? "present, but llama.cpp's " + arch_name + " is a dense architecture here"
                                        : "missing or 0, but llama.cpp's " + arch_name + " is an MoE architecture here"));
    throw Error::unsupported(file + ": general.architecture '" + arch_name + "' is not read here (read: the architectures of " +
                             gguf_exported_model_types() + ")");
  }
  const model::FamilyDesc* famp = &family_of(arch->model_type);
  if (arch->mla) {
    // deepseek2 holds deepseek_v2 (softmax gating; absent: softmax, as llama.cpp reads old files)
    // and deepseek_v3 / kimi_k2 (sigmoid): the gating names the family, deepseek_v3 for sigmoid.
    const GgufValue* g = f.find(arch_name + ".expert_gating_func");
    const bool sigmoid = g && g->as_int(file + ": " + arch_name + ".expert_gating_func") == kGgufGatingSigmoid;
    for (const auto& fd : model::all_families())
      if (fd.gguf && fd.gguf->arch == arch_name && (fd.routing == model::Routing::DeepSeekV3) == sigmoid) {
        famp = &fd;
        arch = &*fd.gguf;
        break;
      }
  }
  const model::FamilyDesc& fam = *famp;
  m->arch_ = arch;
  m->config_ = build_config(f, *arch, fam);
  m->config_text_ = m->config_.dump(2);
  const int64_t n_experts = arch->dense ? 0 : m->config_.at(fam.expert_count_key).get<int64_t>();
  if (!arch->dense && n_experts < 1)
    throw Error::corruption(file + ": metadata key " + arch_key(*arch, "expert_count") + ": " + std::to_string(n_experts) +
                            ", expected at least 1");

  for (const auto& t : f.tensors()) {
    const auto& ti = quant::ggml_type_info(t.type);
    if (!gguf_plain_dtype(t.type) && !ti.codec)
      throw Error::unsupported(file + ": tensor " + t.name + ": type " + ti.name + " has no decoder here (read: " +
                               quant::ggml_codec_names() + ")");
    if (gguf_rope_tensor(*arch, t.name)) continue;  // read as rope_scaling (rope_freqs_config, longrope_config)
    std::string ours;  // our name, {e} for the experts of a stacked tensor
    bool stacked = false, row_vector = false, conv = false;
    int64_t heads = 0;
    GgufValueMap map = GgufValueMap::None;
    if (const char* role = gguf_global_role(t.name)) {
      for (const auto& g : fam.globals)
        if (g.role == role) ours = g.name;
      map = gguf_value_map(fam, role);
    } else if (t.name.rfind("blk.", 0) == 0) {
      const size_t dot = t.name.find('.', 4);
      const std::string idx = dot == std::string::npos ? "" : t.name.substr(4, dot - 4);
      if (!idx.empty() && idx.size() < 7 && idx.find_first_not_of("0123456789") == std::string::npos) {
        const int layer = std::stoi(idx);
        const std::string rest = t.name.substr(dot + 1), prefix = model::expand(fam.layer_prefix, layer);
        if (arch->mla && rest == kGgufMlaVB) {
          if (!f.find_tensor("blk." + idx + "." + kGgufMlaKB))
            throw Error::corruption(file + ": tensor " + t.name + ": no blk." + idx + "." + kGgufMlaKB + " beside it");
          continue;  // read with attn_k_b
        }
        if (arch->mla && rest == kGgufMlaKB) {
          const GgufTensorInfo* vb = f.find_tensor("blk." + idx + "." + kGgufMlaVB);
          const int64_t H = m->config_.at("num_attention_heads").get<int64_t>();
          const int64_t nope = m->config_.at("qk_nope_head_dim").get<int64_t>(), vd = m->config_.at("v_head_dim").get<int64_t>();
          const int64_t L = m->config_.at("kv_lora_rank").get<int64_t>();
          if (t.ne != std::vector<int64_t>{nope, L, H})
            throw Error::corruption(file + ": tensor " + t.name + ": ne " + core::shape_str(t.ne) + ", expected [" + std::to_string(nope) +
                                    ", " + std::to_string(L) + ", " + std::to_string(H) + "] (qk_nope, kv_lora_rank, heads)");
          if (!vb || vb->ne != std::vector<int64_t>{L, vd, H})
            throw Error::corruption(file + ": tensor blk." + idx + "." + kGgufMlaVB + ": " +
                                    (vb ? "ne " + core::shape_str(vb->ne) : std::string("missing")) + ", expected [" +
                                    std::to_string(L) + ", " + std::to_string(vd) + ", " + std::to_string(H) + "]");
          std::string ours_kv;
          for (const auto& r : fam.layer_roles)
            if (r.role == kGgufMlaRole) ours_kv = prefix + r.name;
          TensorInfo info;
          info.name = ours_kv;
          info.dtype = DType::F32;  // decoded when read (tensor())
          info.shape = {H * (nope + vd), L};
          // The stored bytes: both halves where attn_v_b follows attn_k_b (as the export writes
          // them), else attn_k_b's.
          info.begin = t.offset;
          info.end = t.offset + t.nbytes() + (vb->offset == t.offset + t.nbytes() ? vb->nbytes() : 0);
          if (m->index_.count(info.name))
            throw Error::corruption(file + ": tensor " + t.name + ": maps to " + info.name + ", which another tensor also maps to");
          m->index_[info.name] = m->infos_.size();
          m->infos_.push_back(std::move(info));
          m->sources_.push_back({&t, -1, 0, GgufValueMap::None, vb});
          continue;
        }
        if (const char* role = gguf_layer_role(*arch, rest)) {
          for (const auto& r : fam.layer_roles)
            if (r.role == role) ours = prefix + r.name;
          heads = gguf_permute_heads(*arch, role, m->config_.at("num_attention_heads").get<int64_t>(),
                                     m->config_.at("num_key_value_heads").get<int64_t>());
          map = gguf_value_map(fam, role);
          conv = std::string(role) == "conv1d";
        } else if (const char* field = gguf_moe_field(*arch, rest)) {
          const std::string& tmpl = moe_template(fam, field);
          if (!tmpl.empty()) ours = prefix + tmpl;
          stacked = std::strncmp(field, "expert_", 7) == 0;
          // [1, H] / [1, E] on our side, a vector in the file (ernie4_5_moe's moe_statics bias: router_bias_row).
          row_vector = std::string(field) == "shared_expert_gate" || (std::string(field) == "router_bias" && fam.router_bias_row);
          if (ours.empty() && stacked && fam.fused()) ours = prefix + gguf_fused_expert_name(fam, field);
        }
      }
    }
    if (ours.empty() && arch->dense && t.name.rfind("blk.", 0) == 0 && gguf_moe_field(*arch, t.name.substr(t.name.find('.', 4) + 1)))
      throw Error::corruption(file + ": tensor " + t.name + ": an MoE tensor, but metadata key " + arch_name +
                              ".expert_count is missing or 0 (a dense " + fam.model_type + ")");
    if (ours.empty())
      throw Error::corruption(file + ": tensor " + t.name + ": no counterpart in the " + fam.model_type + " layout (arch " +
                              arch_name + ")");
    core::Shape shape(t.ne.rbegin(), t.ne.rend());
    int64_t experts = 1;
    if (stacked) {
      // Stacked weights [in, out, E]; stacked expert biases [out, E].
      const bool bias = t.name.size() > 5 && t.name.compare(t.name.size() - 5, 5, ".bias") == 0;
      const size_t dims = bias ? 2 : 3;
      if (t.ne.size() != dims || t.ne[dims - 1] != n_experts)
        throw Error::corruption(file + ": tensor " + t.name + ": ne " + core::shape_str(t.ne) + ", expected [" +
                                (bias ? "out" : "in, out") + ", " + std::to_string(n_experts) + "] (" + arch_name + ".expert_count)");
      experts = n_experts;
      shape.erase(shape.begin());
    } else if (row_vector && t.ne.size() == 1) {
      shape = {1, t.ne[0]};
    } else if (conv && t.ne.size() == 2) {
      shape = {t.ne[1], 1, t.ne[0]};  // the converter squeezed conv1d's [conv_dim, 1, K]
    }
    if (map != GgufValueMap::None && !gguf_plain_dtype(t.type))
      throw Error::unsupported(file + ": tensor " + t.name + ": type " + ti.name + ": a transformed value (" +
                               (map == GgufValueMap::NegExp ? "-exp(A_log)" : "1 + w") + ") is read from f32/f16/bf16 only");
    if (heads > 0 && (shape[0] % heads != 0 || (shape[0] / heads) % 2 != 0))
      throw Error::corruption(file + ": tensor " + t.name + ": " + std::to_string(shape[0]) + " rows are not " +
                              std::to_string(heads) + " heads of an even size");
    const uint64_t slice = t.nbytes() / static_cast<uint64_t>(experts);
    for (int64_t e = 0; e < experts; ++e) {
      TensorInfo info;
      info.name = stacked ? model::expand(ours, -1, static_cast<int>(e)) : ours;
      info.dtype = gguf_plain_dtype(t.type).value_or(DType::U8);
      info.shape = shape;
      info.begin = t.offset + static_cast<uint64_t>(e) * slice;
      info.end = info.begin + slice;
      if (m->index_.count(info.name))
        throw Error::corruption(file + ": tensor " + t.name + ": maps to " + info.name + ", which another tensor also maps to");
      m->index_[info.name] = m->infos_.size();
      m->infos_.push_back(std::move(info));
      m->sources_.push_back({&t, stacked ? e : -1, heads, map});
    }
  }
  return m;
}

const TensorInfo* GgufModel::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &infos_[it->second];
}

const GgufModel::Source& GgufModel::source(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw Error::not_found(path().string() + ": tensor " + std::string(name) + " not found");
  return sources_[it->second];
}

Tensor GgufModel::tensor(std::string_view name) const {
  const Source& s = source(name);
  const TensorInfo& info = infos_[index_.find(name)->second];
  if (s.mla_v) return mla_kv_b(*s.tensor, *s.mla_v, info.shape);
  const uint8_t* data = file_->tensor_data(*s.tensor) + (info.begin - s.tensor->offset);
  const int64_t cols = s.tensor->ne[0], rows = cols > 0 ? core::shape_numel(info.shape) / cols : 0;
  Tensor t;
  if (auto d = gguf_plain_dtype(s.tensor->type)) {
    t = Tensor(*d, info.shape, data, file_);
  } else {
    const auto rb = static_cast<int64_t>(quant::ggml_row_bytes(s.tensor->type, cols));
    t = Tensor::encoded(std::make_shared<quant::GgufBlocks>(s.tensor->type, cols, Tensor(DType::U8, {rows, rb}, data, file_)), DType::U8);
  }
  if (s.map != GgufValueMap::None) {
    std::vector<float> v = t.to_f32();
    gguf_map_from_file(s.map, v.data(), v.size());
    t = Tensor::from_f32(v, info.shape);
  }
  if (s.permute_heads > 0) {
    // Our row i is stored at the row r whose source row is i (a bias: its values are the rows).
    const int64_t n = info.shape.size() == 1 ? info.shape[0] : rows;
    std::vector<int64_t> order(static_cast<size_t>(n));
    for (int64_t r = 0; r < n; ++r) order[static_cast<size_t>(gguf_permuted_source_row(r, s.permute_heads, n))] = r;
    t = t.take_rows(order);
  }
  return t;
}

// A whole stored tensor decoded to F32 values (rows of ne[0]).
std::vector<float> GgufModel::decoded(const GgufTensorInfo& t) const {
  const uint8_t* data = file_->tensor_data(t);
  const int64_t cols = t.ne[0], n = static_cast<int64_t>(t.numel()), rows = cols > 0 ? n / cols : 0;
  std::vector<float> out(static_cast<size_t>(n));
  if (auto d = gguf_plain_dtype(t.type)) {
    Tensor(*d, {rows, cols}, data, file_).to_f32(out.data());
  } else {
    const auto rb = static_cast<int64_t>(quant::ggml_row_bytes(t.type, cols));
    Tensor::encoded(std::make_shared<quant::GgufBlocks>(t.type, cols, Tensor(DType::U8, {rows, rb}, data, file_)), DType::U8)
        .to_f32(out.data());
  }
  return out;
}

// kv_b_proj [H * (nope + v), L] from attn_k_b (ne [nope, L, H]: kv_b's nope rows transposed) and
// attn_v_b (ne [L, v, H]: its v rows), as llama.cpp's converter split it.
Tensor GgufModel::mla_kv_b(const GgufTensorInfo& kb, const GgufTensorInfo& vb, const core::Shape& shape) const {
  const int64_t nope = kb.ne[0], L = kb.ne[1], H = kb.ne[2], v = vb.ne[1];
  const std::vector<float> k = decoded(kb), vv = decoded(vb);
  auto out = std::make_shared<std::vector<float>>(static_cast<size_t>(H * (nope + v) * L));
  float* o = out->data();
  for (int64_t h = 0; h < H; ++h) {
    float* head = o + h * (nope + v) * L;
    for (int64_t i = 0; i < nope; ++i)
      for (int64_t l = 0; l < L; ++l) head[i * L + l] = k[static_cast<size_t>((h * L + l) * nope + i)];
    std::copy_n(vv.data() + h * v * L, v * L, head + nope * L);
  }
  const auto* bytes = reinterpret_cast<const uint8_t*>(out->data());
  return Tensor(DType::F32, shape, bytes, std::shared_ptr<const void>(out, out.get()));
}

uint64_t GgufModel::total_tensor_bytes() const {
  uint64_t n = 0;
  for (const auto& t : file_->tensors()) n += t.nbytes();
  return n;
}

// ---- tokenizer ----

// tokenizer_config.json: the special tokens by content and whether they are added.
json tokenizer_config_json(const GgufFile& f, const std::vector<GgufValue>& tokens) {
  const std::string file = f.path().string();
  json cfg = json::object();
  for (const char* which : {"bos", "eos"}) {
    const std::string key = std::string("tokenizer.ggml.") + which + "_token_id";
    if (const GgufValue* v = f.find(key)) {
      const int64_t id = v->as_int(file + ": " + key);
      if (id < 0 || id >= static_cast<int64_t>(tokens.size()))
        throw Error::corruption(file + ": metadata key " + key + ": " + std::to_string(id) + " is not a token id (" +
                                std::to_string(tokens.size()) + " tokens)");
      cfg[std::string(which) + "_token"] = tokens[static_cast<size_t>(id)].str;
    }
    const std::string add = std::string("tokenizer.ggml.add_") + which + "_token";
    if (const GgufValue* v = f.find(add)) cfg[std::string("add_") + which + "_token"] = v->integer != 0;
  }
  return cfg;
}

// tokenizer.json for llama.cpp's "llama" (SentencePiece-style) vocabulary, as transformers'
// LlamaConverter writes one: BPE with byte_fallback whose merges are every split of each piece
// into two pieces, the pieces in descending tokenizer.ggml.scores (llama.cpp joins the adjacent pair
// whose joined piece scores highest: the same choice), splits of one piece ordered by their parts'
// ids; "▁" for spaces, prepended when tokenizer.ggml.add_space_prefix (absent: true, llama.cpp's
// default), as llama.cpp does: before the text and after every special token, even where the text
// already starts with a space (the legacy normalizer form, not Metaspace's "first"). The unk token is
// tokenizer.ggml.unknown_token_id's, else the type-2 piece.
json sentencepiece_tokenizer_json(const GgufFile& f, const std::vector<GgufValue>& tokens, const GgufValue* types,
                                  const json& vocab, const json& added) {
  const std::string file = f.path().string();
  const GgufValue& sv = meta_need(f, "tokenizer.ggml.scores");
  if (sv.type != GgufValueType::ARRAY || sv.items.size() != tokens.size())
    throw Error::corruption(file + ": metadata key tokenizer.ggml.scores: expected an array of " + std::to_string(tokens.size()) +
                            " numbers (one per token)");
  std::vector<std::pair<double, int64_t>> order;  // (score, id) of the pieces a join can make
  std::optional<int64_t> unk;
  for (size_t id = 0; id < tokens.size(); ++id) {
    const double score = sv.items[id].as_double(file + ": tokenizer.ggml.scores[" + std::to_string(id) + "]");
    if (!std::isfinite(score))
      throw Error::corruption(file + ": metadata key tokenizer.ggml.scores[" + std::to_string(id) + "]: not a finite number");
    const int64_t ty = types ? types->items[id].as_int(file + ": tokenizer.ggml.token_type[" + std::to_string(id) + "]") : 1;
    if (ty == 1) order.emplace_back(score, static_cast<int64_t>(id));
    if (ty == 2 && !unk) unk = static_cast<int64_t>(id);
  }
  if (const GgufValue* u = f.find("tokenizer.ggml.unknown_token_id")) {
    const int64_t id = u->as_int(file + ": tokenizer.ggml.unknown_token_id");
    if (id < 0 || id >= static_cast<int64_t>(tokens.size()))
      throw Error::corruption(file + ": metadata key tokenizer.ggml.unknown_token_id: " + std::to_string(id) + " is not a token id");
    unk = id;
  }
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  json merges = json::array();
  for (const auto& [score, id] : order) {
    const std::string& piece = tokens[static_cast<size_t>(id)].str;
    std::vector<std::tuple<int64_t, int64_t, size_t>> splits;  // (left id, right id, cut)
    for (size_t k = 1; k < piece.size(); ++k) {
      if ((static_cast<unsigned char>(piece[k]) & 0xC0) == 0x80) continue;  // inside a UTF-8 character
      const auto l = vocab.find(piece.substr(0, k)), r = vocab.find(piece.substr(k));
      if (l != vocab.end() && r != vocab.end()) splits.emplace_back(l->get<int64_t>(), r->get<int64_t>(), k);
    }
    std::sort(splits.begin(), splits.end());
    for (const auto& [l, r, k] : splits) merges.push_back(json::array({piece.substr(0, k), piece.substr(k)}));
  }
  const GgufValue* sp = f.find("tokenizer.ggml.add_space_prefix");
  if (sp && sp->type != GgufValueType::BOOL)
    throw Error::corruption(file + ": metadata key tokenizer.ggml.add_space_prefix: expected a bool");
  const bool prefix = !sp || sp->integer != 0;
  // llama.cpp prepends "▁" to the text and after every special token, whatever the text starts
  // with: the normalizer Prepend("▁") (applied to each piece between special tokens) + Replace.
  json normalizers = json::array();
  if (prefix) normalizers.push_back({{"type", "Prepend"}, {"prepend", "\u2581"}});
  normalizers.push_back({{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\u2581"}});
  json decoders = json::array({{{"type", "Replace"}, {"pattern", {{"String", "\u2581"}}}, {"content", " "}},
                               {{"type", "ByteFallback"}}, {{"type", "Fuse"}}});
  if (prefix) decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added},
          {"normalizer", {{"type", "Sequence"}, {"normalizers", normalizers}}},
          {"pre_tokenizer", nullptr},
          {"post_processor", nullptr},
          {"decoder", {{"type", "Sequence"}, {"decoders", decoders}}},
          {"model",
           {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", unk ? json(tokens[static_cast<size_t>(*unk)].str) : json(nullptr)},
            {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr}, {"fuse_unk", true}, {"byte_fallback", true},
            {"ignore_merges", false}, {"vocab", vocab}, {"merges", merges}}}};
}

GgufTokenizerText gguf_tokenizer_json(const GgufFile& f) {
  const std::string file = f.path().string();
  const std::string model = meta_need(f, "tokenizer.ggml.model").as_string(file + ": tokenizer.ggml.model");
  if (model != "gpt2" && model != "llama")
    throw Error::unsupported(file + ": tokenizer.ggml.model '" + model +
                             "': only gpt2 (byte-level BPE) and llama (SentencePiece-style BPE) are read here");
  const bool spm = model == "llama";
  const std::string pre = spm ? std::string() : meta_need(f, "tokenizer.ggml.pre").as_string(file + ": tokenizer.ggml.pre");
  const std::vector<const char*>* splits = spm ? nullptr : gguf_pre_tokenizer_splits(pre);
  if (!spm && !splits) {
    std::string known;
    for (const auto& p : gguf_pre_tokenizers()) known += (known.empty() ? "" : ", ") + std::string(p.name);
    throw Error::unsupported(file + ": tokenizer.ggml.pre '" + pre + "': no Split regex known for it here (known: " + known + ")");
  }
  auto strings = [&](const char* key) -> const std::vector<GgufValue>& {
    const GgufValue& v = meta_need(f, key);
    if (v.type != GgufValueType::ARRAY || v.elem != GgufValueType::STRING)
      throw Error::corruption(file + ": metadata key " + std::string(key) + ": expected an array of strings");
    return v.items;
  };
  const auto& tokens = strings("tokenizer.ggml.tokens");
  // llama.cpp's n_vocab is the token count, and its loader requires token_embd of that many rows.
  if (const GgufTensorInfo* embd = f.find_tensor("token_embd.weight");
      embd && embd->ne.size() == 2 && embd->ne[1] != static_cast<int64_t>(tokens.size()))
    throw Error::corruption(file + ": metadata key tokenizer.ggml.tokens: " + std::to_string(tokens.size()) +
                            " tokens, but token_embd.weight has " + std::to_string(embd->ne[1]) +
                            " rows (llama.cpp requires one token per row)");
  static const std::vector<GgufValue> none;
  const auto& merges = spm ? none : strings("tokenizer.ggml.merges");
  const GgufValue* types = f.find("tokenizer.ggml.token_type");
  if (types && (types->type != GgufValueType::ARRAY || types->items.size() != tokens.size()))
    throw Error::corruption(file + ": metadata key tokenizer.ggml.token_type: expected an array of " +
                            std::to_string(tokens.size()) + " integers (one per token)");
  json vocab = json::object(), added = json::array();
  for (size_t id = 0; id < tokens.size(); ++id) {
    const int64_t ty = types ? types->items[id].as_int(file + ": tokenizer.ggml.token_type[" + std::to_string(id) + "]") : 1;
    const std::string& tok = tokens[id].str;
    // llama.cpp's llama_token_type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    if (ty < 1 || ty > 6 || (ty == 6 && !gguf_byte_piece(tok)))
      throw Error::corruption(file + ": metadata key tokenizer.ggml.token_type[" + std::to_string(id) + "]: " + std::to_string(ty) +
                              (ty == 6 ? " (byte) for '" + tok + "', which is not <0xXX>"
                                       : " is not a token type read here (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)"));
    if (ty == 5) continue;  // unused (padding rows)
    if (ty == 3 || ty == 4 || (spm && ty == 2)) {
      added.push_back({{"id", id}, {"content", tok}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                       {"normalized", false}, {"special", ty != 4}});
      if (!spm) continue;  // SentencePiece: in the vocabulary too, as transformers' conversion keeps them
    }
    if (vocab.contains(tok))
      throw Error::corruption(file + ": metadata key tokenizer.ggml.tokens: token " + std::to_string(id) + " repeats token " +
                              vocab[tok].dump());
    vocab[tok] = id;
  }
  json merge_list = json::array();
  for (const auto& mv : merges) merge_list.push_back(mv.str);
  if (spm) {
    const json tj = sentencepiece_tokenizer_json(f, tokens, types, vocab, added);
    try {
      return {tj.dump(), tokenizer_config_json(f, tokens).dump()};
    } catch (const json::exception&) {
      throw Error::corruption(file + ": metadata key tokenizer.ggml.tokens: a string is not valid UTF-8");
    }
  }
  const json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}};
  json pretokenizers = json::array();
  for (const char* regex : *splits)
    pretokenizers.push_back({{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}});
  pretokenizers.push_back(byte_level);
  json tj = {{"version", "1.0"},
             {"truncation", nullptr},
             {"padding", nullptr},
             {"added_tokens", added},
             {"normalizer", nullptr},
             {"pre_tokenizer", {{"type", "Sequence"}, {"pretokenizers", pretokenizers}}},
             {"post_processor", byte_level},
             {"decoder", byte_level},
             {"model",
              {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
               {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"vocab", vocab},
               {"merges", merge_list}}}};
  try {
    return {tj.dump(), tokenizer_config_json(f, tokens).dump()};
  } catch (const json::exception&) {
    throw Error::corruption(file + ": metadata keys tokenizer.ggml.tokens / merges: a string is not valid UTF-8");
  }
}

}  // namespace moe::io
