"""The settings users give, each defined, validated and saved in one place.

- :class:`SamplingSettings`: how a render samples (scheduler, steps, guidance scales, seed, noise). Built
  once where the user's input enters (the command line, ``Runtime.render``, ``DreamPosePipeline``,
  ``evaluate``, the benchmark), checked there, and passed down by keyword: nothing below validates again.
- :class:`EvalProtocol`: what ``evaluate`` renders and scores (the test videos, the subject and target frames).
- The names the rest of the project chooses from: :data:`SCHEDULER_NAMES`, :data:`NOISE_MODES`,
  :data:`PRECISIONS`.

This module imports neither torch nor numpy: the command line builds its parser from it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import os
from dataclasses import dataclass
from typing import Any

from .utils import DreamPoseError, dataclass_from_dict

#: The samplers (diffusers' names in dreampose.diffusers_schedulers, ours in dreampose_rt.scheduler):
#: PNDM (PLMS, the paper's), DDIM (eta 0) and DPM-Solver++ (2M).
SCHEDULER_NAMES = ("pndm", "ddim", "dpmpp")
#: "shared": one starting noise for every frame (the paper's); "per-frame": frame i's own noise.
NOISE_MODES = ("shared", "per-frame")
#: Numeric precisions of the networks at inference (training's mixed precision has its own names).
PRECISIONS = ("fp32", "fp16", "bf16")
#: The largest number of denoising steps (the schedulers have 1000 training timesteps).
MAX_STEPS = 1000


def torch_dtype(precision: str) -> Any:
    """'fp32' / 'fp16' / 'bf16' -> the torch dtype (imports torch)."""
    import torch

    check_choice("precision", precision, PRECISIONS)
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def precision_of(dtype: Any) -> str:
    """torch dtype -> 'fp32' / 'fp16' / 'bf16' (the inverse of :func:`torch_dtype`); other dtypes by name."""
    return {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(
        str(dtype), str(dtype).replace("torch.", ""))


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a DreamPoseError naming ``name`` and the choices."""
    if not isinstance(value, str) or value not in choices:
        raise DreamPoseError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def _is_scalar_tensor(value: Any) -> bool:
    """A one-element torch tensor (checked without importing torch)."""
    return type(value).__module__.startswith("torch") and getattr(value, "numel", lambda: 0)() == 1


