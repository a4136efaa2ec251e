"""Resumable rendering to a file: what ``dreampose-rt animate`` runs.

Frames are written, as they finish, to a work folder next to the output (``<OUT>.work/``: one PNG per
frame, each written atomically, plus ``settings.json``). The same command after a crash or Ctrl-C finds
the folder, checks that its settings are the same, and renders only the missing frames (a folder that
holds frames of a render with other settings is never discarded silently: that is an error unless
``--restart``; one that holds no frames never blocks a render; a frame that does not read back is
rendered again). The video is assembled from the PNGs (lossless), so a resumed render gives exactly the
bytes of an uninterrupted one; then the work folder is removed.

Everything is checked before anything is written (dreampose.outputs): the output and the work folder
must be new, empty or this command's own, and neither may be (or contain) an input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from dreampose.images import ImageLike
from dreampose.outputs import check_output_dir, check_output_file, claim_output_dir, read_marker
from dreampose.pipeline import check_frames_per_batch, frame_batches, resolve_frames
from dreampose.settings import FeatureCache, GuidanceCache, SamplingSettings
from dreampose.utils import DreamPoseError, PathLike, write_json
from dreampose.video import check_fps, frame_name, output_kind, read_png, write_frames, write_png

from .runtime import Runtime

logger = logging.getLogger(__name__)

SETTINGS = "settings.json"
COMMAND = "animate"
_FRAME = re.compile(r"^frame_\d+\.png$")


class RenderSource(Protocol):
    """What :func:`render_to_file` needs of a renderer (a :class:`Runtime` is one; so is the Ray cluster of
    dreampose_rt.distributed): the identity of its frames, the subject's pixels, batching, and the frames."""

    config: Any  # the model's DreamPoseConfig (height, width)

    def identity(self) -> dict[str, str]: ...

    def describe(self) -> str: ...

    def load_subject(self, image: ImageLike | None) -> Any: ...

    def auto_frames_per_batch(self) -> int: ...

    def check_frames_per_batch(self, frames_per_batch: int) -> None: ...

    def check_settings(self, settings: SamplingSettings) -> None: ...

    def stream(self, poses: np.ndarray, image: ImageLike | None, *, settings: SamplingSettings, frames: Sequence[int],
               frames_per_batch: int, progress: bool, skip: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]: ...


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


def check_outputs(out: PathLike, inputs: Sequence[PathLike | None] = ()) -> None:
    """Raise DreamPoseError unless ``animate`` may write ``out`` and its work folder: a video file that is
    not an input (an existing one is replaced), or a PNG folder and a work folder that are new, empty or
    ``animate``'s own, none of them an input or containing one."""
    out = Path(out)
    if output_kind(out) == "png":
        check_output_dir(out, COMMAND, inputs)
    else:
        check_output_file(out, inputs)
    check_output_dir(work_folder(out), COMMAND, inputs, legacy=_is_legacy_work_folder)


def render_to_file(
    runtime: Runtime | RenderSource,
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
    inputs: Sequence[PathLike | None] = (),
) -> RenderReport:
    """Render ``frames`` (all by default) to ``out`` (.mp4, .gif or a PNG folder), resumably.

    runtime: what renders the frames: a :class:`Runtime`, or any :class:`RenderSource`.
    poses: float32 (T, 2, H, W) U, V in [0, 1] (already loaded). settings: how to sample (resolved by
    the caller). frames_per_batch: frames per UNet call (None: the runtime's choice, kept on resume).
    inputs: the paths the render reads (image, poses, model, engines): the output may not be one.
    A work folder left by an interrupted render with the same settings is resumed; one that holds frames
    of a render with other settings is an error (its frames are not thrown away) unless ``restart`` is
    True. Every setting and the outputs are checked before anything is written. Returns a RenderReport.
    """
    job = RenderJob(runtime, out, poses, image, settings, frames=frames, frames_per_batch=frames_per_batch, fps=fps,
                    restart=restart, inputs=inputs)
    with job:
        for i, frame in runtime.stream(poses, image, settings=settings, frames=job.frames,
                                       frames_per_batch=job.frames_per_batch, progress=progress, skip=sorted(job.done)):
            job.write(i, frame)
        return job.finish()


