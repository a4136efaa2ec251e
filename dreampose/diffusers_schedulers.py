"""diffusers' own schedulers, built for the reference pipeline: the correctness oracle.

``pndm`` (PLMS with skip_prk_steps, the paper's), ``ddim`` (eta = 0) and ``dpmpp`` (DPM-Solver++
multistep, order 2), all built from the model folder's scheduler config. The runtime's schedulers
(dreampose_rt.scheduler: a C++ core with a pure-Python fallback) are checked against these.
"""

from __future__ import annotations

from typing import Any

from .settings import SCHEDULER_NAMES, check_choice


def make_diffusers_scheduler(name: str, config: dict, **overrides: Any) -> Any:
    """A fresh diffusers scheduler ``name`` (one of SCHEDULER_NAMES) built from ``config`` (a
    scheduler_config.json dict), with ``overrides`` replacing its options."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    check_choice("scheduler", name, SCHEDULER_NAMES)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg.update(overrides)
    if name == "pndm":
        return PNDMScheduler.from_config(cfg)
    if name == "ddim":
        return DDIMScheduler.from_config(cfg)
    cfg.setdefault("algorithm_type", "dpmsolver++")
    cfg.setdefault("solver_order", 2)
    return DPMSolverMultistepScheduler.from_config(cfg)
