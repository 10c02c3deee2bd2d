#include "quant/ternary_dict.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <queue>
#include <string>

#include "core/error.h"
#include "quant/pack.h"

namespace moe::quant {

using core::DType;
using core::Error;
using core::shape_str;

namespace {

std::string found(const std::shared_ptr<const core::Tensor>& t) {
  if (!t) return "nothing";
  return std::string(core::dtype_name(t->dtype())) + " " + shape_str(t->shape());
}

bool plain(const std::shared_ptr<const core::Tensor>& t, DType d) {
  return t && t->valid() && !t->encoding() && t->dtype() == d;
}

template <class T>
T load(const core::Tensor& t, int64_t i) {
  T v;
  std::memcpy(&v, t.data() + i * static_cast<int64_t>(sizeof(T)), sizeof(T));
  return v;
}

}  // namespace

// ---- dictionary -----------------------------------------------------------------------------

void PairDictionary::build(const std::vector<int64_t>& entries, const char* what) {
  const std::string p = std::string(what) + ": ";
  const int64_t K = static_cast<int64_t>(entries.size());
  if (K == 0) throw Error::corruption(p + "empty (the root must be expanded)");
  if (K * kPairSymbols > kMaxCodewords)
    throw Error::corruption(p + std::to_string(K) + " expansions make " + std::to_string(K * kPairSymbols) +
                            " codewords, more than " + std::to_string(kMaxCodewords));
  if (entries[0] != 0) throw Error::corruption(p + "entry 0 is " + std::to_string(entries[0]) + ", expected 0 (the root)");
  const int64_t n = K * kPairSymbols;
  expanded_ = entries;
  exp_of_.assign(static_cast<size_t>(n + 1), -1);
  depth_.assign(static_cast<size_t>(n), 0);
  trits_.assign(static_cast<size_t>(n * 2 * kMaxPairs), 0);
  nnz_.assign(static_cast<size_t>(n), 0);
  nz_.assign(static_cast<size_t>(n * 2 * kMaxPairs), 0);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t e = entries[static_cast<size_t>(k)];
    if (e < 0 || e > k * kPairSymbols)
      throw Error::corruption(p + "entry " + std::to_string(k) + " expands codeword " + std::to_string(e - 1) +
                              ", not created by the " + std::to_string(k) + " expansions before it");
    if (exp_of_[static_cast<size_t>(e)] >= 0)
      throw Error::corruption(p + "entry " + std::to_string(k) + " expands " +
                              (e == 0 ? std::string("the root") : "codeword " + std::to_string(e - 1)) + " a second time");
    const int pd = e == 0 ? 0 : depth_[static_cast<size_t>(e - 1)];
    if (pd >= kMaxPairs)
      throw Error::corruption(p + "entry " + std::to_string(k) + " makes codewords of " + std::to_string(pd + 1) +
                              " pairs, longer than the cap of " + std::to_string(kMaxPairs));
    exp_of_[static_cast<size_t>(e)] = static_cast<int32_t>(k);
    for (int s = 0; s < kPairSymbols; ++s) {
      const int64_t c = k * kPairSymbols + s;
      depth_[static_cast<size_t>(c)] = static_cast<uint8_t>(pd + 1);
      uint8_t* t = trits_.data() + c * 2 * kMaxPairs;
      if (e > 0) std::memcpy(t, trits(e - 1), static_cast<size_t>(2 * pd));
      t[2 * pd] = static_cast<uint8_t>(s % 3);
      t[2 * pd + 1] = static_cast<uint8_t>(s / 3);
      uint8_t* z = nz_.data() + c * 2 * kMaxPairs;
      int m = 0;
      for (int q = 0; q < 2 * (pd + 1); ++q)
        if (t[q]) z[m++] = static_cast<uint8_t>(q | (t[q] == 2 ? 0x80 : 0));
      nnz_[static_cast<size_t>(c)] = static_cast<uint8_t>(m);
    }
  }
}

