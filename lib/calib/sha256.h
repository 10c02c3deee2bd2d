// SHA-256 (FIPS 180-4) of a byte string, as lowercase hex: the stats file records the hash of the
// calibration text so two stats files can be compared.
#pragma once

#include <string>
#include <string_view>

namespace moe::calib {

std::string sha256_hex(std::string_view data);

}  // namespace moe::calib
