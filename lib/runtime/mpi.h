// Scale-out over MPI (docs/mpi.md). `mpirun -np N moe-tool quantize ...` starts N processes
// (ranks) that each run the same pipeline on the same inputs; a pass that can split its work
// (quantize's and factorize's per-expert encodings) gives each rank the routed experts it owns
// (expert % N == rank) and exchanges the results, so every rank ends each layer holding the whole
// layer. Only rank 0 writes and prints.
//
// MPI is optional (CMake finds it: MOE_TOOL_HAVE_MPI). World::init starts it only when the
// process was started by a launcher (mpirun, mpiexec, srun: OMPI_COMM_WORLD_SIZE, PMI_SIZE or
// PMIX_RANK in the environment); otherwise, and in a build without MPI, the world is one rank and
// every call here is a no-op.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace moe::runtime::mpi {

// What the collectives of this process moved, for the report.
struct Traffic {
  uint64_t bytes_sent = 0;      // this rank's payload bytes, counted once per receiving rank
  uint64_t bytes_gathered = 0;  // every rank's payload bytes (what each rank holds after the exchanges)
  double seconds = 0;           // wall time inside the collectives (waiting for slower ranks included)
  int64_t exchanges = 0;
};

class World {
 public:
  // The process's world: one rank until init() starts MPI.
  static World& get();

  // Called once by main() before anything else. Under a launcher: MPI_Init (a build with MPI), or
  // a one-line refusal (a build without MPI, when the launcher says more than one rank): throws
  // Error::invalid saying how to get an MPI build. Otherwise nothing.
  void init(int* argc, char*** argv);
  // MPI_Finalize when init() started MPI; nothing otherwise. Called by main() on a normal exit.
  void finalize();
  // Ends every rank with exit status `code` (MPI_Abort) when more than one rank runs; returns
  // (doing nothing) otherwise, so the caller exits as usual.
  void abort_all(int code);

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool split() const { return size_ > 1; }  // more than one rank: passes split their work
  // Whether `expert` (routed, 0-based) is encoded by this rank.
  bool owns(int64_t expert) const { return expert % size_ == rank_; }

  // Every rank's `mine`, in rank order (a collective: every rank calls it, in the same order of
  // calls). Sent root by root with MPI_Bcast in chunks of at most 1 GiB (counts are int).
  // One rank: {mine}.
  std::vector<std::vector<uint8_t>> allgather(const std::vector<uint8_t>& mine);

  // Fills every expert's part from its owner (a collective, as allgather): part(e) for e in
  // [0, experts) is expert e's storage {data, bytes}, sized alike on every rank before the call
  // (the caller knows each size from what every rank holds, e.g. the routing: parts sized
  // differently on two ranks are an MPI error); the owner's bytes are broadcast in place into the
  // other ranks' parts, with no staging copy. One broadcast per rank (per GiB) however many
  // experts. Counted in traffic() as one exchange. One rank: nothing.
  void share_owned(int64_t experts, const std::function<std::pair<void*, size_t>(int64_t)>& part);

  // Ends a step that may fail on some ranks only (a collective: every rank calls it at the same
  // point, with its own error or null). Returns when no rank failed. Otherwise every rank throws
  // the error of the lowest failing rank: that rank rethrows its own, the others a core::Error of
  // the same kind and message (another exception type: ErrorKind::Internal with its what()), so
  // rank 0 unwinds (removing its temporaries) and prints the message one process would have.
  // One rank: rethrows `err` when set.
  void agree(std::exception_ptr err);
  // Runs fn(); when `collective`, ends with agree() on what it threw (every rank calls it at the
  // same point), else lets it throw as usual.
  template <typename Fn>
  void run_agreed(bool collective, Fn&& fn) {
    if (!collective) return fn();
    std::exception_ptr err;
    try {
      fn();
    } catch (...) {
      err = std::current_exception();
    }
    agree(err);
  }

  const Traffic& traffic() const { return traffic_; }

 private:
  int rank_ = 0, size_ = 1;
  bool started_ = false;
  Traffic traffic_;
};

// The rank and size a launcher announces in the environment (OpenMPI's mpirun, MPICH/Hydra and
// Slurm's PMI): {rank, size}, or {0, 1} when none is set. Error::invalid for a malformed value.
struct LaunchEnv {
  int rank = 0, size = 1;
  bool launched = false;  // a launcher variable is set
};
LaunchEnv launch_env();

}  // namespace moe::runtime::mpi
