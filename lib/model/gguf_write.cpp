// Writing a model loaded from a GGUF file and pruned back as GGUF, blocks copied as stored
// (model/gguf_write.h). In the model layer: it reads the model's layers (model/model.h) and the
// GGUF input's file (io/gguf_model.h).
#include "model/gguf_write.h"

#include <cstring>
#include <optional>

#include "core/error.h"
#include "io/gguf_model.h"
#include "io/gguf_names.h"
#include "model/model.h"

namespace moe::model {
namespace {
// The GGUF names this file reads (file-local to keep unity batches free of them).
using core::Error;
using io::Env;
using io::GgufArch;
using io::GgufFile;
using io::GgufModel;
using quant::GgufBlocks;
using io::GgufMetadata;
using io::GgufTensorInfo;
using io::GgufValue;
using io::GgufWriter;
using io::gguf_permute_heads;
using io::gguf_global_role;
using io::gguf_layer_role;
using io::gguf_moe_field;
using io::gguf_permuted_source_row;
using io::gguf_plain_dtype;
using quant::GgmlType;
namespace fs = std::filesystem;
}  // namespace
}  // namespace moe::model

// ---- writing a pruned GGUF model back (write_gguf_like) ----

namespace moe::model {

namespace {

// One piece of an output tensor's bytes: a view of stored bytes (the source file, or an owned copy
// of a few rows) that stays alive while the file is written. `order` (when not empty) lists the
// stored rows in the order they are written (q/k rows permuted back to the converter's order).
struct Piece {
  core::Tensor keep;
  const uint8_t* data = nullptr;
  uint64_t n = 0;
  std::vector<int64_t> order;
};

// The stored bytes of `t` as GGUF rows of `cols` values of type `type`, rows in the file's order
// (permute_heads > 0: the converter's q/k order). Error::unsupported when t holds anything else.
Piece stored_piece(const core::Tensor& t, GgmlType type, int64_t cols, int64_t permute_heads, const std::string& name) {
  core::Tensor bytes;
  if (const auto* b = dynamic_cast<const GgufBlocks*>(t.encoding()); b && b->type() == type && b->cols() == cols) {
    bytes = b->bytes();
  } else if (!t.encoding() && gguf_plain_dtype(type) == t.dtype() && t.numel() % cols == 0) {
    bytes = t;
  } else {
    throw Error::unsupported(name + ": changed by a pass (now " +
                             (t.encoding() ? "'" + t.encoding()->name() + "'" : std::string(core::dtype_name(t.dtype()))) +
                             ", the source stores " + quant::ggml_type_info(type).name +
                             "); a GGUF output copies blocks as they are and never re-quantizes: write a folder (-o DIR) "
                             "instead");
  }
  Piece p{bytes, bytes.data(), bytes.nbytes(), {}};
  if (permute_heads > 0) {
    const int64_t rows = bytes.shape().at(0);
    p.order.resize(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) p.order[static_cast<size_t>(r)] = gguf_permuted_source_row(r, permute_heads, rows);
  }
  return p;
}

// A tensor the GGUF reader gave back transformed (io::gguf_value_map: qwen3next's 1 + w norms,
// -exp(A_log)): the file's stored bytes, as long as the model's tensor is still the reader's value
// of them (Error::unsupported naming it otherwise: a pass changed it).
Piece mapped_piece(const core::Tensor& w, const GgufFile& f, const GgufTensorInfo& t, io::GgufValueMap map,
                   const std::string& name) {
  const auto dt = gguf_plain_dtype(t.type);
  const uint8_t* data = f.tensor_data(t);
  const int64_t n = static_cast<int64_t>(t.nbytes() / (dt ? core::dtype_size(*dt) : 1));
  bool same = dt && !w.encoding() && w.numel() == n;
  if (same) {
    std::vector<float> v = core::Tensor(*dt, {n}, data, nullptr).to_f32();
    io::gguf_map_from_file(map, v.data(), v.size());
    same = v == w.to_f32();
  }
  if (!same)
    throw Error::unsupported(name + ": changed by a pass; a GGUF output copies the input's stored values (write a folder (-o DIR) "
                             "instead)");
  return Piece{core::Tensor(), data, t.nbytes(), {}};
}

// Refuses a GGUF output of an MLA model whose kv_b_proj (layer `layer`) is no longer the reader's
// rebuild of the input's attn_k_b / attn_v_b (io::GgufModel): those halves are copied as stored,
// so a pass that changed kv_b_proj would be lost (Error::unsupported naming it, as stored_piece).
void refuse_changed_kv_b(const Model& m, const io::GgufModel& src, int layer, const std::string& name) {
  const FamilyDesc& fam = m.family();
  std::string ours;
  for (const auto& r : fam.layer_roles)
    if (r.role == io::kGgufMlaRole) ours = expand(fam.layer_prefix, layer) + r.name;
  const core::Tensor& w = m.layers().at(static_cast<size_t>(layer)).tensors.at(io::kGgufMlaRole);
  if (w.encoding() || w.to_f32() != src.tensor(ours).to_f32())
    throw Error::unsupported(name + ": kv_b_proj changed by a pass; a GGUF output copies the input's stored attn_k_b / "
                             "attn_v_b: write a folder (-o DIR) instead");
}

}  // namespace

namespace {

// What write_gguf_like writes for m: the metadata, the tensor infos and (with `pieces`) each
// tensor's stored bytes, checked; Error::unsupported as write_gguf_like documents.
struct LikeLayout {
  GgufMetadata kv;
  std::vector<GgufTensorInfo> infos;
};

LikeLayout like_layout(const Model& m, const io::GgufModel& src, const std::string& out,
                       std::vector<std::vector<Piece>>* pieces) {
  const GgufFile& f = src.file();
  const GgufArch& arch = src.arch();
  m.refuse_novices(out, "GGUF has no constant expert");
  int64_t experts = -1;
  for (const auto& layer : m.layers()) {
    if (!layer.moe) {
      // A leading dense layer of the input stays one (its ffn_gate/ffn_up/ffn_down are copied).
      // So does an interleaved one (llama4).
      if ((arch.leading_dense || arch.interleaved_dense) &&
          src.file().find_tensor("blk." + std::to_string(layer.index) + ".ffn_gate.weight"))
        continue;
      throw Error::unsupported(out + ": layer " + std::to_string(layer.index) + " has no MoE block");
    }
    if (experts >= 0 && layer.moe->num_experts() != experts)
      throw Error::unsupported(out + ": layer " + std::to_string(layer.index) + " keeps " +
                               std::to_string(layer.moe->num_experts()) + " experts, other layers " + std::to_string(experts) +
                               "; GGUF has one expert_count per model (prune with the same count in every layer)");
    experts = layer.moe->num_experts();
  }
  const std::string A = arch.arch;
  LikeLayout l;
  l.kv = f.metadata();
  const GgufValue* count = f.find(A + ".expert_count");
  const bool changed = count && count->integer != static_cast<uint64_t>(experts);
  for (auto& [key, v] : l.kv) {
    if (key == A + ".expert_count") v = GgufValue::u32(static_cast<uint32_t>(experts));
    if (key == A + ".expert_used_count") v = GgufValue::u32(static_cast<uint32_t>(std::min(m.dims().top_k, experts)));
  }
  // Group-limited routing: the groups were blocks of the input's experts; the kept ones have none
  // (as a folder output writes n_group 1).
  if (changed)
    std::erase_if(l.kv, [&](const auto& kv) { return kv.first == A + ".expert_group_count" || kv.first == A + ".expert_group_used_count"; });

  // Every output tensor's header and pieces, checked before the file is created.
  for (const auto& t : f.tensors()) {
    GgufTensorInfo info = t;
    std::vector<Piece> ps;
    // The stored bytes of one weight (only when the pieces are asked for).
    auto add = [&](const core::Tensor& w, int64_t heads, const std::string& name,
                   io::GgufValueMap map = io::GgufValueMap::None) {
      if (!pieces) return;
      ps.push_back(map != io::GgufValueMap::None ? mapped_piece(w, f, t, map, name)
                                                 : stored_piece(w, t.type, info.ne[0], heads, name));
    };
    if (io::gguf_rope_tensor(arch, t.name)) {
      // The llama3 / longrope RoPE divisors (not tensors of the model: the reader made them
      // rope_scaling), copied as stored.
      if (pieces) ps.push_back(Piece{core::Tensor(), f.tensor_data(t), t.nbytes(), {}});
    } else if (const char* role = gguf_global_role(t.name)) {
      auto g = m.globals().find(role);
      if (g == m.globals().end()) throw Error::internal(t.name + ": no global " + role);
      add(g->second, 0, t.name, io::gguf_value_map(m.family(), role));
    } else {
      const size_t dot = t.name.find('.', 4);
      const int layer = std::stoi(t.name.substr(4, dot - 4));
      const std::string rest = t.name.substr(dot + 1);
      const model::Layer& L = m.layers().at(static_cast<size_t>(layer));
      if (arch.mla && (rest == io::kGgufMlaKB || rest == io::kGgufMlaVB)) {
        // kv_b_proj's two stored halves (io/gguf_names.h), copied as stored once the model's
        // kv_b_proj is checked to be still their rebuild (a pass that changed it is refused).
        if (pieces) {
          if (rest == io::kGgufMlaKB) refuse_changed_kv_b(m, src, layer, t.name);
          ps.push_back(Piece{core::Tensor(), f.tensor_data(t), t.nbytes(), {}});
        }
      } else if (const char* role = gguf_layer_role(arch, rest)) {
        add(L.tensors.at(role), gguf_permute_heads(arch, role, m.dims().heads, m.dims().kv_heads), t.name,
            io::gguf_value_map(m.family(), role));
      } else {
        const std::string field = gguf_moe_field(arch, rest);
        const model::MoeBlock* b = L.moe ? &*L.moe : nullptr;
        if (field.rfind("dense_", 0) == 0) {
          const model::Mlp& x = *L.mlp;
          add(field == "dense_gate" ? x.gate : field == "dense_up" ? x.up : x.down, 0, t.name);
        } else if (field == "router_bias") {  // [E]: the kept experts' entries
          info.ne[0] = experts;
          add(*b->router_bias, 0, t.name);
        } else if (field == "router") {
          add(b->router, 0, t.name);
          info.ne[1] = experts;
        } else if (field.rfind("expert_", 0) == 0) {
          // Weights [in, out, E]; gpt-oss's expert biases [out, E]: the kept experts' slices.
          for (int64_t e = 0; e < experts; ++e) {
            const model::Mlp& x = b->experts[static_cast<size_t>(e)];
            const std::optional<core::Tensor>* bias = field == "expert_gate_bias" ? &x.gate_bias
                                                      : field == "expert_up_bias" ? &x.up_bias
                                                      : field == "expert_down_bias" ? &x.down_bias : nullptr;
            if (bias && !*bias) throw Error::internal(t.name + ": expert " + std::to_string(e) + " has no bias");
            add(bias ? **bias : field == "expert_gate" ? x.gate : field == "expert_up" ? x.up : x.down, 0,
                t.name + " expert " + std::to_string(e));
          }
          info.ne.back() = experts;
        } else if (field == "shared_expert_gate") {
          add(*b->shared_gate, 0, t.name);
        } else {
          const model::Mlp& x = *b->shared;
          add(field == "shared_gate" ? x.gate : field == "shared_up" ? x.up : x.down, 0, t.name);
        }
      }
    }
    if (pieces) {
      uint64_t n = 0;
      for (const auto& p : ps) n += p.n;
      if (n != info.nbytes())
        throw Error::unsupported(t.name + ": " + std::to_string(n) + " bytes kept, the header says " +
                                 std::to_string(info.nbytes()) + "; its shape was changed by a pass");
      pieces->push_back(std::move(ps));
    }
    l.infos.push_back(std::move(info));
  }
  return l;
}

// Error::invalid naming the tensor when a piece holds a NaN or Inf (decoded a row at a time: a
// block type's NaN/Inf comes from its f16 scales).
void check_finite(const Piece& p, GgmlType type, int64_t cols, const std::string& tensor) {
  const std::string name = tensor + " (copied from the input)";
  if (const auto dt = gguf_plain_dtype(type)) {
    const int64_t bad = core::first_non_finite(*dt, p.data, static_cast<size_t>(p.n / core::dtype_size(*dt)));
    if (bad >= 0) throw Error::invalid(name + ": non-finite value at index " + std::to_string(bad));
    return;
  }
  const uint64_t rb = quant::ggml_row_bytes(type, cols);
  std::vector<float> row(static_cast<size_t>(cols));
  for (uint64_t r = 0; r * rb < p.n; ++r) {
    const uint64_t from = p.order.empty() ? r : static_cast<uint64_t>(p.order[r]);
    quant::decode_row(type, p.data + from * rb, cols, row.data());
    const int64_t bad = core::first_non_finite(core::DType::F32, row.data(), row.size());
    if (bad >= 0)
      throw Error::invalid(name + ": non-finite value in row " + std::to_string(r) + " at column " + std::to_string(bad) +
                           " (a " + quant::ggml_type_info(type).name + " block's scale)");
  }
}

// Whether the n bytes at p (whole rows) are finite, read without decoding (io::gguf_scales_finite
// for the block types); nullopt for a type that must be decoded (check_finite).
std::optional<bool> quick_finite(const uint8_t* p, uint64_t n, GgmlType type) {
  if (const auto dt = gguf_plain_dtype(type))
    return core::first_non_finite(*dt, p, static_cast<size_t>(n / core::dtype_size(*dt))) < 0;
  return io::gguf_scales_finite(type, p, n);
}

}  // namespace

GgufLikeSize gguf_like_size(const Model& m, const io::GgufModel& src) {
  LikeLayout l = like_layout(m, src, src.path().string(), nullptr);
  GgufLikeSize s;
  for (const auto& t : l.infos) s.tensor_bytes += t.nbytes();
  s.file_bytes = io::gguf_file_size(std::move(l.kv), std::move(l.infos));
  return s;
}

uint64_t write_gguf_like(io::Env& env, const Model& m, const io::GgufModel& src, const fs::path& path) {
  std::vector<std::vector<Piece>> pieces;
  LikeLayout l = like_layout(m, src, path.string(), &pieces);
  const GgufFile& f = src.file();
  GgufWriter w(env, path, std::move(l.kv), l.infos);
  std::vector<uint8_t> buf, whole, permuted;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const GgmlType type = l.infos[i].type;
    // A few whole rows at a time: read from the file into a small buffer (no page mapped), checked
    // there and written from it, so the input is read once (owned rows: checked and written as
    // they are). Types without a scan are decoded through the mapping, then copied inside the
    // kernel; the decode also names a non-finite value's row.
    const uint64_t rb = quant::ggml_row_bytes(type, l.infos[i].ne[0]);
    const uint64_t step = std::max<uint64_t>(1, (uint64_t{256} << 10) / rb) * rb;
    const bool scan = quick_finite(nullptr, 0, type).has_value();
    const std::string name = f.path().string() + ": tensor " + l.infos[i].name;
    buf.resize(std::max<size_t>(buf.size(), step));
    for (const auto& p : pieces[i]) {
      if (!scan) check_finite(p, type, l.infos[i].ne[0], name);
      if (!p.order.empty()) {
        // Rows written in another order (an attention weight, small): read whole, checked, the
        // rows gathered into a second buffer.
        whole.resize(std::max<size_t>(whole.size(), p.n));
        permuted.resize(std::max<size_t>(permuted.size(), p.n));
        const uint8_t* rows = f.read_range(p.data, p.n, whole.data());
        if (scan && !*quick_finite(rows, p.n, type)) check_finite(p, type, l.infos[i].ne[0], name);
        const uint64_t row = p.n / p.order.size();  // a weight's row, or one value of a 1-D bias
        for (size_t r = 0; r < p.order.size(); ++r)
          std::memcpy(permuted.data() + r * row, rows + static_cast<uint64_t>(p.order[r]) * row, row);
        w.append(permuted.data(), p.n);
        f.release_range(p.data, p.n);
        continue;
      }
      for (uint64_t at = 0; at < p.n; at += step) {
        const uint64_t n = std::min(step, p.n - at);
        if (!scan) {
          w.append_copy(f, p.data + at, n);
          continue;
        }
        const uint8_t* rows = f.read_range(p.data + at, n, buf.data());
        if (!*quick_finite(rows, n, type)) check_finite(p, type, l.infos[i].ne[0], name);  // throws, naming the row
        w.append(rows, n);
      }
      f.release_range(p.data, p.n);  // pages a decode read (a no-op for owned rows)
    }
  }
  return w.finish();
}

}  // namespace moe::model
