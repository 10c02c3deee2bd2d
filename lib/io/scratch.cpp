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

namespace {

size_t page_size() {
  static const size_t p = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  return p;
}

// The pages wholly inside [p, p + n) handed back to the kernel (a shared file mapping: the file
// keeps the data).
void drop_pages(const void* p, size_t n) {
  const size_t ps = page_size();
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + ps - 1) / ps * ps, e = (reinterpret_cast<uintptr_t>(p) + n) / ps * ps;
  if (e > b) ::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
}

// A new temporary file in `dir` (temp_name(dir, name)), unlinked at once: its descriptor keeps the
// data until closed, and nothing is left in the folder whatever happens. Error::io naming the
// folder and `what` the file is for.
int open_unlinked(const fs::path& dir, const std::string& name, const std::string& what) {
  const fs::path path = temp_name(dir, name);
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0)
    throw Error::io(dir.string() + ": cannot create a temporary file for " + what + ": " + std::strerror(errno));
  ::unlink(path.c_str());
  return fd;
}

// Bytes [offset, offset + bytes) of `fd` reserved on disk (posix_fallocate: a full disk is an
// Error::io now, not a SIGBUS later) and mapped shared, read-write. `way_out` ends the message of
// a failed reservation.
void* reserve_and_map(int fd, uint64_t offset, size_t bytes, const fs::path& dir, const std::string& what,
                      const std::string& way_out) {
  const int rc = ::posix_fallocate(fd, static_cast<off_t>(offset), static_cast<off_t>(bytes));
  if (rc != 0)
    throw Error::io(dir.string() + ": cannot reserve " + std::to_string(bytes) + " bytes for " + what + ": " +
                    std::strerror(rc) + " (" + way_out + ")");
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, static_cast<off_t>(offset));
  if (p == MAP_FAILED) throw Error::io(dir.string() + ": cannot map " + what + ": " + std::strerror(errno));
  return p;
}

}  // namespace

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
  const int fd = open_unlinked(spill_dir, "activations", "the spilled calibration activations");
  void* p = nullptr;
  try {
    p = reserve_and_map(fd, 0, bytes, spill_dir, "the spilled calibration activations",
                        "free space there, or raise --memory-budget / calibration.memory_budget");
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);  // the mapping keeps the file
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
  drop_pages(data_ + offset, count * sizeof(float));
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


SpillArena::SpillArena(const fs::path& dir, size_t min_bytes, size_t evict_every)
    : dir_(dir), min_bytes_(std::max<size_t>(min_bytes, 1)), evict_every_(std::max<size_t>(evict_every, 1)) {}

SpillArena::~SpillArena() = default;

core::TensorArena::Block SpillArena::allocate(size_t bytes) {
  constexpr size_t kAlign = 64, kChunk = size_t{64} << 20;
  const size_t need = (std::max<size_t>(bytes, 1) + kAlign - 1) / kAlign * kAlign;
  std::lock_guard lk(m_);
  if (!file_) {
    auto f = std::make_shared<File>();
    f->fd = open_unlinked(dir_, "encoded", "the encoded layer");
    file_ = std::move(f);
  }
  if (!current_ || used_ + need > current_->size) {
    const size_t ps = page_size();
    const size_t size = std::max(kChunk, (need + ps - 1) / ps * ps);
    auto c = std::make_shared<Chunk>();
    c->file = file_;
    c->offset = file_->end;
    c->data = static_cast<uint8_t*>(
        reserve_and_map(file_->fd, c->offset, size, dir_, "the encoded layer's temporary file", "free space there"));
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
