#include "pipeline/sink.h"

#include <functional>
#include <map>
#include <set>

#include "core/error.h"
#include "io/gguf.h"
#include "io/gguf_model.h"
#include "io/output_dir.h"
#include "io/temp_files.h"
#include "model/gguf_write.h"
#include "passes/experts.h"
#include "pipeline/gguf_export.h"
#include "pipeline/hf_sink.h"
#include "pipeline/packed_export.h"
#include "pipeline/recipe.h"
#include "pipeline/report.h"
#include "quant/codec.h"
#include "quant/gguf_blocks.h"

namespace moe::pipeline {

using core::Error;
using nlohmann::json;
namespace fs = std::filesystem;

json SinkResult::to_json() const {
  json j = {{"format", format}, {"tensors", tensors}, {"tensor_bytes", tensor_bytes}, {"shards", shards}};
  for (const auto& [k, v] : details.items()) j[k] = v;
  return j;
}

bool output_is_file(const Recipe& r) { return r.output.format == "gguf"; }

GgufOptions gguf_output_options(const OutputSpec& out, const std::function<std::string(const std::string&)>& key) {
  GgufOptions go;
  go.type = gguf_writable_type(out.type, key("output.type"));
  go.overrides = parse_gguf_overrides(out.tensor_type, [&](size_t i) {
    return key("output.tensor_type") + (out.tensor_type.size() > 1 ? "[" + std::to_string(i) + "]" : "");
  });
  // general.name: the output's name without .gguf, as `export` names a file after its input folder.
  go.name = out.path.stem().string();
  go.tensor_type_key = key("output.tensor_type");
  return go;
}

namespace {
// A GGUF input written as GGUF: the kept experts' blocks copied (model::write_gguf_like).
bool copies_gguf_blocks(const Recipe& r) { return r.output.format == "gguf" && io::is_gguf_path(r.model); }

// The experts' bits per parameter of the folder a packed format wrote, as its tensors store them
// (the report's expert_bits_per_param.after: the staged native output's differ, e.g. AWQ's
// zero points); null when the model has no routed experts.
nlohmann::json written_expert_bits(io::Env& env, const fs::path& dir) {
  const io::Checkpoint ck = io::Checkpoint::open(env, dir);
  model::OutputOptions stored;
  stored.as_stored = true;
  const auto acc = model::account(model::Model::load(ck).outputs(stored));
  return acc.count("experts") ? nlohmann::json(acc.at("experts").bits_per_param()) : nlohmann::json();
}
}  // namespace

bool prunes_only(const Recipe& r) {
  if (r.passes.empty()) return false;
  for (const auto& p : r.passes)
    if (p->name() != "prune") return false;
  return true;
}

bool copies_fp8_input(const Recipe& r, const io::Checkpoint& ckpt) {
  return r.output.format == "compressed-tensors" && prunes_only(r) && is_compressed_tensors_fp8(ckpt);
}

bool stages_native_output(const Recipe& r) { return r.output.format != "hf" && !(copies_gguf_blocks(r) && !r.eval); }

std::optional<OutputSize> copied_output_size(const Recipe& r, const io::Checkpoint& ckpt, const model::Model& planned) {
  if (r.output.format != "gguf" || !ckpt.gguf()) return std::nullopt;
  const model::GgufLikeSize g = model::gguf_like_size(planned, *ckpt.gguf());
  return OutputSize{g.tensor_bytes, g.file_bytes};
}

namespace {

GgufOptions gguf_options(const Recipe& r) {
  GgufOptions go = gguf_output_options(r.output, [&](const std::string& k) { return r.key(k); });
  go.staged = true;
  return go;
}

// An export format: the native output staged in a temporary folder beside the output (in its
// parent) and converted by finish(), as `moe-tool export` converts a native checkpoint.
class ExportSink final : public Sink {
  // The frame of an error while writing the format: the option the user gave, or the input's
  // format a prune follows (runner.cpp follow_input_format) when none was given.
  std::string format_context() const {
    return r_.output.format_given ? r_.key("output.format") + " " + format() : "output format " + format() + " (the input's)";
  }

