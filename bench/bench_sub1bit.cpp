// Sub-1-bit (QMoE dictionary coding of ternary experts, quant/ternary_dict.h): bits, quality and
// speed. Prints JSON, and a Markdown table on stderr.
//   bench_sub1bit [--source-dir DIR] [--models mixtral-tiny,qwen2moe-tiny] [--thresholds 0.5,0.7,0.9]
//                 [--ctx 128] [--calib-windows 64] [--eval-windows 64] [--quality 1] [--speed 1]
//                 [--speed-layers 2] [--speed-windows 8] [--tool path/to/moe-tool] [--svg FILE]
//                 [--threshold-scale none|importance] [--threshold-gamma 0.5]
// Quality: per fixture (validation-tiny with its own texts, bench/fixtures.h) and threshold τ,
// GPTQ ternary-minmax (QMoE's grid, τ = 0.5) then dictionary coding with one dictionary for the
// checkpoint in one run (`quantize --method gptq --codec ternary:tτ --sub1bit`), evaluated against
// the original on the held-out text. Per row: expert bits per parameter with everything stored
// counted, and where they go (codes, of which the row-end waste against one unbroken stream;
// row code counts; levels; dictionary); one dictionary per layer instead; the zero fraction; the Shannon
// entropy of the trit pairs (iid, per parameter) and how close codes plus dictionary come to it;
// the same trits packed 2 bits each and compressed by zstd at its maximum level; perplexity and
// KL. Then the same bit accounting on realistic row lengths: synthetic Gaussian matrices of the
// benchmark model's expert shapes, RTN ternary at each τ (labelled synthetic; no quality).
// Speed (synthetic mixtral layout, H 1024, 8 experts of width 2816): decode throughput of
// ternary-dict and of packed ternary rows (parameters/s, one core), coding throughput (dictionary
// search and coding, parameters/s), and `moe-tool eval` tokens/s of the bf16, ternary and
// sub-1-bit checkpoints (child processes). --svg writes the bits/quality curve (expert bits per
// parameter against perplexity relative to the original, one line per model, points labelled τ).
#include <zstd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <unistd.h>
#include <vector>

#include "child_process.h"
#include "fixtures.h"
#include "core/error.h"
#include "core/progress.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "pipeline/recipe.h"
#include "pipeline/runner.h"
#include "quant/codec.h"
#include "quant/ternary.h"
#include "quant/ternary_dict.h"
#include "synthetic_mixtral.h"

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;
using moe::quant::Ternary;
using moe::quant::TernaryDict;

namespace {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> v;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');) v.push_back(x);
  return v;
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The Ternary weight a TernaryDict codes (its trits and levels), for re-coding.
std::shared_ptr<const Ternary> to_ternary(const TernaryDict& d) {
  const int64_t rows = d.rows(), cols = d.cols();
  std::vector<uint8_t> t(static_cast<size_t>(rows * cols));
  std::vector<float> lo(static_cast<size_t>(rows)), hi(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) d.trits_row(r, t.data() + r * cols);
  const moe::core::Tensor* levels = nullptr;
  for (const auto& p : d.parts())
    if (p.role == "levels") levels = p.tensor.get();
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t h[2];
    std::memcpy(h, levels->data() + 4 * r, 4);
    lo[static_cast<size_t>(r)] = moe::core::f16_to_f32(h[0]);
    hi[static_cast<size_t>(r)] = moe::core::f16_to_f32(h[1]);
  }
  return Ternary::pack(moe::quant::TernaryGrid::MinMax, 0, false, rows, cols, t.data(), lo.data(), hi.data());
}

