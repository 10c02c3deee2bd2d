#include "io/checkpoint.h"

#include <algorithm>
#include <cstdio>
#include <set>

#include "core/error.h"
#include "core/tensor_arena.h"
#include "io/gguf_model.h"
#include "io/output_dir.h"

namespace moe::io {

using core::Error;
using nlohmann::json;

namespace {

constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSingleName = "model.safetensors";

uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace

std::string json_error_text(const std::exception& e) {
  // The library's text without its internal id ("[json.exception.parse_error.101] "): the
  // position and the cause are what a user can act on.
  std::string m = e.what();
  const auto close = m.find("] ");
  if (m.rfind("[json.exception", 0) == 0 && close != std::string::npos) m = m.substr(close + 2);
  return m;
}

json parse_json_file_text(const std::string& text, const std::string& what) {
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw Error::corruption(what + ": not valid JSON: " + json_error_text(e));
  }
}

Checkpoint Checkpoint::open(Env& env, const fs::path& dir) {
  Checkpoint c;
  c.dir_ = dir;
  if (is_gguf_path(dir)) {
    c.gguf_ = GgufModel::open(env, dir);
    c.config_ = c.gguf_->config();
    c.config_text_ = c.gguf_->config_text();
    for (const auto& t : c.gguf_->infos()) {
      c.index_[t.name] = {kGgufShard, &t};
      c.names_.push_back(t.name);
    }
    return c;
  }
  std::error_code ec;
  if (!fs::exists(dir, ec))
    throw Error::not_found(dir.string() + (dir.extension() == ".gguf" ? ": no such GGUF file" : ": no such checkpoint folder"));
  if (!fs::is_directory(dir, ec))
    throw Error::invalid(dir.string() + ": not a folder (expected a checkpoint folder) nor a GGUF file");

  const fs::path config_path = dir / "config.json";
  c.config_text_ = env.read_text(config_path);
  c.config_ = parse_json_file_text(c.config_text_, config_path.string());
  if (!c.config_.is_object()) throw Error::corruption(config_path.string() + ": top level is not a JSON object");

  const fs::path index_path = dir / kIndexName;
  std::vector<std::string> shard_names;
  json weight_map;
  if (env.exists(index_path)) {
    json index = parse_json_file_text(env.read_text(index_path), index_path.string());
    auto wm = index.find("weight_map");
    if (!index.is_object() || wm == index.end() || !wm->is_object())
      throw Error::corruption(index_path.string() + ": weight_map: missing or not an object");
    weight_map = *wm;
    std::set<std::string> seen;
    for (const auto& [name, shard] : weight_map.items()) {
      if (!shard.is_string())
        throw Error::corruption(index_path.string() + ": weight_map." + name + ": not a string");
      const auto& s = shard.get_ref<const std::string&>();
      if (s.empty() || s.find('/') != std::string::npos || s == "." || s == "..")
        throw Error::corruption(index_path.string() + ": weight_map." + name + ": bad shard file name '" + s + "'");
      if (seen.insert(s).second) shard_names.push_back(s);
    }
    std::sort(shard_names.begin(), shard_names.end());
    if (shard_names.empty()) throw Error::corruption(index_path.string() + ": weight_map is empty");
  } else if (env.exists(dir / kSingleName)) {
    shard_names.push_back(kSingleName);
  } else {
    throw Error::not_found(dir.string() + ": no model.safetensors or " + kIndexName);
  }

  for (const auto& s : shard_names) {
    if (!weight_map.is_null() && !env.exists(dir / s)) {
      // A partial download: say which index entry names the absent shard.
      std::string first;
      int64_t n = 0;
      for (const auto& [name, shard] : weight_map.items())
        if (shard.get_ref<const std::string&>() == s && n++ == 0) first = name;
      throw Error::not_found((dir / s).string() + ": no such file, but " + kIndexName + " maps " +
                             std::to_string(n) + " tensor" + (n == 1 ? "" : "s") + " to it (e.g. " + first +
                             "); incomplete download?");
    }
    auto shard = SafetensorsFile::open(env, dir / s);
    const size_t si = c.shards_.size();
    c.shards_.push_back(shard);
    for (const auto& t : shard->header().tensors) {
      if (c.index_.count(t.name))
        throw Error::corruption((dir / s).string() + ": tensor " + t.name + " also stored in " +
                                c.shards_[c.index_[t.name].first]->path().string());
      if (!weight_map.is_null()) {
        auto it = weight_map.find(t.name);
        if (it == weight_map.end())
          throw Error::corruption((dir / s).string() + ": tensor " + t.name + " is missing from " + kIndexName);
        if (it->get<std::string>() != s)
          throw Error::corruption(index_path.string() + ": weight_map." + t.name + ": says " +
                                  it->get<std::string>() + " but the tensor is in " + s);
      }
      c.index_[t.name] = {si, &t};
      c.names_.push_back(t.name);
    }
  }
  if (!weight_map.is_null()) {
    for (const auto& [name, shard] : weight_map.items()) {
      if (!c.index_.count(name))
        throw Error::corruption(index_path.string() + ": weight_map." + name + ": tensor not found in " +
                                shard.get<std::string>());
    }
  }

  std::set<std::string> weights(shard_names.begin(), shard_names.end());
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (!entry.is_regular_file()) continue;
    const std::string fname = entry.path().filename().string();
    if (weights.count(fname) || fname == kIndexName || fname == kListingName) continue;  // the listing: io/output_dir.h
    if (entry.path().extension() == ".safetensors") continue;  // stray shard not in the index
    c.side_files_.push_back(entry.path());
  }
  std::sort(c.side_files_.begin(), c.side_files_.end());
  return c;
}

