// A small persistent thread pool for the CPU data plane (no Python, no torch).
//
// parallel_for splits [0, num_chunks) into one contiguous range per participating thread; each
// thread works through its own range and then steals what is left of the others'. The calling
// thread always takes part, so a call never waits for a worker to wake up: a sleeping worker's
// range is simply done by the threads that are awake. With every thread awake the split is the
// same from call to call, so each core keeps touching the same part of the buffers (its cache).
//
// Workers spin for a short while after a job (in a loop the next scheduler step follows within
// microseconds) and then sleep. Calls from several threads at once are safe: a call that finds the
// pool busy runs on its own thread.
#pragma once

#include <cstdint>

namespace dreampose_rt {

// fn(ctx, chunk) for every chunk in [0, num_chunks), each exactly once, on at most max_threads
// threads (<= 0: every core). Returns when all chunks are done. fn must not throw. `large`: the job
// is long enough (tens of microseconds) to be worth waking a sleeping worker for; a small job wakes
// one only when calls come in a tight loop.
using ChunkFn = void (*)(void* ctx, int64_t chunk);
void parallel_for(int64_t num_chunks, int max_threads, ChunkFn fn, void* ctx, bool large);

// Threads the pool may use besides the caller's (hardware concurrency - 1).
int pool_workers();

}  // namespace dreampose_rt
