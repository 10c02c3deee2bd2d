#include "io/gguf.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <set>

#include "core/error.h"
#include "core/tensor.h"

namespace moe::io {

namespace {

using core::Error;
using quant::GgmlType;

// The layout of the metadata value types: name and size of a scalar (0: string, array).
struct ValueLayout {
  GgufValueType type;
  const char* name;
  size_t size;
  bool is_signed, is_float;
};

constexpr ValueLayout kValueLayouts[] = {
    {GgufValueType::U8, "u8", 1, false, false},      {GgufValueType::I8, "i8", 1, true, false},
    {GgufValueType::U16, "u16", 2, false, false},    {GgufValueType::I16, "i16", 2, true, false},
    {GgufValueType::U32, "u32", 4, false, false},    {GgufValueType::I32, "i32", 4, true, false},
    {GgufValueType::F32, "f32", 4, false, true},     {GgufValueType::BOOL, "bool", 1, false, false},
    {GgufValueType::STRING, "string", 0, false, false}, {GgufValueType::ARRAY, "array", 0, false, false},
    {GgufValueType::U64, "u64", 8, false, false},    {GgufValueType::I64, "i64", 8, true, false},
    {GgufValueType::F64, "f64", 8, false, true},
};

const ValueLayout* value_layout(uint32_t id) {
  for (const auto& l : kValueLayouts)
    if (static_cast<uint32_t>(l.type) == id) return &l;
  return nullptr;
}
const ValueLayout& value_layout(GgufValueType t) { return *value_layout(static_cast<uint32_t>(t)); }

// Smallest encoded size of a value of this type (count bounds for arrays and n_kv).
uint64_t min_value_size(GgufValueType t) {
  if (t == GgufValueType::STRING) return 8;
  if (t == GgufValueType::ARRAY) return 4 + 8;
  return value_layout(t).size;
}

constexpr uint64_t kMinKvSize = 8 + 4 + 1;               // empty key, type, one byte
constexpr uint64_t kMinTensorInfoSize = 8 + 4 + 8 + 4 + 8;  // empty name, n_dims, ne[0], type, offset
constexpr int kMaxArrayDepth = 4;

uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// Bounds-checked little-endian cursor over the mapped file.
class Cursor {
 public:
  Cursor(const uint8_t* data, uint64_t size, std::string file) : d_(data), size_(size), file_(std::move(file)) {}
  uint64_t pos() const { return pos_; }
  uint64_t left() const { return size_ - pos_; }

  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw Error::corruption(file_ + ": " + field + ": " + what);
  }
  void need(uint64_t n, const std::string& field) const {
    if (n > left())
      fail(field, "needs " + std::to_string(n) + " bytes at offset " + std::to_string(pos_) + ", the file has " +
                      std::to_string(left()) + " left (truncated)");
  }
  template <class T>
  T get(const std::string& field) {
    need(sizeof(T), field);
    T v;
    std::memcpy(&v, d_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string string(const std::string& field) {
    const uint64_t n = get<uint64_t>(field + " length");
    if (n > left())
      fail(field, "string length " + std::to_string(n) + " past the end of the file (" + std::to_string(left()) +
                      " bytes left)");
    std::string s(reinterpret_cast<const char*>(d_ + pos_), n);
    pos_ += n;
    return s;
  }
  GgufValue value(uint32_t type_id, const std::string& field, int depth) {
    const ValueLayout* l = value_layout(type_id);
    if (!l) fail(field, "unknown value type " + std::to_string(type_id));
    GgufValue v;
    v.type = l->type;
    if (l->type == GgufValueType::STRING) {
      v.str = string(field);
    } else if (l->type == GgufValueType::ARRAY) {
      if (depth >= kMaxArrayDepth) fail(field, "arrays nested deeper than " + std::to_string(kMaxArrayDepth));
      const uint32_t elem = get<uint32_t>(field + " array type");
      const ValueLayout* el = value_layout(elem);
      if (!el) fail(field, "unknown array element type " + std::to_string(elem));
      v.elem = el->type;
      const uint64_t n = get<uint64_t>(field + " array length");
      if (n > left() / min_value_size(el->type))
        fail(field, "array length " + std::to_string(n) + " of " + el->name + " past the end of the file (" +
                        std::to_string(left()) + " bytes left)");
      v.items.reserve(n);
      for (uint64_t i = 0; i < n; ++i) v.items.push_back(value(elem, field + "[" + std::to_string(i) + "]", depth + 1));
    } else {
      need(l->size, field);
      uint64_t raw = 0;
      std::memcpy(&raw, d_ + pos_, l->size);
      pos_ += l->size;
      if (l->type == GgufValueType::F32) {
        float f;
        std::memcpy(&f, &raw, 4);
        v.real = f;
      } else if (l->type == GgufValueType::F64) {
        std::memcpy(&v.real, &raw, 8);
      } else if (l->is_signed && l->size < 8) {
        const int shift = 64 - static_cast<int>(l->size) * 8;
        v.integer = static_cast<uint64_t>(static_cast<int64_t>(raw << shift) >> shift);
      } else {
        v.integer = raw;
      }
    }
    return v;
  }

 private:
  const uint8_t* d_;
  uint64_t size_, pos_ = 0;
  std::string file_;
};

// Little-endian byte sink for the header.
struct Sink {
  std::vector<uint8_t> b;
  template <class T>
  void put(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof(T));
  }
  void string(const std::string& s) {
    put<uint64_t>(s.size());
    b.insert(b.end(), s.begin(), s.end());
  }
  void value(const GgufValue& v) {
    const ValueLayout& l = value_layout(v.type);
    if (v.type == GgufValueType::STRING) {
      string(v.str);
    } else if (v.type == GgufValueType::ARRAY) {
      put<uint32_t>(static_cast<uint32_t>(v.elem));
      put<uint64_t>(v.items.size());
      for (const auto& it : v.items) {
        if (it.type != v.elem) throw Error::internal("gguf writer: array element of another type");
        value(it);
      }
    } else if (v.type == GgufValueType::F32) {
      put<float>(static_cast<float>(v.real));
    } else if (v.type == GgufValueType::F64) {
      put<double>(v.real);
    } else {
      const auto* p = reinterpret_cast<const uint8_t*>(&v.integer);
      b.insert(b.end(), p, p + l.size);
    }
  }
};

std::string tensor_field(size_t i, const std::string& name) {
  return "tensor " + std::to_string(i) + (name.empty() ? "" : " (" + name + ")");
}

// The checks both sides share on one tensor info: dims, type row size, element count.
void check_tensor_shape(const GgufTensorInfo& t, const std::function<void(const std::string&, const std::string&)>& fail) {
  if (t.ne.empty() || t.ne.size() > static_cast<size_t>(kGgufMaxDims))
    fail("n_dims", std::to_string(t.ne.size()) + " outside 1.." + std::to_string(kGgufMaxDims));
  for (size_t j = 0; j < t.ne.size(); ++j)
    if (t.ne[j] < 0) fail("ne[" + std::to_string(j) + "]", "dimension " + std::to_string(t.ne[j]) + " is negative or past 2^63");
  try {
    (void)t.numel();
  } catch (const Error& e) {
    fail("ne", e.message());
  }
  const auto& info = quant::ggml_type_info(t.type);
  if (t.ne[0] % info.block != 0)
    fail("ne[0]", std::to_string(t.ne[0]) + " is not a multiple of the " + info.name + " block size " +
                      std::to_string(info.block));
}

}  // namespace

const char* gguf_value_type_name(GgufValueType t) {
  const ValueLayout* l = value_layout(static_cast<uint32_t>(t));
  return l ? l->name : "?";
}

// ---- GgufValue ----

namespace {
GgufValue scalar(GgufValueType type, uint64_t integer, double real = 0.0) {
  GgufValue r;
  r.type = type;
  r.integer = integer;
  r.real = real;
  return r;
}
}  // namespace
GgufValue GgufValue::u32(uint32_t v) { return scalar(GgufValueType::U32, v); }
GgufValue GgufValue::i32(int32_t v) { return scalar(GgufValueType::I32, static_cast<uint64_t>(static_cast<int64_t>(v))); }
GgufValue GgufValue::u64(uint64_t v) { return scalar(GgufValueType::U64, v); }
GgufValue GgufValue::f32(float v) { return scalar(GgufValueType::F32, 0, v); }
GgufValue GgufValue::boolean(bool v) { return scalar(GgufValueType::BOOL, v ? 1 : 0); }
GgufValue GgufValue::string(std::string v) {
  GgufValue r = scalar(GgufValueType::STRING, 0);
  r.str = std::move(v);
  return r;
}
namespace {
template <class T, class F>
GgufValue array_of(GgufValueType elem, const std::vector<T>& v, F make) {
  GgufValue r;
  r.type = GgufValueType::ARRAY;
  r.elem = elem;
  r.items.reserve(v.size());
  for (const auto& x : v) r.items.push_back(make(x));
  return r;
}
}  // namespace
GgufValue GgufValue::strings(const std::vector<std::string>& v) {
  return array_of(GgufValueType::STRING, v, [](const std::string& s) { return GgufValue::string(s); });
}
GgufValue GgufValue::i32s(const std::vector<int32_t>& v) {
  return array_of(GgufValueType::I32, v, [](int32_t x) { return GgufValue::i32(x); });
}
GgufValue GgufValue::f32s(const std::vector<float>& v) {
  return array_of(GgufValueType::F32, v, [](float x) { return GgufValue::f32(x); });
}

bool GgufValue::is_integer() const {
  const ValueLayout& l = value_layout(type);
  return l.size > 0 && !l.is_float && type != GgufValueType::BOOL;
}
int64_t GgufValue::as_int(const std::string& key) const {
  if (!is_integer()) throw Error::corruption(key + ": expected an integer, found " + gguf_value_type_name(type));
  return static_cast<int64_t>(integer);
}
double GgufValue::as_double(const std::string& key) const {
  if (value_layout(type).is_float) return real;
  if (is_integer()) return value_layout(type).is_signed ? static_cast<double>(static_cast<int64_t>(integer)) : static_cast<double>(integer);
  throw Error::corruption(key + ": expected a number, found " + gguf_value_type_name(type));
}
const std::string& GgufValue::as_string(const std::string& key) const {
  if (type != GgufValueType::STRING) throw Error::corruption(key + ": expected a string, found " + gguf_value_type_name(type));
  return str;
}

// ---- GgufTensorInfo ----

int64_t GgufTensorInfo::numel() const { return core::shape_numel(core::Shape(ne.begin(), ne.end())); }

uint64_t GgufTensorInfo::nbytes() const {
  if (ne.empty() || ne[0] == 0) return 0;
  return static_cast<uint64_t>(numel() / ne[0]) * quant::ggml_row_bytes(type, ne[0]);
}

// ---- GgufFile ----

GgufFile GgufFile::open(Env& env, const fs::path& path) {
  GgufFile f;
  f.path_ = path;
  const std::string file = path.string();
  if (!env.exists(path)) throw Error::not_found(file + ": no such file");
  f.map_ = env.map_file(path);
  Cursor c(f.map_->data(), f.map_->size(), file);

  const uint32_t magic = c.get<uint32_t>("magic");
  if (magic != kGgufMagic) c.fail("magic", "not a GGUF file (first 4 bytes are not \"GGUF\")");
  f.version_ = c.get<uint32_t>("version");
  if (f.version_ != kGgufVersion) c.fail("version", std::to_string(f.version_) + " (only version 3 is read)");
  const uint64_t n_tensors = c.get<uint64_t>("n_tensors");
  const uint64_t n_kv = c.get<uint64_t>("n_kv");
  if (n_kv > c.left() / kMinKvSize)
    c.fail("n_kv", std::to_string(n_kv) + " entries cannot fit in the " + std::to_string(c.left()) + " bytes left");
  if (n_tensors > c.left() / kMinTensorInfoSize)
    c.fail("n_tensors", std::to_string(n_tensors) + " tensor infos cannot fit in the " + std::to_string(c.left()) +
                            " bytes left");

  std::set<std::string> keys;
  for (uint64_t i = 0; i < n_kv; ++i) {
    const std::string field = "kv " + std::to_string(i);
    std::string key = c.string(field + " key");
    const std::string kf = field + " (" + key + ")";
    if (!keys.insert(key).second) c.fail(kf, "duplicate key");
    const uint32_t type = c.get<uint32_t>(kf + " type");
    GgufValue v = c.value(type, kf, 0);
    f.kv_.emplace_back(std::move(key), std::move(v));
  }
  if (const GgufValue* a = f.find("general.alignment")) {
    if (a->type != GgufValueType::U32) c.fail("general.alignment", std::string("expected u32, found ") + gguf_value_type_name(a->type));
    if (a->integer == 0 || (a->integer & (a->integer - 1)) != 0)
      c.fail("general.alignment", std::to_string(a->integer) + " is not a power of two");
    f.alignment_ = static_cast<uint32_t>(a->integer);
  }

  f.tensors_.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    t.name = c.string(tensor_field(i, "") + " name");
    const std::string tf = tensor_field(i, t.name);
    if (f.tensor_index_.count(t.name)) c.fail(tf, "duplicate tensor name");
    const uint32_t n_dims = c.get<uint32_t>(tf + " n_dims");
    if (n_dims == 0 || n_dims > static_cast<uint32_t>(kGgufMaxDims))
      c.fail(tf + " n_dims", std::to_string(n_dims) + " outside 1.." + std::to_string(kGgufMaxDims));
    for (uint32_t j = 0; j < n_dims; ++j) {
      const uint64_t d = c.get<uint64_t>(tf + " ne[" + std::to_string(j) + "]");
      t.ne.push_back(static_cast<int64_t>(d));
    }
    const uint32_t type = c.get<uint32_t>(tf + " type");
    const auto* info = quant::ggml_type_info(type);
    if (!info) c.fail(tf + " type", "unknown ggml type " + std::to_string(type));
    t.type = info->type;
    t.offset = c.get<uint64_t>(tf + " offset");
    check_tensor_shape(t, [&](const std::string& fld, const std::string& what) { c.fail(tf + " " + fld, what); });
    f.tensor_index_[t.name] = f.tensors_.size();
    f.tensors_.push_back(std::move(t));
  }

