// moe-tool stats show STATS [--layer L] [--json] | stats plot STATS -o DIR
#include <iostream>
#include <optional>

#include "calib/plot.h"
#include "calib/report.h"
#include "calib/stats.h"
#include "command.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "io/output_dir.h"

namespace moe::app {

void setup_stats(CLI::App& sub, Handler& handler, const GlobalFlags&) {
  sub.require_subcommand(1);
  struct Opts {
    std::string stats, dir, model;
    int layer = -1;
    int pairs = 5;
    bool json = false, force = false;
    CLI::Option* layer_opt = nullptr;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* show = sub.add_subcommand("show", "Per-layer expert usage, most similar pairs, load imbalance, super experts");
  show->fallthrough();
  show->add_option("STATS", o->stats, "Stats file written by moe-tool calibrate")->required();
  o->layer_opt = show->add_option("--layer", o->layer, "Only this layer (default: every MoE layer)");
  show->add_option("--pairs", o->pairs, "Most similar pairs to list per matrix (default 5)");
  show->add_flag("--json", o->json, "Print JSON");
  show->add_option("--model", o->model, "Check the stats were computed on this checkpoint (exit 2 if not)");
  show->callback([o, &handler] {
    handler = [o] {
      if (o->layer_opt->count() > 0 && o->layer < 0)
        throw core::Error::invalid("--layer: expected a layer index >= 0, found " + std::to_string(o->layer));
      if (o->pairs < 0) throw core::Error::invalid("--pairs: expected an integer >= 0, found " + std::to_string(o->pairs));
      const auto s = calib::Stats::load(o->stats, false);
      if (o->layer_opt->count() > 0 && !s.layers.count(o->layer)) {
        std::string have;
        for (const auto& [l, st] : s.layers) have += (have.empty() ? "" : ", ") + std::to_string(l);
        throw core::Error::invalid("--layer " + std::to_string(o->layer) + ": no such MoE layer in " + o->stats +
                                   " (layers: " + have + ")");
      }
      if (!o->model.empty()) s.check_model(io::Checkpoint::open(io::Env::posix(), o->model), o->stats);
      const auto j = calib::stats_summary(s, o->layer >= 0 ? std::optional<int>(o->layer) : std::nullopt, o->pairs);
      if (o->json) std::cout << j.dump(2) << "\n";
      else std::cout << calib::render_stats_summary(j);
      return 0;
    };
  });
  CLI::App* plot = sub.add_subcommand("plot", "SVG pictures: usage heatmap, similarity matrices, out_absmax");
  plot->fallthrough();
  plot->add_option("STATS", o->stats, "Stats file written by moe-tool calibrate")->required();
  plot->add_option("-o,--output", o->dir, "Folder for the SVG files (created; written to a temporary sibling and "
                                          "renamed into place)")->required();
  plot->add_flag("--force", o->force, "Replace an existing non-empty output folder");
  plot->callback([o, &handler] {
    handler = [o] {
      // The same rules as every output: not over the input, --force to replace, atomic, nothing
      // left behind on failure.
      io::check_output(o->dir, {o->stats}, o->force, io::OutputKind::Folder);
      const auto s = calib::Stats::load(o->stats, false);
      io::OutputDir out(io::Env::posix(), o->dir, {o->stats}, o->force);
      const auto files = calib::plot_stats(s, out.path());
      out.commit();
      std::cout << "wrote " << files.size() << " files to " << o->dir << ":";
      for (const auto& f : files) std::cout << " " << f;
      std::cout << "\n";
      return 0;
    };
  });
}

}  // namespace moe::app
