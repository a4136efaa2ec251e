// See parallel.h.
//
// The hand-over, without locks or waiting on a thread that is not working:
// - A job is published in the pool's mailbox: fn, ctx, slots, then gen_ is incremented. Each range
//   has a cursor word (gen tag : 32 | next : 16 | end : 16) that the caller writes before publishing.
// - A worker that sees a new gen reads the mailbox (re-reading gen_ to know that what it read belongs
//   to that gen) and claims chunks by compare-exchange on the cursors, which fails once the tag is
//   not its gen. So a worker that wakes late, or reads a mailbox that is being rewritten, claims
//   nothing and touches nothing of the job: ctx (on the caller's stack) is only used for a chunk
//   claimed under the job's tag, and the caller does not return before every chunk is done.
// - The caller waits only for chunks that a worker has claimed; a sleeping worker's range is done by
//   the caller. Sleeping workers wait on gen_ itself (a futex on Linux, no mutex on the caller's path;
//   elsewhere a condition variable).
#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <mutex>
#include <thread>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#define DREAMPOSE_RT_FUTEX 1
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define DREAMPOSE_RT_HAVE_ATFORK 1
#endif

namespace dreampose_rt {
namespace {

// How long an idle worker spins before it sleeps: the steps of a run follow each other within
// microseconds in a tight loop (then the worker stays awake) and within milliseconds around a model
// call (then it sleeps, and the next step wakes it at the cost of one system call).
constexpr std::chrono::microseconds kSpin(50);
// Waking a sleeping thread costs the caller a system call (measured 7-17 us in a KVM guest, where it
// sends an inter-processor interrupt to a halted virtual CPU). A caller pays it only when it pays off:
// for a large job, or when the calls come in a tight loop (the previous job ended less than kTightLoop
// ago), where the woken worker then stays awake for the calls that follow. A small job after an idle
// spell (a scheduler step after a model call) runs on the threads that are awake.
constexpr std::chrono::microseconds kTightLoop(100);
// A worker that has taken a chunk and is then preempted (another busy thread on its core, e.g. torch's
// OpenMP workers, which spin for milliseconds after a parallel op) makes the caller wait for the
// scheduler to run it again: up to a time slice, against a few microseconds of work. When a caller
// has waited longer than kStall for a worker, small jobs run on the caller alone for kBackoff (large
// ones still share: for them a second core is worth the risk).
constexpr std::chrono::microseconds kStall(30);
constexpr std::chrono::milliseconds kBackoff(20);
constexpr int kMaxSlots = 64;
constexpr int64_t kMaxClaims = 0xffff;  // the cursor word holds 16-bit indices

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

inline uint64_t cursor_word(uint32_t tag, int64_t next, int64_t end) {
  return (uint64_t(tag) << 32) | (uint64_t(next) << 16) | uint64_t(end);
}

struct alignas(64) Cursor {
  std::atomic<uint64_t> word{0};
};

class Pool {
 public:
  explicit Pool(int workers) : workers_(workers) {}

  // Starts the worker threads (after the pool is published, so a racing caller may run alone).
  void start() {
    for (int i = 1; i <= workers_; ++i) std::thread(&Pool::loop, this, i).detach();  // the pool is never destroyed
  }

  int workers() const { return workers_; }

