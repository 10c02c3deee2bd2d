#include "calib/stats.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "calib/stats_file.h"
#include "core/error.h"
#include "core/warn.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"

namespace moe::calib {

using core::DType;
using core::Error;

namespace {

const char* kMake = "moe-tool calibrate MODEL --text FILE -o STATS";

struct Reader {
  const io::SafetensorsFile& f;
  const io::TensorInfo* find(const std::string& name) const { return f.find(name); }
  const io::TensorInfo& need(const std::string& name) const {
    const auto* i = f.find(name);
    if (!i) throw Error::corruption("tensor " + name + " is missing");
    return *i;
  }
  void check(const io::TensorInfo& i, DType dt, const core::Shape& shape) const {
    if (i.dtype != dt || i.shape != shape)
      throw Error::corruption("tensor " + i.name + " is " + core::dtype_name(i.dtype) + core::shape_str(i.shape) +
                              ", expected " + core::dtype_name(dt) + core::shape_str(shape));
  }
  template <typename T>
  void copy(const io::TensorInfo& i, T* dst) const {
    core::Tensor t = f.tensor(i);
    std::memcpy(dst, t.data(), t.nbytes());
    if constexpr (std::is_floating_point_v<T>) check_finite(i, dst, t.numel());
  }
  // Statistics with NaN or Inf (from a model with non-finite weights, or a damaged file) would
  // make every score, distance and clustering meaningless: refused at load, with the first bad index.
  template <typename T>
  static void check_finite(const io::TensorInfo& i, const T* v, int64_t n) {
    for (int64_t k = 0; k < n; ++k) {
      if (std::isfinite(v[k])) continue;
      std::string where = "index " + std::to_string(k);
      if (i.shape.size() == 2) {
        const int64_t cols = i.shape[1];
        where += " (row " + std::to_string(k / cols) + ", column " + std::to_string(k % cols) + ")";
      }
      if (i.name.find(".experts.") == std::string::npos && !i.shape.empty() && i.name.find(".attn.") == std::string::npos &&
          i.name.find(".mlp.") == std::string::npos)
        where += ", expert " + std::to_string(i.shape.size() == 1 ? k : k / i.shape[1]);
      throw Error::corruption("tensor " + i.name + ": non-finite value " + (std::isnan(v[k]) ? "nan" : "inf") + " at " +
                              where + " (statistics of a model with non-finite weights?)");
    }
  }
  std::vector<double> vec_f64(const std::string& name, int64_t E) const {
    const auto& i = need(name);
    check(i, DType::F64, {E});
    std::vector<double> v(E);
    copy(i, v.data());
    return v;
  }
  template <typename M>
  M mat(const io::TensorInfo& i, DType dt, int64_t r, int64_t c) const {
    check(i, dt, {r, c});
    M m(r, c);
    copy(i, m.data());
    return m;
  }
  // A square F64 matrix of any size.
  MatrixD square(const io::TensorInfo& i) const {
    if (i.shape.size() != 2 || i.shape[0] != i.shape[1])
      throw Error::corruption("tensor " + i.name + " is " + core::shape_str(i.shape) + ", expected a square matrix");
    return mat<MatrixD>(i, DType::F64, i.shape[0], i.shape[1]);
  }
};

// "layers.{l}.rest" -> (l, rest); false for other names.
bool split_layer(const std::string& name, int& l, std::string& rest) {
  const std::string p = "layers.";
  if (name.compare(0, p.size(), p) != 0) return false;
  size_t i = p.size(), j = i;
  while (j < name.size() && std::isdigit(static_cast<unsigned char>(name[j]))) ++j;
  if (j == i || j >= name.size() || name[j] != '.' || j - i > 6) return false;
  l = std::stoi(name.substr(i, j - i));
  rest = name.substr(j + 1);
  return true;
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  if (v.empty()) return 0;
  const double pos = q / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos)), hi = static_cast<size_t>(std::ceil(pos));
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

}  // namespace

std::string Stats::meta(const std::string& key, const std::string& fallback) const {
  auto it = metadata.find(key);
  return it == metadata.end() ? fallback : it->second;
}

Stats Stats::load(const std::filesystem::path& path) { return load(path, true); }

