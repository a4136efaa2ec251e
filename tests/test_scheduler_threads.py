"""The C++ data plane on several threads: the thread pool's hand-over, and steps split across threads.

A step is element-wise, so any split of the elements over threads must give the same bits as one
thread; these tests compare whole runs bit for bit, with sizes whose frames, blocks and chunks do not
line up.

The pool's own tests go through the test hooks of ``dreampose_rt._C_testing`` (``_parallel_selftest``,
``_pool_workers``), which is built from the same csrc/parallel.cpp but holds its own instance of the
pool: they test the pool's code (hand-over, stealing, back-off, concurrent callers), not the instance
the scheduler's steps use, which the step tests below exercise.
"""

from __future__ import annotations

import collections
import importlib
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from dreampose_rt.scheduler import create_scheduler, native_core
from dreampose_rt.scheduler import schedulers as sched_mod

C = native_core()
pytestmark = pytest.mark.skipif(
    C is None, reason=f"the C++ extension did not load: {sched_mod.native_core_availability().reason}"
)


@pytest.fixture(scope="module")
def pool():
    """The test hooks into the thread pool (dreampose_rt._C_testing, built beside _C by setup.py)."""
    try:
        return importlib.import_module("dreampose_rt._C_testing")
    except ImportError as exc:
        pytest.fail(f"dreampose_rt._C_testing did not load ({exc}): `pip install --no-build-isolation -e .`")

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD_PNDM = dict(SD, steps_offset=1, set_alpha_to_one=False)
CASES = {
    "plms": ("pndm", dict(SD_PNDM, skip_prk_steps=True), 12),
    "pndm_prk": ("pndm", dict(SD_PNDM, skip_prk_steps=False), 8),  # saved sample and accumulator rows
    "ddim": ("ddim", dict(SD, set_alpha_to_one=False), 10),
    "dpmpp": ("dpmpp", SD, 9),
}
# 3 frames of 4 x 41 x 67 = 10988 elements: frames end inside 512-element blocks and inside chunks.
SHAPE = (3, 4, 41, 67)


def _inputs(n: int, dtype: torch.dtype, guided: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g).to(dtype)
    rows = 3 * SHAPE[0] if guided else SHAPE[0]
    outs = [torch.randn((rows,) + SHAPE[1:], generator=g).to(dtype) for _ in range(n)]
    return x, outs


