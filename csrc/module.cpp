// The product pybind11 module of dreampose-rt: dreampose_rt._C.
// Each op lives in its own file and registers itself through a function declared in registry.h.
// (The test hooks live in a separate module, dreampose_rt._C_testing: csrc/testing/.)
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include "registry.h"

#ifndef DREAMPOSE_RT_BUILD_FLAGS
#define DREAMPOSE_RT_BUILD_FLAGS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "dreampose-rt native extension (C++17 core, CPU; tensor glue built against torch)";
  m.attr("build_flags") = DREAMPOSE_RT_BUILD_FLAGS;
  m.attr("compiler") =
#if defined(__clang__)
      "clang " __clang_version__;
#elif defined(__GNUC__)
      "gcc " __VERSION__;
#else
      "unknown";
#endif
  m.attr("pybind11_version") = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                               std::to_string(PYBIND11_VERSION_MINOR) + "." +
                               std::to_string(PYBIND11_VERSION_PATCH);
  m.attr("cplusplus") = static_cast<long>(__cplusplus);
  // The torch whose headers the tensor glue was compiled against (the extension loads only with it).
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);

  register_scheduler(m);
}
