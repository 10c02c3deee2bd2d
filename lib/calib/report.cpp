#include "calib/report.h"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <sstream>

#include "core/error.h"

namespace moe::calib {

namespace {

nlohmann::ordered_json top_pairs_of(const MatrixF& m, int n) {
  struct P {
    int i, j;
    float v;
  };
  std::vector<P> ps;
  for (int i = 0; i < m.rows(); ++i)
    for (int j = i + 1; j < m.cols(); ++j) ps.push_back({i, j, m(i, j)});
  std::stable_sort(ps.begin(), ps.end(), [](const P& a, const P& b) { return a.v > b.v; });
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (int k = 0; k < n && k < static_cast<int>(ps.size()); ++k)
    out.push_back({{"a", ps[k].i}, {"b", ps[k].j}, {"value", ps[k].v}});
  return out;
}

// "16" -> "16th", "2" -> "2nd", "3" -> "3rd", "11" -> "11th".
std::string ordinal(const std::string& n) {
  const size_t len = n.size();
  const char last = len ? n[len - 1] : '0', tens = len > 1 ? n[len - 2] : '0';
  if (tens == '1') return n + "th";
  return n + (last == '1' ? "st" : last == '2' ? "nd" : last == '3' ? "rd" : "th");
}

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

}  // namespace

nlohmann::ordered_json stats_summary(const Stats& s, std::optional<int> layer, int top_pairs) {
  nlohmann::ordered_json j;
  nlohmann::ordered_json meta = nlohmann::ordered_json::object();
  // Metadata are strings in the file; as JSON, numbers and booleans are numbers and booleans
  // (identifiers such as the fingerprint stay strings even when they look like numbers).
  auto typed = [](const std::string& k, const std::string& v) -> nlohmann::ordered_json {
    if (k == "model_fingerprint" || k == "text_sha256" || k == "tool_version") return v;
    if (v == "true" || v == "false") return v == "true";
    if (!v.empty() && v.find_first_not_of("-0123456789") == std::string::npos && v.size() < 19) {
      try {
        size_t used = 0;
        const long long x = std::stoll(v, &used);
        if (used == v.size()) return x;
      } catch (...) {
      }
    }
    try {
      size_t used = 0;
      const double x = std::stod(v, &used);
      if (used == v.size() && v.find_first_of("0123456789") != std::string::npos) return x;
    } catch (...) {
    }
    return v;
  };
  for (const auto& [k, v] : s.metadata)
    if (k != "window_ids" && k != "model_content") meta[k] = typed(k, v);
  j["file"] = s.source.string();
  j["metadata"] = meta;
  nlohmann::ordered_json supers = nlohmann::ordered_json::array();
  for (const auto& [l, st] : s.layers)
    for (size_t e = 0; e < st.super_expert.size(); ++e)
      if (st.super_expert[e]) supers.push_back({{"layer", l}, {"expert", e}, {"out_absmax", st.out_absmax[e]}});
  j["super_experts"] = supers;
  nlohmann::ordered_json layers = nlohmann::ordered_json::array();
  if (layer) s.layer(*layer, "count");  // throws naming the MoE layers
  for (const auto& [l, st] : s.layers) {
    if (layer && l != *layer) continue;
    const int64_t E = st.num_experts();
    const double csum = std::accumulate(st.count.begin(), st.count.end(), 0.0);
    const double wsum = std::accumulate(st.weight_sum.begin(), st.weight_sum.end(), 0.0);
    // Saliency = count * reap = Σ over routed tokens of gate · ‖output‖ (merge "importance").
    double ssum = 0;
    for (int64_t e = 0; e < st.num_experts(); ++e) ssum += st.count[e] * st.reap[e];
    const double cmax = E ? *std::max_element(st.count.begin(), st.count.end()) : 0.0;
    const double cmean = E ? csum / static_cast<double>(E) : 0.0;
    nlohmann::ordered_json L;
    L["layer"] = l;
    L["tokens"] = st.tokens;
    L["experts"] = E;
    L["top_k"] = st.tokens > 0 ? csum / static_cast<double>(st.tokens) : 0.0;
    L["load_imbalance"] = cmean > 0 ? cmax / cmean : 0.0;
    nlohmann::ordered_json ex = nlohmann::ordered_json::array();
    for (int64_t e = 0; e < E; ++e)
      ex.push_back({{"expert", e},
                    {"count", st.count[e]},
                    {"count_share", csum > 0 ? st.count[e] / csum : 0.0},
                    {"weight_share", wsum > 0 ? st.weight_sum[e] / wsum : 0.0},
                    {"saliency_share", ssum > 0 ? st.count[e] * st.reap[e] / ssum : 0.0},
                    {"prob_mean", st.tokens > 0 ? st.prob_sum[e] / static_cast<double>(st.tokens) : 0.0},
                    {"reap", st.reap[e]},
                    {"out_absmax", st.out_absmax[e]},
                    {"super", static_cast<bool>(st.super_expert[e])}});
    L["expert_usage"] = ex;
    L["similar_by_logit_sim"] = top_pairs_of(st.logit_sim, top_pairs);
    if (st.out_cos.size()) L["similar_by_out_cos"] = top_pairs_of(st.out_cos, top_pairs);
    layers.push_back(L);
  }
  j["layers"] = layers;
  return j;
}

std::string render_stats_summary(const nlohmann::ordered_json& j) {
  std::ostringstream o;
  const auto& m = j.at("metadata");
  auto mv = [&](const char* k) {
    if (!m.contains(k)) return std::string("?");
    return m.at(k).is_string() ? m.at(k).get<std::string>() : m.at(k).dump();
  };
  o << "stats " << j.at("file").get<std::string>() << ": " << mv("family") << ", " << mv("num_layers") << " layers, "
    << mv("tokens") << " tokens (" << mv("windows") << " windows x " << mv("ctx") << ", " << mv("sample");
  if (mv("sample") == "random") o << " seed " << mv("seed");
  o << "), model " << mv("model_fingerprint") << ", text sha256 " << mv("text_sha256").substr(0, 16) << "...";
  if (mv("gram") == "true") o << ", with Gram matrices";
  if (mv("routed_only") == "true") o << ", routed statistics only";
  o << "\n";
  if (mv("routed_only") != "true") {
    // Files made before out_stride was recorded used every token.
    const std::string stride = m.contains("out_stride") ? mv("out_stride") : "1";
    o << "out_mean: ";
    if (stride == "1") o << "every token through every expert";
    else o << "routed tokens exact + every " << ordinal(stride) << " token for the rest";
    o << "; out_cos: first " << mv("out_cos_tokens") << (stride == "1" ? " tokens" : " sampled tokens") << "\n";
  }
  o << "super experts:";
  if (j.at("super_experts").empty()) o << " none";
  for (const auto& s : j.at("super_experts"))
    o << " layer " << s.at("layer").get<int>() << " expert " << s.at("expert").get<int>() << " (out_absmax "
      << fmt("%.4g", s.at("out_absmax").get<double>()) << ");";
  o << "\n";
  for (const auto& L : j.at("layers")) {
    o << "\nlayer " << L.at("layer").get<int>() << ": " << L.at("experts").get<int>() << " experts, top-"
      << fmt("%.3g", L.at("top_k").get<double>()) << ", " << L.at("tokens").get<int64_t>()
      << " tokens, load imbalance (max/mean count) " << fmt("%.3f", L.at("load_imbalance").get<double>()) << "\n";
    o << "  expert   count%  weight%  saliency%        reap  out_absmax  super\n";
    for (const auto& e : L.at("expert_usage")) {
      char b[192];
      std::snprintf(b, sizeof b, "  %6d  %7.2f  %7.2f  %9.2f  %10.4g  %10.4g  %s\n", e.at("expert").get<int>(),
                    100.0 * e.at("count_share").get<double>(), 100.0 * e.at("weight_share").get<double>(),
                    100.0 * e.at("saliency_share").get<double>(), e.at("reap").get<double>(), e.at("out_absmax").get<double>(),
                    e.at("super").get<bool>() ? "yes" : "");
      o << b;
    }
    auto pairs = [&](const char* key, const char* label) {
      if (!L.contains(key)) return;
      o << "  most similar by " << label << ":";
      for (const auto& p : L.at(key))
        o << " " << p.at("a").get<int>() << "-" << p.at("b").get<int>() << " " << fmt("%.4f", p.at("value").get<double>())
          << ";";
      o << "\n";
    };
    pairs("similar_by_logit_sim", "logit_sim");
    pairs("similar_by_out_cos", "out_cos  ");
  }
  return o.str();
}

}  // namespace moe::calib
