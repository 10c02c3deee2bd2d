// Quality table: perplexity and KL against the original, on the fixtures' held-out text, for every
// prune method and every merge method (with each router option) at 6/8 and 4/8 experts per layer.
// Statistics are computed once per fixture (moe-tool calibrate's code, same windows as the
// recipes) and reused. Prints JSON, and a Markdown table on stderr.
//   bench_quality [--source-dir DIR] [--calib-windows 64] [--eval-windows 0] [--ctx 128]
//                 [--models mixtral-tiny,qwen2moe-tiny,validation-tiny] [--random-seeds 8]
//                 [--methods random,reap,search,dern] [--search-budget 120] [--variants novices,no-uniform]
// --methods runs only the listed methods' default rows (merges: router mean, default options; no
// two-pass rows): a few rows of the table without rerunning all of it; --search-budget: the
// time_budget of prune search in seconds. --variants runs only the rows of the listed prune
// variants (with --methods: of those methods): "novices" (prune --novices, MoNE constants) and
// "no-uniform" (--keep-ratio experts/8 with ragged per-layer counts, native format).
// Random pruning is reported as the mean over seeds 0..N-1 (one draw is noise: on the fixtures
// single seeds range over tens of percent); every other row says whether it beats that mean.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "calib/calibrate.h"
#include "calib/sha256.h"
#include "core/error.h"
#include "core/progress.h"
#include "eval/eval.h"
#include "io/checkpoint.h"
#include "pipeline/recipe.h"
#include "pipeline/runner.h"

namespace fs = std::filesystem;
using nlohmann::json;

// The fixtures' texts: validation-tiny (the validation fixture, data/README.md) has its own corpus
// and tokenizer in data/text-validation; the others share data/text.
static fs::path fixture_text_dir(const fs::path& src, const std::string& name) {
  return src / (name == "validation-tiny" ? "data/text-validation" : "data/text");
}

