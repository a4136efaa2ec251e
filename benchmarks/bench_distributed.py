"""The Ray path's overhead per frame against a single-process render, on the demo model (CPU).

    python -m benchmarks.bench_distributed [--frames 16] [--steps 25] [--actors 2] [--rounds 3]

Renders the demo's frames (one frame per UNet call, as on the CPU by default) three ways, interleaved
round by round after a warm-up round (Ray started, actors loaded, before anything is timed):

- ``single_1``: one process, 1 torch thread (what each actor does);
- ``single_all``: one process, every core (the default of ``dreampose-rt animate``);
- ``ray``: the frames across ``--actors`` CPU actors of 1 thread each, through dreampose_rt.distributed
  (the driver writes every frame into the work folder and assembles the output, as ``animate`` does).

Reports seconds per frame (median over the rounds) and the overhead per frame of the Ray path:
``ray wall time x actors / frames - single_1`` (the actor-seconds a frame costs beyond rendering it).
Writes benchmarks/results/bench_distributed_<device>_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dreampose.settings import SamplingSettings
from dreampose.utils import atomic_file

from .measure import device_info, slug, today, versions

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args(argv)

    import ray

    from dreampose_rt.animate import render_to_file
    from dreampose_rt.demo import demo_poses
    from dreampose_rt.distributed import Cluster, render_video
    from dreampose_rt.runtime import Runtime

    cores = os.cpu_count() or 1
    rt = Runtime.from_pretrained(None, backend="torch", device="cpu")
    c = rt.config
    poses = demo_poses(height=c.height, width=c.width)  # the demo's 16 frames, as `animate` renders them
    if not 1 <= args.frames <= len(poses):
        p.error(f"--frames must be in 1..{len(poses)}")
    frames = list(range(args.frames))
    settings = SamplingSettings.for_model(c, steps=args.steps, noise="per-frame")
    ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    cluster = Cluster(actors=args.actors, threads=1)
    times: dict[str, list[float]] = {"single_1": [], "single_all": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:

        def single(threads: int, out: Path) -> None:
            torch.set_num_threads(threads)
            render_to_file(rt, out, poses, None, settings, frames=frames, frames_per_batch=1, progress=False)

        def on_ray(out: Path) -> None:
            render_video({"out": str(out), "frames": frames, "steps": args.steps, "noise": "per-frame",
                          "frames_per_batch": 1}, cluster=cluster, progress=False)

        for r in range(args.rounds + 1):
            for name, fn in (("single_1", lambda o: single(1, o)), ("single_all", lambda o: single(cores, o)),
                             ("ray", on_ray)):
                out = Path(tmp) / f"{name}_{r}"
                t0 = time.perf_counter()
                fn(out)
                if r:
                    times[name].append((time.perf_counter() - t0) / args.frames)
            print(f"round {r}/{args.rounds}", file=sys.stderr)
    cluster.shutdown()
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = med["ray"] * args.actors - med["single_1"]
    record = {
        "benchmark": "benchmarks.bench_distributed", "date": today(), "device": device_info(torch.device("cpu")),
        "versions": {**versions(), "ray": ray.__version__}, "frames": args.frames, "steps": args.steps,
        "actors": args.actors, "rounds": args.rounds, "cores": cores, "seconds_per_frame": med, "samples": times,
        "ray_overhead_per_frame_s": overhead, "ray_overhead_fraction": overhead / med["single_1"],
        "ray_speedup_vs_single_1": med["single_1"] / med["ray"], "ray_speedup_vs_single_all": med["single_all"] / med["ray"],
    }
    out = Path(args.results) / f"bench_distributed_{slug(record['device']['name'])}_{record['date']}.json"
    with atomic_file(out) as tmp_file:
        tmp_file.write_text(json.dumps(record, indent=2) + "\n")
    print(f"seconds per frame: single process 1 thread {med['single_1']:.3f}, all {cores} cores "
          f"{med['single_all']:.3f}; Ray {args.actors} actors x 1 thread {med['ray']:.3f} (x{record['ray_speedup_vs_single_1']:.2f} "
          f"vs 1 thread); overhead {overhead * 1e3:.0f} ms per frame ({record['ray_overhead_fraction']:.1%}); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
