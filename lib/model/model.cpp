#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <set>

#include "core/error.h"
#include "core/warn.h"
#include "io/gguf_model.h"
#include "quant/registry.h"

namespace moe::model {

const char* const kNoviceEncoding = "novice";

using core::DType;
using core::Error;
using core::Shape;

bool is_moe_layer(const FamilyDesc& f, const Config& c, int layer) {
  if (!f.moe) return false;
  switch (f.moe_layers) {
    case MoeLayerRule::All: return true;
    case MoeLayerRule::SparseStep: {
      const auto only = c.get_int_list_or("mlp_only_layers", {});
      if (std::find(only.begin(), only.end(), layer) != only.end()) return false;
      const int64_t step = c.get_int_or("decoder_sparse_step", 1, false);
      return (layer + 1) % step == 0;
    }
    case MoeLayerRule::FirstKDense: {
      const int64_t first = c.get_int_or("first_k_dense_replace", 0);
      const int64_t freq = c.get_int_or("moe_layer_freq", 1, false);
      return layer >= first && layer % freq == 0;
    }
  }
  return true;
}

namespace {

bool is_float(DType t) { return core::dtype_info(t).is_float && t != DType::F8_E4M3 && t != DType::F8_E5M2; }

// Collects tensors from the checkpoint, remembering which names were used.
// quantization_config {"quant_method": "fp8", "weight_block_size": [br, bc]}: the block size of
// the checkpoint's block-scaled FP8 weights, or nullopt when the config has no fp8 quantization.
std::optional<std::pair<int64_t, int64_t>> fp8_block_size(const Config& c) {
  const nlohmann::json& j = c.json();
  if (!j.contains("quantization_config") || !j.at("quantization_config").is_object()) return std::nullopt;
  const nlohmann::json& q = j.at("quantization_config");
  if (q.value("quant_method", "") != "fp8") return std::nullopt;
  const std::string where = c.source() + ": quantization_config";
  if (!q.contains("weight_block_size"))
    throw Error::unsupported(where + ": fp8 without weight_block_size (per-tensor FP8 scales) is not supported; only "
                             "block-scaled FP8 (weight_scale_inv) is");
  const nlohmann::json& b = q.at("weight_block_size");
  if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || !b[1].is_number_integer() ||
      b[0].get<int64_t>() < 1 || b[1].get<int64_t>() < 1)
    throw Error::corruption(where + ".weight_block_size: expected two positive integers, found " + b.dump());
  if (q.contains("fmt") && q.at("fmt") != "e4m3")
    throw Error::unsupported(where + ".fmt: " + q.at("fmt").dump() + " (only e4m3 block-scaled FP8 is read)");
  return std::make_pair(b[0].get<int64_t>(), b[1].get<int64_t>());
}

// quantization_config {"quant_method": "moe_tool", "format_version": 1, "weights": {...}}: the
// encoded weights of a native moe-tool checkpoint (docs/FORMAT.md), or null.
const nlohmann::json* native_weights(const Config& c) {
  const nlohmann::json& j = c.json();
  if (!j.contains("quantization_config") || !j.at("quantization_config").is_object()) return nullptr;
  const nlohmann::json& q = j.at("quantization_config");
  if (q.value("quant_method", "") != "moe_tool") return nullptr;
  const std::string where = c.source() + ": quantization_config";
  if (!q.contains("format_version") || q.at("format_version") != 1)
    throw Error::unsupported(where + ".format_version: " + (q.contains("format_version") ? q.at("format_version").dump() : "missing") +
                             " (this moe-tool reads format 1)");
  if (!q.contains("weights") || !q.at("weights").is_object())
    throw Error::corruption(where + ".weights: expected an object (weight name -> encoding)");
  for (const auto& [name, e] : q["weights"].items()) {
    if (!e.is_object() || !e.contains("parts") || !e.at("parts").is_object() || e.at("parts").empty())
      throw Error::corruption(where + ".weights[\"" + name + "\"].parts: expected an object (part -> tensor name)");
    for (const auto& [role, t] : e.at("parts").items())
      if (!t.is_string())
        throw Error::corruption(where + ".weights[\"" + name + "\"].parts." + role + ": expected a tensor name, found " + t.dump());
  }
  return &q.at("weights");
}

// quantization_config.input_experts_per_layer and keep_map of a ragged native checkpoint
// (docs/FORMAT.md): both optional; when present, a list of one entry per decoder layer. keep_map[l]
// is null for a dense layer; for an MoE layer null (not recorded) or one entry per written expert:
// an input expert id, or a merged expert's members [[id, weight], ...]; ids are in
// [0, input_experts_per_layer[l]) (>= 0 when that list is absent) and a layer's ids are distinct.
void check_keep_map(const Config& c, const FamilyDesc& f, const nlohmann::json& q, const std::vector<int64_t>& counts,
                    int64_t top_k) {
  const std::string base = c.source() + ": quantization_config.";
  const size_t layers = counts.size();
  std::vector<int64_t> input(layers, -1);  // -1: unknown
  if (q.contains("input_experts_per_layer")) {
    const std::string where = base + "input_experts_per_layer";
    const nlohmann::json& a = q.at("input_experts_per_layer");
    if (!a.is_array() || a.size() != layers)
      throw Error::corruption(where + ": expected a list of " + std::to_string(layers) +
                              " integers (one per layer), found " + a.dump());
    for (size_t l = 0; l < layers; ++l) {
      const nlohmann::json& v = a[l];
      const bool moe = is_moe_layer(f, c, static_cast<int>(l));
      const int64_t lo = moe ? std::max(top_k, counts[l]) : 0;
      if (!v.is_number_integer() || v.get<int64_t>() < lo || (!moe && v.get<int64_t>() != 0))
        throw Error::corruption(where + "[" + std::to_string(l) + "]: expected " +
                                (moe ? "an integer >= " + std::to_string(lo) + " (the layer's written expert count)"
                                     : std::string("0 (a dense layer)")) +
                                ", found " + v.dump());
      input[l] = v.get<int64_t>();
    }
  }
  if (!q.contains("keep_map")) return;
  const std::string where = base + "keep_map";
  const nlohmann::json& m = q.at("keep_map");
  if (!m.is_array() || m.size() != layers)
    throw Error::corruption(where + ": expected a list of " + std::to_string(layers) +
                            " entries (one per layer), found " + m.dump());
  for (size_t l = 0; l < layers; ++l) {
    const nlohmann::json& row = m[l];
    const std::string at = where + "[" + std::to_string(l) + "]";
    const bool moe = is_moe_layer(f, c, static_cast<int>(l));
    if (row.is_null()) continue;
    if (!moe) throw Error::corruption(at + ": expected null (a dense layer), found " + row.dump());
    if (!row.is_array() || static_cast<int64_t>(row.size()) != counts[l])
      throw Error::corruption(at + ": expected null or a list of " + std::to_string(counts[l]) +
                              " entries (experts_per_layer[" + std::to_string(l) + "]), found " + row.dump());
    const std::string range = input[l] >= 0 ? "an input expert id in [0, " + std::to_string(input[l]) + ")"
                                            : std::string("an input expert id >= 0");
    auto id_ok = [&](const nlohmann::json& v) {
      return v.is_number_integer() && v.get<int64_t>() >= 0 && (input[l] < 0 || v.get<int64_t>() < input[l]);
    };
    std::set<int64_t> seen;
    for (size_t e = 0; e < row.size(); ++e) {
      const nlohmann::json& v = row[e];
      const std::string ae = at + "[" + std::to_string(e) + "]";
      if (v.is_array()) {  // a merged expert: [[id, weight], ...]
        if (v.empty()) throw Error::corruption(ae + ": expected a merged expert's members [[id, weight], ...], found []");
        std::set<int64_t> members;
        for (size_t i = 0; i < v.size(); ++i) {
          const nlohmann::json& p = v[i];
          const std::string ap = ae + "[" + std::to_string(i) + "]";
          if (!p.is_array() || p.size() != 2 || !p[1].is_number() || !std::isfinite(p[1].get<double>()))
            throw Error::corruption(ap + ": expected a member [id, weight], found " + p.dump());
          if (!id_ok(p[0])) throw Error::corruption(ap + "[0]: expected " + range + ", found " + p[0].dump());
          if (!members.insert(p[0].get<int64_t>()).second)
            throw Error::corruption(ap + "[0]: expert " + p[0].dump() + " is a member twice");
        }
        continue;
      }
      if (!id_ok(v))
        throw Error::corruption(ae + ": expected " + range + " or a merged expert's members [[id, weight], ...], found " +
                                v.dump());
      if (!seen.insert(v.get<int64_t>()).second)
        throw Error::corruption(ae + ": input expert " + v.dump() + " appears twice in the layer");
    }
  }
}

// quantization_config.experts_per_layer of a native checkpoint with ragged per-layer expert counts
// (docs/FORMAT.md): one integer per decoder layer, 0 for a dense layer, top_k..E for an MoE
// layer (E = the config's expert count, the largest). Empty when absent.
std::vector<int64_t> native_expert_counts(const Config& c, const FamilyDesc& f, int64_t layers, int64_t E, int64_t top_k) {
  const nlohmann::json& j = c.json();
  if (!j.contains("quantization_config") || !j.at("quantization_config").is_object()) return {};
  const nlohmann::json& q = j.at("quantization_config");
  if (q.value("quant_method", "") != "moe_tool" || !q.contains("experts_per_layer")) return {};
  const std::string where = c.source() + ": quantization_config.experts_per_layer";
  const nlohmann::json& a = q.at("experts_per_layer");
  if (!a.is_array() || static_cast<int64_t>(a.size()) != layers)
    throw Error::corruption(where + ": expected a list of " + std::to_string(layers) + " integers (one per layer), found " +
                            a.dump());
  std::vector<int64_t> counts;
  for (int64_t l = 0; l < layers; ++l) {
    const nlohmann::json& v = a[static_cast<size_t>(l)];
    const bool moe = is_moe_layer(f, c, static_cast<int>(l));
    const int64_t lo = moe ? top_k : 0, hi = moe ? E : 0;
    if (!v.is_number_integer() || v.get<int64_t>() < lo || v.get<int64_t>() > hi)
      throw Error::corruption(where + "[" + std::to_string(l) + "]: expected " +
                              (moe ? "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "] (" + f.topk_key +
                                         " .. " + f.expert_count_key + ")"
                                   : std::string("0 (a dense layer)")) +
                              ", found " + v.dump());
    counts.push_back(v.get<int64_t>());
  }
  check_keep_map(c, f, q, counts, top_k);
  return counts;
}

class Picker {
 public:
  Picker(const io::Checkpoint& c, std::optional<std::pair<int64_t, int64_t>> fp8, const nlohmann::json* native)
      : ckpt_(c), fp8_(fp8), native_(native) {
    if (!native_) return;
    for (const auto& [name, e] : native_->items())
      for (const auto& [role, t] : e.at("parts").items()) ++part_users_[t.get<std::string>()];
  }
  // The tensor `name`; a weight with a companion `name`_scale_inv comes with its block scale; a
  // weight listed in a native checkpoint's quantization_config comes decoded from its parts.
  std::optional<Tensor> get(const std::string& name, bool required, const std::string& why) {
    if (native_ && native_->contains(name)) return encoded(name);
    if (!ckpt_.has(name)) {
      if (required) throw Error::corruption(ckpt_.dir().string() + ": tensor " + name + ": missing (" + why + ")");
      return std::nullopt;
    }
    used_.insert(name);
    Tensor t = ckpt_.tensor(name);
    const std::string sname = name + "_scale_inv";
    if (ckpt_.has(sname)) {
      if (!fp8_)
        throw Error::corruption(ckpt_.shard_path(sname).string() + ": tensor " + sname +
                                ": a block scale, but config.json has no quantization_config with quant_method \"fp8\"");
      used_.insert(sname);
      try {
        t = t.with_block_scale(ckpt_.tensor(sname), fp8_->first, fp8_->second);
      } catch (const Error& e) {
        throw Error::corruption(ckpt_.shard_path(sname).string() + ": tensor " + sname + ": " + e.message() +
                                " (weight " + name + ")");
      }
    } else if (fp8_ && t.dtype() == DType::F8_E4M3) {
      throw Error::corruption(ckpt_.shard_path(name).string() + ": tensor " + name + ": F8_E4M3 weight without " +
                              sname + " (config.json quantization_config is block-scaled fp8)");
    }
    return t;
  }
  Tensor need(const std::string& name, const std::string& why) { return *get(name, true, why); }
  void expect(const std::string& name, const Tensor& t, const Shape& shape, const std::string& why) {
    if (t.shape() != shape)
      throw Error::corruption(where(name) + ": tensor " + name + ": shape " +
                              core::shape_str(t.shape()) + " but " + why + " implies " + core::shape_str(shape));
  }
  bool used(const std::string& name) const { return used_.count(name) != 0; }
  // The novice (MoNE constant, docs/FORMAT.md "novice") stored for the expert whose down
  // projection is `down`, or nullopt when the expert is stored as an MLP. Checks the entry: one
  // part "value", a float tensor of shape [H] with finite values.
  std::optional<Tensor> novice(const std::string& down, int64_t H) {
    if (!native_ || !native_->contains(down) || native_->at(down).value("encoding", "") != kNoviceEncoding) return std::nullopt;
    const nlohmann::json& e = native_->at(down);
    used_weights_.insert(down);
    const std::string where = "config.json quantization_config.weights[\"" + down + "\"]";
    if (e.at("parts").size() != 1 || !e.at("parts").contains("value"))
      throw Error::corruption(ckpt_.dir().string() + ": " + where + ".parts: expected exactly one part \"value\", found " +
                              e.at("parts").dump());
    const std::string tname = e.at("parts").at("value").get<std::string>();
    if (!ckpt_.has(tname))
      throw Error::corruption(ckpt_.dir().string() + ": tensor " + tname + ": missing (part \"value\" of novice " + down +
                              ", " + where + ")");
    used_.insert(tname);
    Tensor t = ckpt_.tensor(tname);
    const std::string file = ckpt_.shard_path(tname).string();
    if (t.shape() != Shape{H} || !is_float(t.dtype()))
      throw Error::corruption(file + ": tensor " + tname + ": novice value must be a float tensor of shape [" +
                              std::to_string(H) + "] (hidden_size), found " + core::dtype_name(t.dtype()) + " " +
                              core::shape_str(t.shape()));
    const int64_t bad = core::first_non_finite(t.dtype(), t.data(), static_cast<size_t>(t.numel()));
    if (bad >= 0)
      throw Error::corruption(file + ": tensor " + tname + ": novice value has a non-finite element at index " +
                              std::to_string(bad));
    return t;
  }
  // The file that stores `name` (for an encoded weight: its first part), for messages.
  std::string where(const std::string& name) const {
    if (ckpt_.has(name)) return ckpt_.shard_path(name).string();
    if (native_ && native_->contains(name)) {
      const std::string first = native_->at(name).at("parts").begin()->get<std::string>();
      if (ckpt_.has(first)) return ckpt_.shard_path(first).string();
    }
    return ckpt_.dir().string();
  }
  // A native entry no weight of the model took: an error (a weight name the family does not
  // have, or a model that does not match its config).
  void check_native_used(const std::string& config_path) const {
    if (!native_) return;
    for (const auto& [name, e] : native_->items())
      if (!used_weights_.count(name))
        throw Error::corruption(config_path + ": quantization_config.weights: \"" + name +
                                "\" is not a weight of this model");
  }

