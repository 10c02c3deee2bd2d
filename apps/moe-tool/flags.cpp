#include "flags.h"

#include <cmath>

#include "core/error.h"
#include "io/checkpoint_writer.h"

namespace moe::app {

using core::Error;
using pipeline::KeyType;

void KeyFlags::declare(CLI::App& sub, const std::string& command) {
  for (const auto& k : pipeline::recipe_keys()) {
    if (!k.for_command(command)) continue;
    Slot& s = slots_[k.path];
    s.key = &k;
    std::string help = k.help;
    const std::string scope = k.scope;
    const auto colon = scope.find(command + ":");
    if (colon != std::string::npos) {  // method-specific
      std::string methods;
      for (size_t i = scope.find(command + ":"); i != std::string::npos; i = scope.find(command + ":", i + 1)) {
        const size_t b = i + command.size() + 1, e = scope.find(' ', b);
        methods += (methods.empty() ? "" : ", ") + scope.substr(b, e == std::string::npos ? std::string::npos : e - b);
      }
      help = "[" + methods + "] " + help;
    }
    if (k.type == KeyType::Flag || k.type == KeyType::NoFlag) {
      help += std::string(" (recipe key ") + k.path + ", default " + k.dflt + ")";
      s.option = sub.add_flag(k.flag, s.flag, help);
    } else {
      const bool has_default = *k.dflt && std::string(k.dflt) != "-";
      help += std::string(" (recipe key ") + k.path + (has_default ? std::string(", default ") + k.dflt : std::string()) + ")";
      // Every value is collected, so a repeated flag gets this tool's message (value()), not CLI11's.
      s.option = sub.add_option(k.flag, s.texts, help)->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
    }
  }
}

bool KeyFlags::given(const std::string& path) const {
  auto it = slots_.find(path);
  return it != slots_.end() && it->second.option && it->second.option->count() > 0;
}

nlohmann::json KeyFlags::value(const std::string& path) const {
  if (!given(path)) return nullptr;
  const Slot& s = slots_.at(path);
  const std::string flag = s.key->flag;
  if (s.key->type == KeyType::List) return s.texts.size() == 1 ? nlohmann::json(s.texts[0]) : nlohmann::json(s.texts);
  if (s.texts.size() > 1)
    throw Error::invalid(flag + ": given " + std::to_string(s.texts.size()) + " times ('" + s.texts[0] + "', '" + s.texts[1] +
                         "'); give it once");
  const std::string text = s.texts.empty() ? std::string() : s.texts[0];
  switch (s.key->type) {
    // CLI11 also takes --flag=false (and --no-x=false), which sets the variable.
    case KeyType::Flag: return s.flag;
    case KeyType::NoFlag: return !s.flag;
    case KeyType::List:
    case KeyType::String: return text;
    case KeyType::Int: {
      size_t used = 0;
      long long v = 0;
      try {
        v = std::stoll(text, &used);
      } catch (...) {
        used = 0;
      }
      if (used == 0 || used != text.size())
        throw Error::invalid(flag + ": expected an integer, found '" + text + "'");
      return v;
    }
    case KeyType::Number: {
      size_t used = 0;
      double v = 0;
      try {
        v = std::stod(text, &used);
      } catch (...) {
        used = 0;
      }
      if (used == 0 || used != text.size() || !std::isfinite(v))
        throw Error::invalid(flag + ": expected a finite number, found '" + text + "'");
      return v;
    }
  }
  return nullptr;
}

void KeyFlags::apply(nlohmann::json& recipe, const std::string& command, const std::string& method) const {
  for (const auto& [path, s] : slots_) {
    if (!given(path)) continue;
    if (!s.key->for_method(command, method)) {
      std::string takes;
      const std::string scope = s.key->scope;
      for (size_t i = scope.find(command + ":"); i != std::string::npos; i = scope.find(command + ":", i + 1)) {
        const size_t b = i + command.size() + 1, e = scope.find(' ', b);
        takes += (takes.empty() ? "" : ", ") + scope.substr(b, e == std::string::npos ? std::string::npos : e - b);
      }
      throw Error::invalid(std::string(s.key->flag) + ": applies to --method " + takes + ", not " + method);
    }
    nlohmann::json v = value(path);
    std::string p = path;
    nlohmann::json* cur = &recipe;
    if (p.rfind("passes[0].", 0) == 0) {
      cur = &recipe["passes"][0];
      p = p.substr(10);
    }
    for (size_t dot = p.find('.'); dot != std::string::npos; dot = p.find('.')) {
      cur = &(*cur)[p.substr(0, dot)];
      p = p.substr(dot + 1);
    }
    (*cur)[p] = v;
  }
}

void FolderOutputFlags::declare(CLI::App& sub, bool recipe_keys) {
  shard_option_ = sub.add_option("--max-shard-size", shard_,
                                 std::string("Largest safetensors shard, e.g. 5GB, 500MB, 2GiB (") +
                                     (recipe_keys ? "recipe key output.max_shard_size, " : "") + "default 5GB)");
  sub.add_flag("--force", force,
               std::string("Replace a non-empty output folder") +
                   (recipe_keys ? " (recipe key output.force)" : ""));
  sub.add_flag("--json", json, "Print the result (and errors) as JSON");
}

bool FolderOutputFlags::max_shard_size_given() const { return shard_option_ && shard_option_->count() > 0; }

pipeline::HfSinkOptions FolderOutputFlags::sink_options(bool quiet) const {
  pipeline::HfSinkOptions opts;
  opts.quiet = quiet;
  opts.max_shard_bytes = core::with_context("--max-shard-size", [&] { return io::parse_size(shard_); });
  return opts;
}

}  // namespace moe::app
