"""``Runtime``: render a subject along a pose sequence as fast as the machine allows.

    rt = Runtime.from_pretrained("models/subject", backend="auto")
    frames = rt.render(poses, image="subject.png")          # (T, H, W, 3) uint8
    for i, frame in rt.stream(poses, image="subject.png"):  # frames as they finish
        ...

What happens per video: the subject's conditioning is encoded once (and cached per image); the poses
are resized once; frames are rendered in batches of F (the UNet sees 3F samples: three guidance branches
per frame, branch-major as in dreampose.guidance); after each UNet call the guidance combine and the
scheduler update run as one fused pass (the C++ data plane on the CPU; on CUDA the Triton kernel when
it is available, else the table-driven PyTorch step). Noise is seeded per frame (or shared), so a frame
does not depend on which other frames are rendered: partial and resumed renders equal full ones.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from dreampose.deep_cache import DeepFeatures
from dreampose.guidance import NUM_BRANCHES, branch_batch
from dreampose.images import ImageLike, load_image, to_uint8
from dreampose.model import DreamPoseModel
from dreampose.pipeline import SubjectConditioning, batch_noise, check_frames_per_batch, frame_batches, resolve_frames
from dreampose.poses import check_pose_aspect, load_poses, prepared_window
from dreampose.settings import PRECISIONS, SamplingSettings, check_choice, sampling_settings, torch_dtype
from dreampose.timing import PhaseTimer, timed
from dreampose.utils import DreamPoseError, PathLike

from .backends import Backend, select_backend
from .graphs import capture
from .profiling import nvtx_range

logger = logging.getLogger(__name__)

DATA_PLANES = ("auto", "triton", "scheduler")
MAX_AUTO_FRAMES = 16
_CACHE_SIZE = 8


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' / None -> cuda if available else cpu; 'cpu', 'cuda', 'cuda:N' or a torch.device otherwise.

    A device this project does not run on (mps, xpu, ...), a name torch does not know, or a CUDA device
    this machine does not have is a DreamPoseError naming it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise DreamPoseError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DreamPoseError(f"device {device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise DreamPoseError(f"device {device!r}: dreampose-rt runs on cpu or cuda, not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DreamPoseError(f"device {device}: no CUDA device is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DreamPoseError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _fingerprint_folder(folder: Path) -> str:
    """Cheap identity of a model folder: its path and each weight file's size and modification time."""
    h = hashlib.sha256(str(folder.resolve()).encode())
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".bin"):
            st = f.stat()
            h.update(f"{f.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class Runtime:
    """A DreamPose model bound to a backend and a device.

    Args:
        model: the DreamPoseModel (already on ``backend.device`` in ``backend.dtype``).
        backend: the Backend running the networks.
        fingerprint: identifies the weights (used by resumable renders); derived from the folder.
        is_demo: True for the embedded demo model (then ``image`` may be omitted: the demo subject).
        data_plane: 'auto', 'triton' or 'scheduler' (see :meth:`data_plane`).
        subject: the LoRA subject folder merged into ``model`` (:meth:`from_pretrained`), None if none.

    ``timer`` (None by default, settable): a phase timer (see dreampose.timing) called around encode,
    each UNet call, each guidance + scheduler update and decode; the benchmark suite sets it.
    """

    def __init__(
        self, model: DreamPoseModel, backend: Backend, fingerprint: str, is_demo: bool = False,
        data_plane: str = "auto", subject: Path | None = None,
    ) -> None:
        if data_plane not in DATA_PLANES:
            raise DreamPoseError(f"unknown data plane {data_plane!r}; choose one of {', '.join(DATA_PLANES)}")
        self._data_plane = data_plane
        self.model = model
        self.backend = backend
        self.fingerprint = fingerprint
        self.is_demo = is_demo
        self.timer: PhaseTimer | None = None
        self.cuda_graph = True  # see _use_cuda_graph
        self.subject = subject
        self._warned_subject = False
        self._cache: OrderedDict[str, SubjectConditioning] = OrderedDict()
        self._frame_bytes: int | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_dir: PathLike | None = None,
        backend: str = "auto",
        device: str | torch.device | None = None,
        precision: str | None = None,
        engines: PathLike | None = None,
        data_plane: str = "auto",
        subject: PathLike | bool | None = None,
        **backend_options: Any,
    ) -> "Runtime":
        """Load a model folder (or, with no folder, the embedded demo model) onto a backend.

        Args:
            model_dir: a DreamPose model folder; None for the embedded demo model.
            subject: a subject folder (``dreampose-rt finetune --lora-rank R``) made for this base model:
                its LoRA updates are merged into the weights at load (in fp32, before the cast to
                ``precision``), so rendering costs what the base model does. A folder made for another
                base model is refused. With ``engines``, they must hold the merged weights
                (``build-engine --subject``); the base model's engines are refused by the weights check.
                None (default): none for a model folder; for the embedded demo model without engines, the
                demo subject's LoRA (dreampose_rt.demo), which suits the demo subject only: pass False to
                render another subject with the demo model alone.
            backend: 'auto', 'torch', 'compiled', 'onnxruntime' or 'tensorrt'.
            device: 'cpu', 'cuda', 'cuda:N' or 'auto' (None).
            precision: 'fp32', 'fp16' or 'bf16' (default: fp16 on CUDA, fp32 on the CPU; engines: theirs).
            engines: an engine folder from ``dreampose-rt build-engine`` (onnxruntime / tensorrt).
            data_plane: after each UNet call: 'auto', 'triton' (fused Triton kernel) or 'scheduler'.
            **backend_options: passed to the backend (e.g. compile_mode, cuda_graph, check_weights, channels_last).
        """
        if subject is True or subject == "":
            raise DreamPoseError(f"subject must be a subject folder, None or False, not {subject!r}")
        for name, value in (("model_dir", model_dir), ("engines", engines), ("subject", subject or None)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise DreamPoseError(f"{name} must be a folder path (or None), got {type(value).__name__} {value!r}")
        if not isinstance(backend, str):
            raise DreamPoseError(f"backend must be a name (auto, torch, compiled, onnxruntime, tensorrt), got {backend!r}")
        dev = resolve_device(device)
        if precision is None:
            precision = _engine_precision(engines) or ("fp16" if dev.type == "cuda" else "fp32")
        check_choice("precision", precision, PRECISIONS)
        if dev.type == "cpu" and precision == "fp16":
            raise DreamPoseError("fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
        backend_cls = select_backend(backend, dev, precision, engines)
        unknown = sorted(set(backend_options) - backend_cls.options)
        if unknown:
            takes = ", ".join(sorted(backend_cls.options)) or "none"
            raise DreamPoseError(f"unknown option(s) {', '.join(unknown)} for the {backend_cls.name} backend "
                                 f"(it takes: {takes})")
        dtype = torch_dtype(precision)
        if model_dir is None:
            from .demo import DEMO_MODEL_DIR, demo_model, demo_subject_lora

            base_dir, is_demo = DEMO_MODEL_DIR, True
            model = demo_model()
            if subject is None and engines is None:  # engines hold the weights they were built with
                subject = demo_subject_lora()
        else:
            base_dir, is_demo = Path(model_dir), False
            model = DreamPoseModel.from_pretrained(model_dir, device="cpu" if subject else dev,
                                                   dtype=torch.float32 if subject else dtype)
        subject = subject or None
        fingerprint = _fingerprint_folder(base_dir)
        if subject is not None:
            from dreampose.lora import apply_subject, model_fingerprint

            apply_subject(model, subject, model_fingerprint(base_dir))
            fingerprint = hashlib.sha256(f"{fingerprint}|{_fingerprint_folder(Path(subject))}".encode()).hexdigest()[:16]
        model = model.to(device=dev, dtype=dtype).eval()
        be = backend_cls(model, dev, dtype, engines=engines, **backend_options)
        logger.info("runtime: %s%s", be.describe(), f", subject {subject}" if subject is not None else "")
        return cls(model, be, fingerprint, is_demo, data_plane, None if subject is None else Path(subject))

    # ---- properties ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype

    @property
    def config(self):
        return self.model.config

    def identity(self) -> dict[str, str]:
        """What decides this runtime's frames besides the inputs and settings: the weights, the backend,
        the device type and the dtype (a resumable render's work folder records it)."""
        return {"model": self.fingerprint, "backend": self.backend.name, "device": self.device.type,
                "dtype": str(self.dtype)}

    def describe(self) -> str:
        """One line: the backend, the device, the dtype."""
        return self.backend.describe()

    def check_frames_per_batch(self, frames_per_batch: int) -> None:
        """Raise DreamPoseError if the backend cannot take ``frames_per_batch`` frames per call."""
        self.backend.check_frames_per_batch(check_frames_per_batch(frames_per_batch))

    def check_settings(self, settings: SamplingSettings) -> None:
        """Raise DreamPoseError if the backend cannot sample with ``settings`` (a caching preset an engine
        backend does not run)."""
        caching = self.backend.caching_availability(settings)
        if not caching:
            raise DreamPoseError(f"the {self.backend.name} backend cannot render --quality {settings.quality}: "
                                 f"{caching.reason}")

    # ---- conditioning -----------------------------------------------------------------------
    def load_subject(self, image: ImageLike | None) -> torch.Tensor:
        """The subject as pixels (1, 3, H, W) in [-1, 1] at the model's resolution (demo subject if None)."""
        c = self.config
        if image is None:
            if not self.is_demo:
                raise DreamPoseError("image is required (only the demo model has a built-in subject)")
            from .demo import demo_subject

            image = demo_subject(c.height, c.width)
        elif self.is_demo and self.subject is not None and not self._warned_subject:
            self._warned_subject = True
            logger.warning("this demo runtime holds the demo subject's LoRA (%s), which suits the demo subject only; "
                           "for another subject load the demo model with subject=False", self.subject)
        return load_image(image, (c.height, c.width))

    def encode(self, image: ImageLike | torch.Tensor | None) -> SubjectConditioning:
        """Conditioning for the image branch and the null-image branch, cached per image content."""
        pixels = self.load_subject(image)
        key = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        with nvtx_range("encode"), timed(self.timer, "encode"):
            cond, null = self.backend.encode_subject(pixels.to(self.device))
            subject = SubjectConditioning(cond=cond.to(self.dtype), null=null.to(self.dtype))
        self._cache[key] = subject
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return subject

    def clear_cache(self) -> None:
        """Forget the cached conditioning (the next render of any image encodes it again)."""
        self._cache.clear()

    # ---- batching -------------------------------------------------------------------------------
    def auto_frames_per_batch(self) -> int:
        """Frames per UNet call when not given.

        CPU: 1 (batching buys nothing without idle compute units). Engines: the largest batch they were
        built for. CUDA: measured, not guessed: one UNet call at one frame (batch 3) gives the activation
        memory of a frame; F = 80% of the free memory divided by that, between 1 and 16.
        """
        if self.device.type != "cuda":
            return 1
        if self.backend.max_frames is not None:
            return self.backend.max_frames
        if self._frame_bytes is None:
            h, w = self.model.latent_size
            c = self.config
            n = NUM_BRANCHES
            x = torch.zeros(n, self.model.latent_channels, h, w, device=self.device)
            p = torch.zeros(n, c.pose_window_channels, h, w, device=self.device)
            ehs = torch.zeros(n, self.model.adapter.config.clip_tokens, self.model.adapter.config.clip_dim,
                              device=self.device)
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.backend.unet(x, p, torch.tensor(999, device=self.device), ehs)
            torch.cuda.synchronize(self.device)
            self._frame_bytes = max(1, torch.cuda.max_memory_allocated(self.device) - base)
        free, _ = torch.cuda.mem_get_info(self.device)
        frames = int(0.8 * free // self._frame_bytes)
        return max(1, min(MAX_AUTO_FRAMES, frames))

    # ---- rendering ---------------------------------------------------------------------------
    def _make_scheduler(self, name: str, steps: int):
        from .scheduler import create_scheduler

        try:
            sched = create_scheduler(name, dict(self.model.scheduler_config))
            sched.set_timesteps(steps, device=self.device)
        except ValueError as e:  # an option of the model's scheduler config this scheduler refuses
            raise DreamPoseError(f"scheduler {name!r} with {steps} steps and the model's scheduler config: {e}") from None
        return sched

    def data_plane(self) -> str:
        """What runs after each UNet call: 'triton' (the fused Triton kernel, CUDA) or 'scheduler'
        (the scheduler's fused step_guided: the C++ data plane on the CPU, the table-driven PyTorch step
        elsewhere). Forced with ``Runtime.from_pretrained(..., data_plane=...)``."""
        if self._data_plane != "auto":
            return self._data_plane
        if self.device.type == "cuda":
            from .kernels import kernel_availability

            if kernel_availability():
                return "triton"
        return "scheduler"

    @torch.no_grad()
    def _denoise(
        self, subject: SubjectConditioning, window: torch.Tensor, noise: torch.Tensor, settings: SamplingSettings,
        on_step,
    ) -> torch.Tensor:
        """The whole sampler for F frames: noise (F, C, h, w) float32 -> latents (F, C, h, w) float32.
        window: the pose windows (F, 2 * n_poses, h, w) in [-1, 1].

        Each UNet call follows the settings' call plan (SamplingSettings.call_plan): a refresh evaluates the
        three guidance branches (3F samples), a cached call the image-and-pose branch alone (F samples, the
        guidance differences kept by the fused update); a full call runs the whole UNet, a shallow one its
        outermost blocks on the deep features kept by the last full call. Without caching every call is a
        full refresh: the exact run."""
        s_image, s_pose = settings.s_image, settings.s_pose
        sched = self._make_scheduler(settings.scheduler, settings.steps)
        latents = (noise * sched.init_noise_sigma).contiguous()
        f = latents.shape[0]
        _, p3, ehs3 = branch_batch(latents, window, subject.cond, subject.null)
        inputs = {True: (p3.to(self.dtype), ehs3.to(self.dtype)),
                  False: (window.to(self.dtype), subject.cond.to(self.dtype).expand(f, -1, -1))}
        plan = settings.call_plan(len(sched.timesteps))
        features = DeepFeatures(frames=f) if settings.feature_cache.enabled else None
        guidance_cache = None
        if settings.guidance_cache.enabled:
            guidance_cache = torch.empty((2, *latents.shape), dtype=torch.float32, device=latents.device,
                                         memory_format=torch.contiguous_format)

        def unet(refresh: bool, full: bool, timestep: torch.Tensor) -> torch.Tensor:
            x = latents.repeat(NUM_BRANCHES, 1, 1, 1) if refresh else latents
            p, ehs = inputs[refresh]
            if features is None:
                return self.backend.unet(x, p, timestep, ehs)
            return self.backend.unet(x, p, timestep, ehs, features=features, full=full)

        if self.data_plane() == "triton":
            from .fused_sampler import FusedSampler

            sampler = FusedSampler.from_scheduler(sched, latents, s_image, s_pose,
                                                  guidance_cache=settings.guidance_cache.enabled)
            if self._use_cuda_graph():
                return self._denoise_graph(sampler, latents, plan, unet, on_step)
            for k, (refresh, full) in enumerate(plan):
                with nvtx_range(f"step {k}"):
                    # PNDM, DDIM and DPM-Solver++ take the sample unscaled (init_noise_sigma = 1)
                    with timed(self.timer, "unet"):
                        eps = unet(refresh, full, sched.timesteps[k])
                    with timed(self.timer, "guidance_update"):
                        sampler.step(eps.to(latents.dtype).contiguous(), latents, out=latents)
                on_step()
            return latents
        # the UNet takes the timestep as a device tensor, the scheduler as a Python int (no GPU sync per step)
        for k, (t, t_int) in enumerate(zip(sched.timesteps, sched.timesteps.tolist())):
            refresh, full = plan[k]
            with nvtx_range(f"step {k}"):
                with timed(self.timer, "unet"):
                    eps = unet(refresh, full, t)
                with timed(self.timer, "guidance_update"):
                    # in place: no new tensor per step (allocating and first-touching one costs more than the step)
                    if guidance_cache is None:
                        sched.step_guided(eps.to(latents.dtype), t_int, latents, s_image, s_pose, return_dict=False,
                                          out=latents)
                    else:
                        sched.step_guided(eps.to(latents.dtype), t_int, latents, s_image, s_pose, return_dict=False,
                                          out=latents, guidance_cache=guidance_cache)
            on_step()
        return latents

    def _use_cuda_graph(self) -> bool:
        """Replay each step from a CUDA graph: on CUDA, with the Triton data plane, a backend whose calls
        can be captured, and no phase timer (a graph cannot be timed phase by phase)."""
        return (self.device.type == "cuda" and self.cuda_graph and self.timer is None
                and self.backend.graph_capturable)

    def _denoise_graph(self, sampler, latents: torch.Tensor, plan: list[tuple[bool, bool]], unet, on_step) -> torch.Tensor:
        """Each kind of step (UNet at 3F or F samples, whole or shallow, + the fused update, the timestep read
        from the sampler's device counter) captured once in a CUDA graph and replayed for every step of its
        kind: no host work and no launch gaps between steps. Each capture runs its step once first (it
        compiles and autotunes outside the capture); the run then restarts from the noise. The full refresh
        step is captured first: it allocates the buffers the others read (step 0 is one and writes them
        before any read). The graphs share one memory pool: they run one at a time and hand each other only
        buffers that stay referenced (the latents, the sampler's state, the guidance and deep-feature caches),
        so each kind of step costs no UNet activation memory of its own. latents (F, C, h, w) float32 is
        updated in place."""
        noise = latents.clone()
        graphs: dict[tuple[bool, bool], torch.cuda.CUDAGraph] = {}
        for mode in sorted(set(plan), reverse=True):  # (True, True) first

            def body(mode: tuple[bool, bool] = mode) -> None:
                eps = unet(*mode, sampler.timestep())
                sampler.step(eps.to(latents.dtype).contiguous(), latents, out=latents)

            pool = next(iter(graphs.values())).pool() if graphs else None
            # on the process's warm-up stream (dreampose_rt.graphs)
            graphs[mode], _ = capture(body, self.device, pool=pool)
        latents.copy_(noise)
        sampler.reset()
        for k, mode in enumerate(plan):
            with nvtx_range(f"step {k}"):
                graphs[mode].replay()
            on_step()
        return latents

    def stream(
        self,
        poses: PathLike | np.ndarray | torch.Tensor | Sequence[np.ndarray],
        image: ImageLike | torch.Tensor | None = None,
        settings: SamplingSettings | None = None,
        *,
        frames: Sequence[int] | None = None,
        frames_per_batch: int | None = None,
        progress: bool = False,
        skip: Sequence[int] = (),
        **sampling: Any,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (frame index, uint8 frame (H, W, 3)) as frames finish. Arguments as in :meth:`render`;
        ``skip``: frame indices already rendered (batches made only of them are not run)."""
        from tqdm.auto import tqdm

        c = self.config
        settings = sampling_settings(c, settings, sampling)
        self.check_settings(settings)
        pose_arr = load_poses(poses)
        frames = resolve_frames(frames, len(pose_arr))
        fpb = self.auto_frames_per_batch() if frames_per_batch is None else check_frames_per_batch(frames_per_batch)
        self.check_frames_per_batch(fpb)

        subject = self.encode(image)
        check_pose_aspect(pose_arr.shape[-2:], (c.height, c.width))
        skip_set = set(skip)
        todo = [b for b in frame_batches(frames, fpb) if not set(b) <= skip_set]
        n_calls = len(self._make_scheduler(settings.scheduler, settings.steps).timesteps)
        shape = (self.model.latent_channels, *self.model.latent_size)
        bar = tqdm(
            total=sum(len(b) for b in todo), unit="frame", disable=not progress, desc="rendering",
            dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15.0,
            bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} frames [{elapsed}<{remaining}, {rate_fmt}]",
        )
        finished, steps = 0, 0  # frames of the batches done; steps of the batch in progress

        def on_step(n: int) -> None:
            # the bar's position from integers (not a sum of fractions): it ends exactly at its total, which
            # tqdm would otherwise overshoot (a "clamping frac" warning and a negative ETA)
            nonlocal steps
            steps += 1
            bar.n = min(finished + n * min(steps, n_calls) / n_calls, bar.total)
            bar.update(0)

        try:
            for batch in todo:
                start = batch_noise(settings.seed, batch, settings.noise, shape)
                window = prepared_window(pose_arr, batch, (c.height, c.width), self.model.latent_size, self.device,
                                         c.n_poses)
                steps = 0
                latents = self._denoise(subject, window, start.to(self.device), settings,
                                        on_step=lambda n=len(batch): on_step(n))
                finished += len(batch)
                with nvtx_range("decode"), timed(self.timer, "decode"):
                    images = to_uint8(self.backend.decode(latents))
                for i, frame in zip(batch, images):
                    if i not in skip_set:
                        yield i, frame
        finally:
            bar.close()

    def render(
        self,
        poses: PathLike | np.ndarray | torch.Tensor | Sequence[np.ndarray],
        image: ImageLike | torch.Tensor | None = None,
        settings: SamplingSettings | None = None,
        *,
        frames: Sequence[int] | None = None,
        frames_per_batch: int | None = None,
        progress: bool = False,
        **sampling: Any,
    ) -> np.ndarray:
        """Render frames. Returns uint8 (T, H, W, 3), T = len(frames) (all poses by default).

        Args:
            poses: a pose source (see dreampose.poses.load_poses) or an array (T, 2, H', W') of U, V in [0, 1].
            image: the subject (path, PIL image, array or tensor); optional for the demo model.
            settings: a :class:`dreampose.settings.SamplingSettings`; or, instead, any of its values as
                keywords, the model's defaults for the others: ``steps`` (100), ``scheduler`` ('pndm' the
                paper's, 'ddim', or 'dpmpp' (DPM-Solver++ 2M, for few steps)), ``s_image``, ``s_pose``,
                ``seed`` (0), ``noise`` ('shared': one noise for all frames, or 'per-frame').
            frames: indices to render (all by default).
            frames_per_batch: frames per UNet call (None: :meth:`auto_frames_per_batch`).
            progress: show a progress bar (frames per second and ETA).
        """
        pose_arr = load_poses(poses)  # read once: the stream and the frame order both use it
        out = dict(self.stream(pose_arr, image, settings=settings, frames=frames, frames_per_batch=frames_per_batch,
                               progress=progress, **sampling))
        order = list(range(len(pose_arr))) if frames is None else [int(i) for i in frames]
        return np.stack([out[i] for i in order])


def _engine_precision(engines: PathLike | None) -> str | None:
    """The precision an engine folder was built in (None without one)."""
    if engines is None:
        return None
    from .export.manifest import EngineManifest

    return EngineManifest.load(engines).precision
