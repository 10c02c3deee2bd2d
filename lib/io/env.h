// All file access goes through Env, so tests can inject faults (short writes, disk full,
// failing renames) without touching the code under test. PosixEnv is the real one.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace moe::io {

namespace fs = std::filesystem;

// A read-only mapping of a whole file. Copying is disabled: the mapping is shared via shared_ptr.
class MappedFile {
 public:
  virtual ~MappedFile() = default;
  virtual const uint8_t* data() const = 0;
  virtual uint64_t size() const = 0;
  virtual const fs::path& path() const = 0;
  // Tells the OS the pages of [offset, offset+len) are no longer needed, so a streaming pass
  // over a large file keeps its resident set bounded. Data stays readable (re-faulted on use).
  virtual void release(uint64_t offset, uint64_t len) const = 0;
  // Maps the pages of [offset, offset+len) ahead of a read that will touch them all: a hint, one
  // call instead of a page fault per fault-around window (PosixEnv: madvise MADV_POPULATE_READ,
  // Linux 5.14; where the kernel refuses it, the read faults them in as before). Default: nothing.
  virtual void populate(uint64_t offset, uint64_t len) const;
  // Copies the n bytes at [offset, offset + n) into dst: PosixEnv reads them from the file (pread,
  // no page mapped), this default from data(). Error::internal when the range is not inside the
  // file, Error::io from the file system.
  virtual void read_at(uint64_t offset, void* dst, size_t n) const;
};

class WritableFile {
 public:
  virtual ~WritableFile() = default;
  // Writes exactly n bytes at `offset` (positional; the file grows as needed).
  virtual void write_at(uint64_t offset, const void* data, size_t n) = 0;
  // Writes the n bytes of `src` at [src_offset, src_offset + n) at `offset`: the bytes
  // write_at(offset, src.data() + src_offset, n) writes. PosixEnv's files copy them inside the
  // kernel (copy_file_range, no page of `src` mapped), falling back to write_at where the file
  // systems do not support it; this default is write_at. Error::internal when the range is not
  // inside `src`, Error::io from the file system.
  virtual void copy_from(uint64_t offset, const MappedFile& src, uint64_t src_offset, uint64_t n);
  virtual void close() = 0;
};

class Env {
 public:
  virtual ~Env() = default;
  virtual std::shared_ptr<const MappedFile> map_file(const fs::path& path) = 0;
  virtual std::unique_ptr<WritableFile> create_file(const fs::path& path) = 0;
  virtual std::string read_text(const fs::path& path) = 0;
  virtual void write_text(const fs::path& path, const std::string& text);
  virtual void copy_file(const fs::path& from, const fs::path& to);
  virtual void rename(const fs::path& from, const fs::path& to) = 0;
  // Renames unless `to` exists (atomically where the file system supports it:
  // renameat2(RENAME_NOREPLACE)); false when `to` exists, throws on other failures.
  virtual bool rename_noreplace(const fs::path& from, const fs::path& to);
  virtual void remove_all(const fs::path& path) = 0;
  virtual void create_dirs(const fs::path& path) = 0;
  virtual bool exists(const fs::path& path) = 0;

  // The process-wide real environment.
  static Env& posix();
};

}  // namespace moe::io
