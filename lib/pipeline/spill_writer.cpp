#include "pipeline/spill_writer.h"

#include <algorithm>
#include <cstdio>

#include "core/error.h"
#include "io/safetensors.h"

namespace moe::pipeline {

SpillWriter::SpillWriter(io::Env& env, io::fs::path dir, uint64_t max_shard_bytes)
    : env_(env), dir_(std::move(dir)), spill_(dir_ / ".spill"), max_shard_bytes_(max_shard_bytes) {
  env_.create_dirs(spill_);
}

SpillWriter::~SpillWriter() {
  if (finished_) return;
  try {
    env_.remove_all(spill_);
  } catch (...) {
  }
}

namespace {

// Writes outs into `sub`/model.safetensors.
void write_file(io::Env& env, const io::fs::path& sub, const std::vector<model::OutTensor>& outs,
                const std::function<void(const core::Tensor&)>& written) {
  std::vector<io::TensorSpec> plan;
  for (const auto& o : outs) plan.push_back({o.name, o.dtype, o.shape});
  env.create_dirs(sub);
  io::CheckpointWriter w(env, sub, plan, UINT64_MAX);
  for (const auto& o : outs) {
    core::Tensor t = core::with_context("tensor " + o.name, [&] { return o.make(); });
    if (t.dtype() != o.dtype) t = t.converted(o.dtype);
    w.write(o.name, t);  // the writer's errors name the tensor
    if (written) written(t);
  }
  w.finish();
}

}  // namespace

void SpillWriter::write_group(const std::vector<model::OutTensor>& outs,
                              const std::function<void(const core::Tensor&)>& written) {
  char name[32];
  std::snprintf(name, sizeof name, "group-%06zu", files_.size());
  const io::fs::path sub = spill_ / name;
  write_file(env_, sub, outs, written);
  files_.push_back(sub / "model.safetensors");
  tensors_ += outs.size();
}

void SpillWriter::rewrite_group(size_t i, const std::vector<model::OutTensor>& outs) {
  const io::fs::path old = files_.at(i).parent_path();
  const io::fs::path sub = old.string() + "-r";
  size_t before = 0;
  {
    const auto f = io::SafetensorsFile::open(env_, files_[i]);
    before = f->header().tensors.size();
  }
  write_file(env_, sub, outs, nullptr);
  env_.remove_all(old);
  files_[i] = sub / "model.safetensors";
  tensors_ = tensors_ - before + outs.size();
}

uint64_t SpillWriter::finish() {
  std::vector<std::shared_ptr<io::SafetensorsFile>> files;
  std::vector<io::TensorSpec> plan;
  for (const auto& f : files_) {
    files.push_back(io::SafetensorsFile::open(env_, f));
    for (const auto& info : files.back()->header().tensors) plan.push_back({info.name, info.dtype, info.shape});
  }
  uint64_t total = 0;
  {
    io::CheckpointWriter w(env_, dir_, plan, max_shard_bytes_);
    constexpr uint64_t kChunk = uint64_t{64} << 20;
    for (const auto& f : files)
      for (const auto& info : f->header().tensors) {
        const core::Tensor t = f->tensor(info);
        for (uint64_t off = 0; off < info.nbytes(); off += kChunk) {
          const uint64_t n = std::min(kChunk, info.nbytes() - off);
          w.write(info.name, off, t.data() + off, n);
        }
        f->release(info);
        total += info.nbytes();
      }
    w.finish();
    shards_ = w.shard_count();
  }
  files.clear();
  env_.remove_all(spill_);
  finished_ = true;
  return total;
}

}  // namespace moe::pipeline
