"""dreampose-rt: the optimized DreamPose inference runtime.

``from dreampose_rt import Runtime`` (imported lazily, so that ``python -m dreampose_rt.info`` and the
command line start fast).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Runtime", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Runtime":
        from .runtime import Runtime

        return Runtime
    raise AttributeError(f"module 'dreampose_rt' has no attribute {name!r}")
