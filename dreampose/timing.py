"""Optional phase timing hooks for the pipeline and the runtime (used by the benchmark suite).

A *timer* is any object with ``phase(name) -> context manager``. The reference pipeline and the
runtime hold ``timer = None`` by default and wrap each phase of a render in ``timed(self.timer, name)``;
with no timer that is a shared ``nullcontext`` (no allocation, no clock read). The phases:

* ``encode``           subject conditioning (CLIP + VAE encoder + adapter)
* ``unet``             one UNet call (3F samples)
* ``guidance_update``  the three-branch guidance combine and the scheduler update
* ``decode``           VAE decode to frames
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Protocol

PHASES = ("encode", "unet", "guidance_update", "decode")

_NULL = contextlib.nullcontext()


class PhaseTimer(Protocol):
    """What the pipeline and the runtime call around each phase."""

    def phase(self, name: str) -> ContextManager[None]: ...


def timed(timer: PhaseTimer | None, name: str) -> ContextManager[None]:
    """``timer.phase(name)``, or a no-op context when ``timer`` is None."""
    return _NULL if timer is None else timer.phase(name)
