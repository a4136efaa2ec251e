"""Diffusion schedulers (PNDM, DDIM, DPM-Solver++) with a C++ core and a pure-Python fallback.

    from dreampose_rt.scheduler import create_scheduler
    sched = create_scheduler("pndm", "path/to/model")      # reads scheduler/scheduler_config.json
    sched.set_timesteps(100)
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(x, t), t)        # (3F, 4, h, w), branch-major
        x = sched.step_guided(eps, t, x, s_image, s_pose).prev_sample
    # guidance caching: step_guided(eps, t, x, s_image, s_pose, guidance_cache=cache) with eps (3F, ...)
    # refreshes the (2, F, 4, h, w) fp32 cache, with eps (F, ...) (e(I,P) alone) reads it

``implementation=`` ("auto", "cpp", "python": :data:`IMPLEMENTATIONS`) chooses the C++ core
(``dreampose_rt._C``) or the pure-Python one (:mod:`.python_core`); :func:`native_core_availability`
says whether the C++ core can run here, and why not. ``coefficient_table()`` gives the whole run as a
table (layout: :mod:`dreampose_rt.scheduler.table`).
"""

from .config import SCHEDULER_NAMES, SchedulerConfig
from .schedulers import (
    IMPLEMENTATIONS,
    SCHEDULER_CLASSES,
    DDIMScheduler,
    DiffusionScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    SchedulerOutput,
    create_scheduler,
    native_core,
    native_core_availability,
    resolve_implementation,
)
from .table import (
    COLUMNS,
    MAX_HISTORY,
    NUM_COLUMNS,
    StepState,
    TableInfo,
    guidance_cached_ref,
    guidance_combine_ref,
    table_step_ref,
)

__all__ = [
    "COLUMNS",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "DiffusionScheduler",
    "IMPLEMENTATIONS",
    "MAX_HISTORY",
    "NUM_COLUMNS",
    "PNDMScheduler",
    "SCHEDULER_CLASSES",
    "SCHEDULER_NAMES",
    "SchedulerConfig",
    "SchedulerOutput",
    "StepState",
    "TableInfo",
    "create_scheduler",
    "guidance_cached_ref",
    "guidance_combine_ref",
    "native_core",
    "native_core_availability",
    "resolve_implementation",
    "table_step_ref",
]
