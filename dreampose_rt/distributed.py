"""Rendering beyond one machine, on Ray: one video's frames, or many videos, across GPUs (or CPUs).

    from dreampose_rt.distributed import render_jobs
    results = render_jobs([{"image": "a.png", "poses": "a/", "out": "a.mp4", "model": "models/a"},
                           {"image": "b.png", "poses": "b.npz", "out": "b.mp4", "quality": "fast"}])

Frames of a DreamPose video are independent once the subject is encoded: each frame's noise is seeded by
(seed, frame). So the cluster makes the single-process render's batches (``frames_per_batch`` consecutive
frames, dreampose.pipeline.frame_batches) and sends each to whichever actor is free:

- an actor (:class:`RenderActor`) holds one Runtime per model (loaded once) on one GPU (``num_gpus=1``),
  or on the CPU with an explicit thread count; it encodes a video's subject once (the Runtime caches it);
- the driver writes each finished frame into the job's resumable work folder (dreampose_rt.animate's
  :class:`RenderJob`: the same folder, identity and resume rules as ``dreampose-rt animate``), so a written
  frame is never rendered again and a killed driver resumes;
- faults are Ray's to handle: an actor that dies is restarted and its in-flight batch retried
  (``max_restarts``, ``max_task_retries``); a batch whose actor is lost for good goes back to the queue.

With the same batches and thread count the frames are byte-identical to a single-process render's; with
other thread counts or batches, within 1/255 (docs/distributed.md).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from dreampose.settings import SamplingSettings, check_int
from dreampose.utils import DreamPoseError, PathLike, atomic_file

from .animate import RenderJob

logger = logging.getLogger(__name__)

#: actor restarts and task retries Ray makes after a worker dies; then the driver requeues the batch
MAX_RESTARTS = 3
MAX_REQUEUES = 3
#: batches in flight per actor (the next one waits in the actor's queue: no idle gap between batches)
IN_FLIGHT = 2


def import_ray() -> Any:
    """``import ray`` with an error that says what to install."""
    try:
        import ray
    except ImportError as e:
        raise DreamPoseError(f"rendering on a Ray cluster needs Ray: pip install 'dreampose-rt[ray]' ({e})") from None
    return ray


@dataclass(frozen=True)
class RuntimeSpec:
    """Which Runtime an actor renders with: a model folder (None: the embedded demo model), a backend, a
    precision (None: the device's default), an engine folder. The device is the actor's (its GPU, or CPU)."""

    model: str | None = None
    backend: str = "auto"
    precision: str | None = None
    engines: str | None = None


class RenderActor:
    """A Ray actor's state: Runtimes by spec (the two most recent kept), on one device, with a fixed torch
    thread count. Plain Python: :class:`Cluster` turns it into a Ray actor class."""

    def __init__(self, device: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.device, self.threads = device, threads
        self._runtimes: collections.OrderedDict[RuntimeSpec, Any] = collections.OrderedDict()

    def _runtime(self, spec: RuntimeSpec) -> Any:
        from .runtime import Runtime

        if spec not in self._runtimes:
            self._runtimes[spec] = Runtime.from_pretrained(spec.model, backend=spec.backend, device=self.device,
                                                           precision=spec.precision, engines=spec.engines)
            while len(self._runtimes) > 2:
                self._runtimes.popitem(last=False)
        self._runtimes.move_to_end(spec)
        return self._runtimes[spec]

    def describe(self, spec: RuntimeSpec) -> dict[str, Any]:
        """What the driver needs to know of ``spec``'s Runtime here: its identity (animate's work folders),
        a description, the model's config, whether it is the demo model, and its batching."""
        rt = self._runtime(spec)
        return {"identity": rt.identity(), "describe": rt.describe(), "config": rt.config.to_dict(),
                "is_demo": rt.is_demo, "auto_frames_per_batch": rt.auto_frames_per_batch(),
                "frame_limit": getattr(getattr(rt.backend, "manifest", None), "frame_limit", None),
                "pid": os.getpid(), "threads": self.threads}

    def render(self, spec: RuntimeSpec, image: Any, poses: np.ndarray, settings: SamplingSettings,
               batch: list[int]) -> list[tuple[int, np.ndarray]]:
        """One batch: frames ``batch`` of the video (poses (T, 2, H, W), image (3, H, W) in [0, 1]) in one
        UNet batch -> [(frame index, uint8 (H, W, 3))]."""
        rt = self._runtime(spec)
        return list(rt.stream(poses, image, settings=settings, frames=batch, frames_per_batch=len(batch)))

    def pid(self) -> int:
        return os.getpid()


