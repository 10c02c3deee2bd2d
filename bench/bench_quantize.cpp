// Quantize quality and speed (issue: quantize). Prints JSON, and a Markdown table on stderr.
//   bench_quantize [--source-dir DIR] [--models mixtral-tiny,qwen2moe-tiny,validation-tiny] [--ctx 128]
//                  [--calib-windows 64] [--eval-windows 64] [--quality 1] [--speed 1]
//                  [--speed-layers 2,4] [--speed-windows 8] [--tool path/to/moe-tool]
// Quality: per fixture, the experts at int8/int4/int3/int2 (groups of 128 and whole rows), the
// ternary grids (tq = llama.cpp's TQ1_0/TQ2_0 rule, absmean, minmax = QMoE's), each by RTN and
// GPTQ, ternary with and without the least-squares refit, mixed precision at 2.5 and 2.0 average
// bits; attention alone at int8 and int4. Every row: expert bits per parameter and whole-file
// bits per parameter (every stored byte counted), perplexity and KL against the original on the
// held-out text.
// Speed: `moe-tool quantize` (rtn int4 and gptq int4) as child processes on the synthetic
// mixtral-layout checkpoint (H 1024, 8 experts of width 2816) at two depths: seconds, expert
// parameters per second, bf16 weight bytes read per second, peak RSS (flat when memory is bounded
// by one layer), against `cp` of the input checkpoint.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <unistd.h>
#include <vector>

