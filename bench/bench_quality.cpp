// Quality table: perplexity and KL against the original, on the fixtures' held-out text, for every
// prune method and every merge method (with each router option) at 6/8 and 4/8 experts per layer.
// Statistics are computed once per fixture (moe-tool calibrate's code, same windows as the
// recipes) and reused. Prints JSON, and a Markdown table on stderr.
//   bench_quality [--source-dir DIR] [--calib-windows 64] [--eval-windows 0] [--ctx 128]
//                 [--models mixtral-tiny,qwen2moe-tiny]
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

int main(int argc, char** argv) {
  fs::path src = MOE_BENCH_SOURCE_DIR;
  int64_t calib_windows = 64, eval_windows = 0, ctx = 128;
  std::vector<std::string> models = {"mixtral-tiny", "qwen2moe-tiny"};
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--source-dir") src = v;
    else if (k == "--calib-windows") calib_windows = std::stoll(v);
    else if (k == "--eval-windows") eval_windows = std::stoll(v);
    else if (k == "--ctx") ctx = std::stoll(v);
    else if (k == "--models") {
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
  md << "| model | experts | pass | method | router | perplexity | vs original | KL (nats/token) | top-1 agreement |\n"
        "|---|---|---|---|---|---|---|---|---|\n";
  try {
    for (const auto& name : models) {
      const fs::path model_dir = src / "data/models" / name;
      const fs::path stats_path = tmp / (name + ".stats.safetensors");
      // Statistics once per fixture.
      {
        auto& env = moe::io::Env::posix();
        const auto ckpt = moe::io::Checkpoint::open(env, model_dir);
        const auto model = moe::model::Model::load(ckpt);
        const std::string text = moe::eval::read_text(src / "data/text/calib.txt");
        const auto tokens = moe::eval::load_tokenizer(model_dir).encode(text, false);
        moe::calib::CalibrateOptions o;
        o.ctx = ctx;
        o.windows = calib_windows;
        o.quiet = true;
        moe::calib::calibrate(ckpt, model, tokens, moe::calib::sha256_hex(text), o, stats_path);
      }
      struct Config {
        std::string pass, method, router;
      };
      std::vector<Config> configs;
      for (const char* m : {"random", "frequency", "soft", "reap", "enumerate"}) configs.push_back({"prune", m, ""});
      for (const char* m : {"msmoe", "hcsmoe", "submoe"})
        for (const char* r : {"dominant", "mean", "refit"}) configs.push_back({"merge", m, r});
      bool original_row = false;
      for (int64_t experts : {6, 4}) {
        for (const auto& c : configs) {
          json pass = {{"pass", c.pass}, {"method", c.method}};
          if (c.pass == "prune") pass["keep"] = experts;
          else {
            pass["experts"] = experts;
            pass["router"] = c.router;
          }
          json recipe = {{"model", model_dir.string()},
                         {"calibration", {{"text", (src / "data/text/calib.txt").string()}, {"stats", stats_path.string()},
                                          {"ctx", ctx}, {"windows", calib_windows}}},
                         {"passes", json::array({pass})},
                         {"output", {{"path", (tmp / "out").string()}, {"force", true}}},
                         {"eval", {{"text", (src / "data/text/heldout.txt").string()}, {"ctx", ctx},
                                   {"max_windows", eval_windows}, {"against_input", true}}}};
          auto r = moe::pipeline::parse_recipe(recipe, ".", "bench");
          moe::pipeline::RunOptions ro;
          ro.quiet = true;
          ro.command = "bench_quality";
          const auto t0 = std::chrono::steady_clock::now();
          const json s = moe::pipeline::run_recipe(r, ro);
          const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          const json& e = s.at("eval");
          if (!original_row) {
            out["rows"].push_back({{"model", name}, {"experts", 8}, {"pass", "original"}, {"perplexity", e["perplexity_before"]}});
            char buf[160];
            std::snprintf(buf, sizeof buf, "| %s | 8 | original | | | %.2f | | | |\n", name.c_str(), e["perplexity_before"].get<double>());
            md << buf;
            original_row = true;
          }
          const double ppl = e["perplexity_after"].get<double>(), base = e["perplexity_before"].get<double>();
          out["rows"].push_back({{"model", name}, {"experts", experts}, {"pass", c.pass}, {"method", c.method},
                                 {"router", c.router}, {"perplexity", ppl}, {"perplexity_ratio", ppl / base},
                                 {"kl", e["kl_mean"]}, {"top1_agreement", e["top1_agreement"]}, {"seconds", secs},
                                 {"tokens_scored", e["tokens_scored"]}});
          char buf[256];
          std::snprintf(buf, sizeof buf, "| %s | %lld | %s | %s | %s | %.2f | %+.1f%% | %.4f | %.1f%% |\n", name.c_str(),
                        static_cast<long long>(experts), c.pass.c_str(), c.method.c_str(), c.router.c_str(), ppl,
                        100 * (ppl / base - 1), e["kl_mean"].get<double>(), 100 * e["top1_agreement"].get<double>());
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
