// EXPECT that a call throws moe::core::Error of a kind, with a one-line message containing every
// given part. Header-only (GoogleTest); not for the fuzz targets.
#pragma once

#include <gtest/gtest.h>

#include <initializer_list>
#include <optional>
#include <string>

#include "core/error.h"

namespace moe::test {

// Returns the message ("" if nothing or something else was thrown, after recording a failure).
template <typename Fn>
std::string expect_error(Fn&& fn, std::optional<core::ErrorKind> kind, std::initializer_list<std::string> parts) {
  try {
    fn();
  } catch (const core::Error& e) {
    if (kind) {
      EXPECT_EQ(e.kind(), *kind) << "kind " << core::error_kind_name(e.kind()) << ", message: " << e.message();
    }
    for (const auto& p : parts)
      EXPECT_NE(e.message().find(p), std::string::npos) << "'" << p << "' not in: " << e.message();
    EXPECT_EQ(e.message().find('\n'), std::string::npos) << "message spans lines: " << e.message();
    return e.message();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-moe exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "did not throw; expected an error containing '" << (parts.size() ? *parts.begin() : "") << "'";
  return "";
}

}  // namespace moe::test