 public:
  ExportSink(io::Env& env, const Recipe& r, const std::vector<fs::path>& inputs) : env_(env), r_(r) {
    const std::string force_name = r.key("output.force");
    fs::path parent;
    if (output_is_file(r)) {
      file_.emplace(env, r.output.path, inputs, r.output.force, force_name);
      parent = file_->path().parent_path();
    } else {
      folder_.emplace(env, r.output.path, inputs, r.output.force, force_name);
      parent = folder_->path().parent_path();
    }
    const std::string name = r.output.path.filename().string() + ".native";
    io::remove_stale_temps(parent, io::temp_prefix(name));
    if (!stages_native_output(r)) return;  // a GGUF input's blocks copied, nothing evaluated: no native output
    staging_.emplace(env, parent, name);
    native_.emplace(env, staging_->path(), r.output.max_shard_bytes);
  }
  ExportSink(const ExportSink&) = delete;
  ExportSink& operator=(const ExportSink&) = delete;
  ~ExportSink() override { remove_staging(); }

  std::string format() const override { return r_.output.format; }
  const fs::path& native_dir() const override {
    static const fs::path none;
    return staging_ ? staging_->path() : none;
  }
  void begin(const io::Checkpoint& source, const std::optional<std::vector<io::TensorSpec>>& plan) override {
    source_ = &source;
    if (native_) native_->begin(source, plan);
  }
  void set_keep_map(const json& keep_map) override { keep_map_ = keep_map; }
  // Without a staged output (a GGUF input's blocks copied, stages_native_output) the groups are
  // not computed: finish() copies the kept experts from the input.
  void write(const std::vector<model::OutTensor>& group) override {
    if (native_) native_->write(group);
  }
  SpillWriter* spill() override { return native_ ? native_->spill() : nullptr; }

  SinkResult finish(const json& config) override {
    try {
      return convert(config);
    } catch (Error& e) {
      // A refusal the values decide (GPTQ zero points of 0) names the staged folder, a temporary:
      // name the run's output instead.
      e.with_path_shown(native_dir().string(), "the native output staged for " + r_.output.path.string());
      if (file_) e.with_path_shown(file_->path().string(), r_.output.path.string());  // the file's temporary name
      throw;
    }
  }

  fs::path write_report(const json& report) override {
    if (file_) return {};  // a GGUF file has no room for it
    pipeline::write_report(env_, folder_->path(), report);
    return folder_->final_path() / "moe_tool_report.json";
  }

  void commit() override {
    remove_staging();
    if (file_) file_->commit();
    else folder_->commit();
  }

 private:
  SinkResult convert(const json& config) {
    SinkResult r;
    r.format = format();
    if (native_) {
      const SinkResult staged = native_->finish(config);
      r.details["staged"] = {{"format", "hf"}, {"tensors", staged.tensors}, {"tensor_bytes", staged.tensor_bytes},
                             {"note", "the native output, staged beside the output and converted as `moe-tool export` "
                                      "converts it; removed once converted"}};
    }
    if (file_ && source_ && source_->gguf()) return copy_gguf_blocks(r);
    const io::Checkpoint ckpt = io::Checkpoint::open(env_, native_dir());
    const model::Model m = model::Model::load(ckpt);
    if (file_) {
      const GgufOptions go = gguf_options(r_);
      const GgufResult g = core::with_context(r_.key("output.format") + " gguf",
                                              [&] { return write_gguf(env_, ckpt, m, go, file_->path()); });
      r.tensors = g.tensors;
      r.tensor_bytes = g.tensor_bytes;
      r.shards = 1;
      r.details["type"] = r_.output.type;
      r.details["types"] = g.types;
      r.details["file_bytes"] = g.file_bytes;
      return r;
    }
    if (source_ && copies_fp8_input(r_, *source_)) {
      const Fp8CopyResult c = core::with_context(format_context(), [&] {
        return write_fp8_copied(env_, *source_, ckpt, config, keep_map_, folder_->path(), r_.output.max_shard_bytes);
      });
      r.tensors = c.tensors;
      r.tensor_bytes = c.tensor_bytes;
      r.shards = c.shards;
      r.details["quantization_format"] = "float-quantized";
      r.details["fp8_linears"] = c.fp8_linears;
      r.details["input_scales"] = c.input_scales;
      r.details["kv_cache_scales"] = c.kv_cache_scales;
      r.details["copied"] = "each kept FP8 Linear's weight, weight_scale and input_scale as the input stores them, and "
                            "the KV-cache scales (k_scale, v_scale) when its kv_cache_scheme has them; "
                            "quantization_config the input's";
      r.details["expert_bits_per_param"] = written_expert_bits(env_, folder_->path());
      return r;
    }
    const PackedResult p = core::with_context(format_context(), [&] {
      return write_packed(env_, ckpt, m, parse_packed_format(format()), folder_->path(), r_.output.max_shard_bytes);
    });
    r.tensors = p.tensors;
    r.tensor_bytes = p.tensor_bytes;
    r.shards = p.shards;
    r.details["bits"] = p.scheme.bits;
    r.details["group_size"] = p.scheme.group == 0 ? -1 : p.scheme.group;
    r.details["symmetric"] = p.scheme.symmetric;
    r.details["quantized_linears"] = p.quantized_linears;
    r.details["dense_linears"] = p.dense_linears;
    r.details["expert_bits_per_param"] = written_expert_bits(env_, folder_->path());
    return r;
  }

