// pybind11 glue of the thread pool: a self-test entry point for the tests (the pool itself is used
// from C++ only, by the scheduler's data plane).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <thread>
#include <vector>

#include "parallel.h"
#include "registry.h"

namespace py = pybind11;

namespace {

struct SelfTest {
  std::vector<std::atomic<int>> runs;  // how many times each chunk ran
  std::vector<size_t> thread_of;       // a hash of the thread that ran it
  std::chrono::microseconds busy;      // each chunk spins this long
  std::chrono::microseconds worker_busy;  // ... or this long on a pool worker (a slow worker)
  std::thread::id caller;

  static void chunk(void* ctx, int64_t i) {
    auto& t = *static_cast<SelfTest*>(ctx);
    t.runs[i].fetch_add(1, std::memory_order_relaxed);
    const auto me = std::this_thread::get_id();
    t.thread_of[i] = std::hash<std::thread::id>{}(me);
    const auto spin = me == t.caller ? t.busy : std::max(t.busy, t.worker_busy);
    const auto t0 = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() - t0 < spin) {
    }
  }
};

}  // namespace

void register_parallel(py::module_& m) {
  m.def(
      "_parallel_selftest",
      [](int64_t num_chunks, int max_threads, double busy_us, bool large, double worker_busy_us) {
        SelfTest t{std::vector<std::atomic<int>>(static_cast<size_t>(num_chunks)),
                   std::vector<size_t>(static_cast<size_t>(num_chunks), 0),
                   std::chrono::microseconds(static_cast<int64_t>(busy_us)),
                   std::chrono::microseconds(static_cast<int64_t>(worker_busy_us)), std::this_thread::get_id()};
        {
          py::gil_scoped_release release;
          dreampose_rt::parallel_for(num_chunks, max_threads, &SelfTest::chunk, &t, large);
        }
        std::vector<int> runs(t.runs.size());
        for (size_t i = 0; i < runs.size(); ++i) runs[i] = t.runs[i].load();
        return py::make_tuple(runs, t.thread_of, std::hash<std::thread::id>{}(t.caller));
      },
      py::arg("num_chunks"), py::arg("max_threads"), py::arg("busy_us") = 0.0, py::arg("large") = true,
      py::arg("worker_busy_us") = 0.0,
      "Test hook: runs a job of num_chunks chunks (each spinning busy_us, or worker_busy_us on a pool worker) "
      "on the pool; returns (times each chunk ran, an id of the thread that ran each chunk, the caller's id).");
  m.def("_pool_workers", &dreampose_rt::pool_workers, "Threads of the pool besides the caller's.");
}
