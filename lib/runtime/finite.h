// The non-finite check of converted weights: a NaN or Inf in a weight makes every later number
// meaningless (NaN scores, distances, perplexity), so it is refused where the weights are converted
// to f32 for the forward and the passes, with the tensor and the first bad index.
#pragma once

#include <cstdint>

#include "core/error.h"
#include "core/tensor.h"
#include "model/model.h"

namespace moe::runtime {

// An Error (InvalidArgument: bad input, exit 2) that also remembers the source tensor's bytes, so
// a caller that knows the checkpoint can name the tensor on disk (name_non_finite below).
class NonFiniteError : public core::Error {
 public:
  NonFiniteError(std::string message, const uint8_t* source)
      : core::Error(core::ErrorKind::InvalidArgument, std::move(message)), source_(source) {}
  const uint8_t* source() const { return source_; }

 private:
  const uint8_t* source_;
};

// Throws NonFiniteError when one of the n f32 values (converted from `src`, row-major with `cols`
// columns) is NaN or Inf: "non-finite value nan at index 17 (row 0, column 17)". `first`: the
// index in `src` of v[0] (a tile of rows checked on its own names the index in the whole tensor).
void check_finite(const float* v, int64_t n, int64_t cols, const core::Tensor& src, int64_t first = 0);

// Runs fn(); a NonFiniteError escaping it gets the on-disk tensor name of layer `layer` of `m`
// (and the checkpoint folder) as a frame when the bad tensor is one of the layer's stored tensors.
void name_non_finite(const model::Model& m, int layer, NonFiniteError& e);

template <typename Fn>
auto naming_non_finite(const model::Model& m, int layer, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (NonFiniteError& e) {
    name_non_finite(m, layer, e);
    throw;
  }
}

}  // namespace moe::runtime