 private:
  Tensor encoded(const std::string& name) {
    const nlohmann::json& e = native_->at(name);
    used_weights_.insert(name);
    // An encoding name this reader does not know is config.json's problem, not a shard's.
    if (e.contains("encoding") && e.at("encoding").is_string()) {
      const std::string enc = e.at("encoding").get<std::string>();
      const auto& known = quant::known_encodings();
      if (std::none_of(known.begin(), known.end(), [&](const quant::EncodingInfo& k) { return enc == k.name; })) {
        std::string list;
        for (const auto& k : known) list += (list.empty() ? "" : ", ") + std::string(k.name);
        throw Error::corruption((ckpt_.dir() / "config.json").string() + ": quantization_config.weights[\"" + name +
                                "\"].encoding: unknown encoding \"" + enc + "\" (known: " + list +
                                "; written by a newer moe-tool?)");
      }
    }
    std::map<std::string, quant::StoredPart> parts;
    std::string first;
    for (const auto& [role, t] : e.at("parts").items()) {
      const std::string tname = t.get<std::string>();
      if (!ckpt_.has(tname))
        throw Error::corruption(ckpt_.dir().string() + ": tensor " + tname + ": missing (part \"" + role + "\" of " + name +
                                ", config.json quantization_config)");
      used_.insert(tname);
      auto it = cache_.find(tname);
      if (it == cache_.end()) it = cache_.emplace(tname, std::make_shared<const Tensor>(ckpt_.tensor(tname))).first;
      parts[role] = {it->second, part_users_[tname] > 1};
      if (first.empty()) first = tname;
    }
    try {
      auto enc = quant::decode(e, parts);
      return Tensor::encoded(enc, enc->parts().front().tensor->dtype());
    } catch (const Error& err) {
      throw Error::corruption(ckpt_.shard_path(first).string() + ": weight " + name + ": " + err.message());
    }
  }