PairDictionary::PairDictionary(Part part) : part_(std::move(part)) {
  if (!plain(part_, DType::U16) || part_->rank() != 1)
    throw Error::corruption("ternary-dict: part \"dictionary\": expected U16 [expansions], found " + found(part_));
  std::vector<int64_t> e(static_cast<size_t>(part_->numel()));
  for (int64_t k = 0; k < part_->numel(); ++k) e[static_cast<size_t>(k)] = load<uint16_t>(*part_, k);
  build(e, "ternary-dict: part \"dictionary\"");
}

std::shared_ptr<const PairDictionary> PairDictionary::from_part(const Part& part) {
  static std::mutex mu;
  static std::map<const core::Tensor*, std::weak_ptr<const PairDictionary>> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (part) {
    auto it = cache.find(part.get());
    if (it != cache.end())
      if (auto d = it->second.lock(); d && d->part_ == part) return d;
  }
  auto d = std::make_shared<const PairDictionary>(part);
  for (auto it = cache.begin(); it != cache.end();) it = it->second.expired() ? cache.erase(it) : std::next(it);
  cache[part.get()] = d;
  return d;
}

std::shared_ptr<const PairDictionary> PairDictionary::tunstall(const std::array<double, kPairSymbols>& counts,
                                                               int64_t max_codewords) {
  if (max_codewords < kPairSymbols || max_codewords > kMaxCodewords)
    throw Error::invalid("ternary-dict: a dictionary holds 9 to 65536 codewords, asked " + std::to_string(max_codewords));
  double total = 0;
  for (double c : counts) total += c;
  std::array<double, kPairSymbols> p;
  for (int s = 0; s < kPairSymbols; ++s) p[static_cast<size_t>(s)] = total > 0 ? counts[static_cast<size_t>(s)] / total : 1.0 / 9;
  // Leaves that may still be expanded: (probability, −(id + 1)) so that ties take the older node.
  std::priority_queue<std::pair<double, int64_t>> leaves;
  std::vector<double> prob;
  std::vector<int> depth;
  std::vector<int64_t> entries;
  leaves.push({1.0, 0});
  while (!leaves.empty() && static_cast<int64_t>(entries.size() + 1) * kPairSymbols <= max_codewords) {
    const auto [pr, neg] = leaves.top();
    leaves.pop();
    const int64_t e = -neg;
    const int d = e == 0 ? 0 : depth[static_cast<size_t>(e - 1)];
    entries.push_back(e);
    for (int s = 0; s < kPairSymbols; ++s) {
      const double q = pr * p[static_cast<size_t>(s)];
      prob.push_back(q);
      depth.push_back(d + 1);
      if (d + 1 < kMaxPairs) leaves.push({q, -static_cast<int64_t>(prob.size())});
    }
  }
  auto part = std::make_shared<core::Tensor>(core::Tensor::zeros(DType::U16, {static_cast<int64_t>(entries.size())}));
  for (size_t k = 0; k < entries.size(); ++k) {
    const uint16_t v = static_cast<uint16_t>(entries[k]);
    std::memcpy(part->mutable_data() + 2 * k, &v, 2);
  }
  std::shared_ptr<PairDictionary> d(new PairDictionary());
  d->part_ = part;
  d->build(entries, "ternary-dict: dictionary");
  return d;
}

std::vector<uint8_t> PairDictionary::symbols(int64_t c) const {
  std::vector<uint8_t> s(static_cast<size_t>(length(c)));
  const uint8_t* t = trits(c);
  for (size_t i = 0; i < s.size(); ++i) s[i] = static_cast<uint8_t>(t[2 * i] + 3 * t[2 * i + 1]);
  return s;
}

