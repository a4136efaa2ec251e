"""Triton kernels of the runtime (optional: ``pip install dreampose-rt[kernels]``).

    from dreampose_rt.kernels import kernel_availability, guided_step, guided_step_ref

- :func:`guided_step` / :func:`guided_step_ref`: three-branch guidance + one scheduler step from the
  coefficient table, in one pass (:mod:`dreampose_rt.kernels.fused_step`: kernel, launcher, public
  function, reference); with ``guidance_cache=`` also guidance caching's refresh steps (the cache
  written) and cached steps (e(I,P) alone, the cache read). The runtime drives it through
  :class:`dreampose_rt.fused_sampler.FusedSampler`.

:func:`kernel_availability` says whether the kernel can run here, and on what or why not (an
:class:`dreampose_rt.availability.Availability`); it never raises. The other names import triton on
first use (an ImportError names the missing package).
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from ..availability import Availability

logger = logging.getLogger(__name__)

_LAZY = {
    "SUPPORTED_DTYPES": "fused_step",
    "guided_step": "fused_step",
    "guided_step_ref": "fused_step",
}
_import_error: str | None = None
_import_tried = False


def _load() -> Any | None:
    """Import the kernel module once; keep (and log once) the reason it failed."""
    global _import_error, _import_tried
    if not _import_tried:
        _import_tried = True
        try:
            importlib.import_module(".fused_step", __name__)
        except ImportError as exc:
            _import_error = f"{type(exc).__name__}: {exc}"
            logger.info("Triton kernels unavailable: %s", _import_error)
    if _import_error is not None:
        return None
    return importlib.import_module(".fused_step", __name__)


def kernel_availability() -> Availability:
    """Can :func:`guided_step` run on this machine, and on what (or why not)."""
    mod = _load()
    if mod is None:
        return Availability(False, f"triton not importable ({_import_error})")
    import torch
    import triton

    if mod._interpreting():
        return Availability(True, f"triton {triton.__version__} interpreter on the CPU "
                                  "(TRITON_INTERPRET=1: exact but slow; tests)")
    if not torch.cuda.is_available():
        hint = " (TRITON_INTERPRET was set after triton was imported)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
        return Availability(False, f"triton {triton.__version__} installed but no CUDA device{hint}")
    return Availability(True, f"triton {triton.__version__} on CUDA ({torch.cuda.get_device_name()})")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("." + _LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["kernel_availability", *sorted(_LAZY)]