  const io::Checkpoint& ckpt_;
  std::optional<std::pair<int64_t, int64_t>> fp8_;
  const nlohmann::json* native_;
  std::set<std::string> used_, used_weights_;
  std::map<std::string, int> part_users_;
  std::map<std::string, std::shared_ptr<const Tensor>> cache_;
};

// Element (i, j) of a rank-1 ([n]) or rank-2 ([n, m]) plain tensor at flat position
// offset + i * s0 + j * s1 of another tensor's elements: the strided views the gpt_oss fused
// expert layout needs (transposed, gate/up interleaved). gather copies out of `flat` into a new
// tensor of `shape`; scatter copies `t` into `flat` (same dtype) at those positions.
struct Strides {
  int64_t offset = 0, s0 = 1, s1 = 0;
};
Tensor gather(const Tensor& flat, const Shape& shape, Strides st) {
  if (flat.encoding()) throw Error::internal("gather: encoded tensor");
  Tensor out = Tensor::zeros(flat.dtype(), shape);
  const size_t es = core::dtype_size(flat.dtype());
  const int64_t n = shape.at(0), m = shape.size() > 1 ? shape[1] : 1;
  uint8_t* dst = out.mutable_data();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j)
      std::copy_n(flat.data() + static_cast<size_t>(st.offset + i * st.s0 + j * st.s1) * es, es,
                  dst + static_cast<size_t>(i * m + j) * es);
  return out;
}
void scatter(const Tensor& t, Tensor& flat, Strides st) {
  const size_t es = core::dtype_size(flat.dtype());
  const int64_t n = t.dim(0), m = t.rank() > 1 ? t.dim(1) : 1;
  uint8_t* dst = flat.mutable_data();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j)
      std::copy_n(t.data() + static_cast<size_t>(i * m + j) * es, es, dst + static_cast<size_t>(st.offset + i * st.s0 + j * st.s1) * es);
}

// The per-expert [out, in] views of gpt_oss's fused layout (transformers' GptOssExperts):
// gate_up [E,H,2I] with gate = [..., 0::2] and up = [..., 1::2], gate_up_bias [E,2I] the same
// way, down [E,I,H], down_bias [E,H]. Each returns the strides of expert e's tensor.
struct InterleavedLayout {
  int64_t H, I;
  Strides gate(int64_t e) const { return {e * H * 2 * I, 2, 2 * I}; }          // [I,H]
  Strides up(int64_t e) const { return {e * H * 2 * I + 1, 2, 2 * I}; }        // [I,H]
  Strides down(int64_t e) const { return {e * I * H, 1, H}; }                  // [H,I]
  Strides gate_bias(int64_t e) const { return {e * 2 * I, 2, 0}; }             // [I]
  Strides up_bias(int64_t e) const { return {e * 2 * I + 1, 2, 0}; }           // [I]
  Strides down_bias(int64_t e) const { return {e * H, 1, 0}; }                 // [H]
};

// MXFP4 (the released gpt-oss checkpoints' experts; transformers' integrations/mxfp4.py
// convert_moe_packed_tensors): blocks [E, R, G, 16] U8 hold two FP4 e2m1 codes per byte (low
// nibble first), scales [E, R, G] U8 one e8m0 exponent per 32 values: value = fp4(code) ·
// 2^(scale − 127). Row r of expert e decoded is [G·32], the weight's input dim (the decoded
// tensor transformers builds is its transpose, [E, G·32, R]). Rows r0, r0 + step, ... (n of them)
// of expert e as a BF16 [n, G·32] tensor: FP4 values times a power of two are exact in BF16
// (Error::corruption for the e8m0 NaN scale 255).
Tensor mxfp4_rows(const Tensor& blocks, const Tensor& scales, int64_t e, int64_t r0, int64_t step, int64_t n,
                  const std::string& name) {
  static constexpr float kFp4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
  const int64_t R = blocks.dim(1), G = blocks.dim(2);
  std::vector<float> v(static_cast<size_t>(n * G * 32));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = r0 + i * step;
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t s = scales.data()[(e * R + r) * G + g];
      if (s == 255) throw Error::corruption(name + "_scales: e8m0 scale 255 (NaN) in expert " + std::to_string(e));
      const float scale = std::ldexp(1.0f, int(s) - 127);
      const uint8_t* b = blocks.data() + ((e * R + r) * G + g) * 16;
      float* out = v.data() + i * G * 32 + g * 32;
      for (int j = 0; j < 16; ++j) {
        out[2 * j] = kFp4[b[j] & 0x0F] * scale;
        out[2 * j + 1] = kFp4[b[j] >> 4] * scale;
      }
    }
  }
  return Tensor::from_f32(v, {n, G * 32}).converted(DType::BF16);
}

std::string dims_text(const Dims& d) {
  return "config (hidden_size=" + std::to_string(d.hidden) + ", num_attention_heads=" + std::to_string(d.heads) +
         ", num_key_value_heads=" + std::to_string(d.kv_heads) + ", head_dim=" + std::to_string(d.head_dim) + ")";
}


// Builds the output list of (part of) a model: plain tensors in `dtype` when given and float,
// encoded weights materialized or as their stored parts (a part shared by several weights once,
// under its first user's name), with the manifest of encoded weights (docs/FORMAT.md).
class OutputBuilder {
 public:
  OutputBuilder(const OutputOptions& opts, DType materialize, nlohmann::json* manifest, Model::PageReleaser release)
      : opts_(opts), materialize_(materialize), manifest_(manifest), release_(std::move(release)) {}
  std::vector<OutTensor> out;

  // `convertible`: a float tensor that follows the output dtype (false keeps DeepSeek-V3's F32
  // router bias as it is).
  const OutputOptions& options() const { return opts_; }
  void add(const std::string& name, const Tensor& t, bool convertible = true) {
    const core::Encoding* enc = t.encoding();
    if (!enc) {
      out.push_back({name, (convertible && opts_.dtype && is_float(t.dtype())) ? *opts_.dtype : t.dtype(), t.shape(),
                     [t] { return t; }, {name}, "", cls, t.numel()});
      return;
    }
    const auto rule = enc->dtype_rule();
    if (opts_.materialize || rule == core::Encoding::DtypeRule::Dequantize ||
        (opts_.dtype && rule == core::Encoding::DtypeRule::Materialize)) {
      const DType d = opts_.dtype ? *opts_.dtype : materialize_;
      out.push_back({name, d, t.shape(), [t, d, rel = release_] { return converted(t, d, rel); }, {name}, "", cls, t.numel()});
      return;
    }
    nlohmann::json entry = enc->params();
    entry["encoding"] = enc->name();
    nlohmann::json parts = nlohmann::json::object();
    bool counted = false;
    for (const auto& p : enc->parts()) {
      std::string pname = name + p.suffix;
      if (p.shared) {
        auto [it, fresh] = shared().emplace(p.tensor, pname);
        pname = it->second;
        if (!fresh) {
          parts[p.role] = pname;
          continue;
        }
      }
      parts[p.role] = pname;
      const bool convert = opts_.dtype && rule == core::Encoding::DtypeRule::ConvertParts && is_float(p.tensor->dtype());
      const DType d = convert ? *opts_.dtype : p.tensor->dtype();
      auto part = p.tensor;
      out.push_back({pname, d, part->shape(), [part, d, rel = release_] { return converted(*part, d, rel); }, {pname}, name,
                     cls, counted ? 0 : t.numel()});
      counted = true;
    }
    entry["parts"] = parts;
    if (manifest_) (*manifest_)[name] = entry;
    // Every part shared and already written (by an earlier weight of this builder): the weight's
    // parameters still count, on the last output.
    if (!counted) out.back().params += t.numel();
  }
  // A novice expert (docs/FORMAT.md "novice"): its constant [H] stored as `<down><suffix>` in
  // F32, listed under the expert's down projection `down`. Stock outputs cannot hold it.
  void add_novice(const std::string& down, const Tensor& value) {
    if (opts_.materialize)
      throw Error::unsupported(down + ": a novice expert (MoNE constant): stock loaders cannot express a constant expert; "
                               "write the native format (without --materialize)");
    const std::string pname = down + kNoviceSuffix;
    out.push_back({pname, DType::F32, value.shape(), [value] { return value.converted(DType::F32); }, {pname}, down,
                   "experts", value.numel()});
    if (manifest_) (*manifest_)[down] = {{"encoding", kNoviceEncoding}, {"parts", {{"value", pname}}}};
  }
  std::string cls = "other";  // class of the tensors added next