  // Runs claims [0, claims) of fn (each claim covering `group` chunks of num_chunks) on `slots`
  // threads; false when another caller holds the pool (run the job on this thread instead).
  bool run(ChunkFn fn, void* ctx, int64_t num_chunks, int64_t group, int slots, bool large) {
    std::unique_lock<std::mutex> lk(call_mutex_, std::try_to_lock);
    if (!lk.owns_lock()) return false;
    if (!large && std::chrono::steady_clock::now() < backoff_until_) return false;
    const int64_t claims = (num_chunks + group - 1) / group;
    const uint32_t tag = gen_.load(std::memory_order_relaxed) + 1;
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    chunks_.store(num_chunks, std::memory_order_relaxed);
    group_.store(group, std::memory_order_relaxed);
    slots_.store(slots, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    for (int s = 0; s < slots; ++s)
      cursor_[s].word.store(cursor_word(tag, claims * s / slots, claims * (s + 1) / slots), std::memory_order_relaxed);
    gen_.store(tag, std::memory_order_seq_cst);  // publishes everything above
    if (sleepers_.load(std::memory_order_seq_cst) > 0 &&
        (large || std::chrono::steady_clock::now() - last_end_ < kTightLoop))
      wake_all();
    work(tag, 0, fn, ctx, num_chunks, group, slots);
    if (done_.load(std::memory_order_acquire) < claims) {
      const auto waited_from = std::chrono::steady_clock::now();
      while (done_.load(std::memory_order_acquire) < claims) cpu_relax();
      last_end_ = std::chrono::steady_clock::now();
      // (only a small job's wait says something: a large one may wait a chunk's length for a worker)
      if (!large && last_end_ - waited_from > kStall) backoff_until_ = last_end_ + kBackoff;
    } else {
      last_end_ = std::chrono::steady_clock::now();
    }
    return true;
  }

 private:
  // Claims of `tag` from range `own` first, then from the others'. Returns after the done count.
  void work(uint32_t tag, int own, ChunkFn fn, void* ctx, int64_t num_chunks, int64_t group, int slots) {
    int64_t did = 0;
    for (int k = 0; k < slots; ++k) {
      std::atomic<uint64_t>& c = cursor_[(own + k) % slots].word;
      uint64_t w = c.load(std::memory_order_acquire);
      for (;;) {
        if (uint32_t(w >> 32) != tag) break;
        const int64_t next = int64_t((w >> 16) & 0xffff), end = int64_t(w & 0xffff);
        if (next >= end) break;
        if (!c.compare_exchange_weak(w, w + (uint64_t(1) << 16), std::memory_order_acq_rel,
                                     std::memory_order_acquire))
          continue;
        const int64_t stop = std::min(num_chunks, (next + 1) * group);
        for (int64_t i = next * group; i < stop; ++i) fn(ctx, i);
        ++did;
        w = c.load(std::memory_order_acquire);
      }
    }
    if (did) done_.fetch_add(did, std::memory_order_acq_rel);
  }

  void loop(int index) {
    uint32_t seen = 0;  // a job published before this thread started is still one to join
    for (;;) {
      uint32_t g = gen_.load(std::memory_order_acquire);
      if (g == seen) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int spins = 1; (g = gen_.load(std::memory_order_acquire)) == seen; ++spins) {
          cpu_relax();
          if (spins % 256 == 0 && std::chrono::steady_clock::now() - t0 > kSpin) sleep_while(seen);
        }
      }
      seen = g;
      // The mailbox as of gen g (if gen_ moved on meanwhile, skip: that job is someone else's now).
      ChunkFn fn = fn_.load(std::memory_order_relaxed);
      void* ctx = ctx_.load(std::memory_order_relaxed);
      const int64_t chunks = chunks_.load(std::memory_order_relaxed);
      const int64_t group = group_.load(std::memory_order_relaxed);
      const int slots = slots_.load(std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_acquire);
      if (gen_.load(std::memory_order_relaxed) != g) continue;
      if (index < slots) work(g, index, fn, ctx, chunks, group, slots);
    }
  }

  void sleep_while(uint32_t seen) {
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
#ifdef DREAMPOSE_RT_FUTEX
    while (gen_.load(std::memory_order_seq_cst) == seen) {
      // Returns at once if gen_ != seen (checked atomically by the kernel): no lost wake-up.
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
    }
#else
    std::unique_lock<std::mutex> lk(sleep_mutex_);
    sleep_cv_.wait(lk, [&] { return gen_.load(std::memory_order_seq_cst) != seen; });
#endif
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  }

  void wake_all() {
#ifdef DREAMPOSE_RT_FUTEX
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#else
    std::lock_guard<std::mutex> g(sleep_mutex_);
    sleep_cv_.notify_all();
#endif
  }

  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex word");
  const int workers_;
  std::mutex call_mutex_;
  std::chrono::steady_clock::time_point last_end_{};       // guarded by call_mutex_
  std::chrono::steady_clock::time_point backoff_until_{};  // guarded by call_mutex_
  // The mailbox: one cache line, written by the caller, read by the workers.
  alignas(64) std::atomic<uint32_t> gen_{0};
  std::atomic<int> slots_{0};
  std::atomic<ChunkFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int64_t> chunks_{0};
  std::atomic<int64_t> group_{1};
  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<int> sleepers_{0};
  Cursor cursor_[kMaxSlots];
#ifndef DREAMPOSE_RT_FUTEX
  std::mutex sleep_mutex_;
  std::condition_variable sleep_cv_;
#endif
};

std::atomic<Pool*> g_pool{nullptr};

int hardware_threads() {
  static const int hw = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  return hw;
}

#ifdef DREAMPOSE_RT_HAVE_ATFORK
// A forked child has none of the parent's workers: it makes a pool of its own (the parent's is
// leaked there, its mutex possibly held by a thread that does not exist in the child).
void forget_pool_in_child() { g_pool.store(nullptr); }
#endif

Pool* get_pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return p;
#ifdef DREAMPOSE_RT_HAVE_ATFORK
  static const bool registered = (pthread_atfork(nullptr, nullptr, &forget_pool_in_child), true);
  (void)registered;
#endif
  Pool* fresh = new Pool(std::min(kMaxSlots, hardware_threads()) - 1);
  if (g_pool.compare_exchange_strong(p, fresh)) {
    fresh->start();
    return fresh;
  }
  delete fresh;  // another thread published its pool first (fresh has no threads yet)
  return p;
}

}  // namespace

int pool_workers() { return get_pool()->workers(); }

void parallel_for(int64_t num_chunks, int max_threads, ChunkFn fn, void* ctx, bool large) {
  if (num_chunks <= 0) return;
  const int hw = std::min(kMaxSlots, hardware_threads());
  const int threads = static_cast<int>(std::min<int64_t>(num_chunks, max_threads <= 0 ? hw : std::min(hw, max_threads)));
  if (threads > 1) {
    const int64_t group = (num_chunks + kMaxClaims - 1) / kMaxClaims;
    if (get_pool()->run(fn, ctx, num_chunks, group, threads, large)) return;
  }
  for (int64_t i = 0; i < num_chunks; ++i) fn(ctx, i);
}

}  // namespace dreampose_rt
