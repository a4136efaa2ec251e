// dreampose_rt._C_testing: test hooks of the C++ core, kept out of the product module dreampose_rt._C.
// Built by setup.py from this file plus the core sources it exercises (parallel.cpp,
// scheduler/step_kernel.cpp), so this module has its own copy of the thread pool: the tests of the
// pool (tests/test_scheduler_threads.py) exercise the pool's code, not the instance the scheduler uses.
//
// - _parallel_selftest / _pool_workers: runs jobs on the pool and reports which thread ran each chunk.
// - convert_half_to_float / convert_float_to_half: the data plane's bulk fp16 <-> fp32 conversions,
//   on tensors; half_to_float / float_to_half: the scalar reference conversions on raw bits.
#include <ATen/core/Tensor.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "parallel.h"
#include "scheduler/step_kernel.h"
#include "tensor_args.h"

namespace py = pybind11;
namespace sch = dreampose_rt::scheduler;
namespace args = dreampose_rt::args;

namespace {

struct SelfTest {
  std::vector<std::atomic<int>> runs;     // how many times each chunk ran
  std::vector<size_t> thread_of;          // a hash of the thread that ran it
  std::chrono::microseconds busy;         // each chunk spins this long
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

py::tuple parallel_selftest(int64_t num_chunks, int max_threads, double busy_us, bool large, double worker_busy_us) {
  if (num_chunks < 0) args::bad("num_chunks must be >= 0");
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
}

// src (float16) -> dst (float32), or src (float32) -> dst (float16): CPU, contiguous, equal numel.
void convert(py::handle src_obj, py::handle dst_obj, bool to_float) {
  const at::Tensor& src = args::tensor(src_obj, "src");
  const at::Tensor& dst = args::tensor(dst_obj, "dst");
  args::check_cpu_contiguous(src, "src", {to_float ? at::kHalf : at::kFloat});
  args::check_cpu_contiguous(dst, "dst", {to_float ? at::kFloat : at::kHalf});
  args::check_numel(dst, src.numel(), "dst", std::to_string(src.numel()) + " (one per element of src)");
  py::gil_scoped_release release;
  if (to_float) {
    sch::convert_half_to_float(static_cast<const uint16_t*>(src.data_ptr()), dst.data_ptr<float>(), src.numel());
  } else {
    sch::convert_float_to_half(src.data_ptr<float>(), static_cast<uint16_t*>(dst.data_ptr()), src.numel());
  }
}

}  // namespace

PYBIND11_MODULE(_C_testing, m) {
  m.doc() = "Test hooks of the dreampose-rt C++ core (thread pool, fp16 conversions); not part of the product";
  m.def("_parallel_selftest", &parallel_selftest, py::arg("num_chunks"), py::arg("max_threads"),
        py::arg("busy_us") = 0.0, py::arg("large") = true, py::arg("worker_busy_us") = 0.0,
        "Runs a job of num_chunks chunks (each spinning busy_us, or worker_busy_us on a pool worker) on this "
        "module's pool; returns (times each chunk ran, an id of the thread that ran each chunk, the caller's id).");
  m.def("_pool_workers", &dreampose_rt::pool_workers, "Threads of this module's pool besides the caller's.");
  m.def(
      "convert_half_to_float", [](py::handle src, py::handle dst) { convert(src, dst, true); }, py::arg("src"),
      py::arg("dst"), "dst[:] = src: a float16 tensor into a float32 tensor of as many elements (CPU, contiguous).");
  m.def(
      "convert_float_to_half", [](py::handle src, py::handle dst) { convert(src, dst, false); }, py::arg("src"),
      py::arg("dst"),
      "dst[:] = src: a float32 tensor into a float16 tensor of as many elements (CPU, contiguous; round to "
      "nearest even).");
  m.def("half_to_float", &sch::half_to_float, py::arg("bits"), "The float32 value of binary16 bits (scalar reference).");
  m.def("float_to_half", &sch::float_to_half, py::arg("value"),
        "The binary16 bits of a float32 value, round to nearest even (scalar reference).");
}
