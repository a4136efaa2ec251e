"""CUDA graph capture, shared by the runtime and the benchmarks.

A call is warmed up on a side stream first (Triton compiles, cuDNN and cuBLAS pick algorithms and
allocate workspaces there, outside the capture), then captured once. The side stream is one per device
for the whole process: PyTorch keeps a cuBLAS workspace (32 MiB + 1 MiB for cuBLASLt on Hopper) for
every stream that ever ran a matmul, so a new stream per capture would keep ~33 MiB per capture alive
(seen on an H100: +34,603,008 bytes per render), up to the 32 streams of its pool.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

_streams: dict[torch.device, torch.cuda.Stream] = {}
_lock = threading.Lock()


def warmup_stream(device: torch.device | str | None = None) -> torch.cuda.Stream:
    """The process's side stream for ``device`` (default: the current CUDA device)."""
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {dev}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    with _lock:
        if dev not in _streams:
            _streams[dev] = torch.cuda.Stream(dev)
        return _streams[dev]


def capture(fn: Callable[[], Any], device: torch.device | str | None = None,
            warmup: int = 1, pool: Any = None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``fn`` ``warmup`` times on the warm-up stream, then capture one call of it.

    ``pool``: another graph's memory pool (``graph.pool()``) to allocate from, for graphs that are never
    replayed at the same time and pass each other nothing but tensors that stay referenced: their
    temporaries then share memory instead of each graph keeping its own.

    Returns (graph, what the captured call returned). That output is the graph's own buffer: it is written
    by each replay, not by the capture, so read it only after a replay. Whatever ``fn`` changes (state
    counters, in-place updates) has been changed ``warmup`` times: reset it before replaying.
    """
    side = warmup_stream(device)
    with torch.cuda.device(side.device):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    return graph, out
