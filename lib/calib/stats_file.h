// The stats file on disk (tensor names in calib/stats.h). Its layout is known before calibration
// starts, so the header is written first and each layer's tensors are streamed in as the layer
// finishes: with --gram the file can be far larger than memory (the Gram matrices of one layer
// are resident at a time). Written to a temporary sibling and renamed into place by finish().
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "calib/stats.h"
#include "io/checkpoint_writer.h"
#include "io/env.h"
#include "io/output_dir.h"

namespace moe::calib {

// What one layer contributes to the file.
struct LayerLayout {
  int layer = 0;
  bool moe = false;                    // routing statistics (tokens ... coact)
  int64_t experts = 0, hidden = 0;
  bool all_token_stats = true;         // out_mean and out_cos (not with --routed-only)
  bool gram = false;                   // --gram tensors
  std::vector<int64_t> expert_widths;  // [E]: gram_mid sizes (MoE layers)
  int64_t attn_o_width = 0;            // heads * head_dim: gram_o size
  int64_t mlp_width = 0;               // dense layers: mlp.gram_mid size
};

// Tensor names, dtypes and shapes of the file, in file order (layer by layer).
std::vector<io::TensorSpec> stats_tensor_plan(const std::vector<LayerLayout>& layout);
// The layout of stats held in memory (Stats::save).
std::vector<LayerLayout> layout_of(const Stats& s);
// Bytes of Gram matrices of one layer (what --gram keeps resident while the layer runs).
uint64_t gram_bytes(const LayerLayout& l);

class StatsWriter {
 public:
  // The file is an io::OutputFile: `inputs` may not be overwritten, an existing file needs
  // `force` (spelt `force_name` in messages), a unique temporary sibling until finish().
  StatsWriter(io::Env& env, std::filesystem::path path, std::vector<LayerLayout> layout,
              std::map<std::string, std::string> metadata, const std::vector<std::filesystem::path>& inputs = {},
              bool force = true, const std::string& force_name = "--force");
  StatsWriter(const StatsWriter&) = delete;
  StatsWriter& operator=(const StatsWriter&) = delete;
  ~StatsWriter();  // removes the temporary file unless finish() succeeded

  // Writes every tensor of layer `l`: `s` for MoE layers (nullptr otherwise), `g` when the
  // layout has --gram tensors. Shapes must match the layout.
  void write_layer(int l, const LayerStats* s, const LayerGrams* g);
  // Checks everything was written, closes the file and renames it into place.
  void finish();
  uint64_t file_bytes() const { return file_bytes_; }

 private:
  void put(const std::string& name, const void* data, uint64_t n);
  io::Env& env_;
  std::filesystem::path path_, tmp_;
  std::unique_ptr<io::OutputFile> out_;
  std::vector<LayerLayout> layout_;
  struct Slot {
    uint64_t offset, nbytes;
    bool written = false;
  };
  std::map<std::string, Slot> slots_;
  std::unique_ptr<io::WritableFile> file_;
  uint64_t file_bytes_ = 0;
  bool finished_ = false;
};

}  // namespace moe::calib
