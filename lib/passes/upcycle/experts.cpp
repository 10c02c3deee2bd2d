// Expert initialisation (passes/upcycle/experts.h): seeded draws, Drop-Upcycling, the split
// segments (random, balanced k-means, co-activation) and the scaled / averaged tensors.
#include "passes/upcycle/experts.h"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>

#include "core/error.h"
#include "eval/eval.h"
#include "io/checkpoint.h"
#include "passes/clustering.h"
#include "passes/options.h"
#include "runtime/forward.h"
#include "tokenizer/tokenizer.h"

namespace moe::passes::upcycling {

using core::Error;
using core::Tensor;
using nlohmann::json;
namespace fs = std::filesystem;

// splitmix64 of a seed and a salt (layer, expert, purpose): independent streams per use.
uint64_t mix(uint64_t seed, uint64_t a, uint64_t b, uint64_t c) {
  uint64_t z = seed;
  for (uint64_t v : {a, b, c}) {
    z += 0x9E3779B97F4A7C15ull * (v + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
  }
  return z;
}

double Normal::operator()() {
  if (has) {
    has = false;
    return spare;
  }
  double u1 = unit_double(rng());
  const double u2 = unit_double(rng());
  if (u1 < 1e-300) u1 = 1e-300;
  const double r = std::sqrt(-2.0 * std::log(u1)), t = 2.0 * M_PI * u2;
  spare = r * std::sin(t);
  has = true;
  return r * std::cos(t);
}

namespace {

std::vector<float> f32(const Tensor& t) { return t.to_f32(); }

std::pair<double, double> mean_std(const std::vector<float>& v) {
  double s = 0, s2 = 0;
  for (float x : v) s += x;
  const double mu = s / static_cast<double>(v.size());
  for (float x : v) s2 += (x - mu) * (x - mu);
  return {mu, std::sqrt(s2 / static_cast<double>(v.size()))};
}

}  // namespace

// Drop-Upcycling: re-draw rows `idx` of gate/up [I,H] and columns `idx` of down [H,I].
model::Mlp drop_expert(const model::Mlp& dense, double r, uint64_t seed) {
  const int64_t I = dense.gate.dim(0), H = dense.gate.dim(1);
  std::vector<int64_t> perm(static_cast<size_t>(I));
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937_64 rng(seed);
  const int64_t n = std::max<int64_t>(1, static_cast<int64_t>(std::llround(r * static_cast<double>(I))));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = i + static_cast<int64_t>(rng() % static_cast<uint64_t>(I - i));
    std::swap(perm[i], perm[j]);
  }
  Normal z(mix(seed, 7));
  auto redraw_rows = [&](const Tensor& t) {
    std::vector<float> v = f32(t);
    const auto [mu, sd] = mean_std(v);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < H; ++h) v[perm[i] * H + h] = static_cast<float>(mu + sd * z());
    return Tensor::from_f32(v, t.shape()).converted(t.dtype());
  };
  model::Mlp m;
  m.gate = redraw_rows(dense.gate);
  m.up = redraw_rows(dense.up);
  std::vector<float> d = f32(dense.down);
  const auto [mu, sd] = mean_std(d);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < H; ++h) d[h * I + perm[i]] = static_cast<float>(mu + sd * z());
  m.down = Tensor::from_f32(d, dense.down.shape()).converted(dense.down.dtype());
  return m;
}

namespace {

// Balanced k-means of the rows of X [I, d] into G groups of I/G: k-means centres, then every
// (row, centre) pair by ascending distance, a row going to its nearest centre that has room.
std::vector<std::vector<int64_t>> balanced_kmeans(const MatrixXdRM& X, int64_t G, uint64_t seed) {
  const int64_t I = X.rows(), S = I / G;
  std::vector<std::vector<int64_t>> seg(static_cast<size_t>(G));
  const Groups groups = kmeans(X, static_cast<int>(G), seed);
  Eigen::MatrixXd C = Eigen::MatrixXd::Zero(G, X.cols());
  for (int64_t c = 0; c < G; ++c) {
    for (int i : groups[c]) C.row(c) += X.row(i);
    C.row(c) /= static_cast<double>(std::max<size_t>(1, groups[c].size()));
  }
  std::vector<std::tuple<double, int64_t, int64_t>> pairs;
  pairs.reserve(static_cast<size_t>(I * G));
  for (int64_t i = 0; i < I; ++i)
    for (int64_t c = 0; c < G; ++c) pairs.emplace_back((X.row(i) - C.row(c)).squaredNorm(), i, c);
  std::sort(pairs.begin(), pairs.end());
  std::vector<bool> done(static_cast<size_t>(I), false);
  for (const auto& [d, i, c] : pairs) {
    if (done[i] || static_cast<int64_t>(seg[c].size()) >= S) continue;
    seg[c].push_back(i);
    done[i] = true;
  }
  return seg;
}

// Rows of X L2-normalised (a zero row stays zero).
void normalise_rows(MatrixXdRM& X) {
  for (Eigen::Index i = 0; i < X.rows(); ++i) {
    const double n = X.row(i).norm();
    if (n > 0) X.row(i) /= n;
  }
}

}  // namespace

