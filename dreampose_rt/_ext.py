"""Loads the native extension ``dreampose_rt._C`` once and remembers why it failed, if it did.

Callers ask :func:`load_extension` (the module or ``None``) and :func:`extension_availability` (an
:class:`~dreampose_rt.availability.Availability`: loaded, or the reason it is not); each op decides
whether to fall back and says so once (see ``dreampose_rt.scheduler``). The extension is compiled against
torch's headers, so it is refused (with the reason) under another torch version. Set
``DREAMPOSE_RT_NO_EXT=1`` to run as if the extension were missing. (The tests' hooks live in a separate
module, ``dreampose_rt._C_testing``, which nothing here loads.)
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from types import ModuleType

from .availability import Availability

_lock = threading.Lock()
_tried = False
_module: ModuleType | None = None
_error: str | None = None


def torch_release(version: str) -> str:
    """"MAJOR.MINOR.PATCH" of a torch version string: "2.6.0a0+git1234" -> "2.6.0" (as torch/version.h has it)."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", str(version))
    return ".".join(m.groups()) if m else str(version)


def load_extension() -> ModuleType | None:
    """Return ``dreampose_rt._C``, or ``None`` if it cannot be imported (why: :func:`extension_availability`)."""
    global _tried, _module, _error
    if _tried:
        return _module
    with _lock:
        if not _tried:
            if os.environ.get("DREAMPOSE_RT_NO_EXT", "0") == "1":
                _error = "disabled by DREAMPOSE_RT_NO_EXT=1"
            else:
                try:
                    import torch  # (loads libc10/libtorch, which the extension links against)

                    mod = importlib.import_module("dreampose_rt._C")
                    built = getattr(mod, "torch_version", None)
                    running = torch_release(torch.__version__)
                    if built is not None and torch_release(built) != running:
                        _error = (f"dreampose_rt._C was built against torch {built}, this is torch {running}: "
                                  "rebuild it with `pip install --no-build-isolation -e .`")
                    else:
                        _module = mod
                except ImportError as exc:  # not built, wrong ABI, missing symbol
                    _error = f"{type(exc).__name__}: {exc}"
                    if isinstance(exc, ModuleNotFoundError) and exc.name == "dreampose_rt._C":
                        _error += (" (it is built next to an installed torch: "
                                   "`pip install --no-build-isolation -e .`)")
            _tried = True
    return _module


def extension_availability() -> Availability:
    """Whether ``dreampose_rt._C`` loaded (and the torch it was built against), or why not (loads it if needed)."""
    mod = load_extension()
    if mod is None:
        return Availability(False, _error or "dreampose_rt._C did not load")
    return Availability(True, f"dreampose_rt._C built against torch {getattr(mod, 'torch_version', '?')}")
