// The recipe's "upcycle" section (passes/upcycle.h: parse_upcycle_section, upcycle_section_keys):
// its keys, their defaults and ranges, paths resolved against the recipe's folder.
#include "core/error.h"
#include "passes/options.h"
#include "passes/upcycle.h"
#include "passes/upcycle/plan.h"

namespace moe::passes {

using core::Error;
using nlohmann::json;
namespace fs = std::filesystem;

const std::vector<std::string>& upcycle_section_keys() {
  static const std::vector<std::string> keys = {"to", "experts", "top_k", "method", "drop_ratio", "segments",
                                                "segmenting", "text", "split_scale", "router", "router_std", "prompts",
                                                "ridge_lambda", "shared_expert", "norm_topk_prob", "sources",
                                                "attention_from"};
  return keys;
}

UpcycleOptions parse_upcycle_section(const json& section, const fs::path& base) {
  Options s(section, "upcycle", "upcycle");
  auto resolve = [&](const std::string& x) {
    const fs::path p(x);
    return p.is_absolute() ? p : (base / p).lexically_normal();
  };
  UpcycleOptions o;
  o.to = s.get_string("to");
  // Counts the written config.json holds: at most the loader's bound on its integers (2^31 - 1,
  // family/config.cpp); the output's size is checked against the free space before writing.
  const int64_t max_count = 2147483647;
  o.experts = s.get_int("experts", 0, 1, max_count);
  if (!s.has("experts")) throw Error::invalid("upcycle.experts: missing (required)");
  o.top_k = s.get_int("top_k", 0, 1, max_count);
  if (!s.has("top_k")) throw Error::invalid("upcycle.top_k: missing (required)");
  o.method = s.get_enum("method", upcycling::methods().front(), upcycling::methods());
  o.drop_ratio = s.get_number("drop_ratio", 0.5, 0.0, 1.0, /*min_open=*/true);
  o.segments = s.get_int("segments", 2, 1, max_count);
  o.segmenting = s.get_enum("segmenting", "random", {"random", "kmeans", "coact"});
  if (auto t = s.opt_string("text")) o.text = resolve(*t);
  o.split_scale = s.get_enum("split_scale", "down", {"down", "cube", "none"});
  o.router = s.get_enum("router", "random", {"random", "hidden", "ridge"});
  o.router_std = s.get_number("router_std", 0.02, 0.0, 1e30);
  if (auto pr = s.opt_string("prompts")) o.prompts = resolve(*pr);
  o.ridge_lambda = s.get_number("ridge_lambda", 1e-2, 0.0, 1e30);
  o.shared_expert = s.get_bool("shared_expert", false);
  o.norm_topk_prob = s.get_bool("norm_topk_prob", true);
  if (auto src = s.opt_string("sources")) {
    std::string list = *src;
    for (size_t i = 0; i <= list.size();) {
      size_t j = list.find(',', i);
      if (j == std::string::npos) j = list.size();
      const std::string item = list.substr(i, j - i);
      if (item.empty()) throw Error::invalid("upcycle.sources: empty path in '" + list + "'");
      o.sources.push_back(resolve(item));
      i = j + 1;
    }
  }
  o.attention = s.get_enum("attention_from", "first", {"first", "mean"});
  s.finish();
  return o;
}

}  // namespace moe::passes