def _unwrap(e: BaseException) -> BaseException:
    """The exception raised inside an actor (Ray wraps it in a RayTaskError)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


class Cluster:
    """Render actors on a Ray cluster: one per GPU; without GPUs, CPU actors of ``threads`` threads each.

    Args:
        address: a Ray cluster's address (``ray start --head`` printed it), or None / "local": a local
            cluster of this machine's GPUs, or its CPUs.
        actors: how many actors (default: one per GPU; on CPUs, the CPUs divided by ``threads``).
        threads: torch threads per actor (default: 1 per CPU actor on machines of up to 4 CPUs, else 4;
            the CPUs Ray gives a GPU actor's on a GPU).
    """

    def __init__(self, address: str | None = None, actors: int | None = None, threads: int | None = None) -> None:
        ray = import_ray()
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
            if address in (None, "local"):
                ray.init(**kwargs)
            else:
                try:
                    ray.init(address=address, **kwargs)
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise DreamPoseError(f"cannot reach the Ray cluster at {address} ({e})") from None
            self._started = True
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        if actors is not None:
            check_int("actors", actors, 1)
        if threads is not None:
            check_int("threads", threads, 1)
        if gpus:
            n = actors or gpus
            threads = threads or max(1, cpus // n)
            options = {"num_gpus": 1, "num_cpus": min(threads, cpus // n or 1)}
            device = "cuda"
        else:
            threads = threads or (1 if cpus <= 4 else 4)
            n = actors or max(1, cpus // threads)
            options = {"num_cpus": threads}
            device = "cpu"
        remote = ray.remote(RenderActor).options(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS, **options)
        self.actors = [remote.remote(device, threads) for _ in range(n)]
        self.device, self.threads = device, threads
        logger.info("ray: %d %s actor(s), %d thread(s) each", n, device, threads)

    def shutdown(self) -> None:
        """Stop the actors (and the local Ray this cluster started)."""
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        if self._started:
            self._ray.shutdown()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def source(self, spec: RuntimeSpec) -> "ClusterSource":
        """The render source (dreampose_rt.animate.RenderSource) of ``spec`` on this cluster."""
        try:
            info = self._ray.get(self.actors[0].describe.remote(spec))
        except Exception as e:  # noqa: BLE001 - Ray wraps what the actor raised
            cause = _unwrap(e)
            if isinstance(cause, DreamPoseError):
                raise DreamPoseError(str(cause)) from None
            raise
        return ClusterSource(self, spec, info)

    def run(self, tasks: Iterable[Task], progress: bool = True) -> Iterator[tuple[Task, list[tuple[int, np.ndarray]] | str]]:
        """Render ``tasks`` (one batch each) on whichever actor is free; yield (task, its frames) as batches
        finish, or (task, the one-line reason) when the actor raised the user's error (a DreamPoseError)
        for it. Keeps every actor's queue IN_FLIGHT batches deep; a batch whose actor is lost for good (after
        Ray's restarts and retries) goes back to the queue, up to MAX_REQUEUES times."""
        from tqdm.auto import tqdm

        ray = self._ray
        queue: collections.deque[tuple[Task, int]] = collections.deque((t, 0) for t in tasks)
        bar = tqdm(total=sum(len(t.batch) for t, _ in queue), unit="frame", disable=not progress, desc="rendering",
                   dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15.0)
        in_flight: dict[Any, tuple[Task, int, Any]] = {}
        load = {id(a): 0 for a in self.actors}
        try:
            while queue or in_flight:
                for actor in self.actors:
                    while queue and load[id(actor)] < IN_FLIGHT:
                        task, tries = queue.popleft()
                        if task.cancelled():
                            continue
                        ref = actor.render.remote(task.spec, task.image_ref, task.poses_ref, task.settings, task.batch)
                        in_flight[ref] = (task, tries, actor)
                        load[id(actor)] += 1
                if not in_flight:
                    break
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    task, tries, actor = in_flight.pop(ref)
                    load[id(actor)] -= 1
                    try:
                        frames = ray.get(ref)
                    except ray.exceptions.RayActorError:  # the actor is gone for good (after Ray's restarts)
                        if tries >= MAX_REQUEUES:
                            raise
                        logger.warning("ray: an actor was lost; frames %s go back to the queue", task.batch)
                        queue.appendleft((task, tries + 1))
                        continue
                    except Exception as e:  # noqa: BLE001 - Ray wraps what the actor raised
                        cause = _unwrap(e)
                        if not isinstance(cause, DreamPoseError):
                            raise
                        yield task, str(cause)
                        continue
                    bar.update(len(task.batch))
                    yield task, frames
        finally:
            bar.close()

    def render(self, jobs: Sequence["ClusterJob"], progress: bool = True) -> None:
        """Render every batch of ``jobs`` (entered RenderJobs), writing frames as they come. A job whose
        batch fails with the user's error stops alone (its ``error`` says why); the others go on."""
        tasks = [Task(job.spec, job.image_ref, job.poses_ref, job.render.settings, batch, job)
                 for job in jobs for batch in job.render.batches]
        for task, result in self.run(tasks, progress):
            job = task.owner
            if isinstance(result, str):
                job.error = result
                continue
            for i, frame in result:
                job.render.write(i, frame)


@dataclass
class Task:
    """One batch to render: the Runtime spec, the video's inputs in the object store, the settings, the
    frame indices, and who asked for it (``owner``: a ClusterJob, whose error cancels its other batches)."""

    spec: RuntimeSpec
    image_ref: Any
    poses_ref: Any
    settings: SamplingSettings
    batch: list[int]
    owner: Any = None

    def cancelled(self) -> bool:
        return getattr(self.owner, "error", None) is not None


class ClusterSource:
    """A Runtime spread over a :class:`Cluster`, as dreampose_rt.animate's RenderSource: the identity,
    description, config and batching of the actors' Runtime, and the frames, batch by batch."""

    def __init__(self, cluster: Cluster, spec: RuntimeSpec, info: dict[str, Any]) -> None:
        from dreampose.model import DreamPoseConfig

        self.cluster, self.spec, self.info = cluster, spec, info
        self.config = DreamPoseConfig.from_dict(info["config"])
        self.is_demo = info["is_demo"]

    def identity(self) -> dict[str, str]:
        return dict(self.info["identity"])

    def describe(self) -> str:
        return (f"ray: {len(self.cluster.actors)} actor(s) x {self.info['describe']}, "
                f"{self.cluster.threads} thread(s) each")

    def subject(self, image: Any) -> Any:
        """The subject (3, H, W) in [0, 1] at its own size, as the actors receive it (the demo's own without
        an image, as a Runtime of the demo model takes it)."""
        from dreampose.images import image_unit

        if image is None:
            if not self.is_demo:
                raise DreamPoseError("image is required (only the demo model has a built-in subject)")
            from .demo import demo_subject

            image = demo_subject(self.config.height, self.config.width)
        return image_unit(image)

    def load_subject(self, image: Any) -> Any:
        from dreampose.images import load_image

        return load_image(self.subject(image), (self.config.height, self.config.width))

    def auto_frames_per_batch(self) -> int:
        return int(self.info["auto_frames_per_batch"])

    def check_frames_per_batch(self, frames_per_batch: int) -> None:
        from dreampose.pipeline import check_frames_per_batch

        check_frames_per_batch(frames_per_batch)
        limit = self.info.get("frame_limit")
        if limit is not None and frames_per_batch > limit:
            raise DreamPoseError(f"frames_per_batch {frames_per_batch} is more than the engines take ({limit})")

    def stream(self, poses: np.ndarray, image: Any, *, settings: SamplingSettings, frames: Sequence[int],
               frames_per_batch: int, progress: bool = False, skip: Sequence[int] = ()) -> Iterator[tuple[int, np.ndarray]]:
        """(frame index, uint8 frame (H, W, 3)) as the cluster finishes them, in the order batches finish:
        the single-process render's batches (``frames_per_batch`` consecutive frames; a batch made only of
        ``skip`` frames is not run, and skipped frames are not yielded)."""
        from dreampose.pipeline import frame_batches

        ray = self.cluster._ray
        image_ref, poses_ref = ray.put(self.subject(image)), ray.put(np.ascontiguousarray(poses))
        skip_set = set(skip)
        tasks = [Task(self.spec, image_ref, poses_ref, settings, batch)
                 for batch in frame_batches(list(frames), frames_per_batch) if not set(batch) <= skip_set]
        for _, result in self.cluster.run(tasks, progress):
            if isinstance(result, str):
                raise DreamPoseError(result)
            for i, frame in result:
                if i not in skip_set:
                    yield i, frame


@dataclass
class ClusterJob:
    """A RenderJob on the cluster: its spec, its inputs in Ray's object store, and why it failed (if it did)."""

    render: RenderJob
    spec: RuntimeSpec
    image_ref: Any
    poses_ref: Any
    error: str | None = None


# --------------------------------------------------------------------------------------------------
# Jobs: one JSON object per video
# --------------------------------------------------------------------------------------------------
#: the keys of a job (one line of a jobs file): the inputs, the output, and any animate setting
JOB_KEYS = ("image", "poses", "out", "model", "backend", "precision", "engines", "quality", "scheduler", "steps",
            "s_image", "s_pose", "seed", "noise", "fps", "frames", "frames_per_batch", "restart")


@dataclass
class JobResult:
    """What became of one job: "done", "skipped" (finished by an earlier run), or "failed" (``error`` says
    why in one line); frames rendered now and taken from an earlier run; seconds."""

    index: int
    out: str
    status: str
    error: str = ""
    frames: int = 0
    rendered: int = 0
    resumed: int = 0
    seconds: float = 0.0
    identity: dict = field(default_factory=dict, repr=False)


def read_jobs(path: PathLike) -> list[dict]:
    """The jobs of a JSON Lines file (one object per line; blank lines and # comments skipped). A line that
    is not a JSON object is a job that fails with the reason (as a dict {"_error": ...})."""
    path = Path(path)
    if not path.is_file():
        raise DreamPoseError(f"{path}: jobs file not found")
    jobs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            job = json.loads(line)
        except json.JSONDecodeError as e:
            job = {"_error": f"{path}:{n}: not JSON ({e.msg})"}
        if not isinstance(job, dict):
            job = {"_error": f"{path}:{n}: a job is a JSON object, got {type(job).__name__}"}
        jobs.append(job)
    if not jobs:
        raise DreamPoseError(f"{path}: no jobs (one JSON object per line)")
    return jobs


def _frames_of(spec: Any, n_poses: int) -> list[int] | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        from .cli import parse_frames

        return parse_frames(spec, n_poses)
    if isinstance(spec, list):
        return spec
    raise DreamPoseError(f"frames must be 'A:B' or a list of indices, got {spec!r}")


def _prepare(cluster: Cluster, index: int, job: dict, sources: dict[RuntimeSpec, ClusterSource]) -> ClusterJob:
    """Check a job and open its RenderJob (its work folder claimed); DreamPoseError says why it cannot run."""
    from dreampose.poses import load_poses

    from .demo import DEMO_MODEL_DIR

    if "_error" in job:
        raise DreamPoseError(job["_error"])
    unknown = sorted(set(job) - set(JOB_KEYS))
    if unknown:
        raise DreamPoseError(f"unknown job key(s) {', '.join(unknown)}; a job takes {', '.join(JOB_KEYS)}")
    if not job.get("out"):
        raise DreamPoseError("a job needs an 'out'")
    if (job.get("image") is None) != (job.get("poses") is None):
        raise DreamPoseError("'image' and 'poses' go together (give both, or neither for the demo)")
    model = job.get("model")
    if model is not None:
        from dreampose.model import CONFIG_NAME

        if not Path(model).is_dir():
            raise DreamPoseError(f"{model}: model folder not found")
        if not (Path(model) / CONFIG_NAME).is_file():
            raise DreamPoseError(f"{model}: not a DreamPose model folder (no {CONFIG_NAME})")
    spec = RuntimeSpec(model=None if model is None else str(Path(model).resolve()), backend=job.get("backend", "auto"),
                       precision=job.get("precision"), engines=job.get("engines"))
    sampling = {k: job.get(k) for k in ("quality", "scheduler", "steps", "s_image", "s_pose", "seed", "noise")}
    SamplingSettings.for_model(None, **sampling)  # the values checked before anything is loaded
    poses = load_poses(job["poses"]) if job.get("poses") is not None else None
    if spec not in sources:
        sources[spec] = cluster.source(spec)
    source = sources[spec]
    if poses is None:
        from .demo import demo_poses

        poses = demo_poses(height=source.config.height, width=source.config.width)
    settings = SamplingSettings.for_model(source.config, **sampling)
    image = source.subject(job.get("image"))
    inputs = [job.get("image"), job.get("poses"), model or DEMO_MODEL_DIR, job.get("engines")]
    render = RenderJob(source, job["out"], poses, image, settings, frames=_frames_of(job.get("frames"), len(poses)),
                       frames_per_batch=job.get("frames_per_batch"), fps=job.get("fps", 8.0),
                       restart=bool(job.get("restart", False)), inputs=inputs)
    ray = cluster._ray
    return ClusterJob(render, spec, ray.put(image), ray.put(poses))


def _state_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def render_jobs(
    jobs: Iterable[dict],
    address: str | None = None,
    *,
    actors: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    state: PathLike | None = None,
    cluster: Cluster | None = None,
) -> list[JobResult]:
    """Render many videos on a Ray cluster: each job a dict with the keys of :data:`JOB_KEYS` (image,
    poses, out, model and any animate setting; no image and poses: the demo). Returns one JobResult per job.

    Jobs are independent: one with bad input fails alone (its ``error`` is the usual one line), the others
    render. A job whose work folder holds frames resumes; with ``state`` (a JSON file this call keeps), a job
    finished by an earlier call with the same identity is skipped. ``address``, ``actors``, ``threads``: as
    :class:`Cluster` (or pass a ``cluster`` to reuse one).
    """
    jobs = list(jobs)
    own = cluster is None
    cluster = cluster or Cluster(address, actors=actors, threads=threads)
    done_before = _read_state(state)
    results: list[JobResult] = []
    opened: list[tuple[int, ClusterJob]] = []
    sources: dict[RuntimeSpec, ClusterSource] = {}
    try:
        for index, job in enumerate(jobs):
            out = str(job.get("out", "")) if isinstance(job, dict) else ""
            try:
                cj = _prepare(cluster, index, job, sources)
            except DreamPoseError as e:
                results.append(JobResult(index, out, "failed", str(e)))
                continue
            identity = _identity_of(cj)
            if state is not None and done_before.get(str(Path(out).resolve())) == _state_key(identity) and \
                    Path(out).exists() and not cj.render.work.exists():
                results.append(JobResult(index, out, "skipped", frames=len(cj.render.frames)))
                continue
            try:
                cj.render.__enter__()
            except DreamPoseError as e:
                results.append(JobResult(index, out, "failed", str(e)))
                continue
            opened.append((index, cj))
        t0 = time.perf_counter()
        try:
            cluster.render([cj for _, cj in opened], progress=progress)
        finally:
            for index, cj in opened:
                out = str(cj.render.out)
                try:
                    if cj.error is not None:
                        results.append(JobResult(index, out, "failed", cj.error, rendered=cj.render.rendered))
                        continue
                    report = cj.render.finish()
                    results.append(JobResult(index, out, "done", frames=report.frames, rendered=report.rendered,
                                             resumed=report.resumed, seconds=time.perf_counter() - t0,
                                             identity=_identity_of(cj)))
                except (DreamPoseError, RuntimeError) as e:
                    results.append(JobResult(index, out, "failed", str(e), rendered=cj.render.rendered))
                finally:
                    cj.render.__exit__(None, None, None)
    finally:
        if own:
            cluster.shutdown()
    results.sort(key=lambda r: r.index)
    if state is not None:
        _write_state(state, done_before, results)
    return results


def _identity_of(cj: ClusterJob) -> dict:
    r = cj.render
    return {"out": str(r.out.resolve()), "identity": cj.spec.__dict__, "settings": r.settings.to_dict(),
            "frames": r.frames, "poses": hashlib.sha256(np.ascontiguousarray(r.poses).tobytes()).hexdigest()[:16],
            "image": hashlib.sha256(r.pixels.numpy().tobytes()).hexdigest()[:16], "fps": r.fps}


def _read_state(state: PathLike | None) -> dict[str, str]:
    if state is None or not Path(state).is_file():
        return {}
    try:
        data = json.loads(Path(state).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(state: PathLike, before: dict[str, str], results: list[JobResult]) -> None:
    data = dict(before)
    for r in results:
        if r.status == "done":
            data[str(Path(r.out).resolve())] = _state_key(r.identity)
    with atomic_file(state) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def render_video(job: dict, address: str | None = None, **kwargs: Any) -> JobResult:
    """One video on the cluster (the same machinery as :func:`render_jobs`); a failure raises the
    DreamPoseError that says why."""
    result = render_jobs([job], address, **kwargs)[0]
    if result.status == "failed":
        raise DreamPoseError(result.error)
    return result


def summary_table(results: Sequence[JobResult]) -> str:
    """The closing table of ``render-jobs``: one row per job."""
    lines = ["| job | out | status | frames (rendered / resumed) | note |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.index} | {r.out} | {r.status} | {r.frames} ({r.rendered} / {r.resumed}) | {r.error} |")
    return "\n".join(lines)


__all__ = ["Cluster", "ClusterSource", "JOB_KEYS", "JobResult", "RenderActor", "RuntimeSpec", "read_jobs",
           "render_jobs", "render_video", "summary_table"]