def check_int(name: str, value: Any, low: int | None, high: int | None = None) -> int:
    """``value`` as an int if it is an integer (a Python or NumPy integer, a 0-d integer tensor; not a bool)
    in ``[low, high]`` (None: unbounded), else a DreamPoseError naming ``name``."""
    if isinstance(value, bool):
        raise DreamPoseError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise DreamPoseError(f"{name} must be an integer, got {value!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"<= {high}" if low is None else f"between {low} and {high}"
        raise DreamPoseError(f"{name} must be {bound}, got {value}")
    return value


def check_float(name: str, value: Any, low: float | None = None, low_open: bool = False) -> float:
    """``value`` as a finite float (any real number: Python, NumPy, a 0-d tensor; and > or >= ``low``), else a
    DreamPoseError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) and not _is_scalar_tensor(value):
        raise DreamPoseError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise DreamPoseError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise DreamPoseError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    return value


@dataclass(frozen=True)
class SamplingSettings:
    """How one render samples: every value resolved and checked on construction.

    Attributes:
        scheduler: one of :data:`SCHEDULER_NAMES` ('pndm' is the paper's).
        steps: denoising steps, 1 .. :data:`MAX_STEPS` (the paper: 100 PNDM steps = 101 UNet calls).
        s_image, s_pose: the dual classifier-free guidance scales (finite; see dreampose.guidance).
        seed: the noise seed (a frame's noise depends only on (seed, frame), see dreampose.pipeline).
        noise: one of :data:`NOISE_MODES`.

    Build it with :meth:`for_model` (the model's defaults for what is not given) where the user's input
    enters; pass it down as is.
    """

    scheduler: str = "pndm"
    steps: int = 100
    s_image: float = 8.0
    s_pose: float = 3.0
    seed: int = 0
    noise: str = "shared"

    def __post_init__(self) -> None:
        check_choice("scheduler", self.scheduler, SCHEDULER_NAMES)
        object.__setattr__(self, "steps", check_int("steps", self.steps, 1, MAX_STEPS))
        object.__setattr__(self, "s_image", check_float("s_image", self.s_image))
        object.__setattr__(self, "s_pose", check_float("s_pose", self.s_pose))
        object.__setattr__(self, "seed", check_int("seed", self.seed, None))  # any integer (used modulo 2**64)
        check_choice("noise", self.noise, NOISE_MODES)

    @classmethod
    def for_model(cls, config: Any = None, **given: Any) -> "SamplingSettings":
        """Settings for a model whose config (a DreamPoseConfig; None: the paper's) gives the defaults of
        ``steps``, ``s_image`` and ``s_pose``; ``given`` values that are not None win. An unknown name is a
        DreamPoseError that names it."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise DreamPoseError(f"unknown sampling setting(s) {', '.join(unknown)}; the settings are {', '.join(names)}")
        values: dict[str, Any] = {}
        if config is not None:
            values = {"steps": config.num_inference_steps, "s_image": config.s_image, "s_pose": config.s_pose}
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> "SamplingSettings":
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "sampling settings") -> "SamplingSettings":
        return dataclass_from_dict(cls, data, source)


def sampling_settings(config: Any, settings: SamplingSettings | None, given: dict[str, Any]) -> SamplingSettings:
    """A render's SamplingSettings, for API entry points that take either: ``settings`` as given, or one
    built from ``given`` keyword values (None: the model's defaults from ``config``). Both at once is an
    error, as is a name that is not a setting."""
    if settings is None:
        return SamplingSettings.for_model(config, **given)
    if not isinstance(settings, SamplingSettings):
        raise DreamPoseError(f"settings must be a SamplingSettings, got {type(settings).__name__}")
    extra = sorted(k for k, v in given.items() if v is not None)
    if extra:
        raise DreamPoseError(f"give either settings or {', '.join(extra)}, not both")
    return settings


#: The SynthFashion seed of the held-out test set (the demo model trains on seed 0, tunes its guidance on 2).
TEST_SEED = 1000


@dataclass(frozen=True)
class EvalProtocol:
    """What ``evaluate`` renders and scores (dreampose.evaluation documents the whole protocol).

    Attributes:
        data: "synth" (SynthFashion held out, seed ``seed``) or a UBC-layout folder.
        seed: SynthFashion seed of the test set.
        videos: test videos (a UBC folder: the first ``videos`` in name order).
        n_frames: frames per video (SynthFashion; a UBC folder: at most this many).
        subject_frame: the frame whose image is the subject.
        first_target, stride, max_targets: the target frames ``first_target, first_target + stride, ...``
            (at most ``max_targets``, never the subject frame).
        fvd_clip: FVD clip length, in consecutive targets.
    """

    data: str = "synth"
    seed: int = TEST_SEED
    videos: int = 8
    n_frames: int = 16
    subject_frame: int = 0
    first_target: int = 2
    stride: int = 2
    max_targets: int = 7
    fvd_clip: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.data, os.PathLike):
            object.__setattr__(self, "data", os.fspath(self.data))
        if not isinstance(self.data, str) or not self.data:
            raise DreamPoseError(f"data must be 'synth' or a folder, got {self.data!r}")
        check_int("seed", self.seed, 0)
        for name in ("videos", "n_frames", "stride", "max_targets", "fvd_clip"):
            check_int(name, getattr(self, name), 1)
        check_int("subject_frame", self.subject_frame, 0)
        check_int("first_target", self.first_target, 0)

    def targets(self, n_frames: int) -> list[int]:
        """The target frame indices of a video of ``n_frames`` frames."""
        out = [k for k in range(self.first_target, n_frames, self.stride) if k != self.subject_frame]
        if not out:
            raise DreamPoseError(f"a video of {n_frames} frames has no target frame under {self}")
        return out[: self.max_targets]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


__all__ = [
    "EvalProtocol",
    "MAX_STEPS",
    "NOISE_MODES",
    "PRECISIONS",
    "SCHEDULER_NAMES",
    "SamplingSettings",
    "TEST_SEED",
    "check_choice",
    "check_float",
    "check_int",
    "precision_of",
    "sampling_settings",
    "torch_dtype",
]