// Trits packed 2 bits each, 4 per byte, all rows of all weights one after another.
std::vector<uint8_t> packed_trits(const std::vector<const Ternary*>& ws) {
  std::vector<uint8_t> packed;
  uint8_t acc = 0;
  int nacc = 0;
  for (const Ternary* t : ws) {
    std::vector<uint8_t> row(static_cast<size_t>(t->cols()));
    for (int64_t r = 0; r < t->rows(); ++r) {
      t->trits_row(r, row.data());
      for (uint8_t v : row) {
        acc = static_cast<uint8_t>(acc | (v << (2 * nacc)));
        if (++nacc == 4) packed.push_back(acc), acc = 0, nacc = 0;
      }
    }
  }
  if (nacc) packed.push_back(acc);
  return packed;
}

// Codes of all rows of ws as one stream (no row boundaries) with d: what the row-end waste of
// per-row coding (the last codeword of a row cut short) is measured against.
int64_t stream_codes(const std::vector<const Ternary*>& ws, const moe::quant::PairDictionary& d) {
  std::vector<uint8_t> sym;
  for (const Ternary* t : ws) {
    const int64_t np = (t->cols() + 1) / 2;
    std::vector<uint8_t> tr(static_cast<size_t>(2 * np), 0);
    for (int64_t r = 0; r < t->rows(); ++r) {
      t->trits_row(r, tr.data());
      for (int64_t i = 0; i < np; ++i) sym.push_back(static_cast<uint8_t>(tr[2 * i] + 3 * tr[2 * i + 1]));
    }
  }
  return d.encode(sym.data(), static_cast<int64_t>(sym.size()), nullptr);
}

// Where the bits of dictionary-coded ternary weights go (layers[l] = the weights sharing a layer
// dictionary), in bits per parameter: one dictionary for all of them (dict_scope model) split into
// codes (of which row-end waste: codes beyond those of one unbroken stream), row counts, levels and
// dictionary; one dictionary per layer; the Shannon entropy of the trit pairs (iid); zstd at its
// maximum level on the trits packed 2 bits each.
json coding_breakdown(const std::vector<std::vector<const Ternary*>>& layers) {
  std::vector<const Ternary*> all;
  for (const auto& l : layers) all.insert(all.end(), l.begin(), l.end());
  double params = 0, rows = 0;
  for (const Ternary* t : all) params += static_cast<double>(t->rows() * t->cols()), rows += static_cast<double>(t->rows());
  const auto tc = Clock::now();
  const moe::quant::DictCoded one = moe::quant::dict_code(all);
  const double csecs = seconds_since(tc);
  double codes = 0, counts = 0, levels = 0;
  for (const auto& w : one.weights)
    for (const auto& p : w->parts()) {
      const double b = 8.0 * static_cast<double>(p.tensor->nbytes());
      if (p.role == "codes") codes += b;
      if (p.role == "counts") counts += b;
      if (p.role == "levels") levels += b;
    }
  const double dict = static_cast<double>(moe::quant::dictionary_bits(*one.dict));
  const double row_end = codes - 16.0 * static_cast<double>(stream_codes(all, *one.dict));
  double per_layer = 0;
  for (const auto& l : layers) {
    const moe::quant::DictCoded dc = moe::quant::dict_code(l);
    per_layer += static_cast<double>(moe::quant::dictionary_bits(*dc.dict));
    for (const auto& w : dc.weights) per_layer += static_cast<double>(moe::quant::own_bits(*w));
  }
  const moe::quant::PairStats& st = one.stats;
  double np = 0, h = 0;
  for (double c : st.counts) np += c;
  for (double c : st.counts)
    if (c > 0) h -= c / np * std::log2(c / np);
  const double entropy = h * np / params;  // pairs per parameter ≈ 1/2
  const std::vector<uint8_t> packed = packed_trits(all);
  std::vector<char> z(ZSTD_compressBound(packed.size()));
  const auto tz = Clock::now();
  const size_t zn = ZSTD_compress(z.data(), z.size(), packed.data(), packed.size(), ZSTD_maxCLevel());
  const double zsecs = seconds_since(tz);
  if (ZSTD_isError(zn)) throw moe::core::Error::internal(std::string("zstd: ") + ZSTD_getErrorName(zn));
  const double total = codes + counts + levels + dict;
  return {{"expert_params", params},
          {"mean_row_length", params / rows},
          {"zero_fraction", static_cast<double>(st.zeros) / static_cast<double>(st.trits)},
          {"bits_per_param", total / params},
          {"codes_bits_per_param", codes / params},
          {"row_end_bits_per_param", row_end / params},
          {"counts_bits_per_param", counts / params},
          {"levels_bits_per_param", levels / params},
          {"dictionary_bits_per_param", dict / params},
          {"dictionary_codewords", one.dict->size()},
          {"per_layer_dictionaries_bits_per_param", per_layer / params},
          {"pair_entropy_bits_per_param", entropy},
          {"entropy_over_codes_and_dictionary", entropy / ((codes + dict) / params)},
          {"entropy_over_total", entropy / (total / params)},
          {"zstd_level", ZSTD_maxCLevel()},
          {"zstd_bits_per_param", 8.0 * static_cast<double>(zn) / params},
          {"zstd_plus_levels_bits_per_param", (8.0 * static_cast<double>(zn) + levels) / params},
          {"zstd_seconds", zsecs},
          {"coding_params_per_second", params / csecs}};
}