  // A GGUF input pruned to a GGUF file: the input reloaded, its experts selected by the run's
  // keep-map and written with the input's blocks as stored (model::write_gguf_like; the preflight
  // allowed prune passes only, check_gguf_like_plan).
  SinkResult copy_gguf_blocks(SinkResult r) {
    model::Model m = model::Model::load(*source_);
    for (auto& layer : m.layers()) {
      if (!layer.moe || keep_map_.is_null()) continue;
      const json& row = keep_map_.at(static_cast<size_t>(layer.index));
      if (row.is_null()) continue;
      std::vector<int> kept;
      for (const auto& id : row) {
        if (!id.is_number_integer())
          throw Error::internal("layer " + std::to_string(layer.index) + ": a merged expert in a GGUF-to-GGUF prune");
        kept.push_back(id.get<int>());
      }
      passes::keep_experts(*layer.moe, kept);  // as prune keeps them: experts, router rows (blocks copied)
    }
    const uint64_t bytes = core::with_context(r_.key("output.format") + " gguf",
                                              [&] { return model::write_gguf_like(env_, m, *source_->gguf(), file_->path()); });
    const io::GgufFile out = io::GgufFile::open(env_, file_->path());
    std::map<std::string, int64_t> types;
    for (const auto& t : out.tensors()) {
      ++types[quant::ggml_type_info(t.type).name];
      r.tensor_bytes += t.nbytes();
    }
    r.tensors = out.tensors().size();
    r.shards = 1;
    if (native_)
      r.details["staged"]["note"] = "the native output (weights dequantized), staged beside the output for the run's "
                                    "evaluation and removed after; the GGUF file holds the input's blocks of the kept experts";
    r.details["type"] = "as stored in the GGUF input (blocks copied, nothing re-quantized)";
    r.details["types"] = types;
    r.details["file_bytes"] = bytes;
    return r;
  }

  void remove_staging() noexcept {
    native_.reset();
    staging_.reset();
  }