int64_t PairDictionary::encode(const uint8_t* s, int64_t n, std::vector<uint16_t>* out) const {
  int64_t count = 0, i = 0;
  while (i < n) {
    int32_t k = exp_of_[0];
    int64_t c = -1;
    while (i < n && k >= 0) {
      c = int64_t{k} * kPairSymbols + s[i++];
      k = exp_of_[static_cast<size_t>(c + 1)];
    }
    if (out) out->push_back(static_cast<uint16_t>(c));
    ++count;
  }
  return count;
}

// ---- the encoding ---------------------------------------------------------------------------

namespace {
bool counts_dtype(DType d) { return d == DType::U8 || d == DType::U16 || d == DType::U32; }
int64_t rows_of(const std::shared_ptr<const core::Tensor>& counts) {
  return counts && counts->rank() == 1 ? counts->numel() : 0;
}
int64_t pairs_of(int64_t cols) { return (cols + 1) / 2; }
int64_t count_at(const core::Tensor& t, int64_t r) {
  if (t.dtype() == DType::U8) return t.data()[r];
  if (t.dtype() == DType::U16) return load<uint16_t>(t, r);
  return load<uint32_t>(t, r);
}
}  // namespace

TernaryDict::TernaryDict(int64_t cols, Part codes, Part counts, Part levels, std::shared_ptr<const PairDictionary> dict)
    : Encoding(rows_of(counts), cols), codes_(std::move(codes)), counts_(std::move(counts)), levels_(std::move(levels)),
      dict_(std::move(dict)) {
  const std::string p = "ternary-dict: part ";
  if (cols < 0) throw Error::corruption("ternary-dict: cols: expected an integer >= 0, found " + std::to_string(cols));
  if (!dict_) throw Error::corruption(p + "\"dictionary\" missing");
  if (!plain(codes_, DType::U16) || codes_->rank() != 1)
    throw Error::corruption(p + "\"codes\": expected U16 [n], found " + found(codes_));
  if (!counts_ || !counts_->valid() || counts_->encoding() || !counts_dtype(counts_->dtype()) || counts_->rank() != 1)
    throw Error::corruption(p + "\"counts\": expected U8, U16 or U32 [rows], found " + found(counts_));
  const int64_t rows = this->rows(), n = codes_->numel();
  if (!plain(levels_, DType::F16) || levels_->shape() != core::Shape{rows, 2})
    throw Error::corruption(p + "\"levels\": expected F16 [" + std::to_string(rows) + ", 2], found " + found(levels_));
  if (n > static_cast<int64_t>(UINT32_MAX))
    throw Error::corruption(p + "\"codes\": " + std::to_string(n) + " codes, more than 2^32 - 1 in one weight");
  offsets_.assign(static_cast<size_t>(rows + 1), 0);
  int64_t sum = 0;
  for (int64_t r = 0; r < rows; ++r) {
    sum += count_at(*counts_, r);
    if (sum > n)
      throw Error::corruption(p + "\"counts\": rows 0.." + std::to_string(r) + " count " + std::to_string(sum) +
                              " codes, but the code stream has " + std::to_string(n));
    offsets_[static_cast<size_t>(r + 1)] = static_cast<uint32_t>(sum);
  }
  if (sum != n)
    throw Error::corruption(p + "\"counts\": the rows count " + std::to_string(sum) + " codes, but the code stream has " +
                            std::to_string(n));
  const int64_t need = pairs_of(cols), size = dict_->size();
  for (int64_t r = 0; r < rows; ++r) {
    int64_t got = 0;
    for (int64_t i = offset(r); i < offset(r + 1); ++i) {
      const uint16_t ci = code(i);
      if (ci >= size)
        throw Error::corruption(p + "\"codes\": code " + std::to_string(ci) + " at " + std::to_string(i) + " (row " +
                                std::to_string(r) + ") is beyond the dictionary (" + std::to_string(size) + " codewords)");
      got += dict_->length(ci);
      if (got > need)
        throw Error::corruption(p + "\"codes\": row " + std::to_string(r) + " runs past its end: code " + std::to_string(i) +
                                " decodes beyond its " + std::to_string(need) + " pairs");
    }
    if (got != need)
      throw Error::corruption(p + "\"codes\": row " + std::to_string(r) + " decodes to " + std::to_string(got) +
                              " pairs, expected " + std::to_string(need));
    if (cols % 2 == 1) {
      const int64_t last = code(offset(r + 1) - 1);
      if (dict_->trits(last)[2 * dict_->length(last) - 1] != 0)
        throw Error::corruption(p + "\"codes\": row " + std::to_string(r) + ": the padding trit of the odd row is not 0");
    }
  }
}

