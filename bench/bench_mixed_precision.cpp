// Benchmark: time of the per-expert width choice (quant/mixed_precision.h, GLPK's branch and cut)
// at model scale: L layers × E experts (default 64 × 64 = 4096 items) with five widths,
//   ternary 1.6875 (TQ1_0), int2-g128 2.125, int3-g128 3.125, int4-g128 4.125, int8-g128 8.125
// bits/param (bf16 scale per 128 weights). Synthetic, seeded inputs shaped like real ones: the
// loss of an expert at b bits is s_j·4^(−b)·(1 + 0.2·u) (quantisation noise power falls 4× per
// bit; s_j log-uniform over two decades, u uniform), importance is mc_moe_importance(φ, w) with
// φ, w drawn per layer from a Dirichlet-like spread and normalised per layer. Each budget is
// solved two ways:
//   model   one call over all L·E items (layers trade bits with each other)
//   layer   L calls of E items, each layer on its own budget
// The per-layer calls prove optimality; the model-wide call stops at --mip-gap (default 1e-4) or
// --time-limit seconds (default 60): proving optimality over thousands of items can take GLPK
// very long (quant/mixed_precision.h). Prints JSON: per budget and way, best-of-repeat wall
// milliseconds, objective, average bits, status (and the model call's proven gap) and how many
// items took each width.
//   bench_mixed_precision [--layers 64] [--experts 64] [--budget 2.5,3.0,3.5] [--repeat 3] [--seed 1]
//                         [--mip-gap 1e-4] [--time-limit 60]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "quant/mixed_precision.h"

using moe::quant::MixedItem;
using moe::quant::MixedResult;
using moe::quant::WidthOption;
using Clock = std::chrono::steady_clock;

namespace {

std::vector<std::vector<MixedItem>> synthetic_layers(int layers, int experts, const std::vector<WidthOption>& options,
                                                     uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::gamma_distribution<double> gamma(0.5, 1.0);  // uneven routing, as trained routers have
  std::vector<std::vector<MixedItem>> out(static_cast<size_t>(layers));
  for (int l = 0; l < layers; ++l) {
    std::vector<double> freq(static_cast<size_t>(experts)), weight(static_cast<size_t>(experts));
    double fs = 0, ws = 0;
    for (int e = 0; e < experts; ++e) {
      freq[size_t(e)] = gamma(g) + 1e-3;
      weight[size_t(e)] = freq[size_t(e)] * (0.5 + u(g));
      fs += freq[size_t(e)], ws += weight[size_t(e)];
    }
    for (int e = 0; e < experts; ++e) {
      MixedItem it;
      it.name = "layers." + std::to_string(l) + ".experts." + std::to_string(e);
      it.params = 3.0 * 4096 * 14336;  // gate, up, down of a Mixtral-8x7B expert
      it.importance = moe::quant::mc_moe_importance(freq[size_t(e)] / fs, weight[size_t(e)] / ws);
      const double scale = std::pow(10.0, 2 * u(g));
      for (const auto& o : options) it.loss.push_back(scale * std::pow(4.0, -o.bits_per_param) * (1 + 0.2 * u(g)));
      out[size_t(l)].push_back(std::move(it));
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int layers = 64, experts = 64, repeat = 3;
  moe::quant::MixedSolve model_solve{1e-4, 60};
  uint64_t seed = 1;
  std::vector<double> budgets;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--layers") layers = std::stoi(next());
    else if (a == "--experts") experts = std::stoi(next());
    else if (a == "--repeat") repeat = std::stoi(next());
    else if (a == "--seed") seed = std::stoull(next());
    else if (a == "--mip-gap") model_solve.mip_gap = std::stod(next());
    else if (a == "--time-limit") model_solve.time_limit_s = std::stod(next());
    else if (a == "--budget") {
      std::stringstream ss(next());
      for (std::string x; std::getline(ss, x, ',');) budgets.push_back(std::stod(x));
    } else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (budgets.empty()) budgets = {2.5, 3.0, 3.5};
  const std::vector<WidthOption> options = {
      {"ternary", 1.6875}, {"int2-g128", 2.125}, {"int3-g128", 3.125}, {"int4-g128", 4.125}, {"int8-g128", 8.125}};

  nlohmann::ordered_json out;
  out["benchmark"] = "mixed_precision";
  out["layers"] = layers;
  out["experts"] = experts;
  out["items"] = layers * experts;
  out["options"] = nlohmann::ordered_json::array();
  for (const auto& o : options) out["options"].push_back({{"codec", o.codec}, {"bits_per_param", o.bits_per_param}});
  out["model_mip_gap"] = model_solve.mip_gap;
  out["model_time_limit_s"] = model_solve.time_limit_s;
  out["repeat"] = repeat;
  out["seed"] = seed;
  try {
    const auto per_layer = synthetic_layers(layers, experts, options, seed);
    std::vector<MixedItem> all;
    for (const auto& l : per_layer) all.insert(all.end(), l.begin(), l.end());

    auto summary = [&](double best_ms, double objective, double bits_sum, double params, const std::vector<int>& count,
                       const std::string& status) {
      nlohmann::ordered_json s{{"ms", best_ms}, {"objective", objective}, {"avg_bits", bits_sum / params}, {"status", status}};
      nlohmann::ordered_json c;
      for (size_t o = 0; o < options.size(); ++o) c[options[o].codec] = count[o];
      s["items_per_width"] = c;
      return s;
    };

    out["runs"] = nlohmann::ordered_json::array();
    for (double budget : budgets) {
      nlohmann::ordered_json run{{"avg_bits_budget", budget}};
      {  // one call over the model
        double best = 1e300;
        MixedResult r;
        for (int k = 0; k < repeat; ++k) {
          const auto t0 = Clock::now();
          r = moe::quant::choose_widths(all, options, budget, model_solve);
          best = std::min(best, std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
        }
        std::vector<int> count(options.size(), 0);
        for (int c : r.choice) ++count[size_t(c)];
        run["model"] = summary(best, r.objective, r.avg_bits, 1.0, count, r.status);
        run["model"]["gap"] = r.gap;
      }
      {  // one call per layer
        double best = 1e300, objective = 0, bits_sum = 0, params = 0;
        std::vector<int> count(options.size(), 0);
        std::string status = "optimal";
        for (int k = 0; k < repeat; ++k) {
          objective = bits_sum = params = 0;
          std::fill(count.begin(), count.end(), 0);
          const auto t0 = Clock::now();
          for (const auto& l : per_layer) {
            const MixedResult r = moe::quant::choose_widths(l, options, budget);
            objective += r.objective;
            for (size_t j = 0; j < l.size(); ++j) {
              ++count[size_t(r.choice[j])];
              bits_sum += l[j].params * options[size_t(r.choice[j])].bits_per_param;
              params += l[j].params;
            }
            if (r.status != "optimal") status = r.status;
          }
          best = std::min(best, std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
        }
        run["layer"] = summary(best, objective, bits_sum, params, count, status);
      }
      out["runs"].push_back(run);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_mixed_precision: %s\n", e.what());
    return 1;
  }
  std::cout << out.dump(2) << "\n";
  return 0;
}
