// moe-tool stats show STATS [--layer L] [--json] | stats plot STATS -o DIR
#include <iostream>
#include <optional>

#include "calib/plot.h"
#include "calib/report.h"
#include "calib/stats.h"
#include "command.h"
#include "io/checkpoint.h"

namespace moe::app {

void setup_stats(CLI::App& sub, Handler& handler, const GlobalFlags&) {
  sub.require_subcommand(1);
  struct Opts {
    std::string stats, dir, model;
    int layer = -1;
    int pairs = 5;
    bool json = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* show = sub.add_subcommand("show", "Per-layer expert usage, most similar pairs, load imbalance, super experts");
  show->fallthrough();
  show->add_option("STATS", o->stats, "Stats file written by moe-tool calibrate")->required();
  show->add_option("--layer", o->layer, "Only this layer");
  show->add_option("--pairs", o->pairs, "Most similar pairs to list per matrix (default 5)");
  show->add_flag("--json", o->json, "Print JSON");
  show->add_option("--model", o->model, "Check the stats were computed on this checkpoint (exit 2 if not)");
  show->callback([o, &handler] {
    handler = [o] {
      const auto s = calib::Stats::load(o->stats, false);
      if (!o->model.empty()) s.check_model(io::Checkpoint::open(io::Env::posix(), o->model).fingerprint(), o->stats);
      const auto j = calib::stats_summary(s, o->layer >= 0 ? std::optional<int>(o->layer) : std::nullopt, o->pairs);
      if (o->json) std::cout << j.dump(2) << "\n";
      else std::cout << calib::render_stats_summary(j);
      return 0;
    };
  });
  CLI::App* plot = sub.add_subcommand("plot", "SVG pictures: usage heatmap, similarity matrices, out_absmax");
  plot->fallthrough();
  plot->add_option("STATS", o->stats, "Stats file written by moe-tool calibrate")->required();
  plot->add_option("-o,--output", o->dir, "Folder for the SVG files (created)")->required();
  plot->callback([o, &handler] {
    handler = [o] {
      const auto s = calib::Stats::load(o->stats, false);
      const auto files = calib::plot_stats(s, o->dir);
      std::cout << "wrote " << files.size() << " files to " << o->dir << ":";
      for (const auto& f : files) std::cout << " " << f;
      std::cout << "\n";
      return 0;
    };
  });
}

}  // namespace moe::app
