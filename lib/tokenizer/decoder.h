// tokenizer.json "decoder": turns token strings back into text. Steps run as HF decode_chain over
// the list of token strings, then the pieces are concatenated. Supported:
//   Sequence, ByteLevel (bytes_to_unicode inverse, then lossy UTF-8), Replace (String or Regex
//   pattern), ByteFallback (<0xNN> runs -> bytes; an invalid UTF-8 run -> one U+FFFD per byte),
//   Fuse (join all), Strip (remove up to `start` leading / `stop` trailing `content` chars per
//   token), Metaspace (replacement -> " ", dropped in the first token unless prepend_scheme never).
// A null decoder joins the tokens with " " (HF default).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moe::tokenizer {

class Decoder {
 public:
  static Decoder parse(const nlohmann::json& j, const std::string& path);

  std::string decode(std::vector<std::string> tokens) const;

  struct Step;

 private:
  std::vector<std::shared_ptr<const Step>> steps_;
  bool present_ = false;
};

}  // namespace moe::tokenizer
