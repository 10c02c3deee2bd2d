// The exchange of a layer's encoded routed experts between MPI ranks (runtime/mpi.h,
// docs/mpi.md): each rank encodes the experts it owns, then every rank receives every encoding,
// so each rank holds the whole layer for the propagating forward and rank 0 can write it.
//
// On the wire, per rank: an 8-byte little-endian length, a CBOR header (per slot: its index, its
// report entry, the encoding's name and params() as config.json records them, and each part's
// role, dtype and shape), then the parts' bytes in header order. The receiver rebuilds each
// encoding with quant::decode from those parts, exactly as a checkpoint reader does, so the
// bytes written are the encoder's.
#pragma once

#include <cstddef>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/encoding.h"

namespace moe::passes {

// One encoded matrix of a layer: its index in the pass's slot list, its encoding (null: the
// matrix stays as it was, e.g. kept dense by factorize) and its entry in the layer report
// (method, tokens, losses: what the encoder measured).
struct EncodedSlot {
  size_t slot = 0;
  std::shared_ptr<const core::Encoding> encoding;
  nlohmann::json report;
};

// Every rank's `mine`, in rank then list order (a collective: every rank calls it once per layer,
// in the same layer order). `mpi_report` gets {"ranks", "slots_encoded_here", "bytes_sent",
// "bytes_gathered", "seconds"} for this exchange. Error::unsupported for an encoding with a part
// shared by several weights (a factorize basis: not split over ranks); Error::corruption for a
// buffer that does not parse.
std::vector<EncodedSlot> exchange_encodings(const std::vector<EncodedSlot>& mine, nlohmann::json& mpi_report);

// The wire form of `slots` and back (exposed for the tests).
std::vector<uint8_t> pack_encodings(const std::vector<EncodedSlot>& slots);
std::vector<EncodedSlot> unpack_encodings(const std::vector<uint8_t>& bytes);

}  // namespace moe::passes
