"""Scheduler configuration: one frozen dataclass for PNDM, DDIM and DPM-Solver++, read from and
written to diffusers' ``scheduler_config.json``.

Defaults are those of the matching diffusers class (``PNDMScheduler``, ``DDIMScheduler``,
``DPMSolverMultistepScheduler``); options a scheduler does not use are kept but ignored by it.
Options of diffusers that change the result and are not implemented here (clipping, thresholding,
Karras sigmas, ...) are refused with a ``ValueError`` unless they hold their neutral value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

from dreampose.settings import SCHEDULER_NAMES  # the one list of scheduler names


# diffusers class name <-> our name
DIFFUSERS_CLASS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "dpmpp": "DPMSolverMultistepScheduler"}
_FROM_DIFFUSERS_CLASS = {v: k for k, v in DIFFUSERS_CLASS.items()}

# Per-scheduler defaults that differ from the dataclass defaults (diffusers' class defaults).
_SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "pndm": {},
    "ddim": {"set_alpha_to_one": True},
    "dpmpp": {"timestep_spacing": "linspace"},
}

_CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "solver_type": ("midpoint", "heun"),
    "final_sigmas_type": ("zero", "sigma_min"),
}


def _is_neg_inf(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isinf(v) and v < 0


# diffusers options that this implementation accepts only at their neutral value: name -> test.
_NEUTRAL: dict[str, Any] = {
    "trained_betas": lambda v: v is None,
    "thresholding": lambda v: v is False,
    "rescale_betas_zero_snr": lambda v: v is False,
    "algorithm_type": lambda v: v == "dpmsolver++",
    "variance_type": lambda v: v is None,
    "lambda_min_clipped": _is_neg_inf,
    "use_karras_sigmas": lambda v: v is False,
    "use_exponential_sigmas": lambda v: v is False,
    "use_beta_sigmas": lambda v: v is False,
    "use_lu_lambdas": lambda v: v is False,
    "use_flow_sigmas": lambda v: v is False,
    "use_dynamic_shifting": lambda v: v is False,
}
# diffusers options with no effect on these samplers at any value (or only with a refused option).
_IGNORED = {"dynamic_thresholding_ratio", "sample_max_value", "clip_sample_range", "flow_shift", "time_shift_type"}


@dataclass(frozen=True)
class SchedulerConfig:
    """Options of one scheduler (immutable). Build it with :meth:`create` or :meth:`from_file`."""

    scheduler: str = "pndm"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = False  # PNDM, DDIM
    skip_prk_steps: bool = False  # PNDM
    solver_order: int = 2  # DPM-Solver++ (1 or 2)
    solver_type: str = "midpoint"  # DPM-Solver++
    lower_order_final: bool = True  # DPM-Solver++
    euler_at_final: bool = False  # DPM-Solver++
    final_sigmas_type: str = "zero"  # DPM-Solver++

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {self.scheduler!r} (choose one of {', '.join(SCHEDULER_NAMES)})")
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not supported (choose one of {', '.join(choices)})")
        for name in ("num_train_timesteps", "steps_offset", "solver_order"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        for name in ("set_alpha_to_one", "skip_prk_steps", "lower_order_final", "euler_at_final"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {self.steps_offset}")
        if not (0.0 < float(self.beta_start) < 1.0 and 0.0 < float(self.beta_end) < 1.0):
            raise ValueError(f"beta_start and beta_end must be in (0, 1), got {self.beta_start}, {self.beta_end}")
        if self.solver_order not in (1, 2):
            raise ValueError(f"solver_order={self.solver_order} is not supported (choose 1 or 2)")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def create(cls, scheduler: str, options: Mapping[str, Any] | None = None, **overrides: Any) -> "SchedulerConfig":
        """Config for ``scheduler`` ("pndm", "ddim", "dpmpp") from diffusers-style ``options`` (e.g. the
        contents of a scheduler_config.json, possibly of another scheduler class) and ``overrides``.
        Missing options take ``scheduler``'s diffusers defaults. Raises ``ValueError`` naming an
        unknown scheduler or option, or an option value that is not supported."""
        if scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {scheduler!r} (choose one of {', '.join(SCHEDULER_NAMES)})")
        fields = {f.name for f in dataclasses.fields(cls)} - {"scheduler"}
        values: dict[str, Any] = dict(_SCHEDULER_DEFAULTS[scheduler])
        merged = dict(options or {})
        merged.update(overrides)
        for key, value in merged.items():
            if key.startswith("_") or key in _IGNORED or key == "scheduler":
                continue
            if key == "clip_sample":
                if value and scheduler == "ddim":
                    raise ValueError("clip_sample=True is not supported (DDIM here never clips x0)")
                continue
            if key in _NEUTRAL:
                if not _NEUTRAL[key](value):
                    raise ValueError(f"option {key}={value!r} is not supported by this implementation")
                continue
            if key not in fields:
                raise ValueError(f"unknown scheduler option {key!r}")
            values[key] = value
        return cls(scheduler=scheduler, **values)

    @classmethod
    def from_file(cls, path: str | os.PathLike, scheduler: str | None = None, **overrides: Any) -> "SchedulerConfig":
        """Read a ``scheduler_config.json`` (ours or diffusers'), or a model folder holding
        ``scheduler/scheduler_config.json`` or ``scheduler_config.json``. ``scheduler`` defaults to
        the file's own (its "scheduler" key or diffusers "_class_name")."""
        path = resolve_config_path(path)
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        if scheduler is None:
            scheduler = data.get("scheduler") or _FROM_DIFFUSERS_CLASS.get(data.get("_class_name", ""))
            if scheduler is None:
                raise ValueError(
                    f"{path}: cannot tell the scheduler (_class_name={data.get('_class_name')!r}); pass scheduler="
                )
        return cls.create(scheduler, data, **overrides)

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All options plus diffusers' "_class_name" (diffusers can read the file back)."""
        d = dataclasses.asdict(self)
        d["_class_name"] = DIFFUSERS_CLASS[self.scheduler]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, path: str | os.PathLike) -> str:
        """Write the JSON to ``path`` (a file, or a folder that gets ``scheduler_config.json``)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "scheduler_config.json")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json())
        return path

    def replace(self, **changes: Any) -> "SchedulerConfig":
        """A copy with ``changes`` applied (validated like :meth:`create`)."""
        return SchedulerConfig.create(self.scheduler, {**dataclasses.asdict(self), **changes})


def resolve_config_path(path: str | os.PathLike) -> str:
    """The scheduler_config.json that ``path`` (a file or a model folder) names."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for candidate in (os.path.join(path, "scheduler", "scheduler_config.json"), os.path.join(path, "scheduler_config.json")):
            if os.path.isfile(candidate):
                return candidate
        raise ValueError(f"no scheduler/scheduler_config.json or scheduler_config.json in {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"scheduler config {path!r} does not exist")
    return path
