#include <iostream>

#include "command.h"
#include "eval/task_subsets.h"
#include "io/checkpoint.h"
#include "model/summary.h"

namespace moe::app {

void setup_inspect(CLI::App& sub, Handler& handler, const GlobalFlags&) {
  struct Opts {
    std::string model;
    bool json = false, tensors = false;
  };
  auto o = std::make_shared<Opts>();
  sub.add_option("MODEL", o->model, "Checkpoint folder (config.json + safetensors)")->required();
  sub.add_flag("--json", o->json, "Print JSON");
  sub.add_flag("--tensors", o->tensors, "List every tensor with dtype, shape and shard");
  sub.callback([o, &handler] {
    handler = [o] {
      auto ckpt = io::Checkpoint::open(io::Env::posix(), o->model);
      auto model = model::Model::load(ckpt);
      auto s = model::summarize(ckpt, model, o->tensors);
      // What stats files are checked against (io::Checkpoint::fingerprint).
      s["fingerprint"] = ckpt.fingerprint();
      // Task subsets (prune --tasks): each task's experts per MoE layer.
      std::string tasks_text;
      if (const auto t = eval::task_subsets_from_report(ckpt.dir())) {
        nlohmann::json keep = nlohmann::json::object();
        for (const auto& name : t->names) {
          nlohmann::json counts = nlohmann::json::array();
          for (const auto& l : t->layers) counts.push_back(l.keep.at(name).size());
          keep[name] = counts;
          tasks_text += "  " + name + ": experts per MoE layer " + counts.dump() + "\n";
        }
        s["tasks"] = {{"names", t->names}, {"experts_per_layer", keep}};
        tasks_text = "tasks (eval --task NAME, convert --task NAME):\n" + tasks_text;
      }
      if (o->json) std::cout << s.dump(2) << "\n";
      else std::cout << model::render_summary(s) << tasks_text;
      return 0;
    };
  });
}

}  // namespace moe::app
