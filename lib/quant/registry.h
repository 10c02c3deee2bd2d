// Decoding encoded weights from a native moe-tool checkpoint (docs/FORMAT.md): the config.json
// entry of a weight ({"encoding": "lowrank", "rank": 12, "parts": {"a": NAME, "b": NAME}}) and
// its stored part tensors give back the encoding. The table of known encodings lists each one's
// parts, so messages can say what is missing.
#pragma once

#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/encoding.h"
#include "core/tensor.h"

namespace moe::quant {

struct EncodingInfo {
  const char* name;                      // "lowrank"
  std::vector<const char*> required;     // parts every weight of this encoding has
  std::vector<const char*> optional;     // parts it may have
  const char* description;
};
const std::vector<EncodingInfo>& known_encodings();

// A stored part as read from the checkpoint: the tensor (one shared_ptr per tensor name, so
// parts used by several weights keep one identity) and whether several weights use it.
struct StoredPart {
  std::shared_ptr<const core::Tensor> tensor;
  bool shared = false;
};

// Builds the encoding named `entry["encoding"]` from `parts` (role -> part). Throws
// Error::corruption for an unknown encoding (listing the known ones, with "did you mean"), a
// missing or unexpected part, a parameter that disagrees with the parts' shapes (e.g. a rank
// larger than min(out, in) or one the factors do not have). Messages name the part role; the
// caller adds the file and weight name (and checks the logical shape against the config).
// `origin` ("FILE: weight NAME"): kept by encodings whose parts are checked only as they are
// decoded (delta-ternary's stream), to name them in those later errors.
std::shared_ptr<const core::Encoding> decode(const nlohmann::json& entry, const std::map<std::string, StoredPart>& parts,
                                             const std::string& origin = {});

}  // namespace moe::quant
