#include "runtime/mpi.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "core/error.h"

#ifdef MOE_TOOL_HAVE_MPI
#include <mpi.h>
#endif

namespace moe::runtime::mpi {

using core::Error;

namespace {

// A launcher variable as a count (absent: nullopt-like -1).
int env_int(const char* name) {
  const char* v = std::getenv(name);
  if (!v) return -1;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  if (end == v || *end != '\0' || n < 0 || n > (1 << 24))
    throw Error::invalid(std::string("environment variable ") + name + "=\"" + v + "\": expected a rank or rank count");
  return static_cast<int>(n);
}

#ifdef MOE_TOOL_HAVE_MPI
void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw Error::io(std::string(what) + ": " + std::string(msg, static_cast<size_t>(len)));
}
#endif

}  // namespace

LaunchEnv launch_env() {
  LaunchEnv e;
  // OpenMPI's mpirun; MPICH/Hydra and Slurm's PMI(2); PMIx (srun --mpi=pmix) gives the rank only.
  for (const auto& [size_var, rank_var] : {std::pair{"OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"},
                                           std::pair{"PMI_SIZE", "PMI_RANK"}, std::pair{"PMIX_SIZE", "PMIX_RANK"}}) {
    const int size = env_int(size_var), rank = env_int(rank_var);
    if (size < 0 && rank < 0) continue;
    e.launched = true;
    e.size = std::max(size, 1);
    e.rank = std::max(rank, 0);
    return e;
  }
  return e;
}

World& World::get() {
  static World w;
  return w;
}