const TensorInfo& Checkpoint::info(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw Error::not_found(dir_.string() + ": tensor " + std::string(name) + " not found");
  return *it->second.second;
}

std::vector<std::pair<std::string, std::string>> Checkpoint::generated_side_files() const {
  if (!gguf_) return {};
  const GgufTokenizerText t = gguf_tokenizer_json(gguf_->file());
  return {{"tokenizer.json", t.tokenizer_json}, {"tokenizer_config.json", t.config_json}};
}

std::string Checkpoint::config_path() const { return gguf_ ? dir_.string() : (dir_ / "config.json").string(); }

core::Tensor Checkpoint::tensor(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw Error::not_found(dir_.string() + ": tensor " + std::string(name) + " not found");
  if (gguf_) return gguf_->tensor(name);
  return shards_[it->second.first]->tensor(*it->second.second);
}

void Checkpoint::release(std::string_view name) const {
  auto it = index_.find(name);
  if (it != index_.end() && !gguf_) shards_[it->second.first]->release(*it->second.second);
}

void Checkpoint::release_range(const uint8_t* p, uint64_t n) const {
  if (gguf_ && gguf_->file().release_range(p, n)) return;
  for (const auto& s : shards_)
    if (s->release_range(p, n)) return;
  core::release_arena_range(p, n);  // a tensor a pass made (core/tensor_arena.h)
}

void Checkpoint::populate_range(const uint8_t* p, uint64_t n) const {
  if (const MappedFile* f = mapping_of(p, n)) f->populate(static_cast<uint64_t>(p - f->data()), n);
}

const MappedFile* Checkpoint::mapping_of(const uint8_t* p, uint64_t n) const {
  auto holds = [&](const MappedFile& m) {
    const uint8_t* base = m.data();
    return base != nullptr && p >= base && static_cast<uint64_t>(p - base) <= m.size() && n <= m.size() - static_cast<uint64_t>(p - base);
  };
  if (gguf_ && holds(gguf_->file().mapping())) return &gguf_->file().mapping();
  for (const auto& s : shards_)
    if (holds(s->mapping())) return &s->mapping();
  return nullptr;
}

const fs::path& Checkpoint::shard_path(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw Error::not_found(dir_.string() + ": tensor " + std::string(name) + " not found");
  if (gguf_) return dir_;
  return shards_[it->second.first]->path();
}

uint64_t Checkpoint::total_tensor_bytes() const {
  if (gguf_) return gguf_->total_tensor_bytes();
  uint64_t n = 0;
  for (const auto& s : shards_) n += s->header().data_size;
  return n;
}

std::string Checkpoint::fingerprint() const {
  // What identifies the model, not how it is stored: the parsed config (keys sorted, whitespace and
  // key order irrelevant; bookkeeping keys such as _name_or_path and transformers_version left out)
  // and every tensor's name, dtype and shape, sorted by name (header order and sharding
  // irrelevant). A bit-identical convert keeps it; a changed value, tensor or shape changes it.
  uint64_t h = 1469598103934665603ull;
  nlohmann::json cfg = config_;
  if (cfg.is_object()) {
    for (auto it = cfg.begin(); it != cfg.end();) {
      const std::string& k = it.key();
      if (!k.empty() && k[0] == '_') it = cfg.erase(it);
      else if (k == "transformers_version" || k == "use_cache") it = cfg.erase(it);
      else ++it;
    }
  }
  const std::string canon = cfg.dump();  // nlohmann::json keeps object keys sorted
  h = fnv1a(h, canon.data(), canon.size());
  for (const auto& [t, data] : sorted_tensors()) {
    h = fnv1a(h, t->name.data(), t->name.size() + 1);  // with the NUL: names cannot run into dtypes
    h = fnv1a(h, core::dtype_name(t->dtype), std::char_traits<char>::length(core::dtype_name(t->dtype)));
    const uint64_t rank = t->shape.size();
    h = fnv1a(h, &rank, sizeof rank);
    h = fnv1a(h, t->shape.data(), t->shape.size() * sizeof(int64_t));
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

std::vector<std::pair<const TensorInfo*, const uint8_t*>> Checkpoint::sorted_tensors() const {
  std::vector<std::pair<const TensorInfo*, const uint8_t*>> all;
  if (gguf_) {
    for (const auto& t : gguf_->infos()) {
      const auto& src = *gguf_->source(t.name).tensor;
      all.push_back({&t, gguf_->file().tensor_data(src) + (t.begin - src.offset)});
    }
  }
  for (const auto& s : shards_)
    for (const auto& t : s->header().tensors) all.push_back({&t, s->tensor(t).data()});
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.first->name < b.first->name; });
  return all;
}

std::vector<Checkpoint::TensorDigest> Checkpoint::content_digests() const {
  const auto all = sorted_tensors();
  std::vector<TensorDigest> out;
  out.reserve(all.size());
  for (const auto& entry : all) {
    const auto& t = entry.first;
    const auto& p = entry.second;  // not a structured binding: clang 14 cannot capture one in a lambda
    const uint64_t n = t->nbytes();
    uint64_t h = 2166136261u;  // 32-bit FNV-1a
    auto add = [&](uint64_t begin, uint64_t len) {
      for (uint64_t i = begin; i < begin + len; ++i) h = ((h ^ p[i]) * 16777619u) & 0xffffffffu;
    };
    if (n <= kDigestWholeBytes) {
      add(0, n);
    } else {
      for (uint64_t b = 0; b < kDigestBlocks; ++b) add((n - kDigestBlockBytes) * b / (kDigestBlocks - 1), kDigestBlockBytes);
    }
    out.push_back({t->name, static_cast<uint32_t>(h)});
  }
  return out;
}

}  // namespace moe::io