 private:
  OutputOptions opts_;
  DType materialize_;
  nlohmann::json* manifest_;
  Model::PageReleaser release_;
  SharedPartNames own_shared_;
  SharedPartNames& shared() { return opts_.shared_parts ? *opts_.shared_parts : own_shared_; }

  // t in dtype d; the mapped pages it was computed from are handed back (memory stays bounded
  // while a whole checkpoint is dequantized).
  static Tensor converted(const Tensor& t, DType d, const Model::PageReleaser& rel) {
    Tensor x = t.converted(d);
    if (rel && x.data() != t.data())
      for (const Tensor* p : t.stored_tensors()) rel(p->data(), p->nbytes());
    return x;
  }
};

// Other spellings of the expert-count and top-k keys that loaders read (transformers'
// attribute_map aliases: mixtral and qwen3_moe map num_experts to num_local_experts, deepseek maps
// it to n_routed_experts, ernie maps num_experts_per_tok to moe_k; llama.cpp's converter takes the
// first of several it finds; gpt-oss's released config.json also carries experts_per_token, the
// name in OpenAI's own checkpoint format). A config that gives one of them besides the family's own key with
// another value means different models to different loaders: refused.
const char* const kExpertCountKeys[] = {"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"};
const char* const kTopKKeys[] = {"num_experts_per_tok", "moe_k", "moe_topk", "experts_per_token"};

template <size_t N>
void check_aliases(const Config& c, const std::string& key, int64_t value, const char* const (&aliases)[N],
                   const std::string& model_type) {
  for (const char* a : aliases) {
    if (key == a || !c.has(a)) continue;
    const auto& v = c.json().at(a);
    if (v.is_number_integer() && v.get<int64_t>() == value) continue;
    throw Error::corruption(c.source() + ": " + a + " " + v.dump() + " disagrees with " + key + " " +
                            std::to_string(value) + " (" + model_type + " reads " + key +
                            "; transformers and other loaders may read " + a +
                            " for it): give one value, or remove " + a);
  }
}

// tie_word_embeddings true with a stored lm_head.weight: transformers ties the output projection
// to the input embeddings (PreTrainedModel.tie_weights after loading), so the stored head is not
// used. Whether the stored head differs from the embeddings (then it is dropped with a warning).
bool stored_head_differs(const Tensor& head, const Tensor& embed) {
  if (head.shape() != embed.shape()) return true;
  if (head.data() && embed.data() && head.dtype() == embed.dtype())
    return !std::equal(head.data(), head.data() + head.nbytes(), embed.data());
  return head.to_f32() != embed.to_f32();
}

}  // namespace

