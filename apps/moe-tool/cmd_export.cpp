// moe-tool export MODEL OUT [--format gguf|compressed-tensors|gptq]:
// - gguf (OUT.gguf, --type TYPE [--tensor-type REGEX=TYPE]): a GGUF v3 file llama.cpp loads
//   (docs/gguf.md). Families and names follow llama.cpp's architecture table (llama-arch.cpp) and
//   converter (convert_hf_to_gguf.py); every block is rounded by our own codecs
//   (quant/gguf_blocks.h). Streams: memory is one tensor (one expert of a stacked tensor) at a time.
// - compressed-tensors / gptq (OUT a folder): the model's intN codes as they are, in the int4/int8
//   layouts vLLM and transformers load (io/compressed_tensors.h, docs/compressed-tensors.md); every
//   other weight dense under its stock name. Memory: one weight at a time.
#include <chrono>
#include <iostream>
#include <map>
#include <regex>
#include <set>

#include "command.h"
#include "core/error.h"
#include "core/progress.h"
#include "io/checkpoint.h"
#include "io/checkpoint_writer.h"
#include "io/compressed_tensors.h"
#include "io/gguf.h"
#include "io/gguf_names.h"
#include "io/output_dir.h"
#include "model/model.h"
#include "quant/gguf_blocks.h"
#include "quant/intn.h"
#include "runtime/forward.h"
#include "tokenizer/tokenizer.h"

