#include "quant/registry.h"

#include <algorithm>

#include "core/error.h"
#include "core/fp8_block.h"
#include "quant/delta_ternary.h"
#include "quant/gguf_blocks.h"
#include "quant/intn.h"
#include "quant/lowrank.h"
#include "quant/pooled.h"
#include "quant/ternary.h"
#include "quant/ternary_dict.h"

namespace moe::quant {

using core::Error;
using nlohmann::json;

const std::vector<EncodingInfo>& known_encodings() {
  static const std::vector<EncodingInfo> table = [] {
    std::vector<EncodingInfo> t = {
      {"lowrank", {"a", "b"}, {"base"}, "W = [base +] A·B: A [out, r], B [r, in], base [out, in] (float)"},
      {"fp8-block", {"codes", "scale_inv"}, {}, "W = f8e4m3(codes) * scale_inv per block [br, bc]"},
      {"intN", {"codes", "scales"}, {"zeros"},
       "W = scale * (q - zero) per group: q N-bit codes (N = 2, 3, 4, 8) packed LSB-first, f16 scales, u8 zero points"},
      {"ternary", {"codes", "scales"}, {}, "W = 0, lo or hi per group: trits packed 5 per byte, f16 levels"},
      {"ternary-dict", {"codes", "counts", "levels", "dictionary"}, {},
       "W = 0, lo or hi per row: trit pairs coded by a shared Tunstall dictionary (sub-1-bit, QMoE), u16 codes, u8/u16/u32 codes per row, f16 levels"},
      {"pooled", {"weight"}, {}, "W = weight [out, in] (float), one expert of a cross-layer pool stored once for the weights of two layers"},
      {"delta-ternary", {"base", "stream", "scale"}, {},
       "W = base + scale * sign at the kept positions: base [out, in] (float) shared by a layer's experts, positions and signs Rice-coded, f32 scale (ComPEFT)"},
    };
    // gguf-TYPE: the ggml block types a codec writes (quant/codec.h), rows of blocks as GGUF stores them.
    static std::vector<std::string> names;  // the entries' names point into it
    for (const GgmlType g : ggml_grid_types()) names.push_back(std::string("gguf-") + ggml_type_info(g).name);
    for (const auto& n : names)
      t.push_back({n.c_str(), {"blocks"}, {}, "W = rows of ggml blocks of TYPE as GGUF stores them (ggml-common.h), U8 [out, row bytes]"});
    return t;
  }();
  return table;
}

namespace {

std::string known_list() {
  std::string s;
  for (const auto& e : known_encodings()) s += (s.empty() ? "" : ", ") + std::string(e.name);
  return s;
}

int64_t int_param(const json& entry, const char* key, int64_t min) {
  if (!entry.contains(key) || !entry[key].is_number_integer() || entry[key].get<int64_t>() < min)
    throw Error::corruption(std::string(key) + ": expected an integer >= " + std::to_string(min) + ", found " +
                            (entry.contains(key) ? entry[key].dump() : std::string("nothing")));
  return entry[key].get<int64_t>();
}

bool bool_param(const json& entry, const char* key) {
  if (!entry.contains(key) || !entry[key].is_boolean())
    throw Error::corruption(std::string(key) + ": expected true or false, found " +
                            (entry.contains(key) ? entry[key].dump() : std::string("nothing")));
  return entry[key].get<bool>();
}

TernaryGrid grid_param(const json& entry) {
  const json& g = entry.contains("grid") ? entry["grid"] : json();
  for (TernaryGrid t : {TernaryGrid::AbsMean, TernaryGrid::MinMax, TernaryGrid::TQ})
    if (g.is_string() && g.get<std::string>() == grid_name(t)) return t;
  throw Error::corruption("ternary: grid: expected \"absmean\", \"minmax\" or \"tq\", found " +
                          (g.is_null() ? std::string("nothing") : g.dump()));
}

}  // namespace

std::shared_ptr<const core::Encoding> decode(const json& entry, const std::map<std::string, StoredPart>& parts,
                                             const std::string& origin) {
  if (!entry.is_object() || !entry.contains("encoding") || !entry["encoding"].is_string())
    throw Error::corruption("expected an object with a string \"encoding\", found " + entry.dump());
  const std::string name = entry["encoding"].get<std::string>();
  const auto& table = known_encodings();
  auto info = std::find_if(table.begin(), table.end(), [&](const EncodingInfo& e) { return name == e.name; });
  if (info == table.end())
    throw Error::corruption("unknown encoding \"" + name + "\" (known: " + known_list() + "; written by a newer moe-tool?)");
  for (const char* r : info->required)
    if (!parts.count(r)) throw Error::corruption(name + ": part \"" + r + "\" missing");
  for (const auto& [role, p] : parts) {
    const bool ok = std::count(info->required.begin(), info->required.end(), role) ||
                    std::count(info->optional.begin(), info->optional.end(), role);
    if (!ok) throw Error::corruption(name + ": unexpected part \"" + role + "\"");
  }
  auto part = [&](const char* role) -> StoredPart {
    auto it = parts.find(role);
    return it == parts.end() ? StoredPart{} : it->second;
  };

  std::shared_ptr<const core::Encoding> enc;
  if (name == "lowrank") {
    const int64_t rank = int_param(entry, "rank", 0);
    const StoredPart a = part("a"), b = part("b"), base = part("base");
    auto lr = std::make_shared<LowRank>(a.tensor, b.tensor, base.tensor, a.shared, b.shared, base.shared);
    if (lr->rank() != rank)
      throw Error::corruption("lowrank: rank " + std::to_string(rank) + " but the factors have rank " +
                              std::to_string(lr->rank()) + " (a " + core::shape_str(a.tensor->shape()) + ")");
    enc = lr;
  } else if (name == "intN") {
    const int64_t bits = int_param(entry, "bits", 1);
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
      throw Error::corruption("intN: bits: expected 2, 3, 4 or 8, found " + std::to_string(bits));
    enc = std::make_shared<IntN>(static_cast<int>(bits), int_param(entry, "group", 0), bool_param(entry, "symmetric"),
                                 int_param(entry, "cols", 0), part("codes").tensor, part("scales").tensor,
                                 part("zeros").tensor);
  } else if (name == "ternary") {
    const TernaryGrid grid = grid_param(entry);
    enc = std::make_shared<Ternary>(grid, int_param(entry, "group", 0), bool_param(entry, "symmetric"),
                                    int_param(entry, "cols", 0), part("codes").tensor, part("scales").tensor);
  } else if (name == "ternary-dict") {
    enc = std::make_shared<TernaryDict>(int_param(entry, "cols", 0), part("codes").tensor, part("counts").tensor,
                                        part("levels").tensor, PairDictionary::from_part(part("dictionary").tensor));
  } else if (name == "delta-ternary") {
    const int64_t rice_k = int_param(entry, "rice_k", 0);
    if (rice_k > 30) throw Error::corruption("delta-ternary: rice_k: expected an integer in [0, 30], found " + std::to_string(rice_k));
    const StoredPart base = part("base");
    enc = std::make_shared<DeltaTernary>(base.tensor, part("stream").tensor, part("scale").tensor, int_param(entry, "nnz", 0),
                                         static_cast<int>(rice_k), base.shared, origin);
  } else if (name.rfind("gguf-", 0) == 0) {
    const GgmlTypeInfo* t = parse_ggml_type(name.substr(5));
    if (!entry.contains("type") || entry["type"] != name.substr(5))
      throw Error::corruption(name + ": type: expected \"" + name.substr(5) + "\", found " +
                              (entry.contains("type") ? entry["type"].dump() : std::string("nothing")));
    const int64_t cols = int_param(entry, "cols", 1);
    const core::Tensor& b = *part("blocks").tensor;
    if (b.dtype() != core::DType::U8 || b.rank() != 2 || cols % t->block != 0 ||
        static_cast<uint64_t>(b.dim(1)) != ggml_row_bytes(t->type, cols))
      throw Error::corruption(name + ": blocks: expected U8 [rows, " +
                              (cols % t->block == 0 ? std::to_string(ggml_row_bytes(t->type, cols)) : std::string("?")) +
                              "] (rows of " + std::to_string(cols) + " values in blocks of " + std::to_string(t->block) +
                              "), found " + core::dtype_name(b.dtype()) + " " + core::shape_str(b.shape()));
    enc = std::make_shared<GgufBlocks>(t->type, cols, b, /*stored=*/true);
  } else if (name == "pooled") {
    enc = std::make_shared<Pooled>(part("weight").tensor);
  } else {  // fp8-block
    const json& blk = entry.contains("block") ? entry["block"] : json();
    if (!blk.is_array() || blk.size() != 2 || !blk[0].is_number_integer() || !blk[1].is_number_integer())
      throw Error::corruption("fp8-block: block: expected two positive integers, found " + blk.dump());
    enc = std::make_shared<core::Fp8Block>(*part("codes").tensor, *part("scale_inv").tensor, blk[0].get<int64_t>(),
                                           blk[1].get<int64_t>());
  }
  return enc;
}

}  // namespace moe::quant