std::shared_ptr<const TernaryDict> TernaryDict::code(const Ternary& t, std::shared_ptr<const PairDictionary> dict) {
  if (t.ngroups() != 1)
    throw Error::invalid("ternary-dict: codes one group per row, the weight has " + std::to_string(t.ngroups()));
  const int64_t rows = t.rows(), cols = t.cols(), np = pairs_of(cols);
  std::vector<uint8_t> tr(static_cast<size_t>(2 * np), 0), sym(static_cast<size_t>(np));
  std::vector<uint16_t> codes;
  std::vector<int64_t> count(static_cast<size_t>(rows), 0);
  std::vector<float> lv(static_cast<size_t>(2 * rows));
  int64_t most = 0;
  for (int64_t r = 0; r < rows; ++r) {
    t.trits_row(r, tr.data());
    for (int64_t i = 0; i < np; ++i) sym[static_cast<size_t>(i)] = static_cast<uint8_t>(tr[2 * i] + 3 * tr[2 * i + 1]);
    count[static_cast<size_t>(r)] = dict->encode(sym.data(), np, &codes);
    most = std::max(most, count[static_cast<size_t>(r)]);
    if (codes.size() > static_cast<size_t>(UINT32_MAX)) throw Error::invalid("ternary-dict: more than 2^32 codes in one weight");
    lv[static_cast<size_t>(2 * r)] = t.lo(r, 0);
    lv[static_cast<size_t>(2 * r + 1)] = t.hi(r, 0);
  }
  auto c = std::make_shared<core::Tensor>(core::Tensor::zeros(DType::U16, {static_cast<int64_t>(codes.size())}));
  if (!codes.empty()) std::memcpy(c->mutable_data(), codes.data(), codes.size() * 2);
  // Counts in the narrowest unsigned type that holds the largest.
  const DType cd = most <= UINT8_MAX ? DType::U8 : most <= UINT16_MAX ? DType::U16 : DType::U32;
  auto o = std::make_shared<core::Tensor>(core::Tensor::zeros(cd, {rows}));
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t v = static_cast<uint32_t>(count[static_cast<size_t>(r)]);
    if (cd == DType::U8) o->mutable_data()[r] = static_cast<uint8_t>(v);
    else if (cd == DType::U16) {
      const uint16_t h = static_cast<uint16_t>(v);
      std::memcpy(o->mutable_data() + 2 * r, &h, 2);
    } else {
      std::memcpy(o->mutable_data() + 4 * r, &v, 4);
    }
  }
  auto l = std::make_shared<core::Tensor>(core::Tensor::zeros(DType::F16, {rows, 2}));
  core::from_f32(DType::F16, lv.data(), l->mutable_data(), lv.size());
  return std::make_shared<const TernaryDict>(cols, c, o, l, std::move(dict));
}

std::vector<core::EncodedPart> TernaryDict::parts() const {
  return {{"codes", ".codes", codes_, false},
          {"counts", ".counts", counts_, false},
          {"levels", ".levels", levels_, false},
          {"dictionary", ".dict", dict_->part(), true}};
}

void TernaryDict::trits_row(int64_t r, uint8_t* dst) const {
  const int64_t n = cols();
  int64_t j = 0;
  for (int64_t i = offset(r), e = offset(r + 1); i < e; ++i) {
    const uint16_t c = code(i);
    const int64_t m = std::min<int64_t>(2 * dict_->length(c), n - j);
    std::memcpy(dst + j, dict_->trits(c), static_cast<size_t>(m));
    j += m;
  }
}

