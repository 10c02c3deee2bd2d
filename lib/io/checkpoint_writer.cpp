#include "io/checkpoint_writer.h"

#include <cctype>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "core/error.h"

namespace moe::io {

using core::Error;

uint64_t TensorSpec::nbytes() const {
  return static_cast<uint64_t>(core::shape_numel(shape)) * core::dtype_size(dtype);
}

CheckpointWriter::CheckpointWriter(Env& env, fs::path dir, std::vector<TensorSpec> plan,
                                   uint64_t max_shard_bytes)
    : env_(env), dir_(std::move(dir)), plan_(std::move(plan)) {
  if (max_shard_bytes == 0) throw Error::invalid("max shard size must be positive");
  // Assign tensors to shards in plan order.
  std::vector<std::vector<size_t>> groups;
  uint64_t current = 0;
  for (size_t i = 0; i < plan_.size(); ++i) {
    const uint64_t n = plan_[i].nbytes();
    if (groups.empty() || (current > 0 && current + n > max_shard_bytes)) {
      groups.emplace_back();
      current = 0;
    }
    groups.back().push_back(i);
    current += n;
    if (slots_.count(plan_[i].name)) throw Error::internal("output tensor " + plan_[i].name + " planned twice");
    slots_[plan_[i].name] = Slot{};
  }
  if (groups.empty()) groups.emplace_back();
  const size_t n_shards = groups.size();
  for (size_t s = 0; s < n_shards; ++s) {
    std::string fname = "model.safetensors";
    if (n_shards > 1) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", s + 1, n_shards);
      fname = buf;
    }
    std::vector<TensorInfo> infos;
    uint64_t off = 0;
    for (size_t i : groups[s]) {
      const auto& p = plan_[i];
      infos.push_back(TensorInfo{p.name, p.dtype, p.shape, off, off + p.nbytes()});
      off += p.nbytes();
    }
    const std::string header = serialize_safetensors_header(infos, {{"format", "pt"}});
    auto file = env_.create_file(dir_ / fname);
    file->write_at(0, header.data(), header.size());
    for (size_t k = 0; k < infos.size(); ++k)
      slots_[infos[k].name] = Slot{s, header.size() + infos[k].begin, infos[k].nbytes(), 0, groups[s][k]};
    // A shard whose last tensors are empty still has the right size; make sure a shard whose
    // data is all written later ends where the header says by writing nothing here.
    shards_.push_back(std::move(file));
    shard_names_.push_back(fname);
  }
}

CheckpointWriter::~CheckpointWriter() = default;

CheckpointWriter::Slot& CheckpointWriter::checked_slot(const std::string& name, uint64_t offset, const void* data, size_t n) {
  auto it = slots_.find(name);
  if (it == slots_.end()) throw Error::internal("writer: tensor " + name + " was not planned");
  Slot& slot = it->second;
  if (offset + n > slot.nbytes)
    throw Error::internal("writer: tensor " + name + ": write past its planned size");
  // Every writer of the tool ends here: a NaN or Inf (decoded from a damaged scale, factor or
  // dictionary level, or computed by a pass) never reaches a file.
  const size_t es = core::dtype_size(plan_[slot.plan].dtype);
  const int64_t bad = core::first_non_finite(plan_[slot.plan].dtype, data, n / es);
  if (bad >= 0)
    throw Error::invalid("output tensor " + name + ": non-finite value at index " +
                         std::to_string(offset / es + static_cast<uint64_t>(bad)) + " (of " +
                         core::shape_str(plan_[slot.plan].shape) + "), which the output would carry");
  return slot;
}

void CheckpointWriter::write(const std::string& name, uint64_t offset, const void* data, size_t n) {
  Slot& slot = checked_slot(name, offset, data, n);
  shards_[slot.shard]->write_at(slot.abs_offset + offset, data, n);
  slot.written += n;
}

void CheckpointWriter::copy(const std::string& name, uint64_t offset, const MappedFile& src, uint64_t src_offset, size_t n) {
  if (src_offset > src.size() || n > src.size() - src_offset)
    throw Error::internal("writer: tensor " + name + ": copy from outside " + src.path().string());
  Slot& slot = checked_slot(name, offset, src.data() + src_offset, n);
  shards_[slot.shard]->copy_from(slot.abs_offset + offset, src, src_offset, n);
  slot.written += n;
}

void CheckpointWriter::write(const std::string& name, const core::Tensor& t) {
  for (const auto& p : plan_) {
    if (p.name != name) continue;
    if (p.dtype != t.dtype() || p.shape != t.shape())
      throw Error::internal("writer: tensor " + name + " is " + core::dtype_name(t.dtype()) +
                            core::shape_str(t.shape()) + ", planned " + core::dtype_name(p.dtype) +
                            core::shape_str(p.shape));
    break;
  }
  write(name, 0, t.data(), t.nbytes());
}

void CheckpointWriter::finish() {
  if (finished_) return;
  for (const auto& p : plan_) {
    const Slot& s = slots_.at(p.name);
    if (s.written != s.nbytes)
      throw Error::internal("writer: tensor " + p.name + " written " + std::to_string(s.written) + " of " +
                            std::to_string(s.nbytes) + " bytes");
  }
  for (auto& f : shards_) f->close();
  if (shards_.size() > 1) {
    nlohmann::ordered_json index;
    uint64_t total = 0;
    for (const auto& p : plan_) total += p.nbytes();
    index["metadata"] = {{"total_size", total}};
    nlohmann::ordered_json wm = nlohmann::ordered_json::object();
    // weight_map sorted by name, as transformers writes it.
    std::map<std::string, std::string> sorted;
    for (const auto& [name, slot] : slots_) sorted[name] = shard_names_[slot.shard];
    for (const auto& [name, shard] : sorted) wm[name] = shard;
    index["weight_map"] = wm;
    env_.write_text(dir_ / "model.safetensors.index.json", index.dump(2) + "\n");
  }
  finished_ = true;
}

uint64_t parse_size(const std::string& text) {
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  if (i == 0) throw Error::invalid("size '" + text + "': expected a number with an optional unit (e.g. 5GB)");
  double v = 0;
  try {
    size_t used = 0;
    v = std::stod(text.substr(0, i), &used);
    if (used != i) throw std::invalid_argument(text);  // "1.5.3GB": the number must be all of it
  } catch (...) {
    throw Error::invalid("size '" + text + "': not a number");
  }
  std::string unit = text.substr(i);
  for (auto& ch : unit) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  double mult = 1;
  if (unit.empty() || unit == "B") mult = 1;
  else if (unit == "KB") mult = 1e3;
  else if (unit == "MB") mult = 1e6;
  else if (unit == "GB") mult = 1e9;
  else if (unit == "TB") mult = 1e12;
  else if (unit == "KIB") mult = 1024.0;
  else if (unit == "MIB") mult = 1024.0 * 1024;
  else if (unit == "GIB") mult = 1024.0 * 1024 * 1024;
  else if (unit == "TIB") mult = 1024.0 * 1024 * 1024 * 1024;
  else throw Error::invalid("size '" + text + "': unknown unit '" + text.substr(i) + "' (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)");
  const double bytes = v * mult;
  if (bytes < 1) throw Error::invalid("size '" + text + "' must be at least 1 byte");
  if (!(bytes <= 9.2e18)) throw Error::invalid("size '" + text + "' is beyond 9.2 EB (2^63 bytes)");
  return static_cast<uint64_t>(bytes);
}

}  // namespace moe::io
