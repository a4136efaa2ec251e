"""One answer to "can this run here?", shared by the backends, the Triton kernels and the native core.

Light on purpose (no torch): the command line and ``python -m dreampose_rt.info`` import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Availability:
    """Whether something can run on this machine, and why (not).

    ``reason`` says what it runs on when ``ok`` is True (e.g. "triton 3.6 on CUDA (H100)") and why not
    otherwise (e.g. "TensorRT's Python package is not installed"). ``bool(availability)`` is ``ok``.
    """

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    def describe(self) -> str:
        """One line for reports: "available: <reason>" or "unavailable: <reason>"."""
        state = "available" if self.ok else "unavailable"
        return f"{state}: {self.reason}" if self.reason else state


__all__ = ["Availability"]