  f.data_offset_ = align_up(c.pos(), f.alignment_);
  const uint64_t size = f.map_->size();
  const uint64_t data_size = size > f.data_offset_ ? size - f.data_offset_ : 0;
  std::vector<std::pair<uint64_t, size_t>> by_offset;
  for (size_t i = 0; i < f.tensors_.size(); ++i) {
    const auto& t = f.tensors_[i];
    const std::string tf = tensor_field(i, t.name);
    if (t.offset % f.alignment_ != 0)
      c.fail(tf + " offset", std::to_string(t.offset) + " is not a multiple of the alignment " + std::to_string(f.alignment_));
    const uint64_t nb = t.nbytes();
    if (t.offset > data_size || nb > data_size - t.offset)
      c.fail(tf + " offset", std::to_string(t.offset) + " + " + std::to_string(nb) + " bytes past the data section end " +
                                 std::to_string(data_size) + " (truncated data)");
    if (nb) by_offset.emplace_back(t.offset, i);
  }
  std::sort(by_offset.begin(), by_offset.end());
  for (size_t k = 1; k < by_offset.size(); ++k) {
    const auto& prev = f.tensors_[by_offset[k - 1].second];
    if (prev.offset + prev.nbytes() > by_offset[k].first) {
      const size_t i = by_offset[k].second;
      c.fail(tensor_field(i, f.tensors_[i].name) + " offset", "data overlaps tensor " + prev.name);
    }
  }
  return f;
}

