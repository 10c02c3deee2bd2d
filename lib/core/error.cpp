#include "core/error.h"

namespace moe::core {

const char* error_kind_name(ErrorKind k) {
  switch (k) {
    case ErrorKind::InvalidArgument: return "invalid argument";
    case ErrorKind::NotFound: return "not found";
    case ErrorKind::Corruption: return "corruption";
    case ErrorKind::IOError: return "I/O error";
    case ErrorKind::NotSupported: return "not supported";
    case ErrorKind::Internal: return "internal error";
  }
  return "error";
}

}  // namespace moe::core
