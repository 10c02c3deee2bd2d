#include "core/encoding.h"

#include "core/error.h"

namespace moe::core {

std::shared_ptr<const Encoding> Encoding::slice_rows(int64_t r0, int64_t r1) const {
  throw Error::unsupported("rows [" + std::to_string(r0) + ", " + std::to_string(r1) + ") of a " + name() +
                           " weight cannot be taken without decoding it");
}

std::shared_ptr<const Encoding> Encoding::take_rows(const std::vector<int64_t>& rows) const {
  throw Error::unsupported("a selection of " + std::to_string(rows.size()) + " rows of a " + name() +
                           " weight cannot be taken without decoding it");
}

void Encoding::check_rows(int64_t r0, int64_t r1) const {
  if (r0 < 0 || r1 < r0 || r1 > rows_)
    throw Error::internal(name() + ": rows [" + std::to_string(r0) + ", " + std::to_string(r1) + ") out of range for " +
                          std::to_string(rows_) + " rows");
}

}  // namespace moe::core
