#include "calib/plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "core/error.h"
#include "io/env.h"

namespace moe::calib {

namespace {

std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      default: o += c;
    }
  }
  return o;
}

std::string num(double v, const char* f = "%.4g") {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

std::string px(double v) { return num(v, "%.1f"); }

// Viridis at 9 stops (matplotlib), linearly interpolated.
const double kViridis[9][3] = {{68, 1, 84},    {71, 44, 122},  {59, 81, 139},  {44, 113, 142}, {33, 144, 141},
                               {39, 173, 129}, {92, 200, 99},  {170, 220, 50}, {253, 231, 37}};

void rgb_of(double t, double rgb[3]) {
  if (!std::isfinite(t)) t = 0;
  t = std::clamp(t, 0.0, 1.0) * 8.0;
  const int i = std::min(7, static_cast<int>(std::floor(t)));
  const double f = t - i;
  for (int c = 0; c < 3; ++c) rgb[c] = kViridis[i][c] + f * (kViridis[i + 1][c] - kViridis[i][c]);
}

// Tick step (1, 2, 5, 10, ...) so that labels are at least `min_px` apart.
int tick_step(double cell, double min_px) {
  for (int base = 1;; base *= 10)
    for (int m : {1, 2, 5})
      if (cell * base * m >= min_px) return base * m;
}

// The smallest 1, 2, 2.5, 5 or 10 times a power of ten at or above `raw` (a tick step).
double nice_step(double raw) {
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (mag * m >= raw) {
      step = mag * m;
      break;
    }
  return step;
}

// "Nice" axis ticks for [0, vmax].
std::vector<double> nice_ticks(double vmax, int target = 5) {
  if (!(vmax > 0)) return {0.0};
  const double step = nice_step(vmax / target);
  std::vector<double> t;
  for (double v = 0; v <= vmax * 1.0001; v += step) t.push_back(v);
  return t;
}

// "Nice" axis ticks covering [lo, hi] (lo >= 0): the first tick at or below lo.
std::vector<double> nice_range_ticks(double lo, double hi, int target = 5) {
  if (!(hi > lo)) return nice_ticks(hi, target);
  const double step = nice_step((hi - lo) / target);
  std::vector<double> t;
  for (double v = std::floor(lo / step) * step; v <= hi + step * 1e-3; v += step) t.push_back(v);
  if (t.back() < hi) t.push_back(t.back() + step);
  return t;
}

std::string svg_open(double w, double h) {
  return "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + px(w) +
         "\" height=\"" + px(h) + "\" viewBox=\"0 0 " + px(w) + " " + px(h) +
         "\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n<rect width=\"100%\" height=\"100%\" "
         "fill=\"white\"/>\n";
}

std::string text(double x, double y, const std::string& s, int size, const std::string& extra = "") {
  return "<text x=\"" + px(x) + "\" y=\"" + px(y) + "\" font-size=\"" + std::to_string(size) + "\"" +
         (extra.empty() ? "" : " " + extra) + ">" + esc(s) + "</text>\n";
}

std::string viridis_gradient(const std::string& id) {
  std::string o = "<defs><linearGradient id=\"" + id + "\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">";
  for (int i = 0; i <= 8; ++i) o += "<stop offset=\"" + num(i / 8.0, "%.3f") + "\" stop-color=\"" + viridis(i / 8.0) + "\"/>";
  return o + "</linearGradient></defs>\n";
}

}  // namespace

std::string viridis(double t) {
  double c[3];
  rgb_of(t, c);
  char b[8];
  std::snprintf(b, sizeof b, "#%02x%02x%02x", static_cast<int>(std::lround(c[0])), static_cast<int>(std::lround(c[1])),
                static_cast<int>(std::lround(c[2])));
  return b;
}