const GgufValue* GgufFile::find(const std::string& key) const {
  for (const auto& [k, v] : kv_)
    if (k == key) return &v;
  return nullptr;
}

const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const uint8_t* GgufFile::tensor_data(const GgufTensorInfo& t) const { return map_->data() + data_offset_ + t.offset; }

namespace {

// Whether [p, p + n) starts inside m's mapping and ends inside it.
bool inside(const MappedFile& m, const uint8_t* p, uint64_t n) {
  return p >= m.data() && p < m.data() + m.size() && n <= m.size() - static_cast<uint64_t>(p - m.data());
}

}  // namespace

bool GgufFile::release_range(const uint8_t* p, uint64_t n) const {
  if (!inside(*map_, p, n)) return false;
  map_->release(static_cast<uint64_t>(p - map_->data()), n);
  return true;
}

const uint8_t* GgufFile::read_range(const uint8_t* p, uint64_t n, uint8_t* buf) const {
  if (n == 0 || !inside(*map_, p, n)) return p;
  map_->read_at(static_cast<uint64_t>(p - map_->data()), buf, n);
  return buf;
}

std::vector<float> GgufFile::decode(const GgufTensorInfo& t) const {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  if (out.empty()) return out;
  const int64_t cols = t.ne[0], rows = t.numel() / cols;
  const uint64_t rb = quant::ggml_row_bytes(t.type, cols);
  const uint8_t* src = tensor_data(t);
  core::with_context(path_.string() + ": tensor " + t.name, [&] {
    for (int64_t r = 0; r < rows; ++r) quant::decode_row(t.type, src + r * rb, cols, out.data() + r * cols);
  });
  return out;
}

