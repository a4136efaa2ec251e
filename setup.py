"""Build script: the Python packages plus the C++ extension ``dreampose_rt._C``.

The extension is plain C++17 (no CUDA, no torch headers) and builds on every machine.
Environment variables:

* ``DREAMPOSE_RT_SKIP_EXT=1``: do not build the extension (the pure-Python fallbacks are used).
* ``DREAMPOSE_RT_DEBUG=1``: build the extension with ``-O0 -g``.
* ``MAX_JOBS``: parallel compile jobs (default: the number of CPUs).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _ext_modules() -> list:
    if os.environ.get("DREAMPOSE_RT_SKIP_EXT", "0") == "1":
        return []
    from pybind11.setup_helpers import Pybind11Extension

    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    debug = os.environ.get("DREAMPOSE_RT_DEBUG", "0") == "1"
    extra = ["-O0", "-g"] if debug else ["-O3"]
    if sys.platform != "win32":
        # -Wno-psabi: GCC notes that 32-byte vector arguments of internal helpers change the ABI without AVX
        extra += ["-pthread", "-fvisibility=hidden", "-Wno-psabi"]
    return [
        Pybind11Extension(
            "dreampose_rt._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            cxx_std=17,
            extra_compile_args=extra,
            extra_link_args=["-pthread"] if sys.platform != "win32" else [],
            define_macros=[("DREAMPOSE_RT_BUILD_FLAGS", '"' + " ".join(extra) + '"')],
        )
    ]


def _cmdclass() -> dict:
    try:
        from pybind11.setup_helpers import ParallelCompile, build_ext

        ParallelCompile("MAX_JOBS").install()
        return {"build_ext": build_ext}
    except ImportError:  # pragma: no cover - pybind11 is a build requirement
        return {}


packages = find_packages(include=["dreampose", "dreampose.*", "dreampose_rt", "dreampose_rt.*"])
# export/ and benchmarks/ live at the top level of the repository but install inside dreampose_rt.
packages += ["dreampose_rt.export", "dreampose_rt.benchmarks"]

setup(
    packages=packages,
    package_dir={"dreampose_rt.export": "export", "dreampose_rt.benchmarks": "benchmarks"},
    package_data={"dreampose": ["configs/*/*.json", "configs/*.json"], "dreampose_rt": ["assets/*", "assets/demo_model/*", "assets/demo_model/*/*"]},
    include_package_data=True,
    ext_modules=_ext_modules(),
    cmdclass=_cmdclass(),
    zip_safe=False,
)