// Segments of the I neurons into G groups of I/G (sorted indices each): random, balanced k-means
// on normalised gate rows, or on `coact` (co-activation: per neuron its |activation| over the
// calibration tokens, normalised).
std::vector<std::vector<int64_t>> segments(const model::Mlp& dense, int64_t G, const std::string& how, uint64_t seed,
                                           const MatrixXdRM* coact) {
  const int64_t I = dense.gate.dim(0), H = dense.gate.dim(1), S = I / G;
  std::vector<std::vector<int64_t>> seg(static_cast<size_t>(G));
  if (how == "random" || G == 1) {
    std::vector<int64_t> order(static_cast<size_t>(I));
    std::iota(order.begin(), order.end(), 0);
    std::mt19937_64 rng(seed);
    for (int64_t i = I - 1; i > 0; --i) std::swap(order[i], order[static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1))]);
    for (int64_t g = 0; g < G; ++g) seg[g].assign(order.begin() + g * S, order.begin() + (g + 1) * S);
  } else if (how == "coact") {
    seg = balanced_kmeans(*coact, G, seed);
  } else {
    const std::vector<float> g = f32(dense.gate);
    MatrixXdRM X(I, H);
    for (int64_t i = 0; i < I; ++i)
      for (int64_t h = 0; h < H; ++h) X(i, h) = g[i * H + h];
    normalise_rows(X);
    seg = balanced_kmeans(X, G, seed);
  }
  for (auto& s : seg) std::sort(s.begin(), s.end());
  return seg;
}

// Expert of one segment: rows of gate/up, columns of down, scaled (gate, up, down factors).
model::Mlp segment_expert(const model::Mlp& dense, const std::vector<int64_t>& idx, double sg, double su, double sd) {
  const int64_t I = dense.gate.dim(0), H = dense.gate.dim(1), S = static_cast<int64_t>(idx.size());
  auto rows = [&](const Tensor& t, double s) {
    const std::vector<float> v = f32(t);
    std::vector<float> o(static_cast<size_t>(S * H));
    for (int64_t r = 0; r < S; ++r)
      for (int64_t h = 0; h < H; ++h) o[r * H + h] = static_cast<float>(v[idx[r] * H + h] * s);
    return Tensor::from_f32(o, {S, H}).converted(t.dtype());
  };
  const std::vector<float> d = f32(dense.down);
  std::vector<float> o(static_cast<size_t>(H * S));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t r = 0; r < S; ++r) o[h * S + r] = static_cast<float>(d[h * I + idx[r]] * sd);
  return {rows(dense.gate, sg), rows(dense.up, su), Tensor::from_f32(o, {H, S}).converted(dense.down.dtype())};
}

Tensor scaled(const Tensor& t, double s) {
  if (s == 1.0) return t;
  std::vector<float> v = f32(t);
  for (auto& x : v) x = static_cast<float>(x * s);
  return Tensor::from_f32(v, t.shape()).converted(t.dtype());
}

Tensor mean_of(const std::vector<const Tensor*>& ts) {
  std::vector<double> acc(static_cast<size_t>(ts.front()->numel()), 0.0);
  for (const Tensor* t : ts) {
    const std::vector<float> v = f32(*t);
    for (size_t i = 0; i < v.size(); ++i) acc[i] += v[i];
  }
  std::vector<float> o(acc.size());
  for (size_t i = 0; i < acc.size(); ++i) o[i] = static_cast<float>(acc[i] / static_cast<double>(ts.size()));
  return Tensor::from_f32(o, ts.front()->shape()).converted(ts.front()->dtype());
}

namespace {

// Per source and layer, |silu(gate x) * up x| of every neuron over the first kCoactTokens tokens
// of the text (windows of 128), as rows [I, tokens], L2-normalised: neurons that fire on the same
// tokens are close.
constexpr int64_t kCoactTokens = 512, kCoactWindow = 128;

class CoactObserver : public runtime::Observer {
 public:
  explicit CoactObserver(std::vector<MatrixXdRM>& out) : out_(out) {}
  bool wants_dense_mlp_trace() const override { return true; }
  void on_dense_mlp(int layer, const runtime::DenseMlpTrace& t) override {
    MatrixXdRM X = t.h.cast<double>().cwiseAbs().transpose();
    normalise_rows(X);
    out_[static_cast<size_t>(layer)] = std::move(X);
  }

 private:
  std::vector<MatrixXdRM>& out_;
};

}  // namespace

void compute_coact(Plan& p) {
  const auto tok = eval::load_tokenizer(p.src.front().dir);  // a folder's tokenizer.json, or a GGUF's keys
  std::vector<int32_t> ids = tok.encode(io::Env::posix().read_text(p.o.text), false, false);
  if (ids.size() < 2) throw Error::invalid(p.o.text.string() + ": the calibration text tokenizes to fewer than 2 tokens");
  int64_t T = std::min<int64_t>(kCoactWindow, static_cast<int64_t>(ids.size()));
  const int64_t n = std::min<int64_t>(kCoactTokens, static_cast<int64_t>(ids.size())) / T * T;
  ids.resize(static_cast<size_t>(n));
  for (const auto& s : p.src) {
    std::vector<MatrixXdRM> feats(static_cast<size_t>(p.L));
    CoactObserver obs(feats);
    runtime::Observer* ob[] = {&obs};
    runtime::Forward(*s.model).run(ids, T, ob);
    p.coact.push_back(std::move(feats));
  }
}

}  // namespace moe::passes::upcycling
