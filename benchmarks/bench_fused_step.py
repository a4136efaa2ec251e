"""Fused guidance + scheduler step (Triton) vs the eager combine + diffusers step, on CUDA.

    python -m benchmarks.bench_fused_step [--frames 1 4 16] [--scheduler dpmpp] [--dtype fp16]

At 80 x 64 latents (4 channels) for each F:

- ``kernel_us``: one fused step (a steady-state row of the table) with L2 cold and no launch cost: a CUDA
  graph of N launches, each on its own copy of every buffer (together >= 4 x L2), replayed; per launch,
  median. ``achieved_GBps`` = the bytes that row moves (:func:`bytes_moved`) /
  ``kernel_us``, compared with the nominal 3.0 TB/s of an H100 and with this device's measured copy
  bandwidth (a 512 MiB device-to-device copy). At one frame (0.37 MB) a kernel's start and drain, not
  bandwidth, set the time (1.6 us with inputs in L2 on an H100: 0.37 MB at 3 TB/s would be 0.12 us).
- ``kernel_us_graph_l2_warm``: the same call replayed alone from a graph (inputs stay in L2);
  ``kernel_us_do_bench``: ``triton.testing.do_bench`` (L2 flushed before each call), whose event pair
  includes the Python launch when that outlasts the flush (it did on the H100 machine: 137 us at one
  frame, with ~1.6 us of kernel).
- ``graph_loop_us_per_step``: the whole run (counter reset + every step) captured in one CUDA graph and
  replayed; per step, L2 warm (what the runtime's captured loop costs).
- ``eager_launch_us_per_step``: the same loop launched from Python (launcher checks included).
- ``eager_diffusers_us_per_step``: ``combine_guidance`` + diffusers' scheduler ``step`` per step, as the
  reference pipeline does it.

Loops are interleaved (eager, graph, launch, eager, ...) and medians taken over rounds. Results go to
benchmarks/results/bench_fused_step_<gpu>_<date>.json. Without CUDA it says so and exits 0 without
writing anything (the CPU data plane has its own benchmark: bench_scheduler).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
from typing import Callable, Sequence

import torch

from dreampose.settings import PRECISIONS, torch_dtype
from dreampose.utils import atomic_file
from dreampose_rt.graphs import capture as capture_graph
from dreampose_rt.scheduler.table import AKEEP, AM, MAX_HISTORY, OA, OH0, OS, SAVE_SAMPLE, WRITE_SLOT

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
CONFIGS = {
    "dpmpp": dict(SD, solver_order=2),
    "pndm": dict(SD, steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True),
    "ddim": dict(SD, steps_offset=1, set_alpha_to_one=False),
}
DIFFUSERS_CLASS = {"dpmpp": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler", "ddim": "DDIMScheduler"}
NOMINAL_COPY_GBPS = 3000.0  # H100 SXM device copy, as measured on the lent machine (~3.0 TB/s)


def bytes_moved(row: Sequence[float], frames: int, frame_numel: int, dtype: torch.dtype, num_slots: int) -> int:
    """Bytes the kernel reads and writes for one step with table row ``row`` (the bandwidth model).

    Reads: 3 branches + x (dtype), and each fp32 state term with a non-zero coefficient; writes: out
    (dtype) and each state buffer updated. ``num_slots``: history slots of the run.
    """
    n = frames * frame_numel
    e = torch.empty((), dtype=dtype).element_size()
    total = 4 * n * e + n * e  # e00, eIP, eI0, x in; out
    reads = [row[OS] != 0] + [row[OH0 + j] != 0 and j < num_slots for j in range(MAX_HISTORY)]
    reads += [row[OA] != 0 or row[AKEEP] != 0]
    writes = [row[WRITE_SLOT] >= 0, row[SAVE_SAMPLE] != 0, row[AKEEP] != 0 or row[AM] != 0 or row[OA] != 0]
    return total + 4 * n * (sum(map(bool, reads)) + sum(map(bool, writes)))

def _events_ms(fn: Callable[[], None]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 512 MiB (read + write counted), median of do_bench."""
    import triton.testing

    src = torch.empty(128 * 1024 * 1024, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _cold_graph_us(e: torch.Tensor, lat: torch.Tensor, out: torch.Tensor, sampler, k: int, s_i: float, s_p: float,
                   moved: int, reps: int = 20) -> tuple[float, int]:
    """One fused step with nothing in L2 and no launch cost: a CUDA graph of N launches, each on its own copy
    of every buffer the step touches (N x bytes moved >= 4 x L2), replayed; microseconds per launch (median of
    ``reps`` replays) and N."""
    from dreampose_rt.kernels import guided_step
    from dreampose_rt.scheduler import StepState

    l2 = getattr(torch.cuda.get_device_properties(lat.device), "L2_cache_size", 0) or 64 << 20
    n = max(8, min(2048, -(-4 * l2 // moved)))
    copy = lambda t: None if t is None else t.clone()  # noqa: E731
    sets = [(e.clone(), lat.clone(), out.clone(),
             StepState(copy(sampler.state.history), copy(sampler.state.saved_sample), copy(sampler.state.accumulator)))
            for _ in range(n)]  # fmt: skip

    def launches() -> None:
        for e_j, lat_j, out_j, st_j in sets:
            guided_step(e_j, lat_j, sampler.table, k, s_i, s_p, st_j, out=out_j)

    graph, _ = capture_graph(launches)
    graph.replay()
    times = [_events_ms(graph.replay) * 1e3 / n for _ in range(reps)]
    return statistics.median(times), n


def bench(frames: int, scheduler: str, steps: int, dtype: torch.dtype, rounds: int, copy_gbps: float) -> dict:
    import diffusers
    import triton.testing

    from dreampose.guidance import combine_guidance
    from dreampose_rt.kernels import guided_step
    from dreampose_rt.fused_sampler import FusedSampler
    from dreampose_rt.scheduler import create_scheduler

    device = torch.device("cuda")
    shape = (frames, 4, 80, 64)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(shape, generator=g, device=device).to(dtype)
    e = torch.randn((3 * frames,) + shape[1:], generator=g, device=device).to(dtype)
    s_i, s_p = 7.5, 2.0

    sched = create_scheduler(scheduler, CONFIGS[scheduler])
    sched.set_timesteps(steps)
    sampler = FusedSampler.from_scheduler(sched, x0, s_i, s_p)
    n = sampler.num_steps

    # -- one step, L2 flushed: the bandwidth number --------------------------------------------
    k = n // 2  # a steady-state row (highest order)
    row = sampler.table[k].tolist()
    out = torch.empty_like(x0)
    lat = x0.clone()
    for j in range(k + 1):  # the state as the run has it at step k (every slot written)
        guided_step(e, lat, sampler.table, j, s_i, s_p, sampler.state, out=out)
    do_bench_ms = triton.testing.do_bench(
        lambda: guided_step(e, lat, sampler.table, k, s_i, s_p, sampler.state, out=out),
        warmup=25, rep=200, return_mode="median",
    )  # fmt: skip
    # the same call replayed from a CUDA graph: no launch overhead in the number (but L2 stays warm)
    kernel_graph_ms = triton.testing.do_bench_cudagraph(
        lambda: guided_step(e, lat, sampler.table, k, s_i, s_p, sampler.state, out=out), rep=100, return_mode="median"
    )
    moved = bytes_moved(row, frames, 4 * 80 * 64, dtype, sampler.info.num_history_slots)
    cold_us, n_sets = _cold_graph_us(e, lat, out, sampler, k, s_i, s_p, moved)

    # -- whole loops: graph replay, Python launches, eager diffusers ----------------------------
    def launch_loop() -> None:
        sampler.reset()
        for _ in range(n):
            sampler.step(e, lat, out=lat)

    graph, _ = capture_graph(launch_loop)

    ref = getattr(diffusers, DIFFUSERS_CLASS[scheduler])(**CONFIGS[scheduler])

    def eager_loop() -> None:
        y = x0
        for t in ref.timesteps:
            eps = combine_guidance(e, frames, s_i, s_p)
            y = ref.step(eps, t, y, return_dict=False)[0]

    samples: dict[str, list[float]] = {"graph": [], "launch": [], "eager": []}
    for r in range(rounds + 2):  # two warm-up rounds
        ref.set_timesteps(steps, device=device)
        lat.copy_(x0)
        t_eager = _events_ms(eager_loop) / len(ref.timesteps)
        lat.copy_(x0)
        t_graph = _events_ms(graph.replay) / n
        lat.copy_(x0)
        t_launch = _events_ms(launch_loop) / n
        if r >= 2:
            samples["eager"].append(t_eager)
            samples["graph"].append(t_graph)
            samples["launch"].append(t_launch)
    med = {k_: statistics.median(v) * 1e3 for k_, v in samples.items()}  # us
    kernel_us = cold_us
    achieved = moved / (kernel_us * 1e-6) / 1e9
    return {
        "frames": frames,
        "shape": list(shape),
        "row": k,
        "bytes_moved": moved,
        "kernel_us": kernel_us,
        "kernel_us_graph_l2_warm": kernel_graph_ms * 1e3,
        "kernel_us_do_bench": do_bench_ms * 1e3,
        "cold_buffer_sets": n_sets,
        "achieved_GBps": achieved,
        "fraction_of_nominal_3TBps": achieved / NOMINAL_COPY_GBPS,
        "fraction_of_measured_copy": achieved / copy_gbps,
        "bandwidth_bound_us": moved / (copy_gbps * 1e9) * 1e6,
        "graph_loop_us_per_step": med["graph"],
        "eager_launch_us_per_step": med["launch"],
        "eager_diffusers_us_per_step": med["eager"],
        "speedup_eager_over_kernel": med["eager"] / kernel_us,
        "speedup_eager_over_graph_loop": med["eager"] / med["graph"],
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--scheduler", default="dpmpp", choices=sorted(CONFIGS))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--dtype", default="fp16", choices=PRECISIONS)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--results", default=RESULTS, help="folder for the JSON record")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "bench_fused_step needs a CUDA GPU (torch.cuda.is_available() is False here): nothing measured, "
            "nothing written. The CPU data plane is timed by benchmarks.bench_scheduler."
        )
        return 0
    from dreampose_rt.kernels import kernel_availability

    kernel = kernel_availability()
    if not kernel:
        print(f"bench_fused_step: the Triton kernel cannot run here: {kernel.reason}")
        return 1

    import triton

    name = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth_gbps()
    dtype = torch_dtype(args.dtype)
    results = [bench(f, args.scheduler, args.steps, dtype, args.rounds, copy_gbps) for f in args.frames]
    props = torch.cuda.get_device_properties(0)
    record = {
        "benchmark": "fused_guided_step",
        "device": name,
        "sm_count": props.multi_processor_count,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "scheduler": args.scheduler,
        "steps": args.steps,
        "dtype": args.dtype,
        "measured_copy_GBps": copy_gbps,
        "nominal_copy_GBps": NOMINAL_COPY_GBPS,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton.__version__,
            "diffusers": __import__("diffusers").__version__,
        },
        "results": results,
    }
    print(f"{name}: {args.scheduler} {args.steps} steps, {args.dtype}, 4x80x64 latents; copy {copy_gbps:.0f} GB/s")
    print(f"{'F':>3} {'kernel us':>10} {'GB/s':>8} {'of copy':>8} {'graph/step':>11} {'launch/step':>12} "
          f"{'eager/step':>11} {'eager/kernel':>13}")  # fmt: skip
    for r in results:
        print(f"{r['frames']:>3} {r['kernel_us']:10.2f} {r['achieved_GBps']:8.0f} {r['fraction_of_measured_copy']:8.2f} "
              f"{r['graph_loop_us_per_step']:11.2f} {r['eager_launch_us_per_step']:12.2f} "
              f"{r['eager_diffusers_us_per_step']:11.2f} {r['speedup_eager_over_kernel']:12.1f}x")  # fmt: skip
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = os.path.join(args.results, f"bench_fused_step_{slug}_{datetime.date.today().isoformat()}.json")
    with atomic_file(path) as tmp:  # a killed run leaves no half-written record
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
