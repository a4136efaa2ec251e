"""Scheduler step timing: diffusers' PNDMScheduler.step vs ours vs ours fused with guidance.

    python -m benchmarks.bench_scheduler [--frames 1 16] [--rounds 30] [--implementation cpp]

Interleaved (every round runs each variant once, in a new seeded random order): each round runs one
whole 100-step PNDM (SD 1.x config) loop per variant on the same inputs and records the mean time per
step; the table gives medians over rounds and the ratio to diffusers. Results go to benchmarks/results/bench_scheduler_<device>_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import random
import statistics
import time

import torch

SD_PNDM = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
    set_alpha_to_one=False, skip_prk_steps=True,
)  # fmt: skip
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _loop_time(step, timesteps) -> float:
    t0 = time.perf_counter()
    for t in timesteps:
        step(t)
    return (time.perf_counter() - t0) / len(timesteps)


def bench(frames: int, rounds: int, steps: int, implementation: str, guidance=(7.5, 2.0)) -> dict:
    """One shape (frames x 4 x 80 x 64): the variants' medians over ``rounds`` interleaved rounds.
    implementation: the scheduler's ("auto", "cpp" or "python")."""
    import diffusers

    from dreampose_rt.scheduler import create_scheduler, guidance_combine_ref

    g = torch.Generator().manual_seed(0)
    shape = (frames, 4, 80, 64)
    x = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g)
    eps3 = torch.randn((3 * frames,) + shape[1:], generator=g)
    ref = diffusers.PNDMScheduler(**SD_PNDM)
    ours = create_scheduler("pndm", SD_PNDM, implementation=implementation)
    fused = create_scheduler("pndm", SD_PNDM, implementation=implementation)
    s_i, s_p = guidance

    variants = {
        "diffusers_step": (ref, lambda t: ref.step(eps, t, x)),
        "diffusers_combine_then_step": (ref, lambda t: ref.step(guidance_combine_ref(eps3, s_i, s_p), t, x)),
        "ours_step": (ours, lambda t: ours.step(eps, t, x)),
        "ours_fused_combine_step": (fused, lambda t: fused.step_guided(eps3, t, x, s_i, s_p)),
    }
    if "out" in inspect.signature(ours.step).parameters:  # the same step writing into a reused buffer
        ours_out = create_scheduler("pndm", SD_PNDM, implementation=implementation)
        buf = torch.empty_like(x)
        variants["ours_step_out"] = (ours_out, lambda t: ours_out.step(eps, t, x, out=buf))
    samples: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants.items())
    shuffle = random.Random(0).shuffle
    for r in range(rounds + 1):  # round 0 warms up
        # A new order each round (seeded): what runs just before a variant matters (torch's OpenMP
        # threads keep spinning for milliseconds after diffusers' parallel ops and take a core from our
        # pool's worker; the previous variant's buffers fill the caches), so no variant may always follow
        # the same one (a rotation would keep the same neighbours).
        shuffle(order)
        for name, (sched, fn) in order:
            sched.set_timesteps(steps)
            ts = sched.timesteps.tolist()
            dt = _loop_time(fn, ts)
            if r:
                samples[name].append(dt)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "shape": list(shape),
        "elements": x.numel(),
        "median_us_per_step": {k: v * 1e6 for k, v in med.items()},
        # the spread over rounds (this machine is shared: the slow rounds are other load, not the code)
        "min_us_per_step": {k: min(v) * 1e6 for k, v in samples.items()},
        "max_us_per_step": {k: max(v) * 1e6 for k, v in samples.items()},
        "speedup_vs_diffusers_step": {
            "ours_step": med["diffusers_step"] / med["ours_step"],
            "ours_fused_combine_step": med["diffusers_step"] / med["ours_fused_combine_step"],
            "ours_fused_vs_diffusers_combine_then_step": med["diffusers_combine_then_step"]
            / med["ours_fused_combine_step"],
            **({"ours_step_out": med["diffusers_step"] / med["ours_step_out"]} if "ours_step_out" in med else {}),
        },
        "notes": "ours_step_out: step(..., out=buf) into a buffer reused across steps (no new output tensor); "
        "the order of the variants is shuffled (seeded) each round",
        "rounds": rounds,
        "steps_per_round": len(ts),
    }


def fix_glibc_malloc(mmap_threshold: int = 1 << 26, trim_threshold: int = 1 << 28) -> dict | None:
    """Fix glibc's malloc thresholds for this process (no-op elsewhere); returns what was set.

    By default glibc moves its mmap threshold as blocks are freed and returns freed memory at the top of
    the heap to the system, so whether a step's 1.3 MB temporaries come back as fresh pages (a page fault
    per 4 KB) depends on what ran before: diffusers' step at 16 frames measured 330 us in one run and 2.8 ms
    in the next. Fixed thresholds (64 MB, 256 MB) make every variant reuse freed memory, run after run.
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    return {"mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold} if ok else None


def main(argv: list[str] | None = None) -> int:
    from dreampose_rt.scheduler import IMPLEMENTATIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument(
        "--implementation", default="auto", choices=list(IMPLEMENTATIONS),
        help="the scheduler's implementation: the C++ core, the pure-Python one, or auto (C++ if it loads)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    p.add_argument(
        "--glibc-default-malloc", action="store_true",
        help="keep glibc's adaptive malloc thresholds (by default they are fixed for stable numbers)",
    )  # fmt: skip
    args = p.parse_args(argv)
    malloc = None if args.glibc_default_malloc else fix_glibc_malloc()

    import diffusers

    from dreampose_rt import _ext
    from dreampose_rt.scheduler import create_scheduler

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    implementation = create_scheduler("pndm", implementation=args.implementation).implementation
    ext = _ext.load_extension()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = [bench(f, args.rounds, args.steps, args.implementation) for f in args.frames]
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    record = {
        "benchmark": "scheduler_step",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "implementation": implementation,
        # 1/5/15-minute load averages around the run: the ratios move with the machine's load
        "load_average": {"before": load_before, "after": load_after},
        "glibc_malloc_fixed": malloc,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "extension_build_flags": getattr(ext, "build_flags", None),
            "extension_compiler": getattr(ext, "compiler", None),
            "pybind11": getattr(ext, "pybind11_version", None),
            "extension_torch": getattr(ext, "torch_version", None),
        },
        "results": results,
    }
    print(f"PNDM {args.steps} steps, SD 1.x config, implementation={implementation}, "
          f"medians of {args.rounds} interleaved rounds")
    print(f"{'shape':>18} {'variant':>30} {'us/step':>10} {'vs diffusers step':>18}")
    for r in results:
        med = r["median_us_per_step"]
        base = med["diffusers_step"]
        for name, us in med.items():
            print(f"{str(tuple(r['shape'])):>18} {name:>30} {us:10.1f} {base / us:17.1f}x")
    path = args.out or os.path.join(
        RESULTS, f"bench_scheduler_cpu_{datetime.date.today().isoformat()}.json"
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
