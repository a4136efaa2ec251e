"""The benchmark suite: the original release's way of rendering against every backend, in one run.

    from benchmarks.suite import BenchSettings, run_suite     # from a checkout (not installed)
    result = run_suite(BenchSettings(device="cuda", model="sd15", frames=4))

Variants:

* ``baseline``: what the original release did, built from the reference pipeline's phases
  (dreampose.pipeline): fp32 networks, diffusers' PNDM, a UNet batch of 3 (one frame per call),
  the subject's conditioning encoded again for every frame.
* one per runtime backend (``torch``, ``compiled``, ``onnxruntime``, ``tensorrt``) in the runtime's
  way: conditioning once per video, the fused guidance + scheduler update, F frames per UNet call.
  Backends that cannot run here are listed with the reason.

Every variant renders the same subject and poses in two modes: ``one_frame`` (the latency of one frame,
conditioning included) and ``batched`` (T frames, F per UNet call; the baseline renders them one at a
time, as the original did). Runs are interleaved (round r: every variant, every mode) after warm-up
rounds; each render is timed whole (CUDA events after a synchronisation on a GPU) with no phase timer
attached (so the runtime takes its fastest path: on CUDA it replays CUDA graphs, which cannot be timed
phase by phase). Then ``breakdown_rounds`` instrumented rounds time each phase (encode, UNet calls,
guidance + scheduler update, decode; see dreampose.timing). From those: seconds per frame (median, p95
over the rounds), frames per second, the breakdown, peak memory, and the FLOPs per frame (counted with
torch.utils.flop_counter at the real shapes) -> achieved TFLOP/s and MFU.

Microbenchmarks (``micro``): the scheduler step, C++ vs diffusers (bench_scheduler); the fused Triton
guidance + update vs eager (bench_fused_step, CUDA only); one UNet call per backend, interleaved.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dreampose.flops import unet_work
from dreampose.model import DreamPoseConfig, DreamPoseModel
from dreampose.settings import PRECISIONS, SamplingSettings, check_choice, torch_dtype
from dreampose.utils import DreamPoseError, read_json
from dreampose_rt.backends import AUTO_ORDER

from .measure import (
    MemoryMeter,
    PhaseRecorder,
    device_info,
    device_peak_tflops,
    dreampose_flops,
    module_bytes,
    time_call,
    versions,
)

logger = logging.getLogger(__name__)

BASELINE = "baseline"
RUNTIME_BACKENDS = tuple(reversed(AUTO_ORDER))  # the runtime's backends, the reference first
VARIANTS = (BASELINE, *RUNTIME_BACKENDS)
MODES = ("one_frame", "batched")
MODELS = ("tiny", "sd15")
SCHEMA_VERSION = 2  # 2: settings.sampling (scheduler, steps, scales, seed, noise) and settings.model_seed


@dataclass(frozen=True)
class BenchSettings:
    """What to run, checked on construction. ``sampling``: how the runtime backends sample (None: the
    model's defaults; the baseline always runs diffusers' PNDM, with ``sampling``'s scales and seed);
    ``model_seed``: the random weights of
    the tiny / sd15 models. ``frames_per_batch=None``: all ``frames`` in one UNet call (capped by engines'
    limits); ``baseline_steps=None``: the same as ``sampling.steps``; ``baseline_frames=None``: the baseline's batched mode
    renders all ``frames`` (it renders one frame at a time with everything recomputed, so its seconds per
    frame do not depend on how many: fewer save minutes on a GPU at the same result); ``precision=None``:
    fp16 on CUDA, fp32 on the CPU (the runtime backends; the baseline is always fp32; engines run at their
    own precision); ``channels_last``: the torch and compiled backends run the UNet in channels_last."""

    device: str = "auto"
    model: str = "tiny"
    frames: int = 4
    frames_per_batch: int | None = None
    sampling: SamplingSettings | None = None
    model_seed: int = 0
    baseline_steps: int | None = None
    baseline_frames: int | None = None
    backends: Sequence[str] = VARIANTS
    precision: str | None = None
    repeats: int = 3
    warmup: int = 1
    breakdown_rounds: int = 1
    engines: str | None = None
    build_engines: bool = False
    cache_dir: str | None = None
    compile_mode: str | None = None
    channels_last: bool = False
    peak_tflops: float | None = None
    micro: bool = True
    micro_rounds: int = 10

    def __post_init__(self) -> None:
        if self.sampling is not None and not isinstance(self.sampling, SamplingSettings):
            raise DreamPoseError(f"sampling must be a SamplingSettings (or None), got {type(self.sampling).__name__}")
        object.__setattr__(self, "backends", tuple(self.backends))
        for name in ("frames", "repeats", "breakdown_rounds", "micro_rounds"):
            if getattr(self, name) < 1:
                raise DreamPoseError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise DreamPoseError(f"warmup must be >= 0, got {self.warmup}")
        if self.frames_per_batch is not None and not 1 <= self.frames_per_batch <= self.frames:
            raise DreamPoseError(f"frames_per_batch must be in 1..frames ({self.frames}), got {self.frames_per_batch}")
        if self.baseline_frames is not None and not 1 <= self.baseline_frames <= self.frames:
            raise DreamPoseError(f"baseline_frames must be in 1..frames ({self.frames}), got {self.baseline_frames}")
        if self.baseline_steps is not None and self.baseline_steps < 1:
            raise DreamPoseError(f"baseline_steps must be >= 1, got {self.baseline_steps}")
        if self.precision is not None:
            check_choice("precision", self.precision, PRECISIONS)
        unknown = [b for b in self.backends if b not in VARIANTS]
        if unknown:
            raise DreamPoseError(f"unknown backend(s) {unknown}; choose from {', '.join(VARIANTS)}")
        if not self.backends:
            raise DreamPoseError("no backends to benchmark")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise DreamPoseError(f"peak_tflops must be positive, got {self.peak_tflops}")


@dataclass
class Variant:
    """One thing being measured: a name, how it renders (frame indices, frames per call) and its timer."""

    name: str
    description: str
    precision: str
    frames_per_batch: int
    render: Callable[[list[int], int], Any]
    timer: PhaseRecorder
    attach: Callable[[PhaseRecorder | None], None]
    weights_bytes: int
    unet: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    unet_flops_per_frame: float | None = None  # with caching (dreampose.flops.unet_work); None: 3 samples per call


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------
def model_config(spec: str) -> DreamPoseConfig:
    """The DreamPoseConfig of a bench model (its step and guidance defaults) without loading the weights."""
    if spec in MODELS:
        return DreamPoseConfig()
    path = Path(spec)
    if not path.is_dir():
        raise DreamPoseError(f"--model {spec!r}: not 'tiny', 'sd15' or a model folder")
    from dreampose.model import CONFIG_NAME

    return DreamPoseConfig.from_dict(read_json(path / CONFIG_NAME), str(path / CONFIG_NAME))


def load_model(spec: str, seed: int) -> tuple[DreamPoseModel, str]:
    """'tiny' | 'sd15' | a model folder -> (fp32 model on the CPU, description)."""
    if spec == "tiny":
        return DreamPoseModel.tiny(seed=seed), f"tiny random DreamPose (seed {seed})"
    if spec == "sd15":
        return DreamPoseModel.sd15_random(seed=seed), f"SD 1.5-size DreamPose, random weights (seed {seed})"
    path = Path(spec)
    if not path.is_dir():
        raise DreamPoseError(f"--model {spec!r}: not 'tiny', 'sd15' or a model folder")
    return DreamPoseModel.from_pretrained(path), f"model folder {path}"


def _inputs(model: DreamPoseModel, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """The procedural subject uint8 (H, W, 3) and walk poses float32 (T, 2, H, W) at the model's size."""
    from dreampose_rt.demo import demo_poses, demo_subject

    c = model.config
    return demo_subject(c.height, c.width), demo_poses(max(n_frames, c.n_poses), c.height, c.width)


class _Models:
    """The model in each (device, dtype, layout) it is needed in, made once and shared by variants. A
    channels_last backend converts its model's UNet in place, so it gets a copy of its own."""

    def __init__(self, model: DreamPoseModel, device: torch.device) -> None:
        self.base, self.device = model, device
        self._made: dict[tuple[torch.dtype, bool], DreamPoseModel] = {}

    def get(self, dtype: torch.dtype, channels_last: bool = False) -> DreamPoseModel:
        key = (dtype, channels_last)
        if key not in self._made:
            own = dtype == torch.float32 and self.device.type == "cpu" and not channels_last
            m = self.base if own else self.base.copy()
            self._made[key] = m.to(device=self.device, dtype=dtype).eval()
        return self._made[key]


def _baseline(models: _Models, image: np.ndarray, poses: np.ndarray, s: BenchSettings) -> Variant:
    """The original release's loop, from the reference pipeline's phases."""
    from dreampose.pipeline import DreamPosePipeline

    model = models.get(torch.float32)
    timer = PhaseRecorder(models.device)
    pipe = DreamPosePipeline(model)
    steps = s.baseline_steps or s.sampling.steps
    sampling = s.sampling.replace(scheduler="pndm", steps=steps, noise="shared")

    def render(frames: list[int], frames_per_batch: int) -> None:
        pose_seq = pipe.prepare_poses(poses)
        for i in frames:  # one frame at a time, everything recomputed
            subject = pipe.encode_subject(image)
            latents = pipe.initial_noise([i], sampling.seed, sampling.noise)
            latents = pipe.denoise(subject, pose_seq, [i], latents, sampling)
            pipe.decode(latents)

    def unet(x: torch.Tensor, p: torch.Tensor, t: torch.Tensor, ehs: torch.Tensor) -> torch.Tensor:
        return model.predict_noise(x, p, t, ehs)

    return Variant(
        name=BASELINE,
        description=f"original release: fp32, diffusers PNDM {steps} steps, batch 3, one frame per call, "
        "conditioning per frame",
        precision="fp32", frames_per_batch=1, render=render, timer=timer,
        attach=lambda t: setattr(pipe, "timer", t), weights_bytes=module_bytes(model),
        unet=torch.no_grad()(unet), info={"steps": steps, "scheduler": "pndm (diffusers)"},
    )  # fmt: skip


def _engine_dir(name: str, base: DreamPoseModel, device: torch.device, s: BenchSettings) -> tuple[Path | None, str]:
    """The engine folder for an engine backend: --engines, or (with build_engines) one built and cached."""
    if s.engines is not None:
        return Path(s.engines), "given"
    if not s.build_engines or name != "onnxruntime":
        return None, ""
    from dreampose_rt.export import build_engines

    cache = Path(s.cache_dir or Path(tempfile.gettempdir()) / "dreampose-rt-bench")
    key = s.model if s.model in MODELS else Path(s.model).resolve().name
    precision = "fp16" if device.type == "cuda" else "fp32"
    model_dir = cache / f"{key}-seed{s.model_seed}" / "model"
    if not (model_dir / "dreampose.json").is_file():
        logger.info("bench: saving the model to %s for the engine build", model_dir)
        base.save_pretrained(model_dir)
    out = cache / f"{key}-seed{s.model_seed}" / f"engines-onnxruntime-{precision}-f{s.frames}"
    logger.info("bench: building (or reusing) onnxruntime engines in %s", out)
    build_engines(model_dir if s.model in MODELS else s.model, out, backend="onnxruntime", precision=precision,
                  max_frames=s.frames)
    return out, "built"


def _runtime_variant(
    name: str, models: _Models, image: np.ndarray, poses: np.ndarray, s: BenchSettings
) -> Variant | str:
    """A runtime on backend ``name``, or the reason it cannot run here."""
    from dreampose_rt.backends import BACKENDS
    from dreampose_rt.export.manifest import EngineManifest
    from dreampose_rt.runtime import Runtime

    device = models.device
    engines: Path | None = None
    origin = ""
    if name in ("onnxruntime", "tensorrt"):
        try:
            engines, origin = _engine_dir(name, models.base, device, s)
        except DreamPoseError as e:
            return f"engine build failed: {e}"
    precision = s.precision or ("fp16" if device.type == "cuda" else "fp32")
    limit = s.frames
    if engines is not None and EngineManifest.exists(engines):
        manifest = EngineManifest.load(engines)
        precision, limit = manifest.precision, manifest.max_frames
    avail = BACKENDS[name].availability(device, precision, engines)
    if not avail:
        if engines is None and "engine folder" in avail.reason:
            return avail.reason + (" (pass --engines DIR or --build-engines)" if name == "onnxruntime" else " (pass --engines DIR)")
        return avail.reason
    dtype = torch_dtype(precision)
    channels_last = name in ("torch", "compiled") and s.channels_last
    model = models.get(dtype, channels_last)
    options: dict[str, Any] = {"engines": engines}
    if name == "compiled" and s.compile_mode:
        options["compile_mode"] = s.compile_mode
    if channels_last:
        options["channels_last"] = True
    try:
        backend = BACKENDS[name](model, device, dtype, **options)
    except DreamPoseError as e:
        return str(e)
    rt = Runtime(model, backend, fingerprint=f"bench-{name}")
    timer = PhaseRecorder(device)
    fpb = min(s.frames_per_batch or s.frames, limit)
    if fpb < (s.frames_per_batch or s.frames):
        logger.warning("bench: %s engines take at most %d frames per call; batching %d", name, limit, fpb)

    def render(frames: list[int], frames_per_batch: int) -> None:
        rt.clear_cache()  # every render pays for its conditioning once, as a new video does
        rt.render(poses, image, settings=s.sampling, frames=frames, frames_per_batch=frames_per_batch)

    if engines is not None:
        weights = sum(f.stat().st_size for f in engines.iterdir() if f.suffix in (".onnx", ".data", ".plan"))
    else:
        weights = module_bytes(model)
    info: dict[str, Any] = {"steps": s.sampling.steps, "scheduler": s.sampling.scheduler, "quality": s.sampling.quality,
                            "guidance_cache": s.sampling.guidance_cache.describe(),
                            "feature_cache": s.sampling.feature_cache.describe(), "backend": backend.describe()}
    work = unet_work(models.base, s.sampling) if s.sampling.caching else None
    if work is not None:
        info["unet_work"] = work
    if hasattr(rt, "data_plane"):
        info["data_plane"] = rt.data_plane()
    if engines is not None:
        info["engines"] = {"dir": str(engines), "origin": origin}
    return Variant(
        name=name, description=f"runtime, {backend.describe()}, {s.sampling.quality}: {s.sampling.scheduler} "
        f"{s.sampling.steps} steps, "
        f"conditioning once per video, up to {fpb} frames per call",
        precision=precision, frames_per_batch=fpb, render=render, timer=timer,
        attach=lambda t: setattr(rt, "timer", t), weights_bytes=weights,
        unet=torch.no_grad()(backend.unet), info=info, unet_flops_per_frame=work["flops"] if work else None,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------
def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _summarise(
    samples: list[dict[str, Any]], phased: list[dict[str, Any]], n_frames: int, frames_per_batch: int,
    flops: dict[str, int], peak_tflops: float | None, unet_flops_per_frame: float | None = None,
) -> dict[str, Any]:
    """Rounds of one (variant, mode) -> the reported numbers (medians over rounds unless named).

    ``samples``: the timed rounds {'seconds', 'memory'}; ``phased``: the instrumented rounds {'seconds', 'phases'}.
    ``unet_flops_per_frame``: the UNet work of a frame when its calls are not all 3 full samples (caching).
    """
    per_frame = [r["seconds"] / n_frames for r in samples]
    med = statistics.median(per_frame)
    phase = lambda k: [r["phases"].get(k, (0.0, 0))[0] for r in phased]  # noqa: E731
    calls = lambda k: phased[0]["phases"].get(k, (0.0, 0))[1]  # noqa: E731
    n_batches = -(-n_frames // frames_per_batch)
    unet_calls, update_calls, encodes = calls("unet"), calls("guidance_update"), calls("encode")
    breakdown = {
        "encode_s": statistics.median(phase("encode")) / n_frames,
        "unet_s": statistics.median(phase("unet")) / n_frames,
        "guidance_update_s": statistics.median(phase("guidance_update")) / n_frames,
        "decode_s": statistics.median(phase("decode")) / n_frames,
    }
    # the rest of each render (pose preparation, noise, scale_model_input, copies), per round, then the median
    breakdown["other_s"] = statistics.median(
        max(r["seconds"] - sum(t for t, _ in r["phases"].values()), 0.0) for r in phased
    ) / n_frames
    calls_per_batch = unet_calls / n_batches
    unet_per_frame = calls_per_batch * 3 * flops["unet_per_sample"] if unet_flops_per_frame is None else unet_flops_per_frame
    flops_per_frame = (
        unet_per_frame
        + flops["vae_decode_per_frame"]
        + flops["encode_per_subject"] * encodes / n_frames
    )
    out: dict[str, Any] = {
        "frames": n_frames,
        "frames_per_batch": frames_per_batch,
        "unet_batch": 3 * frames_per_batch,
        "rounds": len(samples),
        "breakdown_rounds": len(phased),
        "seconds_per_frame": {"median": med, "p95": _percentile(per_frame, 95), "min": min(per_frame)},
        "frames_per_second": 1.0 / med,
        "breakdown_per_frame": breakdown,
        "unet_ms_per_call": 1e3 * statistics.median(phase("unet")) / unet_calls,
        "guidance_update_ms_per_step": 1e3 * statistics.median(phase("guidance_update")) / update_calls,
        "calls": {"unet": unet_calls, "guidance_update": update_calls, "encode": encodes, "decode": calls("decode")},
        "peak_memory_bytes": max(r["memory"]["peak_bytes"] for r in samples),
        "flops_per_frame": flops_per_frame,
        "achieved_tflops": flops_per_frame / med / 1e12,
        "unet_achieved_tflops": unet_per_frame * frames_per_batch / calls_per_batch / (
            statistics.median(phase("unet")) / unet_calls) / 1e12,
    }  # fmt: skip
    if peak_tflops is not None:
        out["mfu"] = out["achieved_tflops"] / peak_tflops
        out["unet_mfu"] = out["unet_achieved_tflops"] / peak_tflops
    return out


def _memory_note(kind: str) -> str:
    if kind == "cuda_max_allocated":
        return ("peak_memory_bytes = the variant's weights + the torch allocator's peak above its level before "
                "the render (other variants' weights, resident for interleaving, are not counted; engine "
                "memory outside torch is not seen)")
    return ("peak_memory_bytes = the whole process's resident-set high-water mark during the render: it "
            "includes every variant's weights (all loaded for interleaving) and the Python runtime")


def run_suite(settings: BenchSettings) -> dict[str, Any]:
    """Run the suite; returns the result record (see the module docstring; written by report.write_outputs)."""
    from dreampose_rt.runtime import resolve_device

    s = settings
    device = resolve_device(s.device)
    if s.model == "sd15" and device.type == "cpu":
        logger.warning("bench: the sd15 model at 640 x 512 on the CPU is very slow (~320 TFLOP per frame at 100 "
                       "steps: hours per frame); it is meant for a GPU")  # fmt: skip
    base, model_desc = load_model(s.model, s.model_seed)
    if s.sampling is None:
        s = dataclasses.replace(s, sampling=SamplingSettings.for_model(base.config))
    image, poses = _inputs(base, s.frames)
    logger.info("bench: counting FLOPs on a meta copy of the model")
    flops = dreampose_flops(base)
    models = _Models(base, device)

    variants: list[Variant] = []
    unavailable: dict[str, str] = {}
    for name in s.backends:
        if name == BASELINE:
            variants.append(_baseline(models, image, poses, s))
            continue
        v = _runtime_variant(name, models, image, poses, s)
        if isinstance(v, str):
            logger.info("bench: %s unavailable: %s", name, v)
            unavailable[name] = v
        else:
            variants.append(v)
    if not variants:
        raise DreamPoseError("no backend can run here: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))

    info = device_info(device)
    if device.type == "cuda":
        peak, peak_source = (s.peak_tflops, "--peak-tflops") if s.peak_tflops else device_peak_tflops(info["name"])
    else:
        peak, peak_source = (s.peak_tflops, "--peak-tflops") if s.peak_tflops else (None, "no MFU on the CPU")
    meter = MemoryMeter(device)
    modes = {"one_frame": [0], "batched": list(range(s.frames))}

    def frames_of(v: Variant, mode: str) -> list[int]:
        if mode == "batched" and v.name == BASELINE and s.baseline_frames is not None:
            return modes[mode][: s.baseline_frames]
        return modes[mode]

    raw: dict[tuple[str, str], list[dict[str, Any]]] = {(v.name, m): [] for v in variants for m in modes}
    phased: dict[tuple[str, str], list[dict[str, Any]]] = {(v.name, m): [] for v in variants for m in modes}
    # Timed rounds run without phase timers (on CUDA the runtime replays CUDA graphs only then); the
    # breakdown comes from instrumented rounds after them.
    n_rounds = s.warmup + s.repeats + s.breakdown_rounds
    for r in range(n_rounds):
        instrumented = r >= s.warmup + s.repeats
        kind = ("warm-up" if r < s.warmup else f"breakdown {r - s.warmup - s.repeats + 1}/{s.breakdown_rounds}"
                if instrumented else f"round {r - s.warmup + 1}/{s.repeats}")  # fmt: skip
        for v in variants:
            v.attach(v.timer if instrumented else None)
            for mode in modes:
                frames = frames_of(v, mode)
                fpb = 1 if mode == "one_frame" else v.frames_per_batch
                v.timer.reset()
                meter.start()
                seconds = time_call(lambda: v.render(frames, fpb), device)
                memory = meter.stop()
                logger.info("bench: %s %-11s %-9s %.3f s (%.3f s/frame)", kind, v.name, mode, seconds,
                            seconds / len(frames))
                if instrumented:
                    phased[(v.name, mode)].append({"seconds": seconds, "phases": v.timer.collect()})
                elif r >= s.warmup:
                    if device.type == "cuda":  # own weights + the transient peak of this render
                        memory = {"peak_bytes": v.weights_bytes + memory["peak_bytes"] - memory["before_bytes"]}
                    raw[(v.name, mode)].append({"seconds": seconds, "memory": memory})
        for v in variants:
            v.attach(None)

    results: dict[str, Any] = {}
    for v in variants:
        entry: dict[str, Any] = {"description": v.description, "precision": v.precision,
                                 "weights_bytes": v.weights_bytes, **v.info}
        for mode in modes:
            fpb = 1 if mode == "one_frame" else v.frames_per_batch
            entry[mode] = _summarise(raw[(v.name, mode)], phased[(v.name, mode)], len(frames_of(v, mode)), fpb,
                                     flops, peak, v.unet_flops_per_frame)
        results[v.name] = entry
    if BASELINE in results:
        for v in variants:
            for mode in modes:
                base_med = results[BASELINE][mode]["seconds_per_frame"]["median"]
                results[v.name][mode]["speedup_vs_baseline"] = base_med / results[v.name][mode]["seconds_per_frame"]["median"]

    micro = run_micro(variants, base, device, s) if s.micro else {}
    if hasattr(os, "getloadavg"):
        info["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    return {
        "benchmark": "python -m benchmarks",
        "schema_version": SCHEMA_VERSION,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": info,
        "versions": versions(),
        "settings": {**dataclasses.asdict(s), "backends": list(s.backends), "device": str(device)},
        "model": {
            "name": s.model,
            "description": model_desc,
            "height": base.config.height,
            "width": base.config.width,
            "latent": [base.latent_channels, *base.latent_size],
            "parameters": base.parameter_counts(),
        },
        "flops": flops,
        "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "memory_kind": meter.kind,
        "memory_note": _memory_note(meter.kind),
        "timing": "CUDA events after synchronisation" if device.type == "cuda" else "time.perf_counter",
        "variants": results,
        "unavailable": unavailable,
        "micro": micro,
    }


# --------------------------------------------------------------------------------------------------
# Microbenchmarks
# --------------------------------------------------------------------------------------------------
def bench_unet_calls(variants: Sequence[Variant], model: DreamPoseModel, device: torch.device, rounds: int,
                     warmup: int = 2) -> dict[str, Any]:
    """One UNet call at batch 3 (one frame) per variant, interleaved; median ms per call and ratio to torch
    (for ONNX Runtime vs torch: the same inputs, latents (3, 4, h, w), pose window (3, 2n, h, w), ehs (3, N, D))."""
    h, w = model.latent_size
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, model.latent_channels, h, w, generator=g).to(device)
    p = torch.rand(3, c.pose_window_channels, h, w, generator=g).mul(2).sub(1).to(device)
    ehs = torch.randn(3, model.adapter.config.clip_tokens, model.adapter.config.clip_dim, generator=g).to(device)
    t = torch.tensor(500, device=device)
    timed = [v for v in variants if v.unet is not None]
    samples: dict[str, list[float]] = {v.name: [] for v in timed}
    for r in range(warmup + rounds):
        for v in timed:
            dtype = torch_dtype(v.precision)
            dt = time_call(lambda: v.unet(x.to(dtype), p.to(dtype), t, ehs.to(dtype)), device)
            if r >= warmup:
                samples[v.name].append(dt)
    med = {k: 1e3 * statistics.median(vs) for k, vs in samples.items()}
    out: dict[str, Any] = {"batch": 3, "rounds": rounds, "median_ms_per_call": med}
    if "torch" in med:
        out["speedup_vs_torch"] = {k: med["torch"] / v for k, v in med.items()}
    return out


def run_micro(variants: Sequence[Variant], model: DreamPoseModel, device: torch.device,
              s: BenchSettings) -> dict[str, Any]:
    """The microbenchmarks; each one that cannot run here says why (``skipped``)."""
    from . import bench_fused_step, bench_scheduler

    out: dict[str, Any] = {}
    logger.info("bench: micro: scheduler step (C++ vs diffusers, CPU, 4 x 80 x 64)")
    out["scheduler_step"] = bench_scheduler.bench(1, s.micro_rounds, s.sampling.steps, "auto")
    if device.type != "cuda":
        out["fused_step"] = {"skipped": "the Triton fused step is timed on CUDA only (bench_fused_step)"}
    else:
        from dreampose_rt.kernels import kernel_availability

        kernel = kernel_availability()
        if not kernel:
            out["fused_step"] = {"skipped": f"the Triton kernel cannot run here: {kernel.reason}"}
        else:
            logger.info("bench: micro: fused guidance + update (Triton vs eager)")
            dtype = torch_dtype(s.precision or "fp16")
            copy = bench_fused_step.copy_bandwidth_gbps()
            out["fused_step"] = bench_fused_step.bench(1, s.sampling.scheduler, s.sampling.steps, dtype, s.micro_rounds,
                                                       copy)
    logger.info("bench: micro: one UNet call per backend")
    out["unet_call"] = bench_unet_calls(variants, model, device, s.micro_rounds)
    return out
