#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "io/env.h"

namespace moe::io {

using core::Error;

namespace {

std::string errno_text() { return std::strerror(errno); }

void check_copy_range(const MappedFile& src, uint64_t src_offset, uint64_t n) {
  if (src_offset > src.size() || n > src.size() - src_offset)
    throw Error::internal(src.path().string() + ": copy of " + std::to_string(n) + " bytes at " +
                          std::to_string(src_offset) + " past its end " + std::to_string(src.size()));
}

class PosixMappedFile final : public MappedFile {
 public:
  PosixMappedFile(fs::path path, const uint8_t* data, uint64_t size, int fd)
      : path_(std::move(path)), data_(data), size_(size), fd_(fd) {}
  PosixMappedFile(const PosixMappedFile&) = delete;
  PosixMappedFile& operator=(const PosixMappedFile&) = delete;
  ~PosixMappedFile() override {
    if (size_ > 0) munmap(const_cast<uint8_t*>(data_), size_);
    ::close(fd_);
  }
  const uint8_t* data() const override { return data_; }
  uint64_t size() const override { return size_; }
  const fs::path& path() const override { return path_; }
  void release(uint64_t offset, uint64_t len) const override {
    if (size_ == 0 || offset >= size_) return;
    const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
    uint64_t begin = offset / page * page;
    uint64_t end = std::min(size_, offset + len);
    madvise(const_cast<uint8_t*>(data_) + begin, end - begin, MADV_DONTNEED);
  }

  void populate(uint64_t offset, uint64_t len) const override {
#if defined(MADV_POPULATE_READ)
    if (size_ == 0 || offset >= size_) return;
    const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
    const uint64_t begin = offset / page * page, end = std::min(size_, offset + len);
    madvise(const_cast<uint8_t*>(data_) + begin, end - begin, MADV_POPULATE_READ);  // a hint: errors ignored
#else
    (void)offset, (void)len;
#endif
  }

  void read_at(uint64_t offset, void* dst, size_t n) const override {
    check_copy_range(*this, offset, n);
    auto* p = static_cast<uint8_t*>(dst);
    while (n > 0) {
      const ssize_t r = ::pread(fd_, p, std::min<size_t>(n, size_t{1} << 30), static_cast<off_t>(offset));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) throw Error::io(path_.string() + ": read failed: " + errno_text());
      if (r == 0) throw Error::io(path_.string() + ": shorter than when it was mapped (truncated while in use)");
      p += r;
      n -= static_cast<size_t>(r);
      offset += static_cast<uint64_t>(r);
    }
  }
  // The descriptor the mapping was made from, open while it lives: copies between descriptors
  // (copy_file_range) and read_at read the mapped file itself, even when its path was renamed over.
  int fd() const { return fd_; }

 private:
  fs::path path_;
  const uint8_t* data_;
  uint64_t size_;
  int fd_;
};

class PosixWritableFile final : public WritableFile {
 public:
  PosixWritableFile(fs::path path, int fd) : path_(std::move(path)), fd_(fd) {}
  PosixWritableFile(const PosixWritableFile&) = delete;
  PosixWritableFile& operator=(const PosixWritableFile&) = delete;
  ~PosixWritableFile() override {
    if (fd_ >= 0) ::close(fd_);
  }
  void write_at(uint64_t offset, const void* data, size_t n) override {
    const auto* p = static_cast<const uint8_t*>(data);
    while (n > 0) {
      ssize_t w = ::pwrite(fd_, p, std::min<size_t>(n, size_t{1} << 30), static_cast<off_t>(offset));
      if (w < 0) {
        if (errno == EINTR) continue;
        throw Error::io(path_.string() + ": write failed: " + errno_text());
      }
      p += w;
      n -= static_cast<size_t>(w);
      offset += static_cast<uint64_t>(w);
    }
  }
  // copy_file_range from the mapped file's descriptor; the rest through write_at from the mapping
  // when the file systems refuse it (EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: the same bytes).
  void copy_from(uint64_t offset, const MappedFile& src, uint64_t src_offset, uint64_t n) override {
    check_copy_range(src, src_offset, n);
    const auto* mapped = dynamic_cast<const PosixMappedFile*>(&src);
    const int in = mapped && kernel_copy_ ? mapped->fd() : -1;
    while (n > 0 && in >= 0) {
      auto off_in = static_cast<loff_t>(src_offset), off_out = static_cast<loff_t>(offset);
      const ssize_t c = ::copy_file_range(in, &off_in, fd_, &off_out, std::min<uint64_t>(n, uint64_t{1} << 30), 0);
      if (c < 0) {
        if (errno == EINTR) continue;
        if (errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP) {
          kernel_copy_ = false;
          break;
        }
        throw Error::io(path_.string() + ": copy from " + src.path().string() + " failed: " + errno_text());
      }
      if (c == 0) throw Error::io(src.path().string() + ": shorter than when it was mapped (truncated while in use)");
      src_offset += static_cast<uint64_t>(c);
      offset += static_cast<uint64_t>(c);
      n -= static_cast<uint64_t>(c);
    }
    if (n > 0) write_at(offset, src.data() + src_offset, static_cast<size_t>(n));
  }
  void close() override {
    if (fd_ >= 0 && ::close(fd_) != 0) {
      fd_ = -1;
      throw Error::io(path_.string() + ": close failed: " + errno_text());
    }
    fd_ = -1;
  }

