// One error type for the whole tool. An Error carries a kind and a message; each layer that
// knows more context (file, tensor, JSON path) prepends a frame, so the final line reads
//   ckpt/model-00002.safetensors: tensor model.layers.3...: data_offsets end 812 past ...
// The CLI turns user-facing kinds into exit status 2 and Internal into exit status 1.
#pragma once

#include <exception>
#include <string>
#include <utility>

namespace moe::core {

enum class ErrorKind {
  InvalidArgument,  // bad flag, bad recipe, bad value
  NotFound,         // missing file, tensor, key
  Corruption,       // malformed file contents
  IOError,          // read/write/rename failure
  NotSupported,     // valid input we do not handle (unknown family, dtype)
  Internal,         // a bug: exit status 1
};

const char* error_kind_name(ErrorKind k);

class Error : public std::exception {
 public:
  Error(ErrorKind kind, std::string message) : kind_(kind), msg_(std::move(message)) {}

  static Error invalid(std::string m) { return {ErrorKind::InvalidArgument, std::move(m)}; }
  static Error not_found(std::string m) { return {ErrorKind::NotFound, std::move(m)}; }
  static Error corruption(std::string m) { return {ErrorKind::Corruption, std::move(m)}; }
  static Error io(std::string m) { return {ErrorKind::IOError, std::move(m)}; }
  static Error unsupported(std::string m) { return {ErrorKind::NotSupported, std::move(m)}; }
  static Error internal(std::string m) { return {ErrorKind::Internal, std::move(m)}; }

  ErrorKind kind() const { return kind_; }
  const std::string& message() const { return msg_; }
  const char* what() const noexcept override { return msg_.c_str(); }

  // Prepends "frame: " to the message; returns *this so `throw e.with_frame(..)` reads well.
  Error& with_frame(const std::string& frame) {
    msg_ = frame + ": " + msg_;
    return *this;
  }

  // Replaces every `from` in the message by `to` (a temporary path shown as the one the user
  // gave; an empty `from` changes nothing); returns *this, as with_frame.
  Error& with_path_shown(const std::string& from, const std::string& to) {
    if (from.empty()) return *this;
    for (size_t i = msg_.find(from); i != std::string::npos; i = msg_.find(from, i + to.size())) msg_.replace(i, from.size(), to);
    return *this;
  }

  // Exit status the CLI uses for this error: 2 for user-facing errors, 1 for internal ones.
  int exit_code() const { return kind_ == ErrorKind::Internal ? 1 : 2; }

 private:
  ErrorKind kind_;
  std::string msg_;
};

// Runs fn(); any Error escaping it gets `frame` prepended. Use to add file/tensor/key context:
//   with_context(path, [&] { parse(...); });
template <typename Fn>
auto with_context(const std::string& frame, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (Error& e) {
    e.with_frame(frame);
    throw;
  }
}

// Runs fn(); any Error escaping it shows `to` wherever its message names `from`
// (Error::with_path_shown): a temporary path reported as the path the user gave.
template <typename Fn>
auto with_path_shown(const std::string& from, const std::string& to, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (Error& e) {
    e.with_path_shown(from, to);
    throw;
  }
}

}  // namespace moe::core
