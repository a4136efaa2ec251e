"""The runtime's handle on one run of the fused Triton step: :class:`FusedSampler`.

It owns what :func:`dreampose_rt.kernels.guided_step` needs for a run, allocated once on the device:
the coefficient table (dreampose_rt.scheduler.table), the fp32 state buffers, the step counter and the
guidance scales. Every method used in the loop reads and writes device memory only, so the runtime
captures a whole step (UNet + update) in one CUDA graph and replays it.
"""

from __future__ import annotations

import torch

from .kernels import guided_step
from .scheduler.table import MAX_HISTORY, NUM_COLUMNS, TIMESTEP, StepState, TableInfo


class FusedSampler:
    """Owns what the fused step needs for one run, allocated once on the device: the coefficient
    table, the fp32 state buffers, the step counter and the guidance scales.

    Eager::

        sampler = FusedSampler.from_scheduler(sched, latents, scale_image=7.5, scale_pose=2.0)
        for _ in range(sampler.num_steps):
            e = unet(latents.repeat(3, 1, 1, 1), sampler.timestep(), ...)   # (3F, C, H, W)
            sampler.step(e, latents, out=latents)

    Captured: every method used in the loop (:meth:`timestep`, :meth:`step`, :meth:`reset`,
    :meth:`set_scales`) reads and writes device memory only, so the loop can be captured once and
    replayed; call :meth:`reset` (or capture it) before each run and :meth:`set_scales` to change the
    scales without recapture.

    Shapes: latents ``(F, C, H, W)`` (its dtype, device and memory format are the run's), unet_out
    ``(3F, C, H, W)``; scales floats or ``(F,)``.
    """

    def __init__(
        self,
        table: torch.Tensor,
        latents: torch.Tensor,
        scale_image: float | torch.Tensor = 1.0,
        scale_pose: float | torch.Tensor = 1.0,
        guidance_cache: bool = False,
    ) -> None:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
            raise ValueError("latents must be a 4-D tensor (F, C, H, W)")
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != NUM_COLUMNS:
            raise ValueError(f"table must be a (num_steps, {NUM_COLUMNS}) tensor")
        if table.shape[0] < 1:
            raise ValueError("table has no steps")
        device = latents.device
        host_table = table.detach().to("cpu", torch.float32)
        self.info = TableInfo.of(host_table)
        if self.info.num_history_slots > MAX_HISTORY:
            raise ValueError(f"table writes {self.info.num_history_slots} history slots; at most {MAX_HISTORY}")
        self.device = device
        self.dtype = latents.dtype
        self.shape = tuple(latents.shape)
        self.memory_format = (
            torch.channels_last
            if latents.is_contiguous(memory_format=torch.channels_last) and not latents.is_contiguous()
            else torch.contiguous_format
        )
        self.table = host_table.to(device).contiguous()
        self.timesteps = host_table[:, TIMESTEP].to(torch.int64).to(device)
        self.step_index = torch.zeros(1, dtype=torch.int32, device=device)
        self._index = torch.zeros(1, dtype=torch.int32, device=device)
        self._timestep = torch.zeros(1, dtype=torch.int64, device=device)
        frames = self.shape[0]
        self.scale_image = torch.empty(frames, dtype=torch.float32, device=device)
        self.scale_pose = torch.empty(frames, dtype=torch.float32, device=device)
        self.set_scales(scale_image, scale_pose)
        self.state = self._allocate_state()
        # guidance caching (dreampose.guidance): the two guidance differences of the last refresh, fp32
        # (2, F, C, H, W) in the latents' memory format; written by steps on 3F rows, read by steps on F rows
        self.guidance_cache = (
            torch.empty((2 * self.shape[0], *self.shape[1:]), dtype=torch.float32, device=device,
                        memory_format=self.memory_format).view(2, *self.shape)
            if guidance_cache else None
        )

    @classmethod
    def from_scheduler(
        cls, scheduler, latents: torch.Tensor, scale_image: float | torch.Tensor = 1.0,
        scale_pose: float | torch.Tensor = 1.0, guidance_cache: bool = False,
    ) -> "FusedSampler":  # fmt: skip
        """From a :class:`dreampose_rt.scheduler.DiffusionScheduler` after ``set_timesteps``."""
        return cls(scheduler.coefficient_table(), latents, scale_image, scale_pose, guidance_cache)

    def _allocate_state(self) -> StepState:
        """fp32 buffers in the memory format of the latents (the table never reads before writing)."""
        frames, c, h, w = self.shape
        kw = dict(dtype=torch.float32, device=self.device, memory_format=self.memory_format)
        slots = self.info.num_history_slots
        return StepState(
            history=torch.empty((slots * frames, c, h, w), **kw).view(slots, frames, c, h, w) if slots else None,
            saved_sample=torch.empty(self.shape, **kw) if self.info.uses_saved_sample else None,
            accumulator=torch.empty(self.shape, **kw) if self.info.uses_accumulator else None,
        )

    @property
    def num_steps(self) -> int:
        """Steps (UNet evaluations) of the run."""
        return self.table.shape[0]

    def reset(self) -> None:
        """Start the run over (step index 0; the state needs no clearing). Capturable."""
        self.step_index.zero_()

    def set_scales(self, scale_image: float | torch.Tensor, scale_pose: float | torch.Tensor) -> None:
        """Set s_I, s_p (floats, or tensors of 1 or F values) in place: a captured graph sees them."""
        for name, dst, s in (("scale_image", self.scale_image, scale_image), ("scale_pose", self.scale_pose, scale_pose)):
            if isinstance(s, torch.Tensor):
                if s.numel() not in (1, dst.numel()):
                    raise ValueError(f"{name} has {s.numel()} values; expected 1 or {dst.numel()}")
                dst.copy_(s.reshape(-1).expand(dst.numel()))
            elif isinstance(s, (int, float)) and not isinstance(s, bool):
                dst.fill_(float(s))
            else:
                raise ValueError(f"{name} must be a float or a tensor, got {type(s).__name__}")

    def timestep(self) -> torch.Tensor:
        """``(1,)`` int64 device tensor: the timestep to evaluate the UNet at for the current step
        (the same buffer every call, refreshed from the step counter; capturable)."""
        torch.clamp(self.step_index, 0, self.num_steps - 1, out=self._index)
        torch.index_select(self.timesteps, 0, self._index, out=self._timestep)
        return self._timestep

    def step(self, unet_out: torch.Tensor, latents: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the current step (read from the device counter), then advance the counter.

        unet_out ``(3F, C, H, W)`` (the three branches; with guidance caching, their differences are kept)
        or ``(F, C, H, W)`` (the image-and-pose branch alone: a cached step, guidance caching only),
        latents ``(F, C, H, W)``; out ``(F, C, H, W)`` or None (allocated). Returns the next latents. Past
        the last step the output is NaN (the kernel cannot raise).
        """
        if self.guidance_cache is None:
            result = guided_step(
                unet_out, latents, self.table, self.step_index, self.scale_image, self.scale_pose, self.state, out=out
            )
        else:
            result = guided_step(unet_out, latents, self.table, self.step_index, self.scale_image, self.scale_pose,
                                 self.state, out=out, guidance_cache=self.guidance_cache)
        self.step_index.add_(1)
        return result

    def __repr__(self) -> str:
        return (
            f"FusedSampler(num_steps={self.num_steps}, shape={self.shape}, dtype={self.dtype}, "
            f"device={self.device}, info={self.info})"
        )


__all__ = ["FusedSampler"]
