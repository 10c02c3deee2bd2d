#include "pipeline/hf_sink.h"

#include <algorithm>
#include <vector>

#include "core/error.h"
#include "core/progress.h"
#include "pipeline/report.h"
#include "tokenizer/tokenizer.h"

namespace moe::pipeline {

using core::Tensor;

namespace {

constexpr uint64_t kChunkElems = uint64_t{8} << 20;  // convert/write at most 8M elements at a time

// Writes t as o (its planned name and dtype). A computed tensor in another dtype is converted
// whole; a view of the source is converted and written in chunks, each chunk's pages handed back.
void write_tensor(io::CheckpointWriter& w, const model::OutTensor& o, const Tensor& t, const io::Checkpoint& source) {
  if (t.encoding()) throw core::Error::internal("write_tensor: encoded tensor " + o.name + " reached the writer");
  if (t.dtype() != o.dtype && t.owns_data()) {
    const Tensor d = t.converted(o.dtype);
    w.write(o.name, 0, d.data(), d.nbytes());
    return;
  }
  const size_t in_size = core::dtype_size(t.dtype()), out_size = core::dtype_size(o.dtype);
  const uint64_t n = static_cast<uint64_t>(t.numel());
  const bool is_view = !t.owns_data();
  const uint8_t* base_ptr = t.data();
  std::vector<uint8_t> buf;
  for (uint64_t i = 0; i < n; i += kChunkElems) {
    const uint64_t m = std::min(kChunkElems, n - i);
    const uint8_t* src = base_ptr + i * in_size;
    if (t.dtype() == o.dtype) {
      w.write(o.name, i * out_size, src, m * out_size);
    } else {
      buf.resize(m * out_size);
      core::convert(t.dtype(), src, o.dtype, buf.data(), m);
      w.write(o.name, i * out_size, buf.data(), buf.size());
    }
    if (is_view) source.release_range(src, m * in_size);
  }
}

// Hands back the source pages of every stored tensor t was made from.
void release_stored(const io::Checkpoint& source, const Tensor& t) {
  for (const Tensor* p : t.stored_tensors()) source.release_range(p->data(), p->nbytes());
}

}  // namespace

HfSink::HfSink(io::Env& env, const io::fs::path& final_path, const std::vector<io::fs::path>& inputs, bool force,
               const std::string& force_name, uint64_t max_shard_bytes)
    : env_(env), max_shard_bytes_(max_shard_bytes) {
  out_.emplace(env, final_path, inputs, force, force_name);
  dir_ = out_->path();
}

HfSink::HfSink(io::Env& env, io::fs::path dir, uint64_t max_shard_bytes)
    : env_(env), dir_(std::move(dir)), max_shard_bytes_(max_shard_bytes) {}

void HfSink::begin(const io::Checkpoint& source, const std::optional<std::vector<io::TensorSpec>>& plan) {
  if (source_) throw core::Error::internal("HfSink::begin called twice");
  source_ = &source;
  if (!plan) {
    spill_.emplace(env_, dir_, max_shard_bytes_);
    return;
  }
  for (const auto& s : *plan) planned_bytes_ += s.nbytes();
  planned_tensors_ = plan->size();
  writer_.emplace(env_, dir_, *plan, max_shard_bytes_);
}

void HfSink::write(const std::vector<model::OutTensor>& group) {
  if (!source_) throw core::Error::internal("HfSink::write before begin");
  const io::Checkpoint& source = *source_;
  if (spill_) {
    spill_->write_group(group, [&](const Tensor& t) { release_stored(source, t); });
    return;
  }
  for (const auto& o : group) {
    const Tensor t = core::with_context("tensor " + o.name, [&] { return o.make(); });
    write_tensor(*writer_, o, t, source);  // the writer's errors name the tensor
    release_stored(source, t);
  }
}

SinkResult HfSink::finish(const nlohmann::json& config) {
  if (!source_) throw core::Error::internal("HfSink::finish before begin");
  SinkResult r;
  if (spill_) {
    r.tensor_bytes = spill_->finish();
    r.tensors = spill_->tensor_count();
    r.shards = spill_->shard_count();
  } else {
    writer_->finish();
    r.tensor_bytes = planned_bytes_;
    r.tensors = planned_tensors_;
    r.shards = writer_->shard_count();
  }
  // Side files (small), then config.json for the model's current state.
  write_side_files(env_, *source_, dir_);
  env_.write_text(dir_ / "config.json", config.dump(2) + "\n");
  return r;
}

io::fs::path HfSink::write_report(const nlohmann::json& report) {
  pipeline::write_report(env_, dir_, report);
  return (out_ ? out_->final_path() : dir_) / "moe_tool_report.json";
}

void HfSink::commit() {
  if (out_) out_->commit();
}

void write_side_files(io::Env& env, const io::Checkpoint& source, const io::fs::path& dir) {
  for (const auto& f : source.side_files()) {
    if (f.filename() == "config.json" || f.filename() == "moe_tool_report.json") continue;
    env.copy_file(f, dir / f.filename());
  }
  // A GGUF input holds its tokenizer as metadata: written out as tokenizer.json and its config,
  // once they load (a tokenizer the folder's readers would refuse is refused here).
  const auto generated = source.generated_side_files();
  if (generated.size() == 2) {
    const std::string src = source.dir().string() + ": tokenizer.ggml.*";
    tokenizer::Tokenizer::from_json_text(generated[0].second, generated[1].second, src, src);
  }
  for (const auto& [name, text] : generated) env.write_text(dir / name, text);
}

SinkResult write_hf_checkpoint(Sink& sink, const model::Model& model, const io::Checkpoint& source,
                               const HfSinkOptions& opts) {
  const model::OutputOptions oo{opts.dtype, opts.materialize};
  nlohmann::json manifest = nlohmann::json::object();
  const std::vector<model::OutTensor> outs = model.outputs(oo, &manifest);
  std::vector<io::TensorSpec> plan;
  uint64_t bytes = 0;
  for (const auto& o : outs) {
    plan.push_back({o.name, o.dtype, o.shape});
    bytes += plan.back().nbytes();
  }
  const nlohmann::json config = model.rewritten_config(oo, &manifest);
  sink.begin(source, plan);
  core::Progress progress("write", bytes, "B", opts.quiet);
  for (const auto& o : outs) {
    sink.write({o});
    progress.add(io::TensorSpec{o.name, o.dtype, o.shape}.nbytes());
  }
  SinkResult r = sink.finish(config);
  progress.finish();
  return r;
}

SinkResult write_hf_checkpoint(io::Env& env, const model::Model& model, const io::Checkpoint& source,
                               const io::fs::path& out_dir, const HfSinkOptions& opts) {
  HfSink sink(env, out_dir, opts.max_shard_bytes);
  return write_hf_checkpoint(sink, model, source, opts);
}

}  // namespace moe::pipeline