// Everything measured on the dictionary-coded experts of a checkpoint (either scope), with what it
// stores checked against coding_breakdown's recount.
json measure_coding(const fs::path& dir) {
  const auto ck = moe::io::Checkpoint::open(moe::io::Env::posix(), dir);
  const moe::model::Model m = moe::model::Model::load(ck);
  double params = 0, stored = 0;
  std::set<const moe::quant::PairDictionary*> dicts;
  std::vector<std::shared_ptr<const Ternary>> keep;
  std::vector<std::vector<const Ternary*>> layers;
  for (const auto& layer : m.layers()) {
    if (!layer.moe) continue;
    layers.emplace_back();
    for (const auto& e : layer.moe->experts)
      for (const moe::core::Tensor* w : {&e.gate, &e.up, &e.down}) {
        const auto* d = dynamic_cast<const TernaryDict*>(w->encoding());
        if (!d) throw moe::core::Error::internal("bench_sub1bit: an expert weight is not ternary-dict");
        if (dicts.insert(&d->dictionary()).second) stored += static_cast<double>(moe::quant::dictionary_bits(d->dictionary()));
        stored += static_cast<double>(moe::quant::own_bits(*d));
        params += static_cast<double>(d->rows() * d->cols());
        keep.push_back(to_ternary(*d));
        layers.back().push_back(keep.back().get());
      }
  }
  json out = coding_breakdown(layers);
  out["checkpoint_bits_per_param"] = stored / params;
  out["checkpoint_dictionaries"] = dicts.size();
  return out;
}