std::string heatmap_svg(const Heatmap& h) {
  const int R = static_cast<int>(h.values.rows()), C = static_cast<int>(h.values.cols());
  double vmin = INFINITY, vmax = -INFINITY;
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      if (std::isfinite(h.values(r, c))) {
        vmin = std::min(vmin, h.values(r, c));
        vmax = std::max(vmax, h.values(r, c));
      }
  if (!std::isfinite(vmin)) vmin = vmax = 0;
  const double span = vmax > vmin ? vmax - vmin : 1.0;
  const double cell = std::clamp(std::floor(640.0 / std::max(1, std::max(R, C))), 3.0, 44.0);
  const double left = 96, top = h.subtitle.empty() ? 56 : 72, gw = C * cell, gh = R * cell;
  const double bar_h = std::max(gh, 160.0), right = 130, bottom = 64 + (h.nan_note.empty() ? 0 : 18);
  // Roughly 6.3 px per character at 11 px (DejaVu Sans): make room for the subtitle.
  const double W = std::max({left + gw + right, 460.0, 24 + 6.3 * static_cast<double>(h.subtitle.size()),
                             24 + 8.8 * static_cast<double>(h.title.size())}),
               Hh = top + std::max(gh, bar_h) + bottom;
  const bool annotate = cell >= 30;
  auto fmtv = [&](double v) { return h.percent ? num(100 * v, "%.1f") : num(v, "%.3f"); };
  std::ostringstream o;
  o << svg_open(W, Hh) << viridis_gradient("cbar");
  o << text(12, 24, h.title, 15, "font-weight=\"bold\"");
  if (!h.subtitle.empty()) o << text(12, 44, h.subtitle, 11, "fill=\"#555\"");
  // Cells.
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const double v = h.values(r, c);
      const bool ok = std::isfinite(v);
      const double t = ok ? (v - vmin) / span : 0;
      const double x = left + c * cell, y = top + r * cell;
      o << "<rect x=\"" << px(x) << "\" y=\"" << px(y) << "\" width=\"" << px(cell) << "\" height=\"" << px(cell)
        << "\" fill=\"" << (ok ? viridis(t) : "#d0d0d0") << "\"><title>" << esc(h.ylabel) << " "
        << esc(r < static_cast<int>(h.yticks.size()) ? h.yticks[r] : std::to_string(r)) << ", " << esc(h.xlabel)
        << " " << esc(c < static_cast<int>(h.xticks.size()) ? h.xticks[c] : std::to_string(c)) << ": "
        << (ok ? fmtv(v) + (h.percent ? "%" : "") : "n/a") << "</title></rect>\n";
      if (annotate && ok) {
        double rgb[3];
        rgb_of(t, rgb);
        const double lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2];
        o << text(x + cell / 2, y + cell / 2 + 3.5, fmtv(v), cell >= 40 ? 10 : 8,
                  std::string("text-anchor=\"middle\" fill=\"") + (lum > 140 ? "#000" : "#fff") + "\"");
      }
    }
  for (const auto& [r, c] : h.outlined)
    o << "<rect x=\"" << px(left + c * cell + 1) << "\" y=\"" << px(top + r * cell + 1) << "\" width=\""
      << px(cell - 2) << "\" height=\"" << px(cell - 2) << "\" fill=\"none\" stroke=\"#e0201b\" stroke-width=\"2\"/>\n";
  o << "<rect x=\"" << px(left) << "\" y=\"" << px(top) << "\" width=\"" << px(gw) << "\" height=\"" << px(gh)
    << "\" fill=\"none\" stroke=\"#333\" stroke-width=\"1\"/>\n";
  // Ticks.
  const int xs = tick_step(cell, 16), ys = tick_step(cell, 13);
  for (int c = 0; c < C; c += xs)
    o << text(left + c * cell + cell / 2, top + gh + 14, c < static_cast<int>(h.xticks.size()) ? h.xticks[c] : std::to_string(c),
              10, "text-anchor=\"middle\"");
  for (int r = 0; r < R; r += ys)
    o << text(left - 6, top + r * cell + cell / 2 + 3.5,
              r < static_cast<int>(h.yticks.size()) ? h.yticks[r] : std::to_string(r), 10, "text-anchor=\"end\"");
  // Axis labels.
  o << text(left + gw / 2, top + gh + 34, h.xlabel, 12, "text-anchor=\"middle\"");
  o << "<text x=\"0\" y=\"0\" font-size=\"12\" text-anchor=\"middle\" transform=\"translate(" << px(left - 44) << ","
    << px(top + gh / 2) << ") rotate(-90)\">" << esc(h.ylabel) << "</text>\n";
  if (!h.nan_note.empty()) {
    o << "<rect x=\"" << px(left) << "\" y=\"" << px(top + gh + 46) << "\" width=\"10\" height=\"10\" fill=\"#d0d0d0\"/>";
    o << text(left + 14, top + gh + 55, h.nan_note, 10);
  }
  if (!h.outlined.empty()) {
    const double y = top + gh + (h.nan_note.empty() ? 46 : 64);
    o << "<rect x=\"" << px(left) << "\" y=\"" << px(y) << "\" width=\"10\" height=\"10\" fill=\"none\" stroke=\"#e0201b\" "
      << "stroke-width=\"2\"/>";
    o << text(left + 14, y + 9, "super expert", 10);
  }
  // Colour bar with min and max.
  const double bx = left + gw + 28, by = top;
  o << "<rect x=\"" << px(bx) << "\" y=\"" << px(by) << "\" width=\"16\" height=\"" << px(bar_h)
    << "\" fill=\"url(#cbar)\" stroke=\"#333\" stroke-width=\"0.5\"/>\n";
  auto unit = [&](double v) { return fmtv(v) + (h.percent ? "%" : ""); };
  o << text(bx + 22, by + 8, unit(vmax) + " (max)", 10);
  o << text(bx + 22, by + bar_h / 2 + 3, unit((vmin + vmax) / 2), 10);
  o << text(bx + 22, by + bar_h, unit(vmin) + " (min)", 10);
  o << "<text x=\"0\" y=\"0\" font-size=\"11\" text-anchor=\"middle\" transform=\"translate(" << px(bx - 8) << ","
    << px(by + bar_h / 2) << ") rotate(-90)\">" << esc(h.value_label) << "</text>\n";
  o << "</svg>\n";
  return o.str();
}

