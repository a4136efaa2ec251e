"""Training: stage 1 (base model on a video dataset), stage 2 (one subject) and the VAE-decoder finetune.

See docs/training.md. ``train_stage1`` and ``finetune`` run on one device or, under ``accelerate launch``,
on several (DDP). The names below are imported on first use, so that the command line (which registers
``train`` and ``finetune`` from dreampose.training.cli) does not pay for torch to build its parser.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FinetuneConfig": "config",
    "Stage1Config": "config",
    "finetune": "stage2",
    "train_stage1": "stage1",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