#include "child_process.h"
#include "core/error.h"
#include "core/progress.h"
#include "pipeline/recipe.h"
#include "pipeline/runner.h"
#include "fixtures.h"
#include "synthetic_mixtral.h"

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> v;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');) v.push_back(x);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  fs::path src = MOE_BENCH_SOURCE_DIR;
  int64_t ctx = 128, calib_windows = 64, eval_windows = 64, speed_windows = 8;
  bool quality = true, speed = true;
  std::vector<std::string> models = {"mixtral-tiny", "qwen2moe-tiny", "validation-tiny"};
  std::vector<int64_t> speed_layers = {2, 4};
  std::string tool = (fs::path(argv[0]).parent_path() / "moe-tool").string();
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--source-dir") src = v;
    else if (k == "--models") models = split(v);
    else if (k == "--ctx") ctx = std::stoll(v);
    else if (k == "--calib-windows") calib_windows = std::stoll(v);
    else if (k == "--eval-windows") eval_windows = std::stoll(v);
    else if (k == "--quality") quality = v != "0";
    else if (k == "--speed") speed = v != "0";
    else if (k == "--speed-windows") speed_windows = std::stoll(v);
    else if (k == "--tool") tool = v;
    else if (k == "--speed-layers") {
      speed_layers.clear();
      for (const auto& x : split(v)) speed_layers.push_back(std::stoll(x));
    } else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  moe::core::Progress::global_quiet() = true;
  const fs::path tmp = fs::temp_directory_path() / ("moe-bench-quantize-" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  json out = {{"benchmark", "quantize"}, {"ctx", ctx}, {"calib_windows", calib_windows},
              {"eval_windows", eval_windows}, {"rows", json::array()}};
  std::ostringstream md;
  md << "| model | method | codec | expert bits/param | file bits/param | perplexity | vs original | KL | top-1 |\n"
        "|---|---|---|---|---|---|---|---|---|\n";
  int exit_code = 0;
  try {
    for (const auto& name : quality ? models : std::vector<std::string>{}) {
      const fs::path model_dir = src / "data/models" / name;
      const fs::path text_dir = moe::bench::fixture_text_dir(src, name);
      auto run = [&](const std::string& method, const std::string& label, json pass) {
        pass["pass"] = "quantize";
        pass["method"] = method;
        json recipe = {{"model", model_dir.string()},
                       {"calibration", {{"text", (text_dir / "calib.txt").string()}, {"ctx", ctx}, {"windows", calib_windows}}},
                       {"passes", json::array({pass})},
                       {"output", {{"path", (tmp / "out").string()}, {"force", true}}},
                       {"eval", {{"text", (text_dir / "heldout.txt").string()}, {"ctx", ctx}, {"max_windows", eval_windows},
                                 {"against_input", true}}}};
        auto r = moe::pipeline::parse_recipe(recipe, ".", "bench");
        moe::pipeline::RunOptions o;
        o.quiet = true;
        const auto t0 = Clock::now();
        const json s = moe::pipeline::run_recipe(r, o);
        const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
        const json report = json::parse(std::ifstream(tmp / "out" / "moe_tool_report.json"));
        const json& e = s.at("eval");
        const double ppl0 = e.at("perplexity_before").get<double>(), ppl = e.at("perplexity_after").get<double>();
        const json& classes = report.at("tensor_classes").at("after");
        double bytes = 0, params = 0;
        for (const auto& [cls, a] : classes.items()) {
          bytes += a.at("bytes").get<double>();
          params += a.at("params").get<double>();
        }
        const double file_bits = 8 * bytes / params;
        const double bits = classes.at("experts").at("bits_per_param").get<double>();
        json row = {{"model", name}, {"method", method}, {"label", label}, {"pass", pass}, {"expert_bits_per_param", bits},
                    {"file_bits_per_param", file_bits}, {"bytes_after", s.at("bytes").at("after")}, {"perplexity", ppl},
                    {"perplexity_original", ppl0}, {"ppl_ratio", ppl / ppl0}, {"kl", e.at("kl_mean")},
                    {"top1", e.at("top1_agreement")}, {"seconds", secs}};
        out["rows"].push_back(row);
        char buf[320];
        std::snprintf(buf, sizeof buf, "| %s | %s | %s | %.3f | %.3f | %.2f | %+.1f%% | %.4f | %.1f%% |\n", name.c_str(),
                      method.c_str(), label.c_str(), bits, file_bits, ppl, 100 * (ppl / ppl0 - 1),
                      e.at("kl_mean").get<double>(), 100 * e.at("top1_agreement").get<double>());
        md << buf;
        std::cerr << buf;
      };
      for (const char* codec : {"int8", "int4", "int3", "int2"})
        for (const char* g : {":g128", ":row"})
          for (const char* m : {"rtn", "gptq"}) run(m, std::string(codec) + g + ":asym", {{"codec", std::string(codec) + g}});
      for (const char* codec : {"ternary-tq", "ternary-absmean", "ternary-minmax", "ternary-absmean:refit", "ternary-minmax:refit"})
        for (const char* m : {"rtn", "gptq"}) run(m, codec, {{"codec", codec}});
      for (double b : {2.5, 2.0})
        run("gptq", "mixed precision, avg " + std::to_string(b).substr(0, 3) + " bits", {{"avg_bits", b}});
      for (const char* codec : {"int8", "int4"})
        run("gptq", std::string("attention only, ") + codec + ":g128:asym",
            {{"experts", "keep"}, {"shared", "keep"}, {"dense", "keep"}, {"attention", codec}});
    }
    if (speed) {
      const fs::path tokenizer_from = src / "data/models/mixtral-tiny";
      const fs::path text = src / "data/text/calib.txt";
      out["speed"] = json::array();
      for (int64_t L : speed_layers) {
        moe::bench::Dims D;
        D.L = L;
        D.V = 4096;  // mixtral-tiny's tokenizer
        const fs::path model = tmp / ("synthetic-" + std::to_string(L));
        const uint64_t bytes = moe::bench::write_model(model, D);
        for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})
          fs::copy_file(tokenizer_from / f, model / f);
        const double expert_params = static_cast<double>(L * D.E * 3 * D.H * D.I);
        json row = {{"layers", L}, {"checkpoint_bytes", bytes}, {"expert_params", expert_params}};
        const auto cp = moe::bench::run_child({"cp", "-r", model.string(), (tmp / "copy").string()});
        fs::remove_all(tmp / "copy");
        row["cp_seconds"] = cp.seconds;
        row["cp_cpu_seconds"] = cp.cpu_seconds;
        for (const char* method : {"rtn", "gptq"}) {
          std::vector<std::string> a = {tool, "--quiet", "quantize", model.string(), (tmp / "q").string(), "--method", method,
                                        "--codec", "int4"};
          if (std::string(method) == "gptq")
            for (const std::string& x : {std::string("--text"), text.string(), std::string("--ctx"), std::string("128"),
                                         std::string("--windows"), std::to_string(speed_windows)})
              a.push_back(x);
          const auto r = moe::bench::run_child(a);
          fs::remove_all(tmp / "q");
          if (r.status != 0) throw moe::core::Error::internal(std::string("quantize ") + method + " failed with status " +
                                                              std::to_string(r.status));
          row[method] = {{"seconds", r.seconds}, {"cpu_seconds", r.cpu_seconds},
                         {"peak_rss_mb", static_cast<double>(r.max_rss_kb) / 1024.0},
                         {"expert_params_per_second", expert_params / r.seconds},
                         {"weight_bytes_read_per_second", 2 * expert_params / r.seconds},
                         {"weight_bytes_read_per_cpu_second", 2 * expert_params / r.cpu_seconds}};
          std::cerr << L << " layers (" << bytes / 1e9 << " GB), " << method << " int4: " << r.seconds << " s, "
                    << r.cpu_seconds << " s CPU ("
                    << expert_params / r.seconds / 1e6 << " M params/s), peak RSS " << r.max_rss_kb / 1024 << " MB; cp "
                    << cp.seconds << " s\n";
        }
        fs::remove_all(model);
        out["speed"].push_back(row);
      }
    }
  } catch (const moe::core::Error& e) {
    std::cerr << "bench_quantize: " << e.what() << "\n";
    exit_code = 1;
  }
  fs::remove_all(tmp);
  out["markdown"] = md.str();
  std::cout << out.dump(2) << "\n";
  return exit_code;
}