Model Model::load(const io::Checkpoint& ckpt) {
  Model m;
  m.config_ = Config(ckpt.config(), ckpt.config_path());
  const Config& c = m.config_;
  m.family_ = &family_for(c);
  const FamilyDesc& f = *m.family_;
  // A checkpoint quantized by another tool (gptq, awq, bitsandbytes, ...) stores packed weights
  // under other names: say so, not that a weight is missing.
  if (c.json().contains("quantization_config") && c.json().at("quantization_config").is_object()) {
    const nlohmann::json& qm = c.json().at("quantization_config").value("quant_method", nlohmann::json());
    if (qm.is_string() && qm != "fp8" && qm != "moe_tool" && !(qm == "mxfp4" && f.fused_in_out_interleaved))
      throw Error::unsupported(c.source() + ": quantization_config.quant_method " + qm.dump() +
                               ": weights quantized by another tool are not read (moe-tool reads unquantized, "
                               "block-scaled fp8 and its own moe_tool encodings); give the unquantized checkpoint");
  }

  Dims& d = m.dims_;
  d.layers = c.get_int("num_hidden_layers");
  d.hidden = c.get_int("hidden_size");
  d.vocab = c.get_int("vocab_size");
  d.heads = c.get_int("num_attention_heads");
  d.kv_heads = c.get_int_or("num_key_value_heads", d.heads, false);
  if (d.heads % d.kv_heads != 0)
    throw Error::corruption(c.source() + ": num_key_value_heads: " + std::to_string(d.kv_heads) +
                            " does not divide num_attention_heads " + std::to_string(d.heads));
  d.head_dim = c.get_int_or("head_dim", f.default_head_dim);
  if (d.head_dim == 0) {
    if (d.hidden % d.heads != 0)
      throw Error::corruption(c.source() + ": hidden_size " + std::to_string(d.hidden) +
                              " is not a multiple of num_attention_heads " + std::to_string(d.heads));
    d.head_dim = d.hidden / d.heads;
  }
  if (f.moe) d.top_k = c.get_int(f.topk_key);
  int64_t n_experts_cfg = 0;
  int64_t n_experts = 0, width = 0;
  if (f.moe) {
    n_experts = c.get_int(f.expert_count_key);
    n_experts_cfg = n_experts;
    width = c.get_int(f.expert_width_key);
    if (d.top_k > n_experts)
      throw Error::corruption(c.source() + ": " + f.topk_key + ": " + std::to_string(d.top_k) + " exceeds " +
                              f.expert_count_key + " " + std::to_string(n_experts));
    check_aliases(c, f.expert_count_key, n_experts, kExpertCountKeys, f.model_type);
    check_aliases(c, f.topk_key, d.top_k, kTopKKeys, f.model_type);
  }

  // The shards (shared with the tensors' views) outlive the Checkpoint object if need be.
  m.release_ = [shards = ckpt.shards(), gguf = ckpt.gguf_ptr()](const uint8_t* p, uint64_t n) {
    if (gguf && gguf->file().release_range(p, n)) return;
    for (const auto& s : shards)
      if (s->release_range(p, n)) return;
  };
  const auto fp8 = fp8_block_size(c);
  m.fp8_block_ = fp8.has_value();
  Picker pick(ckpt, fp8, native_weights(c));
  const std::vector<int64_t> ragged = f.moe ? native_expert_counts(c, f, d.layers, n_experts, d.top_k) : std::vector<int64_t>{};
  const int64_t H = d.hidden;
  const std::string dt = dims_text(d);

  // Globals.
  for (const auto& g : f.globals) {
    auto t = pick.get(g.name, g.presence.required(c), "required by " + f.model_type);
    if (!t) continue;
    m.globals_[g.role] = *t;
    m.global_names_[g.role] = g.name;
  }
  pick.expect(f.globals[0].name, m.globals_.at("embed"), {d.vocab, H}, "config (vocab_size, hidden_size)");
  if (m.globals_.count("lm_head"))
    pick.expect("lm_head.weight", m.globals_.at("lm_head"), {d.vocab, H}, "config (vocab_size, hidden_size)");
  if (m.globals_.count("lm_head") && c.get_bool_or("tie_word_embeddings", false) &&
      stored_head_differs(m.globals_.at("lm_head"), m.globals_.at("embed"))) {
    core::warn_once(c.source() + ": tie_word_embeddings is true but lm_head.weight is stored and differs from " +
                    f.globals[0].name + "; following transformers (tie_weights), the embeddings are the output "
                    "projection and the stored lm_head.weight is ignored (not written to outputs)");
    m.globals_.erase("lm_head");
    m.global_names_.erase("lm_head");
  }
  pick.expect("model.norm.weight", m.globals_.at("final_norm"), {H}, "hidden_size");

  for (int l = 0; l < d.layers; ++l) {
    Layer layer;
    layer.index = l;
    const std::string prefix = expand(f.layer_prefix, l);
    for (const auto& r : f.layer_roles) {
      auto t = pick.get(prefix + r.name, r.presence.required(c), "required by " + f.model_type);
      if (t) layer.tensors[r.role] = *t;
    }
    if (f.attention == AttentionKind::Standard) {
      const int64_t qd = d.heads * d.head_dim, kvd = d.kv_heads * d.head_dim;
      const std::map<std::string, Shape> shapes = {
          {"q_proj", {qd, H}}, {"k_proj", {kvd, H}}, {"v_proj", {kvd, H}}, {"o_proj", {H, qd}},
          {"q_bias", {qd}}, {"k_bias", {kvd}}, {"v_bias", {kvd}}, {"o_bias", {H}},
          {"input_norm", {H}}, {"post_attn_norm", {H}}, {"input_norm_bias", {H}}, {"post_attn_norm_bias", {H}},
          {"sinks", {d.heads}},
          {"q_norm", {f.qk_norm == QKNorm::Full ? qd : d.head_dim}},
          {"k_norm", {f.qk_norm == QKNorm::Full ? kvd : d.head_dim}},
      };
      for (const auto& r : f.layer_roles) {
        auto it = layer.tensors.find(r.role);
        auto s = shapes.find(r.role);
        if (it != layer.tensors.end() && s != shapes.end()) pick.expect(prefix + r.name, it->second, s->second, dt);
      }
    } else {
      // MLA: q either direct or low-rank; shapes checked for the hidden dimension only.
      const bool direct = layer.tensors.count("q_proj");
      const bool lowrank = layer.tensors.count("q_a_proj") && layer.tensors.count("q_b_proj") &&
                           layer.tensors.count("q_a_norm");
      if (!direct && !lowrank)
        throw Error::corruption(ckpt.dir().string() + ": tensor " + prefix +
                                "self_attn.q_proj.weight: missing (neither q_proj nor q_a_proj/q_a_layernorm/q_b_proj)");
      for (const char* role : {"q_proj", "q_a_proj", "kv_a_proj"}) {
        auto it = layer.tensors.find(role);
        if (it != layer.tensors.end() && (it->second.rank() != 2 || it->second.dim(1) != H))
          throw Error::corruption(ckpt.shard_path(prefix + "self_attn.o_proj.weight").string() + ": layer " +
                                  std::to_string(l) + " " + role + ": shape " + core::shape_str(it->second.shape()) +
                                  " does not take hidden_size " + std::to_string(H) + " inputs");
      }
    }

    auto read_mlp = [&](const std::string& g, const std::string& u, const std::string& dn, int64_t w,
                        const std::string& what) {
      Mlp mlp{pick.need(g, what), pick.need(u, what), pick.need(dn, what)};
      const std::string why = "config (hidden_size=" + std::to_string(H) + ", " + what + " width " + std::to_string(w) + ")";
      pick.expect(g, mlp.gate, {w, H}, why);
      pick.expect(u, mlp.up, {w, H}, why);
      pick.expect(dn, mlp.down, {H, w}, why);
      return mlp;
    };

    if (is_moe_layer(f, c, l)) {
      // The layer's expert count: the config's, or its entry in a ragged native checkpoint.
      const int64_t n_experts = ragged.empty() ? n_experts_cfg : ragged[static_cast<size_t>(l)];
      MoeBlock b;
      b.router = pick.need(prefix + f.router, "router of MoE layer " + std::to_string(l));
      pick.expect(prefix + f.router, b.router, {n_experts, H},
                  "config (" + f.expert_count_key + "=" + std::to_string(n_experts) + ", hidden_size)");
      if (!f.router_bias.empty()) {
        b.router_bias = pick.need(prefix + f.router_bias, "router bias");
        pick.expect(prefix + f.router_bias, *b.router_bias, {n_experts}, f.expert_count_key);
      }
      if (f.fused_in_out_interleaved) {
        const std::string gu = prefix + f.fused_gate_up, dn = prefix + f.fused_down;
        const std::string gub = prefix + f.fused_gate_up_bias, dnb = prefix + f.fused_down_bias;
        const std::string why = "config (" + f.expert_count_key + ", " + f.expert_width_key + ", hidden_size)";
        Tensor fgub = pick.need(gub, "fused expert biases"), fdnb = pick.need(dnb, "fused expert biases");
        // MXFP4 experts (gate_up_proj_blocks / _scales, down_proj_blocks / _scales) when the dense
        // tensors are absent: decoded here, once.
        const bool mxfp4 = !ckpt.has(gu) && ckpt.has(gu + "_blocks");
        Tensor fgu, fdn, gu_b, gu_s, dn_b, dn_s;
        if (mxfp4) {
          if (H % 32 != 0 || width % 32 != 0)
            throw Error::corruption(c.source() + ": MXFP4 experts need hidden_size and " + f.expert_width_key +
                                    " multiples of 32 (" + std::to_string(H) + ", " + std::to_string(width) + ")");
          gu_b = pick.need(gu + "_blocks", "MXFP4 fused experts");
          gu_s = pick.need(gu + "_scales", "MXFP4 fused experts");
          dn_b = pick.need(dn + "_blocks", "MXFP4 fused experts");
          dn_s = pick.need(dn + "_scales", "MXFP4 fused experts");
          for (const auto& [name, t] : {std::pair{gu + "_blocks", &gu_b}, {gu + "_scales", &gu_s}, {dn + "_blocks", &dn_b},
                                       {dn + "_scales", &dn_s}})
            if (t->dtype() != DType::U8)
              throw Error::corruption(ckpt.shard_path(name).string() + ": tensor " + name + ": dtype " +
                                      core::dtype_name(t->dtype()) + " (MXFP4 blocks and scales are U8)");
          pick.expect(gu + "_blocks", gu_b, {n_experts, 2 * width, H / 32, 16}, why);
          pick.expect(gu + "_scales", gu_s, {n_experts, 2 * width, H / 32}, why);
          pick.expect(dn + "_blocks", dn_b, {n_experts, H, width / 32, 16}, why);
          pick.expect(dn + "_scales", dn_s, {n_experts, H, width / 32}, why);
        } else {
          fgu = pick.need(gu, "fused experts");
          fdn = pick.need(dn, "fused experts");
          pick.expect(gu, fgu, {n_experts, H, 2 * width}, why);
          pick.expect(dn, fdn, {n_experts, width, H}, why);
        }
        pick.expect(gub, fgub, {n_experts, 2 * width}, why);
        pick.expect(dnb, fdnb, {n_experts, H}, why);
        for (const auto& [name, t] : {std::pair{&gu, &fgu}, {&dn, &fdn}, {&gub, &fgub}, {&dnb, &fdnb}})
          if (t->valid() && t->encoding())
            throw Error::unsupported(ckpt.shard_path(*name).string() + ": tensor " + *name +
                                     ": an encoded fused expert tensor is not read (give the experts dense)");
        // Copied out into per-expert [out, in] tensors (the layout every pass works on).
        const InterleavedLayout lay{H, width};
        GluActivation act{GluActivation::ClampedSwiGlu, static_cast<float>(c.get_double_or("swiglu_alpha", 1.702)),
                          static_cast<float>(c.get_double_or("swiglu_limit", 7.0))};
        for (int64_t e = 0; e < n_experts; ++e) {
          Mlp x = mxfp4 ? Mlp{mxfp4_rows(gu_b, gu_s, e, 0, 2, width, gu), mxfp4_rows(gu_b, gu_s, e, 1, 2, width, gu),
                               mxfp4_rows(dn_b, dn_s, e, 0, 1, H, dn)}
                        : Mlp{gather(fgu, {width, H}, lay.gate(e)), gather(fgu, {width, H}, lay.up(e)),
                              gather(fdn, {H, width}, lay.down(e))};
          x.gate_bias = gather(fgub, {width}, lay.gate_bias(e));
          x.up_bias = gather(fgub, {width}, lay.up_bias(e));
          x.down_bias = gather(fdnb, {H}, lay.down_bias(e));
          x.act = act;
          b.experts.push_back(std::move(x));
        }
        // The mapped pages copied from are handed back (the copies are what the model holds).
        for (const Tensor* t : {&fgu, &fdn, &gu_b, &gu_s, &dn_b, &dn_s})
          if (t->data()) m.release_(t->data(), t->nbytes());
      } else if (f.fused()) {
        const std::string gu = prefix + f.fused_gate_up, dn = prefix + f.fused_down;
        Tensor fgu = pick.need(gu, "fused experts"), fdn = pick.need(dn, "fused experts");
        pick.expect(gu, fgu, {n_experts, 2 * width, H}, "config (" + f.expert_count_key + ", " + f.expert_width_key + ", hidden_size)");
        pick.expect(dn, fdn, {n_experts, H, width}, "config (" + f.expert_count_key + ", " + f.expert_width_key + ", hidden_size)");
        Tensor gu2 = fgu.reshaped({n_experts * 2 * width, H});
        Tensor dn2 = fdn.reshaped({n_experts * H, width});
        for (int64_t e = 0; e < n_experts; ++e) {
          b.experts.push_back(Mlp{gu2.slice0(2 * e * width, 2 * e * width + width),
                                  gu2.slice0(2 * e * width + width, 2 * (e + 1) * width),
                                  dn2.slice0(e * H, (e + 1) * H)});
        }
      } else {
        for (int64_t e = 0; e < n_experts; ++e) {
          const int ei = static_cast<int>(e);
          if (auto nv = pick.novice(prefix + expand(f.expert_down, l, ei), H)) {
            Mlp novice;
            novice.novice = std::move(*nv);
            b.experts.push_back(std::move(novice));
            continue;
          }
          b.experts.push_back(read_mlp(prefix + expand(f.expert_gate, l, ei), prefix + expand(f.expert_up, l, ei),
                                       prefix + expand(f.expert_down, l, ei), width, "expert " + std::to_string(e)));
        }
      }
      if (f.has_shared()) {
        int64_t sw = 0;
        if (!f.shared_width_key.empty()) sw = c.get_int_or(f.shared_width_key, 0);
        if (!f.shared_count_key.empty()) sw = c.get_int_or(f.shared_count_key, f.default_shared_count) * width;
        if (sw > 0) {
          b.shared = read_mlp(prefix + f.shared_gate, prefix + f.shared_up, prefix + f.shared_down, sw, "shared expert");
          if (!f.shared_expert_gate.empty()) {
            b.shared_gate = pick.need(prefix + f.shared_expert_gate, "shared expert gate");
            pick.expect(prefix + f.shared_expert_gate, *b.shared_gate, {1, H}, "hidden_size");
          }
        }
      }
      layer.moe = std::move(b);
    } else {
      const int64_t w = c.get_int(f.dense_width_key);
      layer.mlp = read_mlp(prefix + f.dense_gate, prefix + f.dense_up, prefix + f.dense_down, w, "dense MLP");
    }
    m.layers_.push_back(std::move(layer));
  }

  // Every other tensor: unexpected inside a decoder layer, passed through elsewhere.
  const std::string layers_prefix = "model.layers.";
  for (const auto& name : ckpt.names()) {
    if (pick.used(name)) continue;
    if (name.rfind(layers_prefix, 0) == 0) {
      const std::string rest = name.substr(layers_prefix.size());
      int64_t idx = -1;
      try {
        idx = std::stoll(rest);
      } catch (...) {
      }
      // Rotary-embedding buffers (rotary_emb.inv_freq, .cos_cached, .sin_cached) that older
      // checkpoints saved with the weights: not parameters, passed through as they are.
      const bool rotary = name.find(".rotary_emb.") != std::string::npos;
      if (idx >= 0 && idx < d.layers && name.ends_with("_scale_inv"))
        throw Error::corruption(ckpt.shard_path(name).string() + ": tensor " + name + ": a block scale without the weight " +
                                name.substr(0, name.size() - 10) + " it scales");
      if (idx >= 0 && idx < d.layers && !rotary)
        throw Error::corruption(ckpt.shard_path(name).string() + ": tensor " + name + ": not expected for " +
                                f.model_type + " with this config.json (" + (f.moe ? f.expert_count_key + "=" + std::to_string(n_experts) : std::string("dense")) + ")");
      if (idx >= d.layers && !f.extra_layers_allowed)
        throw Error::corruption(ckpt.shard_path(name).string() + ": tensor " + name + ": layer " + std::to_string(idx) +
                                " but num_hidden_layers is " + std::to_string(d.layers));
    }
    // A block-scaled FP8 weight among the extras (e.g. the experts of a DeepSeek-V3 MTP layer)
    // carries its scale as the decoder layers' weights do, so --dtype dequantizes it and the
    // passes keep codes and scales together; the scale is not an extra of its own.
    if (name.ends_with("_scale_inv") && ckpt.has(name.substr(0, name.size() - 10))) continue;
    m.extras_.emplace_back(name, *pick.get(name, true, "extra tensor"));
  }
  pick.check_native_used(c.source());
  check_mtp_layers(m, ckpt, n_experts, width);
  return m;
}