namespace moe::app {

namespace {

using core::Error;
using io::GgufValue;
using quant::GgmlType;
namespace fs = std::filesystem;

// A type the writer can produce, from a flag value.
GgmlType writable_type(const std::string& name, const std::string& flag) {
  const auto* info = quant::parse_ggml_type(name);
  if (!info) throw Error::invalid(flag + ": unknown ggml type '" + name + "' (written: " + quant::ggml_codec_names() + ")");
  if (!info->codec)
    throw Error::unsupported(flag + ": " + info->name + " is not written yet (written: " + quant::ggml_codec_names() + ")");
  return info->type;
}

struct TypeOverride {
  std::string pattern;
  std::regex re;
  GgmlType type;
};

std::vector<TypeOverride> parse_overrides(const std::vector<std::string>& specs) {
  std::vector<TypeOverride> out;
  for (const auto& s : specs) {
    const auto eq = s.rfind('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == s.size())
      throw Error::invalid("--tensor-type '" + s + "': expected REGEX=TYPE");
    const std::string pat = s.substr(0, eq);
    std::regex re;
    try {
      re = std::regex(pat);
    } catch (const std::regex_error& e) {
      throw Error::invalid("--tensor-type '" + s + "': bad regex: " + e.what());
    }
    out.push_back({pat, std::move(re), writable_type(s.substr(eq + 1), "--tensor-type '" + s + "'")});
  }
  return out;
}

// One output tensor: the source tensors stacked along the slowest dimension (experts) or one.
struct Item {
  io::GgufTensorInfo info;
  std::vector<core::Tensor> parts;
  int64_t permute_heads = 0;  // > 0: rows permuted for llama.cpp's RoPE, this many heads
};

// The type of one tensor whose rows hold `row` values: 1-D tensors and routers stay F32 (llama.cpp's
// graph and llama-quantize keep them so); then the first matching --tensor-type; token_embd and
// output, when the main type is a block type other than Q8_0, at Q6_K where the rows are a multiple
// of 256 (as llama-quantize puts output), else Q8_0; else the main type.
GgmlType choose_type(const std::string& name, size_t n_dims, int64_t row, GgmlType main, const std::vector<TypeOverride>& ovr) {
  if (n_dims < 2 || name.find("ffn_gate_inp") != std::string::npos) return GgmlType::F32;
  for (const auto& o : ovr)
    if (std::regex_search(name, o.re)) return o.type;
  if ((name == "token_embd.weight" || name == "output.weight") && quant::ggml_type_info(main).block > 1)
    return main != GgmlType::Q8_0 && row % quant::ggml_type_info(GgmlType::Q6_K).block == 0 ? GgmlType::Q6_K : GgmlType::Q8_0;
  return main;
}

// Rows of a [heads * d, cols] q or k projection reordered as llama.cpp's converter does for the
// interleaved (non-NeoX) RoPE of arch llama: within each head, row 2i + s takes row s * d/2 + i.
std::vector<float> permute_rows(const std::vector<float>& w, int64_t heads, int64_t rows, int64_t cols) {
  const int64_t d = rows / heads, half = d / 2;
  std::vector<float> out(w.size());
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < half; ++i)
      for (int64_t s = 0; s < 2; ++s)
        std::copy_n(w.data() + (h * d + s * half + i) * cols, cols, out.data() + (h * d + 2 * i + s) * cols);
  return out;
}

// The block type an encoded weight's codes are already on, so they are copied, not re-quantized:
// moe-tool's symmetric int4 / int8 groups of 32 (f16 scale, implied zero point 8 / 128) are Q4_0
// / Q8_0 blocks exactly. nullopt for a plain tensor or any other encoding.
std::optional<GgmlType> direct_type(const core::Tensor& t) {
  const auto* q = dynamic_cast<const quant::IntN*>(t.encoding());
  if (!q || !q->symmetric() || q->group() != 32 || q->cols() % 32 != 0) return std::nullopt;
  if (q->bits() == 4) return GgmlType::Q4_0;
  if (q->bits() == 8) return GgmlType::Q8_0;
  return std::nullopt;
}

// Refuses what this exporter cannot write faithfully, before any work (encodings without a block
// type are refused by the plan, naming the tensor, before the file is created).
void refuse_unsupported(const model::Model& m, const std::string& src) {
  m.refuse_novices(src, "GGUF has no constant expert; prune them instead");
  int64_t experts = -1;
  for (const auto& layer : m.layers()) {
    const std::string where = "layer " + std::to_string(layer.index);
    if (!layer.moe)
      throw Error::unsupported(src + ": " + where + " is a dense layer; llama.cpp's MoE architectures need experts in every layer");
    if (experts >= 0 && layer.moe->num_experts() != experts)
      throw Error::unsupported(src + ": " + where + " has " + std::to_string(layer.moe->num_experts()) +
                               " experts, other layers " + std::to_string(experts) + "; GGUF has one expert_count per model");
    experts = layer.moe->num_experts();
  }
  if (!m.extras().empty())
    throw Error::unsupported(src + ": tensor " + m.extras().front().first + " has no GGUF name in this exporter");
}

// tokenizer.ggml.* for a byte-level BPE tokenizer (llama.cpp's "gpt2" model).
void tokenizer_metadata(io::Env& env, const fs::path& dir, int64_t n_vocab, io::GgufMetadata& kv) {
  const fs::path tj = dir / "tokenizer.json";
  const auto tok = tokenizer::Tokenizer::load(dir);
  const auto j = io::parse_json_file_text(env.read_text(tj), tj.string());
  const std::string type = j.contains("model") ? j["model"].value("type", "") : "";
  if (type != "BPE") throw Error::unsupported(tj.string() + ": model.type '" + type + "': only byte-level BPE is exported");
  const std::string pre_json = j.contains("pre_tokenizer") ? j["pre_tokenizer"].dump() : "null";
  if (pre_json.find("\"ByteLevel\"") == std::string::npos)
    throw Error::unsupported(tj.string() + ": pre_tokenizer: not byte-level; SentencePiece-style tokenizers are not exported yet");
  const char* pre = nullptr;
  io::for_each_gguf_pre_tokenizer([&](const char* name, const char* regex) {
    if (pre_json.find(nlohmann::json(regex).dump()) != std::string::npos) pre = name;
  });
  if (!pre)
    throw Error::unsupported(tj.string() + ": pre_tokenizer: its Split regex is none llama.cpp knows by name here (qwen2, llama-bpe); "
                             "llama.cpp would tokenize differently");
  if (static_cast<int64_t>(tok.vocab_size()) > n_vocab)
    throw Error::corruption(tj.string() + ": " + std::to_string(tok.vocab_size()) + " tokens, more than the embedding's " +
                            std::to_string(n_vocab) + " rows");
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  for (int64_t id = 0; id < n_vocab; ++id) {
    std::string t;
    int32_t ty = 1;  // normal
    try {
      t = tok.id_to_token(static_cast<int32_t>(id));
      if (tok.is_special(static_cast<int32_t>(id))) ty = 3;  // control
    } catch (const Error&) {
      t = "[PAD" + std::to_string(id) + "]";
      ty = 5;  // unused
    }
    tokens.push_back(std::move(t));
    types.push_back(ty);
  }
  for (const auto& a : j.value("added_tokens", nlohmann::json::array())) {
    const int64_t id = a.value("id", -1);
    if (id >= 0 && id < n_vocab && !a.value("special", false)) types[id] = 4;  // user defined
  }
  std::vector<std::string> merges;
  for (const auto& m : j["model"].value("merges", nlohmann::json::array())) {
    if (m.is_string()) merges.push_back(m.get<std::string>());
    else if (m.is_array() && m.size() == 2) merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
    else throw Error::corruption(tj.string() + ": model.merges: expected \"a b\" or [a, b], found " + m.dump());
  }
  kv.emplace_back("tokenizer.ggml.model", GgufValue::string("gpt2"));
  kv.emplace_back("tokenizer.ggml.pre", GgufValue::string(pre));
  kv.emplace_back("tokenizer.ggml.tokens", GgufValue::strings(tokens));
  kv.emplace_back("tokenizer.ggml.token_type", GgufValue::i32s(types));
  kv.emplace_back("tokenizer.ggml.merges", GgufValue::strings(merges));
  // As the converter: the tokenizer's special tokens, else config.json's ids.
  auto special = [&](const char* key, std::optional<int32_t> id, const char* config_key) {
    if (!id) {
      const fs::path cj = dir / "config.json";
      const auto c = io::parse_json_file_text(env.read_text(cj), cj.string());
      if (c.contains(config_key) && c[config_key].is_number_integer()) id = c[config_key].get<int32_t>();
    }
    if (id && *id >= 0 && *id < n_vocab) kv.emplace_back(key, GgufValue::u32(static_cast<uint32_t>(*id)));
  };
  special("tokenizer.ggml.bos_token_id", tok.bos_id(), "bos_token_id");
  special("tokenizer.ggml.eos_token_id", tok.eos_id(), "eos_token_id");
  kv.emplace_back("tokenizer.ggml.add_bos_token", GgufValue::boolean(tok.adds_bos()));
  kv.emplace_back("tokenizer.ggml.add_eos_token", GgufValue::boolean(tok.adds_eos()));
}

struct ExportPlan {
  io::GgufMetadata kv;
  std::vector<Item> items;
};

ExportPlan plan_export(io::Env& env, const io::Checkpoint& ckpt, const model::Model& m, GgmlType main,
                       const std::vector<TypeOverride>& ovr) {
  const std::string src = ckpt.dir().string();
  const auto& fam = m.family();
  const io::GgufArch* arch = io::gguf_arch_for_model_type(fam.model_type);
  if (!arch)
    throw Error::unsupported(src + ": family " + fam.model_type + " is not exported to GGUF yet (exported: " +
                             io::gguf_exported_model_types() + ")");
  refuse_unsupported(m, src);
  const auto spec = core::with_context(src, [&] { return runtime::ForwardSpec::from_model(m); });
  if (spec.rope_scaling.type != "default")
    throw Error::unsupported(src + ": rope_scaling '" + spec.rope_scaling.type + "' is not exported to GGUF yet");
  if (spec.attn.sliding_window > 0)
    throw Error::unsupported(src + ": sliding_window " + std::to_string(spec.attn.sliding_window) +
                             ": llama.cpp's " + arch->arch + " graph has no sliding window");
  if (spec.routing.renormalize != arch->renormalizes)
    throw Error::unsupported(src + ": routing " + (spec.routing.renormalize ? "renormalizes" : "does not renormalize") +
                             " the top-k weights (norm_topk_prob) but llama.cpp's " + arch->arch + " graph " +
                             (arch->renormalizes ? "does" : "does not"));
  const auto& d = m.dims();
  const auto& c = m.config();
  const std::string A = arch->arch;
  ExportPlan p;
  auto& kv = p.kv;
  kv.emplace_back("general.architecture", GgufValue::string(A));
  fs::path folder = fs::absolute(ckpt.dir()).lexically_normal();
  if (folder.filename().empty()) folder = folder.parent_path();  // "models/x/"
  kv.emplace_back("general.name", GgufValue::string(folder.filename().string()));
  kv.emplace_back("general.alignment", GgufValue::u32(io::kGgufDefaultAlignment));
  kv.emplace_back("general.file_type", GgufValue::u32(io::gguf_file_type_of(main)));
  kv.emplace_back("general.quantization_version", GgufValue::u32(2));
  auto u32 = [&](const std::string& k, int64_t v) { kv.emplace_back(A + "." + k, GgufValue::u32(static_cast<uint32_t>(v))); };
  auto f32 = [&](const std::string& k, double v) { kv.emplace_back(A + "." + k, GgufValue::f32(static_cast<float>(v))); };
  const auto& moe0 = *m.layers().front().moe;
  u32("context_length", spec.max_positions > 0 ? spec.max_positions : 4096);
  u32("embedding_length", d.hidden);
  u32("block_count", d.layers);
  u32("feed_forward_length", arch->expert_width_key ? c.get_int_or("intermediate_size", moe0.expert_width()) : moe0.expert_width());
  u32("attention.head_count", d.heads);
  u32("attention.head_count_kv", d.kv_heads);
  f32("rope.freq_base", spec.rope_theta);
  f32("attention.layer_norm_rms_epsilon", spec.eps);
  u32("expert_count", moe0.num_experts());
  u32("expert_used_count", d.top_k);
  if (arch->expert_width_key) u32("expert_feed_forward_length", moe0.expert_width());
  if (arch->shared_expert && moe0.shared) u32("expert_shared_feed_forward_length", moe0.shared->width());
  if (d.head_dim * d.heads != d.hidden) {
    u32("attention.key_length", d.head_dim);
    u32("attention.value_length", d.head_dim);
  }
  if (arch->permute_qk) u32("rope.dimension_count", d.head_dim);
  if (spec.attn.clip_qkv) f32("attention.clamp_kqv", *spec.attn.clip_qkv);

  auto add = [&](const std::string& name, std::vector<core::Tensor> parts, int64_t permute_heads = 0) {
    Item it;
    it.info.name = name;
    const auto& s = parts.front().shape();
    it.info.ne.assign(s.rbegin(), s.rend());
    if (parts.size() > 1) it.info.ne.push_back(static_cast<int64_t>(parts.size()));
    // A [1, H] gate is a vector to llama.cpp ({n_embd}).
    while (it.info.ne.size() > 1 && it.info.ne.back() == 1) it.info.ne.pop_back();
    for (size_t e = 0; e < parts.size(); ++e)
      if (const core::Encoding* enc = parts[e].encoding(); enc && !direct_type(parts[e]))
        throw Error::unsupported(src + ": " + name + (parts.size() > 1 ? ": expert " + std::to_string(e) : "") +
                                 " is encoded as '" + enc->name() + "' " + enc->params().dump() +
                                 ", which has no GGUF block type here (int4/int8 symmetric groups of 32 are copied as "
                                 "q4_0/q8_0): write it dense first with `moe-tool convert " + src +
                                 " DENSE --materialize`, then export DENSE");
    const std::optional<GgmlType> direct = direct_type(parts.front());
    for (const auto& part : parts)
      if (direct_type(part) != direct)
        throw Error::unsupported(src + ": " + name + ": its experts are stored in different encodings; one GGUF tensor "
                                 "has one type: write them dense first with `moe-tool convert " + src +
                                 " DENSE --materialize`");
    // Codes already on a block grid are copied as that type (--type and --tensor-type do not apply).
    it.info.type = direct ? *direct : choose_type(name, it.info.ne.size(), it.info.ne[0], main, ovr);
    const auto& ti = quant::ggml_type_info(it.info.type);
    if (it.info.ne[0] % ti.block != 0)
      throw Error::unsupported(src + ": " + name + ": rows of " + std::to_string(it.info.ne[0]) + " values are not a multiple of the " +
                               ti.name + " block size " + std::to_string(ti.block) + "; give it another type with --tensor-type");
    it.parts = std::move(parts);
    it.permute_heads = permute_heads;
    p.items.push_back(std::move(it));
  };
  auto global = [&](const char* role) {
    auto g = m.globals().find(role);
    if (g != m.globals().end()) add(io::gguf_global_name(role), {g->second});
  };
  global("embed");
  for (const auto& layer : m.layers()) {
    const std::string blk = "blk." + std::to_string(layer.index) + ".";
    for (const auto& [role, t] : layer.tensors) {
      const char* n = io::gguf_layer_name(role);
      if (!n) throw Error::unsupported(src + ": layer " + std::to_string(layer.index) + " " + role + " has no GGUF name in this exporter");
      int64_t heads = 0;
      if (arch->permute_qk && (role == "q_proj" || role == "q_bias")) heads = d.heads;
      if (arch->permute_qk && (role == "k_proj" || role == "k_bias")) heads = d.kv_heads;
      add(blk + n, {t}, heads);
    }
    const auto& moe = *layer.moe;
    add(blk + "ffn_gate_inp.weight", {moe.router});
    std::vector<core::Tensor> gate, up, down;
    for (const auto& e : moe.experts) {
      gate.push_back(e.gate);
      up.push_back(e.up);
      down.push_back(e.down);
    }
    add(blk + "ffn_gate_exps.weight", gate);
    add(blk + "ffn_up_exps.weight", up);
    add(blk + "ffn_down_exps.weight", down);
    if (moe.shared) {
      if (!arch->shared_expert) throw Error::unsupported(src + ": shared expert: llama.cpp's " + A + " has none");
      add(blk + "ffn_gate_shexp.weight", {moe.shared->gate});
      add(blk + "ffn_up_shexp.weight", {moe.shared->up});
      add(blk + "ffn_down_shexp.weight", {moe.shared->down});
      if (moe.shared_gate) add(blk + "ffn_gate_inp_shexp.weight", {*moe.shared_gate});
    }
  }
  global("final_norm");
  global("lm_head");
  const int64_t n_vocab = m.globals().at("embed").dim(0);
  core::with_context(src, [&] { tokenizer_metadata(env, ckpt.dir(), n_vocab, kv); });
  return p;
}

// Source row of output row r of a [heads * d, cols] projection permuted as permute_rows does.
int64_t permuted_source_row(int64_t r, int64_t heads, int64_t rows) {
  const int64_t d = rows / heads, h = r / d, i = (r % d) / 2, s = r % 2;
  return h * d + s * (d / 2) + i;
}

// Appends an encoded weight whose codes are already Q4_0 / Q8_0 blocks (direct_type), row by row.
void write_codes(io::GgufWriter& w, const Item& it, const quant::IntN& q) {
  const int64_t rows = q.rows(), cols = q.cols();
  const uint64_t rb = quant::ggml_row_bytes(it.info.type, cols);
  std::vector<uint8_t> codes(static_cast<size_t>(cols)), buf(static_cast<size_t>(rows) * rb);
  std::vector<float> scales(static_cast<size_t>(q.ngroups()));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t src = it.permute_heads ? permuted_source_row(r, it.permute_heads, rows) : r;
    q.codes_row(src, codes.data());
    for (int64_t g = 0; g < q.ngroups(); ++g) scales[g] = q.scale(src, g);
    core::with_context("row " + std::to_string(src), [&] {
      quant::pack_codes_row(it.info.type, codes.data(), scales.data(), cols, buf.data() + r * rb);
    });
  }
  w.append(buf.data(), buf.size());
}

// Encodes and appends one item, one part (expert) at a time.
void write_item(io::GgufWriter& w, const Item& it, const model::Model& m) {
  const int64_t cols = it.info.ne[0];
  const uint64_t rb = quant::ggml_row_bytes(it.info.type, cols);
  std::vector<uint8_t> buf;
  for (const auto& part : it.parts) {
    if (const auto* q = dynamic_cast<const quant::IntN*>(part.encoding())) {
      write_codes(w, it, *q);
      continue;
    }
    std::vector<float> x = part.to_f32();
    const int64_t rows = static_cast<int64_t>(x.size()) / cols;
    if (it.permute_heads) x = permute_rows(x, it.permute_heads, rows, cols);
    buf.resize(static_cast<size_t>(rows) * rb);
    for (int64_t r = 0; r < rows; ++r)
      core::with_context("row " + std::to_string(r), [&] {
        quant::encode_row(it.info.type, x.data() + r * cols, cols, buf.data() + r * rb);
      });
    w.append(buf.data(), buf.size());
    if (const auto& release = m.page_releaser())
      for (const core::Tensor* s : part.stored_tensors()) release(s->data(), s->nbytes());
  }
}

// ---- compressed-tensors and GPTQ folders (io/compressed_tensors.h) ----

// The one integer scheme of an export: both configs name one (bits, group, symmetry) for every
// quantized Linear.
struct PackedScheme {
  int bits = 0;
  int64_t group = 0;
  bool symmetric = true;
};

struct PackedPlan {
  io::PackedFormat fmt = io::PackedFormat::CompressedTensors;
  PackedScheme scheme;
  std::vector<model::OutTensor> outs;
  nlohmann::json manifest = nlohmann::json::object();
  std::vector<io::TensorSpec> specs;
  std::vector<std::string> quantized, ignore;  // module names (weight name without ".weight")
  nlohmann::json quantization_config;
  int64_t quantized_params = 0;
  uint64_t quantized_bytes = 0;
};

std::string module_of(const std::string& weight) {
  const std::string suffix = ".weight";
  if (weight.size() <= suffix.size() || weight.compare(weight.size() - suffix.size(), suffix.size(), suffix) != 0)
    throw Error::unsupported(weight + ": not named <module>.weight; no Linear module to write it as");
  return weight.substr(0, weight.size() - suffix.size());
}

// A dense output that is a Linear's weight in the stock model (a module the configs must name as
// unquantized): 2-D, "<module>.weight", not the embedding.
bool is_dense_linear(const model::OutTensor& o) {
  return o.weight.empty() && o.shape.size() == 2 && o.cls != "embeddings" && o.name.size() > 7 &&
         o.name.compare(o.name.size() - 7, 7, ".weight") == 0;
}

// "model.layers.3.self_attn.q_proj" -> {"model.layers.3.", "self_attn.q_proj"}; {"", module} outside the layers.
std::pair<std::string, std::string> split_layer(const std::string& module) {
  static const std::regex re(R"(^(.*\.layers\.\d+\.)(.+)$)");
  std::smatch m;
  if (std::regex_match(module, m, re)) return {m[1].str(), m[2].str()};
  return {"", module};
}

std::string regex_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::string_view(".^$|()[]{}*+?\\").find(c) != std::string_view::npos) out += '\\';
    out += c;
  }
  return out;
}

