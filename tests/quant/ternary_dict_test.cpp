// ternary-dict (quant/ternary_dict.h): Tunstall dictionaries on a closed-form source, lossless
// coding of every expert tensor of mixtral-tiny quantized ternary, and the decoder's refusals.
#include "quant/ternary_dict.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <set>

#include "core/error.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "quant/codec.h"
#include "quant/registry.h"

namespace moe::quant {
namespace {

using Part = std::shared_ptr<const core::Tensor>;

// Probability of a codeword under an iid symbol source.
double prob(const PairDictionary& d, int64_t c, const std::array<double, 9>& p) {
  double q = 1;
  for (uint8_t s : d.symbols(c)) q *= p[s];
  return q;
}

std::array<double, 9> skewed() {
  // Trits iid: P(0) = 0.885, P(1) = P(2) = 0.0575 (QMoE's figure); pairs are products.
  const double t[3] = {0.885, 0.0575, 0.0575};
  std::array<double, 9> p;
  for (int s = 0; s < 9; ++s) p[static_cast<size_t>(s)] = t[s % 3] * t[s / 3];
  return p;
}

TEST(TernaryDict, TunstallOnASkewedIidSourceIsPrefixCompleteAndExpandsTheMostProbable) {
  const auto p = skewed();
  const auto d = PairDictionary::tunstall(p, 4096);
  EXPECT_EQ(d->size() % 9, 0);
  EXPECT_LE(d->size(), 4096);
  EXPECT_GT(d->size(), 4096 - 9);
  // Complete: the leaves' probabilities sum to 1 (every expanded node has all 9 children).
  double leaves = 0, min_expanded = 1, max_leaf = 0;
  std::set<std::vector<uint8_t>> seen;
  for (int64_t c = 0; c < d->size(); ++c) {
    EXPECT_TRUE(seen.insert(d->symbols(c)).second) << "codeword " << c << " twice";
    EXPECT_LE(d->length(c), kMaxPairs);
    const double q = prob(*d, c, p);
    if (d->leaf(c)) {
      leaves += q;
      if (d->length(c) < kMaxPairs) max_leaf = std::max(max_leaf, q);
    } else {
      min_expanded = std::min(min_expanded, q);
    }
  }
  EXPECT_NEAR(leaves, 1.0, 1e-9);
  // Tunstall: no expandable leaf is more probable than a node that was expanded.
  EXPECT_LE(max_leaf, min_expanded * (1 + 1e-12));
  // The all-zero chain is the most probable path: it reaches the cap.
  bool zero_chain = false;
  for (int64_t k = 0; k < d->size(); ++k)
    zero_chain |= d->symbols(k) == std::vector<uint8_t>(static_cast<size_t>(kMaxPairs), 0);
  EXPECT_TRUE(zero_chain);

  // Greedy parsing of a long sample: round trip, and the mean codeword length is close to the
  // expectation Σ_leaves P(leaf)·len(leaf).
  double expect_len = 0;
  for (int64_t k = 0; k < d->size(); ++k)
    if (d->leaf(k)) expect_len += prob(*d, k, p) * d->length(k);
  std::mt19937_64 rng(7);
  std::discrete_distribution<int> src(p.begin(), p.end());
  std::vector<uint8_t> s(200000);
  for (auto& v : s) v = static_cast<uint8_t>(src(rng));
  std::vector<uint16_t> codes;
  const int64_t n = d->encode(s.data(), static_cast<int64_t>(s.size()), &codes);
  ASSERT_EQ(n, static_cast<int64_t>(codes.size()));
  std::vector<uint8_t> back;
  for (uint16_t k : codes)
    for (uint8_t v : d->symbols(k)) back.push_back(v);
  EXPECT_EQ(back, s);
  EXPECT_NEAR(static_cast<double>(s.size()) / static_cast<double>(n), expect_len, 0.02 * expect_len);
}

TEST(TernaryDict, StoredDictionaryDecodesToTheSameTree) {
  const auto d = PairDictionary::tunstall(skewed(), 65536);
  EXPECT_EQ(d->size(), 65529);
  const PairDictionary back(d->part());
  ASSERT_EQ(back.size(), d->size());
  for (int64_t c = 0; c < d->size(); ++c) ASSERT_EQ(back.symbols(c), d->symbols(c)) << c;
  EXPECT_EQ(PairDictionary::from_part(d->part()), PairDictionary::from_part(d->part()));
}

std::shared_ptr<const Ternary> random_ternary(int64_t rows, int64_t cols, double zero, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<uint8_t> t(static_cast<size_t>(rows * cols));
  for (auto& v : t) {
    const double x = u(rng);
    v = x < zero ? 0 : x < (1 + zero) / 2 ? 1 : 2;
  }
  std::vector<float> lo(static_cast<size_t>(rows)), hi(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) lo[static_cast<size_t>(r)] = -0.5f - 0.25f * static_cast<float>(r), hi[static_cast<size_t>(r)] = 0.75f;
  return Ternary::pack(TernaryGrid::MinMax, 0, false, rows, cols, t.data(), lo.data(), hi.data());
}

void expect_same(const Ternary& t, const TernaryDict& d) {
  ASSERT_EQ(d.rows(), t.rows());
  ASSERT_EQ(d.cols(), t.cols());
  std::vector<uint8_t> a(static_cast<size_t>(t.cols())), b(a.size());
  for (int64_t r = 0; r < t.rows(); ++r) {
    t.trits_row(r, a.data());
    d.trits_row(r, b.data());
    ASSERT_EQ(a, b) << "row " << r;
  }
  std::vector<float> x(static_cast<size_t>(t.rows() * t.cols())), y(x.size());
  t.dequantize_rows(0, t.rows(), x.data());
  d.dequantize_rows(0, d.rows(), y.data());
  EXPECT_EQ(x, y);
}

TEST(TernaryDict, RowCountsTakeTheNarrowestUnsignedType) {
  // 9 codewords (one pair each): a row of 2·c trits takes c codes.
  for (const auto& [cols, dtype] : {std::pair{510, core::DType::U8}, {512, core::DType::U16}}) {
    const auto t = random_ternary(3, cols, 0.8, 5);
    const DictCoded dc = dict_code({t.get()}, 9);
    for (const auto& p : dc.weights[0]->parts())
      if (p.role == "counts") {
        EXPECT_EQ(p.tensor->dtype(), dtype) << cols;
      }
    expect_same(*t, *dc.weights[0]);
    const auto s = dc.weights[0]->slice_rows(1, 3);
    expect_same(*std::dynamic_pointer_cast<const Ternary>(t->slice_rows(1, 3)), dynamic_cast<const TernaryDict&>(*s));
  }
}

TEST(TernaryDict, OddRowsSlicesAndEmptyRowsRoundTrip) {
  for (int64_t cols : {1, 7, 64, 129}) {
    const auto t = random_ternary(9, cols, 0.8, static_cast<uint64_t>(cols));
    const DictCoded dc = dict_code({t.get()}, 512);
    expect_same(*t, *dc.weights[0]);
    const auto s = dc.weights[0]->slice_rows(2, 7);
    const auto ts = std::dynamic_pointer_cast<const Ternary>(t->slice_rows(2, 7));
    expect_same(*ts, dynamic_cast<const TernaryDict&>(*s));
  }
  const auto t = random_ternary(3, 0, 0.8, 1);
  const DictCoded dc = dict_code({t.get()}, 512);
  EXPECT_EQ(dc.codes, 0);
  expect_same(*t, *dc.weights[0]);
}

TEST(TernaryDict, EveryExpertTensorOfMixtralTinyDecodesToItsTernaryCodes) {
  const auto m = model::Model::load(
      io::Checkpoint::open(io::Env::posix(), std::filesystem::path(MOE_SOURCE_DIR) / "data/models/mixtral-tiny"));
  const CodecSpec c = parse_codec("ternary-minmax:row");
  int checked = 0;
  for (const auto& layer : m.layers()) {
    std::vector<std::shared_ptr<const Ternary>> tern;
    for (const auto& e : layer.moe->experts)
      for (const core::Tensor* w : {&e.gate, &e.up, &e.down}) {
        const std::vector<float> v = w->to_f32();
        tern.push_back(std::dynamic_pointer_cast<const Ternary>(rtn(v.data(), w->dim(0), w->dim(1), c)));
        ASSERT_TRUE(tern.back());
      }
    std::vector<const Ternary*> ptrs;
    for (const auto& t : tern) ptrs.push_back(t.get());
    const DictCoded dc = dict_code(ptrs);
    ASSERT_EQ(dc.weights.size(), tern.size());
    int64_t bits = dictionary_bits(*dc.dict), ternary_bits = 0;
    for (size_t i = 0; i < tern.size(); ++i) {
      expect_same(*tern[i], *dc.weights[i]);
      EXPECT_EQ(&dc.weights[i]->dictionary(), dc.dict.get());
      bits += own_bits(*dc.weights[i]);
      for (const auto& part : tern[i]->parts()) ternary_bits += 8 * static_cast<int64_t>(part.tensor->nbytes());
      ++checked;
    }
    // Smaller than the packed trits (1.6 bits per weight) with their levels, everything counted.
    EXPECT_LT(bits, ternary_bits);
  }
  EXPECT_EQ(checked, 4 * 8 * 3);
}

// The parts of a small coded weight, to be broken one at a time.
struct Parts {
  Part codes, counts, levels, dict;
  int64_t cols;
};

Parts small_parts() {
  const auto t = random_ternary(4, 33, 0.7, 3);
  const DictCoded dc = dict_code({t.get()}, 256);
  Parts p;
  for (const auto& part : dc.weights[0]->parts()) {
    if (part.role == "codes") p.codes = part.tensor;
    if (part.role == "counts") p.counts = part.tensor;
    if (part.role == "levels") p.levels = part.tensor;
    if (part.role == "dictionary") p.dict = part.tensor;
  }
  p.cols = 33;
  return p;
}

Part edited(const Part& t, int64_t i, int64_t v) {
  auto c = std::make_shared<core::Tensor>(core::Tensor::zeros(t->dtype(), t->shape()));
  std::memcpy(c->mutable_data(), t->data(), t->nbytes());
  if (t->dtype() == core::DType::U8) {
    c->mutable_data()[i] = static_cast<uint8_t>(v);
  } else if (t->dtype() == core::DType::U16) {
    const uint16_t x = static_cast<uint16_t>(v);
    std::memcpy(c->mutable_data() + 2 * i, &x, 2);
  } else {
    const int32_t x = static_cast<int32_t>(v);
    std::memcpy(c->mutable_data() + 4 * i, &x, 4);
  }
  return c;
}

std::string decode_error(const Parts& p) {
  std::map<std::string, StoredPart> parts = {
      {"codes", {p.codes, false}}, {"counts", {p.counts, false}}, {"levels", {p.levels, false}}, {"dictionary", {p.dict, true}}};
  try {
    decode({{"encoding", "ternary-dict"}, {"cols", p.cols}}, parts);
  } catch (const core::Error& e) {
    EXPECT_EQ(e.kind(), core::ErrorKind::Corruption) << e.message();
    return e.message();
  }
  return "";
}

TEST(TernaryDict, DecoderRefusesBrokenPartsNamingThePart) {
  const Parts ok = small_parts();
  EXPECT_EQ(decode_error(ok), "");
  auto has = [](const std::string& msg, const std::string& want) {
    EXPECT_NE(msg.find(want), std::string::npos) << "message: " << msg << "\nwanted: " << want;
  };
  ASSERT_EQ(ok.counts->dtype(), core::DType::U8);  // rows of 17 pairs: the narrowest type
  const int64_t rows = ok.counts->numel();
  auto cnt = [&](int64_t r) { return static_cast<int64_t>(ok.counts->data()[r]); };
  {  // A row's codes running past its row: the first code of row 1 moved into row 0.
    Parts p = ok;
    p.counts = edited(edited(ok.counts, 0, cnt(0) + 1), 1, cnt(1) - 1);
    has(decode_error(p), "part \"codes\": row 0 runs past its end");
  }
  {  // A row left short (its last code counted with the next row).
    Parts p = ok;
    p.counts = edited(edited(ok.counts, 0, cnt(0) - 1), 1, cnt(1) + 1);
    has(decode_error(p), "part \"codes\": row 0 decodes to ");
  }
  {  // Counts summing past the stream.
    Parts p = ok;
    p.counts = edited(ok.counts, rows - 1, cnt(rows - 1) + 5);
    has(decode_error(p), "part \"counts\": rows 0..3 count");
  }
  {  // Counts summing short of the stream.
    Parts p = ok;
    p.counts = edited(ok.counts, rows - 1, cnt(rows - 1) - 1);
    has(decode_error(p), "part \"counts\": the rows count");
  }
  {  // A signed or float count type.
    Parts p = ok;
    p.counts = ok.levels;
    has(decode_error(p), "part \"counts\": expected U8, U16 or U32 [rows]");
  }
  {  // A codeword id beyond the dictionary.
    Parts p = ok;
    p.codes = edited(ok.codes, 0, 60000);
    has(decode_error(p), "part \"codes\": code 60000 at 0 (row 0) is beyond the dictionary");
  }
  {  // A dictionary entry longer than the cap: a chain of 15 expansions of child 0.
    Parts p = ok;
    auto d = std::make_shared<core::Tensor>(core::Tensor::zeros(core::DType::U16, {16}));
    for (int k = 1; k < 16; ++k) {
      const uint16_t v = static_cast<uint16_t>(9 * (k - 1) + 1);
      std::memcpy(d->mutable_data() + 2 * k, &v, 2);
    }
    p.dict = d;
    has(decode_error(p), "part \"dictionary\": entry 14 makes codewords of 15 pairs, longer than the cap of 14");
  }
  {  // A dictionary entry naming a codeword not created yet, and one expanded twice.
    Parts p = ok;
    p.dict = edited(ok.dict, 1, 10);
    has(decode_error(p), "part \"dictionary\": entry 1 expands codeword 9, not created");
    p.dict = edited(ok.dict, 1, 0);
    has(decode_error(p), "part \"dictionary\": entry 1 expands the root a second time");
  }
  {  // Wrong dtypes and shapes.
    Parts p = ok;
    p.codes = ok.counts;
    has(decode_error(p), "part \"codes\": expected U16");
    p = ok;
    p.levels = ok.codes;
    has(decode_error(p), "part \"levels\": expected F16");
    p = ok;
    p.cols = 40;
    has(decode_error(p), "decodes to 17 pairs, expected 20");
  }
}

}  // namespace
}  // namespace moe::quant
