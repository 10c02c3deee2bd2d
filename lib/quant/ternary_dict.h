// Sub-1-bit ternary weights (QMoE, Frantar & Alistarh 2023, "QMoE: Practical Sub-1-Bit
// Compression of Trillion-Parameter Models"), encoding "ternary-dict": the trits of a
// one-group-per-row ternary weight (quant/ternary.h; 0 = zero, 1 = the row's lo, 2 = its hi),
// dictionary-coded.
//
//   symbols    pairs of trits of a row, s = t[2i] + 3·t[2i+1] (9 symbols); an odd row's last
//              trit is paired with a 0 trit, dropped when decoding (it must be 0)
//   dictionary a Tunstall tree over the 9 symbols: starting from the root, the most probable
//              leaf (iid pair probabilities of what is coded) is expanded into its 9 children
//              until the dictionary is full; sequences are capped at kMaxPairs = 14 pairs.
//              Every node except the root is a codeword: codeword 9k + s is child s of the k-th
//              expanded node. Stored as the list of expanded nodes (U16 [K]: entry k = id + 1 of
//              the k-th expanded codeword, 0 = the root, which is expanded first), 9·K ≤ 65536
//              codewords in 2·K bytes
//   codes      greedy longest match per row: from the root, follow the row's symbols while the
//              node is expanded; emit the node reached. U16 [n], all rows one after another
//   counts     U8, U16 or U32 [rows] (the narrowest that holds the largest): row r's number of
//              codes; row r's codes start at offset(r) = counts[0] + ... + counts[r-1], the
//              prefix sums computed (and checked against the stream's length) when read, so each
//              row stays randomly accessible. (8 bits a row where rows need ≤ 255 codes, instead
//              of i32 offsets' 32: 0.19 bit per parameter less on 128-wide rows.)
//   levels     F16 [rows, 2]: (lo, hi) of the row, the Ternary's scales
// The dictionary is shared by every weight of a layer (one part, stored once); the coder picks
// its size (a power of two of codewords, 2^8 ... 2^16) that stores the layer in the fewest bits.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "core/encoding.h"
#include "core/tensor.h"
#include "quant/ternary.h"

namespace moe::quant {

constexpr int kPairSymbols = 9;
constexpr int kMaxPairs = 14;             // symbols per codeword at most
constexpr int64_t kMaxCodewords = 65536;  // uint16 codes

// A Tunstall dictionary of pair sequences, decoded from (or written as) its stored part.
class PairDictionary {
 public:
  using Part = std::shared_ptr<const core::Tensor>;
  // From the stored part (U16 [K]); Error::corruption naming part "dictionary" when the root is
  // not expanded first, an entry names a codeword not yet created or already expanded, a codeword
  // would be longer than kMaxPairs, or 9·K > kMaxCodewords.
  explicit PairDictionary(Part part);
  // The same, one object per part tensor while any user holds it (weights sharing the part share
  // the decoded tables).
  static std::shared_ptr<const PairDictionary> from_part(const Part& part);
  // Tunstall from symbol counts: expand the most probable leaf (ties: the older node) until one
  // more expansion would pass max_codewords (>= 9) codewords.
  static std::shared_ptr<const PairDictionary> tunstall(const std::array<double, kPairSymbols>& counts,
                                                        int64_t max_codewords);

  PairDictionary(const PairDictionary&) = delete;
  PairDictionary& operator=(const PairDictionary&) = delete;

  int64_t size() const { return static_cast<int64_t>(depth_.size()); }  // codewords
  int64_t expansions() const { return static_cast<int64_t>(expanded_.size()); }
  int length(int64_t c) const { return depth_[static_cast<size_t>(c)]; }  // pairs
  // Codeword c's trits (2·length(c) of them).
  const uint8_t* trits(int64_t c) const { return trits_.data() + c * 2 * kMaxPairs; }
  // Codeword c's nonzero trits: nonzeros(c)[k] = position (bits 0-4) | (trit == 2) << 7, for
  // k < nnz(c) (the decoder writes only these into a zeroed row).
  int nnz(int64_t c) const { return nnz_[static_cast<size_t>(c)]; }
  const uint8_t* nonzeros(int64_t c) const { return nz_.data() + c * 2 * kMaxPairs; }
  // The pair symbols of codeword c, first first.
  std::vector<uint8_t> symbols(int64_t c) const;
  // Codeword c is a leaf (never expanded).
  bool leaf(int64_t c) const { return exp_of_[static_cast<size_t>(c) + 1] < 0; }
  const Part& part() const { return part_; }

  // Greedy longest-match codes of symbols s[0..n) appended to out; returns their count.
  int64_t encode(const uint8_t* s, int64_t n, std::vector<uint16_t>* out) const;

 private:
  PairDictionary() = default;
  void build(const std::vector<int64_t>& parent_plus_one, const char* what);
  Part part_;
  std::vector<int64_t> expanded_;  // node id + 1 of each expansion (0 = root)
  std::vector<int32_t> exp_of_;    // [size + 1]: index of node (id + 1) among expansions, -1 = leaf
  std::vector<uint8_t> depth_;     // per codeword
  std::vector<uint8_t> trits_;     // per codeword, 2·kMaxPairs
  std::vector<uint8_t> nnz_, nz_;  // per codeword: nonzero count; (position, trit) of each, 2·kMaxPairs
};

class TernaryDict final : public core::Encoding {
 public:
  using Part = std::shared_ptr<const core::Tensor>;
  // Parts as stored (see above). Validates everything decoding relies on (Error::corruption naming
  // the part): dtypes and shapes, the counts summing to the stream's length, every code below the
  // dictionary's size, every row decoding to exactly ceil(cols / 2) pairs (a code running past
  // its row, or a row left short), an odd row's padding trit 0.
  TernaryDict(int64_t cols, Part codes, Part counts, Part levels, std::shared_ptr<const PairDictionary> dict);