 private:
  fs::path path_;
  int fd_;
  bool kernel_copy_ = true;  // false once the file systems refused copy_file_range
};

class PosixEnv final : public Env {
 public:
  std::shared_ptr<const MappedFile> map_file(const fs::path& path) override {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      if (errno == ENOENT) throw Error::not_found(path.string() + ": no such file");
      throw Error::io(path.string() + ": cannot open: " + errno_text());
    }
    struct stat st {};
    if (fstat(fd, &st) != 0) {
      ::close(fd);
      throw Error::io(path.string() + ": cannot stat: " + errno_text());
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw Error::io(path.string() + ": not a regular file");
    }
    const auto size = static_cast<uint64_t>(st.st_size);
    const uint8_t* data = nullptr;
    if (size > 0) {
      void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        throw Error::io(path.string() + ": cannot map: " + errno_text());
      }
      data = static_cast<const uint8_t*>(p);
    }
    return std::make_shared<PosixMappedFile>(path, data, size, fd);
  }

  std::unique_ptr<WritableFile> create_file(const fs::path& path) override {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) throw Error::io(path.string() + ": cannot create: " + errno_text());
    return std::make_unique<PosixWritableFile>(path, fd);
  }

  std::string read_text(const fs::path& path) override {
    std::error_code ec;
    if (!fs::exists(path, ec)) throw Error::not_found(path.string() + ": no such file");
    if (fs::is_directory(path, ec)) throw Error::io(path.string() + ": is a directory");
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error::io(path.string() + ": cannot read: " + errno_text());
    std::ostringstream ss;
    ss << in.rdbuf();
    if (in.bad()) throw Error::io(path.string() + ": read failed");
    return ss.str();
  }

  void rename(const fs::path& from, const fs::path& to) override {
    if (::rename(from.c_str(), to.c_str()) != 0)
      throw Error::io("cannot rename " + from.string() + " to " + to.string() + ": " + errno_text());
  }

  bool rename_noreplace(const fs::path& from, const fs::path& to) override {
    if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0) return true;
    if (errno == EEXIST) return false;
    if (errno == EINVAL || errno == ENOSYS || errno == ENOTSUP) return Env::rename_noreplace(from, to);
    throw Error::io("cannot rename " + from.string() + " to " + to.string() + ": " + errno_text());
  }

  void remove_all(const fs::path& path) override {
    std::error_code ec;
    fs::remove_all(path, ec);
    if (ec) throw Error::io(path.string() + ": cannot remove: " + ec.message());
  }

  void create_dirs(const fs::path& path) override {
    std::error_code ec;
    fs::create_directories(path, ec);
    if (ec) throw Error::io(path.string() + ": cannot create directory: " + ec.message());
  }

  bool exists(const fs::path& path) override {
    std::error_code ec;
    return fs::exists(path, ec);
  }
};

}  // namespace

bool Env::rename_noreplace(const fs::path& from, const fs::path& to) {
  // Not atomic: for environments without renameat2 (tests, file systems that refuse the flag).
  if (exists(to)) return false;
  rename(from, to);
  return true;
}

void Env::write_text(const fs::path& path, const std::string& text) {
  auto f = create_file(path);
  f->write_at(0, text.data(), text.size());
  f->close();
}

void MappedFile::populate(uint64_t, uint64_t) const {}

void MappedFile::read_at(uint64_t offset, void* dst, size_t n) const {
  check_copy_range(*this, offset, n);
  std::memcpy(dst, data() + offset, n);
}

void WritableFile::copy_from(uint64_t offset, const MappedFile& src, uint64_t src_offset, uint64_t n) {
  check_copy_range(src, src_offset, n);
  write_at(offset, src.data() + src_offset, static_cast<size_t>(n));
}

void Env::copy_file(const fs::path& from, const fs::path& to) {
  auto src = map_file(from);
  auto dst = create_file(to);
  constexpr uint64_t kChunk = uint64_t{64} << 20;
  for (uint64_t off = 0; off < src->size(); off += kChunk) {
    const uint64_t n = std::min(kChunk, src->size() - off);
    dst->copy_from(off, *src, off, n);
    src->release(off, n);
  }
  dst->close();
}

Env& Env::posix() {
  static PosixEnv env;
  return env;
}

}  // namespace moe::io