class RenderJob:
    """One resumable render to a file, its frames coming from anywhere (what :func:`render_to_file` runs; the
    Ray cluster of dreampose_rt.distributed runs many at once, their batches spread over its actors).

    Construction checks every setting and the outputs (nothing is written). Entering the ``with`` block takes
    the output's lock, reads the work folder, checks it is of this render (see :func:`_resume`) and claims
    it; then :attr:`batches` are the batches of frames still to render (the same batches a single-process
    render makes: ``frames_per_batch`` consecutive frames of ``frames``), :meth:`write` stores a frame,
    :meth:`finish` assembles the output and removes the work folder.
    """

    def __init__(
        self,
        source: Runtime | RenderSource,
        out: PathLike,
        poses: np.ndarray,
        image: ImageLike | None,
        settings: SamplingSettings,
        *,
        frames: Sequence[int] | None = None,
        frames_per_batch: int | None = None,
        fps: float = 8.0,
        restart: bool = False,
        inputs: Sequence[PathLike | None] = (),
    ) -> None:
        self.source, self.out, self.poses, self.image, self.settings = source, Path(out), poses, image, settings
        self.fps, self.restart, self.inputs = fps, restart, list(inputs)
        check_fps(fps, self.out)  # also rejects an unsupported output
        self.frames = resolve_frames(frames, len(poses))
        if frames_per_batch is not None:
            check_frames_per_batch(frames_per_batch)
        self._given_fpb = frames_per_batch
        check_outputs(self.out, self.inputs)
        source.check_settings(settings)
        self.pixels = source.load_subject(image)
        self.work = work_folder(self.out)
        self.frames_per_batch = 0
        self.done: set[int] = set()
        self.rendered = 0
        self._lock: contextlib.ExitStack | None = None
        self._created = False
        self._start = 0.0

    def __enter__(self) -> "RenderJob":
        stack = contextlib.ExitStack()
        stack.enter_context(_exclusive(self.out))
        try:
            previous = _read_settings(self.work)
            fpb = self._given_fpb
            if fpb is None:  # auto batching depends on free memory: a resumed render keeps the first run's choice
                fpb = previous.get("frames_per_batch") if previous else None
                fpb = fpb if isinstance(fpb, int) and not isinstance(fpb, bool) and fpb >= 1 else \
                    self.source.auto_frames_per_batch()
            self.source.check_frames_per_batch(fpb)
            self.frames_per_batch = fpb
            identity: dict[str, Any] = {
                **self.source.identity(),  # model, backend, device, dtype
                "image": _digest(self.pixels.numpy()),
                "poses": _digest(self.poses),
                "frames": self.frames,
                **self.settings.to_dict(),
                "frames_per_batch": fpb,  # batching changes the arithmetic: part of the identity
            }
            c = self.source.config
            self.done = _resume(self.work, previous, identity, self.restart, (c.height, c.width))
            if self.done:
                logger.info("resuming %s: %d of %d frames already rendered", self.work, len(self.done), len(self.frames))
            self._created = not self.work.exists()
            claim_output_dir(self.work, COMMAND, self.inputs, legacy=_is_legacy_work_folder)
            write_json(self.work / SETTINGS, identity)
        except BaseException:
            stack.close()
            raise
        self._lock = stack
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        """Release the lock; a work folder this render created and left without a frame (it failed before
        its first) is removed."""
        if self._lock is None:
            return
        try:
            if self._created and self.work.is_dir() and not _frame_files(self.work):
                shutil.rmtree(self.work)
        finally:
            self._lock.close()
            self._lock = None

    @property
    def batches(self) -> list[list[int]]:
        """The batches still to render (a batch with a frame missing is rendered whole: batches are the unit
        of the arithmetic)."""
        return [b for b in frame_batches(self.frames, self.frames_per_batch) if not set(b) <= self.done]

    def write(self, index: int, frame: np.ndarray) -> None:
        """Store rendered frame ``index`` (uint8 (H, W, 3)) in the work folder; a frame already there is kept."""
        if index in self.done:
            return
        write_png(frame, self.work / frame_name(index))
        self.done.add(index)
        self.rendered += 1

    def finish(self) -> RenderReport:
        """Assemble the output from the work folder's frames (all must be there) and remove the work folder."""
        missing = [i for i in self.frames if i not in self.done]
        if missing:
            raise RuntimeError(f"{self.out}: frames {missing[:5]} were not rendered")
        seconds = time.perf_counter() - self._start
        video = np.stack([read_png(self.work / frame_name(i)) for i in self.frames])
        write_frames(video, self.out, fps=self.fps, command=COMMAND)
        shutil.rmtree(self.work)
        return RenderReport(self.out, len(self.frames), self.rendered, len(self.frames) - self.rendered, seconds,
                            self.source.describe())