// The bits/quality curve as a self-contained SVG.
std::string curve_svg(const json& rows) {
  const double W = 640, H = 420, l = 70, r = 130, t = 40, b = 60;
  double x0 = 1e9, x1 = -1e9, y0 = 0, y1 = -1e9;
  for (const auto& row : rows) {
    x0 = std::min(x0, row["checkpoint_bits_per_param"].get<double>());
    x1 = std::max(x1, row["checkpoint_bits_per_param"].get<double>());
    y1 = std::max(y1, 100 * (row["ppl_ratio"].get<double>() - 1));
  }
  x0 = std::floor(x0 * 10 - 1) / 10, x1 = std::ceil(x1 * 10 + 1) / 10, y1 = std::ceil(y1 / 5 + 1) * 5;
  auto X = [&](double v) { return l + (v - x0) / (x1 - x0) * (W - l - r); };
  auto Y = [&](double v) { return H - b - (v - y0) / (y1 - y0) * (H - t - b); };
  std::ostringstream o;
  char buf[256];
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "<text x=\"" << W / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">Sub-1-bit experts (GPTQ ternary + "
       "dictionary coding): bits vs quality</text>\n";
  for (double v = x0; v <= x1 + 1e-9; v += 0.1) {
    std::snprintf(buf, sizeof buf, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%.1f</text>\n",
                  X(v), Y(y0), X(v), Y(y1), X(v), Y(y0) + 16, v);
    o << buf;
  }
  for (double v = y0; v <= y1 + 1e-9; v += 5) {
    std::snprintf(buf, sizeof buf, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">+%.0f%%</text>\n",
                  X(x0), Y(v), X(x1), Y(v), X(x0) - 6, Y(v) + 4, v);
    o << buf;
  }
  std::snprintf(buf, sizeof buf, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">expert bits per parameter (everything stored)</text>\n"
                "<text x=\"16\" y=\"%.1f\" text-anchor=\"middle\" transform=\"rotate(-90 16 %.1f)\">perplexity vs original</text>\n",
                (X(x0) + X(x1)) / 2, H - 18, (Y(y0) + Y(y1)) / 2, (Y(y0) + Y(y1)) / 2);
  o << buf;
  const char* colours[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd"};
  std::vector<std::string> models;
  for (const auto& row : rows)
    if (std::find(models.begin(), models.end(), row["model"].get<std::string>()) == models.end())
      models.push_back(row["model"].get<std::string>());
  for (size_t m = 0; m < models.size(); ++m) {
    const char* c = colours[m % 4];
    std::string pts;
    for (const auto& row : rows) {
      if (row["model"] != models[m]) continue;
      const double x = X(row["checkpoint_bits_per_param"].get<double>()), y = Y(100 * (row["ppl_ratio"].get<double>() - 1));
      std::snprintf(buf, sizeof buf, "%.1f,%.1f ", x, y);
      pts += buf;
      std::snprintf(buf, sizeof buf, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\" fill=\"%s\"/><text x=\"%.1f\" y=\"%.1f\" fill=\"%s\">τ %.1f</text>\n",
                    x, y, c, x + 6, y - 6, c, row["threshold"].get<double>());
      o << buf;
    }
    o << "<polyline points=\"" << pts << "\" fill=\"none\" stroke=\"" << c << "\" stroke-width=\"2\"/>\n";
    std::snprintf(buf, sizeof buf, "<rect x=\"%.1f\" y=\"%.1f\" width=\"12\" height=\"12\" fill=\"%s\"/><text x=\"%.1f\" y=\"%.1f\">%s</text>\n",
                  W - r + 10, t + 20 * static_cast<double>(m), c, W - r + 28, t + 20 * static_cast<double>(m) + 11, models[m].c_str());
    o << buf;
  }
  o << "</svg>\n";
  return o.str();
}

}  // namespace