// DeepSeek-V3 multi-token-prediction layers (num_nextn_predict_layers of them after the decoder
// layers) carry a full MoE block, stored as extras: it must agree with the config as the decoder
// layers' blocks do (router [E,H], bias [E], experts 0..E-1 of the expert width).
void Model::check_mtp_layers(Model& m, const io::Checkpoint& ckpt, int64_t n_experts, int64_t width) {
  const FamilyDesc& f = *m.family_;
  const Config& c = m.config_;
  if (!f.extra_layers_allowed || !f.moe) return;
  const int64_t H = m.dims_.hidden, L = m.dims_.layers;
  const int64_t nextn = c.get_int_or("num_nextn_predict_layers", 0);
  const std::string experts_prefix = f.expert_gate.substr(0, f.expert_gate.find("{e}"));  // "mlp.experts."
  for (int64_t idx = L; idx < L + nextn; ++idx) {
    const int l = static_cast<int>(idx);
    const std::string prefix = expand(f.layer_prefix, l);
    const std::string where = " (multi-token-prediction layer " + std::to_string(idx) + ")";
    auto expect = [&](const std::string& name, const Shape& shape, const std::string& why) {
      const Shape got = ckpt.info(name).shape;
      if (got != shape)
        throw Error::corruption(ckpt.shard_path(name).string() + ": tensor " + name + ": shape " + core::shape_str(got) +
                                " but " + why + " implies " + core::shape_str(shape) + where);
    };
    const std::string router = prefix + f.router;
    if (!ckpt.has(router)) continue;  // no MoE block stored for this layer
    const std::string count = "config (" + f.expert_count_key + "=" + std::to_string(n_experts);
    expect(router, {n_experts, H}, count + ", hidden_size)");
    if (!f.router_bias.empty() && ckpt.has(prefix + f.router_bias)) expect(prefix + f.router_bias, {n_experts}, count + ")");
    std::set<int64_t> seen;
    for (const auto& [name, t] : m.extras_) {
      if (name.rfind(prefix + experts_prefix, 0) != 0) continue;
      const std::string rest = name.substr(prefix.size() + experts_prefix.size());
      int64_t e = -1;
      try {
        e = std::stoll(rest);
      } catch (...) {
      }
      if (e < 0)
        throw Error::corruption(ckpt.shard_path(name).string() + ": tensor " + name + ": not an expert tensor name" + where);
      if (e >= n_experts)
        throw Error::corruption(ckpt.shard_path(name).string() + ": tensor " + name + ": expert " + std::to_string(e) +
                                " but " + f.expert_count_key + " is " + std::to_string(n_experts) + where);
      seen.insert(e);
      const int ei = static_cast<int>(e);
      const std::string why = "config (hidden_size=" + std::to_string(H) + ", expert width " + std::to_string(width) + ")";
      if (name == prefix + expand(f.expert_gate, l, ei) || name == prefix + expand(f.expert_up, l, ei)) expect(name, {width, H}, why);
      if (name == prefix + expand(f.expert_down, l, ei)) expect(name, {H, width}, why);
    }
    if (!seen.empty())
      for (int64_t e = 0; e < n_experts; ++e)
        for (const std::string* tmpl : {&f.expert_gate, &f.expert_up, &f.expert_down}) {
          const std::string name = prefix + expand(*tmpl, l, static_cast<int>(e));
          if (!ckpt.has(name))
            throw Error::corruption(ckpt.dir().string() + ": tensor " + name + ": missing (" + f.expert_count_key + " is " +
                                    std::to_string(n_experts) + ")" + where);
        }
    m.mtp_moe_.push_back(l);
  }
}


