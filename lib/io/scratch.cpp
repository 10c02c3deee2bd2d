#include "io/scratch.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
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

// The arena's temporary file: unlinked at once; its descriptor lives as long as a chunk does.
struct SpillArena::File {
  int fd = -1;
  uint64_t end = 0;  // bytes reserved so far (chunks are carved at increasing offsets)
  ~File() {
    if (fd >= 0) ::close(fd);
  }
};

struct SpillArena::Chunk {
  std::shared_ptr<File> file;
  uint8_t* data = nullptr;
  size_t size = 0;
  uint64_t offset = 0;
  ~Chunk() {
    if (data) ::munmap(data, size);
#ifdef FALLOC_FL_PUNCH_HOLE
    // The file space goes back too (best effort: a file system without holes keeps it until the
    // file is closed, which is when the last chunk goes).
    ::fallocate(file->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), static_cast<off_t>(size));
#endif
  }
};

namespace {
size_t page_size() {
  static const size_t p = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  return p;
}

// The pages wholly inside [p, p + n) handed back to the kernel (a shared file mapping: the file
// keeps the data).
void drop_pages(const uint8_t* p, size_t n) {
  const size_t ps = page_size();
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + ps - 1) / ps * ps, e = (reinterpret_cast<uintptr_t>(p) + n) / ps * ps;
  if (e > b) ::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
}
}  // namespace

SpillArena::SpillArena(const fs::path& dir, size_t min_bytes, size_t evict_every)
    : dir_(dir), min_bytes_(std::max<size_t>(min_bytes, 1)), evict_every_(std::max<size_t>(evict_every, 1)) {}

SpillArena::~SpillArena() = default;

core::TensorArena::Block SpillArena::allocate(size_t bytes) {
  constexpr size_t kAlign = 64, kChunk = size_t{64} << 20;
  const size_t need = (std::max<size_t>(bytes, 1) + kAlign - 1) / kAlign * kAlign;
  std::lock_guard lk(m_);
  if (!file_) {
    auto f = std::make_shared<File>();
    const fs::path path = temp_name(dir_, "encoded");
    f->fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (f->fd < 0)
      throw Error::io(dir_.string() + ": cannot create a temporary file for the encoded layer: " + std::strerror(errno));
    ::unlink(path.c_str());
    file_ = std::move(f);
  }
  if (!current_ || used_ + need > current_->size) {
    const size_t ps = page_size();
    const size_t size = std::max(kChunk, (need + ps - 1) / ps * ps);
    auto c = std::make_shared<Chunk>();
    c->file = file_;
    c->offset = file_->end;
    const int rc = ::posix_fallocate(file_->fd, static_cast<off_t>(c->offset), static_cast<off_t>(size));
    if (rc != 0)
      throw Error::io(dir_.string() + ": cannot reserve " + std::to_string(size) +
                      " bytes for the encoded layer's temporary file: " + std::strerror(rc) + " (free space there)");
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, file_->fd, static_cast<off_t>(c->offset));
    if (p == MAP_FAILED)
      throw Error::io(dir_.string() + ": cannot map the encoded layer's temporary file: " + std::strerror(errno));
    c->data = static_cast<uint8_t*>(p);
    c->size = size;
    file_->end += size;
    current_ = c;
    used_ = 0;
    chunks_.erase(std::remove_if(chunks_.begin(), chunks_.end(), [](const auto& w) { return w.expired(); }), chunks_.end());
    chunks_.push_back(c);
  }
  // Fresh file space reads as zeros: nothing to clear.
  uint8_t* data = current_->data + used_;
  used_ += need;
  allocated_ += bytes;
  since_evict_ += need;
  Block b{data, std::shared_ptr<const void>(current_, data)};
  if (since_evict_ >= evict_every_) evict_locked();
  return b;
}

void SpillArena::evict_locked() {
  for (const auto& w : chunks_)
    if (auto c = w.lock()) drop_pages(c->data, c->size);
  since_evict_ = 0;
}

void SpillArena::evict_all() {
  std::lock_guard lk(m_);
  evict_locked();
}

bool SpillArena::release_range(const uint8_t* p, size_t n) {
  std::lock_guard lk(m_);
  for (const auto& w : chunks_)
    if (auto c = w.lock(); c && p >= c->data && p < c->data + c->size) {
      drop_pages(p, std::min(n, static_cast<size_t>(c->data + c->size - p)));
      return true;
    }
  return false;
}

}  // namespace moe::io