int main(int argc, char** argv) {
  fs::path src = MOE_BENCH_SOURCE_DIR;
  int64_t calib_windows = 64, eval_windows = 0, ctx = 128;
  int random_seeds = 8;
  double search_budget = 120;
  std::vector<std::string> only;      // --methods: empty = every row
  std::vector<std::string> variants;  // --variants: empty = the rows without a variant
  std::vector<std::string> models = {"mixtral-tiny", "qwen2moe-tiny", "validation-tiny"};
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--source-dir") src = v;
    else if (k == "--calib-windows") calib_windows = std::stoll(v);
    else if (k == "--eval-windows") eval_windows = std::stoll(v);
    else if (k == "--ctx") ctx = std::stoll(v);
    else if (k == "--random-seeds") random_seeds = std::max(1, std::stoi(v));
    else if (k == "--search-budget") search_budget = std::stod(v);
    else if (k == "--variants") {
      std::stringstream ss(v);
      for (std::string x; std::getline(ss, x, ',');) variants.push_back(x);
    } else if (k == "--methods") {
      std::stringstream ss(v);
      for (std::string x; std::getline(ss, x, ',');) only.push_back(x);
    } else if (k == "--models") {
      models.clear();
      std::stringstream ss(v);
      for (std::string x; std::getline(ss, x, ',');) models.push_back(x);
    } else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  moe::core::Progress::global_quiet() = true;
  const fs::path tmp = fs::temp_directory_path() / "moe-bench-quality";
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  json out = {{"benchmark", "quality"}, {"ctx", ctx}, {"calib_windows", calib_windows}, {"rows", json::array()}};
  std::ostringstream md;
  md << "| model | experts | pass | method | router / options | perplexity | vs original | KL (nats/token) | top-1 agreement |\n"
        "|---|---|---|---|---|---|---|---|---|\n";
  try {
    for (const auto& name : models) {
      const fs::path model_dir = src / "data/models" / name;
      const fs::path stats_path = tmp / (name + ".stats.safetensors");
      const fs::path text_dir = fixture_text_dir(src, name);
      // Statistics once per fixture.
      {
        auto& env = moe::io::Env::posix();
        const auto ckpt = moe::io::Checkpoint::open(env, model_dir);
        const auto model = moe::model::Model::load(ckpt);
        const std::string text = moe::eval::read_text(text_dir / "calib.txt");
        const auto tokens = moe::eval::load_tokenizer(model_dir).encode(text, false);
        moe::calib::CalibrateOptions o;
        o.ctx = ctx;
        o.windows = calib_windows;
        o.quiet = true;
        moe::calib::calibrate(ckpt, model, tokens, moe::calib::sha256_hex(text), o, stats_path);
      }
      // Random pruning is a distribution, not one draw: it runs with seeds 0..random_seeds-1 and
      // its row gives the mean (perplexity, KL, top-1) with the perplexity range. Merges run with
      // each router option (neurons aligned, saliency importance: the defaults), and with the
      // default router once more with "importance": "frequency" (the papers' weights) and "soft",
      // hcsmoe/submoe with "align": false (the papers' plain average), and with
      // protect_super_experts.
      struct Config {
        std::string pass, method, router;
        bool no_align = false, protect = false;
        std::string importance = "";  // "": the default
        bool after_reap6 = false;     // a two-pass recipe: prune reap 8 -> 6 first (4/8 rows only)
        std::string variant = "";     // prune: "novices" (MoNE) or "no-uniform" (ragged keep_ratio)
      };
      std::vector<Config> configs;
      for (const char* m : {"random", "frequency", "soft", "reap", "enumerate", "search"}) configs.push_back({"prune", m, ""});
      for (const char* m : {"msmoe", "hcsmoe", "submoe"}) {
        for (const char* r : {"dominant", "mean", "refit"}) configs.push_back({"merge", m, r});
        for (const char* imp : {"frequency", "soft"}) configs.push_back({"merge", m, "mean", false, false, imp});
        if (std::string(m) != "msmoe") configs.push_back({"merge", m, "mean", true});
        configs.push_back({"merge", m, "mean", false, true});
      }
      // DERN: retained experts keep their own router rows (no router option).
      configs.push_back({"merge", "dern", ""});
      configs.push_back({"merge", "dern", "", false, false, "frequency"});
      // Two-pass recipes at 4/8: REAP 8 -> 6, then the method 6 -> 4 on statistics recomputed on
      // the 6 experts left.
      configs.push_back({"prune", "reap", "", false, false, "", true});
      for (const char* m : {"msmoe", "hcsmoe", "submoe"}) configs.push_back({"merge", m, "mean", false, false, "", true});
      // Prune variants that write the native format only: novices (MoNE constants for the
      // pruned experts) and ragged per-layer counts from a global keep ratio.
      for (const char* v : {"novices", "no-uniform"})
        for (const char* m : {"frequency", "reap"}) configs.push_back({"prune", m, "", false, false, "", false, v});
      std::erase_if(configs, [&](const Config& c) {
        if (variants.empty()) return false;
        return std::find(variants.begin(), variants.end(), c.variant) == variants.end();
      });
      if (!only.empty())
        std::erase_if(configs, [&](const Config& c) {
          const bool listed = std::find(only.begin(), only.end(), c.method) != only.end();
          const bool defaults = (c.router.empty() || c.router == "mean") && !c.no_align && !c.protect &&
                                c.importance.empty() && !c.after_reap6 &&
                                (c.variant.empty() || !variants.empty());
          return !listed || !defaults;
        });
      bool original_row = false;
      for (int64_t experts : {6, 4}) {
        double random_mean = 0;
        bool random_ran = false;
        for (const auto& c : configs) {
          if (c.after_reap6 && experts != 4) continue;
          const int runs = c.method == "random" ? random_seeds : 1;
          double ppl = 0, kl = 0, top1 = 0, secs = 0, lo = 1e300, hi = 0, base = 0;
          json per_seed = json::array(), last_layers;
          int64_t scored = 0;
          for (int seed = 0; seed < runs; ++seed) {
            json pass = {{"pass", c.pass}, {"method", c.method}};
            if (c.pass == "prune" && c.variant == "no-uniform") {
              pass["keep_ratio"] = static_cast<double>(experts) / 8.0;
              pass["uniform"] = false;
            } else if (c.pass == "prune") {
              pass["keep"] = experts;
              if (c.variant == "novices") pass["novices"] = true;
            } else {
              pass["experts"] = experts;
              if (!c.router.empty()) pass["router"] = c.router;
              if (c.no_align) pass["align"] = false;
              if (c.protect) pass["protect_super_experts"] = true;
              if (!c.importance.empty()) pass["importance"] = c.importance;
            }
            if (c.method == "random") pass["seed"] = seed;
            if (c.method == "search") pass["time_budget"] = search_budget;
            json recipe = {{"model", model_dir.string()},
                           {"calibration", {{"text", (text_dir / "calib.txt").string()}, {"stats", stats_path.string()},
                                            {"ctx", ctx}, {"windows", calib_windows}}},
                           {"passes", c.after_reap6 ? json::array({{{"pass", "prune"}, {"method", "reap"}, {"keep", 6}}, pass})
                                                    : json::array({pass})},
                           {"output", {{"path", (tmp / "out").string()}, {"force", true}}},
                           {"eval", {{"text", (text_dir / "heldout.txt").string()}, {"ctx", ctx}, {"against_input", true}}}};
            if (eval_windows > 0) recipe["eval"]["max_windows"] = eval_windows;  // 0: all windows
            auto r = moe::pipeline::parse_recipe(recipe, ".", "bench");
            moe::pipeline::RunOptions ro;
            ro.quiet = true;
            ro.command = "bench_quality";
            const auto t0 = std::chrono::steady_clock::now();
            const json s = moe::pipeline::run_recipe(r, ro);
            secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            const json& e = s.at("eval");
            last_layers = json::array();
            for (const auto& l : s.at("layers"))
              if (l.contains("passes") && !l.at("passes").empty()) {
                json p = l.at("passes").back();
                p.erase("scores");
                p.erase("starts");
                last_layers.push_back(p);
              }
            base = e.at("perplexity_before").get<double>();
            if (!original_row) {
              out["rows"].push_back({{"model", name}, {"experts", 8}, {"pass", "original"}, {"perplexity", base}});
              char buf[160];
              std::snprintf(buf, sizeof buf, "| %s | 8 | original | | | %.2f | | | |\n", name.c_str(), base);
              md << buf;
              original_row = true;
            }
            const double p = e.at("perplexity_after").get<double>();
            per_seed.push_back(p);
            ppl += p / runs;
            kl += e.at("kl_mean").get<double>() / runs;
            top1 += e.at("top1_agreement").get<double>() / runs;
            lo = std::min(lo, p);
            hi = std::max(hi, p);
            scored = e.at("tokens_scored").get<int64_t>();
          }
          if (c.method == "random") {
            random_mean = ppl;
            random_ran = true;
          }
          const std::string router = c.variant + c.router + (c.importance.empty() ? "" : (c.router.empty() ? "importance: " : ", importance: ") + c.importance) +
                                     (c.no_align ? ", align: false" : "") + (c.protect ? ", protect super experts" : "");
          const std::string pass_label = c.after_reap6 ? "prune reap 6, then " + c.pass : c.pass;
          json row = {{"model", name}, {"experts", experts}, {"pass", pass_label}, {"method", c.method},
                      {"router", c.router}, {"perplexity", ppl}, {"perplexity_ratio", ppl / base},
                      {"kl", kl}, {"top1_agreement", top1}, {"seconds", secs}, {"tokens_scored", scored}};
          if (c.method == "search") row["search_layers"] = last_layers;
          if (!c.variant.empty()) {
            row["variant"] = c.variant;
            json per_layer = json::array();
            for (const auto& l : last_layers) per_layer.push_back(l.contains("kept") ? l.at("kept").size() : l.at("experts").size());
            row["experts_per_layer"] = per_layer;
          }
          if (c.pass == "merge" && c.method != "msmoe" && c.method != "dern") row["align"] = !c.no_align;
          if (c.pass == "merge" && c.method != "dern") row["protect_super_experts"] = c.protect;
          if (c.pass == "merge") row["importance"] = c.importance.empty() ? "saliency" : c.importance;
          if (runs > 1) {
            row["seeds"] = runs;
            row["perplexity_per_seed"] = per_seed;
            row["perplexity_min"] = lo;
            row["perplexity_max"] = hi;
          } else {
            if (random_ran) row["beats_random_mean"] = ppl < random_mean;
          }
          out["rows"].push_back(row);
          char pbuf[96];
          if (runs > 1) std::snprintf(pbuf, sizeof pbuf, "%.2f (mean of %d seeds; %.2f–%.2f)", ppl, runs, lo, hi);
          else std::snprintf(pbuf, sizeof pbuf, "%.2f", ppl);
          char buf[384];
          std::snprintf(buf, sizeof buf, "| %s | %lld | %s | %s | %s | %s | %+.1f%% | %.4f | %.1f%% |\n", name.c_str(),
                        static_cast<long long>(experts), pass_label.c_str(), c.method.c_str(), router.c_str(), pbuf,
                        100 * (ppl / base - 1), kl, 100 * top1);
          md << buf;
          std::fprintf(stderr, "%s", buf);
        }
      }
    }
  } catch (const moe::core::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.message().c_str());
    return 2;
  }
  fs::remove_all(tmp);
  std::cerr << "\n" << md.str();
  std::cout << out.dump(2) << std::endl;
  return 0;
}