namespace {

void add_mlp(OutputBuilder& ob, const Mlp& x, const std::string& g, const std::string& u, const std::string& dn) {
  if (x.novice) return ob.add_novice(dn, *x.novice);
  ob.add(g, x.gate);
  ob.add(u, x.up);
  ob.add(dn, x.down);
}

// The shared expert and gate of an MoE layer, the MLP of a dense one.
void add_tail(OutputBuilder& ob, const FamilyDesc& f, const std::string& prefix, const Layer& layer) {
  if (layer.moe) {
    const MoeBlock& b = *layer.moe;
    ob.cls = "shared_experts";
    if (b.shared) add_mlp(ob, *b.shared, prefix + f.shared_gate, prefix + f.shared_up, prefix + f.shared_down);
    if (b.shared_gate) ob.add(prefix + f.shared_expert_gate, *b.shared_gate);
  }
  ob.cls = "dense_mlp";
  if (layer.mlp) add_mlp(ob, *layer.mlp, prefix + f.dense_gate, prefix + f.dense_up, prefix + f.dense_down);
}

// gpt_oss: the experts back into gate_up_proj [E,H,2I] (gate/up interleaved), gate_up_proj_bias
// [E,2I], down_proj [E,I,H], down_proj_bias [E,H] (InterleavedLayout), weights in `dst`, biases
// in their stored dtype (converted to `dst` when it is given as the output dtype).
void add_interleaved_experts(OutputBuilder& ob, const FamilyDesc& f, const std::string& prefix,
                             const std::vector<Mlp>& experts, DType dst, int64_t H) {
  const int64_t E = static_cast<int64_t>(experts.size()), I = experts.at(0).width();
  for (const auto& x : experts)
    if (!x.gate_bias || !x.up_bias || !x.down_bias)
      throw Error::internal(f.model_type + ": an expert without its biases");
  const OutputOptions& opts = ob.options();
  const DType bsrc = experts[0].gate_bias->dtype();
  const DType bdst = opts.dtype && is_float(bsrc) ? *opts.dtype : bsrc;
  const InterleavedLayout lay{H, I};
  using Part = std::function<void(const Mlp&, int64_t, Tensor&)>;
  auto out = [&](const std::string& name, DType d, const Shape& shape, Part put) {
    const std::string full = prefix + name;
    OutTensor o{full, d, shape, nullptr, {full}, "", "experts", core::shape_numel(shape)};
    o.make = [experts, d, shape, put, E] {
      Tensor t = Tensor::zeros(d, shape);
      for (int64_t e = 0; e < E; ++e) put(experts[static_cast<size_t>(e)], e, t);
      return t;
    };
    ob.out.push_back(std::move(o));
  };
  out(f.fused_gate_up, dst, {E, H, 2 * I}, [dst, lay](const Mlp& x, int64_t e, Tensor& t) {
    scatter(x.gate.converted(dst), t, lay.gate(e));
    scatter(x.up.converted(dst), t, lay.up(e));
  });
  out(f.fused_gate_up_bias, bdst, {E, 2 * I}, [bdst, lay](const Mlp& x, int64_t e, Tensor& t) {
    scatter(x.gate_bias->converted(bdst), t, lay.gate_bias(e));
    scatter(x.up_bias->converted(bdst), t, lay.up_bias(e));
  });
  out(f.fused_down, dst, {E, I, H}, [dst, lay](const Mlp& x, int64_t e, Tensor& t) {
    scatter(x.down.converted(dst), t, lay.down(e));
  });
  out(f.fused_down_bias, bdst, {E, H}, [bdst, lay](const Mlp& x, int64_t e, Tensor& t) {
    scatter(x.down_bias->converted(bdst), t, lay.down_bias(e));
  });
}

void add_layer(OutputBuilder& ob, const Model& m, int l) {
  const FamilyDesc& f = m.family();
  const Layer& layer = m.layers().at(static_cast<size_t>(l));
  const std::string prefix = expand(f.layer_prefix, l);
  for (const auto& r : f.layer_roles) {
    auto it = layer.tensors.find(r.role);
    ob.cls = r.role.find("norm") != std::string::npos ? "norms" : "attention";
    if (it != layer.tensors.end()) ob.add(prefix + r.name, it->second);
  }
  if (layer.moe) {
    const MoeBlock& b = *layer.moe;
    ob.cls = "router";
    ob.add(prefix + f.router, b.router);
    // The correction bias stays in its own dtype (F32 in DeepSeek-V3 checkpoints).
    // gpt_oss's router bias (a logit bias, stored like the weights) follows the output dtype.
    if (b.router_bias) ob.add(prefix + f.router_bias, *b.router_bias, f.router_bias_in_logits);
    if (f.fused()) {
      if (b.num_novices() > 0)
        throw Error::unsupported("layer " + std::to_string(l) + ": novice experts (MoNE) cannot be stored in the fused " +
                                 f.model_type + " layout");
      // Re-stack the experts into [E,2I,H] and [E,H,I]. Encoded experts are written dense here
      // (the fused layout has no place for parts) only when materializing.
      const int64_t E = b.num_experts(), I = b.experts.at(0).width(), H = m.dims().hidden;
      bool encoded = false;
      for (const auto& e : b.experts)
        encoded = encoded || e.gate.encoding() || e.up.encoding() || e.down.encoding();
      const OutputOptions& opts = ob.options();
      if (encoded && !opts.materialize && !(opts.dtype && b.experts[0].gate.encoding() &&
                                            b.experts[0].gate.encoding()->dtype_rule() == core::Encoding::DtypeRule::Materialize))
        throw Error::unsupported("layer " + std::to_string(l) + ": encoded experts cannot be stored in the fused " +
                                 f.model_type + " layout; write them dense (convert --materialize)");
      const DType src = b.experts[0].gate.dtype();
      const DType dst = encoded ? (opts.dtype ? *opts.dtype : m.materialize_dtype()) : (opts.dtype && is_float(src)) ? *opts.dtype : src;
      auto experts = b.experts;
      if (f.fused_in_out_interleaved) {
        add_interleaved_experts(ob, f, prefix, experts, dst, H);
        return add_tail(ob, f, prefix, layer);
      }
      OutTensor gu{prefix + f.fused_gate_up, dst, {E, 2 * I, H}, nullptr, {prefix + f.fused_gate_up}, "", "experts", E * 2 * I * H};
      gu.make = [experts, dst, E, I, H] {
        Tensor t = Tensor::zeros(dst, {E, 2 * I, H});
        const size_t half = static_cast<size_t>(I * H) * core::dtype_size(dst);
        for (int64_t e = 0; e < E; ++e) {
          Tensor g = experts[e].gate.converted(dst), u = experts[e].up.converted(dst);
          std::copy_n(g.data(), half, t.mutable_data() + 2 * e * half);
          std::copy_n(u.data(), half, t.mutable_data() + (2 * e + 1) * half);
        }
        return t;
      };
      OutTensor dn{prefix + f.fused_down, dst, {E, H, I}, nullptr, {prefix + f.fused_down}, "", "experts", E * H * I};
      dn.make = [experts, dst, E, I, H] {
        Tensor t = Tensor::zeros(dst, {E, H, I});
        const size_t one = static_cast<size_t>(I * H) * core::dtype_size(dst);
        for (int64_t e = 0; e < E; ++e) {
          Tensor x = experts[e].down.converted(dst);
          std::copy_n(x.data(), one, t.mutable_data() + e * one);
        }
        return t;
      };
      ob.out.push_back(std::move(gu));
      ob.out.push_back(std::move(dn));
    } else {
      ob.cls = "experts";
      for (int e = 0; e < static_cast<int>(b.experts.size()); ++e)
        add_mlp(ob, b.experts[e], prefix + expand(f.expert_gate, l, e), prefix + expand(f.expert_up, l, e),
                prefix + expand(f.expert_down, l, e));
    }
  }
  add_tail(ob, f, prefix, layer);
}

}  // namespace

std::vector<OutTensor> Model::layer_outputs(int l, const OutputOptions& opts, nlohmann::json* manifest) const {
  OutputBuilder b(opts, materialize_dtype(), manifest, release_);
  add_layer(b, *this, l);
  return std::move(b.out);
}

std::vector<OutTensor> Model::outputs(const OutputOptions& options, nlohmann::json* manifest) const {
  OutputOptions opts = options;  // one set of shared-part names for the whole model
  if (!opts.shared_parts) opts.shared_parts = std::make_shared<SharedPartNames>();
  std::vector<OutTensor> out;
  auto take = [&](OutputBuilder& b) { std::move(b.out.begin(), b.out.end(), std::back_inserter(out)); };
  {
    OutputBuilder b(opts, materialize_dtype(), manifest, release_);
    b.cls = "embeddings";
    b.add(global_names_.at("embed"), globals_.at("embed"));
    take(b);
  }
  // One builder per layer, as the runner writes them; a part shared across layers is written once.
  for (int l = 0; l < static_cast<int>(layers_.size()); ++l) {
    OutputBuilder b(opts, materialize_dtype(), manifest, release_);
    add_layer(b, *this, l);
    take(b);
  }
  auto rest = global_outputs(opts, manifest, false);
  std::move(rest.begin(), rest.end(), std::back_inserter(out));
  return out;
}

std::vector<OutTensor> Model::global_outputs(const OutputOptions& opts, nlohmann::json* manifest, bool with_embed) const {
  OutputBuilder b(opts, materialize_dtype(), manifest, release_);
  if (with_embed) {
    b.cls = "embeddings";
    b.add(global_names_.at("embed"), globals_.at("embed"));
  }
  for (const auto& [role, t] : globals_)
    if (role != "embed") {
      b.cls = role == "lm_head" ? "lm_head" : role.find("norm") != std::string::npos ? "norms" : "other";
      b.add(global_names_.at(role), t);
    }
  // Extras keep DeepSeek-V3's F32 e_score_correction_bias (MTP layers) as the decoder layers do.
  b.cls = "other";
  for (const auto& [name, t] : extras_) b.add(name, t, !name.ends_with("e_score_correction_bias"));
  return std::move(b.out);
}

