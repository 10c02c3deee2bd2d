#include "pipeline/keys.h"

#include <algorithm>
#include <cctype>
#include <sstream>

namespace moe::pipeline {

namespace {

bool has_word(const std::string& list, const std::string& word) {
  std::istringstream in(list);
  std::string w;
  while (in >> w)
    if (w == word) return true;
  return false;
}

}  // namespace

bool KeyInfo::for_command(const std::string& command) const {
  std::istringstream in(scope);
  std::string w;
  while (in >> w)
    if (w == command || w.rfind(command + ":", 0) == 0) return true;
  return false;
}

bool KeyInfo::for_method(const std::string& command, const std::string& method) const {
  return has_word(scope, command) || has_word(scope, command + ":" + method);
}

std::string KeyInfo::leaf() const {
  const std::string p = path;
  const auto dot = p.rfind('.');
  return dot == std::string::npos ? p : p.substr(dot + 1);
}

const std::vector<KeyInfo>& recipe_keys() {
  static const std::vector<KeyInfo> keys = {
#define STRING KeyType::String
#define INT KeyType::Int
#define NUMBER KeyType::Number
#define FLAG KeyType::Flag
#define NO_FLAG KeyType::NoFlag
#define LIST KeyType::List
#define MOE_KEY(path, flag, type, dflt, scope, help) {path, flag, type, dflt, scope, help},
#include "pipeline/keys.def"
#undef STRING
#undef INT
#undef NUMBER
#undef FLAG
#undef NO_FLAG
#undef LIST
  };
  return keys;
}

std::string with_flag_names(const std::string& message) {
  // Longest paths first, so "eval.ctx" is not taken for a part of a longer key.
  std::vector<const KeyInfo*> keys;
  for (const auto& k : recipe_keys()) keys.push_back(&k);
  std::stable_sort(keys.begin(), keys.end(),
                   [](const KeyInfo* a, const KeyInfo* b) { return std::string(a->path).size() > std::string(b->path).size(); });
  auto ident = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '['; };
  std::string s = message;
  for (const KeyInfo* k : keys) {
    const std::string p = k->path;
    for (size_t i = s.find(p); i != std::string::npos; i = s.find(p, i)) {
      const bool starts = i == 0 || !ident(s[i - 1]);
      const bool ends = i + p.size() >= s.size() || !ident(s[i + p.size()]) ||
                        (s[i + p.size()] == '.' && (i + p.size() + 1 >= s.size() || s[i + p.size() + 1] == ' '));
      // A value of a repeated flag, "passes[0].tensor_type[1]": "--tensor-type #2".
      const size_t close = s.find(']', i + p.size());
      if (starts && k->type == KeyType::List && i + p.size() < s.size() && s[i + p.size()] == '[' && close != std::string::npos &&
          close > i + p.size() + 1 &&
          s.find_first_not_of("0123456789", i + p.size() + 1) == close) {
        const std::string n = std::to_string(std::stoll(s.substr(i + p.size() + 1, close - i - p.size() - 1)) + 1);
        const std::string with = std::string(k->flag) + " #" + n;
        s.replace(i, close + 1 - i, with);
        i += with.size();
        continue;
      }
      if (!starts || !ends) {
        i += p.size();
        continue;
      }
      s.replace(i, p.size(), k->flag);
      i += std::string(k->flag).size();
    }
  }
  return s;
}

}  // namespace moe::pipeline
