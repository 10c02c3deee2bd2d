// Data parallelism for the forward's phases whose pieces are too small for OpenBLAS to thread
// well (many small experts, attention per window and head, row-wise norms).
#pragma once

#include <cstdint>
#include <functional>

namespace moe::runtime {

// Threads a parallel region uses: the OpenBLAS thread setting (set_blas_threads; OpenBLAS's
// default is the machine's cores), so the forward never runs more threads than it was given.
int parallel_threads();

// Runs fn(i) for every i in [0, n) on up to parallel_threads() threads: the caller and the
// workers of a persistent pool take indices in turn. OpenBLAS runs single-threaded inside the
// region (each task's GEMMs on its own core) and gets its setting back after. Serial (in index
// order, on the caller) when one thread is set, n < 2, when called inside a region, or while
// another thread runs a region. The tasks must write disjoint memory: results then do not depend
// on the order or the thread a task runs on. The exception of the lowest index whose task throws
// is rethrown on the caller after every started task has ended (tasks of higher indices not yet
// started are skipped), as the serial loop would throw it.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

// parallel_for over [0, rows) in contiguous blocks of at least `min_rows`: fn(begin, end).
void parallel_rows(int64_t rows, int64_t min_rows, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace moe::runtime
