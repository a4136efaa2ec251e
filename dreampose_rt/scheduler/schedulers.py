"""PNDM, DDIM and DPM-Solver++ with diffusers' interface, backed by the C++ core (or Python).

A scheduler owns a *plan* for the current run: the timesteps and the coefficient table
(:mod:`dreampose_rt.scheduler.table`). ``step`` applies row ``k`` of that table. Which code builds and
applies the plan is the scheduler's *implementation* (:data:`IMPLEMENTATIONS`; not to be confused with
the runtime's backends, which run the networks):

- "cpp": the plan comes from the C++ core (``dreampose_rt._C``) and CPU fp32/fp16 steps run on its data
  plane (one pass, multithreaded) through a ``SchedulerBoundStep`` (``scheduler_bind``); tensors on other
  devices, and 0-d or empty samples, use the PyTorch table step with the same coefficients;
- "python": the plan is built by :mod:`.python_core` and applied with :func:`table_step_ref`;
- "auto": "cpp" when the extension loads, else "python" (with one warning saying why).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from dreampose.guidance import guidance_differences

from .. import _ext
from ..availability import Availability
from . import python_core
from .config import SchedulerConfig
from .table import (
    COLUMNS,
    NUM_COLUMNS,
    StepState,
    TableInfo,
    guidance_cached_ref,
    guidance_combine_ref,
    table_step_ref,
)

logger = logging.getLogger(__name__)


IMPLEMENTATIONS = ("auto", "cpp", "python")
_warned_fallback = False


def native_core() -> Any | None:
    """The extension module if it is loaded and its table layout matches :data:`COLUMNS` (else ``None``;
    why: :func:`native_core_availability`)."""
    mod = _ext.load_extension()
    if mod is None or not hasattr(mod, "scheduler_make_plan"):
        return None
    if tuple(mod.scheduler_table_columns()) != COLUMNS:
        return None
    return mod


def native_core_availability() -> Availability:
    """Whether the C++ scheduler core can run here: what it offers, or why not."""
    mod = _ext.load_extension()
    if mod is None:
        return Availability(False, _ext.extension_availability().reason)
    if not hasattr(mod, "scheduler_make_plan"):
        return Availability(False, "dreampose_rt._C was built without the scheduler")
    cols = tuple(mod.scheduler_table_columns())
    if cols != COLUMNS:
        return Availability(
            False, f"table layout of the extension {cols} differs from dreampose_rt.scheduler.table.COLUMNS"
        )
    return Availability(True, "C++ core and CPU data plane (fp32, fp16)")


def resolve_implementation(implementation: str = "auto") -> str:
    """"cpp" or "python" for a requested implementation; "auto" falls back to Python with one warning."""
    global _warned_fallback
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown scheduler implementation {implementation!r} (choose one of {', '.join(IMPLEMENTATIONS)})"
        )
    if implementation == "python":
        return "python"
    if native_core() is not None:
        return "cpp"
    if implementation == "cpp":
        raise ValueError(
            f"implementation='cpp' requested but the C++ core is unavailable: {native_core_availability().reason}"
        )
    if not _warned_fallback:
        _warned_fallback = True
        logger.warning(
            "dreampose_rt._C is unavailable (%s); schedulers use the pure-Python implementation",
            native_core_availability().reason,
        )
    return "python"


@dataclass
class SchedulerOutput:
    """Result of :meth:`DiffusionScheduler.step`. prev_sample: the next sample, shape and dtype of the input."""

    prev_sample: torch.Tensor


def _native_config(mod: Any, cfg: SchedulerConfig) -> Any:
    c = mod.SchedulerConfig()
    c.kind = cfg.scheduler
    for name in (
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "timestep_spacing",
        "steps_offset", "set_alpha_to_one", "skip_prk_steps", "solver_order", "solver_type", "lower_order_final",
        "euler_at_final", "final_sigmas_type",
    ):  # fmt: skip
        setattr(c, name, getattr(cfg, name))
    return c


class DiffusionScheduler:
    """Base class: the interface of diffusers' schedulers over a precomputed run plan."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 1  # model evaluations per timestep, as diffusers reports it
    init_noise_sigma: float = 1.0

    def __init__(
        self,
        config: SchedulerConfig | Mapping[str, Any] | None = None,
        *,
        implementation: str = "auto",
        num_threads: int = 0,
        **overrides: Any,
    ) -> None:
        """config: as :func:`create_scheduler`. implementation: "auto", "cpp" or "python" (see
        :data:`IMPLEMENTATIONS`). num_threads: threads of the C++ CPU data plane per step (0: chosen from
        the tensor size, up to every core)."""
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
            raise ValueError(f"num_threads must be an int >= 0, got {num_threads!r}")
        self._num_threads = num_threads
        if isinstance(config, SchedulerConfig):
            if config.scheduler != self.name:
                raise ValueError(f"config is for scheduler {config.scheduler!r}, not {self.name!r}")
            cfg = config.replace(**overrides) if overrides else config
        else:
            cfg = SchedulerConfig.create(self.name, config, **overrides)
        self._config = cfg
        self._implementation = resolve_implementation(implementation)
        self._native = native_core() if self._implementation == "cpp" else None
        self._native_cfg = _native_config(self._native, cfg) if self._native is not None else None
        self._plan: Any = None
        self._table: torch.Tensor | None = None
        self._rows: list[list[float]] = []
        self._timesteps_list: list[int] = []
        self._num_steps = 0
        self._timesteps_set: frozenset[int] = frozenset()
        self.timesteps: torch.Tensor = torch.empty(0, dtype=torch.int64)
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._state: StepState | None = None
        self._state_key: tuple | None = None
        self._bound: Any = None  # the C++ SchedulerBoundStep bound to this run's state (the fast path)
        self._bound_key: tuple | None = None  # (sample shape, dtype) it was bound for
        self._state_info: TableInfo | None = None

    # -- construction helpers -------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: SchedulerConfig | Mapping[str, Any], **kwargs: Any) -> "DiffusionScheduler":
        """Build from a :class:`SchedulerConfig` or a diffusers-style dict (of any of the three classes)."""
        if isinstance(config, SchedulerConfig):
            config = {k: v for k, v in config.to_dict().items() if k != "scheduler"}
        return cls(config, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "DiffusionScheduler":
        """Build from a scheduler_config.json or a model folder (``<folder>/scheduler/scheduler_config.json``)."""
        implementation = kwargs.pop("implementation", "auto")
        num_threads = kwargs.pop("num_threads", 0)
        return cls(
            SchedulerConfig.from_file(path, scheduler=cls.name, **kwargs),
            implementation=implementation,
            num_threads=num_threads,
        )

    def save_config(self, path: str | os.PathLike) -> str:
        """Write the config as JSON (``path``: a file or a folder); returns the file written."""
        return self._config.save(path)

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @property
    def implementation(self) -> str:
        """"cpp" (C++ plan and CPU data plane) or "python" (what "auto" resolved to)."""
        return self._implementation

    @property
    def step_index(self) -> int | None:
        """Index of the next step in the run (``None`` before :meth:`set_timesteps`)."""
        return self._step_index

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``(num_train_timesteps,)`` float32."""
        if self._native is not None:
            return torch.tensor(self._native.scheduler_alphas_cumprod(self._native_cfg), dtype=torch.float32)
        return torch.from_numpy(python_core.alphas_cumprod(self._config))

    # -- the run --------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Plan a new run of ``num_inference_steps`` (nothing carries over from the last run but its buffers).
        ``device``: where ``timesteps`` lives."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
        if self._native is not None:
            plan = self._native.scheduler_make_plan(self._native_cfg, num_inference_steps)
            n = len(plan.timesteps)
            table = torch.frombuffer(bytearray(plan.table()), dtype=torch.float32).reshape(n, NUM_COLUMNS)
        else:
            plan = python_core.make_plan(self._config, num_inference_steps)
            table = plan.table
        self._plan = plan
        self._table = table
        self._info = TableInfo(plan.num_history_slots, plan.uses_saved_sample, plan.uses_accumulator)
        self._rows = table.tolist()
        self._timesteps_list = list(plan.timesteps)
        self._num_steps = len(self._timesteps_list)
        self._timesteps_set = frozenset(self._timesteps_list)
        self.timesteps = torch.tensor(self._timesteps_list, dtype=torch.int64, device=device)
        self.num_inference_steps = num_inference_steps
        self._step_index = 0
        # The state buffers outlive the run: the next run of the same sample shape and buffer needs reuses
        # them (the table never reads a buffer before writing it: no allocation, no page faults, warm caches)
        # and keeps the C++ binding, pointed at the new plan, so that even its first step is a fast one.
        if self._state is not None and self._state_info != self._info:
            self._state = self._state_key = self._state_info = None
        if self._bound is not None:
            if self._state is not None and self._native is not None:
                self._bound.set_plan(plan)
            else:
                self._bound = self._bound_key = None

    def coefficient_table(self) -> torch.Tensor:
        """The run's table ``(len(timesteps), NUM_COLUMNS)`` float32 (layout: :mod:`.table`)."""
        if self._table is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps before coefficient_table")
        return self._table.clone()

    @property
    def table_info(self) -> TableInfo:
        """Buffers the run's table needs (history slots, saved sample, accumulator)."""
        if self._table is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps before table_info")
        return self._info

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """Identity for these schedulers (kept for interchangeability with diffusers)."""
        return sample

    def _check_timestep(self, timestep: int | torch.Tensor) -> int:
        k = self._step_index
        # Fast path: a Python int equal to the run's next timestep (what every loop over `timesteps` passes,
        # after .tolist() or .item()); anything else takes the checked path below.
        if type(timestep) is int and k is not None and k < len(self._timesteps_list) and (
            timestep == self._timesteps_list[k]
        ):
            return k
        if self._step_index is None:
            raise ValueError(f"{type(self).__name__}: step called before set_timesteps")
        # Compare as Python numbers: `int != tensor` would launch tensor ops (tens of us per step).
        value = timestep
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a scalar, got a tensor of shape {tuple(timestep.shape)}")
            value = timestep.item()
        try:
            t = int(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"timestep {timestep!r} is not an integer timestep") from exc
        if t != value:
            raise ValueError(f"timestep {timestep!r} is not an integer timestep")
        k = self._step_index
        if k >= len(self._timesteps_list):
            raise ValueError(f"the run of {len(self._timesteps_list)} steps is over; call set_timesteps again")
        if t != self._timesteps_list[k]:
            if t not in self._timesteps_set:
                raise ValueError(
                    f"timestep {t} is not in the schedule ({len(self._timesteps_list)} steps from "
                    f"{self._timesteps_list[0]} to {self._timesteps_list[-1]})"
                )
            raise ValueError(f"timestep {t} is out of order: step {k} of the run is timestep {self._timesteps_list[k]}")
        return k

    def _state_for(self, sample: torch.Tensor) -> StepState:
        key = (tuple(sample.shape), sample.device)
        if self._state is not None and key == self._state_key:
            return self._state
        if self._state is not None and self._step_index:
            raise ValueError(
                f"sample shape {tuple(sample.shape)} on {sample.device} differs from the run's "
                f"{self._state_key[0]} on {self._state_key[1]}"
            )
        # the run's first step, on a new shape or device (or the first run)
        self._state = StepState.allocate(self._info, sample.shape, sample.device)
        self._state_key = key
        self._state_info = self._info
        self._bound = self._bound_key = None
        return self._state

    def _native_ok(self, model_output: torch.Tensor, sample: torch.Tensor) -> bool:
        return (
            self._native is not None
            and sample.device.type == "cpu"
            and model_output.device.type == "cpu"
            and sample.dtype in (torch.float32, torch.float16)
            and sample.dim() > 0
            and sample.numel() > 0
        )

    def _bind(self, sample: torch.Tensor) -> Any:
        """The C++ step bound to this run's plan and state for samples like ``sample`` (CPU, contiguous;
        frames: its first dimension). The binding checks every tensor (errors name it)."""
        key = (sample.shape, sample.dtype)
        if self._bound is None or self._bound_key != key:
            state = self._state
            self._bound = self._native.scheduler_bind(
                self._plan,
                sample=sample,
                frames=sample.shape[0],
                history=state.history,
                saved_sample=state.saved_sample,
                accumulator=state.accumulator,
                num_threads=self._num_threads,
            )
            self._bound_key = key
        return self._bound

    def _apply(
        self,
        k: int,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        scale_image: torch.Tensor | None,
        scale_pose: torch.Tensor | None,
        out: torch.Tensor | None = None,
        cache: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Step ``k`` after the checks (the checked path): scales are ``(F,)`` float32 tensors on the
        sample's device (or None); ``cache``: the checked guidance cache of a refresh step (model_output
        has 3F rows) or a cached step (F rows). CPU fp32/fp16 samples with frames go to the C++ data plane
        (binding it to this run's state first if needed); anything else, to the PyTorch table step (same
        coefficients)."""
        state = self._state_for(sample)
        if self._native_ok(model_output, sample):
            x = sample.detach().contiguous()
            m = model_output.detach().contiguous()
            out = torch.empty_like(x) if out is None else out
            prev = self._bind(x).step(
                k, sample=x, model_output=m, out=out, scale_image=scale_image, scale_pose=scale_pose,
                guidance_cache=cache,
            )
            if prev is not None:
                return prev
            # (None: a tensor the binding does not take as it is, e.g. a subclass: the PyTorch step below)
        if scale_image is not None:
            if cache is not None and model_output.shape[0] == sample.shape[0] != 0:  # cached: e(I,P) alone
                model_output = guidance_cached_ref(model_output, cache, scale_image, scale_pose)
            else:
                if cache is not None:  # refresh: keep the differences
                    cache.copy_(guidance_differences(model_output, sample.shape[0]))
                model_output = guidance_combine_ref(model_output, scale_image, scale_pose)
        return table_step_ref(self._rows[k], model_output, sample, state, out)

    @staticmethod
    def _check_out(out: torch.Tensor | None, sample: torch.Tensor) -> None:
        if out is None:
            return
        if not isinstance(out, torch.Tensor):
            raise ValueError("out must be a torch tensor")
        if out.shape != sample.shape or out.dtype != sample.dtype or out.device != sample.device:
            raise ValueError(
                f"out {tuple(out.shape)} {out.dtype} on {out.device} does not match sample "
                f"{tuple(sample.shape)} {sample.dtype} on {sample.device}"
            )
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")

    @staticmethod
    def _check_cache(
        cache: torch.Tensor, sample: torch.Tensor, model_output: torch.Tensor, out: torch.Tensor | None
    ) -> None:
        """The guidance cache: float32, ``(2, *sample.shape)``, contiguous, on the sample's device, a buffer
        of its own (the C++ binding's checks, with its messages)."""
        if not isinstance(cache, torch.Tensor):
            kind = type(cache)
            kind = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
            raise ValueError(f"guidance_cache must be a torch tensor, got {kind}")
        if cache.device != sample.device:
            raise ValueError(f"guidance_cache is on {cache.device}, the sample on {sample.device}")
        if cache.dtype != torch.float32:
            raise ValueError(f"guidance_cache must be torch.float32, got {cache.dtype}")
        want = (2, *sample.shape)
        if tuple(cache.shape) != want:
            raise ValueError(
                f"guidance_cache has shape {tuple(cache.shape)}, expected {want} (d_I and d_P, each shaped like "
                f"the sample)"
            )
        if not cache.is_contiguous():
            raise ValueError("guidance_cache must be contiguous (call .contiguous())")
        c0 = cache.data_ptr()
        c1 = c0 + cache.numel() * cache.element_size()
        for name, t in (("sample", sample), ("model_output", model_output), ("out", out)):
            if t is None or t.numel() == 0:
                continue
            last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))  # (no negative strides in torch)
            t0 = t.data_ptr()
            if t0 < c1 and c0 < t0 + (last + 1) * t.element_size():
                raise ValueError(f"guidance_cache overlaps {name} (guidance_cache must be a buffer of its own)")

    @staticmethod
    def _check_pair(model_output: torch.Tensor, sample: torch.Tensor, rows: int) -> None:
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise ValueError("model_output and sample must be torch tensors")
        if model_output.dtype != sample.dtype:
            raise ValueError(f"model_output dtype {model_output.dtype} differs from sample dtype {sample.dtype}")
        if not sample.is_floating_point():
            raise ValueError(f"sample dtype {sample.dtype} is not a floating point type")
        want = (rows * sample.shape[0],) + tuple(sample.shape[1:]) if sample.dim() else tuple(sample.shape)
        if tuple(model_output.shape) != want:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match sample shape "
                             f"{tuple(sample.shape)} (expected {want})")
        if model_output.device != sample.device:
            raise ValueError(f"model_output is on {model_output.device}, sample on {sample.device}")

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        out: torch.Tensor | None = None,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One denoising step: the sample at the previous (less noisy) timestep.

        model_output: the model's prediction, same shape and dtype as ``sample`` (e.g. ``(B, 4, H, W)``).
        timestep: the run's current timestep (``timesteps[step_index]``).
        sample: the current sample ``(B, 4, H, W)``, fp32 or fp16.
        out: optional contiguous tensor (shape, dtype and device of ``sample``; may be ``sample`` itself) that
            receives prev_sample instead of a new tensor.
        Returns ``SchedulerOutput(prev_sample)`` or ``(prev_sample,)``; prev_sample: shape and dtype of ``sample``.
        """
        k = self._step_index
        if not (type(timestep) is int and k is not None and k < self._num_steps and timestep == self._timesteps_list[k]):
            k = self._check_timestep(timestep)  # raises unless it is the run's next timestep
        bound = self._bound
        if bound is not None:
            # Fast path: a step of this run (or of an earlier run on the same shape) was checked in full and
            # bound in C++; the bound step checks the tensors against that binding (dtype, CPU, sizes,
            # contiguity) in C++ and returns None if one differs, and then the checked path below runs.
            # Arguments by position: pybind11's keyword matching would cost ~0.4 us a step.
            prev = bound.step(k, sample, model_output, out)
            if prev is not None:
                self._step_index = k + 1
                return SchedulerOutput(prev) if return_dict else (prev,)
        self._check_pair(model_output, sample, 1)
        self._check_out(out, sample)
        prev = self._apply(k, model_output, sample, None, None, out)
        self._step_index = k + 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def step_guided(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        guidance_scale_image: float | torch.Tensor,
        guidance_scale_pose: float | torch.Tensor,
        return_dict: bool = True,
        out: torch.Tensor | None = None,
        guidance_cache: torch.Tensor | None = None,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """Three-branch guidance combine fused with :meth:`step` (one pass over memory on the CPU).

        model_output: ``(3F, C, H, W)`` branch-major: rows ``[0:F]`` e00 (null image, null pose),
            ``[F:2F]`` eIP (image + pose), ``[2F:3F]`` eI0 (image, null pose); or, for a cached step,
            ``(F, C, H, W)``: eIP alone.
        sample: ``(F, C, H, W)``. guidance_scale_image (s_I), guidance_scale_pose (s_p): floats or ``(F,)``.
        The guided output is ``e00 + s_I * (eI0 - e00) + s_p * (eIP - eI0)``.
        out: as in :meth:`step`.
        guidance_cache: ``(2, F, C, H, W)`` float32, contiguous, on the sample's device
            (:mod:`dreampose.guidance`): ``[0]`` = d_I = eI0 - e00, ``[1]`` = d_P = eIP - eI0. With a 3F-row
            model_output the step is a *refresh*: as without a cache (the same bits) and the cache is
            overwritten with the step's differences. With an F-row model_output the step is *cached*: the
            guided output is ``eIP + (s_I - 1) * d_I + (s_p - 1) * d_P`` from the cache of the last refresh
            (required; only read).
        Returns prev_sample ``(F, C, H, W)`` like :meth:`step`.
        """
        k = self._step_index
        if not (type(timestep) is int and k is not None and k < self._num_steps and timestep == self._timesteps_list[k]):
            k = self._check_timestep(timestep)  # raises unless it is the run's next timestep
        bound = self._bound
        ti, tp = type(guidance_scale_image), type(guidance_scale_pose)
        if bound is not None and (ti is float or ti is int) and (tp is float or tp is int):
            # Fast path, as in step(), for scalar guidance scales (the cache, when given, is checked in C++).
            if guidance_cache is None:
                prev = bound.step(k, sample, model_output, out, guidance_scale_image, guidance_scale_pose)
            else:
                prev = bound.step(k, sample, model_output, out, guidance_scale_image, guidance_scale_pose,
                                  guidance_cache)  # fmt: skip
            if prev is not None:
                self._step_index = k + 1
                return SchedulerOutput(prev) if return_dict else (prev,)
        if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
            raise ValueError("model_output and sample must be torch tensors")
        if sample.dim() < 1:
            raise ValueError("sample must have a frame dimension")
        frames = sample.shape[0]
        # F rows (the sample's, F > 0): a cached step, e(I,P) alone
        cached = model_output.dim() == sample.dim() and model_output.shape[0] == frames != 0
        if cached and guidance_cache is None:
            want = (3 * frames,) + tuple(sample.shape[1:])
            raise ValueError(
                f"guidance_cache is required: model_output has shape {tuple(model_output.shape)}, the sample's "
                f"{frames} rows (a cached step: e(I,P) alone); without a cache it holds the three branches, "
                f"expected {want}"
            )
        self._check_pair(model_output, sample, 1 if cached else 3)
        on_cpu = sample.device.type == "cpu"
        scales = []
        for name, s in (("guidance_scale_image", guidance_scale_image), ("guidance_scale_pose", guidance_scale_pose)):
            if isinstance(s, (int, float)) and not isinstance(s, bool):
                t = torch.full((frames,), float(s), dtype=torch.float32, device="cpu" if on_cpu else sample.device)
            else:
                t = torch.as_tensor(s).detach().to(dtype=torch.float32).reshape(-1)
                if t.numel() == 1:
                    t = t.expand(frames)
                if t.numel() != frames:
                    raise ValueError(f"{name} has {t.numel()} values; expected 1 or one per frame ({frames})")
                t = t.to("cpu").contiguous() if on_cpu else t.to(sample.device)
            scales.append(t)
        self._check_out(out, sample)
        if guidance_cache is not None:
            self._check_cache(guidance_cache, sample, model_output, out)
        prev = self._apply(k, model_output, sample, scales[0], scales[1], out, guidance_cache)
        self._step_index = k + 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self._config.num_train_timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(implementation={self._implementation!r}, config={self._config!r})"


class PNDMScheduler(DiffusionScheduler):
    """PNDM (Liu et al. 2022): PLMS with ``skip_prk_steps=True`` (Stable Diffusion), else 3 Runge-Kutta
    steps (12 evaluations) first. Same timesteps and results as diffusers' PNDMScheduler."""

    name = "pndm"