// The parts of one intN weight as stored (quant::IntN checks their shapes and dtypes), and the
// view pack_linear reads (no re-rounding).
struct IntNParts {
  std::vector<quant::IntN::Part> held;
  io::GroupCodes codes;
};
IntNParts intn_parts(const nlohmann::json& entry, const std::map<std::string, const model::OutTensor*>& by_name) {
  auto part = [&](const char* role) -> quant::IntN::Part {
    if (!entry.at("parts").contains(role)) return nullptr;
    const auto* o = by_name.at(entry["parts"][role].get<std::string>());
    return std::make_shared<const core::Tensor>(o->make());
  };
  const bool sym = entry.at("symmetric").get<bool>();
  IntNParts p;
  p.held = {part("codes"), part("scales"), sym ? nullptr : part("zeros")};
  const quant::IntN q(entry.at("bits").get<int>(), entry.at("group").get<int64_t>(), sym, entry.at("cols").get<int64_t>(),
                      p.held[0], p.held[1], p.held[2]);
  p.codes = {q.bits(), q.rows(), q.cols(), q.group(), sym, p.held[0]->data(), p.held[1]->data(),
             sym ? nullptr : p.held[2]->data()};
  return p;
}

// Everything refused before any work, then the tensors and the quantization_config.
PackedPlan plan_packed(const io::Checkpoint& ckpt, const model::Model& m, io::PackedFormat fmt) {
  const std::string src = ckpt.dir().string();
  const std::string F = io::packed_format_name(fmt);
  const std::string way_out = "quantize it as int4/int8 groups first, e.g. `moe-tool quantize " + src +
                              " OUT --codec int4 --group 128 --sym` (from a dense model; `moe-tool convert " + src +
                              " DENSE --materialize` makes one)";
  m.refuse_novices(src, F + " has no constant expert; prune them instead");
  int64_t experts = -1;
  for (const auto& layer : m.layers()) {
    if (!layer.moe) continue;
    if (experts >= 0 && layer.moe->num_experts() != experts)
      throw Error::unsupported(src + ": layer " + std::to_string(layer.index) + " has " + std::to_string(layer.moe->num_experts()) +
                               " experts, other layers " + std::to_string(experts) +
                               " (ragged counts); stock loaders need one expert count per model");
    experts = layer.moe->num_experts();
  }
  PackedPlan p;
  p.fmt = fmt;
  p.outs = m.outputs(model::OutputOptions{}, &p.manifest);
  std::map<std::string, const model::OutTensor*> first_part;
  std::string scheme_of;      // the weight that set p.scheme
  std::string dense_expert;  // the first routed expert weight stored dense
  for (const auto& o : p.outs) {
    if (o.weight.empty()) {
      if (o.cls == "experts" && is_dense_linear(o) && dense_expert.empty()) dense_expert = o.name;
      continue;
    }
    if (first_part.count(o.weight)) continue;
    first_part[o.weight] = &o;
    const auto& e = p.manifest.at(o.weight);
    const std::string enc = e.at("encoding").get<std::string>();
    const std::string params = [&] { auto c = e; c.erase("parts"); c.erase("encoding"); return c.dump(); }();
    if (enc != "intN")
      throw Error::unsupported(src + ": " + o.weight + " is encoded as '" + enc + "' " + params + ", which " + F +
                               " cannot hold (it holds int4/int8 groups): " + way_out);
    if (o.cls == "embeddings")
      throw Error::unsupported(src + ": " + o.weight + ": a quantized embedding; " + F +
                               " quantizes Linear layers only: quantize with `--embeddings keep`");
    if (fmt == io::PackedFormat::Gptq && o.cls == "lm_head")
      throw Error::unsupported(src + ": " + o.weight + ": a quantized lm_head, which the gptq config does not hold here: "
                               "quantize with `--lm-head keep`, or export --format compressed-tensors");
    const PackedScheme s{e.at("bits").get<int>(), e.at("group").get<int64_t>(), e.at("symmetric").get<bool>()};
    if (scheme_of.empty()) {
      p.scheme = s;
      scheme_of = o.weight;
    } else if (s.bits != p.scheme.bits || s.group != p.scheme.group || s.symmetric != p.scheme.symmetric) {
      throw Error::unsupported(src + ": " + o.weight + " is encoded as 'intN' " + params + ", " + scheme_of +
                               " otherwise; this export writes one scheme for every quantized Linear: " + way_out);
    }
    const int64_t out = o.shape.at(0), in = e.at("cols").get<int64_t>();
    if (const std::string why = io::packed_shape_problem(fmt, s.bits, s.group, out, in); !why.empty())
      throw Error::unsupported(src + ": " + o.weight + " (intN " + params + "): " + F + " cannot hold " + why + ": " + way_out);
  }
  if (first_part.empty())
    throw Error::unsupported(src + ": no weight is quantized (intN); " + F + " stores int4/int8 codes: " + way_out);
  if (!dense_expert.empty())
    throw Error::unsupported(src + ": " + dense_expert + ": a routed expert stored dense; vLLM's fused-MoE layer takes one " +
                             "scheme for all experts: " + way_out);
  // GPTQ v1 stores zero − 1: asymmetric zero points of 0 are refused now, before anything is written.
  std::map<std::string, const model::OutTensor*> by_name;
  for (const auto& o : p.outs) by_name[o.name] = &o;
  if (fmt == io::PackedFormat::Gptq && !p.scheme.symmetric)
    for (const auto& [w, o] : first_part) {
      const auto& zname = p.manifest.at(w).at("parts").at("zeros").get<std::string>();
      const core::Tensor z = by_name.at(zname)->make();
      const auto* zd = z.data();
      for (int64_t i = 0; i < z.numel(); ++i)
        if (zd[i] == 0)
          throw Error::unsupported(src + ": " + w + ": row " + std::to_string(i / z.dim(1)) + ", group " +
                                   std::to_string(i % z.dim(1)) + ": zero point 0, which GPTQ's v1 layout (zero − 1) cannot "
                                   "hold: export --format compressed-tensors, or quantize with --sym");
    }
  // Tensor specs in output order; per-layer module sets for the GPTQ config.
  std::map<std::string, std::set<std::string>> quantized_in_layer;
  std::set<std::string> dense_in_layers, layers;
  for (const auto& o : p.outs) {
    if (o.weight.empty()) {
      p.specs.push_back({o.name, o.dtype, o.shape});
      if (is_dense_linear(o)) {
        const std::string mod = module_of(o.name);
        p.ignore.push_back(mod);
        const auto [layer, rel] = split_layer(mod);
        if (!layer.empty()) dense_in_layers.insert(rel), layers.insert(layer);
      }
      continue;
    }
    if (first_part.at(o.weight) != &o) continue;
    const auto& e = p.manifest.at(o.weight);
    const std::string mod = module_of(o.weight);
    const int64_t out = o.shape.at(0), in = e.at("cols").get<int64_t>();
    for (auto& t : io::packed_specs(fmt, p.scheme.bits, p.scheme.group, p.scheme.symmetric, out, in)) {
      p.specs.push_back({mod + t.suffix, t.dtype, t.shape});
      p.quantized_bytes += p.specs.back().nbytes();
    }
    p.quantized_params += out * in;
    p.quantized.push_back(mod);
    const auto [layer, rel] = split_layer(mod);
    if (!layer.empty()) quantized_in_layer[layer].insert(rel), layers.insert(layer);
  }
  const auto& sc = p.scheme;
  if (fmt == io::PackedFormat::CompressedTensors) {
    // As compressed-tensors' QuantizationConfig.model_dump() writes it (quant_config.py; every key of
    // the scheme written, QuantizationArgs of quant_args.py).
    const nlohmann::json weights = {
        {"actorder", nullptr}, {"block_structure", nullptr}, {"dynamic", false},
        {"group_size", sc.group == 0 ? nlohmann::json(nullptr) : nlohmann::json(sc.group)}, {"num_bits", sc.bits},
        {"observer", "minmax"}, {"observer_kwargs", nlohmann::json::object()}, {"strategy", sc.group == 0 ? "channel" : "group"},
        {"symmetric", sc.symmetric}, {"type", "int"}};
    p.quantization_config = {
        {"config_groups", {{"group_0", {{"input_activations", nullptr}, {"output_activations", nullptr},
                                        {"targets", {"Linear"}}, {"weights", weights}}}}},
        {"format", "pack-quantized"}, {"global_compression_ratio", nullptr}, {"ignore", p.ignore}, {"kv_cache_scheme", nullptr},
        {"quant_method", "compressed-tensors"}, {"quantization_status", "compressed"}};
    return p;
  }
  // GPTQ names one set of quantized modules per decoder layer.
  std::set<std::string> per_layer;
  for (const auto& layer : layers) {
    const auto& q = quantized_in_layer[layer];
    if (layer == *layers.begin()) per_layer = q;
    else if (q != per_layer)
      throw Error::unsupported(src + ": " + layer + " quantizes other modules than " + *layers.begin() +
                               "; the gptq config names one set for every layer: export --format compressed-tensors");
  }
  p.quantization_config = {{"bits", sc.bits}, {"checkpoint_format", "gptq"}, {"desc_act", false},
                           {"group_size", sc.group == 0 ? -1 : sc.group}, {"quant_method", "gptq"}, {"sym", sc.symmetric}};
  if (!dense_in_layers.empty()) {
    // Dense Linears inside the layers (attention kept, routers): transformers (optimum) quantizes
    // the listed modules only; vLLM and GPTQModel skip the "-:" matches of `dynamic`.
    std::vector<std::string> rel;
    for (const auto& mod : p.quantized)
      if (const auto [layer, r] = split_layer(mod); layer == *layers.begin()) rel.push_back(r);
    p.quantization_config["modules_in_block_to_quantize"] = {rel};
    nlohmann::json dyn = nlohmann::json::object();
    for (const auto& r : dense_in_layers) dyn["-:.*\\.layers\\.\\d+\\." + regex_escape(r) + "$"] = nlohmann::json::object();
    p.quantization_config["dynamic"] = dyn;
  }
  return p;
}

