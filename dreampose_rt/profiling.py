"""NVTX ranges, so that an Nsight Systems profile reads at a glance (encode, each step, decode).

``nvtx_range(name)`` is torch's NVTX range on a CUDA machine, the ``nvtx`` package's where only it is
installed, and a no-op otherwise: free to leave in hot paths.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def _factory():
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range
    try:
        import nvtx

        return lambda name: nvtx.annotate(name, domain="dreampose-rt")
    except ImportError:
        return lambda name: contextlib.nullcontext()


_RANGE = _factory()


def nvtx_range(name: str) -> ContextManager:
    """A context manager that marks ``name`` on the NVTX timeline (or does nothing)."""
    return _RANGE(name)
