// moe-tool tokenize MODEL --text FILE: token ids of a text with the model's tokenizer
// (no special tokens added), space separated or as JSON {"ids": [...], "count": N}.
#include <iostream>
#include <nlohmann/json.hpp>

#include "command.h"
#include "eval/eval.h"

namespace moe::app {

void setup_tokenize(CLI::App& sub, Handler& handler, const GlobalFlags&) {
  struct Opts {
    std::string model, text;
    bool json = false, special = false;
  };
  auto o = std::make_shared<Opts>();
  sub.add_option("MODEL", o->model, "Model folder holding tokenizer.json")->required();
  sub.add_option("--text", o->text, "UTF-8 text file")->required();
  sub.add_flag("--add-special", o->special, "Add the tokenizer's special tokens (BOS/EOS)");
  sub.add_flag("--json", o->json, "Print JSON");
  sub.callback([o, &handler] {
    handler = [o] {
      const auto tok = eval::load_tokenizer(o->model);
      const std::string text = eval::read_text(o->text);
      const auto ids = tok.encode(text, o->special);
      if (o->json) {
        nlohmann::json j;
        j["ids"] = ids;
        j["count"] = ids.size();
        std::cout << j.dump() << "\n";
      } else {
        std::string s;
        for (size_t i = 0; i < ids.size(); ++i) {
          if (i) s += ' ';
          s += std::to_string(ids[i]);
        }
        std::cout << s << "\n";
      }
      return 0;
    };
  });
}

}  // namespace moe::app
