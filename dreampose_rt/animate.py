"""Resumable rendering to a file: what ``dreampose-rt animate`` runs.

Frames are written, as they finish, to a work folder next to the output (``<OUT>.work/``: one PNG per
frame, each written atomically, plus ``settings.json``). The same command after a crash or Ctrl-C finds
the folder, checks that its settings are the same, and renders only the missing frames. The video is
assembled from the PNGs (lossless), so a resumed render gives exactly the bytes of an uninterrupted one;
then the work folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dreampose.images import ImageLike
from dreampose.utils import PathLike, write_json
from dreampose.video import frame_name, output_kind, read_png, write_frames, write_png

from .runtime import Runtime

logger = logging.getLogger(__name__)

SETTINGS = "settings.json"


@dataclass
class RenderSettings:
    """Everything that determines the frames of a render (and so whether a work folder can be resumed)."""

    steps: int | None = None
    scheduler: str = "pndm"
    s_image: float | None = None
    s_pose: float | None = None
    seed: int = 0
    noise: str = "shared"
    frames_per_batch: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class RenderReport:
    """What a render did: frames rendered now, frames taken from an earlier run, seconds, output path."""

    out: Path
    frames: int
    rendered: int
    resumed: int
    seconds: float
    backend: str

    @property
    def seconds_per_frame(self) -> float:
        return self.seconds / max(self.rendered, 1)


def work_folder(out: PathLike) -> Path:
    """The work folder of an output: ``<OUT>.work`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".work")


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes() + str(array.shape).encode()).hexdigest()[:16]


def render_to_file(
    runtime: Runtime,
    out: PathLike,
    poses: np.ndarray,
    image: ImageLike | None,
    settings: RenderSettings,
    frames: Sequence[int] | None = None,
    fps: float = 8.0,
    progress: bool = True,
) -> RenderReport:
    """Render ``frames`` (all by default) to ``out`` (.mp4, .gif or a PNG folder), resumably.

    poses: float32 (T, 2, H, W) U, V in [0, 1] (already loaded). Returns a RenderReport.
    """
    out = Path(out)
    output_kind(out)  # reject an unsupported output before any work
    frames = list(range(len(poses))) if frames is None else list(frames)
    pixels = runtime.load_subject(image)
    fpb = runtime.auto_frames_per_batch() if settings.frames_per_batch is None else settings.frames_per_batch
    identity: dict[str, Any] = {
        "model": runtime.fingerprint,
        "backend": runtime.backend.name,
        "device": runtime.device.type,
        "dtype": str(runtime.dtype),
        "image": _digest(pixels.numpy()),
        "poses": _digest(poses),
        "frames": frames,
        **asdict(settings),
        "frames_per_batch": fpb,  # batching changes the arithmetic: part of the identity
    }
    work = work_folder(out)
    done = _resume(work, identity)
    if done:
        logger.info("resuming %s: %d of %d frames already rendered", work, len(done), len(frames))
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / SETTINGS, identity)

    start = time.perf_counter()
    rendered = 0
    for i, frame in runtime.stream(
        poses, image, settings.steps, settings.scheduler, settings.s_image, settings.s_pose, settings.seed,
        settings.noise, frames, fpb, progress, skip=sorted(done),
    ):
        write_png(frame, work / frame_name(i))
        rendered += 1
    seconds = time.perf_counter() - start

    video = np.stack([read_png(work / frame_name(i)) for i in frames])
    write_frames(video, out, fps=fps)
    shutil.rmtree(work)
    return RenderReport(out, len(frames), rendered, len(frames) - rendered, seconds, runtime.backend.describe())


def _resume(work: Path, identity: dict) -> set[int]:
    """Frame indices already in ``work`` for a render with this identity; clears a stale folder."""
    if not work.exists():
        return set()
    try:
        previous = json.loads((work / SETTINGS).read_text())
    except (OSError, json.JSONDecodeError):
        previous = None
    if previous != json.loads(json.dumps(identity)):
        logger.warning("%s holds frames of a different render (other settings); starting over", work)
        shutil.rmtree(work)
        return set()
    return {i for i in identity["frames"] if (work / frame_name(i)).is_file()}
