// moe-tool tokenize MODEL --text FILE: token ids of a text with the model's tokenizer, space
// separated or as JSON {"ids": [...], "count": N}. As AutoTokenizer(text) and llama-tokenize do by
// default: special tokens added as the tokenizer config says (BOS/EOS; --no-add-special leaves
// them out) and special-token strings in the text parsed (--no-parse-special reads them as text).
#include <iostream>
#include <nlohmann/json.hpp>

#include "command.h"
#include "eval/eval.h"

namespace moe::app {

void setup_tokenize(CLI::App& sub, Handler& handler, const GlobalFlags&) {
  struct Opts {
    std::string model, text;
    bool json = false, add_special = false, no_add_special = false, no_parse_special = false, strict_utf8 = false;
  };
  auto o = std::make_shared<Opts>();
  sub.add_option("MODEL", o->model, "Model folder holding tokenizer.json")->required();
  sub.add_option("--text", o->text, "UTF-8 text file")->required();
  auto* add = sub.add_flag("--add-special", o->add_special,
                           "Add the special tokens the tokenizer config asks for (BOS/EOS; the default)");
  sub.add_flag("--no-add-special", o->no_add_special, "Leave out the special tokens (BOS/EOS) the tokenizer adds")
      ->excludes(add);
  sub.add_flag("--no-parse-special", o->no_parse_special,
               "Read special-token strings in the text (e.g. <|endoftext|>) as plain text, not as their ids");
  sub.add_flag("--strict-utf8", o->strict_utf8, "Refuse a text that is not valid UTF-8 (default: warn, read U+FFFD)");
  sub.add_flag("--json", o->json, "Print JSON");
  sub.callback([o, &handler] {
    handler = [o] {
      const auto tok = eval::load_tokenizer(o->model);
      const std::string text = eval::read_text(o->text, o->strict_utf8);
      const auto ids = tok.encode(text, !o->no_add_special, !o->no_parse_special);
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
