"""Resumable rendering to a file: what ``dreampose-rt animate`` runs.

Frames are written, as they finish, to a work folder next to the output (``<OUT>.work/``: one PNG per
frame, each written atomically, plus ``settings.json``). The same command after a crash or Ctrl-C finds
the folder, checks that its settings are the same, and renders only the missing frames (a folder of a
render with other settings is never discarded silently: that is an error unless ``--restart``). The video is
assembled from the PNGs (lossless), so a resumed render gives exactly the bytes of an uninterrupted one;
then the work folder is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from dreampose.images import ImageLike
from dreampose.pipeline import check_frames_per_batch, resolve_frames
from dreampose.settings import SamplingSettings
from dreampose.utils import DreamPoseError, PathLike, write_json
from dreampose.video import frame_name, output_kind, read_png, write_frames, write_png

from .runtime import Runtime

logger = logging.getLogger(__name__)

SETTINGS = "settings.json"


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
    settings: SamplingSettings,
    *,
    frames: Sequence[int] | None = None,
    frames_per_batch: int | None = None,
    fps: float = 8.0,
    progress: bool = True,
    restart: bool = False,
) -> RenderReport:
    """Render ``frames`` (all by default) to ``out`` (.mp4, .gif or a PNG folder), resumably.

    poses: float32 (T, 2, H, W) U, V in [0, 1] (already loaded). settings: how to sample (resolved by
    the caller). frames_per_batch: frames per UNet call (None: the runtime's choice, kept on resume). A
    work folder left by an interrupted render with the same settings is resumed; one left by a render with
    other settings is an error (its frames are not thrown away) unless ``restart`` is True. Returns a
    RenderReport.
    """
    out = Path(out)
    output_kind(out)  # reject an unsupported output before any work
    frames = resolve_frames(frames, len(poses))
    if frames_per_batch is not None:
        check_frames_per_batch(frames_per_batch)
    pixels = runtime.load_subject(image)
    work = work_folder(out)
    with _exclusive(out):
        previous = _read_settings(work)
        fpb = frames_per_batch
        if fpb is None:  # auto batching depends on free memory: a resumed render keeps the first run's choice
            fpb = previous.get("frames_per_batch") if previous else None
            fpb = fpb if isinstance(fpb, int) else runtime.auto_frames_per_batch()
        identity: dict[str, Any] = {
            "model": runtime.fingerprint,
            "backend": runtime.backend.name,
            "device": runtime.device.type,
            "dtype": str(runtime.dtype),
            "image": _digest(pixels.numpy()),
            "poses": _digest(poses),
            "frames": frames,
            **settings.to_dict(),
            "frames_per_batch": fpb,  # batching changes the arithmetic: part of the identity
        }
        done = _resume(work, previous, identity, restart)
        if done:
            logger.info("resuming %s: %d of %d frames already rendered", work, len(done), len(frames))
        work.mkdir(parents=True, exist_ok=True)
        write_json(work / SETTINGS, identity)

        start = time.perf_counter()
        rendered = 0
        for i, frame in runtime.stream(poses, image, settings, frames=frames, frames_per_batch=fpb, progress=progress,
                                       skip=sorted(done)):
            write_png(frame, work / frame_name(i))
            rendered += 1
        seconds = time.perf_counter() - start

        video = np.stack([read_png(work / frame_name(i)) for i in frames])
        write_frames(video, out, fps=fps)
        shutil.rmtree(work)
    return RenderReport(out, len(frames), rendered, len(frames) - rendered, seconds, runtime.backend.describe())


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock for rendering ``out``: a second render to the same output fails at once."""
    lock_path = out.with_name(out.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DreamPoseError(f"{out}: another render is writing this output (lock {lock_path})") from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_settings(work: Path) -> dict | None:
    try:
        previous = json.loads((work / SETTINGS).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return previous if isinstance(previous, dict) else None


def _resume(work: Path, previous: dict | None, identity: dict, restart: bool) -> set[int]:
    """Frame indices already in ``work`` for a render with this identity.

    A folder of another render (other settings, model, image or poses) is an error naming what differs,
    unless ``restart``: then it is removed.
    """
    if not work.exists():
        return set()
    current = json.loads(json.dumps(identity))
    if previous != current:
        if not restart:
            differ = sorted(k for k in set(current) | set(previous or {}) if (previous or {}).get(k) != current.get(k))
            raise DreamPoseError(
                f"{work} holds frames of another render ({', '.join(differ) or 'unreadable settings'} differ); "
                "run the same command as before to resume it, or pass --restart to discard it"
            )
        logger.warning("%s holds frames of another render; --restart: discarding it", work)
        shutil.rmtree(work)
        return set()
    return {i for i in identity["frames"] if (work / frame_name(i)).is_file()}
