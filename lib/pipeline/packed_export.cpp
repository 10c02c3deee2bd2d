#include "pipeline/packed_export.h"

#include "pipeline/hf_sink.h"

#include <algorithm>
#include <cstring>
#include <future>
#include <optional>
#include <regex>
#include <set>

#include "core/error.h"
#include "io/checkpoint_writer.h"
#include "io/packed_input.h"
#include "quant/intn.h"
#include "runtime/parallel.h"

namespace moe::pipeline {

using core::Error;
namespace fs = std::filesystem;

void check_packed_structure(const model::Model& m, io::PackedFormat fmt, const std::string& where) {
  m.refuse_novices(where, std::string(io::packed_format_name(fmt)) + " has no constant expert; prune them instead");
  // gpt_oss stores the routed experts of a layer as one fused tensor (bf16, or MXFP4 blocks), which
  // no quantized-Linear config names: the experts cannot be written as per-Linear codes.
  if (m.family().fused_in_out_interleaved)
    throw Error::unsupported(where + ": " + m.family().model_type + " stores each layer's routed experts fused (" +
                             "gate_up_proj / down_proj, bf16 or MXFP4 blocks), which " + io::packed_format_name(fmt) +
                             " cannot hold as per-Linear codes: write the hf format (a prune keeps MXFP4 experts as they are)");
  int64_t experts = -1;
  for (const auto& layer : m.layers()) {
    if (!layer.moe) continue;
    if (experts >= 0 && layer.moe->num_experts() != experts)
      throw Error::unsupported(where + ": layer " + std::to_string(layer.index) + " has " + std::to_string(layer.moe->num_experts()) +
                               " experts, other layers " + std::to_string(experts) +
                               " (ragged counts); stock loaders need one expert count per model");
    experts = layer.moe->num_experts();
  }
}

namespace {


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

namespace {

// A weight of a GPTQ / AWQ / compressed-tensors input whose codes moe-tool's intN cannot hold
// (io::PackedIntLinear::native_form: act-order, a scale f16 does not hold, a zero point outside
// the code range) is read decoded: Error::unsupported saying so, with the ways out that work.
// `weight` names it ("" when not known). Returns without throwing for other inputs.
void refuse_packed_input(const io::Checkpoint& ckpt, io::PackedFormat fmt, const std::string& weight) {
  const nlohmann::json q = ckpt.config().value("quantization_config", nlohmann::json());
  const nlohmann::json qm = q.is_object() ? q.value("quant_method", nlohmann::json()) : nlohmann::json();
  const std::string method = qm.is_string() ? qm.get<std::string>() : "";
  if (!io::PackedInput::reads(method)) return;
  const std::string src = ckpt.dir().string(), F = io::packed_format_name(fmt);
  const std::string label = method == "gptq" ? "GPTQ" : method == "awq" ? "AWQ" : "compressed-tensors";
  // The one cause, when the weight is known and its codes are read as io::PackedIntLinear.
  std::string why = "act-order g_idx, a scale f16 does not hold exactly, or a zero point outside the code range";
  if (!weight.empty()) {
    std::set<std::string> used;
    const auto t = io::PackedInput::open(ckpt)->weight(weight, used);
    if (const auto* p = t ? dynamic_cast<const io::PackedIntLinear*>(t->encoding()) : nullptr)
      if (std::string w = p->native_form_problem(); !w.empty()) why = std::move(w);
  }
  throw Error::unsupported(
      src + ": " + (weight.empty() ? "the weights are" : weight + " is") + " in the " + label +
      " format already (quantization_config.quant_method \"" + method +
      "\") with codes moe-tool's int4/int8 groups cannot hold (" + why + "), read decoded; " + F +
      " is written from moe-tool codes: " +
      "export the native moe-tool checkpoint they were quantized in, or re-quantize the decoded weights with `moe-tool quantize " +
      src + " OUT --method rtn --codec int4 --group 128 --sym` and export OUT");
}

}  // namespace

// Everything refused before any work, then the tensors and the quantization_config.
PackedPlan plan_packed(const io::Checkpoint& ckpt, const model::Model& m, io::PackedFormat fmt) {
  const std::string src = ckpt.dir().string();
  const std::string F = io::packed_format_name(fmt);
  const std::string bits = io::packed_codes_held(fmt);
  const std::string way_out = "quantize it as " + bits + " groups first, e.g. `moe-tool quantize " + src +
                              " OUT --codec int4 --group 128 --sym` (from a dense model; `moe-tool convert " + src +
                              " DENSE --materialize` makes one)";
  check_packed_structure(m, fmt, src);
  PackedPlan p;
  p.fmt = fmt;
  model::OutputOptions keep;
  keep.keep_codes = true;  // a GPTQ / AWQ / compressed-tensors input's codes, as intN (native_form)
  p.outs = m.outputs(keep, &p.manifest);
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
                               " cannot hold (it holds " + bits + " groups): " + way_out);
    if (o.cls == "embeddings")
      throw Error::unsupported(src + ": " + o.weight + ": a quantized embedding; " + F +
                               " quantizes Linear layers only: quantize with `--embeddings keep`");
    if (fmt != io::PackedFormat::CompressedTensors && o.cls == "lm_head")
      throw Error::unsupported(src + ": " + o.weight + ": a quantized lm_head, which the " + F +
                               " config does not hold here: quantize with `--lm-head keep`, or export --format compressed-tensors");
    const PackedScheme s{e.at("bits").get<int>(), e.at("group").get<int64_t>(), e.at("symmetric").get<bool>()};
    if (scheme_of.empty()) {
      p.scheme = s;
      scheme_of = o.weight;
    } else if (s.bits != p.scheme.bits || s.group != p.scheme.group || s.symmetric != p.scheme.symmetric) {
      throw Error::unsupported(src + ": " + o.weight + " is encoded as 'intN' " + params + ", " + scheme_of +
                               " otherwise; this export writes one scheme for every quantized Linear: " + way_out);
    }
    const int64_t out = o.shape.at(0), in = e.at("cols").get<int64_t>();
    if (const std::string why = io::packed_shape_problem(fmt, s.bits, s.group, out, in); !why.empty()) {
      // The way out names a group this weight's shape takes (the largest of 128, 64, 32, else 0 =
      // one group per row), not the default that may be the cause. AWQ holds 4 bits only: int8
      // codes go to the other layouts.
      if (fmt == io::PackedFormat::Awq && s.bits != 4)
        throw Error::unsupported(src + ": " + o.weight + " (intN " + params + "): " + F + " cannot hold " + why +
                                 ": export --format gptq or compressed-tensors (they hold int8), or quantize with "
                                 "`--codec int4 --group 128` (from a dense model)");
      int64_t fits = -1;
      for (const int64_t g : {int64_t{128}, int64_t{64}, int64_t{32}, int64_t{0}})
        if (fits < 0 && io::packed_shape_problem(fmt, s.bits, g, out, in).empty()) fits = g;
      // No group fits: the outputs (or GPTQ's inputs) are not whole words. Re-quantizing cannot
      // help; keeping the Linear dense, or a format that packs along the inputs of each row, can.
      const std::string keep = o.cls == "router"           ? "--router keep"
                               : o.cls == "attention"      ? "--attention keep"
                               : o.cls == "shared_experts" ? "--shared keep"
                                                           : "";
      const std::string fix = fits < 0 ? "no group size makes this shape fit: " +
                                             (keep.empty() ? std::string() : "quantize with `" + keep + "` (kept dense), or ") +
                                             "export --format compressed-tensors (it packs each row along its inputs)"
                                       : "quantize it with a group this shape takes, e.g. `moe-tool quantize " + src +
                                             " OUT --codec int" + std::to_string(s.bits) + " --group " + std::to_string(fits) +
                                             (s.symmetric ? " --sym" : "") + "` (from a dense model)";
      throw Error::unsupported(src + ": " + o.weight + " (intN " + params + "): " + F + " cannot hold " + why + ": " + fix);
    }
  }
  if (first_part.empty()) {
    refuse_packed_input(ckpt, fmt, "");
    throw Error::unsupported(src + ": no weight is quantized (intN); " + F + " stores " + bits + " codes: " + way_out);
  }
  if (!dense_expert.empty()) refuse_packed_input(ckpt, fmt, dense_expert);
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
  // Tensor specs in output order; per-layer module sets for the GPTQ config (AWQ names its dense
  // Linears one by one and has no per-layer rule). The decoder's layers
  // only: a vision tower's layers (llama4's vision_model.model.layers.N.) and the other Linears
  // outside the decoder model stay dense and are excluded whole (`outside`).
  std::map<std::string, std::set<std::string>> quantized_in_layer;
  std::set<std::string> dense_in_layers, layers, outside;
  const std::string decoder = m.family().layer_prefix.substr(0, m.family().layer_prefix.find("{l}"));
  const std::string decoder_model = decoder.substr(0, decoder.find('.') + 1);  // "model.", "language_model."
  auto decoder_layer = [&](const std::string& mod) {
    auto lr = split_layer(mod);
    if (mod.rfind(decoder, 0) != 0) lr.first.clear();
    return lr;
  };
  for (const auto& o : p.outs) {
    if (o.weight.empty()) {
      p.specs.push_back({o.name, o.dtype, o.shape});
      if (is_dense_linear(o)) {
        const std::string mod = module_of(o.name);
        p.ignore.push_back(mod);
        const auto [layer, rel] = decoder_layer(mod);
        if (!layer.empty()) dense_in_layers.insert(rel), layers.insert(layer);
        else if (o.cls != "lm_head" && mod.rfind(decoder_model, 0) != 0)
          outside.insert(mod.substr(0, mod.find('.')));  // vision_model, multi_modal_projector, mtp
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
    const auto [layer, rel] = decoder_layer(mod);
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
  if (fmt == io::PackedFormat::Awq) {
    // As AutoAWQ saves it and transformers' AwqConfig / vLLM's AWQConfig read it (bits, group_size,
    // zero_point, version, modules_to_not_convert). zero_point is always true: the zero points
    // are stored (symmetric codes with 8), as the GEMM kernels and our reader need.
    // modules_to_not_convert names every dense Linear by its full module name (the `ignore` of
    // compressed-tensors); both loaders match its entries as substrings of a module's name, so
    // an entry inside a quantized module's name would leave that module unquantized: refused.
    for (const auto& d : p.ignore)
      for (const auto& q : p.quantized)
        if (q.find(d) != std::string::npos)
          throw Error::unsupported(src + ": " + d + " is written dense and " + q +
                                   " quantized, but AWQ's modules_to_not_convert matches names as substrings (the "
                                   "entry " + d + " would leave " + q + " unquantized): export --format compressed-tensors");
    p.quantization_config = {{"bits", sc.bits}, {"group_size", sc.group}, {"quant_method", "awq"}, {"version", "gemm"},
                             {"zero_point", true},
                             {"modules_to_not_convert", p.ignore.empty() ? nlohmann::json(nullptr) : nlohmann::json(p.ignore)}};
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
      if (const auto [layer, r] = decoder_layer(mod); layer == *layers.begin()) rel.push_back(r);
    p.quantization_config["modules_in_block_to_quantize"] = {rel};
    nlohmann::json dyn = nlohmann::json::object();
    for (const auto& r : dense_in_layers) dyn["-:.*\\.layers\\.\\d+\\." + regex_escape(r) + "$"] = nlohmann::json::object();
    p.quantization_config["dynamic"] = dyn;
  }
  // Linears outside the decoder model (a vision tower and its projector, an MTP head stored apart)
  // are dense: excluded whole from the GPTQ scheme, by their top-level module.
  for (const auto& top : outside) p.quantization_config["dynamic"]["-:^" + regex_escape(top) + "\\..*"] = nlohmann::json::object();
  return p;
}

// Hands the input pages of [lo, hi) and 64 KiB on each side (the kernel's default fault-around)
// back to the OS; Checkpoint::release_range clips at the file's end.
void release_around(const io::Checkpoint& ckpt, const uint8_t* lo, const uint8_t* hi) {
  constexpr uintptr_t kAround = 64 * 1024;
  const uintptr_t b = reinterpret_cast<uintptr_t>(lo), start = b > kAround ? b - kAround : 0;
  ckpt.release_range(lo, static_cast<uint64_t>(hi - lo) + kAround);
  ckpt.release_range(reinterpret_cast<const uint8_t*>(start), b - start);  // nothing when before the file
}

// w.write(name, 0, data, n), the bytes copied inside the kernel from the input's file when they
// are a view of its mapping (a tensor as stored: no user-space copy, no page mapped for it).
void write_as_stored(io::CheckpointWriter& w, const io::Checkpoint& ckpt, const std::string& name, const uint8_t* data, size_t n) {
  if (const io::MappedFile* f = ckpt.mapping_of(data, n)) w.copy(name, 0, *f, static_cast<uint64_t>(data - f->data()), n);
  else w.write(name, 0, data, n);
}

// Writes the planned folder: side files, config.json with the quantization_config, tensors.
size_t write_packed_folder(io::Env& env, const io::Checkpoint& ckpt, const model::Model& m, const PackedPlan& p, const fs::path& dir,
                    uint64_t max_shard_bytes) {
  write_side_files(env, ckpt, dir);
  nlohmann::json cfg = m.rewritten_config(model::OutputOptions{}, &p.manifest);
  cfg["quantization_config"] = p.quantization_config;
  env.write_text(dir / "config.json", cfg.dump(2) + "\n");
  std::map<std::string, const model::OutTensor*> by_name, first_part;
  for (const auto& o : p.outs) {
    by_name[o.name] = &o;
    if (!o.weight.empty()) first_part.emplace(o.weight, &o);
  }
  io::CheckpointWriter w(env, dir, p.specs, max_shard_bytes);
  // Two sets of packing buffers, reused from weight to weight: a weight's tensors are written (and
  // its input pages handed back) on another thread while the next weight is packed into the other
  // set, as the GGUF export does; a dense tensor is written there too. The writes stay in the
  // order of p.outs, one at a time.
  std::vector<io::PackedTensor> packed[2];
  int next = 0;
  std::future<void> pending;
  struct Drain {  // an error leaves no write running past this function
    std::future<void>& f;
    ~Drain() {
      if (f.valid()) f.wait();
    }
  } drain{pending};
  auto wait = [&] {  // the write in flight done, its error rethrown
    if (pending.valid()) pending.get();
  };
  // The rows of weight_packed / qweight packed on the forward's threads (the bytes do not depend
  // on the split).
  const io::RowSplit split = [](int64_t n, const std::function<void(int64_t, int64_t)>& fn) { runtime::parallel_rows(n, 16, fn); };
  for (const auto& o : p.outs) {
    if (o.weight.empty()) {
      core::Tensor t = core::with_context("tensor " + o.name, [&] { return o.make(); });
      wait();
      pending = std::async(std::launch::async, [&w, &ckpt, &o, t = std::move(t)] {
        if (!t.owns_data()) ckpt.populate_range(t.data(), t.nbytes());  // the finite check reads them all
        if (t.dtype() == o.dtype && t.shape() == o.shape) write_as_stored(w, ckpt, o.name, t.data(), t.nbytes());
        else w.write(o.name, t.converted(o.dtype));
        if (!t.owns_data()) release_around(ckpt, t.data(), t.data() + t.nbytes());
      });
      continue;
    }
    if (first_part.at(o.weight) != &o) continue;
    const std::string mod = module_of(o.weight);
    auto parts = std::make_shared<const IntNParts>(
        core::with_context(o.weight, [&] { return intn_parts(p.manifest.at(o.weight), by_name); }));
    std::vector<io::PackedTensor>& buf = packed[next];
    // The weight's parts (stored next to each other) are mapped in one call before the packing
    // reads them (a page fault per 64 KiB otherwise: half the export's CPU time on a 1.2 GB
    // input), and released after their write, with the kernel's fault-around window on both
    // sides (pages faulted in around a neighbour's first read would stay mapped otherwise): the
    // pages stay readable, a later read faults them in again.
    // Codes that are written as stored (compressed-tensors' rows of whole words) are copied inside
    // the kernel and never read here: their pages are not mapped.
    const bool codes_as_stored = io::packed_rows_are_codes(p.fmt, parts->codes);
    const uint8_t *lo = nullptr, *hi = nullptr;
    for (const auto& [role, part] : p.manifest.at(o.weight).at("parts").items()) {
      if (role == "codes" && codes_as_stored) continue;
      const core::Tensor t = by_name.at(part.get<std::string>())->make();
      if (t.owns_data()) continue;
      lo = lo ? std::min(lo, t.data()) : t.data();
      hi = std::max(hi, t.data() + t.nbytes());
    }
    if (lo) ckpt.populate_range(lo, static_cast<uint64_t>(hi - lo));
    core::with_context(o.weight, [&] { io::pack_linear(p.fmt, parts->codes, buf, split, /*leave_stored_rows=*/true); });
    wait();
    pending = std::async(std::launch::async, [&w, &ckpt, &buf, parts, mod, weight = o.weight, lo, hi, codes_as_stored] {
      core::with_context(weight, [&] {
        const io::GroupCodes& c = parts->codes;
        for (const auto& t : buf) {
          // compressed-tensors' weight_packed of rows that fill whole words is the codes as stored.
          if (t.suffix == ".weight_packed" && codes_as_stored)
            write_as_stored(w, ckpt, mod + t.suffix, c.codes, static_cast<size_t>(c.out * c.row_bytes()));
          else
            w.write(mod + t.suffix, 0, t.data.data(), t.data.size());
        }
      });
      if (lo) release_around(ckpt, lo, hi);
    });
    next ^= 1;
  }
  wait();
  w.finish();
  return w.shard_count();
}


}  // namespace

uint64_t check_packed(const io::Checkpoint& ckpt, const model::Model& m, io::PackedFormat fmt) {
  uint64_t bytes = 0;
  for (const auto& s : plan_packed(ckpt, m, fmt).specs) bytes += s.nbytes();  // as write_packed's tensor_bytes
  return bytes;
}

PackedResult write_packed(io::Env& env, const io::Checkpoint& ckpt, const model::Model& m, io::PackedFormat fmt,
                          const fs::path& dir, uint64_t max_shard_bytes) {
  const PackedPlan plan = plan_packed(ckpt, m, fmt);
  PackedResult r;
  r.shards = core::with_context(ckpt.dir().string(), [&] { return write_packed_folder(env, ckpt, m, plan, dir, max_shard_bytes); });
  r.scheme = plan.scheme;
  r.quantized_linears = plan.quantized.size();
  r.dense_linears = plan.ignore.size();
  r.tensors = plan.specs.size();
  for (const auto& s : plan.specs) r.tensor_bytes += s.nbytes();
  r.quantized_params = plan.quantized_params;
  r.quantized_bytes = plan.quantized_bytes;
  return r;
}

io::PackedFormat parse_packed_format(const std::string& f) {
  return f == "gptq" ? io::PackedFormat::Gptq : f == "awq" ? io::PackedFormat::Awq : io::PackedFormat::CompressedTensors;
}

bool is_compressed_tensors_fp8(const io::Checkpoint& ckpt) {
  if (ckpt.gguf()) return false;
  const nlohmann::json q = ckpt.config().value("quantization_config", nlohmann::json());
  return q.is_object() && q.value("quant_method", nlohmann::json()) == "compressed-tensors" &&
         q.value("format", nlohmann::json()) == "float-quantized";
}

void check_fp8_copy(const model::Model& planned, const std::string& where) {
  check_packed_structure(planned, io::PackedFormat::CompressedTensors, where);
  for (const auto& layer : planned.layers())
    if (layer.moe && layer.moe->router.encoding())
      throw Error::unsupported(where + ": layer " + std::to_string(layer.index) + ": the router is stored quantized (" +
                               layer.moe->router.encoding()->name() + "); a prune keeps some of its rows, which are no "
                               "tensor of the input to copy");
}

namespace {

// "model.layers.3.block_sparse_moe.experts.5.w1" -> {layer 3, expert 5, prefix, rest}; nullopt
// for a module that is not a routed expert's.
struct ExpertName {
  size_t layer = 0;
  int64_t expert = 0;
  std::string head, tail;  // the name before and after the expert index
};
std::optional<ExpertName> expert_name(const std::string& module) {
  static const std::regex re(R"(^(.*\.layers\.(\d+)\..*\.experts\.)(\d+)(\..+)?$)");
  std::smatch m;
  if (!std::regex_match(module, m, re)) return std::nullopt;
  return ExpertName{std::stoul(m[2].str()), std::stoll(m[3].str()), m[1].str(), m[4].str()};
}

// The keep-map's row of `layer` (the input expert of each written expert), null when the run
// left the layer's experts in place.
const nlohmann::json* keep_row(const nlohmann::json& keep_map, size_t layer) {
  if (!keep_map.is_array() || layer >= keep_map.size() || keep_map[layer].is_null()) return nullptr;
  return &keep_map[layer];
}

int64_t kept_id(const nlohmann::json& id, size_t layer) {
  if (!id.is_number_integer())
    throw Error::unsupported("layer " + std::to_string(layer) + ": a written expert made of several input experts (" +
                             id.dump() + "); only kept experts are copied");
  return id.get<int64_t>();
}

// The input module an output module was written from.
std::string source_module(const std::string& module, const nlohmann::json& keep_map) {
  const auto e = expert_name(module);
  const nlohmann::json* row = e ? keep_row(keep_map, e->layer) : nullptr;
  if (!row) return module;
  if (e->expert < 0 || static_cast<size_t>(e->expert) >= row->size())
    throw Error::internal(module + ": expert " + std::to_string(e->expert) + " is not in the keep-map's row " + row->dump());
  return e->head + std::to_string(kept_id((*row)[static_cast<size_t>(e->expert)], e->layer)) + e->tail;
}

// The output name of an input module named exactly (an `ignore` entry, a target), nullopt when
// its expert was removed. Patterns ("re:...") and classes ("Linear") are returned as they are.
std::optional<std::string> renamed_module(const std::string& name, const nlohmann::json& keep_map) {
  if (name.rfind("re:", 0) == 0) return name;
  const auto e = expert_name(name);
  const nlohmann::json* row = e ? keep_row(keep_map, e->layer) : nullptr;
  if (!row) return name;
  for (size_t k = 0; k < row->size(); ++k)
    if (kept_id((*row)[k], e->layer) == e->expert) return e->head + std::to_string(k) + e->tail;
  return std::nullopt;
}

// A `re:` entry of `ignore` or of a config group's `targets` that names experts by their index
// (compressed-tensors matches it from the start of the module name, as Python's re.match) would
// match other experts once the kept ones are renumbered: refused (Error::unsupported naming the
// entry and a module it moves), as no pattern can be rewritten in general.
void check_patterns_follow_experts(const io::Checkpoint& input, const nlohmann::json& q, const nlohmann::json& keep_map) {
  std::vector<std::pair<std::string, std::string>> patterns;  // (JSON path, pattern)
  if (q.contains("ignore") && q["ignore"].is_array())
    for (size_t i = 0; i < q["ignore"].size(); ++i)
      if (q["ignore"][i].is_string()) patterns.emplace_back("ignore[" + std::to_string(i) + "]", q["ignore"][i].get<std::string>());
  if (q.contains("config_groups") && q["config_groups"].is_object())
    for (const auto& [key, g] : q["config_groups"].items())
      if (g.is_object() && g.contains("targets") && g["targets"].is_array())
        for (size_t i = 0; i < g["targets"].size(); ++i)
          if (g["targets"][i].is_string())
            patterns.emplace_back("config_groups." + key + ".targets[" + std::to_string(i) + "]", g["targets"][i].get<std::string>());
  std::vector<std::pair<std::string, std::string>> moved;  // (input module, its output name)
  for (const auto& n : input.names()) {
    if (!n.ends_with(".weight")) continue;
    const std::string mod = n.substr(0, n.size() - 7);
    if (!expert_name(mod)) continue;
    if (const auto out = renamed_module(mod, keep_map); out && *out != mod) moved.emplace_back(mod, *out);
  }
  for (const auto& [where, p] : patterns) {
    if (p.rfind("re:", 0) != 0) continue;
    std::regex re;
    try {
      re = std::regex(p.substr(3));
    } catch (const std::regex_error&) {
      continue;  // not an ECMAScript pattern: not checked here
    }
    auto matches = [&](const std::string& m) { return std::regex_search(m, re, std::regex_constants::match_continuous); };
    for (const auto& [from, to] : moved)
      if (matches(from) != matches(to))
        throw Error::unsupported((input.dir() / "config.json").string() + ": quantization_config." + where + ": \"" + p + "\" matches " +
                                 (matches(from) ? from + " but not " + to : to + " but not " + from) + ", the name that expert " +
                                 "takes after the prune (the pattern names experts by index); write --format hf, or name " +
                                 "the experts without their index");
  }
}

nlohmann::json renumbered_quantization_config(nlohmann::json q, const nlohmann::json& keep_map) {
  auto rename_list = [&](const nlohmann::json& list) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& x : list) {
      if (!x.is_string()) {
        out.push_back(x);
        continue;
      }
      if (auto n = renamed_module(x.get<std::string>(), keep_map)) out.push_back(*n);
    }
    return out;
  };
  if (q.contains("ignore") && q["ignore"].is_array()) q["ignore"] = rename_list(q["ignore"]);
  if (q.contains("config_groups") && q["config_groups"].is_object()) {
    nlohmann::json groups = nlohmann::json::object();
    for (auto& [key, g] : q["config_groups"].items()) {
      nlohmann::json group = g;
      if (group.is_object() && group.contains("targets") && group["targets"].is_array()) {
        const bool had = !group["targets"].empty();
        group["targets"] = rename_list(group["targets"]);
        if (had && group["targets"].empty()) continue;  // every module it named was removed
      }
      groups[key] = group;
    }
    q["config_groups"] = groups;
  }
  return q;
}

bool same_bytes(const core::Tensor& a, const core::Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

}  // namespace

Fp8CopyResult write_fp8_copied(io::Env& env, const io::Checkpoint& input, const io::Checkpoint& staged,
                               const nlohmann::json& config, const nlohmann::json& keep_map, const fs::path& dir,
                               uint64_t max_shard_bytes) {
  const std::string src = input.dir().string();
  const model::Model m = model::Model::load(staged);
  nlohmann::json manifest = nlohmann::json::object();
  const std::vector<model::OutTensor> outs = m.outputs(model::OutputOptions{}, &manifest);
  // What each output tensor is written from: a staged output, or an input tensor as stored.
  struct Item {
    std::string name;
    const model::OutTensor* staged = nullptr;
    std::string input;  // the input tensor copied
  };
  std::vector<Item> items;
  std::vector<io::TensorSpec> specs;
  Fp8CopyResult r;
  for (const auto& o : outs) {
    if (o.weight.empty()) {
      items.push_back({o.name, &o, ""});
      specs.push_back({o.name, o.dtype, o.shape});
      continue;
    }
    const nlohmann::json& e = manifest.at(o.weight);
    if (e.at("encoding") != "fp8-block")
      throw Error::unsupported(src + ": " + o.weight + " is written as '" + e.at("encoding").get<std::string>() +
                               "', not as the FP8 weight of the input it came from: write hf");
    if (e.at("parts").at("codes") != o.name) continue;  // the scale: the input's weight_scale instead
    const std::string mod = module_of(o.weight), from = source_module(mod, keep_map);
    core::with_context(o.weight, [&] {
      if (!input.has(from + ".weight") || input.info(from + ".weight").dtype != core::DType::F8_E4M3 ||
          !input.has(from + ".weight_scale"))
        throw Error::internal("its input module " + from + " holds no FP8 weight with a weight_scale");
      // The run's codes and scales are the input's: a check that the keep-map names the module.
      const core::Tensor codes = o.make(), in_codes = input.tensor(from + ".weight");
      if (!same_bytes(codes, in_codes))
        throw Error::internal("its codes are not those of the input's " + from + ".weight");
      const auto& sname = e.at("parts").at("scale_inv").get<std::string>();
      const core::Tensor staged_scale = staged.tensor(sname).converted(core::DType::F32);
      const core::Tensor in_scale = input.tensor(from + ".weight_scale").converted(core::DType::F32);
      if (staged_scale.numel() != in_scale.numel() || !same_bytes(staged_scale, in_scale))
        throw Error::internal("its scales are not those of the input's " + from + ".weight_scale");
      // The pages the comparison mapped handed back (peak RSS bounded by one weight).
      release_around(staged, codes.data(), codes.data() + codes.nbytes());
      release_around(input, in_codes.data(), in_codes.data() + in_codes.nbytes());
    });
    for (const char* suffix : {".weight", ".weight_scale", ".input_scale"}) {
      if (!input.has(from + suffix)) continue;
      const io::TensorInfo& info = input.info(from + suffix);
      items.push_back({mod + suffix, nullptr, from + suffix});
      specs.push_back({mod + suffix, info.dtype, info.shape});
      if (std::string(suffix) == ".input_scale") ++r.input_scales;
    }
    ++r.fp8_linears;
  }
  // The KV-cache scales of the input's kv_cache_scheme (per attention module, not per expert: every
  // layer is kept), copied as stored, since the quantization_config written is the input's.
  for (const auto& name : input.names())
    if (io::is_kv_cache_scale(name)) {
      const io::TensorInfo& info = input.info(name);
      items.push_back({name, nullptr, name});
      specs.push_back({name, info.dtype, info.shape});
      ++r.kv_cache_scales;
    }
  check_patterns_follow_experts(input, input.config().at("quantization_config"), keep_map);  // before any write
  write_side_files(env, staged, dir);
  nlohmann::json cfg = config;
  cfg["quantization_config"] = renumbered_quantization_config(input.config().at("quantization_config"), keep_map);
  env.write_text(dir / "config.json", cfg.dump(2) + "\n");
  io::CheckpointWriter w(env, dir, specs, max_shard_bytes);
  for (const auto& it : items) {
    core::Tensor t = it.staged ? core::with_context("tensor " + it.name, [&] { return it.staged->make(); })
                               : input.tensor(it.input);
    const io::Checkpoint& from = it.staged ? staged : input;
    if (!t.owns_data()) from.populate_range(t.data(), t.nbytes());  // the finite check reads them all
    if (!it.staged)  // a NaN code or scale is named in the input, where it is stored
      core::with_context(input.shard_path(it.input).string() + ": tensor " + it.input,
                         [&] { write_as_stored(w, from, it.name, t.data(), t.nbytes()); });
    else if (t.dtype() == it.staged->dtype && t.shape() == it.staged->shape)
      write_as_stored(w, from, it.name, t.data(), t.nbytes());
    else
      w.write(it.name, t.converted(it.staged->dtype));
    if (!t.owns_data()) release_around(from, t.data(), t.data() + t.nbytes());
  }
  w.finish();
  r.shards = w.shard_count();
  r.tensors = specs.size();
  for (const auto& s : specs) r.tensor_bytes += s.nbytes();
  return r;
}

}  // namespace moe::pipeline
