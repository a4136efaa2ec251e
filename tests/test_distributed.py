"""Rendering on Ray (dreampose_rt.distributed): a local cluster of 2 CPU actors (one Ray start for the module),
the demo model, 2 steps. The frames equal a single-process render's; faults and reruns lose nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'dreampose-rt[ray]'; make test installs it)")

from dreampose.video import frame_name, read_png  # noqa: E402
from dreampose_rt.cli import main  # noqa: E402
from dreampose_rt.distributed import Cluster, render_jobs, render_video  # noqa: E402

DEMO = {"frames": "0:4", "steps": 2, "noise": "per-frame"}


@pytest.fixture(scope="module")
def cluster():
    # 4 logical CPUs: the 2 actors here, and those of a command run beside them (render-jobs, a driver)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    c = Cluster(actors=2, threads=1)
    yield c
    c.shutdown()
    ray.shutdown()


def _frames(folder: Path, n: int) -> np.ndarray:
    return np.stack([read_png(folder / frame_name(i)) for i in range(n)])


def _single_process(tmp_path: Path, out: str, threads: int | None) -> np.ndarray:
    """The same render by `dreampose-rt animate` in its own process (torch threads as given)."""
    cmd = [sys.executable, "-m", "dreampose_rt.cli", "animate", "--frames", "0:4", "--steps", "2", "--noise",
           "per-frame", "--quiet", "--out", str(tmp_path / out)] + (["--threads", str(threads)] if threads else [])
    subprocess.run(cmd, check=True, timeout=300)
    return _frames(tmp_path / out, 4)


def test_ray_render_equals_a_single_process_render(cluster, tmp_path):
    r = render_video({**DEMO, "out": str(tmp_path / "ray")}, cluster=cluster, progress=False)
    assert r.status == "done" and r.rendered == 4 and r.resumed == 0
    on_ray = _frames(tmp_path / "ray", 4)
    same_threads = _single_process(tmp_path, "one", threads=1)  # the actors' batches (1 frame) and threads (1)
    assert np.array_equal(on_ray, same_threads)
    default = _single_process(tmp_path, "default", threads=None)  # every core: other reduction orders
    assert np.abs(on_ray.astype(int) - default.astype(int)).max() <= 1


def test_a_killed_actor_loses_no_frame(cluster, tmp_path):
    reference = tmp_path / "reference"
    render_video({**DEMO, "frames": "0:6", "out": str(reference)}, cluster=cluster, progress=False)
    out = tmp_path / "faulty"
    work = Path(f"{out}.work")
    killed = []
    pid = ray.get(cluster.actors[0].pid.remote())  # now: once the render runs, the call would queue behind it

    def kill_one_actor_midway() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(work.glob("frame_*.png"))) < 1:
            time.sleep(0.01)
        ray.kill(cluster.actors[0], no_restart=False)  # Ray restarts it and retries its in-flight batch
        killed.append((pid, len(list(work.glob("frame_*.png")))))

    killer = threading.Thread(target=kill_one_actor_midway)
    killer.start()
    r = render_video({**DEMO, "frames": "0:6", "out": str(out)}, cluster=cluster, progress=False)
    killer.join()
    assert killed and killed[0][1] < 6, "the actor must be killed midway for this test to mean anything"
    assert r.status == "done" and r.rendered == 6
    assert np.array_equal(_frames(out, 6), _frames(reference, 6))
    assert ray.get(cluster.actors[0].pid.remote()) not in (0, killed[0][0])  # restarted, serving again


def test_an_actor_lost_for_good_leaves_the_pool_and_its_batches_are_requeued(cluster, tmp_path):
    reference = tmp_path / "reference"
    render_video({**DEMO, "frames": "0:6", "out": str(reference)}, cluster=cluster, progress=False)
    out = tmp_path / "lost"
    work = Path(f"{out}.work")
    with Cluster(actors=2, threads=1) as two:  # the module's Ray: its other 2 CPUs
        doomed = two.actors[0]
        killed = []

        def kill_for_good() -> None:
            deadline = time.time() + 120
            while time.time() < deadline and len(list(work.glob("frame_*.png"))) < 1:
                time.sleep(0.01)
            ray.kill(doomed, no_restart=True)
            killed.append(len(list(work.glob("frame_*.png"))))

        killer = threading.Thread(target=kill_for_good)
        killer.start()
        r = render_video({**DEMO, "frames": "0:6", "out": str(out)}, cluster=two, progress=False)
        killer.join()
        assert killed and killed[0] < 6, "the actor must be killed midway for this test to mean anything"
        assert r.status == "done" and r.rendered == 6 and two.actors == [a for a in two.actors if a is not doomed]
        assert len(two.actors) == 1
    assert np.array_equal(_frames(out, 6), _frames(reference, 6))


def test_a_cluster_checks_its_size_before_starting_actors():
    from dreampose.utils import DreamPoseError

    with pytest.raises(DreamPoseError, match="actors must be"):
        Cluster(actors=0)
    with pytest.raises(DreamPoseError, match=r"actors 5 x threads 1: the cluster has 4 CPU\(s\)"):
        Cluster(actors=5, threads=1)


def test_a_broken_job_fails_alone(cluster, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = tmp_path / "jobs.jsonl"
    lines = [{**DEMO, "out": "a.gif"}, {**DEMO, "out": "b", "model": "no/such/model"}, {**DEMO, "out": "c.gif", "seed": 3},
             {**DEMO, "out": "d.gif", "steps": 0}]
    jobs.write_text("\n".join(json.dumps(j) for j in lines) + "\nnot json\n")
    assert main(["render-jobs", str(jobs), "--actors", "2", "--threads", "1", "--quiet"]) == 2
    out = capsys.readouterr().out
    assert (tmp_path / "a.gif").is_file() and (tmp_path / "c.gif").is_file()
    assert not (tmp_path / "b").exists() and not (tmp_path / "d.gif").exists()
    assert "| 1 | b | failed | 0 (0 / 0) | no/such/model: model folder not found |" in out
    assert "| 3 | d.gif | failed" in out and "steps must be between 1 and 1000" in out
    assert "| 4 |  | failed" in out and "not JSON" in out
    # a rerun skips the finished jobs (the same identity), and still reports the broken ones
    assert main(["render-jobs", str(jobs), "--quiet"]) == 2
    again = capsys.readouterr().out
    assert "| 0 | a.gif | skipped |" in again and "| 2 | c.gif | skipped |" in again
    # an output rewritten since is rendered again, not skipped
    (tmp_path / "c.gif").write_bytes((tmp_path / "a.gif").read_bytes())
    assert main(["render-jobs", str(jobs), "--quiet"]) == 2
    third = capsys.readouterr().out
    assert "| 0 | a.gif | skipped |" in third and "| 2 | c.gif | done | 4 (4 / 0) |" in third
    state = json.loads((tmp_path / "jobs.jsonl.done.json").read_text())
    assert state["command"] == "render-jobs" and len(state["jobs"]) == 2


def test_a_killed_driver_resumes_with_only_the_missing_frames(cluster, tmp_path):
    address = ray.get_runtime_context().gcs_address
    out = tmp_path / "resumed"
    work = Path(f"{out}.work")
    cmd = [sys.executable, "-m", "dreampose_rt.cli", "animate", "--ray", address, "--actors", "1", "--threads", "1",
           "--frames", "0:12", "--steps", "4", "--noise", "per-frame", "--quiet", "--out", str(out)]
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(work.glob("frame_*.png"))) < 2 and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(list(work.glob("frame_*.png")))
    assert 2 <= before < 12, "the driver must be killed midway for this test to mean anything"
    job = {"frames": "0:12", "steps": 4, "noise": "per-frame", "out": str(out)}
    r = render_video(job, cluster=cluster, progress=False)
    assert r.resumed == before and r.rendered == 12 - before
    fresh = render_video({**job, "out": str(tmp_path / "fresh")}, cluster=cluster, progress=False)
    assert fresh.rendered == 12
    assert np.array_equal(_frames(out, 12), _frames(tmp_path / "fresh", 12))


def test_jobs_need_their_inputs_named(cluster, tmp_path):
    results = render_jobs([{"out": str(tmp_path / "x"), "colour": "red"}, {"image": "a.png", "out": "y"}],
                          cluster=cluster, progress=False)
    assert [r.status for r in results] == ["failed", "failed"]
    assert "unknown job key(s) colour" in results[0].error
    assert "'image' and 'poses' go together" in results[1].error


def test_jobs_are_checked_one_by_one(cluster, tmp_path):
    jobs = [{**DEMO, "out": str(tmp_path / "a.gif"), "restart": "false"},
            {**DEMO, "out": str(tmp_path / "b.gif")}, {**DEMO, "out": str(tmp_path / "b.gif"), "seed": 1},
            {**DEMO, "out": str(tmp_path / "x.gif"), "image": str(tmp_path / "s.gif"), "poses": str(tmp_path / "p")},
            {**DEMO, "out": str(tmp_path / "s.gif")},
            {**DEMO, "out": str(tmp_path / "c.gif"), "subject": False},
            {**DEMO, "out": str(tmp_path / "d.gif"), "subject": str(tmp_path)}]
    results = render_jobs(jobs, cluster=cluster, progress=False)
    assert [r.status for r in results] == ["failed", "done", "failed", "failed", "failed", "failed", "failed"]
    assert "subject must be a subject folder's path, got False" in results[5].error
    assert "not a subject folder (no subject.json)" in results[6].error
    assert "restart must be true or false, got 'false'" in results[0].error
    assert "job 1 writes this output too" in results[2].error
    assert "s.gif" in results[4].error and "input" in results[4].error


def test_a_state_file_the_project_did_not_write_is_refused(cluster, tmp_path):
    from dreampose.utils import DreamPoseError

    state = tmp_path / "notes.json"
    state.write_text('{"mine": 1}')
    with pytest.raises(DreamPoseError, match="notes.json exists and is not a render-jobs state file"):
        render_jobs([{**DEMO, "out": str(tmp_path / "a.gif")}], cluster=cluster, progress=False, state=state)
    assert state.read_text() == '{"mine": 1}' and not (tmp_path / "a.gif").exists()