def _run(name, opts, n, threads, dtype, guided, in_place, implementation="cpp"):
    s = create_scheduler(name, opts, implementation=implementation, num_threads=threads)
    s.set_timesteps(n)
    x, outs = _inputs(len(s.timesteps), dtype, guided)  # PNDM evaluates the model more than n times
    s_i = torch.tensor([7.5, 3.0, 1.25])  # per frame: a wrong frame for an element shows
    s_p = torch.tensor([2.0, 0.5, 4.0])
    y = x.clone()
    for k, t in enumerate(s.timesteps.tolist()):
        out = y if in_place else None
        if guided:
            y = s.step_guided(outs[k], t, y, s_i, s_p, out=out).prev_sample
        else:
            y = s.step(outs[k], t, y, out=out).prev_sample
    return y


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("guided", [False, True])
def test_any_thread_count_gives_the_same_bits(case, dtype, guided):
    name, opts, n = CASES[case]
    want = _run(name, opts, n, 1, dtype, guided, in_place=False)
    for threads, in_place in ((2, False), (2, True), (5, True), (0, False)):
        got = _run(name, opts, n, threads, dtype, guided, in_place)
        assert torch.equal(got, want), f"num_threads={threads} in_place={in_place}"
    # ... and the one-thread run is the Python implementation's (which is what the rest of the suite checks)
    ref = _run(name, opts, n, 0, dtype, guided, in_place=False, implementation="python")
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    err = ((want.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= tol


def test_every_chunk_runs_exactly_once_and_the_workers_take_part(pool):
    workers = pool._pool_workers()
    assert workers == min(64, os.cpu_count() or 1) - 1  # one per core besides the caller's
    # back-to-back jobs of every size: a stale claim on a later job would run a chunk twice or never
    for num_chunks in list(range(1, 40)) * 20:
        runs, _, _ = pool._parallel_selftest(num_chunks, 0, 0.0, num_chunks % 2 == 0)
        assert runs == [1] * num_chunks
    if workers == 0:
        pytest.skip("one CPU: the pool has no worker threads")
    # a long job wakes the workers; with chunks of 200 us they take some of them
    for _ in range(5):
        runs, threads, _ = pool._parallel_selftest(64, 0, 200.0, True)
        assert runs == [1] * 64
        if len(set(threads)) > 1:
            break
    else:
        pytest.fail(f"no worker thread took part in 5 jobs of 64 x 200 us: {collections.Counter(threads)}")


def test_after_waiting_for_a_slow_worker_small_jobs_run_on_the_caller(pool):
    """A worker that holds a chunk for long (as a preempted one does) makes the caller back off: the small
    jobs right after run on the caller's thread alone; large jobs still use the workers."""
    if pool._pool_workers() == 0:
        pytest.skip("one CPU: the pool has no worker threads")
    for _ in range(5):
        pool._parallel_selftest(64, 0, 50.0, True)  # a large job: wakes the workers, which then spin a while
        # a small job whose chunks take 5 us on the caller and 3 ms on a worker: the caller waits for it
        runs, threads, caller = pool._parallel_selftest(64, 0, 5.0, False, 3000.0)
        assert runs == [1] * 64
        if set(threads) != {caller}:
            break  # a worker took a chunk, so the caller waited for it
    else:
        pytest.skip("no worker took part in 5 small jobs right after large ones (a very busy machine)")
    runs, threads, caller = pool._parallel_selftest(32, 0, 5.0, False)
    assert runs == [1] * 32 and set(threads) == {caller}
    runs, threads, caller = pool._parallel_selftest(64, 0, 50.0, True)  # large: shared again
    assert runs == [1] * 64


def test_concurrent_callers_each_get_every_chunk_once(pool):
    """Two threads use the pool at once (the GIL is released): one of them runs its job alone."""
    errors: list[str] = []

    def caller(seed: int) -> None:
        for i in range(200):
            n = 1 + (seed * 7 + i) % 33
            runs, _, _ = pool._parallel_selftest(n, 0, 2.0 if i % 10 == 0 else 0.0, True)
            if runs != [1] * n:
                errors.append(f"caller {seed}, job {i}: {runs}")

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not errors, errors[:3]


def test_concurrent_schedulers_match_their_serial_runs():
    """Steps of two schedulers in two threads at once (large enough to release the GIL and use the pool)."""
    name, opts, n = CASES["plms"]
    shape = (4, 4, 80, 64)  # 81920 elements
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(shape, generator=g) for _ in range(2)]
    outs = [[torch.randn(shape, generator=g) for _ in range(n + 1)] for _ in range(2)]  # PLMS: n + 1 steps

    def run(j: int, threads: int) -> torch.Tensor:
        s = create_scheduler(name, opts, num_threads=threads)
        s.set_timesteps(n)
        y = xs[j].clone()
        for k, t in enumerate(s.timesteps.tolist()):
            s.step(outs[j][k], t, y, out=y)
        return y

    want = [run(j, 1) for j in range(2)]
    got: dict[int, torch.Tensor] = {}
    ts = [threading.Thread(target=lambda j=j: got.__setitem__(j, run(j, 0))) for j in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_pool_of_its_own():
    """After fork the parent's workers do not exist in the child: its steps must still finish, right."""
    script = textwrap.dedent(
        """
        import os, sys, torch
        from dreampose_rt.scheduler import create_scheduler
        opts = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True)
        def run():
            s = create_scheduler("pndm", opts, num_threads=2)
            s.set_timesteps(10)
            g = torch.Generator().manual_seed(0)
            y = torch.randn(2, 4, 80, 64, generator=g)
            for t in s.timesteps.tolist():
                s.step(torch.randn(2, 4, 80, 64, generator=g), t, y, out=y)
            return y
        want = run()  # the parent's pool exists now
        pid = os.fork()
        if pid == 0:
            ok = torch.equal(run(), want)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_num_threads_is_checked():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_threads"):
            create_scheduler("pndm", num_threads=bad)


def test_the_core_is_plain_cxx17_without_python_or_torch():
    """csrc/scheduler/ and csrc/parallel.* compile as C++17 with no include path but csrc/ (the bindings
    are the only files that see pybind11 and torch)."""
    import shutil

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    csrc = os.path.join(root, "csrc")
    sources = [os.path.join(csrc, "scheduler", f) for f in ("schedule.cpp", "step_kernel.cpp")]
    sources.append(os.path.join(csrc, "parallel.cpp"))
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-psabi", "-Wno-unknown-warning-option"]
    cmd += ["-I" + csrc, *sources]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
