"""Backends: who runs the three networks (conditioning encoder, UNet, VAE decoder) for the Runtime.

Each backend declares whether it can run on a device and why not, and implements three calls:

* ``encode_subject(pixels (1, 3, H, W) in [-1, 1]) -> (cond (1, N, D), null (1, N, D))``
* ``unet(latents (B, 4, h, w), pose_window (B, 2n, h, w), timestep (), ehs (B, N, D)) -> eps (B, 4, h, w)``,
  B = 3F (the three guidance branches) or F (the image-and-pose branch alone, guidance caching); with
  ``features`` (deep-feature caching, dreampose.deep_cache) a ``full`` call keeps the deep features and a
  shallow one reuses them (backends say which caching they run: :meth:`Backend.caching_availability`)
* ``decode(latents (F, 4, h, w)) -> images (F, 3, H, W) in [-1, 1]``

``torch`` (eager, the reference), ``compiled`` (torch.compile of the UNet and the VAE decoder; on CUDA
the Runtime captures each whole step, compiled UNet included, in one CUDA graph), ``onnxruntime`` and
``tensorrt`` (engines written by
``dreampose-rt build-engine``). Dispatch for ``backend="auto"`` walks :data:`AUTO_ORDER` and takes the
first backend whose :meth:`Backend.auto_availability` says yes (the compiled backend is skipped on the
CPU, where compiling costs more than it saves on short renders; it runs there when asked for by name);
the torch backend is always available. ``python -m dreampose_rt.info`` reports the same answers.
"""

from __future__ import annotations

import abc
import functools
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from dreampose.model import DreamPoseModel
from dreampose.deep_cache import DeepFeatures
from dreampose.settings import FeatureCache, SamplingSettings, precision_of
from dreampose.utils import DreamPoseError, PathLike

from .availability import Availability

logger = logging.getLogger(__name__)


