#include "support/fault_env.h"

#include "core/error.h"

namespace moe::test {

namespace {

class FaultFile final : public io::WritableFile {
 public:
  FaultFile(FaultEnv& env, io::fs::path path, std::unique_ptr<io::WritableFile> base)
      : env_(env), path_(std::move(path)), base_(std::move(base)) {}
  void write_at(uint64_t offset, const void* data, size_t n) override {
    const size_t ok = env_.admit(n);
    if (ok > 0) base_->write_at(offset, data, ok);
    if (ok < n) {
      env_.note_fault();
      throw core::Error::io(path_.string() + ": write failed: injected fault: no space left on device");
    }
  }
  void close() override {
    if (env_.fail_close) {
      env_.note_fault();
      throw core::Error::io(path_.string() + ": close failed: injected fault");
    }
    base_->close();
  }

 private:
  FaultEnv& env_;
  io::fs::path path_;
  std::unique_ptr<io::WritableFile> base_;
};

}  // namespace

std::unique_ptr<io::WritableFile> FaultEnv::create_file(const io::fs::path& path) {
  ++created_;
  return std::make_unique<FaultFile>(*this, path, base_.create_file(path));
}

void FaultEnv::rename(const io::fs::path& from, const io::fs::path& to) {
  renames_.push_back(from.string() + " -> " + to.string());
  if (fail_rename) {
    ++faults_;
    throw core::Error::io("cannot rename " + from.string() + " to " + to.string() + ": injected fault");
  }
  base_.rename(from, to);
}

size_t FaultEnv::admit(size_t n) {
  size_t ok = n;
  if (write_budget >= 0) {
    const uint64_t left = written_ >= static_cast<uint64_t>(write_budget) ? 0 : static_cast<uint64_t>(write_budget) - written_;
    if (ok > left) ok = static_cast<size_t>(left);
  }
  written_ += ok;
  return ok;
}

}  // namespace moe::test