int main(int argc, char** argv) {
  fs::path src = MOE_BENCH_SOURCE_DIR;
  int64_t ctx = 128, calib_windows = 64, eval_windows = 64, speed_windows = 8;
  bool quality = true, speed = true;
  std::vector<std::string> models = {"mixtral-tiny", "qwen2moe-tiny", "validation-tiny"};
  std::vector<std::string> thresholds = {"0.5", "0.7", "0.9"};
  std::vector<int64_t> speed_layers = {2};
  std::string tool = (fs::path(argv[0]).parent_path() / "moe-tool").string(), svg, threshold_scale = "none";
  double threshold_gamma = 0.5;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--source-dir") src = v;
    else if (k == "--models") models = split(v);
    else if (k == "--thresholds") thresholds = split(v);
    else if (k == "--ctx") ctx = std::stoll(v);
    else if (k == "--calib-windows") calib_windows = std::stoll(v);
    else if (k == "--eval-windows") eval_windows = std::stoll(v);
    else if (k == "--quality") quality = v != "0";
    else if (k == "--speed") speed = v != "0";
    else if (k == "--speed-windows") speed_windows = std::stoll(v);
    else if (k == "--tool") tool = v;
    else if (k == "--svg") svg = v;
    else if (k == "--threshold-scale") threshold_scale = v;
    else if (k == "--threshold-gamma") threshold_gamma = std::stod(v);
    else if (k == "--speed-layers") {
      speed_layers.clear();
      for (const auto& x : split(v)) speed_layers.push_back(std::stoll(x));
    } else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  moe::core::Progress::global_quiet() = true;
  const fs::path tmp = fs::temp_directory_path() / ("moe-bench-sub1bit-" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  json out = {{"benchmark", "sub1bit"}, {"threshold_scale", threshold_scale}, {"threshold_gamma", threshold_gamma}, {"ctx", ctx}, {"calib_windows", calib_windows}, {"eval_windows", eval_windows},
              {"rows", json::array()}};
  std::ostringstream md;
  md << "| model | τ | zero fraction | expert bits/param | codes (of which row-end) | row counts | levels | dictionary | "
        "per-layer dictionaries | pair entropy | entropy / (codes + dict) | zstd -" << ZSTD_maxCLevel()
     << " trits | perplexity | vs original | KL |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  char buf[512];
  auto bits_cells = [&](const json& row) {
    std::snprintf(buf, sizeof buf, "%.1f%% | %.3f | %.3f (%.3f) | %.3f | %.3f | %.3f | %.3f | %.3f | %.0f%% | %.3f",
                  100 * row["zero_fraction"].get<double>(), row.value("checkpoint_bits_per_param", row["bits_per_param"].get<double>()),
                  row["codes_bits_per_param"].get<double>(), row["row_end_bits_per_param"].get<double>(),
                  row["counts_bits_per_param"].get<double>(), row["levels_bits_per_param"].get<double>(),
                  row["dictionary_bits_per_param"].get<double>(), row["per_layer_dictionaries_bits_per_param"].get<double>(),
                  row["pair_entropy_bits_per_param"].get<double>(), 100 * row["entropy_over_codes_and_dictionary"].get<double>(),
                  row["zstd_bits_per_param"].get<double>());
    return std::string(buf);
  };
  int exit_code = 0;
  try {
    for (const auto& name : quality ? models : std::vector<std::string>{}) {
      const fs::path model_dir = src / "data/models" / name;
      if (!fs::exists(model_dir)) {
        std::cerr << "bench_sub1bit: " << model_dir.string() << " absent, skipped\n";
        continue;
      }
      for (const auto& tau : thresholds) {
        json pass = {{"pass", "quantize"}, {"method", "gptq"}, {"codec", "ternary:t" + tau}, {"sub1bit", true}, {"dict_scope", "model"}};
        if (threshold_scale != "none") {
          pass["threshold_scale"] = threshold_scale;
          pass["threshold_gamma"] = threshold_gamma;
        }
        const fs::path texts = moe::bench::fixture_text_dir(src, name);
        json recipe = {{"model", model_dir.string()},
                       {"calibration", {{"text", (texts / "calib.txt").string()}, {"ctx", ctx}, {"windows", calib_windows}}},
                       {"passes", json::array({pass})},
                       {"output", {{"path", (tmp / "out").string()}, {"force", true}}},
                       {"eval", {{"text", (texts / "heldout.txt").string()}, {"ctx", ctx}, {"max_windows", eval_windows},
                                 {"against_input", true}}}};
        auto r = moe::pipeline::parse_recipe(recipe, ".", "bench");
        moe::pipeline::RunOptions o;
        o.quiet = true;
        const auto t0 = Clock::now();
        const json s = moe::pipeline::run_recipe(r, o);
        const double secs = seconds_since(t0);
        const json& e = s.at("eval");
        const double ppl0 = e.at("perplexity_before").get<double>(), ppl = e.at("perplexity_after").get<double>();
        const json report = json::parse(std::ifstream(tmp / "out" / "moe_tool_report.json"));
        json row = measure_coding(tmp / "out");
        row["model"] = name;
        row["threshold"] = std::stod(tau);
        row["report_expert_bits_per_param"] = report.at("tensor_classes").at("after").at("experts").at("bits_per_param");
        row["perplexity"] = ppl;
        row["perplexity_original"] = ppl0;
        row["ppl_ratio"] = ppl / ppl0;
        row["kl"] = e.at("kl_mean");
        row["top1"] = e.at("top1_agreement");
        row["seconds"] = secs;
        out["rows"].push_back(row);
        const std::string line = "| " + name + " | " + tau + " | " + bits_cells(row) + " | ";
        std::snprintf(buf, sizeof buf, "%.2f | %+.1f%% | %.4f |\n", ppl, 100 * (ppl / ppl0 - 1), e.at("kl_mean").get<double>());
        md << line << buf;
        std::cerr << line << buf;
      }
    }
    if (!svg.empty() && !out["rows"].empty()) std::ofstream(svg) << curve_svg(out["rows"]);
    if (quality) {
      // Realistic row lengths (synthetic, not a trained model): the synthetic benchmark model's
      // expert shapes, up [2816, 1024] (rows of 1024) and down [1024, 2816] (rows of 2816), Gaussian
      // weights, RTN ternary-minmax per row at each threshold; one layer's dictionary.
      const moe::bench::Dims D;
      std::mt19937_64 rng(1);
      std::normal_distribution<float> nd(0.0f, 0.02f);
      std::vector<float> up(static_cast<size_t>(D.I * D.H)), down(static_cast<size_t>(D.H * D.I));
      for (auto& v : up) v = nd(rng);
      for (auto& v : down) v = nd(rng);
      out["synthetic_rows"] = json::array();
      for (const auto& tau : thresholds) {
        const auto spec = moe::quant::parse_codec("ternary:t" + tau);
        const auto eu = moe::quant::rtn(up.data(), D.I, D.H, spec), ed = moe::quant::rtn(down.data(), D.H, D.I, spec);
        const std::vector<const Ternary*> ws = {dynamic_cast<const Ternary*>(eu.get()), dynamic_cast<const Ternary*>(ed.get())};
        json row = coding_breakdown({ws});
        row["model"] = "synthetic gaussian up [2816, 1024] + down [1024, 2816], rtn";
        row["threshold"] = std::stod(tau);
        out["synthetic_rows"].push_back(row);
        const std::string line = "| synthetic (Gaussian, rtn; rows 1024 and 2816) | " + tau + " | " + bits_cells(row) + " | — | — | — |\n";
        md << line;
        std::cerr << line;
      }
    }
    if (speed) {
      // Decode and coding throughput on one synthetic-size expert matrix [2816, 1024] of Gaussian
      // weights, RTN ternary-minmax per row (τ = 0.5).
      moe::bench::Dims D;
      {
        std::mt19937_64 rng(1);
        std::normal_distribution<float> nd(0.0f, 0.02f);
        std::vector<float> w(static_cast<size_t>(D.I * D.H));
        for (auto& v : w) v = nd(rng);
        const auto enc = moe::quant::rtn(w.data(), D.I, D.H, moe::quant::parse_codec("ternary"));
        const auto* t = dynamic_cast<const Ternary*>(enc.get());
        const double params = static_cast<double>(D.I * D.H);
        auto t0 = Clock::now();
        const moe::quant::DictCoded dc = moe::quant::dict_code({t});
        const double code_secs = seconds_since(t0);
        const TernaryDict& d = *dc.weights[0];
        std::vector<float> dst(static_cast<size_t>(D.I * D.H));
        int reps = 0;
        t0 = Clock::now();
        do {
          d.dequantize_rows(0, d.rows(), dst.data());
          ++reps;
        } while (seconds_since(t0) < 1.0);
        const double dict_rate = reps * params / seconds_since(t0);
        reps = 0;
        t0 = Clock::now();
        do {
          t->dequantize_rows(0, t->rows(), dst.data());
          ++reps;
        } while (seconds_since(t0) < 1.0);
        const double tern_rate = reps * params / seconds_since(t0);
        moe::quant::PairStats s;
        moe::quant::add_pair_stats(*t, &s);
        const double bits = static_cast<double>(moe::quant::own_bits(d) + moe::quant::dictionary_bits(*dc.dict)) / params;
        out["decode"] = {{"matrix", {D.I, D.H}},          {"weights", "gaussian, rtn ternary-minmax row, tau 0.5"},
                         {"zero_fraction", static_cast<double>(s.zeros) / static_cast<double>(s.trits)},
                         {"bits_per_param", bits},        {"dictionary_codewords", dc.dict->size()},
                         {"ternary_dict_params_per_second", dict_rate}, {"ternary_params_per_second", tern_rate},
                         {"coding_params_per_second", params / code_secs}};
        std::cerr << "decode (one core): ternary-dict " << dict_rate / 1e6 << " M params/s, packed ternary " << tern_rate / 1e6
                  << " M params/s; coding " << params / code_secs / 1e6 << " M params/s; gaussian [2816, 1024]: "
                  << bits << " bits/param at zero fraction " << out["decode"]["zero_fraction"].get<double>() << "\n";
      }
      // eval tokens/s: bf16, ternary, sub-1-bit synthetic checkpoints.
      const fs::path tokenizer_from = src / "data/models/mixtral-tiny";
      const fs::path text = src / "data/text/calib.txt";
      out["eval_speed"] = json::array();
      for (int64_t L : speed_layers) {
        D.L = L;
        D.V = 4096;
        const fs::path model = tmp / ("synthetic-" + std::to_string(L));
        moe::bench::write_model(model, D);
        for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})
          fs::copy_file(tokenizer_from / f, model / f);
        json row = {{"layers", L}};
        for (const char* kind : {"ternary", "sub1bit"}) {
          std::vector<std::string> a = {tool, "--quiet", "quantize", model.string(), (tmp / kind).string(), "--method", "rtn",
                                        "--codec", "ternary"};
          if (std::string(kind) == "sub1bit") a.push_back("--sub1bit");
          const auto q = moe::bench::run_child(a);
          if (q.status != 0) throw moe::core::Error::internal(std::string("quantize ") + kind + " failed");
          row[std::string(kind) + "_quantize_seconds"] = q.seconds;
          const json rep = json::parse(std::ifstream(tmp / kind / "moe_tool_report.json"));
          row[std::string(kind) + "_expert_bits_per_param"] = rep.at("expert_bits_per_param").at("after");
        }
        for (const auto& [label, dir] : {std::pair<std::string, fs::path>{"bf16", model}, {"ternary", tmp / "ternary"},
                                         {"sub1bit", tmp / "sub1bit"}}) {
          const std::string json_out = (tmp / ("eval-" + label + ".json")).string();
          const auto ev = moe::bench::run_child({"/bin/sh", "-c",
                                                 "'" + tool + "' -q eval '" + dir.string() + "' --text '" + text.string() +
                                                     "' --ctx 128 --max-windows " + std::to_string(speed_windows) +
                                                     " --json > '" + json_out + "'"});
          if (ev.status != 0) throw moe::core::Error::internal("eval " + label + " failed");
          const json e = json::parse(std::ifstream(json_out));
          row[label] = {{"tokens_per_second", e.at("tokens_per_second")}, {"perplexity", e.at("perplexity")},
                        {"seconds", ev.seconds}, {"peak_rss_mb", static_cast<double>(ev.max_rss_kb) / 1024.0}};
          std::cerr << "eval " << label << " (" << L << " layers): " << e.at("tokens_per_second").get<double>()
                    << " tokens/s, peak RSS " << ev.max_rss_kb / 1024 << " MB\n";
        }
        for (const char* kind : {"ternary", "sub1bit"}) fs::remove_all(tmp / kind);
        fs::remove_all(model);
        out["eval_speed"].push_back(row);
      }
    }
  } catch (const moe::core::Error& e) {
    std::cerr << "bench_sub1bit: " << e.what() << "\n";
    exit_code = 1;
  }
  fs::remove_all(tmp);
  out["markdown"] = md.str();
  std::cout << out.dump(2) << "\n";
  return exit_code;
}
