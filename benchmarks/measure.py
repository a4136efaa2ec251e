"""Measuring instruments for the benchmark suite: phase timers, peak memory, FLOP counts, device facts.

* :class:`PhaseRecorder` is a ``dreampose.timing`` phase timer: CUDA events on a GPU (recorded in the
  stream, read after one synchronisation at the end of the render, so timing does not serialise the
  pipeline), ``time.perf_counter`` on the CPU.
* :class:`MemoryMeter` gives the peak memory of one render: on CUDA the torch allocator's
  ``max_memory_allocated`` (reset before the render); on the CPU the process's resident-set high-water
  mark (``VmHWM``, reset through ``/proc/self/clear_refs`` on Linux).
* :func:`count_flops` counts the FLOPs of a call with ``torch.utils.flop_counter`` on a *meta* copy of the
  module: exact shapes, no arithmetic, and attention counted (SDPA decomposes to matmuls on meta; on the
  CPU the fused kernel is not counted).
* :func:`device_peak_tflops`: the dense fp16/bf16 tensor peak of a GPU by name (a small table).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import itertools
import logging
import os
import platform
import re
import subprocess
import time
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch
from torch import nn

from dreampose.flops import count_flops, dreampose_flops, meta_copy  # noqa: F401  (the benchmarks' names)

logger = logging.getLogger(__name__)

#: (name substring, dense fp16/bf16 tensor-core TFLOP/s, source); the first match wins (most specific first).
PEAK_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H200", 800.0, "as measured on the project's H100 (bf16 8192^3 matmul, 798): same compute die; spec 989"),
    ("H100 PCIe", 756.0, "vendor spec, dense fp16"),
    ("H100", 800.0, "measured on the project's H100 SXM (bf16 8192^3 matmul, 798; performance.md); spec 989"),
    ("A100", 312.0, "vendor spec, dense fp16"),
    ("L40S", 362.0, "vendor spec, dense fp16"),
    ("L4", 121.0, "vendor spec, dense fp16"),
    ("V100", 125.0, "vendor spec, dense fp16"),
    ("T4", 65.0, "vendor spec, dense fp16"),
)


# --------------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------------
class PhaseRecorder:
    """Accumulates the time and the number of calls of each phase of a render (a dreampose.timing timer).

    Args:
        device: the device the render runs on (CUDA events on a GPU, wall clock on the CPU).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._seconds: dict[str, float] = defaultdict(float)
        self._calls: dict[str, int] = defaultdict(int)
        self._events: list[tuple[str, Any, Any]] = []

    def reset(self) -> None:
        self._seconds.clear()
        self._calls.clear()
        self._events.clear()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._seconds[name] += time.perf_counter() - t0
        self._calls[name] += 1

    def collect(self) -> dict[str, tuple[float, int]]:
        """phase -> (total seconds, calls) since the last reset (synchronises on CUDA)."""
        if self.cuda and self._events:
            self._events[-1][2].synchronize()
            for name, start, end in self._events:
                self._seconds[name] += start.elapsed_time(end) * 1e-3
            self._events.clear()
        return {k: (self._seconds[k], self._calls[k]) for k in self._calls}


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds taken by ``fn()``: CUDA events around it after a synchronisation on a GPU, else wall clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Peak memory of the code run between :meth:`start` and :meth:`stop`.

    ``kind`` says what is measured: ``cuda_max_allocated`` (the torch CUDA allocator: tensors only, not
    the CUDA context, cuBLAS workspaces or memory that engines allocate outside torch),
    ``process_rss_peak`` (the whole process's resident set high-water mark during the window) or
    ``process_rss_lifetime_peak`` (where the high-water mark cannot be reset: the process's maximum so far).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        else:
            self.kind = "process_rss_peak" if _reset_rss_peak() and _proc_status_kib("VmHWM") else "process_rss_lifetime_peak"
        self._before = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "process_rss_peak":
            _reset_rss_peak()

    def stop(self) -> dict[str, int]:
        """{'peak_bytes': high-water mark, 'before_bytes': level at start} (both of the measured kind)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {"peak_bytes": torch.cuda.max_memory_allocated(self.device), "before_bytes": self._before}
        if self.kind == "process_rss_peak":
            return {"peak_bytes": 1024 * (_proc_status_kib("VmHWM") or 0), "before_bytes": 0}
        import resource

        return {"peak_bytes": 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "before_bytes": 0}


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------
def device_peak_tflops(name: str) -> tuple[float | None, str]:
    """(dense fp16/bf16 TFLOP/s, source) for a GPU name, or (None, why not) when it is not in the table."""
    for key, tflops, source in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops, f"{key}: {source}"
    return None, f"{name!r} is not in the peak table (pass --peak-tflops)"


# --------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_smi(index: int) -> dict[str, str]:
    fields = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={index}", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0 or not out.stdout.strip():
        return {}
    return dict(zip(fields.split(","), (v.strip() for v in out.stdout.strip().split(","))))


def device_info(device: torch.device) -> dict[str, Any]:
    """Name and facts of the device (GPU properties, clocks where nvidia-smi answers; CPU model, threads)."""
    info: dict[str, Any] = {
        "type": device.type,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):  # other work on the machine skews CPU timings: say how busy it was
        info["load_average_1m_at_start"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            total_memory_bytes=props.total_memory,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            nvidia_smi=_nvidia_smi(index),
        )
    else:
        info["name"] = info["cpu"]
    return info


def versions() -> dict[str, str | None]:
    """Versions of everything that decides the numbers."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "triton": _version("triton"),
        "tensorrt": _version("tensorrt") or _version("tensorrt-lean"),
        "numpy": _version("numpy"),
        "dreampose-rt": _version("dreampose-rt"),
        "git_commit": _git_commit(),
    }


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def today() -> str:
    return datetime.date.today().isoformat()
