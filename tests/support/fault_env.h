// An Env that forwards to a real one and injects faults: writes fail once a byte budget is
// spent (a full disk), renames can fail. Used to check that failures propagate as errors and leave
// neither a half-written output nor a temporary folder behind.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "io/env.h"

namespace moe::test {

class FaultEnv : public io::Env {
 public:
  explicit FaultEnv(io::Env& base = io::Env::posix()) : base_(base) {}

  // Total bytes (over all files) that may be written; the write that would exceed it writes the
  // bytes that fit, then throws Error::io("... injected fault: no space left on device").
  // Negative: unlimited.
  int64_t write_budget = -1;
  bool fail_rename = false;     // every rename throws Error::io
  bool fail_close = false;      // every close of a written file throws Error::io

  uint64_t bytes_written() const { return written_; }
  int files_created() const { return created_; }
  int faults() const { return faults_; }
  const std::vector<std::string>& renames() const { return renames_; }

  std::shared_ptr<const io::MappedFile> map_file(const io::fs::path& path) override { return base_.map_file(path); }
  std::unique_ptr<io::WritableFile> create_file(const io::fs::path& path) override;
  std::string read_text(const io::fs::path& path) override { return base_.read_text(path); }
  void rename(const io::fs::path& from, const io::fs::path& to) override;
  void remove_all(const io::fs::path& path) override { base_.remove_all(path); }
  void create_dirs(const io::fs::path& path) override { base_.create_dirs(path); }
  bool exists(const io::fs::path& path) override { return base_.exists(path); }

  // Used by the wrapped files.
  size_t admit(size_t n);  // how many of n bytes may be written now
  void note_fault() { ++faults_; }

 private:
  io::Env& base_;
  uint64_t written_ = 0;
  int created_ = 0, faults_ = 0;
  std::vector<std::string> renames_;
};

}  // namespace moe::test