void TernaryDict::dequantize_rows(int64_t r0, int64_t r1, float* dst) const {
  check_rows(r0, r1);
  // Each codeword's trits are copied whole (a fixed 2·kMaxPairs bytes, the tail overwritten by the
  // next codeword; validated rows decode to exactly their length, and an odd row's padding trit is
  // 0), then the row's trits become levels (trit_levels, as Ternary's do).
  const int64_t n = cols();
  std::vector<uint8_t> t(static_cast<size_t>(n + 2 * kMaxPairs + 1));
  for (int64_t r = r0; r < r1; ++r) {
    uint16_t h[2];
    std::memcpy(h, levels_->data() + 4 * r, 4);
    const float lo = core::f16_to_f32(h[0]), hi = core::f16_to_f32(h[1]);
    int64_t j = 0;
    const int64_t e = offset(r + 1);
    for (int64_t i = offset(r); i < e; ++i) {
      const uint16_t c = code(i);
      std::memcpy(t.data() + j, dict_->trits(c), 2 * kMaxPairs);
      j += 2 * dict_->length(c);
    }
    trit_levels(t.data(), n, lo, hi, dst + (r - r0) * n);
  }
}

std::shared_ptr<const core::Encoding> TernaryDict::slice_rows(int64_t r0, int64_t r1) const {
  check_rows(r0, r1);
  const int64_t b = offset(r0), e = offset(r1);
  auto c = std::make_shared<const core::Tensor>(codes_->slice0(b, e));
  return std::make_shared<TernaryDict>(cols(), c, std::make_shared<const core::Tensor>(counts_->slice0(r0, r1)),
                                       std::make_shared<const core::Tensor>(levels_->slice0(r0, r1)), dict_);
}

std::shared_ptr<const core::Encoding> TernaryDict::take_rows(const std::vector<int64_t>& rows) const {
  int64_t n = 0;
  for (int64_t r : rows) {
    check_rows(r, r + 1);
    n += offset(r + 1) - offset(r);
  }
  core::Tensor codes = core::Tensor::zeros(DType::U16, {n});
  uint8_t* dst = codes.mutable_data();
  for (int64_t r : rows) {
    const size_t bytes = static_cast<size_t>(offset(r + 1) - offset(r)) * sizeof(uint16_t);
    std::memcpy(dst, codes_->data() + static_cast<size_t>(offset(r)) * sizeof(uint16_t), bytes);
    dst += bytes;
  }
  return std::make_shared<TernaryDict>(cols(), std::make_shared<const core::Tensor>(std::move(codes)),
                                       std::make_shared<const core::Tensor>(counts_->take_rows(rows)),
                                       std::make_shared<const core::Tensor>(levels_->take_rows(rows)), dict_);
}

// ---- coding a layer -------------------------------------------------------------------------

void add_pair_stats(const Ternary& t, PairStats* s) {
  const int64_t cols = t.cols(), np = pairs_of(cols);
  std::vector<uint8_t> tr(static_cast<size_t>(2 * np), 0);
  for (int64_t r = 0; r < t.rows(); ++r) {
    t.trits_row(r, tr.data());
    for (int64_t j = 0; j < cols; ++j) s->zeros += tr[static_cast<size_t>(j)] == 0;
    for (int64_t i = 0; i < np; ++i) s->counts[static_cast<size_t>(tr[2 * i] + 3 * tr[2 * i + 1])] += 1;
    s->trits += cols;
  }
}

bool part_shapes_depend_on_values(const core::Encoding& e) {
  return dynamic_cast<const TernaryDict*>(&e) != nullptr || dynamic_cast<const TernaryDictPending*>(&e) != nullptr ||
         e.name() == "delta-ternary";  // its coded stream's length (quant/delta_ternary.h)
}