std::optional<bool> gguf_scales_finite(quant::GgmlType t, const uint8_t* p, uint64_t n) {
  using quant::GgmlType;
  // The byte offsets of a block's f16 scales (ggml-common.h's block structs); -1 ends the list.
  int at[2] = {-1, -1};
  switch (t) {
    case GgmlType::Q4_0: case GgmlType::Q5_0: case GgmlType::Q8_0: case GgmlType::IQ4_NL: case GgmlType::IQ4_XS: at[0] = 0; break;
    case GgmlType::Q4_1: case GgmlType::Q5_1: case GgmlType::Q4_K: case GgmlType::Q5_K: at[0] = 0, at[1] = 2; break;
    case GgmlType::Q2_K: at[0] = 80, at[1] = 82; break;
    case GgmlType::Q3_K: at[0] = 108; break;
    case GgmlType::Q6_K: at[0] = 208; break;
    case GgmlType::TQ1_0: at[0] = 52; break;
    case GgmlType::TQ2_0: at[0] = 64; break;
    case GgmlType::MXFP4: {  // one E8M0 byte first in each block; 255 is its NaN
      uint8_t nan = 0;
      for (uint64_t b = 0; b < n; b += 17) nan |= static_cast<uint8_t>(p[b] == 0xFF);
      return nan == 0;
    }
    default: return std::nullopt;
  }
  const uint64_t bs = quant::ggml_type_info(t).type_size;
  uint16_t bad = 0;  // 1 once a scale's exponent bits are all ones (Inf or NaN)
  for (const int o : at) {
    if (o < 0) break;
    for (uint64_t b = static_cast<uint64_t>(o); b + 2 <= n; b += bs) {
      uint16_t h;
      std::memcpy(&h, p + b, 2);
      bad |= static_cast<uint16_t>((h & 0x7c00) == 0x7c00);
    }
  }
  return bad == 0;
}

