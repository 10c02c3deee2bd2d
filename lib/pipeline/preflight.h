// Every check a run needs, before the first forward pass: the output (not an input, --force for an
// existing one, a writable parent), the calibration text (readable, enough tokens for the windows
// asked, ctx within the model's positions), the statistics file (this model's, with every field
// the passes read, Gram matrices included), the evaluation text and context, and whether the
// forward supports the family when something runs it. --dry-run runs exactly these checks.
#pragma once

#include <string>
#include <vector>

#include "calib/stats.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "pipeline/recipe.h"

namespace moe::pipeline {

struct RunNeeds {
  bool stats = false;                // the first pass reads statistics (file or on the fly)
  bool inputs = false;               // a pass runs the MoE block on calibration inputs
  std::vector<std::string> fields;   // statistics fields the first pass reads
  int64_t min_windows = 0;           // calibration windows a pass needs at least
  std::string min_windows_why;       // "--search-windows + --heldout-windows = 24" (the pass's keys)
};

// Every file the run reads (model, calibration text, statistics, evaluation text, recipe files):
// what the output may not be, be inside or contain.
std::vector<fs::path> run_inputs(const Recipe& r);

// Throws the first problem found (Error::invalid / not_found / io, naming what the user typed:
// flags for prune/merge, JSON paths for recipes). `load_stats_file`: also open the statistics file
// and check it (a real run loads it right after, so only --dry-run needs this here).
// A statistics file's fields: every MoE layer of `model` has each of `fields` (Gram matrices
// included); Error::invalid naming the file, the layer and the field.
void check_stats_fields(const calib::Stats& s, const model::Model& model, const std::vector<std::string>& fields);

void preflight(const Recipe& r, const io::Checkpoint& ckpt, const model::Model& model, const RunNeeds& needs,
               bool load_stats_file);

}  // namespace moe::pipeline