nlohmann::json Model::rewritten_config(const OutputOptions& opts, const nlohmann::json* manifest) const {
  const std::optional<DType> dtype = opts.dtype;
  nlohmann::json j = config_.json();
  const FamilyDesc& f = *family_;
  std::vector<int64_t> counts;  // experts per decoder layer (0: dense)
  bool ragged = false;
  if (f.moe) {
    int64_t E = -1, I = -1;
    int first = -1;
    for (const auto& layer : layers_) {
      counts.push_back(layer.moe ? layer.moe->num_experts() : 0);
      if (!layer.moe) continue;
      const int64_t e = layer.moe->num_experts();
      const int64_t w = layer.moe->expert_width();
      for (const auto& x : layer.moe->experts)
        if (!x.novice && x.width() != w)
          throw Error::unsupported("layer " + std::to_string(layer.index) +
                                   ": experts of different widths cannot be written in the " + f.model_type + " layout");
      if (E >= 0 && w != I)
        throw Error::unsupported("layer " + std::to_string(layer.index) + " has experts of width " + std::to_string(w) +
                                 " but layer " + std::to_string(first) + " of width " + std::to_string(I) +
                                 ": every MoE layer needs the same expert width");
      if (E >= 0 && e != E) {
        // Ragged counts: only the native format holds them (quantization_config.experts_per_layer).
        if (opts.materialize)
          throw Error::unsupported("layer " + std::to_string(layer.index) + " has " + std::to_string(e) +
                                   " experts but layer " + std::to_string(first) + " has " + std::to_string(E) +
                                   ": stock loaders need the same expert count in every MoE layer (write the native "
                                   "format, without materialize)");
        ragged = true;
      }
      if (first < 0) {
        first = layer.index;
        E = e;
        I = w;
      }
    }
    if (ragged) E = *std::max_element(counts.begin(), counts.end());
    if (E >= 0) {
      const bool changed = !j.contains(f.expert_count_key) || j[f.expert_count_key] != E;
      j[f.expert_count_key] = E;
      j[f.expert_width_key] = I;
      if (j.contains(f.topk_key) && j[f.topk_key].get<int64_t>() > E) j[f.topk_key] = E;
      // Other spellings of the two keys (equal to them at load, see check_aliases) follow them.
      for (const char* a : kExpertCountKeys)
        if (a != f.expert_count_key && j.contains(a) && !j[a].is_null()) j[a] = E;
      for (const char* a : kTopKKeys)
        if (a != f.topk_key && j.contains(a) && !j[a].is_null() && j.contains(f.topk_key)) j[a] = j[f.topk_key];
      // DeepSeek group-limited routing: groups are contiguous blocks of E / n_group experts. Once
      // experts are dropped or merged those blocks no longer are the trained groups (and E may
      // not divide), so the written model routes plain top-k: one group, chosen always.
      if (changed && j.contains("n_group") && j["n_group"].is_number_integer() && j["n_group"].get<int64_t>() > 1) {
        j["n_group"] = 1;
        if (j.contains("topk_group")) j["topk_group"] = 1;
      }
    }
  }
  // quantization_config for the encoded weights as written.
  nlohmann::json own;
  if (!manifest) {
    (void)outputs(opts, &own);
    manifest = &own;
  }
  bool native = false;
  std::set<std::string> fp8_blocks;
  for (const auto& [name, e] : manifest->items()) {
    if (e.at("encoding") == "fp8-block") fp8_blocks.insert(e.at("block").dump());
    else native = true;
  }
  const std::string qm = j.contains("quantization_config") && j.at("quantization_config").is_object()
                             ? j.at("quantization_config").value("quant_method", "") : "";
  if (native || fp8_blocks.size() > 1 || ragged) {
    j["quantization_config"] = {{"quant_method", "moe_tool"}, {"format_version", 1}, {"weights", *manifest}};
    if (ragged) {
      j["quantization_config"]["experts_per_layer"] = counts;
      // The input's keep-map, when it had one (convert); a pipeline run writes its own.
      const nlohmann::json& in = config_.json();
      if (in.contains("quantization_config") && in["quantization_config"].is_object() &&
          in["quantization_config"].contains("keep_map"))
        j["quantization_config"]["keep_map"] = in["quantization_config"]["keep_map"];
      if (in.contains("quantization_config") && in["quantization_config"].is_object() &&
          in["quantization_config"].contains("input_experts_per_layer"))
        j["quantization_config"]["input_experts_per_layer"] = in["quantization_config"]["input_experts_per_layer"];
    }
  } else if (fp8_blocks.size() == 1) {
    if (qm != "fp8")
      j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                                  {"weight_block_size", nlohmann::json::parse(*fp8_blocks.begin())}};
  } else if (qm == "fp8" || qm == "moe_tool" || qm == "mxfp4") {
    j.erase("quantization_config");  // every weight written dense (gpt_oss MXFP4 experts: decoded at load)
  }
  // transformers >= 4.56 writes "dtype" (and prefers it), older versions "torch_dtype": update
  // whichever the input has, both when it has both, "torch_dtype" (read by every version) when none.
  if (dtype) {
    const char* name = *dtype == DType::BF16 ? "bfloat16" : *dtype == DType::F16 ? "float16" : "float32";
    const bool has_new = j.contains("dtype"), has_old = j.contains("torch_dtype");
    if (has_new) j["dtype"] = name;
    if (has_old || !has_new) j["torch_dtype"] = name;
  }
  return j;
}

void account_into(std::map<std::string, ClassAccount>& acc, const std::vector<OutTensor>& outs) {
  for (const auto& o : outs) {
    auto& a = acc[o.cls.empty() ? "other" : o.cls];
    a.params += o.params;
    a.bytes += static_cast<uint64_t>(core::shape_numel(o.shape)) * core::dtype_size(o.dtype);
  }
}

std::map<std::string, ClassAccount> account(const std::vector<OutTensor>& outs) {
  std::map<std::string, ClassAccount> acc;
  account_into(acc, outs);
  return acc;
}

nlohmann::json account_json(const std::map<std::string, ClassAccount>& acc) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [cls, a] : acc)
    j[cls] = {{"params", a.params}, {"bytes", a.bytes}, {"bits_per_param", a.bits_per_param()}};
  return j;
}

int64_t Model::total_params() const {
  int64_t n = 0;
  for (const auto& [role, t] : globals_) n += t.numel();
  for (const auto& l : layers_) l.for_each_tensor([&](const Tensor& t) { n += t.numel(); });
  for (const auto& [name, t] : extras_) n += t.numel();
  return n;
}

DType Model::materialize_dtype() const {
  const nlohmann::json& j = config_.json();
  for (const char* key : {"dtype", "torch_dtype"}) {
    if (!j.contains(key) || !j[key].is_string()) continue;
    const std::string v = j[key];
    if (v == "bfloat16") return DType::BF16;
    if (v == "float16") return DType::F16;
    if (v == "float32") return DType::F32;
  }
  return DType::BF16;
}

bool Model::has_encoded_weights() const {
  bool any = false;
  for (const auto& [role, t] : globals_) any = any || t.encoding();
  for (const auto& l : layers_) l.for_each_tensor([&](const Tensor& t) { any = any || t.encoding(); });
  for (const auto& [name, t] : extras_) any = any || t.encoding();
  return any;
}

int64_t Model::active_params() const {
  int64_t n = total_params();
  for (const auto& layer : layers_)
    if (layer.moe) n -= layer.moe->inactive_params(dims_.top_k);
  return n;
}

int64_t MoeBlock::inactive_params(int64_t top_k) const {
  if (experts.empty()) return 0;
  const int64_t E = num_experts(), k = std::min(top_k, E);
  int64_t all = 0;
  std::vector<int64_t> sizes;
  for (const auto& e : experts) {
    all += e.params();
    sizes.push_back(e.params());
  }
  if (num_novices() == 0) return (E - k) * all / E;
  std::sort(sizes.begin(), sizes.end(), std::greater<int64_t>());
  int64_t used = 0;
  for (int64_t i = 0; i < k; ++i) used += sizes[static_cast<size_t>(i)];
  return all - used;
}

int64_t MoeBlock::num_novices() const {
  return std::count_if(experts.begin(), experts.end(), [](const Mlp& m) { return m.is_novice(); });
}

int64_t MoeBlock::expert_width() const {
  for (const auto& e : experts)
    if (!e.novice) return e.width();
  return 0;
}

int64_t Model::num_novices() const {
  int64_t n = 0;
  for (const auto& l : layers_)
    if (l.moe) n += l.moe->num_novices();
  return n;
}

void Model::refuse_novices(const std::string& what, const std::string& why) const {
  const int64_t n = num_novices();
  if (n > 0)
    throw Error::unsupported(what + ": the model has " + std::to_string(n) + " novice experts (MoNE constants, docs/FORMAT.md); " +
                             why);
}

}  // namespace moe::model
