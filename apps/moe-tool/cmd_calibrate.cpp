// moe-tool calibrate MODEL --text FILE -o STATS: routing statistics over calibration text.
#include <cstdio>
#include <iostream>

#include "calib/calibrate.h"
#include "calib/sha256.h"
#include "calib/stats_file.h"
#include "command.h"
#include "eval/eval.h"
#include "flags.h"
#include "io/output_dir.h"
#include "pipeline/keys.h"
#include "pipeline/recipe.h"
#include "runtime/forward.h"
#include "runtime/mpi.h"
#include "core/error.h"
#include "core/progress.h"
#include "eval/eval.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace moe::app {

void setup_calibrate(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  struct Opts {
    std::string model, out;
    bool json = false, strict_utf8 = false;
    KeyFlags keys;
  };
  auto o = std::make_shared<Opts>();
  sub.add_option("MODEL", o->model, "Checkpoint folder (config.json, safetensors, tokenizer.json)")->required();
  sub.add_option("-o,--output", o->out, "Stats file to write (safetensors)")->required();
  // --text, --ctx, --windows, --batch-windows, --sample, --seed, --gram, --routed-only, --out-stride,
  // --out-cos-tokens, --force: the calibration keys of a recipe (pipeline/keys.def).
  o->keys.declare(sub, "calibrate");
  sub.add_flag("--json", o->json, "Print the result (and errors) as JSON");
  sub.add_flag("--strict-utf8", o->strict_utf8, "Refuse a text that is not valid UTF-8 (default: warn, read U+FFFD)");
  sub.callback([o, &handler, &flags] {
    handler = [o, &flags] {
      if (!o->keys.given("calibration.text")) throw core::Error::invalid("calibrate: --text FILE is required");
      // The same defaults and checks as a recipe's calibration block.
      nlohmann::json keys = {{"calibration", nlohmann::json::object()}};
      o->keys.apply(keys, "calibrate", "");
      const pipeline::CalibrationSpec c = [&] {
        try {
          return pipeline::parse_calibration(keys["calibration"], ".");
        } catch (core::Error& e) {
          throw core::Error(e.kind(), pipeline::with_flag_names(e.message()));
        }
      }();
      const bool force = keys.contains("output") && keys["output"].value("force", false);
      const uint64_t seed = keys.value("seed", int64_t{0}) >= 0 ? static_cast<uint64_t>(keys.value("seed", int64_t{0})) : 0;
      if (keys.value("seed", int64_t{0}) < 0) throw core::Error::invalid("--seed: expected an integer >= 0");
      auto& env = io::Env::posix();
      // Every check before any work: the output (never the model's files or the text, --force to
      // replace), the text, the model.
      io::check_output(o->out, {o->model, c.text}, force, io::OutputKind::File, "--force");
      const std::string text = eval::read_text(c.text, o->strict_utf8);  // errors name the file once
      auto ckpt = io::Checkpoint::open(env, o->model);
      auto model = model::Model::load(ckpt);
      runtime::ForwardSpec::from_model(model);
      auto tok = eval::load_tokenizer(o->model);  // names the folder once
      const auto ids = tok.encode(text, false);
      calib::CalibrateOptions co;
      co.ctx = c.ctx;
      co.windows = c.windows;
      co.batch_windows = c.batch_windows;
      co.gram = c.gram;
      co.routed_only = calib::routed_statistics_only(model, c.routed_only);
      if (co.routed_only && !c.routed_only && !flags.quiet)
        std::fprintf(stderr, "calibrate: %s's router scales each expert's input by its score: routed-token statistics "
                             "only (out_mean / out_cos are not defined for it; as --routed-only)\n",
                     model.family().model_type.c_str());
      co.sample = c.sample == "random" ? calib::Sample::Random : calib::Sample::First;
      co.seed = seed;
      co.out_cos_tokens = c.out_cos_tokens;
      co.out_stride = c.out_stride;
      co.quiet = flags.quiet;
      co.inputs = {o->model, c.text};
      co.force = force;
      const auto plan = calib::plan_calibration(model, static_cast<int64_t>(ids.size()), co);
      // The stats file must fit on its file system (with --gram it can be large): checked before work.
      uint64_t file_bytes = 0;
      for (const auto& t : calib::stats_tensor_plan(plan.layout)) file_bytes += t.nbytes();
      io::check_free_space(o->out, file_bytes, "--output");
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
      // Over MPI ranks (docs/mpi.md): what the expert split exchanged (rank 0's view).
      const auto& world = runtime::mpi::World::get();
      const auto& traffic = world.traffic();
      nlohmann::ordered_json mpi = nullptr;
      if (world.split())
        mpi = {{"ranks", world.size()},
               {"exchanges", traffic.exchanges},
               {"bytes_sent", traffic.bytes_sent},
               {"bytes_gathered", traffic.bytes_gathered},
               {"seconds", traffic.seconds}};
      if (o->json) {
        nlohmann::ordered_json j = {{"output", o->out},
                                    {"tokens", plan.tokens},
                                    {"windows", plan.window_ids.size()},
                                    {"moe_layers", r.stats.layers.size()},
                                    {"bytes", r.file_bytes},
                                    {"seconds", r.seconds},
                                    {"tokens_per_second", tps},
                                    {"super_experts", supers}};
        if (!mpi.is_null()) j["mpi"] = mpi;
        std::cout << j.dump(2) << "\n";
      } else {
        std::cout << "wrote " << o->out << ": " << plan.tokens << " tokens, " << r.stats.layers.size()
                  << " MoE layers, " << core::format_bytes(static_cast<double>(r.file_bytes)) << " in " << r.seconds
                  << " s (" << static_cast<int64_t>(tps) << " tokens/s); super experts:";
        if (supers.empty()) std::cout << " none";
        for (const auto& s : supers) std::cout << " L" << s.at("layer").get<int>() << "/E" << s.at("expert").get<int>();
        std::cout << "\n";
        if (world.split())
          std::cout << "mpi: " << world.size() << " ranks split the routed experts; "
                    << core::format_bytes(static_cast<double>(traffic.bytes_gathered)) << " of expert outputs exchanged in "
                    << traffic.exchanges << " exchanges, " << traffic.seconds << " s\n";
      }
      return 0;
    };
  });
}

}  // namespace moe::app