  // The ternary weight t (one group per row) coded with dict.
  static std::shared_ptr<const TernaryDict> code(const Ternary& t, std::shared_ptr<const PairDictionary> dict);

  std::string name() const override { return "ternary-dict"; }
  nlohmann::json params() const override { return {{"cols", cols()}}; }
  std::vector<core::EncodedPart> parts() const override;
  void dequantize_rows(int64_t r0, int64_t r1, float* dst) const override;
  std::shared_ptr<const core::Encoding> slice_rows(int64_t r0, int64_t r1) const override;
  // The rows' code runs, concatenated in the given order, with their counts and levels (the same
  // dictionary).
  std::shared_ptr<const core::Encoding> take_rows(const std::vector<int64_t>& rows) const override;
  DtypeRule dtype_rule() const override { return DtypeRule::Keep; }

  void trits_row(int64_t r, uint8_t* dst) const;  // dst[cols()]
  int64_t num_codes() const { return codes_->numel(); }
  const PairDictionary& dictionary() const { return *dict_; }

 private:
  // Code i of the stream. The codes tensor may sit at an odd byte offset of its shard, so it is
  // read through memcpy, never through a uint16_t pointer.
  uint16_t code(int64_t i) const {
    uint16_t c;
    std::memcpy(&c, codes_->data() + 2 * i, 2);
    return c;
  }
  int64_t offset(int64_t r) const { return offsets_[static_cast<size_t>(r)]; }
  Part codes_, counts_, levels_;
  std::vector<uint32_t> offsets_;  // [rows + 1], prefix sums of counts
  std::shared_ptr<const PairDictionary> dict_;
};

// Pair-symbol counts of a ternary weight's rows (and its zero trits), as the coder sees them.
struct PairStats {
  std::array<double, kPairSymbols> counts{};
  int64_t trits = 0, zeros = 0;
};
void add_pair_stats(const Ternary& t, PairStats* s);

// Dictionary-codes a set of ternary weights (one group per row each; Error::invalid otherwise)
// with one shared dictionary built from their pair statistics, its size chosen (codewords 2^8,
// 2^9, ..., up to max_codewords) to minimise the stored bits of codes and dictionary.
struct DictCoded {
  std::vector<std::shared_ptr<const TernaryDict>> weights;  // in the order given
  std::shared_ptr<const PairDictionary> dict;
  PairStats stats;
  int64_t codes = 0;  // total codes
};
DictCoded dict_code(const std::vector<const Ternary*>& weights, int64_t max_codewords = kMaxCodewords);

// The candidate dictionaries for these pair counts: Tunstall trees of 2^8, 2^9, ... codewords, up
// to max_codewords (the last one may be smaller than a power of two). The coder keeps the one that
// stores codes and dictionary in the fewest bits.
std::vector<std::shared_ptr<const PairDictionary>> dictionary_candidates(const PairStats& stats,
                                                                         int64_t max_codewords = kMaxCodewords);
// The number of codes greedy longest match emits for t's rows with d (t one group per row).
int64_t count_codes(const Ternary& t, const PairDictionary& d);

// A one-group-per-row ternary weight waiting for a dictionary built over the whole model (the
// quantize pass's dict_scope "model"): it stores and decodes as its Ternary (encoding "ternary",
// parameters plus "dictionary": "model", so that the runner finds it in the manifest) until the
// run has seen every layer; the runner then codes it as ternary-dict with the model's dictionary
// (pipeline/model_dictionary.h). Never read from a checkpoint.
class TernaryDictPending final : public core::Encoding {
 public:
  explicit TernaryDictPending(std::shared_ptr<const Ternary> t);
  std::string name() const override { return t_->name(); }
  nlohmann::json params() const override;
  std::vector<core::EncodedPart> parts() const override { return t_->parts(); }
  void dequantize_rows(int64_t r0, int64_t r1, float* dst) const override { t_->dequantize_rows(r0, r1, dst); }
  std::shared_ptr<const core::Encoding> slice_rows(int64_t r0, int64_t r1) const override;
  std::shared_ptr<const core::Encoding> take_rows(const std::vector<int64_t>& rows) const override;
  DtypeRule dtype_rule() const override { return t_->dtype_rule(); }
  const Ternary& ternary() const { return *t_; }
  // The manifest entry's marker.
  static bool marked(const nlohmann::json& entry);

 private:
  std::shared_ptr<const Ternary> t_;
};

// Whether e's part shapes depend on its values (a ternary-dict code stream, or a weight waiting to
// become one): a pass that moves such weights between positions (prune, merge) cannot plan the
// output shapes from the input's.
bool part_shapes_depend_on_values(const core::Encoding& e);

// Stored bits of codes, counts and levels of w (its own parts), and of a dictionary.
int64_t own_bits(const TernaryDict& w);
inline int64_t dictionary_bits(const PairDictionary& d) { return 16 * d.expansions(); }

}  // namespace moe::quant
