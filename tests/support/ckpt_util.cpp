#include "support/ckpt_util.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "runtime/forward.h"

namespace moe::test {

TensorMap read_tensors(const std::filesystem::path& dir) {
  // The shards named by the index, or model.safetensors; config.json is not needed.
  std::set<std::string> shards;
  if (std::filesystem::exists(dir / "model.safetensors.index.json")) {
    const auto ix = nlohmann::json::parse(read_file(dir / "model.safetensors.index.json"));
    for (const auto& [name, shard] : ix.at("weight_map").items()) shards.insert(shard.get<std::string>());
  } else {
    shards.insert("model.safetensors");
  }
  TensorMap m;
  for (const auto& s : shards) {
    auto f = io::SafetensorsFile::open(io::Env::posix(), dir / s);
    for (const auto& info : f->header().tensors) {
      core::Tensor t = f->tensor(info);
      if (m.count(info.name)) throw std::runtime_error("tensor " + info.name + " in two shards");
      m[info.name] = TensorBytes{t.dtype(), t.shape(), std::string(reinterpret_cast<const char*>(t.data()), t.nbytes())};
    }
  }
  return m;
}

TensorMap synth_tensors(const SynthCheckpoint& ck) {
  TensorMap m;
  for (const auto& t : ck.tensors)
    m[t.name] = TensorBytes{t.dtype, t.shape, std::string(t.data.begin(), t.data.end())};
  return m;
}

std::string first_difference(const TensorMap& a, const TensorMap& b) {
  for (const auto& [name, x] : a) {
    auto it = b.find(name);
    if (it == b.end()) return "tensor " + name + " only in the first";
    const auto& y = it->second;
    if (x.dtype != y.dtype)
      return "tensor " + name + ": dtype " + core::dtype_name(x.dtype) + " vs " + core::dtype_name(y.dtype);
    if (x.shape != y.shape) return "tensor " + name + ": shape " + core::shape_str(x.shape) + " vs " + core::shape_str(y.shape);
    if (x.bytes != y.bytes) {
      size_t i = 0;
      while (i < x.bytes.size() && i < y.bytes.size() && x.bytes[i] == y.bytes[i]) ++i;
      return "tensor " + name + ": bytes differ at offset " + std::to_string(i);
    }
  }
  for (const auto& [name, y] : b)
    if (!a.count(name)) return "tensor " + name + " only in the second";
  return "";
}

}  // namespace moe::test

namespace moe::test {

void patch_tensor_bytes(const std::filesystem::path& file, const std::string& name, uint64_t byte_offset,
                        const std::string& bytes) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  if (!f) throw std::runtime_error(file.string() + ": cannot open");
  uint64_t n = 0;
  f.read(reinterpret_cast<char*>(&n), 8);
  std::string header(n, '\0');
  f.read(header.data(), static_cast<std::streamsize>(n));
  const auto h = nlohmann::json::parse(header);
  if (!h.contains(name)) throw std::runtime_error(file.string() + ": no tensor " + name);
  const uint64_t begin = h[name]["data_offsets"][0].get<uint64_t>(), end = h[name]["data_offsets"][1].get<uint64_t>();
  if (begin + byte_offset + bytes.size() > end) throw std::runtime_error(name + ": patch past the tensor's end");
  f.seekp(static_cast<std::streamoff>(8 + n + begin + byte_offset));
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!f) throw std::runtime_error(file.string() + ": write failed");
}

void remove_tensor(const std::filesystem::path& file, const std::string& name) {
  std::string bytes;
  {
    std::ifstream f(file, std::ios::binary);
    if (!f) throw std::runtime_error(file.string() + ": cannot open");
    bytes.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  auto h = nlohmann::json::parse(bytes.substr(8, n));
  if (!h.contains(name)) throw std::runtime_error(file.string() + ": no tensor " + name);
  h.erase(name);
  // The remaining tensors' data in their order in the file, at new offsets.
  std::vector<std::pair<uint64_t, std::string>> order;
  for (const auto& [k, v] : h.items())
    if (k != "__metadata__") order.push_back({v["data_offsets"][0].get<uint64_t>(), k});
  std::sort(order.begin(), order.end());
  std::string data;
  for (const auto& [begin, k] : order) {
    const uint64_t end = h[k]["data_offsets"][1].get<uint64_t>();
    h[k]["data_offsets"] = {data.size(), data.size() + (end - begin)};
    data += bytes.substr(8 + n + begin, end - begin);
  }
  std::string header = h.dump();
  header.append((8 - header.size() % 8) % 8, ' ');
  const uint64_t hn = header.size();
  std::ofstream f(file, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(&hn), 8);
  f << header << data;
  if (!f) throw std::runtime_error(file.string() + ": write failed");
}

void copy_folder(const std::filesystem::path& from, const std::filesystem::path& to) {
  std::filesystem::create_directories(to);
  for (const auto& e : std::filesystem::directory_iterator(from))
    if (e.is_regular_file()) std::filesystem::copy_file(e.path(), to / e.path().filename());
}

void copy_with_config(const std::filesystem::path& from, const std::filesystem::path& to, const nlohmann::json& patch) {
  copy_folder(from, to);
  nlohmann::json c = nlohmann::json::parse(std::ifstream(to / "config.json"));
  c.merge_patch(patch);
  std::ofstream(to / "config.json") << c.dump(2);
}

nlohmann::json phimoe_llamacpp_patch() {
  return {{"sliding_window", nullptr},
          {"original_max_position_embeddings", 64},
          {"rope_scaling",
           {{"type", "longrope"},
            {"short_factor", {1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 5.0}},
            {"long_factor", {1.0, 1.3, 1.7, 2.5, 4.0, 6.0, 8.0, 9.0}},
            {"short_mscale", 1.15},
            {"long_mscale", 1.15}}}};
}

std::vector<float> centred(std::vector<float> v, size_t rows, size_t cols, bool rows_mean) {
  for (size_t a = 0; a < (rows_mean ? rows : cols); ++a) {
    const size_t n = rows_mean ? cols : rows;
    auto at = [&](size_t b) -> float& { return rows_mean ? v[a * cols + b] : v[b * cols + a]; };
    double s = 0;
    for (size_t b = 0; b < n; ++b) s += at(b);
    for (size_t b = 0; b < n; ++b) at(b) = static_cast<float>(at(b) - s / double(n));
  }
  return v;
}

runtime::MatrixRM fixed_logits(const std::filesystem::path& dir) {
  auto m = model::Model::load(io::Checkpoint::open(io::Env::posix(), dir));
  runtime::Forward f(m);
  std::vector<int32_t> ids;
  for (int i = 0; i < 64; ++i) ids.push_back(static_cast<int32_t>((i * 37 + 11) % m.dims().vocab));
  return f.run(ids, 32);
}

}  // namespace moe::test