namespace {

std::string absmax_svg(const Stats& s) {
  const int num_layers = std::stoi(s.meta("num_layers", std::to_string(s.layers.rbegin()->first + 1)));
  const auto th = s.super_thresholds();
  int64_t bars = 0;
  double vmax = 0;
  for (const auto& [l, st] : s.layers) {
    bars += st.num_experts();
    for (float v : st.out_absmax) vmax = std::max(vmax, double(v));
  }
  const int groups = static_cast<int>(s.layers.size());
  const double slots = static_cast<double>(bars + groups - 1);
  const double bw = std::clamp(std::floor(900.0 / std::max(1.0, slots)), 1.0, 26.0);
  const double left = 80, top = 78, ph = 300, pw = slots * bw, bottom = 70, right = 190;
  const double W = std::max(left + pw + right, 560.0), H = top + ph + bottom;
  const auto ticks = nice_ticks(vmax * 1.05);
  const double ymax = std::max(ticks.back(), vmax * 1.05 > 0 ? vmax * 1.05 : 1.0);
  auto Y = [&](double v) { return top + ph - ph * v / ymax; };
  std::ostringstream o;
  o << svg_open(W, H);
  o << text(12, 24, "Largest |down_proj output| per expert (out_absmax), super experts in red", 15, "font-weight=\"bold\"");
  o << text(12, 44,
            s.meta("family") + ", " + s.meta("tokens") + " calibration tokens; rule: value > 99.5th percentile of all "
            "(layer, expert) values and > max/10, layers < 0.75 x " + std::to_string(num_layers) + " only",
            11, "fill=\"#555\"");
  // Layers not considered by the rule: shaded.
  double x = left;
  for (const auto& [l, st] : s.layers) {
    const double gwid = st.num_experts() * bw;
    if (!(l < 0.75 * num_layers))
      o << "<rect x=\"" << px(x) << "\" y=\"" << px(top) << "\" width=\"" << px(gwid) << "\" height=\"" << px(ph)
        << "\" fill=\"#f0f0f0\"/>\n";
    x += gwid + bw;
  }
  // Grid and y axis.
  for (double t : ticks) {
    o << "<line x1=\"" << px(left) << "\" x2=\"" << px(left + pw) << "\" y1=\"" << px(Y(t)) << "\" y2=\"" << px(Y(t))
      << "\" stroke=\"#e4e4e4\"/>\n";
    o << text(left - 6, Y(t) + 3.5, num(t, "%.3g"), 10, "text-anchor=\"end\"");
  }
  o << "<text x=\"0\" y=\"0\" font-size=\"12\" text-anchor=\"middle\" transform=\"translate(" << px(left - 50) << ","
    << px(top + ph / 2) << ") rotate(-90)\">out_absmax (max |expert output| over routed tokens)</text>\n";
  // Bars.
  x = left;
  for (const auto& [l, st] : s.layers) {
    const int64_t E = st.num_experts();
    const bool considered = l < 0.75 * num_layers;
    for (int64_t e = 0; e < E; ++e) {
      const double v = st.out_absmax[e];
      const bool sup = st.super_expert[e];
      const double bx = x + e * bw;
      o << "<rect x=\"" << px(bx + (bw > 3 ? 0.5 : 0)) << "\" y=\"" << px(Y(v)) << "\" width=\""
        << px(bw > 3 ? bw - 1 : bw) << "\" height=\"" << px(top + ph - Y(v)) << "\" fill=\""
        << (sup ? "#e0201b" : considered ? "#4477aa" : "#9fb4c9") << "\"><title>layer " << l << ", expert " << e
        << ": " << num(v) << (sup ? " (super expert)" : "") << "</title></rect>\n";
      if (sup) o << text(bx + bw / 2, Y(v) - 4, "\u2605", 12, "text-anchor=\"middle\" fill=\"#e0201b\"");
      if (bw >= 14) o << text(bx + bw / 2, top + ph + 12, std::to_string(e), 9, "text-anchor=\"middle\" fill=\"#555\"");
    }
    const int step = tick_step(E * bw + bw, 34);
    if (l % step == 0 || groups <= 12)
      o << text(x + E * bw / 2, top + ph + (bw >= 14 ? 26 : 14), (E * bw >= 40 ? "layer " : "") + std::to_string(l), 10,
                "text-anchor=\"middle\"");
    x += E * bw + bw;
  }
  o << "<line x1=\"" << px(left) << "\" x2=\"" << px(left + pw) << "\" y1=\"" << px(top + ph) << "\" y2=\""
    << px(top + ph) << "\" stroke=\"#333\"/>\n";
  o << "<line x1=\"" << px(left) << "\" x2=\"" << px(left) << "\" y1=\"" << px(top) << "\" y2=\"" << px(top + ph)
    << "\" stroke=\"#333\"/>\n";
  o << text(left + pw / 2, top + ph + 46, bw >= 14 ? "expert (grouped by layer)" : "layer (experts side by side)", 12,
            "text-anchor=\"middle\"");
  // Thresholds.
  // Threshold labels sit right of the plot; when the two lines are close, push the labels apart.
  double label_p = Y(th.p99_5) + 3.5, label_t = Y(th.tenth_of_max) + 3.5;
  if (std::fabs(label_p - label_t) < 12) {
    const double mid = (label_p + label_t) / 2;
    const bool p_above = th.p99_5 >= th.tenth_of_max;
    label_p = mid + (p_above ? -6 : 6);
    label_t = mid + (p_above ? 6 : -6);
  }
  auto hline = [&](double v, double label_y, const char* color, const char* dash, const std::string& label) {
    if (v > ymax) return;
    o << "<line x1=\"" << px(left) << "\" x2=\"" << px(left + pw) << "\" y1=\"" << px(Y(v)) << "\" y2=\"" << px(Y(v))
      << "\" stroke=\"" << color << "\" stroke-width=\"1.5\" stroke-dasharray=\"" << dash << "\"/>\n";
    o << text(left + pw + 6, label_y, label, 10, std::string("fill=\"") + color + "\"");
  };
  hline(th.p99_5, label_p, "#d17a00", "6,3", "99.5th pct " + num(th.p99_5, "%.3g"));
  hline(th.tenth_of_max, label_t, "#7b3294", "2,2", "max/10 " + num(th.tenth_of_max, "%.3g"));
  // Legend.
  const double ly = 56;
  double lx = left;
  auto key = [&](const char* color, const std::string& label) {
    o << "<rect x=\"" << px(lx) << "\" y=\"" << px(ly) << "\" width=\"10\" height=\"10\" fill=\"" << color << "\"/>";
    o << text(lx + 14, ly + 9, label, 10);
    lx += 24 + 6.2 * label.size();
  };
  key("#e0201b", "super expert");
  key("#4477aa", "expert");
  key("#9fb4c9", "expert in a layer the rule skips (shaded)");
  o << "</svg>\n";
  return o.str();
}

void write(const std::filesystem::path& p, const std::string& s) { io::Env::posix().write_text(p, s); }

}  // namespace

