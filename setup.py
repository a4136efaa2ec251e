"""Build script: the Python packages plus the C++ extensions ``dreampose_rt._C`` and ``dreampose_rt._C_testing``.

* ``dreampose_rt._C`` (the product): the scheduler core (csrc/scheduler/, csrc/parallel.*, plain C++17
  with no Python and no torch) and its pybind11 glue (csrc/module.cpp, csrc/scheduler_bindings.cpp).
* ``dreampose_rt._C_testing`` exists only for the tests: hooks into the thread pool and the fp16
  conversions (csrc/testing/), compiled with its own copy of the core sources they exercise
  (csrc/parallel.cpp, csrc/scheduler/step_kernel.cpp). Nothing in the package imports it.

The glue reads torch tensors directly (the per-step fast path), so both are built against the installed
torch (CPU headers only, no CUDA) with torch's own compiler flags (C++20 for torch >= 2.10). Build without
isolation, next to the torch you will run: ``pip install --no-build-isolation -e .`` (``make install``
does). Where torch cannot be imported at build time the extensions are skipped with a warning and the
pure-Python scheduler is used.

Environment variables:

* ``DREAMPOSE_RT_SKIP_EXT=1``: do not build the extensions (the pure-Python fallbacks are used).
* ``DREAMPOSE_RT_DEBUG=1``: build the extensions with ``-O0 -g``.
* ``MAX_JOBS``: parallel compile jobs (default: the number of CPUs).
"""

from __future__ import annotations

import glob
import os
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _torch_cpp_extension():
    try:
        from torch.utils import cpp_extension
    except ImportError as exc:
        warnings.warn(f"dreampose_rt._C is not built: torch is not importable at build time ({exc}); "
                      "install torch first and build with --no-build-isolation")
        return None
    return cpp_extension


def _ext_modules() -> list:
    if os.environ.get("DREAMPOSE_RT_SKIP_EXT", "0") == "1":
        return []
    cpp_extension = _torch_cpp_extension()
    if cpp_extension is None:
        return []
    core = sorted(glob.glob(os.path.join("csrc", "scheduler", "*.cpp"))) + [os.path.join("csrc", "parallel.cpp")]
    product = sorted(glob.glob(os.path.join("csrc", "*_bindings.cpp"))) + [os.path.join("csrc", "module.cpp")]
    testing = sorted(glob.glob(os.path.join("csrc", "testing", "*.cpp"))) + [
        os.path.join("csrc", "parallel.cpp"),
        os.path.join("csrc", "scheduler", "step_kernel.cpp"),
    ]
    debug = os.environ.get("DREAMPOSE_RT_DEBUG", "0") == "1"
    extra = ["-O0", "-g"] if debug else ["-O3"]
    if sys.platform != "win32":
        # -Wno-psabi: GCC notes that 32-byte vector arguments of internal helpers change the ABI without AVX
        extra += ["-pthread", "-fvisibility=hidden", "-Wno-psabi"]

    def extension(name: str, sources: list[str]):
        return cpp_extension.CppExtension(
            name,
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra,
            extra_link_args=["-pthread"] if sys.platform != "win32" else [],
            define_macros=[("DREAMPOSE_RT_BUILD_FLAGS", '"' + " ".join(extra) + '"')],
        )

    return [extension("dreampose_rt._C", product + core), extension("dreampose_rt._C_testing", testing)]


def _cmdclass() -> dict:
    cpp_extension = _torch_cpp_extension()
    if cpp_extension is None:
        return {}
    try:  # parallel compilation of the sources when ninja is absent (torch's builder then compiles serially)
        from pybind11.setup_helpers import ParallelCompile

        ParallelCompile("MAX_JOBS").install()
    except ImportError:
        pass
    return {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


# The installed packages are the folders of the same names. benchmarks/ is not installed: the suite runs
# from a checkout (`python -m benchmarks ...`), and the runtime never imports it.
packages = find_packages(include=["dreampose", "dreampose.*", "dreampose_rt", "dreampose_rt.*"])

setup(
    packages=packages,
    package_data={"dreampose": ["configs/*/*.json", "configs/*.json"], "dreampose_rt": ["assets/*", "assets/demo_model/*", "assets/demo_model/*/*", "assets/demo_subject_lora/*"]},
    include_package_data=True,
    ext_modules=_ext_modules(),
    cmdclass=_cmdclass(),
    zip_safe=False,
)