  io::Env& env_;
  const Recipe& r_;
  const io::Checkpoint* source_ = nullptr;
  json keep_map_;
  std::optional<io::OutputFile> file_;
  std::optional<io::OutputDir> folder_;
  std::optional<io::StagingFolder> staging_;
  std::optional<HfSink> native_;
};

// ---- the refusals of check_output_format ----

// The tensor class of an output as the passes name it (Pass::EncodedClasses): the shared-expert
// gate apart from the shared expert's MLP.
std::string class_of(const model::Model& m, const model::OutTensor& o) {
  const std::string& gate = m.family().shared_expert_gate;
  const bool is_gate = o.cls == "shared_experts" && !gate.empty() && o.name.find(gate) != std::string::npos;
  return is_gate ? "shared_expert_gate" : o.cls;
}

// What one tensor class is written as after the passes: the pass that last encoded it and how.
struct ClassEncoding {
  size_t pass = 0;
  std::string what;                        // "int4:g32:sym", "lowrank", ...
  std::optional<quant::CodecSpec> codec;   // a quantize codec
  std::string key;                         // the recipe key that set it
};

// Per tensor class (model::OutTensor::cls), what the recipe's passes write it as; classes no pass
// encodes are absent (they keep the input's encodings, checked on the plan itself). A pass that
// writes experts dense (merge) drops their entry.
std::multimap<std::string, ClassEncoding> pass_encodings(const Recipe& r, const model::Model& planned) {
  // The classes the model has (a codec for a class it lacks writes nothing).
  std::set<std::string> present;
  for (const auto& o : planned.outputs(model::OutputOptions{})) present.insert(class_of(planned, o));
  std::multimap<std::string, ClassEncoding> out;
  for (size_t i = 0; i < r.passes.size(); ++i) {
    const Pass& p = *r.passes[i];
    const std::string path = "passes[" + std::to_string(i) + "]";
    if (p.densifies_experts()) out.erase("experts");
    const json params = p.params();
    if (p.name() != "quantize" || !params.contains("applied")) {
      for (const auto& [cls, names] : p.encodes()) {
        out.erase(cls);
        if (!present.count(cls)) continue;
        for (const auto& n : names) out.insert({cls, {i, n, std::nullopt, r.key(path)}});
      }
      continue;
    }
    auto add = [&](const std::string& cls, const std::string& text, const std::string& key) {
      const quant::CodecSpec c = quant::parse_codec(text);
      out.insert({cls, {i, text, c, key}});
    };
    for (const auto& [cls, text] : params.at("applied").items()) {
      const std::string cls_name = cls == "shared"        ? "shared_experts"
                                   : cls == "shared_gate" ? "shared_expert_gate"
                                   : cls == "dense"       ? "dense_mlp"
                                                          : cls;
      out.erase(cls_name);
      if (text.get<std::string>() == "keep" || !present.count(cls_name)) continue;
      // The key that chose the codec: the class's own when it names one, else the pass's codec.
      const std::string codec_key = params.value(cls, std::string("codec")) == "codec" ? r.key(path + ".codec")
                                                                                        : r.key(path + "." + cls);
      if (params.value("sub1bit", false))
        out.insert({cls_name, {i, "ternary-dict (sub-1-bit)", std::nullopt, r.key(path + ".sub1bit")}});
      else if (params.contains("avg_bits") && !params.at("avg_bits").is_null() && cls_name == "experts")
        out.insert({cls_name, {i, "mixed widths per expert (avg_bits)", std::nullopt, r.key(path + ".avg_bits")}});
      else
        add(cls_name, text.get<std::string>(), codec_key);
    }
    for (const auto& rule : params.value("tensor_type", json::array())) {
      const std::string s = rule.get<std::string>();
      const std::string codec = s.substr(s.rfind('=') + 1);
      if (codec != "keep") add("the tensors of rule " + s, codec, r.key(path + ".tensor_type"));
    }
  }
  return out;
}

// "r.json: output.format gguf" (a recipe file) or "--format gguf" (flags).
std::string output_where(const Recipe& r) {
  return (r.flag_names.empty() ? r.source + ": " : "") + r.key("output.format") + " " + r.output.format;
}

// A GGUF input written as GGUF: prune passes only, each kept expert's blocks copied as stored
// (model::write_gguf_like); what would change a weight or lose what the file cannot hold is refused.
void check_gguf_like_plan(const Recipe& r, const model::Model& planned) {
  const std::string where = output_where(r);
  const std::string file = r.flag_names.empty() ? r.source + ": " : "";
  const std::string copied = "a GGUF input's blocks are copied as they are stored (nothing re-quantized)";
  const std::string way_out = "write a folder (without " + r.key("output.format") + " gguf), or `moe-tool convert INPUT "
                              "DENSE --materialize` and export that";
  if (!r.output.type.empty() || !r.output.tensor_type.empty())
    throw Error::invalid(file + r.key(r.output.type.empty() ? "output.tensor_type" : "output.type") + ": " + copied +
                         "; leave it out (to re-quantize, " + way_out + ")");
  if (r.output.dtype)  // (output.materialize and max_shard_size: refused with any gguf output, parse_recipe)
    throw Error::invalid(file + r.key("output.dtype") + ": " + copied +
                         "; leave it out with " + r.key("output.format") + " gguf");
  for (size_t i = 0; i < r.passes.size(); ++i) {
    const auto& p = *r.passes[i];
    const std::string pass_key = "passes[" + std::to_string(i) + "]", at = file + r.key(pass_key);
    const json params = p.params();
    if (p.name() != "prune")
      throw Error::unsupported(at + ": " + r.key("output.format") + " gguf of a GGUF input takes prune passes only (" + copied +
                               "); " + p.name() + " changes the weights: " + way_out);
    if (params.value("novices", false))
      throw Error::unsupported(file + r.key(pass_key + ".novices") + ": a GGUF file has no place for a constant expert; " + way_out);
    if (params.contains("keep_ratio") && !params.value("uniform", true))
      throw Error::unsupported(file + r.key(pass_key + ".uniform") + ": layers would keep different expert counts, and GGUF stacks one count "
                               "for every layer; leave it out");
  }
  if (!r.calibration.tasks.empty())
    throw Error::unsupported(file + r.key("calibration.tasks") + ": a GGUF file has no room for the task keep-maps; write a folder");
  int64_t count = -1;
  for (const auto& l : planned.layers())
    if (l.moe) {
      if (count >= 0 && l.moe->num_experts() != count)
        throw Error::unsupported(where + ": layer " + std::to_string(l.index) + " keeps " + std::to_string(l.moe->num_experts()) +
                                 " experts and an earlier layer " + std::to_string(count) +
                                 ": GGUF stacks one expert count for every layer; keep the same count in each layer");
      count = l.moe->num_experts();
    }
}

void check_gguf_plan(io::Env& env, const Recipe& r, const io::Checkpoint& ckpt, const model::Model& planned) {
  if (ckpt.gguf()) return check_gguf_like_plan(r, planned);
  const std::string where = output_where(r);
  if (r.output.type.empty())
    throw Error::invalid((r.flag_names.empty() ? r.source + ": " : "") + r.key("output.type") + ": required for " +
                         r.key("output.format") + " gguf (the main ggml type, e.g. q8_0 or q4_0)");
  const GgufOptions go = gguf_options(r);
  core::with_context(where, [&] { check_gguf(env, ckpt, planned, go); });
  const auto enc = pass_encodings(r, planned);
  for (const auto& [cls, e] : enc) {
    const auto& c = e.codec;
    if (c && c->kind == quant::CodecSpec::Kind::Int && c->symmetric && c->group == 32 && (c->bits == 4 || c->bits == 8))
      continue;
    if (c && c->kind == quant::CodecSpec::Kind::Ternary && c->grid == quant::TernaryGrid::TQ) continue;  // tq1_0/tq2_0
    if (c && c->kind == quant::CodecSpec::Kind::Ggml) continue;  // blocks of their own type
    throw Error::unsupported(where + ": " + e.key + " writes " + cls + " as " + e.what +
                             ", which has no GGUF block type here (int4/int8 symmetric groups of 32 are copied as q4_0/q8_0, "
                             "ternary-tq trits as tq1_0/tq2_0, ggml codecs as their type): quantize with int4:g32:sym, "
                             "int8:g32:sym, ternary-tq or a ggml codec (q4_k, q6_k, ...), or leave " +
                             cls + " dense and let " + r.key("output.type") + " round it");
  }
  // Groups copied as blocks need rows of whole blocks (a shorter last group has no block): 32
  // values for q4_0/q8_0, 256 for tq1_0/tq2_0, the block of a ggml codec's type.
  for (const auto& o : planned.outputs(model::OutputOptions{})) {
    if (o.shape.size() != 2 || !o.weight.empty()) continue;
    const auto it = enc.find(class_of(planned, o));
    if (it == enc.end()) continue;
    const auto& c = it->second.codec;
    const bool tq = c && c->kind == quant::CodecSpec::Kind::Ternary;
    const bool gg = c && c->kind == quant::CodecSpec::Kind::Ggml;
    const int64_t block = gg ? c->group : tq ? 256 : 32;
    if (o.shape[1] % block == 0) continue;
    const std::string blocks = gg ? quant::to_string(*c) + " blocks of " + std::to_string(block)
                               : tq ? "tq1_0/tq2_0 blocks of 256" : "q4_0/q8_0 blocks of 32";
    throw Error::unsupported(where + ": " + it->second.key + " writes " + o.name + " as " + it->second.what + ", but its rows of " +
                             std::to_string(o.shape[1]) + " values are not whole " + blocks + ": keep " +
                             it->first + " dense and let " + r.key("output.type") + " round it, or write " +
                             r.key("output.format") + " hf");
  }
}

void check_packed_plan(const Recipe& r, const io::Checkpoint& ckpt, const model::Model& planned) {
  const io::PackedFormat fmt = parse_packed_format(r.output.format);
  const std::string where = output_where(r);
  const auto enc = pass_encodings(r, planned);
  // A merge writes its merged experts dense, and no pass quantizes the experts.
  for (size_t i = 0; i < r.passes.size() && !enc.count("experts"); ++i)
    if (r.passes[i]->name() == "merge")
      throw Error::unsupported(where + ": " + r.key("passes[" + std::to_string(i) + "]") +
                               " writes the merged experts dense, and vLLM's fused-MoE layer takes the routed experts "
                               "quantized: quantize the experts after the merge (int4 or int8 groups), or write " +
                               r.key("output.format") + " hf");
  if (fmt == io::PackedFormat::Gptq)
    check_gptq_layer_kinds(
        planned,
        [&](const model::OutTensor& o, const json& manifest) {
          if (!o.weight.empty()) return manifest.at(o.weight).value("encoding", "") == "intN";
          const auto it = enc.find(class_of(planned, o));
          return it != enc.end() && it->second.codec.has_value();
        },
        where, r.key("output.format"));
  if (enc.empty()) {  // the input's own codes, pruned: exactly what `export` checks
    core::with_context(where, [&] { check_packed(ckpt, planned, fmt); });
    return;
  }
  check_packed_structure(planned, fmt, where);
  const std::string way_out = std::string(fmt == io::PackedFormat::Awq
                                              ? "quantize with int4 groups of a size the rows take (e.g. 128, 64 or 32; "
                                              : "quantize with int4 or int8 groups (") +
                              "one scheme for every quantized class), or write " + r.key("output.format") + " hf";
  const ClassEncoding* scheme = nullptr;
  std::string scheme_cls;
  for (const auto& [cls, e] : enc) {
    const auto& c = e.codec;
    if (!c || c->kind != quant::CodecSpec::Kind::Int || (c->bits != 4 && c->bits != 8))
      throw Error::unsupported(where + ": " + e.key + " writes " + cls + " as " + e.what + ", which " + r.output.format +
                               " cannot hold (it holds " + io::packed_codes_held(fmt) + " groups): " + way_out);
    if (fmt == io::PackedFormat::Awq && c->bits != 4)
      throw Error::unsupported(where + ": " + e.key + " writes " + cls + " as " + e.what +
                               ", which awq cannot hold (AWQ GEMM packs 4 bits only): quantize with int4 groups, or write " +
                               r.key("output.format") + " gptq or compressed-tensors");
    if (cls == "embeddings")
      throw Error::unsupported(where + ": " + e.key + " quantizes the embeddings; " + r.output.format +
                               " quantizes Linear layers only: keep them (embeddings keep)");
    if (fmt != io::PackedFormat::CompressedTensors && cls == "lm_head")
      throw Error::unsupported(where + ": " + e.key + " quantizes lm_head, which the " + r.output.format +
                               " config does not hold here: keep it (lm_head keep), or write compressed-tensors");
    if (!scheme) {
      scheme = &e;
      scheme_cls = cls;
    } else if (c->bits != scheme->codec->bits || c->group != scheme->codec->group || c->symmetric != scheme->codec->symmetric) {
      throw Error::unsupported(where + ": " + e.key + " writes " + cls + " as " + e.what + " but " + scheme->key + " writes " +
                               scheme_cls + " as " + scheme->what + "; " + r.output.format +
                               " writes one scheme for every quantized Linear: " + way_out);
    }
  }
  if (!enc.count("experts")) {
    // The routed experts keep the input's storage: they must be intN codes already.
    bool encoded = false;
    json manifest = json::object();
    model::OutputOptions keep;
    keep.keep_codes = true;  // a GPTQ / AWQ / compressed-tensors input's codes (native_form)
    for (const auto& o : planned.outputs(keep, &manifest))
      encoded = encoded || (o.cls == "experts" && !o.weight.empty() && manifest.at(o.weight).value("encoding", "") == "intN");
    if (!encoded)
      throw Error::unsupported(where + ": the routed experts stay dense; vLLM's fused-MoE layer takes them quantized: "
                               "quantize the experts with int4 or int8 groups");
  }
  // Shapes the layout cannot take, for the weights the passes quantize (the scheme's group
  // dividing the rows; GPTQ: whole int32 words along both dimensions).
  for (const auto& o : planned.outputs(model::OutputOptions{})) {
    if (o.shape.size() != 2 || !o.weight.empty()) continue;
    auto it = enc.find(class_of(planned, o));
    if (it == enc.end() || !it->second.codec) continue;
    const auto& c = *it->second.codec;
    if (const std::string why = io::packed_shape_problem(fmt, c.bits, c.group, o.shape[0], o.shape[1]); !why.empty())
      throw Error::unsupported(where + ": " + it->second.key + " writes " + o.name + " as " + it->second.what + ": " +
                               r.output.format + " cannot hold " + why + ": " + way_out);
  }
}

// What every export format cannot hold and the plan does not show (the statistics decide it at run
// time): a prune pass's novices and its ragged expert counts (keep_ratio without uniform).
void check_pass_structure(const Recipe& r) {
  const std::string file = r.flag_names.empty() ? r.source + ": " : "";
  const std::string out = output_where(r);
  for (size_t i = 0; i < r.passes.size(); ++i) {
    const std::string pass_key = "passes[" + std::to_string(i) + "]";
    const json params = r.passes[i]->params();
    if (params.value("novices", false))
      throw Error::unsupported(file + r.key(pass_key + ".novices") + ": " + out +
                               " has no place for a constant (novice) expert: leave it out, or write " +
                               r.key("output.format") + " hf");
    if (params.contains("keep_ratio") && !params.value("uniform", true))
      throw Error::unsupported(file + r.key(pass_key + ".uniform") + ": layers would keep different expert counts, which " + out +
                               " cannot hold (one expert count for every layer): leave it out, or write " +
                               r.key("output.format") + " hf");
  }
}

}  // namespace

void check_gptq_layer_kinds(const model::Model& m, const std::function<bool(const model::OutTensor&, const json&)>& quantized,
                            const std::string& where, const std::string& format_key) {
  const model::Layer* dense = nullptr;
  const model::Layer* moe = nullptr;
  for (const auto& l : m.layers()) {
    if (l.moe && !moe) moe = &l;
    if (!l.moe && l.mlp && !dense) dense = &l;
  }
  if (!dense || !moe) return;
  // The classes only one kind of layer has; attention alone quantized is one set for both.
  static const std::set<std::string> one_kind = {"dense_mlp", "experts", "shared_experts", "router"};
  json manifest = json::object();
  for (const auto& o : m.outputs(model::OutputOptions{}, &manifest)) {
    if (!one_kind.count(o.cls) || !quantized(o, manifest)) continue;
    throw Error::unsupported(where + ": " + (o.weight.empty() ? o.name : o.weight) + ": layer " +
                             std::to_string(dense->index) + " has a dense MLP and layer " + std::to_string(moe->index) +
                             " an MoE block, but the gptq config names one set of quantized modules for every decoder "
                             "layer: write " + format_key + " compressed-tensors");
  }
}

std::unique_ptr<Sink> make_sink(io::Env& env, const Recipe& r, const std::vector<fs::path>& inputs) {
  if (r.output.format == "hf")
    return std::make_unique<HfSink>(env, r.output.path, inputs, r.output.force, r.key("output.force"),
                                    r.output.max_shard_bytes);
  return std::make_unique<ExportSink>(env, r, inputs);
}

void check_output_format(io::Env& env, const Recipe& r, const io::Checkpoint& ckpt, const model::Model& planned) {
  if (r.output.format == "hf") return;
  if (!ckpt.gguf()) check_pass_structure(r);  // a GGUF input's own checks: check_gguf_like_plan
  if (r.output.format == "gguf") check_gguf_plan(env, r, ckpt, planned);
  else if (copies_fp8_input(r, ckpt)) {
    // The FP8 weights are copied as stored: a dtype for the weights has no place (the folder
    // would be dense under the input's float-quantized config, which no reader loads).
    if (r.output.dtype || r.output.materialize)
      throw Error::unsupported(r.key(r.output.dtype ? "output.dtype" : "output.materialize") + ": " + r.key("output.format") +
                               " compressed-tensors of a compressed-tensors FP8 input copies its FP8 weights as stored; " +
                               r.key("output.format") + " hf writes them dequantized");
    check_fp8_copy(planned, output_where(r));
  }
  else check_packed_plan(r, ckpt, planned);
}

}  // namespace moe::pipeline
