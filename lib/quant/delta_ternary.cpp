#include "quant/delta_ternary.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "core/error.h"

namespace moe::quant {

using core::Error;

namespace {

constexpr int kMaxRiceK = 30;

int64_t base_dim(const DeltaTernary::Part& p, int d) { return p && p->valid() && p->rank() == 2 ? p->dim(d) : 0; }

class BitWriter {
 public:
  explicit BitWriter(std::vector<uint8_t>& out) : out_(out) {}
  void put(bool bit) {
    if (n_ % 8 == 0) out_.push_back(0);
    if (bit) out_.back() |= static_cast<uint8_t>(1u << (n_ % 8));
    ++n_;
  }

 private:
  std::vector<uint8_t>& out_;
  int64_t n_ = 0;
};

class BitReader {
 public:
  BitReader(const uint8_t* data, int64_t bytes, const std::string& where) : data_(data), bits_(bytes * 8), where_(where) {}
  bool get() {
    if (n_ >= bits_) throw Error::corruption(where_ + "delta-ternary part stream: ends before its entries");
    const bool b = (data_[n_ / 8] >> (n_ % 8)) & 1u;
    ++n_;
    return b;
  }

 private:
  const uint8_t* data_;
  int64_t bits_, n_ = 0;
  const std::string& where_;
};

}  // namespace

DeltaTernary::DeltaTernary(Part base, Part stream, Part scale, int64_t nnz, int rice_k, bool base_shared, std::string origin)
    : Encoding(base_dim(base, 0), base_dim(base, 1)), base_(std::move(base)), stream_(std::move(stream)),
      scale_(std::move(scale)), nnz_(nnz), rice_k_(rice_k), base_shared_(base_shared), origin_(std::move(origin)) {
  if (!base_ || !base_->valid()) throw Error::corruption("delta-ternary part base missing");
  const core::DType t = base_->dtype();
  if (base_->encoding() || base_->rank() != 2 ||
      !(t == core::DType::F32 || t == core::DType::BF16 || t == core::DType::F16))
    throw Error::corruption(std::string("delta-ternary part base: expected a rank-2 F32, BF16 or F16 tensor, found ") +
                            core::dtype_name(t) + " " + core::shape_str(base_->shape()));
  if (!stream_ || !stream_->valid() || stream_->encoding() || stream_->dtype() != core::DType::U8 ||
      stream_->rank() != 1 || stream_->numel() < 1)
    throw Error::corruption("delta-ternary part stream: expected a non-empty rank-1 U8 tensor, found " +
                            (stream_ && stream_->valid() ? std::string(core::dtype_name(stream_->dtype())) + " " +
                                                               core::shape_str(stream_->shape())
                                                         : std::string("nothing")));
  if (!scale_ || !scale_->valid() || scale_->encoding() || scale_->dtype() != core::DType::F32 ||
      scale_->numel() != 1 || scale_->rank() != 1)
    throw Error::corruption("delta-ternary part scale: expected an F32 [1] tensor, found " +
                            (scale_ && scale_->valid() ? std::string(core::dtype_name(scale_->dtype())) + " " +
                                                             core::shape_str(scale_->shape())
                                                       : std::string("nothing")));
  const float s = this->scale();
  if (!std::isfinite(s) || s < 0)
    throw Error::corruption("delta-ternary part scale: expected a finite value >= 0, found " + std::to_string(s));
  if (nnz_ < 0 || nnz_ > rows() * cols())
    throw Error::corruption("delta-ternary: nnz " + std::to_string(nnz_) + " outside [0, " +
                            std::to_string(rows() * cols()) + "] (base " + core::shape_str(base_->shape()) + ")");
  if (rice_k_ < 0 || rice_k_ > kMaxRiceK)
    throw Error::corruption("delta-ternary: rice_k " + std::to_string(rice_k_) + " outside [0, 30]");
  // Every entry takes at least its quotient's end bit, k low bits and the sign.
  const int64_t least = nnz_ * (rice_k_ + 2);
  if (stream_->numel() * 8 < least)
    throw Error::corruption("delta-ternary part stream: " + std::to_string(stream_->numel()) + " bytes cannot hold nnz " +
                            std::to_string(nnz_) + " entries of at least " + std::to_string(rice_k_ + 2) +
                            " bits each (rice_k " + std::to_string(rice_k_) + "): truncated");
}

float DeltaTernary::scale() const {
  float s;
  std::memcpy(&s, scale_->data(), sizeof s);
  return s;
}

int64_t DeltaTernary::stream_bits(const std::vector<int64_t>& positions, int k) {
  int64_t bits = 0, prev = -1;
  for (int64_t p : positions) {
    bits += ((p - prev - 1) >> k) + 2 + k;  // unary quotient, its end bit, k low bits, the sign
    prev = p;
  }
  return bits;
}

int DeltaTernary::best_rice_k(const std::vector<int64_t>& positions) {
  int best = 0;
  int64_t best_bits = std::numeric_limits<int64_t>::max();
  for (int k = 0; k <= kMaxRiceK; ++k) {
    const int64_t b = stream_bits(positions, k);
    if (b < best_bits) best_bits = b, best = k;
  }
  return best;
}

std::shared_ptr<const DeltaTernary> DeltaTernary::pack(Part base, const std::vector<int64_t>& positions,
                                                       const std::vector<bool>& negative, float scale) {
  if (positions.size() != negative.size()) throw Error::internal("delta-ternary pack: positions and signs differ in length");
  const int k = best_rice_k(positions);
  std::vector<uint8_t> bytes;
  bytes.reserve(static_cast<size_t>(stream_bits(positions, k) / 8 + 1));
  BitWriter w(bytes);
  int64_t prev = -1;
  for (size_t i = 0; i < positions.size(); ++i) {
    if (positions[i] <= prev) throw Error::internal("delta-ternary pack: positions not ascending");
    const int64_t g = positions[i] - prev - 1;
    for (int64_t q = g >> k; q > 0; --q) w.put(true);
    w.put(false);
    for (int b = 0; b < k; ++b) w.put((g >> b) & 1);
    w.put(negative[i]);
    prev = positions[i];
  }
  if (bytes.empty()) bytes.push_back(0);
  core::Tensor st = core::Tensor::zeros(core::DType::U8, {static_cast<int64_t>(bytes.size())});
  std::memcpy(st.mutable_data(), bytes.data(), bytes.size());
  core::Tensor sc = core::Tensor::zeros(core::DType::F32, {1});
  std::memcpy(sc.mutable_data(), &scale, sizeof scale);
  return std::make_shared<DeltaTernary>(std::move(base), std::make_shared<const core::Tensor>(std::move(st)),
                                        std::make_shared<const core::Tensor>(std::move(sc)),
                                        static_cast<int64_t>(positions.size()), k, true);
}

std::vector<core::EncodedPart> DeltaTernary::parts() const {
  return {{"base", ".delta_base", base_, base_shared_}, {"stream", ".delta_stream", stream_, false},
          {"scale", ".delta_scale", scale_, false}};
}

void DeltaTernary::decode(std::vector<int64_t>& positions, std::vector<bool>& negative) const {
  positions.clear();
  negative.clear();
  positions.reserve(static_cast<size_t>(nnz_));
  negative.reserve(static_cast<size_t>(nnz_));
  const std::string where = origin_.empty() ? std::string() : origin_ + ": ";
  BitReader r(stream_->data(), stream_->numel(), where);
  const int64_t n = rows() * cols();
  int64_t prev = -1;
  for (int64_t i = 0; i < nnz_; ++i) {
    int64_t q = 0;
    while (r.get()) {
      if (++q > n) throw Error::corruption(where + "delta-ternary part stream: a gap longer than the weight");
    }
    int64_t g = q << rice_k_;
    for (int b = 0; b < rice_k_; ++b) g |= static_cast<int64_t>(r.get()) << b;
    const int64_t p = prev + 1 + g;
    if (p >= n)
      throw Error::corruption(where + "delta-ternary part stream: entry " + std::to_string(i) + " at position " +
                              std::to_string(p) + ", past the weight's " + std::to_string(n) + " elements");
    positions.push_back(p);
    negative.push_back(r.get());
    prev = p;
  }
}

void DeltaTernary::dequantize_rows(int64_t r0, int64_t r1, float* dst) const {
  check_rows(r0, r1);
  if (r1 == r0) return;
  base_->slice0(r0, r1).to_f32(dst);
  std::vector<int64_t> pos;
  std::vector<bool> neg;
  decode(pos, neg);
  const float s = scale();
  const int64_t lo = r0 * cols(), hi = r1 * cols();
  for (size_t i = 0; i < pos.size(); ++i)
    if (pos[i] >= lo && pos[i] < hi) dst[pos[i] - lo] += neg[i] ? -s : s;
}

}  // namespace moe::quant