std::vector<std::string> plot_stats(const Stats& s, const std::filesystem::path& dir) {
  if (s.layers.empty()) throw core::Error::invalid("stats plot: the file has no layer statistics");
  io::Env::posix().create_dirs(dir);
  std::vector<std::string> files;
  const std::string who = s.meta("family") + ", " + s.meta("tokens") + " tokens (" + s.meta("windows") + " windows x " +
                          s.meta("ctx") + ", " + s.meta("sample") + ")";
  // Usage heatmap.
  {
    int64_t E = 0;
    for (const auto& [l, st] : s.layers) E = std::max(E, st.num_experts());
    Heatmap h;
    h.title = "Expert usage: share of routed tokens per layer";
    h.subtitle = who + "; count share = count[e] / sum of counts";
    h.xlabel = "expert";
    h.ylabel = "layer";
    h.value_label = "count share";
    h.percent = true;
    h.values = MatrixD::Constant(static_cast<int64_t>(s.layers.size()), E, NAN);
    int r = 0;
    bool ragged = false;
    for (const auto& [l, st] : s.layers) {
      double sum = 0;
      for (double c : st.count) sum += c;
      for (int64_t e = 0; e < st.num_experts(); ++e) {
        h.values(r, e) = sum > 0 ? st.count[e] / sum : 0.0;
        if (st.super_expert[e]) h.outlined.push_back({r, static_cast<int>(e)});
      }
      ragged |= st.num_experts() < E;
      h.yticks.push_back(std::to_string(l));
      ++r;
    }
    if (ragged) h.nan_note = "no such expert in this layer";
    for (int64_t e = 0; e < E; ++e) h.xticks.push_back(std::to_string(e));
    write(dir / "usage.svg", heatmap_svg(h));
    files.push_back("usage.svg");
  }
  // Similarity matrices.
  for (const auto& [l, st] : s.layers) {
    const int64_t E = st.num_experts();
    auto sim = [&](const MatrixF& m, const std::string& file, const std::string& title, const std::string& sub,
                   const std::string& label) {
      Heatmap h;
      h.title = title;
      h.subtitle = sub;
      h.xlabel = "expert";
      h.ylabel = "expert";
      h.value_label = label;
      h.values = m.cast<double>();
      for (int64_t i = 0; i < E; ++i) h.values(i, i) = NAN;
      h.nan_note = "diagonal (= 1 by definition), left out of the colour scale";
      for (int64_t e = 0; e < E; ++e) h.xticks.push_back(std::to_string(e));
      h.yticks = h.xticks;
      write(dir / file, heatmap_svg(h));
      files.push_back(file);
    };
    const std::string ls = "layer-" + std::to_string(l);
    // out_cos used the first out_cos_tokens sampled tokens (stream tokens 0, S, 2S, ... with
    // S = out_stride; files without out_stride: S = 1, the first out_cos_tokens tokens).
    const std::string stride = s.meta("out_stride", "1");
    const std::string cos_sample =
        stride == "1" ? "the first " + s.meta("out_cos_tokens", "?") + " tokens"
                      : s.meta("out_cos_tokens", "?") + " sampled tokens (1 in " + stride + " of the stream)";
    sim(st.logit_sim, ls + "-logit_sim.svg", "Layer " + std::to_string(l) + ": router-logit similarity",
        who + "; (cos + 1) / 2 of router-logit columns over tokens", "logit_sim");
    if (st.out_cos.size())
      sim(st.out_cos, ls + "-out_cos.svg", "Layer " + std::to_string(l) + ": expert output similarity",
          who + "; mean cos(expert_i(x), expert_j(x)) over " + cos_sample, "out_cos");
  }
  write(dir / "out_absmax.svg", absmax_svg(s));
  files.push_back("out_absmax.svg");
  // One page with everything.
  std::ostringstream html;
  html << "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>moe-tool stats: " << esc(s.source.string())
       << "</title></head>\n<body style=\"font-family: sans-serif\">\n<h1>moe-tool stats</h1>\n<p>"
       << esc(s.source.string()) << ": " << esc(who) << ", model " << esc(s.meta("model_fingerprint")) << "</p>\n";
  for (const auto& f : files) html << "<p><img src=\"" << esc(f) << "\" alt=\"" << esc(f) << "\"></p>\n";
  html << "</body></html>\n";
  write(dir / "index.html", html.str());
  files.push_back("index.html");
  return files;
}

