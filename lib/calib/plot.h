// `moe-tool stats plot`: self-contained SVG pictures of a stats file, for a browser:
//   usage.svg                 heatmap layers x experts of the count share (tokens routed to e /
//                             all routed slots of the layer)
//   layer-{l}-logit_sim.svg   expert x expert similarity of router-logit columns ((cos+1)/2)
//   layer-{l}-out_cos.svg     expert x expert mean cosine of expert outputs (absent with --routed-only)
//   out_absmax.svg            out_absmax of every (layer, expert) with super experts marked and
//                             the two thresholds of the rule drawn
//   index.html                all of the above on one page
// Every picture has labelled axes and a colour bar with its min and max. No dependencies: the
// SVG text is written here.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "calib/stats.h"

namespace moe::calib {

// A heatmap of values [rows, cols]; cells with NaN are drawn grey.
struct Heatmap {
  std::string title, subtitle, xlabel, ylabel, value_label;
  std::vector<std::string> xticks, yticks;  // one label per column / row
  MatrixD values;
  std::vector<std::pair<int, int>> outlined;  // (row, col) cells drawn with a red outline
  std::string nan_note;                         // legend text for grey cells ("" when none)
  bool percent = false;                         // show values as percentages
};
std::string heatmap_svg(const Heatmap& h);

// Viridis colour of t in [0,1], "#rrggbb".
std::string viridis(double t);

// Writes every picture into `dir` (created); returns the file names written.
std::vector<std::string> plot_stats(const Stats& s, const std::filesystem::path& dir);

}  // namespace moe::calib
