#include "io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "io/checkpoint.h"

namespace moe::io {

using core::Error;
using nlohmann::json;

namespace {

uint64_t read_u64le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::string squote(std::string_view s) { return "'" + std::string(s) + "'"; }

TensorInfo parse_entry(const std::string& name, const json& v) {
  TensorInfo info;
  info.name = name;
  if (!v.is_object()) throw Error::corruption("entry is not an object");
  auto dt = v.find("dtype");
  if (dt == v.end()) throw Error::corruption("missing \"dtype\"");
  if (!dt->is_string()) throw Error::corruption("\"dtype\" is not a string");
  auto parsed = core::parse_dtype(dt->get<std::string>());
  if (!parsed) throw Error::corruption("unknown dtype " + squote(dt->get<std::string>()));
  info.dtype = *parsed;
  auto sh = v.find("shape");
  if (sh == v.end()) throw Error::corruption("missing \"shape\"");
  if (!sh->is_array()) throw Error::corruption("\"shape\" is not an array");
  for (const auto& d : *sh) {
    if (!d.is_number_integer() || d.get<int64_t>() < 0)
      throw Error::corruption("\"shape\" has an entry that is not a non-negative integer: " + d.dump());
    info.shape.push_back(d.get<int64_t>());
  }
  auto off = v.find("data_offsets");
  if (off == v.end()) throw Error::corruption("missing \"data_offsets\"");
  if (!off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
      !(*off)[1].is_number_unsigned())
    throw Error::corruption("\"data_offsets\" is not a pair of non-negative integers: " + off->dump());
  info.begin = (*off)[0].get<uint64_t>();
  info.end = (*off)[1].get<uint64_t>();
  if (info.end < info.begin)
    throw Error::corruption("data_offsets end " + std::to_string(info.end) + " before begin " +
                            std::to_string(info.begin));
  const int64_t numel = core::shape_numel(info.shape);
  if (static_cast<uint64_t>(numel) > UINT64_MAX / core::dtype_size(info.dtype))
    throw Error::corruption("shape " + core::shape_str(info.shape) + " of " + core::dtype_name(info.dtype) + " exceeds 2^64 bytes");
  const uint64_t expect = static_cast<uint64_t>(numel) * core::dtype_size(info.dtype);
  if (info.end - info.begin != expect)
    throw Error::corruption("data_offsets span " + std::to_string(info.end - info.begin) +
                            " bytes but shape " + core::shape_str(info.shape) + " of " +
                            core::dtype_name(info.dtype) + " needs " + std::to_string(expect));
  return info;
}

}  // namespace

SafetensorsHeader parse_safetensors_header(const uint8_t* data, uint64_t size, uint64_t file_size) {
  if (file_size < 8 || size < 8)
    throw Error::corruption("file is " + std::to_string(file_size) +
                            " bytes, shorter than the 8-byte header length");
  const uint64_t n = read_u64le(data);
  if (n > kMaxSafetensorsHeader)
    throw Error::corruption("header length " + std::to_string(n) + " exceeds the 100 MB limit");
  if (n > file_size - 8)
    throw Error::corruption("header length " + std::to_string(n) + " runs past the end of the file (" +
                            std::to_string(file_size) + " bytes)");
  if (8 + n > size) throw Error::corruption("header truncated");
  if (n == 0 || data[8] != '{') throw Error::corruption("header does not start with '{'");
  if (std::memchr(data + 8, '\0', n) != nullptr) throw Error::corruption("header is not valid JSON: it contains a NUL byte");

  // Parse with a callback that catches duplicate keys at the top level (nlohmann would keep the
  // last silently).
  std::set<std::string> seen;
  std::string duplicate;
  json::parser_callback_t cb = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && depth == 1 && duplicate.empty()) {
      const auto& k = parsed.get_ref<const std::string&>();
      if (!seen.insert(k).second) duplicate = k;
    }
    return true;
  };
  json header;
  try {
    header = json::parse(reinterpret_cast<const char*>(data + 8), reinterpret_cast<const char*>(data + 8 + n),
                         cb);
  } catch (const json::exception& e) {
    throw Error::corruption(std::string("header is not valid JSON: ") + json_error_text(e));
  }
  if (!duplicate.empty()) throw Error::corruption("duplicate tensor name " + squote(duplicate));
  if (!header.is_object()) throw Error::corruption("header is not a JSON object");

  SafetensorsHeader out;
  out.data_start = 8 + n;
  out.data_size = file_size - out.data_start;
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) throw Error::corruption("__metadata__ is not an object");
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string())
          throw Error::corruption("__metadata__." + mk + " is not a string");
        out.metadata[mk] = mv.get<std::string>();
      }
      continue;
    }
    out.tensors.push_back(core::with_context("tensor " + key, [&k = key, &v = value] { return parse_entry(k, v); }));
  }
  std::sort(out.tensors.begin(), out.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expect = 0;
  for (const auto& t : out.tensors) {
    if (t.begin != expect) {
      const std::string what = t.begin < expect ? "overlaps the previous tensor" : "leaves a hole";
      throw Error::corruption("tensor " + t.name + ": data_offsets begin " + std::to_string(t.begin) + " " +
                              what + " (expected " + std::to_string(expect) + ")");
    }
    if (t.end > out.data_size)
      throw Error::corruption("tensor " + t.name + ": data_offsets end " + std::to_string(t.end) +
                              " past the data section (" + std::to_string(out.data_size) + ")");
    expect = t.end;
  }
  if (expect != out.data_size)
    throw Error::corruption("data section is " + std::to_string(out.data_size) +
                            " bytes but the tensors cover " + std::to_string(expect));
  return out;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(Env& env, const fs::path& path) {
  auto f = std::make_shared<SafetensorsFile>();
  f->map_ = env.map_file(path);
  f->header_ = core::with_context(path.string(), [&] {
    return parse_safetensors_header(f->map_->data(), f->map_->size(), f->map_->size());
  });
  for (size_t i = 0; i < f->header_.tensors.size(); ++i) f->by_name_[f->header_.tensors[i].name] = i;
  return f;
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &header_.tensors[it->second];
}

core::Tensor SafetensorsFile::tensor(const TensorInfo& info) const {
  return core::Tensor(info.dtype, info.shape, map_->data() + header_.data_start + info.begin,
                      std::shared_ptr<const void>(map_, map_->data()));
}

void SafetensorsFile::release(const TensorInfo& info) const {
  map_->release(header_.data_start + info.begin, info.nbytes());
}

bool SafetensorsFile::release_range(const uint8_t* p, uint64_t n) const {
  const uint8_t* base = map_->data();
  if (base == nullptr || p < base || p >= base + map_->size()) return false;
  map_->release(static_cast<uint64_t>(p - base), n);
  return true;
}

std::string serialize_safetensors_header(const std::vector<TensorInfo>& tensors,
                                         const std::map<std::string, std::string>& metadata) {
  // Tensors are written in data order; nlohmann's ordered_json keeps insertion order.
  nlohmann::ordered_json h;
  if (!metadata.empty()) h["__metadata__"] = metadata;
  for (const auto& t : tensors) {
    h[t.name] = {{"dtype", core::dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
  }
  std::string body = h.dump();
  body.append((8 - body.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  uint64_t n = body.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + body;
}

}  // namespace moe::io
