"""The reference DreamPose pipeline: the correctness oracle for every faster path.

Phases of one render (each a method):

1. ``check_inputs``      image, poses, settings
2. ``encode_subject``    conditioning for the image branch and the null-image branch, ONCE per video
3. ``prepare_poses``     (T, 2, H', W') in [0, 1] -> (T, 2, h, w) in [-1, 1] at the latent size
4. ``initial_noise``     seeded Gaussian latents: one noise shared by all frames, or one per frame
5. ``denoise``           one UNet call per step at batch 3F (branch-major, see dreampose.guidance),
                         dual classifier-free guidance, then the scheduler's step (diffusers: the oracle)
6. ``decode``            VAE decode -> uint8 frames, clamped, no per-frame rescaling

Fixes to the original release: conditioning is computed once per video, not per frame; the VAE
conditioning latents are the posterior mean, not a sample; CLIP runs on the pipeline's device; the pose
window clamps to the nearest existing frame at the ends; outputs are not min-max rescaled per frame.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .deep_cache import DeepFeatures, supports
from .guidance import (
    NUM_BRANCHES,
    branch_batch,
    combine_cached,
    combine_guidance,
    guidance_differences,
    image_pose_batch,
)
from .images import ImageLike, load_image, to_uint8
from .model import DreamPoseModel
from .poses import load_poses, pose_window, prepare_poses
from .diffusers_schedulers import make_diffusers_scheduler
from .settings import SamplingSettings, check_int, sampling_settings
from .timing import PhaseTimer, timed
from .utils import DreamPoseError, PathLike

logger = logging.getLogger(__name__)


@dataclass
class SubjectConditioning:
    """The encoded subject: cond (1, N, D) for the image branches, null (1, N, D) for the null image."""

    cond: torch.Tensor
    null: torch.Tensor


def frame_noise(seed: int, index: int | None, shape: Sequence[int]) -> torch.Tensor:
    """Seeded standard-normal noise (float32, CPU) for one frame.

    ``index=None`` gives the noise shared by all frames (the paper's code: steadier video); an integer
    gives frame ``index`` its own noise. The stream for (seed, index) does not depend on which other
    frames are rendered or how they are batched, so partial and resumed renders reproduce full ones.
    """
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF] + ([] if index is None else [1, int(index)])
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    gen = torch.Generator(device="cpu").manual_seed(int(state) & 0x7FFFFFFFFFFFFFFF)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def batch_noise(seed: int, frames: Sequence[int], noise: str, shape: Sequence[int]) -> torch.Tensor:
    """(F, *shape) float32 CPU starting noise for the given frame indices (see :func:`frame_noise`)."""
    if noise == "shared":
        return frame_noise(seed, None, shape).unsqueeze(0).repeat(len(frames), *([1] * len(shape)))
    return torch.stack([frame_noise(seed, i, shape) for i in frames])


def resolve_frames(frames: Sequence[int] | None, n_total: int) -> list[int]:
    """The frame indices to render (all by default), checked against the number of poses.

    ``frames``: integers in ``[0, n_total)``; an empty list, a float or an index out of range is a
    DreamPoseError that names the value.
    """
    if frames is None:
        return list(range(n_total))
    if isinstance(frames, (str, bytes)) or not hasattr(frames, "__iter__"):
        raise DreamPoseError(f"frames must be a sequence of frame indices, got {frames!r}")
    out = []
    for i in frames:
        try:
            out.append(check_int("frames", i, None))
        except DreamPoseError:
            raise DreamPoseError(f"frames must hold integer frame indices, got {i!r}") from None
    if not out:
        raise DreamPoseError("frames is empty: give at least one frame index (or None for all)")
    bad = [i for i in out if not 0 <= i < n_total]
    if bad:
        raise DreamPoseError(f"frame indices {bad[:5]} out of range for {n_total} poses (valid: 0 .. {n_total - 1})")
    return out


def frame_batches(frames: Sequence[int], frames_per_batch: int) -> list[list[int]]:
    """The batches of a render: ``frames_per_batch`` consecutive entries of ``frames`` each (the last one
    shorter). The one definition: a frame's arithmetic depends on its batch, so every renderer (a single
    process, a resumed render, a cluster) makes the same batches."""
    return [list(frames[i : i + frames_per_batch]) for i in range(0, len(frames), frames_per_batch)]


def check_frames_per_batch(frames_per_batch: Any) -> int:
    """``frames_per_batch`` if it is an integer >= 1, else a DreamPoseError naming the value."""
    return check_int("frames_per_batch", frames_per_batch, 1)


class DreamPosePipeline:
    """Renders a subject image along a pose sequence, one video frame per pose.

    Args:
        model: a DreamPoseModel (its device and dtype are used).
        scheduler_factory: ``(name, scheduler_config) -> scheduler`` with diffusers' interface;
            diffusers' own schedulers by default.
        timer: optional phase timer (see dreampose.timing), called around encode, each UNet call, each
            guidance + scheduler update and decode; None (the default) costs nothing.
    """

    def __init__(
        self,
        model: DreamPoseModel,
        scheduler_factory: Callable[[str, dict], Any] = make_diffusers_scheduler,
        timer: PhaseTimer | None = None,
    ) -> None:
        self.model = model.eval()
        self.scheduler_factory = scheduler_factory
        self.timer = timer

    @classmethod
    def from_pretrained(
        cls, folder: PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "DreamPosePipeline":
        return cls(DreamPoseModel.from_pretrained(folder, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- 1. inputs --------------------------------------------------------------------------------
    def check_inputs(self, settings: SamplingSettings | None, frames_per_batch: Any, **sampling: Any) -> SamplingSettings:
        """The render's settings (``settings``, or the model's defaults overridden by ``sampling``: steps,
        scheduler, s_image, s_pose, seed, noise), all checked (DreamPoseError names the value)."""
        check_frames_per_batch(frames_per_batch)
        settings = sampling_settings(self.model.config, settings, sampling)
        if settings.feature_cache.enabled:
            why = supports(self.model.unet)
            if why is not None:
                raise DreamPoseError(f"feature_cache: {why}")
        return settings

    # ---- 2. conditioning ----------------------------------------------------------------------
    @torch.no_grad()
    def encode_subject(self, image: ImageLike | torch.Tensor) -> SubjectConditioning:
        """Subject image (path, PIL, array, tensor) -> conditioning for the image and null-image branches."""
        c = self.model.config
        pixels = load_image(image, (c.height, c.width)).to(self.device)
        with timed(self.timer, "encode"):
            return SubjectConditioning(cond=self.model.encode_image(pixels), null=self.model.encode_null_image(1))

    # ---- 3. poses -------------------------------------------------------------------------------
    def prepare_poses(self, poses: PathLike | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Any pose source (see dreampose.poses.load_poses) -> (T, 2, h, w) in [-1, 1] on the device."""
        arr = load_poses(poses)
        c = self.model.config
        return prepare_poses(arr, (c.height, c.width), self.model.latent_size, self.device)

    # ---- 4. noise -------------------------------------------------------------------------------
    def initial_noise(self, frames: Sequence[int], seed: int, noise: str) -> torch.Tensor:
        """(F, C, h, w) float32 starting latents (before init_noise_sigma) for the given frame indices."""
        return batch_noise(seed, frames, noise, (self.model.latent_channels, *self.model.latent_size)).to(self.device)

    # ---- 5. denoising ---------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(
        self,
        subject: SubjectConditioning,
        poses: torch.Tensor,
        frames: Sequence[int],
        latents: torch.Tensor,
        settings: SamplingSettings,
        on_step: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Run the whole sampler for F frames at once: one UNet call per step, at batch 3F (the three guidance
        branches) or, a cached step of guidance caching, F (the image-and-pose branch alone, with the
        guidance differences of the last refresh: dreampose.guidance); with deep-feature caching a call
        runs the whole UNet or its outermost blocks (dreampose.deep_cache), as ``settings.call_plan`` says.

        poses (T, 2, h, w) in [-1, 1]; latents (F, C, h, w) float32 noise -> (F, C, h, w) float32."""
        model = self.model
        sched = self.scheduler_factory(settings.scheduler, model.scheduler_config)
        sched.set_timesteps(settings.steps)
        window = pose_window(poses, list(frames), model.config.n_poses)  # (F, 10, h, w)
        latents = latents * sched.init_noise_sigma
        dtype = model.dtype
        f = len(frames)
        _, p, ehs = branch_batch(latents, window, subject.cond, subject.null)
        p, ehs = p.to(dtype), ehs.to(dtype)
        _, p1, ehs1 = image_pose_batch(latents, window.to(dtype), subject.cond.to(dtype))
        features = DeepFeatures(frames=f) if settings.feature_cache.enabled else None
        cache = None  # the guidance differences of the last refresh

        def unet(x: torch.Tensor, p: torch.Tensor, t: torch.Tensor, ehs: torch.Tensor, full: bool) -> torch.Tensor:
            if features is None:  # the plain UNet call
                return model.predict_noise(x.to(dtype), p, t.to(self.device), ehs)
            return model.predict_noise(x.to(dtype), p, t.to(self.device), ehs, features=features, full=full)

        for t, (refresh, full) in zip(sched.timesteps, settings.call_plan(len(sched.timesteps))):
            x = sched.scale_model_input(latents, t)
            with timed(self.timer, "unet"):
                if refresh:
                    eps = unet(x.repeat(NUM_BRANCHES, 1, 1, 1), p, t, ehs, full)
                else:
                    eps = unet(x, p1, t, ehs1, full)
            with timed(self.timer, "guidance_update"):
                if refresh:
                    if settings.guidance_cache.enabled:
                        cache = guidance_differences(eps, f)
                    eps = combine_guidance(eps, f, settings.s_image, settings.s_pose)
                else:
                    eps = combine_cached(eps, cache, settings.s_image, settings.s_pose)
                latents = sched.step(eps, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step()
        return latents

    # ---- 6. decoding ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (F, C, h, w) -> uint8 frames (F, H, W, 3)."""
        with timed(self.timer, "decode"):
            return to_uint8(self.model.decode(latents))

    # ---- the whole render -----------------------------------------------------------------------
    def iter_frames(
        self,
        image: ImageLike | torch.Tensor,
        poses: PathLike | np.ndarray | torch.Tensor,
        settings: SamplingSettings | None = None,
        *,
        frames: Sequence[int] | None = None,
        frames_per_batch: int = 1,
        progress: bool = True,
        **sampling: Any,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (frame index, uint8 frame (H, W, 3)) as frames finish. Arguments as in ``__call__``."""
        from tqdm.auto import tqdm

        settings = self.check_inputs(settings, frames_per_batch, **sampling)
        pose_seq = self.prepare_poses(poses)
        frames = resolve_frames(frames, pose_seq.shape[0])
        subject = self.encode_subject(image)

        probe = self.scheduler_factory(settings.scheduler, self.model.scheduler_config)
        probe.set_timesteps(settings.steps)
        calls_per_batch = len(probe.timesteps)
        batches = frame_batches(frames, frames_per_batch)
        bar = tqdm(total=len(batches) * calls_per_batch, unit="step", disable=not progress, desc="rendering",
                   dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15.0)
        done = 0
        try:
            for batch in batches:
                noise_lat = self.initial_noise(batch, settings.seed, settings.noise)
                latents = self.denoise(subject, pose_seq, batch, noise_lat, settings, on_step=lambda: bar.update(1))
                for i, frame in zip(batch, self.decode(latents)):
                    done += 1
                    bar.set_postfix(frames=f"{done}/{len(frames)}")
                    yield i, frame
        finally:
            bar.close()

    def __call__(
        self,
        image: ImageLike | torch.Tensor,
        poses: PathLike | np.ndarray | torch.Tensor,
        settings: SamplingSettings | None = None,
        *,
        frames: Sequence[int] | None = None,
        frames_per_batch: int = 1,
        progress: bool = True,
        **sampling: Any,
    ) -> np.ndarray:
        """Render frames. Returns uint8 (T, H, W, 3), T = len(frames) (all poses by default).

        Args:
            image: the subject (path, PIL image, uint8/float array (H, W, 3), or tensor (3, H, W) in [0, 1]).
            poses: a pose source for dreampose.poses.load_poses, or an array (T, 2, H', W') of U, V in [0, 1].
            settings: a :class:`dreampose.settings.SamplingSettings`; or, instead, its values as keywords
                (``steps``, ``scheduler`` ('pndm' the paper's, 'ddim', 'dpmpp'), ``s_image``, ``s_pose``,
                ``seed``, ``noise`` ('shared' or 'per-frame')), the model's defaults for those not given.
            frames: indices to render (all by default); pose windows still see the whole sequence.
            frames_per_batch: frames per UNet call (the batch is 3 x this).
            progress: show a progress bar.
        """
        out = [f for _, f in self.iter_frames(image, poses, settings=settings, frames=frames,
                                               frames_per_batch=frames_per_batch, progress=progress, **sampling)]
        return np.stack(out)
