"""How long each step of a 100-step PLMS run takes, by its index, after a pause of each kind.

    python -m benchmarks.scheduler_warmup [--runs 40] [--frames 1]

bench_scheduler times whole runs; this one times every call (perf_counter around each ``step``) and
gives, per step index, the median over ``--runs`` runs, each run after one of: nothing (``none``), 2 ms
asleep (``sleep``), 8 ms of busy Python (``busy``), or a whole diffusers PNDM run (``diffusers``). It
shows where a run's first steps spend their time (docs/scheduler.md). Results:
benchmarks/results/scheduler_warmup_cpu_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from dreampose.utils import atomic_file

from .bench_scheduler import RESULTS, SD_PNDM
from .measure import device_info, today, versions

PAUSES = ("none", "sleep", "busy", "diffusers")


def per_step(pause: str, runs: int, frames: int, steps: int = 100) -> list[float]:
    """Median microseconds of each step index over ``runs`` runs, each after ``pause``."""
    import diffusers

    from dreampose_rt.scheduler import create_scheduler

    g = torch.Generator().manual_seed(0)
    x = torch.randn(frames, 4, 80, 64, generator=g)
    eps = torch.randn(frames, 4, 80, 64, generator=g)
    ref = diffusers.PNDMScheduler(**SD_PNDM)
    ours = create_scheduler("pndm", SD_PNDM)
    samples: list[list[float]] = []
    for r in range(runs + 1):  # run 0 warms up
        if pause == "diffusers":
            ref.set_timesteps(steps)
            for t in ref.timesteps:
                ref.step(eps, t, x)
        elif pause == "sleep":
            time.sleep(0.002)
        elif pause == "busy":
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.008:
                pass
        ours.set_timesteps(steps)
        times = []
        for t in ours.timesteps.tolist():
            t0 = time.perf_counter()
            ours.step(eps, t, x)
            times.append((time.perf_counter() - t0) * 1e6)
        if r:
            samples.append(times)
    return [statistics.median(col) for col in zip(*samples)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--frames", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/scheduler_warmup_cpu_<date>.json)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.frames < 1:
        print("scheduler_warmup: --runs and --frames must be >= 1", file=sys.stderr)
        return 2
    result = {}
    for pause in PAUSES:
        med = per_step(pause, args.runs, args.frames)
        result[pause] = {"median_us_by_step": [round(v, 2) for v in med],
                         "mean_us_steps_0_9": statistics.fmean(med[:10]), "mean_us_steps_10_99": statistics.fmean(med[10:])}
        print(f"{pause:>9}: " + " ".join(f"{v:.1f}" for v in med[:10]) + f" | steps 10-99 {statistics.fmean(med[10:]):.2f} us")
    record = {"benchmark": "scheduler_warmup", "shape": [args.frames, 4, 80, 64], "runs": args.runs,
              "device": device_info(torch.device("cpu")), "versions": versions(), "pauses": result}
    path = args.out or os.path.join(RESULTS, f"scheduler_warmup_cpu_{today()}.json")
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
