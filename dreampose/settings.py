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
class GuidanceCache:
    """Which steps evaluate all three guidance branches (a *refresh*); the others evaluate only the
    image-and-pose branch and reuse the last refresh's guidance differences (dreampose.guidance).

    Step k of a run of n UNet calls refreshes when k < ``first``, or when k < ``until`` x n and
    k % ``every`` == 0; step 0 always does. ``every=1, until=1`` (the default) refreshes every step: no
    caching, the exact run. ``until < 1`` leaves the late steps, where guidance changes little, uncached.
    """

    every: int = 1
    first: int = 1
    until: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "every", check_int("guidance_cache.every", self.every, 1))
        object.__setattr__(self, "first", check_int("guidance_cache.first", self.first, 1))
        until = check_float("guidance_cache.until", self.until, 0.0, low_open=True)
        if until > 1.0:
            raise DreamPoseError(f"guidance_cache.until must be in (0, 1], got {until:g}")
        object.__setattr__(self, "until", until)

    @property
    def enabled(self) -> bool:
        return self.every > 1 or self.until < 1.0

    def refresh(self, num_calls: int) -> list[bool]:
        """For each of ``num_calls`` UNet calls: does it evaluate all three branches?"""
        return [k < self.first or (k < self.until * num_calls and k % self.every == 0) for k in range(num_calls)]

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        late = f", none after {self.until:.0%} of the steps" if self.until < 1 else ""
        return f"3 branches every {self.every} steps (the first {self.first} always){late}"


@dataclass(frozen=True)
class FeatureCache:
    """Deep-feature caching (DeepCache, arXiv 2312.00858): every ``every``-th UNet call is *full*; the
    calls between run only the UNet's outermost down and up blocks and reuse the deeper features of the
    last full call (dreampose.deep_cache). Calls after ``until`` x n are all full. ``every=1`` (the
    default): every call is full, no caching."""

    every: int = 1
    until: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "every", check_int("feature_cache.every", self.every, 1))
        until = check_float("feature_cache.until", self.until, 0.0, low_open=True)
        if until > 1.0:
            raise DreamPoseError(f"feature_cache.until must be in (0, 1], got {until:g}")
        object.__setattr__(self, "until", until)

    @property
    def enabled(self) -> bool:
        return self.every > 1

    def full(self, num_calls: int) -> list[bool]:
        """For each of ``num_calls`` UNet calls: does it run the whole UNet?"""
        return [k % self.every == 0 or k >= self.until * num_calls for k in range(num_calls)]

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        late = f", all full after {self.until:.0%} of the steps" if self.until < 1 else ""
        return f"the whole UNet every {self.every} calls, the outer blocks between{late}"


def call_plan(guidance: GuidanceCache, features: FeatureCache, num_calls: int) -> list[tuple[bool, bool]]:
    """(refresh, full) for each UNet call of a run: whether it evaluates all three guidance branches, and
    whether it runs the whole UNet. A refresh call is shallow only if the last full call evaluated all
    three branches too (the deep features it reuses must exist for every branch); call 0 is both."""
    plan = []
    deep_has_all = False
    for refresh, full in zip(guidance.refresh(num_calls), features.full(num_calls)):
        if refresh and not deep_has_all:
            full = True
        if full:
            deep_has_all = refresh
        plan.append((refresh, full))
    return plan


