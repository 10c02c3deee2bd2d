#include "pipeline/hf_sink.h"

#include <algorithm>
#include <vector>

#include "core/error.h"
#include "core/progress.h"

namespace moe::pipeline {

using core::Tensor;

namespace {

constexpr uint64_t kChunkElems = uint64_t{8} << 20;  // convert/write at most 8M elements at a time

void write_tensor(io::CheckpointWriter& w, const model::OutTensor& o, const Tensor& t, const io::Checkpoint& source) {
  if (t.encoding()) throw core::Error::internal("write_tensor: encoded tensor " + o.name + " reached the writer");
  if (t.dtype() != o.dtype && t.owns_data()) {
    // A computed tensor (a dequantized weight, a converted part): written as it is made.
    const Tensor d = t.converted(o.dtype);
    w.write(o.name, 0, d.data(), d.nbytes());
    return;
  }
  const size_t in_size = core::dtype_size(t.dtype()), out_size = core::dtype_size(o.dtype);
  const uint64_t n = static_cast<uint64_t>(t.numel());
  // Views into the source file release their pages as we go so RSS stays bounded.
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

}  // namespace

HfSinkResult write_hf_checkpoint(io::Env& env, const model::Model& model, const io::Checkpoint& source,
                                 const io::fs::path& out_dir, const HfSinkOptions& opts) {
  const model::OutputOptions oo{opts.dtype, opts.materialize};
  nlohmann::json manifest = nlohmann::json::object();
  const std::vector<model::OutTensor> outs = model.outputs(oo, &manifest);
  std::vector<io::TensorSpec> plan;
  HfSinkResult result;
  for (const auto& o : outs) {
    plan.push_back({o.name, o.dtype, o.shape});
    result.tensor_bytes += plan.back().nbytes();
  }
  result.tensors = plan.size();

  // Side files first (small), then config.json rewritten for the model's current state.
  for (const auto& f : source.side_files()) {
    if (f.filename() == "config.json" || f.filename() == "moe_tool_report.json") continue;
    env.copy_file(f, out_dir / f.filename());
  }
  env.write_text(out_dir / "config.json", model.rewritten_config(oo, &manifest).dump(2) + "\n");

  io::CheckpointWriter writer(env, out_dir, std::move(plan), opts.max_shard_bytes);
  core::Progress progress("write", result.tensor_bytes, "B", opts.quiet);
  for (const auto& o : outs) {
    const Tensor t = core::with_context("tensor " + o.name, [&] { return o.make(); });
    write_tensor(writer, o, t, source);  // the writer's errors name the tensor
    progress.add(io::TensorSpec{o.name, o.dtype, o.shape}.nbytes());
  }
  writer.finish();
  progress.finish();
  result.shards = writer.shard_count();
  return result;
}

}  // namespace moe::pipeline