class DDIMScheduler(DiffusionScheduler):
    """DDIM (Song et al. 2021) with eta = 0 (deterministic), as diffusers' DDIMScheduler (no clipping)."""

    name = "ddim"


class DPMSolverMultistepScheduler(DiffusionScheduler):
    """DPM-Solver++ multistep (Lu et al. 2022), order 1 or 2, as diffusers' DPMSolverMultistepScheduler
    with ``algorithm_type="dpmsolver++"``."""

    name = "dpmpp"


#: Our name -> class (the names themselves: :data:`dreampose.settings.SCHEDULER_NAMES`).
SCHEDULER_CLASSES: dict[str, type[DiffusionScheduler]] = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
}


def create_scheduler(
    name: str,
    config: SchedulerConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    implementation: str = "auto",
    num_threads: int = 0,
    **overrides: Any,
) -> DiffusionScheduler:
    """Create "pndm", "ddim" or "dpmpp" (aliases: "plms", "dpmsolver++", "dpm++").

    config: ``None`` (diffusers defaults of that scheduler), a dict of diffusers options, a
        :class:`SchedulerConfig`, or a path to a scheduler_config.json / model folder (options of
        another scheduler class are carried over, as diffusers' ``from_config`` does).
    overrides: options that replace the config's. implementation: "auto", "cpp" or "python" (which code
    builds and applies the plan: :data:`IMPLEMENTATIONS`).
    num_threads: threads of the C++ CPU data plane per step (0: chosen from the tensor size).
    """
    key = {"plms": "pndm", "dpmsolver++": "dpmpp", "dpm++": "dpmpp"}.get(name, name)
    if key not in SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {name!r} (choose one of {', '.join(SCHEDULER_CLASSES)})")
    if isinstance(config, (str, os.PathLike)):
        config = SchedulerConfig.from_file(config, scheduler=key)
    if isinstance(config, SchedulerConfig) and config.scheduler != key:
        config = {k: v for k, v in config.to_dict().items() if k != "scheduler"}
    return SCHEDULER_CLASSES[key](config, implementation=implementation, num_threads=num_threads, **overrides)
