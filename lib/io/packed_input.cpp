#include "io/packed_input.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <regex>

#include "core/error.h"
#include "core/fp8_block.h"
#include "quant/intn.h"

namespace moe::io {

namespace {

using core::DType;
using core::Error;
using core::Shape;
using core::Tensor;

// AutoAWQ's AWQ_REVERSE_ORDER: output 8c + p of a word sits at nibble kAwqReverse[p].
constexpr int kAwqReverse[8] = {0, 4, 1, 5, 2, 6, 3, 7};

uint32_t word_at(const uint8_t* base, int64_t index) {
  uint32_t w;
  std::memcpy(&w, base + index * 4, 4);
  return w;  // little endian on every target we build for
}

std::string layout_label(PackedLayout l) {
  return l == PackedLayout::Gptq ? "gptq" : l == PackedLayout::Awq ? "awq" : "compressed-tensors";
}

}  // namespace

PackedIntLinear::PackedIntLinear(const Layout& layout, int64_t out, int64_t in, std::map<std::string, Tensor> parts)
    : Encoding(out, in), layout_(layout) {
  const int bits = layout.bits;
  const bool awq = layout.layout == PackedLayout::Awq, gptq = layout.layout == PackedLayout::Gptq;
  if (bits != 4 && bits != 8) throw Error::unsupported(std::to_string(bits) + "-bit codes (4 and 8 are read)");
  if (awq && bits != 4) throw Error::unsupported("AWQ with " + std::to_string(bits) + "-bit codes (AWQ GEMM packs 4 bits)");
  if (layout.group < 0) throw Error::corruption("group size " + std::to_string(layout.group));
  if (layout.group > 0 && in % layout.group != 0)
    throw Error::corruption("group size " + std::to_string(layout.group) + " does not divide the " + std::to_string(in) +
                            " inputs");
  ngroups_ = layout.group == 0 ? 1 : in / layout.group;
  const int64_t pf = 32 / bits, ng = ngroups_;
  auto need = [&](const std::string& role, const std::string& what, std::initializer_list<DType> dtypes,
                  const Shape& shape) {
    auto it = parts.find(role);
    if (it == parts.end()) throw Error::corruption(what + ": missing");
    const Tensor& t = it->second;
    if (std::find(dtypes.begin(), dtypes.end(), t.dtype()) == dtypes.end() || t.encoding())
      throw Error::corruption(what + ": dtype " + std::string(core::dtype_name(t.dtype())) + " not expected");
    if (t.shape() != shape)
      throw Error::corruption(what + ": shape " + core::shape_str(t.shape()) + ", expected " + core::shape_str(shape) +
                              " for a " + std::to_string(bits) + "-bit weight [" + std::to_string(out) + ", " +
                              std::to_string(in) + "] in " + std::to_string(ng) + " group(s)");
    parts_[role] = std::make_shared<const Tensor>(t);
  };
  const std::initializer_list<DType> scale_types = {DType::F16, DType::BF16, DType::F32};
  if (gptq || awq) {
    if ((gptq && in % pf != 0) || out % pf != 0)
      throw Error::corruption("shape [" + std::to_string(out) + ", " + std::to_string(in) + "]: the " +
                              layout_label(layout.layout) + " layout packs " + std::to_string(pf) +
                              " values per int32 and needs multiples of " + std::to_string(pf));
    need("packed", "qweight", {DType::I32}, gptq ? Shape{in / pf, out} : Shape{in, out / pf});
    need("zeros", "qzeros", {DType::I32}, {ng, out / pf});
    need("scales", "scales", scale_types, {ng, out});
  } else {
    need("packed", "weight_packed", {DType::I32}, {out, (in + pf - 1) / pf});
    need("scales", "weight_scale", scale_types, {out, ng});
    need("shape", "weight_shape", {DType::I64, DType::I32}, {2});
    const Tensor& s = *parts_["shape"];
    std::vector<int64_t> v(2);
    for (int k = 0; k < 2; ++k) {
      if (s.dtype() == DType::I64) {
        std::memcpy(&v[k], s.data() + 8 * k, 8);
      } else {
        int32_t x;
        std::memcpy(&x, s.data() + 4 * k, 4);
        v[k] = x;
      }
    }
    if (v[0] != out || v[1] != in)
      throw Error::corruption("weight_shape: holds [" + std::to_string(v[0]) + ", " + std::to_string(v[1]) +
                              "] but the packed tensors are of a weight [" + std::to_string(out) + ", " +
                              std::to_string(in) + "]");
    if (parts.count("zeros")) need("zeros", "weight_zero_point", {DType::I32}, {(out + pf - 1) / pf, ng});
  }
  if (parts.count("g_idx")) {
    const std::string what = gptq ? "g_idx" : "weight_g_idx";
    if (awq) throw Error::corruption("g_idx: AWQ has no act-order");
    need("g_idx", what, {DType::I32}, {in});
    const Tensor& g = *parts_["g_idx"];
    g_idx_.resize(static_cast<size_t>(in));
    std::memcpy(g_idx_.data(), g.data(), static_cast<size_t>(in) * 4);
    std::vector<int64_t> count(static_cast<size_t>(ng), 0);
    for (int64_t i = 0; i < in; ++i) {
      if (g_idx_[i] < 0 || g_idx_[i] >= ng)
        throw Error::corruption(what + ": value " + std::to_string(g_idx_[i]) + " at input " + std::to_string(i) +
                                " is outside [0, " + std::to_string(ng) + ")");
      ++count[g_idx_[i]];
    }
    const int64_t glen = in / ng;
    for (int64_t k = 0; k < ng; ++k)
      if (count[k] != glen)
        throw Error::corruption(what + ": group " + std::to_string(k) + " holds " + std::to_string(count[k]) +
                                " inputs, expected " + std::to_string(glen) + " (not a grouping of the inputs)");
    // A trivial g_idx (i div G) is the plain grouping: decode without the lookup.
    bool trivial = true;
    for (int64_t i = 0; i < in && trivial; ++i) trivial = g_idx_[i] == i / glen;
    if (trivial) g_idx_.clear();
  }
}

std::string PackedIntLinear::name() const {
  return layout_label(layout_.layout) + "-int" + std::to_string(layout_.bits);
}

nlohmann::json PackedIntLinear::params() const {
  return {{"bits", layout_.bits}, {"group", layout_.group}, {"act_order", !g_idx_.empty()}};
}

std::vector<core::EncodedPart> PackedIntLinear::parts() const {
  const bool ct = layout_.layout == PackedLayout::CompressedTensors;
  std::vector<core::EncodedPart> v;
  auto add = [&](const char* role, const char* ct_suffix, const char* other_suffix) {
    auto it = parts_.find(role);
    if (it != parts_.end()) v.push_back({role, ct ? ct_suffix : other_suffix, it->second, false});
  };
  add("packed", "_packed", ".qweight");
  add("scales", "_scale", ".scales");
  add("zeros", "_zero_point", ".qzeros");
  add("g_idx", "_g_idx", ".g_idx");
  add("shape", "_shape", "");
  return v;
}

void PackedIntLinear::codes(int64_t r0, int64_t r1, uint8_t* q) const {
  const int bits = layout_.bits;
  const int64_t pf = 32 / bits, in = cols(), out = rows();
  const uint32_t mask = (1u << bits) - 1;
  const uint8_t* w = parts_.at("packed")->data();
  switch (layout_.layout) {
    case PackedLayout::CompressedTensors: {
      const int64_t wpr = (in + pf - 1) / pf;
      for (int64_t o = r0; o < r1; ++o) {
        uint8_t* d = q + (o - r0) * in;
        for (int64_t j = 0; j < wpr; ++j) {
          const uint32_t word = word_at(w, o * wpr + j);
          const int64_t n = std::min(pf, in - j * pf);
          for (int64_t k = 0; k < n; ++k) d[j * pf + k] = static_cast<uint8_t>((word >> (k * bits)) & mask);
        }
      }
      break;
    }
    case PackedLayout::Gptq:
      // Word rows of qweight are contiguous along OUT: walk them once, scatter into the rows.
      for (int64_t j = 0; j < in / pf; ++j)
        for (int64_t o = r0; o < r1; ++o) {
          const uint32_t word = word_at(w, j * out + o);
          uint8_t* d = q + (o - r0) * in + j * pf;
          for (int64_t k = 0; k < pf; ++k) d[k] = static_cast<uint8_t>((word >> (k * bits)) & mask);
        }
      break;
    case PackedLayout::Awq:
      for (int64_t i = 0; i < in; ++i)
        for (int64_t o = r0; o < r1;) {
          const uint32_t word = word_at(w, i * (out / 8) + o / 8);
          for (const int64_t end = std::min(r1, (o / 8 + 1) * 8); o < end; ++o)
            q[(o - r0) * in + i] = static_cast<uint8_t>((word >> (4 * kAwqReverse[o % 8])) & 15u);
        }
      break;
  }
}

int PackedIntLinear::zero(int64_t o, int64_t g) const {
  const int bits = layout_.bits;
  const int64_t pf = 32 / bits;
  const uint32_t mask = (1u << bits) - 1;
  auto it = parts_.find("zeros");
  if (it == parts_.end()) return 1 << (bits - 1);  // symmetric compressed-tensors
  const uint8_t* z = it->second->data();
  switch (layout_.layout) {
    case PackedLayout::CompressedTensors:
      return static_cast<int>((word_at(z, (o / pf) * ngroups_ + g) >> ((o % pf) * bits)) & mask);
    case PackedLayout::Gptq:
      return static_cast<int>((word_at(z, g * (rows() / pf) + o / pf) >> ((o % pf) * bits)) & mask) +
             (layout_.zero_plus_one ? 1 : 0);
    case PackedLayout::Awq:
      return static_cast<int>((word_at(z, g * (rows() / 8) + o / 8) >> (4 * kAwqReverse[o % 8])) & 15u);
  }
  return 0;
}

float PackedIntLinear::scale(int64_t o, int64_t g) const {
  const Tensor& s = *parts_.at("scales");
  const int64_t idx = layout_.layout == PackedLayout::CompressedTensors ? o * ngroups_ + g : g * rows() + o;
  float v;
  core::to_f32(s.dtype(), s.data() + idx * static_cast<int64_t>(core::dtype_size(s.dtype())), &v, 1);
  return v;
}

std::string PackedIntLinear::native_form_problem(bool* symmetric) const {
  if (!g_idx_.empty()) return "act-order: its g_idx puts inputs out of order in the groups";
  const int maxq = (1 << layout_.bits) - 1;
  bool sym = true;
  for (int64_t o = 0; o < rows(); ++o)
    for (int64_t g = 0; g < ngroups_; ++g) {
      const float s = scale(o, g);
      const std::string where = "row " + std::to_string(o) + ", group " + std::to_string(g) + ": ";
      if (core::f16_to_f32(core::f32_to_f16(s)) != s)
        return where + "scale " + nlohmann::json(s).dump() + " is not exact in f16";
      const int z = zero(o, g);
      if (z < 0 || z > maxq)
        return where + "zero point " + std::to_string(z) + " is outside [0, " + std::to_string(maxq) + "]";
      sym = sym && z == (maxq + 1) / 2;
    }
  if (symmetric) *symmetric = sym;
  return "";
}

std::optional<core::NativeForm> PackedIntLinear::native_form() const {
  bool symmetric = true;
  if (!native_form_problem(&symmetric).empty()) return std::nullopt;
  const int bits = layout_.bits;
  const int64_t out = rows(), in = cols(), ng = ngroups_;
  const int64_t group = layout_.group;
  core::NativeForm f;
  f.name = "intN";
  f.params = {{"bits", bits}, {"group", group}, {"symmetric", symmetric}, {"cols", in}};
  f.parts = {{"codes", ".codes", DType::U8, {out, quant::IntN::row_bytes(bits, in)}}, {"scales", ".scales", DType::F16, {out, ng}}};
  if (!symmetric) f.parts.push_back({"zeros", ".zeros", DType::U8, {out, ng}});
  f.make = [this, bits, group, symmetric, out, in, ng]() -> std::shared_ptr<const core::Encoding> {
    std::vector<uint8_t> q(static_cast<size_t>(out * in)), z(static_cast<size_t>(out * ng));
    std::vector<float> s(static_cast<size_t>(out * ng));
    codes(0, out, q.data());
    for (int64_t o = 0; o < out; ++o)
      for (int64_t g = 0; g < ng; ++g) s[o * ng + g] = scale(o, g), z[o * ng + g] = static_cast<uint8_t>(zero(o, g));
    return quant::IntN::pack(bits, group, symmetric, out, in, q.data(), s.data(), symmetric ? nullptr : z.data());
  };
  return f;
}

void PackedIntLinear::dequantize_rows(int64_t r0, int64_t r1, float* dst) const {
  check_rows(r0, r1);
  const int64_t in = cols(), ng = ngroups_, glen = in / ng;
  constexpr int64_t kChunk = 64;  // rows decoded together (bounds the code buffer)
  std::vector<uint8_t> q(static_cast<size_t>(std::min<int64_t>(kChunk, std::max<int64_t>(r1 - r0, 1)) * in));
  std::vector<float> s(static_cast<size_t>(ng));
  std::vector<int> z(static_cast<size_t>(ng));
  for (int64_t c0 = r0; c0 < r1; c0 += kChunk) {
    const int64_t c1 = std::min(r1, c0 + kChunk);
    codes(c0, c1, q.data());
    for (int64_t o = c0; o < c1; ++o) {
      for (int64_t g = 0; g < ng; ++g) s[g] = scale(o, g), z[g] = zero(o, g);
      const uint8_t* qr = q.data() + (o - c0) * in;
      float* d = dst + (o - r0) * in;
      if (g_idx_.empty()) {
        for (int64_t g = 0; g < ng; ++g)
          for (int64_t i = g * glen; i < (g + 1) * glen; ++i) d[i] = s[g] * static_cast<float>(qr[i] - z[g]);
      } else {
        for (int64_t i = 0; i < in; ++i) d[i] = s[g_idx_[i]] * static_cast<float>(qr[i] - z[g_idx_[i]]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------

namespace {

// The module a "<module>.<suffix>" name belongs to, or "" when the name does not end in suffix.
std::string packed_module_of(const std::string& name, const std::string& suffix) {
  return name.size() > suffix.size() && name.ends_with(suffix) ? name.substr(0, name.size() - suffix.size()) : "";
}

int64_t json_int(const nlohmann::json& j, const std::string& key, int64_t dflt, const std::string& where) {
  if (!j.contains(key) || j.at(key).is_null()) return dflt;
  if (!j.at(key).is_number_integer())
    throw Error::corruption(where + "." + key + ": expected an integer, found " + j.at(key).dump());
  return j.at(key).get<int64_t>();
}

bool json_bool(const nlohmann::json& j, const std::string& key, bool dflt, const std::string& where) {
  if (!j.contains(key) || j.at(key).is_null()) return dflt;
  if (!j.at(key).is_boolean()) throw Error::corruption(where + "." + key + ": expected true or false, found " + j.at(key).dump());
  return j.at(key).get<bool>();
}

std::string json_str(const nlohmann::json& j, const std::string& key, const std::string& dflt, const std::string& where) {
  if (!j.contains(key) || j.at(key).is_null()) return dflt;
  if (!j.at(key).is_string()) throw Error::corruption(where + "." + key + ": expected a string, found " + j.at(key).dump());
  return j.at(key).get<std::string>();
}

// compressed-tensors' target matching (src/compressed_tensors/utils/match.py, match_name and
// match_targets, read at commit 0186d7ae): "re:<pattern>"
// matches a module name from its start (Python re.match), "Linear" every Linear (every module
// stored with weights here), anything else one module name exactly.
bool ct_matches(const std::string& target, const std::string& module, const std::string& where) {
  if (target == "Linear") return true;
  if (target.rfind("re:", 0) == 0) {
    try {
      const std::regex re(target.substr(3));
      return std::regex_search(module, re, std::regex_constants::match_continuous);
    } catch (const std::regex_error&) {
      throw Error::corruption(where + ": \"" + target + "\" is not a regular expression");
    }
  }
  return target == module;
}

}  // namespace

bool PackedInput::reads(const std::string& m) { return m == "compressed-tensors" || m == "gptq" || m == "awq"; }

std::unique_ptr<PackedInput> PackedInput::open(const Checkpoint& ckpt) {
  const nlohmann::json& j = ckpt.config();
  if (!j.contains("quantization_config") || !j.at("quantization_config").is_object()) return nullptr;
  const nlohmann::json& q = j.at("quantization_config");
  const std::string method = q.value("quant_method", nlohmann::json()).is_string() ? q.at("quant_method").get<std::string>() : "";
  if (!reads(method)) return nullptr;
  std::unique_ptr<PackedInput> p(new PackedInput(ckpt, method));
  if (method == "compressed-tensors") p->open_compressed_tensors(q);
  else p->open_gptq_awq(q);
  if (p->modules_.empty())
    throw Error::corruption(ckpt.config_path() + ": quantization_config.quant_method \"" + method +
                            "\": no quantized module is stored (" +
                            (method == "compressed-tensors" ? "no <module>.weight_packed, no FP8 <module>.weight with "
                                                              "<module>.weight_scale"
                                                            : "no <module>.qweight") +
                            ")");
  return p;
}

void PackedInput::open_compressed_tensors(const nlohmann::json& q) {
  const std::string where = ckpt_.config_path() + ": quantization_config";
  if (q.contains("sparsity_config") && q.at("sparsity_config").is_object() && !q.at("sparsity_config").empty()) {
    const std::string sf = json_str(q.at("sparsity_config"), "format", "dense", where + ".sparsity_config");
    if (sf != "dense")
      throw Error::unsupported(where + ".sparsity_config.format: \"" + sf + "\" is not read (dense weights only)");
  }
  const std::string top_format = json_str(q, "format", "", where);
  if (!q.contains("config_groups") || !q.at("config_groups").is_object() || q.at("config_groups").empty())
    throw Error::corruption(where + ".config_groups: missing or empty");
  std::vector<std::string> ignore;
  if (q.contains("ignore") && !q.at("ignore").is_null()) {
    if (!q.at("ignore").is_array()) throw Error::corruption(where + ".ignore: expected a list of names");
    for (const auto& x : q.at("ignore")) {
      if (!x.is_string()) throw Error::corruption(where + ".ignore: expected a list of names, found " + x.dump());
      ignore.push_back(x.get<std::string>());
    }
  }
  // The config groups, each with its parsed weight scheme.
  struct Group {
    std::string name, where;
    std::vector<std::string> targets;
    Module m;
    bool is_float = false;
  };
  std::vector<Group> groups;
  for (const auto& [gname, g] : q.at("config_groups").items()) {
    Group G;
    G.name = gname;
    G.where = where + ".config_groups." + gname;
    if (!g.is_object() || !g.contains("targets") || !g.at("targets").is_array())
      throw Error::corruption(G.where + ".targets: missing (expected a list of module names or patterns)");
    for (const auto& t : g.at("targets")) {
      if (!t.is_string()) throw Error::corruption(G.where + ".targets: expected strings, found " + t.dump());
      G.targets.push_back(t.get<std::string>());
    }
    if (!g.contains("weights") || !g.at("weights").is_object())
      throw Error::unsupported(G.where + ".weights: missing (only weight quantization is read)");
    const nlohmann::json& w = g.at("weights");
    const std::string ww = G.where + ".weights";
    const std::string format = json_str(g, "format", top_format, G.where);
    const std::string type = json_str(w, "type", "int", ww);
    const int64_t bits = json_int(w, "num_bits", 8, ww);
    const std::string strategy = json_str(w, "strategy", "tensor", ww);
    if (type == "int") {
      if (format != "pack-quantized")
        throw Error::unsupported(where + ".format: \"" + format + "\" for int weights is not read (pack-quantized is)");
      if (bits != 4 && bits != 8)
        throw Error::unsupported(ww + ".num_bits: " + std::to_string(bits) + " (4 and 8 are read)");
      G.m.layout.layout = PackedLayout::CompressedTensors;
      G.m.layout.bits = static_cast<int>(bits);
      G.m.symmetric = json_bool(w, "symmetric", true, ww);
      if (strategy == "group") {
        G.m.layout.group = json_int(w, "group_size", 0, ww);
        if (G.m.layout.group < 1) throw Error::corruption(ww + ".group_size: strategy \"group\" needs a positive group_size");
      } else if (strategy == "channel") {
        G.m.layout.group = 0;
      } else {
        throw Error::unsupported(ww + ".strategy: \"" + strategy + "\" for int weights is not read (group and channel are)");
      }
    } else if (type == "float") {
      if (format != "float-quantized")
        throw Error::unsupported(where + ".format: \"" + format + "\" for float weights is not read (float-quantized is)");
      if (bits != 8) throw Error::unsupported(ww + ".num_bits: " + std::to_string(bits) + " float (FP8 E4M3 is read)");
      G.is_float = true;
      G.m.kind = Module::Fp8;
      G.m.fp8_strategy = strategy;
      if (g.contains("input_activations") && g.at("input_activations").is_object() &&
          !json_bool(g.at("input_activations"), "dynamic", false, G.where + ".input_activations"))
        G.m.static_inputs = G.where + ".input_activations";
      if (strategy == "block") {
        const auto& bs = w.contains("block_structure") ? w.at("block_structure") : nlohmann::json();
        if (!bs.is_array() || bs.size() != 2 || !bs[0].is_number_integer() || !bs[1].is_number_integer() ||
            bs[0].get<int64_t>() < 1 || bs[1].get<int64_t>() < 1)
          throw Error::corruption(ww + ".block_structure: expected two positive integers, found " + bs.dump());
        G.m.block_rows = bs[0].get<int64_t>(), G.m.block_cols = bs[1].get<int64_t>();
      } else if (strategy != "tensor" && strategy != "channel") {
        throw Error::unsupported(ww + ".strategy: \"" + strategy + "\" for FP8 weights is not read (tensor, channel, block are)");
      }
    } else {
      throw Error::unsupported(ww + ".type: \"" + type + "\" is not read (int and float are)");
    }
    groups.push_back(std::move(G));
  }
  // The quantized modules, from the tensors present.
  std::vector<std::pair<std::string, bool>> found;  // module, float
  for (const auto& name : ckpt_.names()) {
    if (std::string m = packed_module_of(name, ".weight_packed"); !m.empty()) found.push_back({m, false});
    else if (std::string m2 = packed_module_of(name, ".weight_scale"); !m2.empty() && ckpt_.has(m2 + ".weight") &&
                                                               ckpt_.info(m2 + ".weight").dtype == DType::F8_E4M3)
      found.push_back({m2, true});
  }
  // The most specific target wins, as match_targets orders them: an exact name, then a pattern,
  // then the class "Linear"; among equals the first group.
  auto target_of = [&](const std::string& module) {
    const Group* hit = nullptr;
    int best = 3;
    for (const auto& G : groups)
      for (const auto& t : G.targets) {
        const int rank = t == "Linear" ? 2 : t.rfind("re:", 0) == 0 ? 1 : 0;
        if (rank < best && ct_matches(t, module, G.where + ".targets")) hit = &G, best = rank;
      }
    return hit;
  };
  // A module whose scale, shape or zero point is stored without its codes (no weight_packed, no
  // weight): the missing tensor is the one its scheme stores the codes in (weight_packed for an
  // int scheme or a weight_shape, weight for FP8), named with the file of its companions.
  for (const auto& name : ckpt_.names())
    for (const char* companion : {".weight_scale", ".weight_shape", ".weight_zero_point"})
      if (const std::string module = packed_module_of(name, companion);
          !module.empty() && !ckpt_.has(module + ".weight_packed") && !ckpt_.has(module + ".weight")) {
        const Group* g = target_of(module);
        const bool fp8 = g && g->is_float && !ckpt_.has(module + ".weight_shape");
        throw Error::corruption(ckpt_.shard_path(name).string() + ": tensor " + module +
                                (fp8 ? ".weight" : ".weight_packed") + ": missing (" + name + " is stored; weight " +
                                module + ".weight, compressed-tensors)");
      }
  // An FP8 weight stored without its scale: its values mean nothing (and it would be read as a
  // plain tensor of codes).
  for (const auto& name : ckpt_.names())
    if (const std::string module = packed_module_of(name, ".weight");
        !module.empty() && ckpt_.info(name).dtype == DType::F8_E4M3 && !ckpt_.has(module + ".weight_scale"))
      throw Error::corruption(ckpt_.shard_path(name).string() + ": tensor " + module + ".weight_scale: missing (" + name +
                              " is stored as F8_E4M3, compressed-tensors float-quantized)");
  for (const auto& [module, is_float] : found) {
    const std::string file = ckpt_.shard_path(module + (is_float ? ".weight" : ".weight_packed")).string();
    for (const auto& ig : ignore)
      if (ct_matches(ig, module, where + ".ignore"))
        throw Error::corruption(file + ": module " + module + ": stored quantized but quantization_config.ignore names it (\"" +
                                ig + "\")");
    const Group* hit = target_of(module);
    if (!hit)
      throw Error::corruption(file + ": module " + module + ": stored quantized but no quantization_config.config_groups "
                              "entry targets it");
    if (hit->is_float != is_float)
      throw Error::corruption(file + ": module " + module + ": stored as " + (is_float ? "FP8" : "packed int") +
                              " but " + hit->where + " is a " + (hit->is_float ? "float" : "int") + " scheme");
    Module m = hit->m;
    modules_[module] = m;
  }
  // A target naming one module exactly: that module must be stored (quantized).
  for (const auto& G : groups)
    for (const auto& t : G.targets)
      if (t != "Linear" && t.rfind("re:", 0) != 0 && !modules_.count(t))
        throw Error::corruption(G.where + ".targets: \"" + t + "\" names no quantized module stored in the checkpoint");
  open_kv_cache_scheme(q, where);
}

void PackedInput::open_kv_cache_scheme(const nlohmann::json& q, const std::string& where) {
  // KV-cache scales (compressed-tensors `_initialize_attn_scales`: the attention module's k_scale
  // and v_scale, one value each, the module's dtype).
  std::vector<std::string> stored;
  for (const auto& name : ckpt_.names())
    if (is_kv_cache_scale(name)) stored.push_back(name);
  const nlohmann::json kv = q.contains("kv_cache_scheme") ? q.at("kv_cache_scheme") : nlohmann::json();
  if (kv.is_null()) {
    if (!stored.empty())
      throw Error::corruption(ckpt_.shard_path(stored.front()).string() + ": tensor " + stored.front() +
                              ": a KV-cache scale, but " + where + ".kv_cache_scheme is null or absent");
    return;
  }
  const std::string kw = where + ".kv_cache_scheme";
  if (!kv.is_object()) throw Error::corruption(kw + ": expected an object or null, found " + kv.dump());
  const std::string type = json_str(kv, "type", "int", kw);
  const int64_t bits = json_int(kv, "num_bits", 8, kw);
  const std::string strategy = json_str(kv, "strategy", "tensor", kw);
  if (bits != 8 || (type != "float" && type != "int"))
    throw Error::unsupported(kw + ": " + std::to_string(bits) + "-bit " + type + " is not read (8-bit float or int is)");
  if (strategy != "tensor")
    throw Error::unsupported(kw + ".strategy: \"" + strategy + "\" is not read (tensor: one k_scale and v_scale per layer)");
  if (stored.empty())
    throw Error::corruption(kw + ": a KV-cache scheme, but no tensor ends in .k_scale or .v_scale");
  for (const auto& name : stored) {
    const TensorInfo& info = ckpt_.info(name);
    const std::string file = ckpt_.shard_path(name).string();
    if (info.dtype != DType::F32 && info.dtype != DType::BF16 && info.dtype != DType::F16)
      throw Error::corruption(file + ": tensor " + name + ": KV-cache scale of dtype " + core::dtype_name(info.dtype) +
                              " (F32, BF16 or F16 expected)");
    int64_t n = 1;
    for (int64_t d : info.shape) n *= d;
    if (n != 1 || info.shape.size() > 1)
      throw Error::corruption(file + ": tensor " + name + ": KV-cache scale of shape " + core::shape_str(info.shape) +
                              " (strategy tensor: one value, [1] or [])");
    const Tensor f = ckpt_.tensor(name).converted(DType::F32);
    float v = 0.0f;
    std::memcpy(&v, f.data(), sizeof v);
    if (!std::isfinite(v) || v <= 0.0f)
      throw Error::corruption(file + ": tensor " + name + ": KV-cache scale " + std::to_string(v) + " (a positive finite value expected)");
  }
  kv_scales_ = std::move(stored);
}

void PackedInput::open_gptq_awq(const nlohmann::json& q) {
  const std::string where = ckpt_.config_path() + ": quantization_config";
  const bool awq = method_ == "awq";
  Module m;
  m.layout.layout = awq ? PackedLayout::Awq : PackedLayout::Gptq;
  // AutoAWQ writes w_bit / q_group_size, transformers' AwqConfig bits / group_size.
  const std::string bits_key = !awq || q.contains("bits") ? "bits" : "w_bit";
  const std::string group_key = !awq || q.contains("group_size") ? "group_size" : "q_group_size";
  if (!q.contains(bits_key) || q.at(bits_key).is_null())
    throw Error::corruption(where + ".bits: missing (" + (awq ? "nor w_bit; AWQ GEMM with 4 bits is read" : "4 and 8 are read") +
                            ")");
  const int64_t bits = json_int(q, bits_key, -1, where);
  if (bits != 4 && (awq || bits != 8))
    throw Error::unsupported(where + "." + bits_key + ": " + std::to_string(bits) + " (" +
                             (awq ? "AWQ GEMM with 4 bits is read" : "4 and 8 are read") + ")");
  m.layout.bits = static_cast<int>(bits);
  const int64_t group = json_int(q, group_key, -1, where);
  if (group == 0 || group < -1) throw Error::corruption(where + "." + group_key + ": " + std::to_string(group) + " (a positive size or -1)");
  m.layout.group = group == -1 ? 0 : group;
  bool desc_act = false;
  if (awq) {
    const std::string version = json_str(q, "version", "gemm", where);
    std::string v = version;
    std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    if (v != "gemm") throw Error::unsupported(where + ".version: \"" + version + "\" is not read (AWQ GEMM is)");
    if (!json_bool(q, "zero_point", true, where))
      throw Error::unsupported(where + ".zero_point: false is not read (AWQ GEMM with zero points is)");
  } else {
    const std::string fmt = json_str(q, "checkpoint_format", json_str(q, "format", "gptq", where), where);
    if (fmt != "gptq" && fmt != "gptq_v2")
      throw Error::unsupported(where + ".checkpoint_format: \"" + fmt + "\" is not read (gptq and gptq_v2 are)");
    m.layout.zero_plus_one = fmt == "gptq";
    desc_act = json_bool(q, "desc_act", false, where);
    (void)json_bool(q, "sym", true, where);  // decoding reads the stored zero points either way
  }
  // A module whose scales or zero points are stored without its packed codes (and without a
  // dense weight): the missing tensor is the qweight, named with the file of its companions.
  for (const auto& name : ckpt_.names())
    for (const char* companion : {".scales", ".qzeros"})
      if (const std::string module = packed_module_of(name, companion);
          !module.empty() && !ckpt_.has(module + ".qweight") && !ckpt_.has(module + ".weight"))
        throw Error::corruption(ckpt_.shard_path(name).string() + ": tensor " + module + ".qweight: missing (" + name +
                                " is stored; weight " + module + ".weight, " + method_ + ")");
  for (const auto& name : ckpt_.names()) {
    const std::string module = packed_module_of(name, ".qweight");
    if (module.empty()) continue;
    if (!awq && desc_act && !ckpt_.has(module + ".g_idx"))
      throw Error::corruption(ckpt_.shard_path(name).string() + ": tensor " + module +
                              ".g_idx: missing, but quantization_config.desc_act is true (act-order needs g_idx)");
    modules_[module] = m;
  }
}

std::optional<Tensor> PackedInput::weight(const std::string& name, std::set<std::string>& used) const {
  const std::string module = packed_module_of(name, ".weight");
  auto it = module.empty() ? modules_.end() : modules_.find(module);
  if (it == modules_.end()) return std::nullopt;
  return it->second.kind == Module::Fp8 ? fp8_weight(module, it->second, used) : int_weight(module, it->second, used);
}

void PackedInput::check_finite_scale(const std::string& name, const Tensor& s) const {
  const int64_t bad = core::first_non_finite(s.dtype(), s.data(), static_cast<size_t>(s.numel()));
  if (bad >= 0)
    throw Error::corruption(ckpt_.shard_path(name).string() + ": tensor " + name + ": non-finite value at index " +
                            std::to_string(bad) + " (a " + method_ + " scale)");
}

Tensor PackedInput::int_weight(const std::string& module, const Module& m, std::set<std::string>& used) const {
  const bool ct = m.layout.layout == PackedLayout::CompressedTensors;
  const std::string packed = module + (ct ? ".weight_packed" : ".qweight");
  const std::string file = ckpt_.shard_path(packed).string();
  const std::vector<std::pair<std::string, std::string>> roles =
      ct ? std::vector<std::pair<std::string, std::string>>{{"packed", ".weight_packed"}, {"scales", ".weight_scale"},
                                                            {"shape", ".weight_shape"}, {"zeros", ".weight_zero_point"},
                                                            {"g_idx", ".weight_g_idx"}}
         : std::vector<std::pair<std::string, std::string>>{
               {"packed", ".qweight"}, {"scales", ".scales"}, {"zeros", ".qzeros"}, {"g_idx", ".g_idx"}};
  std::map<std::string, Tensor> parts;
  for (const auto& [role, suffix] : roles)
    if (ckpt_.has(module + suffix)) parts[role] = ckpt_.tensor(module + suffix);
  for (const auto& [role, suffix] : roles)
    if (parts.count(role)) used.insert(module + suffix);
  if (!parts.count("scales") || (!parts.count("zeros") && !(ct && m.symmetric)))
    throw Error::corruption(file + ": tensor " + module + (ct ? parts.count("scales") ? ".weight_zero_point" : ".weight_scale"
                                                              : parts.count("scales") ? ".qzeros" : ".scales") +
                            ": missing (weight " + module + ".weight, " + method_ + ")");
  // Non-finite scales are refused as the stored tensor they are in, when the model is read.
  check_finite_scale(module + (ct ? ".weight_scale" : ".scales"), parts.at("scales"));
  // A symmetric compressed-tensors scheme decodes with the implied zero point (signed 0); a
  // zero-point tensor stored beside it is not read.
  if (ct && m.symmetric) parts.erase("zeros");
  // The logical shape from the packed tensor (compressed-tensors: weight_shape, checked again by
  // the encoding against the packed tensors).
  const Tensor& p = parts.at("packed");
  const int64_t pf = 32 / m.layout.bits;
  int64_t out = 0, in = 0;
  if (p.rank() != 2 || p.dtype() != DType::I32)
    throw Error::corruption(file + ": tensor " + packed + ": expected a rank-2 I32 tensor, found " +
                            core::dtype_name(p.dtype()) + " " + core::shape_str(p.shape()));
  if (ct) {
    if (!parts.count("shape"))
      throw Error::corruption(file + ": tensor " + module + ".weight_shape: missing (weight " + module + ".weight)");
    const Tensor& s = parts.at("shape");
    if (s.numel() == 2 && (s.dtype() == DType::I64 || s.dtype() == DType::I32)) {
      out = p.dim(0);
      if (s.dtype() == DType::I64) std::memcpy(&in, s.data() + 8, 8);
      else {
        int32_t x;
        std::memcpy(&x, s.data() + 4, 4);
        in = x;
      }
      if (in < 1 || (in + pf - 1) / pf != p.dim(1))
        throw Error::corruption(file + ": tensor " + packed + ": shape " + core::shape_str(p.shape()) + " does not hold " +
                                std::to_string(in) + " inputs (weight_shape) at " + std::to_string(pf) + " per int32");
    }
  } else if (m.layout.layout == PackedLayout::Gptq) {
    in = p.dim(0) * pf, out = p.dim(1);
  } else {
    in = p.dim(0), out = p.dim(1) * 8;
  }
  try {
    auto enc = std::make_shared<const PackedIntLinear>(m.layout, out, in, std::move(parts));
    return Tensor::encoded(enc, DType::I32);
  } catch (const Error& e) {
    throw Error::corruption(file + ": weight " + module + ".weight (" + method_ + "): " + e.message());
  }
}

Tensor PackedInput::fp8_weight(const std::string& module, const Module& m, std::set<std::string>& used) const {
  const std::string wname = module + ".weight", sname = module + ".weight_scale";
  const std::string file = ckpt_.shard_path(sname).string();
  Tensor w = ckpt_.tensor(wname);
  Tensor s = ckpt_.tensor(sname);
  used.insert(wname);
  used.insert(sname);
  if (ckpt_.has(module + ".input_scale")) used.insert(module + ".input_scale");
  else if (!m.static_inputs.empty())
    throw Error::corruption(ckpt_.shard_path(wname).string() + ": tensor " + module + ".input_scale: missing (" + m.static_inputs +
                            " are static, dynamic false: each module stores its activation scale)");
  if (w.rank() != 2)
    throw Error::corruption(ckpt_.shard_path(wname).string() + ": tensor " + wname + ": FP8 weight of shape " +
                            core::shape_str(w.shape()) + ", expected [out, in]");
  const int64_t out = w.dim(0), in = w.dim(1);
  int64_t br = m.block_rows, bc = m.block_cols;
  Shape want;
  if (m.fp8_strategy == "tensor") {
    br = out, bc = in, want = {1, 1};
    if (s.numel() != 1)
      throw Error::corruption(file + ": tensor " + sname + ": shape " + core::shape_str(s.shape()) +
                              ", expected one value (strategy \"tensor\")");
  } else if (m.fp8_strategy == "channel") {
    br = 1, bc = in, want = {out, 1};
    if (s.shape() != Shape{out, 1} && s.shape() != Shape{out})
      throw Error::corruption(file + ": tensor " + sname + ": shape " + core::shape_str(s.shape()) + ", expected [" +
                              std::to_string(out) + ", 1] (strategy \"channel\", weight " + core::shape_str(w.shape()) + ")");
  } else {
    want = {(out + br - 1) / br, (in + bc - 1) / bc};
  }
  check_finite_scale(sname, s);
  if (s.numel() == core::shape_numel(want) && s.shape() != want) s = s.reshaped(want);
  if (s.dtype() == DType::F16) s = s.converted(DType::F32);  // exact; Fp8Block takes F32 or BF16 scales
  try {
    return w.with_block_scale(s, br, bc);
  } catch (const Error& e) {
    throw Error::corruption(file + ": tensor " + sname + ": " + e.message() + " (weight " + wname + ")");
  }
}

}  // namespace moe::io