#: the first line of the lock file a render holds beside its output (how a leftover lock is told from a user's file)
_LOCK_TAG = "dreampose-rt render lock"


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock for rendering ``out`` (``<OUT>.lock``, the project's own file): a second render
    to the same output fails at once. A lock left by a killed render is taken over; a file of that name that
    the project did not write is refused, never removed."""
    lock_path = out.with_name(out.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            os.write(fd, f"{_LOCK_TAG}\npid {os.getpid()}\n".encode())
        except FileExistsError:
            try:
                fd = os.open(lock_path, os.O_RDWR)
            except FileNotFoundError:  # removed since (a render finished): try again
                continue
            if not os.read(fd, len(_LOCK_TAG)).decode(errors="replace") == _LOCK_TAG:
                os.close(fd)
                raise DreamPoseError(f"{lock_path} exists and was not written by dreampose-rt; move it away or "
                                     "choose another output") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DreamPoseError(f"{out}: another render is writing this output (lock {lock_path})") from None
        try:  # the file locked must still be the one at the path (a finishing render removes its lock)
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            lock_path.unlink(missing_ok=True)  # removed while still held: a waiting render then re-checks the path
        finally:
            os.close(fd)


def _is_legacy_work_folder(work: Path) -> bool:
    """A work folder written before output markers: settings.json and frame PNGs, nothing else."""
    names = [p.name for p in work.iterdir()]
    return SETTINGS in names and all(n == SETTINGS or _FRAME.match(n) or n.endswith(".tmp") or ".tmp-" in n
                                     for n in names)


def _read_settings(work: Path) -> dict | None:
    try:
        previous = json.loads((work / SETTINGS).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return previous if isinstance(previous, dict) else None


def _frame_files(work: Path) -> list[Path]:
    return sorted(p for p in work.iterdir() if _FRAME.match(p.name)) if work.is_dir() else []


def _readable(path: Path, size: tuple[int, int]) -> bool:
    try:
        return read_png(path).shape == (*size, 3)
    except (OSError, ValueError, SyntaxError):  # what Pillow raises for a truncated or corrupt PNG
        return False


#: settings 0.1 did not write; a work folder without them was rendered without caching
_ADDED_IN_0_2 = {"guidance_cache": dataclasses.asdict(GuidanceCache()), "feature_cache": dataclasses.asdict(FeatureCache())}


def _comparable(settings: dict, current: dict | None = None) -> dict:
    """What decides the frames, for comparing a work folder's settings with a render's: the preset's name
    is a label (its values are compared), and a 0.1 folder's missing keys take their uncached values."""
    out = {k: v for k, v in settings.items() if k != "quality"}
    if out.get("extra") == {}:  # 0.1's render settings had an "extra" that was never set
        del out["extra"]
    if current is not None:
        for key, value in _ADDED_IN_0_2.items():
            out.setdefault(key, value)
    return out


def _resume(work: Path, previous: dict | None, identity: dict, restart: bool, size: tuple[int, int]) -> set[int]:
    """Frame indices already in ``work`` for a render with this identity (frames of ``size`` = (H, W)).

    A folder that holds frames of another render (other settings, model, image or poses) is an error naming
    what differs, unless ``restart``: then it is removed (it is this command's own, checked before). A
    folder with no frames never blocks a render; a frame that does not read back is rendered again.
    """
    if not work.exists():
        return set()
    if restart:
        if read_marker(work) is not None or _is_legacy_work_folder(work):
            logger.warning("%s: --restart: discarding the frames of the earlier render", work)
            shutil.rmtree(work)
        return set()
    current = _comparable(json.loads(json.dumps(identity)))
    previous = _comparable(previous, current) if isinstance(previous, dict) else previous
    if previous != current:
        if not _frame_files(work):
            return set()  # nothing to keep: the settings are written anew
        differ = sorted(k for k in set(current) | set(previous or {}) if (previous or {}).get(k) != current.get(k))
        raise DreamPoseError(
            f"{work} holds frames of another render ({', '.join(differ) or 'unreadable settings'} differ); "
            "run the same command as before to resume it, or pass --restart to discard it"
        )
    done = set()
    for i in identity["frames"]:
        path = work / frame_name(i)
        if not path.is_file():
            continue
        if _readable(path, size):
            done.add(i)
        else:
            logger.warning("%s does not read back as a %d x %d frame: rendering it again", path, *size)
            path.unlink()
    return done
