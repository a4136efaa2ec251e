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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from dreampose.settings import SamplingSettings, check_int
from dreampose.utils import DreamPoseError, PathLike, atomic_file, first_line

from .animate import RenderJob

logger = logging.getLogger(__name__)

#: actor restarts and task retries Ray makes after a worker dies; then the driver requeues the batch
MAX_RESTARTS = 3
MAX_REQUEUES = 3
#: seconds the actors have to start (be placed on the cluster and import torch); those that have not are dropped
ACTOR_START_S = 120.0
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
    """Which Runtime an actor renders with: a model folder (None: the embedded demo model), a LoRA subject
    folder merged into it, a backend, a precision (None: the device's default), an engine folder. The device
    is the actor's (its GPU, or CPU)."""

    model: str | None = None
    subject: str | bool | None = None  # as Runtime.from_pretrained's (False: the demo model without its subject)
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
                                                           precision=spec.precision, engines=spec.engines,
                                                           subject=spec.subject)
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

    def check_settings(self, spec: RuntimeSpec, settings: SamplingSettings) -> None:
        """Raise DreamPoseError if ``spec``'s Runtime cannot sample with ``settings``."""
        self._runtime(spec).check_settings(settings)

    def pid(self) -> int:
        return os.getpid()


def _unwrap(e: BaseException) -> BaseException:
    """The exception raised inside an actor (Ray wraps it in a RayTaskError)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _get(ray: Any, ref: Any) -> Any:
    """``ray.get(ref)``; the user's error an actor raised (a DreamPoseError) raised here as itself."""
    try:
        return ray.get(ref)
    except Exception as e:  # noqa: BLE001 - Ray wraps what the actor raised
        cause = _unwrap(e)
        if isinstance(cause, DreamPoseError):
            raise DreamPoseError(str(cause)) from None
        raise


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
        if actors is not None:
            check_int("actors", actors, 1)
        if threads is not None:
            check_int("threads", threads, 1)
        ray = import_ray()
        self._ray = ray
        self._started = False
        self.actors: list[Any] = []
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
        try:
            self._start_actors(actors, threads)
        except BaseException:
            self.shutdown()
            raise

    def _start_actors(self, actors: int | None, threads: int | None) -> None:
        """Start the actors: as many as asked (checked against the cluster's GPUs or CPUs), by default as many
        as the resources free now hold; keep those that start within ACTOR_START_S."""
        ray = self._ray
        total, free = ray.cluster_resources(), ray.available_resources()
        gpus, cpus = int(total.get("GPU", 0)), max(1, int(total.get("CPU", 1)))
        if gpus:
            if actors is not None and actors > gpus:
                raise DreamPoseError(f"actors {actors}: the cluster has {gpus} GPU(s), one per actor")
            n = actors or max(1, int(free.get("GPU", 0)))
            threads = threads or max(1, cpus // n)
            options = {"num_gpus": 1, "num_cpus": min(threads, cpus // n or 1)}
            device = "cuda"
        else:
            threads = threads or (1 if cpus <= 4 else 4)
            if threads > cpus:
                raise DreamPoseError(f"threads {threads}: the cluster has {cpus} CPU(s)")
            if actors is not None and actors * threads > cpus:
                raise DreamPoseError(f"actors {actors} x threads {threads}: the cluster has {cpus} CPU(s)")
            n = actors or max(1, int(free.get("CPU", cpus)) // threads)
            options = {"num_cpus": threads}
            device = "cpu"
        remote = ray.remote(RenderActor).options(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS, **options)
        started = [remote.remote(device, threads) for _ in range(n)]
        pids = {a.pid.remote(): a for a in started}
        ready, waiting = ray.wait(list(pids), num_returns=n, timeout=ACTOR_START_S)
        for ref in waiting:  # not placed (the cluster's resources are taken) or still starting
            ray.kill(pids[ref])
        self.actors = []
        for ref in ready:
            try:
                ray.get(ref)
                self.actors.append(pids[ref])
            except ray.exceptions.RayError as e:  # the actor failed to start
                logger.warning("ray: an actor failed to start (%s)", first_line(str(e)))
                ray.kill(pids[ref])
        if not self.actors:
            raise DreamPoseError(f"no render actor started on the Ray cluster within {ACTOR_START_S:.0f} s "
                                 f"(each needs {options}; free now: {free})")
        if waiting:
            logger.warning("ray: %d of %d actor(s) did not start within %.0f s; rendering on %d",
                           len(waiting), n, ACTOR_START_S, len(self.actors))
        self.device, self.threads = device, threads
        logger.info("ray: %d %s actor(s), %d thread(s) each", len(self.actors), device, threads)

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
        return ClusterSource(self, spec, _get(self._ray, self.actors[0].describe.remote(spec)))

    def run(self, tasks: Iterable[Task], progress: bool = True,
            total: int | None = None) -> Iterator[tuple[Task, list[tuple[int, np.ndarray]] | str | None]]:
        """Render ``tasks`` (one batch each; an iterable read as actors need work, so a long queue of jobs is
        prepared as it goes) on whichever actor is free. Yields (task, its frames) as batches finish; (task,
        the one-line reason) when the actor raised the user's error (a DreamPoseError) for it; (task, None)
        for a task cancelled (its owner failed) before it ran. Keeps every actor IN_FLIGHT batches deep.

        Faults: Ray restarts an actor that dies and retries its batches (MAX_RESTARTS); an actor lost for good
        leaves the pool and its batches go back to the queue, each up to MAX_REQUEUES times; the run fails
        only when no actor is left. ``total``: frames, for the progress bar (None: counted as tasks come).
        """
        from tqdm.auto import tqdm

        ray = self._ray
        source = iter(tasks)
        queue: collections.deque[tuple[Task, int]] = collections.deque()
        bar = tqdm(total=total, unit="frame", disable=not progress, desc="rendering", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 15.0)
        in_flight: dict[Any, tuple[Task, int, Any]] = {}
        load = {id(a): 0 for a in self.actors}
        exhausted = False

        def drop(task: Task) -> None:
            """Take a batch that will not render (cancelled, or failed with the user's error) off the bar."""
            bar.total -= len(task.batch)
            bar.refresh()

        def refill() -> None:
            nonlocal exhausted
            while not exhausted and len(queue) < IN_FLIGHT * max(1, len(self.actors)):
                task = next(source, None)
                if task is None:
                    exhausted = True
                else:
                    queue.append((task, 0))
                    if total is None:
                        bar.total = (bar.total or 0) + len(task.batch)

        try:
            while True:
                refill()
                for actor in self.actors:
                    while queue and load[id(actor)] < IN_FLIGHT:
                        task, tries = queue.popleft()
                        if task.cancelled():
                            drop(task)
                            yield task, None
                            refill()
                            continue
                        ref = actor.render.remote(task.spec, task.image_ref, task.poses_ref, task.settings, task.batch)
                        in_flight[ref] = (task, tries, actor)
                        load[id(actor)] += 1
                    refill()
                if not in_flight:
                    if queue or not exhausted:
                        continue  # only cancelled tasks came: take the next
                    break
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    task, tries, actor = in_flight.pop(ref)
                    load[id(actor)] -= 1
                    try:
                        frames = ray.get(ref)
                    except ray.exceptions.RayActorError as e:
                        if not isinstance(e, ray.exceptions.ActorUnavailableError) and actor in self.actors:
                            self.actors.remove(actor)  # dead for good, after Ray's restarts
                            logger.warning("ray: an actor was lost (%d left)", len(self.actors))
                        if not self.actors:
                            raise DreamPoseError(f"every render actor was lost ({first_line(str(e))})") from None
                        if tries >= MAX_REQUEUES:
                            raise
                        logger.warning("ray: frames %s go back to the queue", task.batch)
                        queue.appendleft((task, tries + 1))
                        continue
                    except Exception as e:  # noqa: BLE001 - Ray wraps what the actor raised
                        cause = _unwrap(e)
                        if not isinstance(cause, DreamPoseError):
                            raise
                        drop(task)
                        yield task, str(cause)
                        continue
                    bar.update(len(task.batch))
                    yield task, frames
        finally:
            bar.close()

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

    def check_settings(self, settings: SamplingSettings) -> None:
        _get(self.cluster._ray, self.cluster.actors[0].check_settings.remote(self.spec, settings))

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
        for _, result in self.cluster.run(tasks, progress, total=sum(len(t.batch) for t in tasks)):
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
JOB_KEYS = ("image", "poses", "out", "model", "subject", "backend", "precision", "engines", "quality", "scheduler",
            "steps", "s_image", "s_pose", "seed", "noise", "fps", "frames", "frames_per_batch", "restart")


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


def _prepare(cluster: Cluster, index: int, job: dict, sources: dict[RuntimeSpec, ClusterSource],
             other_inputs: Sequence[str] = ()) -> ClusterJob:
    """Check a job and make its RenderJob (nothing written yet); DreamPoseError says why it cannot run.
    ``other_inputs``: the other jobs' inputs, which this job's output may not be either."""
    from dreampose.poses import load_poses

    from .demo import DEMO_MODEL_DIR, runtime_subject

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
    subject = job.get("subject")
    if subject is not None:
        from dreampose.lora import SubjectInfo

        if not isinstance(subject, str) or not subject:
            raise DreamPoseError(f"subject must be a subject folder's path, got {subject!r}")
        SubjectInfo.load(subject)
    restart = job.get("restart", False)
    if not isinstance(restart, bool):
        raise DreamPoseError(f"restart must be true or false, got {restart!r}")
    engines = job.get("engines")
    spec = RuntimeSpec(model=None if model is None else str(Path(model).resolve()),
                       subject=runtime_subject(model, job.get("image"), None if subject is None
                                               else str(Path(subject).resolve())), backend=job.get("backend", "auto"),
                       precision=job.get("precision"), engines=None if engines is None else str(Path(engines).resolve()))
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
    inputs = [job.get("image"), job.get("poses"), model or DEMO_MODEL_DIR, job.get("engines"), subject,
              *other_inputs]
    render = RenderJob(source, job["out"], poses, image, settings, frames=_frames_of(job.get("frames"), len(poses)),
                       frames_per_batch=job.get("frames_per_batch"), fps=job.get("fps", 8.0),
                       restart=restart, inputs=inputs)
    ray = cluster._ray
    return ClusterJob(render, spec, ray.put(image), ray.put(poses))


def _state_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _output_stat(out: Path) -> list[int] | None:
    """(size, mtime in ns) of an output file, or None (a PNG folder, or nothing there): what tells a finished
    job's output from one rewritten since."""
    try:
        st = out.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if out.is_file() else None


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

    Jobs are independent: one with bad input (or an output that cannot be written) fails alone, its
    ``error`` the usual one line; the others render. Jobs are prepared as the actors need work (a long queue
    does not sit in memory) and each finishes (its video written, its work folder removed) as soon as its
    last batch comes back. A job whose work folder holds frames resumes. With ``state`` (a JSON file this
    call keeps, rewritten after every finished job), a job finished by an earlier call is skipped when its
    identity (model weights, inputs, settings) is the same and its output is the file that call wrote.
    ``address``, ``actors``, ``threads``: as :class:`Cluster` (or pass a ``cluster`` to reuse one).
    """
    jobs = list(jobs)
    done = _read_state(state)  # checked before the cluster starts
    own = cluster is None
    cluster = cluster or Cluster(address, actors=actors, threads=threads)
    results: dict[int, JobResult] = {}
    opened: dict[int, ClusterJob] = {}
    remaining: dict[int, int] = {}
    sources: dict[RuntimeSpec, ClusterSource] = {}
    t0: dict[int, float] = {}

    def close(index: int) -> None:
        """Finish job ``index`` (or record its failure) and release it."""
        cj = opened.pop(index)
        out = str(cj.render.out)
        try:
            if cj.error is not None:
                results[index] = JobResult(index, out, "failed", cj.error, rendered=cj.render.rendered)
                return
            report = cj.render.finish()
            results[index] = JobResult(index, out, "done", frames=report.frames, rendered=report.rendered,
                                       resumed=report.resumed, seconds=time.perf_counter() - t0[index])
            if state is not None:
                done[str(Path(out).resolve())] = {"key": _state_key(_identity_of(cj)),
                                                  "output": _output_stat(Path(out))}
                _write_state(state, done)
        except (DreamPoseError, RuntimeError, OSError) as e:
            results[index] = JobResult(index, out, "failed", first_line(str(e)), rendered=cj.render.rendered)
        finally:
            cj.render.__exit__(None, None, None)

    inputs = [str(job[k]) for job in jobs if isinstance(job, dict) for k in ("image", "poses") if job.get(k)]
    outs: dict[str, int] = {}

    def open_job(index: int, job: Any) -> ClusterJob | None:
        """Prepare and enter job ``index``; None (its result recorded) when it fails or was done before."""
        out = str(job.get("out", "")) if isinstance(job, dict) else ""
        where = str(Path(out).resolve())
        try:
            if out and outs.setdefault(where, index) != index:
                raise DreamPoseError(f"{out}: job {outs[where]} writes this output too")
            cj = _prepare(cluster, index, job, sources, inputs)
            before = done.get(where)
            if state is not None and isinstance(before, dict) and before.get("key") == _state_key(_identity_of(cj)) \
                    and before.get("output") == _output_stat(Path(out)) and not cj.render.work.exists():
                results[index] = JobResult(index, out, "skipped", frames=len(cj.render.frames))
                return None
            cj.render.__enter__()
        except (DreamPoseError, OSError) as e:
            results[index] = JobResult(index, out, "failed", first_line(str(e)))
            return None
        opened[index], t0[index] = cj, time.perf_counter()
        return cj

    def tasks() -> Iterator[Task]:
        for index, job in enumerate(jobs):
            cj = open_job(index, job)
            if cj is None:
                continue
            batches = cj.render.batches
            remaining[index] = len(batches)
            if not batches:  # every frame was rendered by an interrupted earlier run
                close(index)
            for batch in batches:
                yield Task(cj.spec, cj.image_ref, cj.poses_ref, cj.render.settings, batch, (index, cj))

    try:
        for task, result in cluster.run(tasks(), progress=progress):
            index, cj = task.owner
            if isinstance(result, str):
                cj.error = result
            elif result is not None:
                for i, frame in result:
                    cj.render.write(i, frame)
            remaining[index] -= 1
            if remaining[index] == 0:
                close(index)
    finally:
        for cj in opened.values():  # interrupted: the jobs' frames stay in their work folders, to resume
            cj.render.__exit__(None, None, None)
        if own:
            cluster.shutdown()
    return [results[i] for i in sorted(results)]


def _identity_of(cj: ClusterJob) -> dict:
    """What decides a job's output: the Runtime's identity (model weights, backend, device, dtype), the
    spec, the settings, the frames, the inputs' digests, the output and its fps."""
    r = cj.render
    return {"out": str(r.out.resolve()), "spec": cj.spec.__dict__, "runtime": r.source.identity(),
            "settings": r.settings.to_dict(), "frames": r.frames,
            "poses": hashlib.sha256(np.ascontiguousarray(r.poses).tobytes()).hexdigest()[:16],
            "image": hashlib.sha256(r.pixels.numpy().tobytes()).hexdigest()[:16], "fps": r.fps}


#: the command a state file of render_jobs names (how one is told from a file the project did not write)
STATE_COMMAND = "render-jobs"


def _read_state(state: PathLike | None) -> dict[str, Any]:
    """The finished jobs a state file records (out -> {"key", "output"}); {} when there is none yet. A file
    there that this project did not write is refused (it is never overwritten)."""
    if state is None or not Path(state).exists():
        return {}
    try:
        data = json.loads(Path(state).read_text())
    except (OSError, ValueError):
        data = None
    if not (isinstance(data, dict) and data.get("command") == STATE_COMMAND and isinstance(data.get("jobs"), dict)):
        raise DreamPoseError(f"{state} exists and is not a render-jobs state file; move it away or pass another")
    return data["jobs"]


def _write_state(state: PathLike, done: dict[str, Any]) -> None:
    with atomic_file(state) as tmp:
        tmp.write_text(json.dumps({"command": STATE_COMMAND, "jobs": done}, indent=1, sort_keys=True) + "\n")


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
