"""Measure the quality presets (and candidates for them) against the exact preset, in one run.

    python scripts/quality_presets.py [--videos 8] [--candidates all|presets] [--out benchmarks/results/...json]

For each candidate sampler (a scheduler, a step count, guidance caching and deep-feature caching):

- UNet work per frame on the SD 1.5-size model at 640 x 512 (random weights: the same FLOPs as the real
  model), counted with torch's flop counter on a meta copy (dreampose.flops.unet_work): sample-evaluations
  and FLOPs, as a fraction of the exact run (PNDM 100 steps, 101 calls x 3 branches);
- quality on the demo model over the evaluation protocol's held-out videos (dreampose.evaluation): PSNR and
  SSIM to the exact preset's frames, SSIM and foreground IoU to the ground truth (and their change against
  the exact render), and the mean frame-to-frame change of the targets against the exact render's (flicker);
- CPU time per frame of the runtime (torch backend, the C++ scheduler) rendering the demo's 16 frames,
  every candidate interleaved round by round, the median of the rounds.

Writes one JSON record (with the machine) and prints the markdown table that docs/quality.md shows. The
presets in dreampose.settings.QUALITY_PRESETS were chosen from this table by :func:`choose` (written into the
record as ``chosen``): ``balanced`` the candidate that keeps the paper's sampler (PNDM, 100 steps) with the
least work at PSNR >= 35 dB to the exact frames and SSIM / IoU within 1%; ``fast`` the least work of any
sampler within 2% (both also within the work targets: 0.45 and 0.08 of the exact run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import device_info, versions  # noqa: E402
from dreampose.evaluation import compare_reports, evaluate  # noqa: E402
from dreampose.flops import unet_flops_per_sample, unet_work  # noqa: E402
from dreampose.model import DreamPoseModel  # noqa: E402
from dreampose.settings import (  # noqa: E402
    QUALITY_PRESETS,
    EvalProtocol,
    FeatureCache,
    GuidanceCache,
    SamplingSettings,
)
from dreampose.utils import atomic_file  # noqa: E402
from dreampose_rt.demo import demo_model, demo_poses, demo_subject  # noqa: E402

logger = logging.getLogger("quality_presets")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def candidates(which: str) -> dict[str, dict]:
    """name -> the sampling values of a candidate (the exact preset first: everything is measured against it)."""
    g, f = GuidanceCache, FeatureCache
    out = {name: dict(preset) for name, preset in QUALITY_PRESETS.items()}
    out["exact"]["steps"] = 100
    if which == "presets":
        return out
    for every in (3, 4, 6):
        out[f"pndm100 g{every}"] = dict(scheduler="pndm", steps=100, guidance_cache=g(every=every, first=3))
    out["pndm100 g-until50"] = dict(scheduler="pndm", steps=100, guidance_cache=g(every=1, until=0.5))
    for every in (2, 3):
        out[f"pndm100 f{every}"] = dict(scheduler="pndm", steps=100, feature_cache=f(every=every))
    for ge, fe in ((2, 2), (3, 2), (4, 2), (4, 3), (6, 2)):
        out[f"pndm100 g{ge} f{fe}"] = dict(scheduler="pndm", steps=100, guidance_cache=g(every=ge, first=3),
                                           feature_cache=f(every=fe))
    out["dpmpp15"] = dict(scheduler="dpmpp", steps=15)
    for steps, every in ((15, 3), (12, 2), (12, 3), (10, 2), (10, 3), (8, 2)):
        out[f"dpmpp{steps} g{every}"] = dict(scheduler="dpmpp", steps=steps, guidance_cache=g(every=every, first=2))
    out["dpmpp12 g3 f2"] = dict(scheduler="dpmpp", steps=12, guidance_cache=g(every=3, first=2), feature_cache=f(every=2))
    return out


def time_runtime(model_dir: Path | None, settings: dict[str, SamplingSettings], rounds: int) -> dict[str, float]:
    """Seconds per frame of the runtime (torch backend on the CPU) rendering the demo's 16 frames with each
    settings, interleaved round by round (one warm-up round), the median over the rounds."""
    from dreampose_rt.runtime import Runtime

    rt = Runtime.from_pretrained(model_dir, backend="torch", device="cpu")
    c = rt.config
    poses, image = demo_poses(height=c.height, width=c.width), demo_subject(c.height, c.width)
    times: dict[str, list[float]] = {name: [] for name in settings}
    for r in range(rounds + 1):
        for name, s in settings.items():
            t0 = time.perf_counter()
            rt.render(poses, image, settings=s)
            if r:
                times[name].append((time.perf_counter() - t0) / len(poses))
        logger.info("timing round %d/%d done", r, rounds)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=EvalProtocol().videos, help="held-out test videos (default: 8)")
    parser.add_argument("--candidates", choices=("all", "presets"), default="all")
    parser.add_argument("--timing-rounds", type=int, default=3, help="interleaved timing rounds (default: 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON record (default: benchmarks/results/quality_presets_cpu_<date>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)

    model = demo_model()
    sd15 = DreamPoseModel.sd15_random()  # the FLOPs of the real model (weights do not matter)
    per_sample = {"sd15": unet_flops_per_sample(sd15), "demo": unet_flops_per_sample(model)}
    protocol = EvalProtocol(videos=args.videos)
    settings = {name: SamplingSettings.for_model(model.config, **values) for name, values in candidates(args.candidates).items()}
    reports = {}
    for name, s in settings.items():
        t0 = time.perf_counter()
        reports[name] = evaluate(model, protocol, sampling=s, model_name="demo", keep_outputs=True)
        logger.info("%s: evaluated in %.0f s", name, time.perf_counter() - t0)
    seconds = time_runtime(None, settings, args.timing_rounds)
    rows = {}
    for name, s in settings.items():
        cmp = compare_reports(reports[name], reports["exact"])
        work = unet_work(sd15, s, per_sample["sd15"])
        rows[name] = {
            "settings": s.to_dict(),
            "work_sd15": {k: work[k] for k in ("calls", "samples", "full_samples", "shallow_samples", "flops",
                                               "fraction_of_exact")},
            "work_demo": unet_work(model, s, per_sample["demo"])["fraction_of_exact"],
            "psnr_to_exact": cmp["psnr_to_reference"], "ssim_to_exact": cmp["ssim_to_reference"],
            "ssim_gt": cmp["ssim_gt"], "iou_gt": cmp["iou_gt"], "temporal_change": cmp["temporal_change"],
            "cpu_seconds_per_frame": seconds[name], "speedup_vs_exact": seconds["exact"] / seconds[name],
        }
    record = {
        "benchmark": "scripts/quality_presets.py", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_info(torch.device("cpu")), "versions": versions(), "threads": args.threads,
        "protocol": protocol.to_dict(), "flops_per_sample": per_sample, "candidates": rows,
        "chosen": choose(rows),
    }
    for preset, name in record["chosen"].items():
        if rows[name]["settings"] != rows[preset]["settings"]:
            logger.warning("the rule chooses %r for %s, which QUALITY_PRESETS does not hold yet", name, preset)
    out = Path(args.out) if args.out else RESULTS / f"quality_presets_cpu_{record['date'][:10]}.json"
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    sys.stdout.write(table(rows) + "\n")
    logger.info("wrote %s", out)
    return 0


def choose(rows: dict[str, dict]) -> dict[str, str]:
    """The candidates the rule picks: {"balanced": name, "fast": name} (see the module's docstring)."""
    def within(r: dict, limit: float) -> bool:
        return abs(r["ssim_gt"]["relative"]) <= limit and abs(r["iou_gt"]["relative"]) <= limit

    def least(names: list[str]) -> str:
        return min(names, key=lambda n: rows[n]["work_sd15"]["flops"])

    work = {n: r["work_sd15"]["fraction_of_exact"]["flops"] for n, r in rows.items()}
    balanced = [n for n, r in rows.items() if r["settings"]["scheduler"] == "pndm" and r["settings"]["steps"] == 100
                and work[n] <= 0.45 and r["psnr_to_exact"] >= 35 and within(r, 0.01)]
    fast = [n for n, r in rows.items() if work[n] <= 0.08 and within(r, 0.02)]
    return {"balanced": least(balanced), "fast": least(fast)}


def table(rows: dict[str, dict]) -> str:
    """The markdown table of docs/quality.md."""
    lines = [
        "| candidate | sampler | UNet calls / samples per frame | FLOPs per frame (SD 1.5) | of exact | PSNR to exact | "
        "SSIM to exact | SSIM gt (vs exact) | IoU gt (vs exact) | frame change (vs exact) | CPU s/frame (speed-up) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        s, w = r["settings"], r["work_sd15"]
        caching = " + ".join(x for x in (
            f"guidance every {s['guidance_cache']['every']}" if s["guidance_cache"]["every"] > 1 else "",
            f"guidance until {s['guidance_cache']['until']:.0%}" if s["guidance_cache"]["until"] < 1 else "",
            f"deep every {s['feature_cache']['every']}" if s["feature_cache"]["every"] > 1 else "") if x)
        sampler = f"{s['scheduler']} {s['steps']}" + (f", {caching}" if caching else "")
        lines.append(
            f"| {name} | {sampler} | {w['calls']} / {w['samples']} | {w['flops'] / 1e12:.0f} TFLOP | "
            f"{w['fraction_of_exact']['flops']:.3f} | {r['psnr_to_exact']:.1f} dB | {r['ssim_to_exact']:.4f} | "
            f"{r['ssim_gt']['candidate']:.4f} ({r['ssim_gt']['relative']:+.2%}) | "
            f"{r['iou_gt']['candidate']:.4f} ({r['iou_gt']['relative']:+.2%}) | "
            f"{r['temporal_change']['candidate']:.4f} (x{r['temporal_change']['ratio']:.3f}) | "
            f"{r['cpu_seconds_per_frame']:.3f} ({r['speedup_vs_exact']:.1f}x) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
