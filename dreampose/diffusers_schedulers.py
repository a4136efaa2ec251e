"""Schedulers of the reference pipeline: diffusers' own implementations (the oracle).

``pndm`` (PLMS with skip_prk_steps, the paper's), ``ddim`` (eta = 0) and ``dpmpp`` (DPM-Solver++
multistep, order 2), all built from the model folder's scheduler config.
"""

from __future__ import annotations

from typing import Any

from .utils import DreamPoseError

SCHEDULERS = ("pndm", "ddim", "dpmpp")


def make_scheduler(name: str, config: dict, **overrides: Any) -> Any:
    """A fresh diffusers scheduler ``name`` built from ``config`` (a scheduler_config.json dict)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg.update(overrides)
    if name == "pndm":
        return PNDMScheduler.from_config(cfg)
    if name == "ddim":
        return DDIMScheduler.from_config(cfg)
    if name == "dpmpp":
        cfg.setdefault("algorithm_type", "dpmsolver++")
        cfg.setdefault("solver_order", 2)
        return DPMSolverMultistepScheduler.from_config(cfg)
    raise DreamPoseError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