class Backend(abc.ABC):
    """Runs the networks of one DreamPose model on one device."""

    name: str = ""
    #: what the backend accepts: devices ("cpu", "cuda") and precisions
    devices: tuple[str, ...] = ("cpu", "cuda")
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16")
    #: whether the Runtime may capture its calls in a CUDA graph
    graph_capturable: bool = False
    #: the options (keyword arguments of ``Runtime.from_pretrained``) the backend takes
    options: frozenset[str] = frozenset()

    def __init__(self, model: DreamPoseModel, device: torch.device, dtype: torch.dtype, **options: Any) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype

    @classmethod
    def availability(cls, device: torch.device, precision: str, engines: PathLike | None = None) -> Availability:
        """Whether this backend can run on ``device`` at ``precision`` (with ``engines`` when it needs them)."""
        if device.type not in cls.devices:
            return Availability(False, f"{cls.name} does not run on {device.type}")
        if precision not in cls.precisions:
            return Availability(False, f"{cls.name} does not support {precision} (supports {', '.join(cls.precisions)})")
        return Availability(True)

    @classmethod
    def auto_availability(cls, device: torch.device, precision: str, engines: PathLike | None = None) -> Availability:
        """Whether ``backend="auto"`` takes this backend here (it may run when asked for by name even if not)."""
        return cls.availability(device, precision, engines)

    @property
    def max_frames(self) -> int | None:
        """The frames per call the backend was built for (engines), None: any."""
        return None

    def check_frames_per_batch(self, frames_per_batch: int) -> None:
        """Raise DreamPoseError if one call cannot take ``frames_per_batch`` frames (a TensorRT profile's end)."""

    @abc.abstractmethod
    def encode_subject(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def caching_availability(self, settings: SamplingSettings) -> Availability:
        """Can this backend run the settings' caching (guidance caching: UNet calls of F samples; deep-feature
        caching: shallow UNet calls), and why not."""
        if settings.feature_cache.enabled:
            from dreampose.deep_cache import supports

            why = supports(self.model.unet)
            if why is not None:
                return Availability(False, why)
        return Availability(True)

    @abc.abstractmethod
    def unet(self, latents: torch.Tensor, pose_window: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor,
             features: DeepFeatures | None = None, full: bool = True) -> torch.Tensor: ...

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> str:
        return f"{self.name} on {self.device} ({str(self.dtype).replace('torch.', '')})"


class TorchBackend(Backend):
    """Eager PyTorch: the model's own modules (the reference).

    Option ``channels_last`` (default False): keep the UNet's weights and run its input in channels_last
    (NHWC) memory format, the layout cuDNN's tensor-core convolutions work in (no transposes around each
    convolution). Same function; bench_unet and ``python -m benchmarks --channels-last`` measure whether it
    pays on a given GPU (on an H100: 4.5% faster at one frame, 12% slower at 8; docs/performance.md).
    The model's UNet weights are converted in place: a model shared with other code is changed for it too.
    """

    name = "torch"
    #: its calls can be captured in a CUDA graph (no host synchronisation, no CPU-side state)
    graph_capturable = True
    options = frozenset({"channels_last"})

    def __init__(self, model: DreamPoseModel, device: torch.device, dtype: torch.dtype, **options: Any) -> None:
        super().__init__(model, device, dtype, **options)
        self.channels_last = bool(options.get("channels_last", False))
        if self.channels_last:
            model.unet.to(memory_format=torch.channels_last)

    def describe(self) -> str:
        return super().describe() + (", channels_last" if self.channels_last else "")

    @torch.no_grad()
    def encode_subject(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image(pixels.to(self.device)), self.model.encode_null_image(1)

    @torch.no_grad()
    def unet(self, latents: torch.Tensor, pose_window: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor,
             features: DeepFeatures | None = None, full: bool = True) -> torch.Tensor:
        return self.model.predict_noise(latents.to(self.dtype), pose_window.to(self.dtype), timestep, ehs.to(self.dtype),
                                        channels_last=self.channels_last, features=features, full=full)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents)


class CompiledBackend(TorchBackend):
    """torch.compile of the UNet and the VAE decoder (inductor). On CUDA in ``max-autotune-no-cudagraphs``
    mode: the Runtime captures the whole step (UNet + fused Triton update) in one CUDA graph itself; on
    the CPU in the default mode (C++/OpenMP kernels).
    The first call at each shape compiles (tens of seconds for the tiny model on 2 CPU cores, minutes
    for SD 1.5 on a GPU); later calls replay."""

    name = "compiled"
    options = frozenset({"channels_last", "compile_mode"})

    def __init__(self, model: DreamPoseModel, device: torch.device, dtype: torch.dtype, **options: Any) -> None:
        super().__init__(model, device, dtype, **options)
        mode = options.get("compile_mode") or ("max-autotune-no-cudagraphs" if device.type == "cuda" else None)
        self._mode = mode
        self._unet = torch.compile(model.unet, mode=mode, dynamic=False, fullgraph=False)
        self._decoder = torch.compile(model.vae.decoder, mode=mode, dynamic=False)
        self._cached: dict[bool, Any] = {}  # full -> the compiled deep-feature-caching forward (made on first use)

    @classmethod
    def availability(cls, device: torch.device, precision: str, engines: PathLike | None = None) -> Availability:
        base = super().availability(device, precision, engines)
        if not base:
            return base
        try:
            import torch._inductor  # noqa: F401
        except ImportError as e:  # pragma: no cover - part of torch
            return Availability(False, f"torch inductor unavailable ({e})")
        if device.type == "cpu":
            import shutil

            if shutil.which("c++") is None and shutil.which("g++") is None:
                return Availability(False, "torch.compile on the CPU needs a C++ compiler (none on PATH)")
        elif importlib.util.find_spec("triton") is None:
            return Availability(False, "torch.compile on CUDA needs triton")
        return Availability(True)

    @classmethod
    def auto_availability(cls, device: torch.device, precision: str, engines: PathLike | None = None) -> Availability:
        if device.type != "cuda":
            return Availability(False, f"auto does not pick it on {device.type}: compiling costs more than it saves "
                                       "on short renders (ask for it with --backend compiled)")
        return cls.availability(device, precision, engines)

    @torch.no_grad()
    def unet(self, latents: torch.Tensor, pose_window: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor,
             features: DeepFeatures | None = None, full: bool = True) -> torch.Tensor:
        x = self.model.unet_input(latents.to(self.dtype), pose_window, self.channels_last)
        t = timestep.to(self.device).reshape(()).expand(x.shape[0]).contiguous()
        if features is None:
            return self._unet(x, t, encoder_hidden_states=ehs.to(self.dtype), return_dict=False)[0].clone()
        from dreampose.deep_cache import keep, unet_full, unet_shallow

        if full not in self._cached:  # the two halves of deep-feature caching, compiled like the UNet
            fn = functools.partial(unet_full if full else unet_shallow, self.model.unet)
            self._cached[full] = torch.compile(fn, mode=self._mode, dynamic=False, fullgraph=False)
        if full:
            eps, deep = self._cached[True](x, t, ehs.to(self.dtype))
            keep(features, deep)
            return eps.clone()
        deep = features.buffer[features.rows(x.shape[0])]
        return self._cached[False](x, t, ehs.to(self.dtype), deep).clone()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.model.vae
        z = latents.to(self.dtype) / self.model.scaling_factor
        if getattr(vae, "post_quant_conv", None) is not None:  # absent when use_post_quant_conv=False
            z = vae.post_quant_conv(z)
        return self._decoder(z).clone()


class EngineBackend(Backend):
    """Networks run by engines from ``build-engine`` (an engine folder; its manifest says what it holds)."""

    engine_backend = ""
    graph_capturable = False  # ONNX Runtime synchronises; TensorRT replays its own graphs
    options = frozenset({"check_weights"})

    def __init__(self, model: DreamPoseModel, device: torch.device, dtype: torch.dtype, **options: Any) -> None:
        super().__init__(model, device, dtype)
        engines = options.get("engines")
        if engines is None:
            raise DreamPoseError(f"the {self.name} backend needs engines: run `dreampose-rt build-engine` and pass --engines")
        from .export.build import load_engines
        from .export.manifest import EngineManifest

        self.engine_dir = Path(engines)
        self.manifest = EngineManifest.load(self.engine_dir)
        self.manifest.check(self.engine_dir, model, self.engine_backend, precision_of(dtype))
        self.precision = self.manifest.precision
        # engines must hold this model's weights (else: refit or rebuild)
        hashes = self.manifest.expected_weights(model) if options.get("check_weights", True) else None
        self.engines = load_engines(self.engine_dir, self.manifest, weights_hashes=hashes, **self._load_options(options))
        self.io_dtype = torch.float16 if self.precision == "fp16" else torch.float32

    @property
    def max_frames(self) -> int:
        return self.manifest.max_frames

    def check_frames_per_batch(self, frames_per_batch: int) -> None:
        self.manifest.check_frames(self.engine_dir, frames_per_batch)

    @classmethod
    def folder_availability(cls, engines: PathLike | None) -> Availability:
        """Whether ``engines`` (when it is an engine folder) holds engines for this backend."""
        from .export.manifest import EngineManifest

        if engines is None:
            return Availability(False, f"needs an engine folder from `dreampose-rt build-engine --backend {cls.name}`")
        if EngineManifest.exists(engines):
            try:
                built = EngineManifest.load(engines).backend
            except DreamPoseError as e:
                return Availability(False, str(e))
            if built != cls.engine_backend:
                return Availability(False, f"the engine folder {engines} holds {built} engines")
        return Availability(True)

    def _load_options(self, options: dict) -> dict:
        return {}

    def _run(self, name: str, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        engine = self.engines[name]
        feed = {k: v.to(engine.device, engine.input_dtypes[k]).contiguous() for k, v in feed.items()}
        return {k: v.clone() for k, v in engine.infer(feed).items()}

    def encode_subject(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._run("cond_encoder", {"image": pixels})
        return out["cond"].to(self.device), out["null"].to(self.device)

    def caching_availability(self, settings: SamplingSettings) -> Availability:
        if settings.feature_cache.enabled:
            return Availability(False, f"deep-feature caching needs the UNet's shallow path as a second engine, which "
                                       f"build-engine does not export: use --backend torch or compiled for "
                                       f"--quality {settings.quality}")
        return Availability(True)

    def unet(self, latents: torch.Tensor, pose_window: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor,
             features: DeepFeatures | None = None, full: bool = True) -> torch.Tensor:
        if features is not None:
            raise DreamPoseError(self.caching_availability(SamplingSettings(feature_cache=FeatureCache(every=2))).reason)
        t = timestep.reshape(()).float().expand(latents.shape[0])
        out = self._run("unet", {"latents": latents, "pose_window": pose_window, "timestep": t,
                                 "encoder_hidden_states": ehs})
        return out["eps"].to(self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = self._run("vae_decoder", {"latents": latents})
        if "image" not in out:
            raise DreamPoseError(f"{self.engine_dir}: the VAE decoder engine outputs uint8; rebuild with --vae-output float")
        return out["image"].to(self.device)


class OnnxRuntimeBackend(EngineBackend):
    """ONNX Runtime over the exported graphs (CPU provider; CUDA provider where installed)."""

    name = engine_backend = "onnxruntime"
    precisions = ("fp32", "fp16")

    @classmethod
    def availability(cls, device: torch.device, precision: str, engines: PathLike | None = None) -> Availability:
        base = super().availability(device, precision, engines)
        if not base:
            return base
        if importlib.util.find_spec("onnxruntime") is None:
            return Availability(False, "onnxruntime is not installed (pip install 'dreampose-rt[export]')")
        if device.type == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return Availability(False, "onnxruntime has no CUDA provider here (install onnxruntime-gpu)")
        return cls.folder_availability(engines)

    def _load_options(self, options: dict) -> dict:
        providers = ["CUDAExecutionProvider"] if self.device.type == "cuda" else ["CPUExecutionProvider"]
        return {"providers": providers}


class TensorRTBackend(EngineBackend):
    """TensorRT engines (fp16 or fp32 plans), optionally replayed through CUDA graphs."""

    name = engine_backend = "tensorrt"
    devices = ("cuda",)
    precisions = ("fp16", "fp32")
    options = frozenset({"check_weights", "cuda_graph"})

    @classmethod
    def availability(cls, device: torch.device, precision: str, engines: PathLike | None = None) -> Availability:
        base = super().availability(device, precision, engines)
        if not base:
            return base
        if importlib.util.find_spec("tensorrt") is None:
            return Availability(False, "TensorRT's Python package is not installed (`import tensorrt` fails)")
        return cls.folder_availability(engines)

    def _load_options(self, options: dict) -> dict:
        return {"cuda_graph": bool(options.get("cuda_graph", True))}

    def caching_availability(self, settings: SamplingSettings) -> Availability:
        if settings.guidance_cache.enabled:
            return Availability(False, "guidance caching calls the UNet on one branch (F samples), and the TensorRT "
                                       "UNet profile starts at three per frame: use --backend torch, compiled or "
                                       f"onnxruntime for --quality {settings.quality}")
        return super().caching_availability(settings)


BACKENDS: dict[str, type[Backend]] = {
    b.name: b for b in (TensorRTBackend, OnnxRuntimeBackend, CompiledBackend, TorchBackend)
}
#: backend="auto": the first whose auto_availability says yes, fastest first (engine backends need an
#: engine folder; compiled is not taken on the CPU).
AUTO_ORDER = ("tensorrt", "onnxruntime", "compiled", "torch")


def availability_report(
    device: torch.device, precision: str, engines: PathLike | None = None
) -> dict[str, tuple[Availability, Availability]]:
    """name -> (can it run here, does ``auto`` take it), for every backend, in dispatch order."""
    return {name: (BACKENDS[name].availability(device, precision, engines),
                   BACKENDS[name].auto_availability(device, precision, engines)) for name in AUTO_ORDER}


def select_backend(name: str, device: torch.device, precision: str, engines: PathLike | None = None) -> type[Backend]:
    """The backend class for ``name`` ('auto' picks the first available in AUTO_ORDER)."""
    if name != "auto":
        if name not in BACKENDS:
            raise DreamPoseError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
        avail = BACKENDS[name].availability(device, precision, engines)
        if not avail:
            raise DreamPoseError(f"backend {name!r} is not available: {avail.reason}")
        return BACKENDS[name]
    for candidate in AUTO_ORDER:
        if BACKENDS[candidate].auto_availability(device, precision, engines):
            return BACKENDS[candidate]
    return TorchBackend