// ---- GgufWriter ----

namespace {

// The header GgufWriter writes for (kv, tensors): the bytes up to the data section (padded to the
// alignment), each tensor's offset set in `tensors`, general.alignment added to `kv` when absent.
struct GgufLayout {
  std::vector<uint8_t> header;
  uint32_t alignment = kGgufDefaultAlignment;
  uint64_t data_size = 0;  // the data section, its end padded to the alignment
};

GgufLayout gguf_layout(GgufMetadata& kv, std::vector<GgufTensorInfo>& tensors) {
  GgufLayout out;
  std::set<std::string> keys;
  bool has_alignment = false;
  for (const auto& [k, v] : kv) {
    if (!keys.insert(k).second) throw Error::internal("gguf writer: duplicate key " + k);
    if (k == "general.alignment") {
      if (v.type != GgufValueType::U32 || v.integer == 0 || (v.integer & (v.integer - 1)))
        throw Error::internal("gguf writer: general.alignment must be a u32 power of two");
      out.alignment = static_cast<uint32_t>(v.integer);
      has_alignment = true;
    }
  }
  if (!has_alignment) kv.emplace_back("general.alignment", GgufValue::u32(out.alignment));

  Sink s;
  s.put<uint32_t>(kGgufMagic);
  s.put<uint32_t>(kGgufVersion);
  s.put<uint64_t>(tensors.size());
  s.put<uint64_t>(kv.size());
  for (const auto& [k, v] : kv) {
    s.string(k);
    s.put<uint32_t>(static_cast<uint32_t>(v.type));
    s.value(v);
  }
  std::set<std::string> names;
  uint64_t offset = 0;
  for (auto& t : tensors) {
    if (!names.insert(t.name).second) throw Error::internal("gguf writer: duplicate tensor " + t.name);
    check_tensor_shape(t, [&](const std::string& fld, const std::string& what) {
      throw Error::internal("gguf writer: tensor " + t.name + ": " + fld + ": " + what);
    });
    t.offset = offset;
    offset = align_up(offset + t.nbytes(), out.alignment);
    s.string(t.name);
    s.put<uint32_t>(static_cast<uint32_t>(t.ne.size()));
    for (int64_t d : t.ne) s.put<uint64_t>(static_cast<uint64_t>(d));
    s.put<uint32_t>(static_cast<uint32_t>(t.type));
    s.put<uint64_t>(t.offset);
  }
  out.data_size = offset;
  s.b.resize(align_up(s.b.size(), out.alignment), 0);
  out.header = std::move(s.b);
  return out;
}

}  // namespace

