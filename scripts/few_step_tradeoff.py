#!/usr/bin/env python
"""The few-step trade-off on the demo model: PNDM 100 (the reference) vs DDIM 50, DPM-Solver++ 25 and 15.

    python scripts/few_step_tradeoff.py [--model DIR] [--out runs/tradeoff]

Runs the evaluation protocol (dreampose.evaluation, held-out SynthFashion, 8 videos x 7 targets) once per
sampler and reports, per sampler: the metrics against the ground truth and their relative change from
the reference, the distance of its frames to the reference's frames (L1, PSNR, IoU of the two
segmentations) and the time per frame (all targets of a video in one batch, this machine). The fast
mode is the smallest step count whose SSIM and IoU stay within 2 % of the reference. Writes
``tradeoff.json`` and ``tradeoff.md`` to --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreampose.metrics import foreground_mask, iou, l1, psnr  # noqa: E402
from dreampose.model import DreamPoseModel  # noqa: E402
from dreampose_rt.demo import demo_model  # noqa: E402
from dreampose.evaluation import evaluate, test_videos  # noqa: E402
from dreampose.settings import EvalProtocol, SamplingSettings  # noqa: E402

SAMPLERS = (("pndm", 100), ("ddim", 50), ("dpmpp", 25), ("dpmpp", 15))
TOLERANCE = 0.02


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--out", default="runs/tradeoff")
    parser.add_argument("--videos", type=int, default=EvalProtocol().videos)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    model = demo_model() if args.model is None else DreamPoseModel.from_pretrained(args.model)
    base = EvalProtocol(videos=args.videos)
    c = model.config
    videos = test_videos(base, c.height, c.width)

    reports = {}
    for name, steps in SAMPLERS:
        sampling = SamplingSettings.for_model(model.config, scheduler=name, steps=steps)
        reports[(name, steps)] = evaluate(model, base, sampling=sampling, model_name="demo", keep_outputs=True)
    ref = reports[SAMPLERS[0]]
    ref_o = ref.overall()["model"]
    rows = []
    for (name, steps), rep in reports.items():
        o = rep.overall()
        outs = np.concatenate([v.outputs for v in rep.videos])
        ref_outs = np.concatenate([v.outputs for v in ref.videos])
        masks = np.concatenate([foreground_mask(v.outputs, vid.background) for v, vid in zip(rep.videos, videos)])
        ref_masks = np.concatenate([foreground_mask(v.outputs, vid.background) for v, vid in zip(ref.videos, videos)])
        rows.append({
            "sampler": name, "steps": steps, **{k: o["model"][k] for k in ("l1", "psnr", "ssim", "iou")},
            "d_ssim": o["model"]["ssim"] / ref_o["ssim"] - 1, "d_iou": o["model"]["iou"] / ref_o["iou"] - 1,
            "to_ref_l1": float(l1(outs, ref_outs).mean()), "to_ref_psnr": float(np.minimum(psnr(outs, ref_outs), 99).mean()),
            "to_ref_iou": float(iou(masks, ref_masks).mean()), "s_per_frame": o["seconds_per_frame"],
        })
    ok = [r for r in rows if r["d_ssim"] >= -TOLERANCE and r["d_iou"] >= -TOLERANCE]
    fast = min(ok, key=lambda r: r["steps"])
    lines = ["| sampler | steps | L1 | PSNR | SSIM | IoU | SSIM vs ref | IoU vs ref | L1 to ref | PSNR to ref | IoU to ref | s/frame |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['l1']:.4f} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['iou']:.3f} | "
                     f"{100 * r['d_ssim']:+.1f} % | {100 * r['d_iou']:+.1f} % | {r['to_ref_l1']:.4f} | {r['to_ref_psnr']:.2f} | "
                     f"{r['to_ref_iou']:.3f} | {r['s_per_frame']:.3f} |")
    table = "\n".join(lines) + "\n"
    repeat = ref.overall()["repeat"]["iou"]
    summary = (f"Repeat-subject baseline IoU {repeat:.3f}; segmentation ceiling (ground truth) {ref.overall()['gt_iou']:.3f}. "
               f"Fast mode: {fast['sampler']} {fast['steps']} steps (smallest within {100 * TOLERANCE:.0f} % of the "
               f"reference on SSIM and IoU).\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tradeoff.json").write_text(json.dumps({"rows": rows, "fast": fast, "protocol": base.__dict__,
                                                    "repeat_iou": repeat, "gt_iou": ref.overall()["gt_iou"]}, indent=1))
    (out / "tradeoff.md").write_text(table + "\n" + summary)
    print(table)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