struct PackedResult {
  uint64_t bytes = 0;  // all files written
};

// Hands the input pages of [lo, hi) and 64 KiB on each side (the kernel's default fault-around)
// back to the OS; Checkpoint::release_range clips at the file's end.
void release_around(const io::Checkpoint& ckpt, const uint8_t* lo, const uint8_t* hi) {
  constexpr uintptr_t kAround = 64 * 1024;
  const uintptr_t b = reinterpret_cast<uintptr_t>(lo), start = b > kAround ? b - kAround : 0;
  ckpt.release_range(lo, static_cast<uint64_t>(hi - lo) + kAround);
  ckpt.release_range(reinterpret_cast<const uint8_t*>(start), b - start);  // nothing when before the file
}

// Writes the planned folder: side files, config.json with the quantization_config, tensors.
void write_packed(io::Env& env, const io::Checkpoint& ckpt, const model::Model& m, const PackedPlan& p, const fs::path& dir) {
  for (const auto& f : ckpt.side_files()) {
    if (f.filename() == "config.json" || f.filename() == "moe_tool_report.json") continue;
    env.copy_file(f, dir / f.filename());
  }
  nlohmann::json cfg = m.rewritten_config(model::OutputOptions{}, &p.manifest);
  cfg["quantization_config"] = p.quantization_config;
  env.write_text(dir / "config.json", cfg.dump(2) + "\n");
  std::map<std::string, const model::OutTensor*> by_name, first_part;
  for (const auto& o : p.outs) {
    by_name[o.name] = &o;
    if (!o.weight.empty()) first_part.emplace(o.weight, &o);
  }
  io::CheckpointWriter w(env, dir, p.specs, 5'000'000'000ull);
  std::vector<io::PackedTensor> packed;  // buffers reused from weight to weight
  for (const auto& o : p.outs) {
    if (o.weight.empty()) {
      const core::Tensor t = core::with_context("tensor " + o.name, [&] { return o.make(); });
      w.write(o.name, t.dtype() == o.dtype ? t : t.converted(o.dtype));
      if (!t.owns_data()) release_around(ckpt, t.data(), t.data() + t.nbytes());
      continue;
    }
    if (first_part.at(o.weight) != &o) continue;
    const std::string mod = module_of(o.weight);
    core::with_context(o.weight, [&] {
      const IntNParts parts = intn_parts(p.manifest.at(o.weight), by_name);
      io::pack_linear(p.fmt, parts.codes, packed);
      for (const auto& t : packed) w.write(mod + t.suffix, 0, t.data.data(), t.data.size());
    });
    // One release per weight over its parts (stored next to each other) and the kernel's
    // fault-around window on both sides (pages faulted in around a neighbour's first read would
    // stay mapped otherwise): the pages stay readable, a later read faults them in again.
    const uint8_t *lo = nullptr, *hi = nullptr;
    for (const auto& [role, part] : p.manifest.at(o.weight).at("parts").items()) {
      const core::Tensor t = by_name.at(part.get<std::string>())->make();
      if (t.owns_data()) continue;
      lo = lo ? std::min(lo, t.data()) : t.data();
      hi = std::max(hi, t.data() + t.nbytes());
    }
    if (lo) release_around(ckpt, lo, hi);
  }
  w.finish();
}

io::PackedFormat parse_packed_format(const std::string& f) {
  return f == "gptq" ? io::PackedFormat::Gptq : io::PackedFormat::CompressedTensors;
}

}  // namespace