Stats Stats::load(const std::filesystem::path& path, bool with_gram) {
  // The file's own errors (missing, malformed header) name the path already; the frame below adds
  // it to the errors about its contents.
  auto file = io::SafetensorsFile::open(io::Env::posix(), path);
  return core::with_context(path.string(), [&] {
    Stats s;
    s.source = path;
    s.metadata = file->header().metadata;
    if (!s.metadata.count("model_fingerprint"))
      throw Error::invalid(std::string("not a moe-tool stats file (no model_fingerprint in __metadata__); make one with `") +
                           kMake + "`");
    Reader r{*file};
    // Which layers hold what.
    std::map<int, std::vector<const io::TensorInfo*>> by_layer;
    for (const auto& t : file->header().tensors) {
      int l = 0;
      std::string rest;
      if (split_layer(t.name, l, rest)) by_layer[l].push_back(&t);
    }
    for (const auto& [l, infos] : by_layer) {
      const std::string p = "layers." + std::to_string(l) + ".";
      if (const auto* ci = r.find(p + "count")) {
        LayerStats st;
        st.layer = l;
        if (ci->shape.size() != 1) throw Error::corruption("tensor " + ci->name + " is not a vector");
        const int64_t E = ci->shape[0];
        const auto& ti = r.need(p + "tokens");
        r.check(ti, DType::I64, {});
        r.copy(ti, &st.tokens);
        st.count = r.vec_f64(p + "count", E);
        st.prob_sum = r.vec_f64(p + "prob_sum", E);
        st.weight_sum = r.vec_f64(p + "weight_sum", E);
        st.reap = r.vec_f64(p + "reap", E);
        const auto& ai = r.need(p + "out_absmax");
        r.check(ai, DType::F32, {E});
        st.out_absmax.resize(E);
        r.copy(ai, st.out_absmax.data());
        if (const auto* mi = r.find(p + "out_mean")) {
          if (mi->shape.size() != 2) throw Error::corruption("tensor " + mi->name + " is not a matrix");
          st.out_mean = r.mat<MatrixF>(*mi, DType::F32, E, mi->shape[1]);
        }
        st.logit_sim = r.mat<MatrixF>(r.need(p + "logit_sim"), DType::F32, E, E);
        if (const auto* oi = r.find(p + "out_cos")) st.out_cos = r.mat<MatrixF>(*oi, DType::F32, E, E);
        st.coact = r.mat<MatrixD>(r.need(p + "coact"), DType::F64, E, E);
        if (with_gram && r.find(p + "experts.0.gram_in")) {
          for (int64_t e = 0; e < E; ++e) {
            const std::string q = p + "experts." + std::to_string(e) + ".";
            st.gram_in.push_back(r.square(r.need(q + "gram_in")));
            st.gram_mid.push_back(r.square(r.need(q + "gram_mid")));
          }
        }
        st.super_expert.assign(E, false);
        s.layers[l] = std::move(st);
      }
      if (with_gram && r.find(p + "attn.gram_qkv")) {
        LayerGrams g;
        g.layer = l;
        g.attn_qkv = r.square(r.need(p + "attn.gram_qkv"));
        g.attn_o = r.square(r.need(p + "attn.gram_o"));
        if (const auto* mi = r.find(p + "mlp.gram_in")) {
          g.mlp_in = r.square(*mi);
          g.mlp_mid = r.square(r.need(p + "mlp.gram_mid"));
        }
        s.grams[l] = std::move(g);
      }
    }
    if (s.layers.empty()) throw Error::corruption("no layer statistics (no layers.{l}.count tensor)");
    int num_layers = 0;
    try {
      num_layers = std::stoi(s.meta("num_layers", "0"));
    } catch (...) {
      throw Error::corruption("__metadata__ num_layers '" + s.meta("num_layers") + "' is not a number");
    }
    if (num_layers <= 0) num_layers = s.layers.rbegin()->first + 1;
    s.flag_super_experts(num_layers);
    return s;
  });
}

void Stats::save(const std::filesystem::path& path) const {
  auto meta = metadata;
  meta["gram"] = grams.empty() ? "false" : "true";  // e.g. stats loaded without their Gram matrices
  StatsWriter w(io::Env::posix(), path, layout_of(*this), meta);
  std::map<int, bool> done;
  for (const auto& [l, st] : layers) {
    auto g = grams.find(l);
    w.write_layer(l, &st, g == grams.end() ? nullptr : &g->second);
    done[l] = true;
  }
  for (const auto& [l, g] : grams)
    if (!done.count(l)) w.write_layer(l, nullptr, &g);
  w.finish();
}

void Stats::check_model(const std::string& model_fingerprint, const std::filesystem::path& stats_path) const {
  const std::string have = meta("model_fingerprint");
  if (have == model_fingerprint) return;
  throw Error::invalid(stats_path.string() + ": statistics were computed on model fingerprint " + have +
                       " (" + meta("family", "?") + "), but this model's fingerprint is " + model_fingerprint +
                       "; compute matching statistics with `" + kMake + "` on this model");
}

std::string content_digest_text(const std::vector<io::Checkpoint::TensorDigest>& digests) {
  std::string s = kContentDigestVersion;
  s.reserve(s.size() + 8 * digests.size());
  char buf[9];
  for (const auto& d : digests) {
    std::snprintf(buf, sizeof buf, "%08x", static_cast<unsigned>(d.digest));
    s += buf;
  }
  return s;
}