TernaryDictPending::TernaryDictPending(std::shared_ptr<const Ternary> t) : Encoding(t->rows(), t->cols()), t_(std::move(t)) {
  if (t_->ngroups() != 1)
    throw Error::invalid("ternary-dict: codes one group per row, the weight has " + std::to_string(t_->ngroups()));
}

nlohmann::json TernaryDictPending::params() const {
  nlohmann::json p = t_->params();
  p["dictionary"] = "model";
  return p;
}

bool TernaryDictPending::marked(const nlohmann::json& entry) {
  return entry.is_object() && entry.value("encoding", "") == "ternary" && entry.contains("dictionary") &&
         entry["dictionary"] == "model";
}

std::shared_ptr<const core::Encoding> TernaryDictPending::slice_rows(int64_t r0, int64_t r1) const {
  auto s = std::dynamic_pointer_cast<const Ternary>(t_->slice_rows(r0, r1));
  if (!s) throw Error::internal("ternary-dict: a row slice of a ternary weight is not ternary");
  return std::make_shared<const TernaryDictPending>(s);
}

std::shared_ptr<const core::Encoding> TernaryDictPending::take_rows(const std::vector<int64_t>& rows) const {
  auto s = std::dynamic_pointer_cast<const Ternary>(t_->take_rows(rows));
  if (!s) throw Error::internal("ternary-dict: rows of a ternary weight are not ternary");
  return std::make_shared<const TernaryDictPending>(s);
}

std::vector<std::shared_ptr<const PairDictionary>> dictionary_candidates(const PairStats& stats, int64_t max_codewords) {
  std::vector<std::shared_ptr<const PairDictionary>> out;
  for (int64_t size = std::min<int64_t>(256, max_codewords);; size = std::min(2 * size, max_codewords)) {
    out.push_back(PairDictionary::tunstall(stats.counts, size));
    if (size >= max_codewords) break;
  }
  return out;
}

int64_t count_codes(const Ternary& t, const PairDictionary& d) {
  if (t.ngroups() != 1)
    throw Error::invalid("ternary-dict: codes one group per row, a weight has " + std::to_string(t.ngroups()));
  const int64_t np = pairs_of(t.cols());
  std::vector<uint8_t> tr(static_cast<size_t>(2 * np), 0), sym(static_cast<size_t>(np));
  int64_t n = 0;
  for (int64_t r = 0; r < t.rows(); ++r) {
    t.trits_row(r, tr.data());
    for (int64_t i = 0; i < np; ++i) sym[static_cast<size_t>(i)] = static_cast<uint8_t>(tr[2 * i] + 3 * tr[2 * i + 1]);
    n += d.encode(sym.data(), np, nullptr);
  }
  return n;
}

int64_t own_bits(const TernaryDict& w) {
  int64_t b = 0;
  for (const auto& p : w.parts())
    if (!p.shared) b += 8 * static_cast<int64_t>(p.tensor->nbytes());
  return b;
}

DictCoded dict_code(const std::vector<const Ternary*>& weights, int64_t max_codewords) {
  DictCoded out;
  for (const Ternary* t : weights) {
    if (t->ngroups() != 1)
      throw Error::invalid("ternary-dict: codes one group per row, a weight has " + std::to_string(t->ngroups()));
    add_pair_stats(*t, &out.stats);
  }
  int64_t best_bits = -1;
  for (const auto& d : dictionary_candidates(out.stats, max_codewords)) {
    int64_t codes = 0;
    for (const Ternary* t : weights) codes += count_codes(*t, *d);
    const int64_t bits = 16 * codes + dictionary_bits(*d);
    if (best_bits < 0 || bits < best_bits) best_bits = bits, out.dict = d, out.codes = codes;
  }
  for (const Ternary* t : weights) out.weights.push_back(TernaryDict::code(*t, out.dict));
  return out;
}

}  // namespace moe::quant