std::string scatter_svg(const Scatter& s) {
  const size_t n = s.x.size();
  for (const auto& p : s.panels)
    if (p.y.size() != n || p.front.size() != n || s.labels.size() != n || s.groups.size() != n)
      throw core::Error::internal("scatter_svg: every series needs one value per point");
  std::vector<std::string> group_names;
  for (const auto& g : s.groups)
    if (std::find(group_names.begin(), group_names.end(), g) == group_names.end()) group_names.push_back(g);
  static const char* kPalette[] = {"#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb"};
  auto colour = [&](const std::string& g) {
    const size_t i = std::find(group_names.begin(), group_names.end(), g) - group_names.begin();
    return kPalette[i % (sizeof kPalette / sizeof *kPalette)];
  };
  const double left = 70, top = 100, pw = 380, ph = 300, gap = 90, bottom = 60;
  const double W = left + s.panels.size() * (pw + gap), H = top + ph + bottom;
  double xmax = 0;
  for (double v : s.x)
    if (std::isfinite(v)) xmax = std::max(xmax, v);
  const auto xt = nice_ticks(xmax * 1.05);
  const double xhi = std::max(xt.back(), xmax > 0 ? xmax * 1.05 : 1.0);
  std::ostringstream o;
  o << svg_open(W, H);
  o << text(12, 24, s.title, 15, "font-weight=\"bold\"");
  o << text(12, 44, s.subtitle, 11, "fill=\"#555\"");
  // Legend: one entry per group, then the front.
  double lx = left;
  for (const auto& g : group_names) {
    o << "<circle cx=\"" << px(lx + 5) << "\" cy=\"" << px(61) << "\" r=\"5\" fill=\"" << colour(g) << "\"/>";
    o << text(lx + 14, 65, g, 10);
    lx += 26 + 6.2 * g.size();
  }
  o << "<line x1=\"" << px(left) << "\" x2=\"" << px(left + 18) << "\" y1=\"77\" y2=\"77\" stroke=\"#000\" stroke-width=\"1.2\" "
       "stroke-dasharray=\"4,2\"/>";
  o << text(left + 22, 81, "Pareto front (outlined, labelled: no other point is both smaller and better)", 10);
  for (size_t pi = 0; pi < s.panels.size(); ++pi) {
    const auto& p = s.panels[pi];
    const double x0 = left + pi * (pw + gap);
    // y: from a tick at or below the smallest value (a ratio near 1 keeps its differences visible).
    double ymax = 0, ymin = INFINITY;
    for (size_t i = 0; i < n; ++i)
      if (std::isfinite(p.y[i]) && std::isfinite(s.x[i])) ymax = std::max(ymax, p.y[i]), ymin = std::min(ymin, p.y[i]);
    if (!std::isfinite(ymin)) ymin = 0;
    ymin = std::max(0.0, ymin);
    const auto yt = nice_range_ticks(ymin, ymax + (ymax - ymin) * 0.05);
    const double ylo = yt.front(), yhi = std::max(yt.back(), ylo + 1e-12);
    auto X = [&](double v) { return x0 + pw * v / xhi; };
    auto Y = [&](double v) { return top + ph - ph * (v - ylo) / (yhi - ylo); };
    for (double t : yt) {
      o << "<line x1=\"" << px(x0) << "\" x2=\"" << px(x0 + pw) << "\" y1=\"" << px(Y(t)) << "\" y2=\"" << px(Y(t))
        << "\" stroke=\"#e4e4e4\"/>\n";
      o << text(x0 - 6, Y(t) + 3.5, num(t, "%.5g"), 10, "text-anchor=\"end\"");
    }
    for (double t : xt) {
      o << "<line x1=\"" << px(X(t)) << "\" x2=\"" << px(X(t)) << "\" y1=\"" << px(top) << "\" y2=\"" << px(top + ph)
        << "\" stroke=\"#f0f0f0\"/>\n";
      o << text(X(t), top + ph + 14, num(t, "%.3g"), 10, "text-anchor=\"middle\"");
    }
    o << "<line x1=\"" << px(x0) << "\" x2=\"" << px(x0 + pw) << "\" y1=\"" << px(top + ph) << "\" y2=\"" << px(top + ph)
      << "\" stroke=\"#333\"/>\n";
    o << "<line x1=\"" << px(x0) << "\" x2=\"" << px(x0) << "\" y1=\"" << px(top) << "\" y2=\"" << px(top + ph)
      << "\" stroke=\"#333\"/>\n";
    o << text(x0 + pw / 2, top + ph + 36, s.xlabel, 12, "text-anchor=\"middle\"");
    o << "<text x=\"0\" y=\"0\" font-size=\"12\" text-anchor=\"middle\" transform=\"translate(" << px(x0 - 46) << ","
      << px(top + ph / 2) << ") rotate(-90)\">" << esc(p.ylabel) << "</text>\n";
    // The front as a step line (sorted by x), then the points.
    std::vector<size_t> front;
    for (size_t i = 0; i < n; ++i)
      if (p.front[i] && std::isfinite(p.y[i]) && std::isfinite(s.x[i])) front.push_back(i);
    std::sort(front.begin(), front.end(), [&](size_t a, size_t b) { return s.x[a] < s.x[b]; });
    if (!front.empty()) {
      o << "<polyline fill=\"none\" stroke=\"#000\" stroke-width=\"1.2\" stroke-dasharray=\"4,2\" points=\"";
      for (size_t k = 0; k < front.size(); ++k) {
        if (k > 0) o << px(X(s.x[front[k]])) << "," << px(Y(p.y[front[k - 1]])) << " ";
        o << px(X(s.x[front[k]])) << "," << px(Y(p.y[front[k]])) << " ";
      }
      o << "\"/>\n";
    }
    for (size_t i = 0; i < n; ++i) {
      if (!std::isfinite(p.y[i]) || !std::isfinite(s.x[i])) continue;
      const double yv = std::min(p.y[i], yhi);
      o << "<circle cx=\"" << px(X(s.x[i])) << "\" cy=\"" << px(Y(yv)) << "\" r=\"" << (p.front[i] ? "5.5" : "4")
        << "\" fill=\"" << colour(s.groups[i]) << "\"" << (p.front[i] ? " stroke=\"#000\" stroke-width=\"1.5\"" : "")
        << "><title>" << esc(s.labels[i]) << ": " << esc(s.xlabel) << " " << num(s.x[i]) << ", " << esc(p.ylabel) << " "
        << num(p.y[i]) << "</title></circle>\n";
      if (p.front[i]) o << text(X(s.x[i]) + 7, Y(yv) - 6, s.labels[i], 9, "fill=\"#333\"");
    }
  }
  o << "</svg>\n";
  return o.str();
}

}  // namespace moe::calib