@dataclass(frozen=True)
class SamplingSettings:
    """How one render samples: every value resolved and checked on construction.

    Attributes:
        scheduler: one of :data:`SCHEDULER_NAMES` ('pndm' is the paper's).
        steps: denoising steps, 1 .. :data:`MAX_STEPS` (the paper: 100 PNDM steps = 101 UNet calls).
        s_image, s_pose: the dual classifier-free guidance scales (finite; see dreampose.guidance).
        seed: the noise seed (a frame's noise depends only on (seed, frame), see dreampose.pipeline).
        noise: one of :data:`NOISE_MODES`.
        guidance_cache, feature_cache: which UNet calls evaluate fewer branches or fewer blocks (both off
            by default: the exact run).
        quality: the preset the values come from (:data:`QUALITY_PRESETS`), or "custom" when a value the
            preset sets was given otherwise.

    Build it with :meth:`for_model` (a preset, the model's defaults for what is not given) where the
    user's input enters; pass it down as is.
    """

    scheduler: str = "pndm"
    steps: int = 100
    s_image: float = 8.0
    s_pose: float = 3.0
    seed: int = 0
    noise: str = "shared"
    guidance_cache: GuidanceCache = GuidanceCache()
    feature_cache: FeatureCache = FeatureCache()
    quality: str = "exact"

    def __post_init__(self) -> None:
        for name, cls in (("guidance_cache", GuidanceCache), ("feature_cache", FeatureCache)):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, dataclass_from_dict(cls, value, name))
            elif not isinstance(value, cls):
                raise DreamPoseError(f"{name} must be a {cls.__name__}, got {value!r}")
        check_choice("quality", self.quality, (*QUALITY_PRESETS, "custom"))
        preset = QUALITY_PRESETS.get(self.quality, {})
        if any(getattr(self, k) != v for k, v in preset.items()):
            object.__setattr__(self, "quality", "custom")  # the label says where the values come from
        check_choice("scheduler", self.scheduler, SCHEDULER_NAMES)
        object.__setattr__(self, "steps", check_int("steps", self.steps, 1, MAX_STEPS))
        object.__setattr__(self, "s_image", check_float("s_image", self.s_image))
        object.__setattr__(self, "s_pose", check_float("s_pose", self.s_pose))
        object.__setattr__(self, "seed", check_int("seed", self.seed, None))  # any integer (used modulo 2**64)
        check_choice("noise", self.noise, NOISE_MODES)

    @classmethod
    def for_model(cls, config: Any = None, **given: Any) -> "SamplingSettings":
        """Settings for a model whose config (a DreamPoseConfig; None: the paper's) gives the defaults of
        ``steps``, ``s_image`` and ``s_pose``; ``quality`` (a :data:`QUALITY_PRESETS` name, default
        "exact") sets the scheduler, the steps and the caching; the other ``given`` values that are not
        None win (the quality then reads "custom" if one of them differs from the preset's). An unknown
        name is a DreamPoseError that names it."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise DreamPoseError(f"unknown sampling setting(s) {', '.join(unknown)}; the settings are {', '.join(names)}")
        quality = given.pop("quality", None) or "exact"
        check_choice("quality", quality, tuple(QUALITY_PRESETS))
        values: dict[str, Any] = {}
        if config is not None:
            values = {"steps": config.num_inference_steps, "s_image": config.s_image, "s_pose": config.s_pose}
        preset = dict(QUALITY_PRESETS[quality])
        if quality == "exact" and config is not None:
            preset["steps"] = config.num_inference_steps  # the paper's settings, as the model folder gives them
        values.update(preset)
        given = {k: v for k, v in given.items() if v is not None}
        overridden = any(k in preset and given[k] != preset[k] for k in given)
        values.update(given)
        return cls(**values, quality="custom" if overridden else quality)

    @property
    def caching(self) -> bool:
        """Does any UNet call evaluate fewer branches or blocks (an approximation of the exact run)?"""
        return self.guidance_cache.enabled or self.feature_cache.enabled

    def call_plan(self, num_calls: int) -> list[tuple[bool, bool]]:
        """(refresh, full) for each of the run's ``num_calls`` UNet calls (see :func:`call_plan`)."""
        return call_plan(self.guidance_cache, self.feature_cache, num_calls)

    def replace(self, **changes: Any) -> "SamplingSettings":
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "sampling settings") -> "SamplingSettings":
        data = dict(data)
        for name, sub in (("guidance_cache", GuidanceCache), ("feature_cache", FeatureCache)):
            if isinstance(data.get(name), dict):
                data[name] = dataclass_from_dict(sub, data[name], f"{source} [{name}]")
        return dataclass_from_dict(cls, data, source)


#: The quality presets: each a scheduler, a step count and a caching policy (the model's own values for
#: what a preset does not set). "exact" is the paper's sampler; the others trade UNet evaluations for a
#: measured cost in quality (docs/quality.md has the table that chose them).
QUALITY_PRESETS: dict[str, dict[str, Any]] = {
    "exact": {"scheduler": "pndm", "guidance_cache": GuidanceCache(), "feature_cache": FeatureCache()},
    # PNDM 100 as the paper, 3 branches every 6th call, the whole UNet every 2nd: 0.356 of the exact FLOPs
    # (SD 1.5); on the demo model PSNR 47 dB to the exact frames, SSIM -0.03 %, IoU +0.06 % to the ground truth
    "balanced": {"scheduler": "pndm", "steps": 100, "guidance_cache": GuidanceCache(every=6, first=3),
                 "feature_cache": FeatureCache(every=2)},
    # DPM-Solver++ 8 steps, 3 branches every 2nd call: 0.059 of the exact FLOPs; PSNR 35.6 dB, SSIM -0.76 %,
    # IoU +0.04 %
    "fast": {"scheduler": "dpmpp", "steps": 8, "guidance_cache": GuidanceCache(every=2, first=2),
             "feature_cache": FeatureCache()},
}


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
    "FeatureCache",
    "GuidanceCache",
    "QUALITY_PRESETS",
    "call_plan",
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