void setup_export(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  struct Opts {
    std::string in, out, type, format;
    std::vector<std::string> tensor_types;
    bool force = false, json = false;
  };
  auto o = std::make_shared<Opts>();
  sub.add_option("MODEL", o->in, "Input checkpoint folder (mixtral, qwen2_moe, qwen3_moe, olmoe)")->required();
  sub.add_option("OUT", o->out,
                 "Output: a .gguf file, or a folder for compressed-tensors and gptq (written as a temporary sibling, renamed "
                 "on success)")->required();
  sub.add_option("--format", o->format,
                 "gguf (llama.cpp), compressed-tensors (pack-quantized) or gptq (vLLM, transformers); default gguf for an "
                 "OUT ending in .gguf, else required")
      ->check(CLI::IsMember({"gguf", "compressed-tensors", "gptq"}));
  sub.add_option("--type", o->type,
                 "gguf: main tensor type: f32, f16, bf16, q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1, q4_0, q3_k, q2_k, tq2_0, "
                 "tq1_0 (required for gguf)");
  sub.add_option("--tensor-type", o->tensor_types,
                 "gguf: override by GGUF tensor name, REGEX=TYPE (std::regex search; the first match wins; 1-D tensors and "
                 "routers stay f32)");
  sub.add_flag("--force", o->force, "Replace an existing output (file or folder the tool wrote)");
  sub.add_flag("--json", o->json, "Print the result as JSON");
  sub.callback([o, &handler, &flags] {
    handler = [o, &flags] {
      (void)flags;
      const auto t0 = std::chrono::steady_clock::now();
      std::string format = o->format;
      if (format.empty()) {
        if (fs::path(o->out).extension() != ".gguf")
          throw Error::invalid("OUT '" + o->out + "': not a .gguf file; give --format compressed-tensors or --format gptq "
                               "for a folder (or --format gguf)");
        format = "gguf";
      }
      if (format != "gguf") {
        if (!o->type.empty() || !o->tensor_types.empty())
          throw Error::invalid(std::string(o->type.empty() ? "--tensor-type" : "--type") + ": gguf only; --format " + format +
                               " writes the model's intN codes as they are");
        const io::PackedFormat fmt = parse_packed_format(format);
        auto& env = io::Env::posix();
        auto ckpt = io::Checkpoint::open(env, o->in);
        auto model = model::Model::load(ckpt);
        const PackedPlan plan = plan_packed(ckpt, model, fmt);
        io::OutputDir out(env, o->out, {o->in}, o->force);
        core::with_context(o->in, [&] { write_packed(env, ckpt, model, plan, out.path()); });
        uint64_t bytes = 0;
        for (const auto& e : fs::directory_iterator(out.path())) bytes += e.is_regular_file() ? e.file_size() : 0;
        out.commit();
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const auto& sc = plan.scheme;
        const double bpp = 8.0 * static_cast<double>(plan.quantized_bytes) / static_cast<double>(plan.quantized_params);
        nlohmann::json result = {{"output", o->out}, {"format", format}, {"bits", sc.bits},
                                 {"group_size", sc.group == 0 ? -1 : sc.group}, {"symmetric", sc.symmetric},
                                 {"quantized_linears", plan.quantized.size()}, {"dense_linears", plan.ignore.size()},
                                 {"tensors", plan.specs.size()}, {"bytes", bytes},
                                 {"quantized_params", plan.quantized_params}, {"quantized_bytes", plan.quantized_bytes},
                                 {"quantized_bits_per_param", bpp}, {"seconds", secs}};
        if (o->json) std::cout << result.dump(2) << "\n";
        else
          std::cout << "wrote " << o->out << " (" << format << ", int" << sc.bits << " "
                    << (sc.group == 0 ? std::string("per row") : "groups of " + std::to_string(sc.group)) << ", "
                    << (sc.symmetric ? "symmetric" : "asymmetric") << "): " << plan.quantized.size() << " quantized Linears at "
                    << bpp << " bits/param, " << plan.ignore.size() << " dense, " << core::format_bytes(static_cast<double>(bytes))
                    << " in " << secs << " s\n";
        return 0;
      }
      if (o->type.empty()) throw Error::invalid("--type: required for --format gguf");
      const GgmlType main = writable_type(o->type, "--type");
      const auto ovr = parse_overrides(o->tensor_types);
      auto& env = io::Env::posix();
      auto ckpt = io::Checkpoint::open(env, o->in);
      auto model = model::Model::load(ckpt);
      ExportPlan plan = plan_export(env, ckpt, model, main, ovr);
      io::OutputFile out(env, o->out, {o->in}, o->force);
      std::vector<io::GgufTensorInfo> infos;
      for (const auto& it : plan.items) infos.push_back(it.info);
      io::GgufWriter w(env, out.path(), plan.kv, infos);
      for (const auto& it : plan.items)
        core::with_context(o->in + ": " + it.info.name, [&] { write_item(w, it, model); });
      const uint64_t bytes = w.finish();
      out.commit();
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::map<std::string, int> by_type;
      for (const auto& it : plan.items) ++by_type[quant::ggml_type_info(it.info.type).name];
      nlohmann::json result = {{"output", o->out}, {"tensors", plan.items.size()}, {"bytes", bytes},
                               {"types", by_type}, {"seconds", secs}};
      if (o->json) {
        std::cout << result.dump(2) << "\n";
      } else {
        std::cout << "wrote " << o->out << ": " << plan.items.size() << " tensors (";
        bool first = true;
        for (const auto& [t, n] : by_type) std::cout << (first ? "" : ", ") << n << " " << t, first = false;
        std::cout << "), " << core::format_bytes(static_cast<double>(bytes)) << " in " << secs << " s\n";
      }
      return 0;
    };
  });
}

}  // namespace moe::app