void World::init(int* argc, char*** argv) {
  const LaunchEnv e = launch_env();
  if (!e.launched) return;
#ifdef MOE_TOOL_HAVE_MPI
  int provided = 0;
  check(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
  started_ = true;
  // Errors come back as return codes (checked), not as MPI's default abort without a message.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  check(MPI_Comm_rank(MPI_COMM_WORLD, &rank_), "MPI_Comm_rank");
  check(MPI_Comm_size(MPI_COMM_WORLD, &size_), "MPI_Comm_size");
#else
  (void)argc, (void)argv;
  if (e.size > 1)
    throw Error::invalid("this moe-tool was built without MPI but was started as one of " + std::to_string(e.size) +
                         " ranks (by mpirun or srun): install libopenmpi-dev (and openmpi-bin), then reconfigure and "
                         "rebuild (cmake finds MPI), or run moe-tool as one process");
#endif
}

void World::finalize() {
#ifdef MOE_TOOL_HAVE_MPI
  if (started_) MPI_Finalize();
#endif
  started_ = false;
}

void World::abort_all(int code) {
#ifdef MOE_TOOL_HAVE_MPI
  if (started_ && size_ > 1) MPI_Abort(MPI_COMM_WORLD, code);
#else
  (void)code;
#endif
}

std::vector<std::vector<uint8_t>> World::allgather(const std::vector<uint8_t>& mine) {
  if (size_ == 1) return {mine};
  std::vector<std::vector<uint8_t>> all(static_cast<size_t>(size_));
#ifdef MOE_TOOL_HAVE_MPI
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<uint64_t> sizes(static_cast<size_t>(size_));
  const uint64_t n = mine.size();
  check(MPI_Allgather(&n, 1, MPI_UINT64_T, sizes.data(), 1, MPI_UINT64_T, MPI_COMM_WORLD), "MPI_Allgather");
  constexpr uint64_t kChunk = uint64_t{1} << 30;
  for (int root = 0; root < size_; ++root) {
    std::vector<uint8_t>& buf = all[static_cast<size_t>(root)];
    if (root == rank_) buf = mine;
    else buf.resize(sizes[static_cast<size_t>(root)]);
    for (uint64_t off = 0; off < buf.size(); off += kChunk) {
      const int count = static_cast<int>(std::min(kChunk, buf.size() - off));
      check(MPI_Bcast(buf.data() + off, count, MPI_BYTE, root, MPI_COMM_WORLD), "MPI_Bcast");
    }
    traffic_.bytes_gathered += buf.size();
  }
  traffic_.bytes_sent += n * static_cast<uint64_t>(size_ - 1);
  traffic_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ++traffic_.exchanges;
#else
  throw Error::internal("mpi: more than one rank in a build without MPI");
#endif
  return all;
}

void World::share_owned(int64_t experts, const std::function<std::pair<void*, size_t>(int64_t)>& part) {
  if (size_ == 1) return;
#ifdef MOE_TOOL_HAVE_MPI
  // Each rank's parts are broadcast in place, described by an MPI datatype of absolute addresses
  // (MPI_Type_create_hindexed from MPI_BOTTOM): no staging buffer, nothing allocated per call.
  // Blocks are at most 1 GiB and a message at most 1 GiB (datatype sizes and counts are int).
  const auto t0 = std::chrono::steady_clock::now();
  constexpr size_t kChunk = size_t{1} << 30;
  uint64_t mine = 0;
  for (int root = 0; root < size_; ++root) {
    std::vector<int> lengths;
    std::vector<MPI_Aint> where;
    size_t message = 0;
    auto send = [&] {
      if (lengths.empty()) return;
      MPI_Datatype t;
      check(MPI_Type_create_hindexed(static_cast<int>(lengths.size()), lengths.data(), where.data(), MPI_BYTE, &t),
            "MPI_Type_create_hindexed");
      check(MPI_Type_commit(&t), "MPI_Type_commit");
      const int rc = MPI_Bcast(MPI_BOTTOM, 1, t, root, MPI_COMM_WORLD);
      MPI_Type_free(&t);
      check(rc, "MPI_Bcast");
      traffic_.bytes_gathered += message;
      if (root == rank_) mine += message;
      lengths.clear();
      where.clear();
      message = 0;
    };
    for (int64_t e = root; e < experts; e += size_) {
      const auto [p, n] = part(e);
      for (size_t off = 0; off < n;) {
        const size_t len = std::min(n - off, kChunk - message);
        MPI_Aint a;
        check(MPI_Get_address(static_cast<uint8_t*>(p) + off, &a), "MPI_Get_address");
        lengths.push_back(static_cast<int>(len));
        where.push_back(a);
        message += len;
        off += len;
        if (message == kChunk) send();
      }
    }
    send();
  }
  traffic_.bytes_sent += mine * static_cast<uint64_t>(size_ - 1);
  traffic_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ++traffic_.exchanges;
#else
  (void)experts;
  (void)part;
  throw Error::internal("mpi: more than one rank in a build without MPI");
#endif
}

void World::agree(std::exception_ptr err) {
  if (size_ == 1) {
    if (err) std::rethrow_exception(err);
    return;
  }
#ifdef MOE_TOOL_HAVE_MPI
  int mine = err ? rank_ : size_, first = size_;
  check(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD), "MPI_Allreduce");
  if (first == size_) return;
  // The failing rank's kind and message, from it to every rank.
  int kind = static_cast<int>(core::ErrorKind::Internal);
  std::string message;
  if (rank_ == first) {
    try {
      std::rethrow_exception(err);
    } catch (const Error& e) {
      kind = static_cast<int>(e.kind());
      message = e.message();
    } catch (const std::bad_alloc&) {
      message = "out of memory";
    } catch (const std::exception& e) {
      message = e.what();
    } catch (...) {
      message = "unknown error";
    }
  }
  if (message.size() > (size_t{1} << 20)) message.resize(size_t{1} << 20);
  uint64_t length = message.size();
  check(MPI_Bcast(&kind, 1, MPI_INT, first, MPI_COMM_WORLD), "MPI_Bcast");
  check(MPI_Bcast(&length, 1, MPI_UINT64_T, first, MPI_COMM_WORLD), "MPI_Bcast");
  message.resize(static_cast<size_t>(length));
  if (length) check(MPI_Bcast(message.data(), static_cast<int>(length), MPI_CHAR, first, MPI_COMM_WORLD), "MPI_Bcast");
  if (rank_ == first) std::rethrow_exception(err);
  throw Error(static_cast<core::ErrorKind>(kind), message);
#else
  std::rethrow_exception(err);
#endif
}

}  // namespace moe::runtime::mpi
