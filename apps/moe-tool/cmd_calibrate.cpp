// moe-tool calibrate MODEL --text FILE -o STATS: routing statistics over calibration text.
#include <cstdio>
#include <iostream>

#include "calib/calibrate.h"
#include "calib/sha256.h"
#include "command.h"
#include "core/error.h"
#include "core/progress.h"
#include "eval/eval.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace moe::app {

void setup_calibrate(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  struct Opts {
    std::string model, text, out, sample = "first";
    int64_t ctx = 512, windows = 0, batch = 8, out_cos = 512, out_stride = 16;
    uint64_t seed = 0;
    bool gram = false, routed_only = false, json = false, strict_utf8 = false;
  };
  auto o = std::make_shared<Opts>();
  sub.add_option("MODEL", o->model, "Checkpoint folder (config.json, safetensors, tokenizer.json)")->required();
  sub.add_option("--text", o->text, "Calibration text (UTF-8), tokenized once without BOS/EOS")->required();
  sub.add_option("-o,--output", o->out, "Stats file to write (safetensors)")->required();
  sub.add_option("--ctx", o->ctx, "Window length in tokens (default 512)");
  sub.add_option("--windows", o->windows, "Number of non-overlapping windows (default: every window of the text)");
  sub.add_option("--batch-windows", o->batch, "Windows per forward batch (default 8; results depend on it in the "
                                              "last bits, so it is recorded)");
  sub.add_flag("--gram", o->gram, "Also accumulate fp64 Gram matrices (per expert, dense MLP, attention)");
  sub.add_option("--sample", o->sample, "Which windows: first (default) or random (with --seed)")
      ->check(CLI::IsMember({"first", "random"}));
  sub.add_option("--seed", o->seed, "Seed of --sample random (default 0)");
  sub.add_option("--out-cos-tokens", o->out_cos,
                 "Sampled tokens (from the start of the stream) for out_cos (default 512)");
  sub.add_option("--out-stride", o->out_stride,
                 "Token sample of the statistics that run every expert (out_mean, out_cos): every S-th token of "
                 "the stream (default 16). out_mean = routed tokens exact + S x the sampled tokens for the rest, "
                 "an estimate; 1 = every token through every expert (exact, E/k times the routed expert compute)");
  sub.add_flag("--routed-only", o->routed_only,
               "Skip out_mean and out_cos, the statistics that run every expert on (sampled) tokens");
  sub.add_flag("--strict-utf8", o->strict_utf8, "Refuse a text that is not valid UTF-8 (default: warn, read U+FFFD)");
  sub.add_flag("--json", o->json, "Print the result as JSON");
  sub.callback([o, &handler, &flags] {
    handler = [o, &flags] {
      auto& env = io::Env::posix();
      auto ckpt = io::Checkpoint::open(env, o->model);
      auto model = model::Model::load(ckpt);
      const std::string text = eval::read_text(o->text, o->strict_utf8);  // errors name the file once
      auto tok = eval::load_tokenizer(o->model);  // its errors name the file
      const auto ids = tok.encode(text, false);
      calib::CalibrateOptions co;
      co.ctx = o->ctx;
      co.windows = o->windows;
      co.batch_windows = o->batch;
      co.gram = o->gram;
      co.routed_only = o->routed_only;
      co.sample = o->sample == "random" ? calib::Sample::Random : calib::Sample::First;
      co.seed = o->seed;
      co.out_cos_tokens = o->out_cos;
      co.out_stride = o->out_stride;
      co.quiet = flags.quiet;
      const auto plan = calib::plan_calibration(model, static_cast<int64_t>(ids.size()), co);
      if (!flags.quiet) {
        std::fprintf(stderr,
                     "calibrate: %zu window(s) x %lld tokens = %lld tokens (%lld windows in the text, %zu tokens); "
                     "memory: hidden states %s + largest layer in f32 %s\n",
                     plan.window_ids.size(), static_cast<long long>(co.ctx), static_cast<long long>(plan.tokens),
                     static_cast<long long>(plan.windows_available), ids.size(),
                     core::format_bytes(static_cast<double>(plan.hidden_bytes)).c_str(),
                     core::format_bytes(static_cast<double>(plan.layer_weight_bytes)).c_str());
        if (co.gram)
          std::fprintf(stderr,
                       "calibrate: --gram keeps fp64 Gram matrices of one layer in memory: up to %s (per MoE layer "
                       "E*H^2*8 + sum_e I_e^2*8 bytes, plus H^2*8 + (heads*head_dim)^2*8 for attention); %s in "
                       "total go to the stats file\n",
                       core::format_bytes(static_cast<double>(plan.gram_peak_bytes)).c_str(),
                       core::format_bytes(static_cast<double>(plan.gram_total_bytes)).c_str());
      }
      const auto r = calib::calibrate(ckpt, model, ids, calib::sha256_hex(text), co, o->out);
      nlohmann::ordered_json supers = nlohmann::ordered_json::array();
      for (const auto& [l, st] : r.stats.layers)
        for (size_t e = 0; e < st.super_expert.size(); ++e)
          if (st.super_expert[e]) supers.push_back({{"layer", l}, {"expert", e}});
      const double tps = r.seconds > 0 ? static_cast<double>(plan.tokens) / r.seconds : 0.0;
      if (o->json) {
        nlohmann::ordered_json j = {{"output", o->out},
                                    {"tokens", plan.tokens},
                                    {"windows", plan.window_ids.size()},
                                    {"moe_layers", r.stats.layers.size()},
                                    {"bytes", r.file_bytes},
                                    {"seconds", r.seconds},
                                    {"tokens_per_second", tps},
                                    {"super_experts", supers}};
        std::cout << j.dump(2) << "\n";
      } else {
        std::cout << "wrote " << o->out << ": " << plan.tokens << " tokens, " << r.stats.layers.size()
                  << " MoE layers, " << core::format_bytes(static_cast<double>(r.file_bytes)) << " in " << r.seconds
                  << " s (" << static_cast<int64_t>(tps) << " tokens/s); super experts:";
        if (supers.empty()) std::cout << " none";
        for (const auto& s : supers) std::cout << " L" << s.at("layer").get<int>() << "/E" << s.at("expert").get<int>();
        std::cout << "\n";
      }
      return 0;
    };
  });
}

}  // namespace moe::app
