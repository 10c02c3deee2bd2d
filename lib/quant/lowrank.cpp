#include "quant/lowrank.h"

#include <Eigen/Core>

#include "core/error.h"

namespace moe::quant {

using core::Error;
using core::shape_str;
using MatrixRM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace {

bool float_dtype(core::DType t) {
  return t == core::DType::F32 || t == core::DType::BF16 || t == core::DType::F16;
}

void check_part(const LowRank::Part& p, const char* role) {
  if (!p || !p->valid()) throw Error::corruption(std::string("low-rank part ") + role + " missing");
  if (p->encoding() || p->rank() != 2 || !float_dtype(p->dtype()))
    throw Error::corruption(std::string("low-rank part ") + role + ": expected a rank-2 F32, BF16 or F16 tensor, found " +
                            core::dtype_name(p->dtype()) + " " + shape_str(p->shape()));
}

MatrixRM rows_f32(const core::Tensor& t, int64_t r0, int64_t r1) {
  MatrixRM m(r1 - r0, t.dim(1));
  if (r1 > r0) t.slice0(r0, r1).to_f32(m.data());
  return m;
}

}  // namespace

LowRank::LowRank(Part a, Part b, Part base, bool a_shared, bool b_shared, bool base_shared)
    : Encoding(a && a->rank() == 2 ? a->dim(0) : 0, b && b->rank() == 2 ? b->dim(1) : 0), a_(std::move(a)),
      b_(std::move(b)), base_(std::move(base)), a_shared_(a_shared), b_shared_(b_shared), base_shared_(base_shared) {
  check_part(a_, "lr_a");
  check_part(b_, "lr_b");
  if (a_->dim(1) != b_->dim(0))
    throw Error::corruption("low-rank factors do not chain: lr_a " + shape_str(a_->shape()) + ", lr_b " +
                            shape_str(b_->shape()));
  if (rank() > std::min(rows(), cols()))
    throw Error::corruption("rank " + std::to_string(rank()) + " exceeds min(out, in) = " +
                            std::to_string(std::min(rows(), cols())) + " (lr_a " + shape_str(a_->shape()) + ", lr_b " +
                            shape_str(b_->shape()) + ")");
  if (base_) {
    check_part(base_, "lr_base");
    if (base_->dim(0) != rows() || base_->dim(1) != cols())
      throw Error::corruption("lr_base shape " + shape_str(base_->shape()) + ", expected " +
                              shape_str({rows(), cols()}));
  }
}

std::vector<core::EncodedPart> LowRank::parts() const {
  std::vector<core::EncodedPart> p = {{"a", ".lr_a", a_, a_shared_}, {"b", ".lr_b", b_, b_shared_}};
  if (base_) p.push_back({"base", ".lr_base", base_, base_shared_});
  return p;
}

void LowRank::dequantize_rows(int64_t r0, int64_t r1, float* dst) const {
  check_rows(r0, r1);
  Eigen::Map<MatrixRM> out(dst, r1 - r0, cols());
  if (r1 == r0) return;
  const MatrixRM b = rows_f32(*b_, 0, rank());
  if (rank() == 0) out.setZero();
  else out.noalias() = rows_f32(*a_, r0, r1) * b;
  if (base_) out += rows_f32(*base_, r0, r1);
}

std::shared_ptr<const core::Encoding> LowRank::slice_rows(int64_t r0, int64_t r1) const {
  check_rows(r0, r1);
  auto a = std::make_shared<const core::Tensor>(a_->slice0(r0, r1));
  Part base = base_ ? std::make_shared<const core::Tensor>(base_->slice0(r0, r1)) : nullptr;
  return std::make_shared<LowRank>(a, b_, base, false, b_shared_, false);
}

std::shared_ptr<const core::Encoding> LowRank::take_rows(const std::vector<int64_t>& rows) const {
  auto a = std::make_shared<const core::Tensor>(a_->take_rows(rows));
  Part base = base_ ? std::make_shared<const core::Tensor>(base_->take_rows(rows)) : nullptr;
  return std::make_shared<LowRank>(a, b_, base, false, b_shared_, false);
}

}  // namespace moe::quant
