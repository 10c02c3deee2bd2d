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

// A scatter of points against one x axis, one panel per y quantity (side by side), points
// coloured by group, the points flagged `front` outlined and joined by a step line (a Pareto
// front: lower is better on both axes). Axes are linear: x from 0, y from a tick at or below the
// smallest value; every point has a tooltip.
struct ScatterPanel {
  std::string ylabel;
  std::vector<double> y;        // one per point; non-finite values are left out (and said in the subtitle)
  std::vector<bool> front;      // one per point
};
struct Scatter {
  std::string title, subtitle, xlabel;
  std::vector<double> x;            // one per point
  std::vector<std::string> labels;  // one per point (tooltip; front points also get it as text)
  std::vector<std::string> groups;  // one per point: colour and legend entry
  std::vector<ScatterPanel> panels;
};
std::string scatter_svg(const Scatter& s);

// Viridis colour of t in [0,1], "#rrggbb".
std::string viridis(double t);

// Writes every picture into `dir` (created); returns the file names written.
std::vector<std::string> plot_stats(const Stats& s, const std::filesystem::path& dir);

}  // namespace moe::calib