uint64_t gguf_file_size(GgufMetadata kv, std::vector<GgufTensorInfo> tensors) {
  const GgufLayout l = gguf_layout(kv, tensors);
  return l.header.size() + l.data_size;
}

GgufWriter::GgufWriter(Env& env, const fs::path& path, GgufMetadata kv, std::vector<GgufTensorInfo> tensors)
    : path_(path), tensors_(std::move(tensors)) {
  const GgufLayout l = gguf_layout(kv, tensors_);
  alignment_ = l.alignment;
  data_size_ = l.data_size;
  data_offset_ = l.header.size();
  file_ = env.create_file(path);
  file_->write_at(0, l.header.data(), l.header.size());
  while (current_ < tensors_.size() && tensors_[current_].nbytes() == 0) ++current_;
}

template <typename Write>
void GgufWriter::advance(size_t n, Write&& write) {
  uint64_t done = 0;
  while (n > 0) {
    if (current_ >= tensors_.size()) throw Error::internal("gguf writer: " + std::to_string(n) + " bytes past the last tensor");
    const auto& t = tensors_[current_];
    const uint64_t take = std::min<uint64_t>(n, t.nbytes() - written_);
    write(data_offset_ + t.offset + written_, done, take);
    written_ += take;
    done += take;
    n -= take;
    if (written_ == t.nbytes()) {
      // Zero padding up to the next tensor (or the end of the data section).
      const uint64_t end = t.offset + t.nbytes(), next = align_up(end, alignment_);
      if (next > end) {
        const std::vector<uint8_t> zeros(next - end, 0);
        file_->write_at(data_offset_ + end, zeros.data(), zeros.size());
      }
      written_ = 0;
      do ++current_;
      while (current_ < tensors_.size() && tensors_[current_].nbytes() == 0);
    }
  }
}

void GgufWriter::append(const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  advance(n, [&](uint64_t at, uint64_t done, uint64_t take) { file_->write_at(at, p + done, take); });
}

void GgufWriter::append_copy(const GgufFile& src, const uint8_t* data, size_t n) {
  const MappedFile& m = src.mapping();
  if (!inside(m, data, n)) return append(data, n);
  const auto from = static_cast<uint64_t>(data - m.data());
  advance(n, [&](uint64_t at, uint64_t done, uint64_t take) { file_->copy_from(at, m, from + done, take); });
}

uint64_t GgufWriter::finish() {
  if (current_ < tensors_.size())
    throw Error::internal("gguf writer: tensor " + tensors_[current_].name + " written " + std::to_string(written_) + " of " +
                          std::to_string(tensors_[current_].nbytes()) + " bytes");
  file_->close();
  return data_offset_ + data_size_;
}

}  // namespace moe::io
