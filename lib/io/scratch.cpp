#include "io/scratch.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <new>
#include <string>

#include "core/error.h"
#include "io/temp_files.h"

namespace moe::io {

using core::Error;

uint64_t available_memory() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  uint64_t kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return 0;
}

ScratchFloats::ScratchFloats(size_t n, const fs::path& spill_dir) : n_(n) {
  if (n == 0) return;
  const size_t bytes = n * sizeof(float);
  if (spill_dir.empty()) {
    data_ = new float[n]();
    return;
  }
  const fs::path path = temp_name(spill_dir, "activations");
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0)
    throw Error::io(spill_dir.string() + ": cannot create a temporary file for the spilled calibration activations: " +
                    std::strerror(errno));
  ::unlink(path.c_str());  // the mapping keeps the data; the name goes now
  const int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (rc != 0) {
    ::close(fd);
    throw Error::io(spill_dir.string() + ": cannot reserve " + std::to_string(bytes) +
                    " bytes for the spilled calibration activations: " + std::strerror(rc) +
                    " (free space there, or raise --memory-budget / calibration.memory_budget)");
  }
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  ::close(fd);
  if (p == MAP_FAILED)
    throw Error::io(spill_dir.string() + ": cannot map the spilled calibration activations: " + std::strerror(err));
  data_ = static_cast<float*>(p);
  mapped_ = true;
}

void ScratchFloats::reset() {
  if (mapped_) ::munmap(data_, n_ * sizeof(float));
  else delete[] data_;
  data_ = nullptr;
  n_ = 0;
  mapped_ = false;
}

ScratchFloats::~ScratchFloats() { reset(); }

ScratchFloats::ScratchFloats(ScratchFloats&& o) noexcept : data_(o.data_), n_(o.n_), mapped_(o.mapped_) {
  o.data_ = nullptr, o.n_ = 0, o.mapped_ = false;
}

ScratchFloats& ScratchFloats::operator=(ScratchFloats&& o) noexcept {
  if (this != &o) {
    reset();
    data_ = o.data_, n_ = o.n_, mapped_ = o.mapped_;
    o.data_ = nullptr, o.n_ = 0, o.mapped_ = false;
  }
  return *this;
}

void ScratchFloats::evict(size_t offset, size_t count) const {
  if (!mapped_ || count == 0) return;
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t begin = (offset * sizeof(float) + page - 1) / page * page;
  const size_t end = (offset + count) * sizeof(float) / page * page;
  if (end > begin) ::madvise(reinterpret_cast<char*>(data_) + begin, end - begin, MADV_DONTNEED);
}

}  // namespace moe::io