void Stats::check_model(const io::Checkpoint& ckpt, const std::filesystem::path& stats_path) const {
  check_model(ckpt.fingerprint(), stats_path);
  auto it = metadata.find("model_content");
  if (it == metadata.end()) {
    core::warn_once(stats_path.string() + ": made before stats files recorded sampled tensor values (no model_content "
                    "in __metadata__): only the config and the tensor names, dtypes and shapes were checked against "
                    "this model; recompute with `" + std::string(kMake) + "` to check the values too");
    return;
  }
  const std::string& have = it->second;
  const std::string version = kContentDigestVersion;
  if (have.compare(0, version.size(), version) != 0)
    throw Error::invalid(stats_path.string() + ": __metadata__.model_content: unknown sampling \"" +
                         have.substr(0, have.find(':') == std::string::npos ? 16 : have.find(':') + 1) +
                         "\" (this moe-tool reads " + version + "); compute matching statistics with `" + kMake + "`");
  const auto digests = ckpt.content_digests();
  if (have.size() != version.size() + 8 * digests.size())
    throw Error::invalid(stats_path.string() + ": __metadata__.model_content: " +
                         std::to_string((have.size() - version.size()) / 8) + " tensor digests, but the model has " +
                         std::to_string(digests.size()) + " tensors");
  const std::string want = content_digest_text(digests);
  std::vector<std::string> differ;
  for (size_t i = 0; i < digests.size(); ++i)
    if (have.compare(version.size() + 8 * i, 8, want, version.size() + 8 * i, 8) != 0) differ.push_back(digests[i].name);
  if (differ.empty()) return;
  throw Error::invalid(stats_path.string() + ": statistics were computed on a model with this config and these tensor "
                       "shapes but other values: tensor " + differ.front() + " differs in its sampled bytes" +
                       (differ.size() > 1 ? " (and " + std::to_string(differ.size() - 1) + " more of " +
                                                std::to_string(digests.size()) + " tensors)"
                                          : std::string()) +
                       "; compute matching statistics with `" + kMake + "` on this model");
}

const LayerStats& Stats::layer(int l, const std::string& field) const {
  const std::string where = source.empty() ? std::string("statistics") : source.string();
  auto it = layers.find(l);
  if (it == layers.end()) {
    std::string have;
    for (const auto& [k, v] : layers) have += (have.empty() ? "" : ", ") + std::to_string(k);
    throw Error::invalid(where + ": no statistics for layer " + std::to_string(l) + " (MoE layers in the file: " +
                         have + "); compute them with `" + kMake + "` on this model");
  }
  const LayerStats& s = it->second;
  if ((field == "out_mean" || field == "out_cos") && s.out_mean.size() == 0)
    throw Error::invalid(where + ": layer " + std::to_string(l) + " has no " + field +
                         " (the file was made with --routed-only); rerun `" + kMake + "` without --routed-only");
  if (field == "gram_in" || field == "gram_mid") {
    if (s.gram_in.empty()) {
      if (has_gram())
        throw Error::internal(where + ": Gram matrices were not loaded (Stats::load(path, with_gram=false))");
      throw Error::invalid(where + ": layer " + std::to_string(l) + " has no " + field +
                           " (the file was made without --gram); rerun `" + kMake + " --gram`");
    }
  }
  return s;
}

const LayerGrams& Stats::layer_grams(int l, const std::string& field) const {
  const std::string where = source.empty() ? std::string("statistics") : source.string();
  auto it = grams.find(l);
  if (it == grams.end()) {
    if (has_gram() && grams.empty())
      throw Error::internal(where + ": Gram matrices were not loaded (Stats::load(path, with_gram=false))");
    throw Error::invalid(where + ": layer " + std::to_string(l) + " has no " + field +
                         " (the file was made without --gram); rerun `" + kMake + " --gram`");
  }
  if ((field == "mlp_in" || field == "mlp_mid") && it->second.mlp_in.size() == 0)
    throw Error::invalid(where + ": layer " + std::to_string(l) + " is not a dense-MLP layer: no " + field +
                         " (MoE layers have per-expert gram_in/gram_mid)");
  return it->second;
}

Stats::SuperThresholds Stats::super_thresholds() const {
  std::vector<double> all;
  double gmax = 0;
  for (const auto& [l, s] : layers)
    for (float v : s.out_absmax) {
      all.push_back(v);
      gmax = std::max(gmax, double(v));
    }
  return {percentile(all, 99.5), gmax / 10.0};
}

std::vector<bool> Stats::super_flags(const SuperThresholds& th, const LayerStats& s, int layer, int num_layers) {
  std::vector<bool> flags(s.out_absmax.size(), false);
  if (!(static_cast<double>(layer) < 0.75 * num_layers)) return flags;
  for (size_t e = 0; e < s.out_absmax.size(); ++e) {
    const double v = s.out_absmax[e];
    flags[e] = v > th.p99_5 && v > th.tenth_of_max;
  }
  return flags;
}

void Stats::flag_super_experts(int num_layers) {
  const SuperThresholds th = super_thresholds();
  for (auto& [l, s] : layers) s.super_expert = super_flags(th, s, l, num_layers);
}

}  // namespace moe::calib
