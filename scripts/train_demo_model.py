#!/usr/bin/env python
"""Train the embedded demo model: a small DreamPose on SynthFashion, on the CPU, deterministically.

    python scripts/train_demo_model.py                      # ~18 min on one CPU thread
    python scripts/train_demo_model.py --pilot              # a few minutes: checks that the loss falls

Phases (all seeded by SEED; torch runs on NUM_THREADS CPU threads):

1. the architecture: DreamPoseModel.tiny at HEIGHT x WIDTH (UNet blocks 32/64, VAE factor 4, a 2-layer
   CLIP ViT at 32 px), random weights from SEED. The CLIP tower stays random and frozen: it is a fixed
   feature extractor, and the adapter's VAE tokens carry the appearance.
2. the VAE, trained from scratch on the training frames (dreampose.training.autoencoder); its scaling
   factor is set so that the scaled latents have unit variance. Then frozen.
3. stage 1 with the project's trainer (dreampose.training.stage1): UNet + adapter on SynthFashion
   generated on the fly (TRAIN_VIDEOS videos x TRAIN_FRAMES frames of seed SEED), per-sample dropout,
   EMA weights.
4. the default guidance scales: a small grid scored by foreground IoU and L1 on VALIDATION videos
   (SynthFashion seed VALIDATION_SEED, neither the training seed nor the test seed of the evaluation).

The model folder goes to --assets (default dreampose_rt/assets/demo_model, where ``demo_model()`` loads it
from), with ``training.json``: the seed, every config, the losses and the time of each phase. Beside it go
the demo subject and poses (dreampose_rt.demo.write_demo_inputs: a held-out SynthFashion video).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreampose.data.dataset import to_pixels  # noqa: E402
from dreampose.data.figure import render_backdrop  # noqa: E402
from dreampose.data.synth import synth_video  # noqa: E402
from dreampose.metrics import foreground_iou, l1  # noqa: E402
from dreampose.model import DreamPoseModel  # noqa: E402
from dreampose.pipeline import DreamPosePipeline  # noqa: E402
from dreampose.training.autoencoder import AutoencoderConfig, train_autoencoder  # noqa: E402
from dreampose.training.config import OptimConfig, RunConfig, Stage1Config, config_to_dict  # noqa: E402
from dreampose.training.stage1 import train_stage1  # noqa: E402
from dreampose_rt.demo import write_demo_inputs  # noqa: E402

SEED = 0
NUM_THREADS = 1  # see main(): one thread is robust on a shared machine
HEIGHT, WIDTH = 64, 48
TRAIN_VIDEOS, TRAIN_FRAMES = 256, 16
VALIDATION_SEED, VALIDATION_VIDEOS = 2, 3
GUIDANCE_GRID = ((2.0, 2.0), (4.0, 2.5), (8.0, 3.0), (8.0, 5.0))  # (s_image, s_pose)

VAE = AutoencoderConfig(steps=4000, batch_size=8, lr=1e-3, kl_weight=1e-4, crop=(48, 36), seed=SEED, log_every=200)
# A constant learning rate after the warm-up, so that the model after N steps does not depend on the planned
# total: STAGE1_STEPS is the step count of the shipped weights.
STAGE1_STEPS = 4000
STAGE1 = dict(batch_size=8, micro_batch_size=8, max_steps=STAGE1_STEPS, ema_decay=0.999, target_latents="mean",
              optim=OptimConfig(lr=4e-4, schedule="constant", warmup_steps=100, weight_decay=1e-2, grad_clip=1.0),
              run=RunConfig(seed=SEED, checkpoint_every=250, keep_checkpoints=2, log_every=100, progress=False))
PILOT = dict(vae_steps=20, stage1_steps=30, log_every=10)

logger = logging.getLogger("train_demo_model")

COMMAND = "train-demo-model"  # the output marker of the folders this script writes (dreampose.outputs)


def training_frames(n_videos: int, n_frames: int) -> torch.Tensor:
    """All frames of the training videos: (N, 3, H, W) in [-1, 1]."""
    out = []
    for v in range(n_videos):
        vid = synth_video(SEED, v, n_frames, HEIGHT, WIDTH)
        out.extend(to_pixels(f, (HEIGHT, WIDTH)) for f in vid.images)
    return torch.stack(out)


def pick_guidance(model_dir: Path) -> tuple[tuple[float, float], list[dict]]:
    """Score GUIDANCE_GRID on the validation videos (frame 0 is the subject; frames 4, 8, 12 the targets;
    DDIM 10 steps): the best mean foreground IoU, ties broken by L1. Returns ((s_image, s_pose), scores)."""
    pipe = DreamPosePipeline.from_pretrained(model_dir)
    videos = [synth_video(VALIDATION_SEED, k, TRAIN_FRAMES, HEIGHT, WIDTH) for k in range(VALIDATION_VIDEOS)]
    targets = [4, 8, 12]
    scores = []
    for s_i, s_p in GUIDANCE_GRID:
        ious, l1s = [], []
        for vid in videos:
            out = pipe(vid.images[0], vid.uv, steps=10, scheduler="ddim", s_image=s_i, s_pose=s_p, seed=SEED,
                       frames=targets, frames_per_batch=len(targets), progress=False)
            bg = render_backdrop(vid.appearance, HEIGHT, WIDTH)
            ious.append(foreground_iou(out, vid.silhouette[targets], bg).mean())
            l1s.append(l1(out, vid.images[targets]).mean())
        scores.append({"s_image": s_i, "s_pose": s_p, "iou": float(np.mean(ious)), "l1": float(np.mean(l1s))})
        logger.info("guidance s_image %.1f s_pose %.1f: IoU %.3f, L1 %.4f", s_i, s_p, scores[-1]["iou"], scores[-1]["l1"])
    best = max(scores, key=lambda s: (round(s["iou"], 3), -s["l1"]))
    return (best["s_image"], best["s_pose"]), scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/demo_model", help="run folder (checkpoints, logs)")
    parser.add_argument("--assets", default=str(ROOT / "dreampose_rt" / "assets" / "demo_model"),
                        help="where the final model folder goes")
    parser.add_argument("--pilot", action="store_true", help=f"a short run: {PILOT}")
    parser.add_argument("--resume", action="store_true", help="resume stage 1 from the newest checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    # One thread: with two OpenMP threads on a 2-core machine that other jobs share, every parallel region
    # waits for a descheduled thread and a step runs 10-40x slower; one thread is steady.
    torch.set_num_threads(NUM_THREADS)
    torch.set_flush_denormal(True)  # tiny weights and activations otherwise hit the CPU's slow denormal path
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info: dict = {"seed": SEED, "height": HEIGHT, "width": WIDTH, "threads": NUM_THREADS, "pilot": args.pilot,
                  "train_videos": TRAIN_VIDEOS, "train_frames": TRAIN_FRAMES, "validation_seed": VALIDATION_SEED}
    t_all = time.perf_counter()

    # 1 + 2. architecture and VAE
    base_dir = work / "base"
    vae_cfg = AutoencoderConfig(**{**asdict(VAE), "steps": PILOT["vae_steps"], "log_every": PILOT["log_every"]}) if args.pilot else VAE
    if args.resume and (base_dir / "dreampose.json").is_file():
        logger.info("reusing the base model (trained VAE) in %s", base_dir)
        info["vae"] = json.loads((work / "vae.json").read_text())
    else:
        model = DreamPoseModel.tiny(seed=SEED, height=HEIGHT, width=WIDTH)
        frames = training_frames(TRAIN_VIDEOS, TRAIN_FRAMES)
        logger.info("VAE: %d training frames, %s", len(frames), vae_cfg)
        res = train_autoencoder(model.vae, frames, vae_cfg)
        info["vae"] = {"config": asdict(vae_cfg), "seconds": res.seconds, "scaling_factor": res.scaling_factor,
                       "l1_first": float(np.mean(res.l1[:10])), "l1_last": float(np.mean(res.l1[-10:]))}
        logger.info("VAE: L1 %.4f -> %.4f in %.0f s, scaling factor %.4f", info["vae"]["l1_first"], info["vae"]["l1_last"],
                    res.seconds, res.scaling_factor)
        model.save_pretrained(base_dir, command=COMMAND)
        (work / "vae.json").write_text(json.dumps(info["vae"], indent=1))

    # 3. stage 1
    stage1 = dict(STAGE1, max_steps=PILOT["stage1_steps"], run=dataclasses.replace(STAGE1["run"], log_every=PILOT["log_every"])) if args.pilot else STAGE1
    cfg = Stage1Config(data="synth", output_dir=str(work / "stage1"), base_model=str(base_dir),
                       synth_videos=TRAIN_VIDEOS, synth_frames=TRAIN_FRAMES, **stage1)
    t0 = time.perf_counter()
    result = train_stage1(cfg, resume="latest" if args.resume else None)
    losses = result.losses
    stage1_json = work / "stage1.json"
    if losses:  # this run trained: record it (a later --resume that trains nothing keeps this record)
        info["stage1"] = {"config": config_to_dict(cfg), "seconds": time.perf_counter() - t0, "steps": result.end_step,
                          "loss_first_50": float(np.mean(losses[:50])), "loss_last_50": float(np.mean(losses[-50:]))}
        stage1_json.write_text(json.dumps(info["stage1"], indent=1))
    elif stage1_json.is_file():
        info["stage1"] = json.loads(stage1_json.read_text())
    else:
        info["stage1"] = {"config": config_to_dict(cfg), "steps": result.end_step}
    logger.info("stage 1: loss %s -> %s in %.0f s", info["stage1"]["loss_first_50"], info["stage1"]["loss_last_50"],
                info["stage1"]["seconds"])

    # 4. guidance defaults, then the shipped folder
    t0 = time.perf_counter()
    (s_image, s_pose), scores = pick_guidance(result.model_dir)
    info["guidance"] = {"chosen": {"s_image": s_image, "s_pose": s_pose}, "grid": scores,
                        "seconds": time.perf_counter() - t0}
    model = DreamPoseModel.from_pretrained(result.model_dir)
    model.config = dataclasses.replace(model.config, s_image=s_image, s_pose=s_pose)
    info["parameters"] = model.parameter_counts()
    info["this_run_seconds"] = time.perf_counter() - t_all
    # the whole training: the phases' times (a --resume run that only finishes keeps the earlier records)
    info["total_seconds"] = sum(float(info[k].get("seconds", 0.0)) for k in ("vae", "stage1", "guidance"))
    assets = Path(args.assets)
    model.save_pretrained(assets, command=COMMAND)  # the shipped folder carries this script's marker
    (assets / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    subject, poses = write_demo_inputs(assets.parent)
    logger.info("wrote the demo subject %s and poses %s", subject, poses)
    size = sum(p.stat().st_size for p in assets.rglob("*") if p.is_file())
    logger.info("wrote %s (%.1f MB) in %.0f s total", assets, size / 2**20, info["total_seconds"])
    print(json.dumps({k: info[k] for k in ("vae", "guidance", "total_seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
