#!/usr/bin/env python
"""Measure subject finetuning on held-out SynthFashion subjects: none, full, LoRA at several ranks, one run.

    python scripts/subject_finetune.py [--videos 4] [--ranks 4 16] [--out benchmarks/results/...json]

For each of the evaluation protocol's first ``--videos`` held-out videos (SynthFashion seed TEST_SEED; not
the demo's subject), the demo model is finetuned on the protocol's subject frame (its image and its pose,
as a user with one photo would) in each of these ways:

- none: the demo model as it is;
- full: stage 2 as the paper does it (every UNet and adapter weight, then the VAE decoder);
- LoRA at each rank of ``--ranks``: the UNet's attention and resnet convolutions (dreampose.lora), the
  adapter fully, and a LoRA of the VAE decoder (``--lora-decoder``), with the same steps; and at each rank
  of ``--attention-ranks`` the attention layers alone (the effect of the target modules).

The steps and learning rates (the defaults below) were chosen in pilot runs on test video 0, which is
therefore skipped (``--skip``): the UNet phase on one image overfits fast (the figure stops following the
pose: IoU falls), so it gets few steps at a low rate, and a LoRA tolerates a higher one. Two recorded runs
(benchmarks/results/subject_finetune_cpu_2026-12-02*.json): the first with 300 decoder steps at 3e-3 (LoRA)
/ 3e-4 (full) and ranks 4 and 16; the second, the defaults, with the decoder's rates raised (after a
pilot on the demo subject) and 600 steps, better on every figure metric for both.

Each variant then renders the video's target frames (the reference pipeline, PNDM 100 steps, the model's
guidance) and is scored against the ground truth: L1 and PSNR inside the ground truth's figure mask, the
figure's mean colour error, foreground IoU, and the whole-frame L1 / SSIM (dreampose.evaluation's
``score_frames``). Also recorded: the finetuning's CPU time and the size of what it writes (a full
finetune: the model folder's weights; LoRA: the subject folder).

Writes one JSON record (with the machine) and prints the markdown table that docs/quality.md shows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import device_info, versions  # noqa: E402
from dreampose.evaluation import score_frames, test_videos  # noqa: E402
from dreampose.lora import (LoraSettings, apply_subject, decoder_targets, lora_parameters,  # noqa: E402
                            model_fingerprint, subject_bytes, training_memory, unet_targets)
from dreampose.model import DreamPoseModel  # noqa: E402
from dreampose.pipeline import DreamPosePipeline  # noqa: E402
from dreampose.settings import EvalProtocol, SamplingSettings  # noqa: E402
from dreampose.training import FinetuneConfig, finetune  # noqa: E402
from dreampose.training.config import RunConfig, config_to_dict  # noqa: E402
from dreampose.utils import DreamPoseError, atomic_file  # noqa: E402
from dreampose.video import write_png  # noqa: E402
from dreampose_rt.demo import DEMO_MODEL_DIR  # noqa: E402

logger = logging.getLogger("subject_finetune")
RESULTS = ROOT / "benchmarks" / "results"
REPORTED = ("fg_l1", "fg_psnr", "colour_error", "iou", "l1", "ssim")


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


def run_variant(name: str, cfg: FinetuneConfig | None, base: Path) -> tuple[DreamPoseModel, dict]:
    """Finetune (or not) and return (the model to render with, what the variant cost)."""
    if cfg is None:
        return DreamPoseModel.from_pretrained(base), {"seconds": 0.0, "bytes": 0}
    t0 = time.perf_counter()
    result = finetune(cfg)
    seconds = time.perf_counter() - t0
    if cfg.lora_rank:
        model = DreamPoseModel.from_pretrained(base)
        apply_subject(model, result.model_dir, model_fingerprint(base))
        size = subject_bytes(result.model_dir)
    else:
        model = DreamPoseModel.from_pretrained(result.model_dir)
        size = weights_bytes(result.model_dir)
    logger.info("%s: finetuned in %.1f s, %d bytes written", name, seconds, size)
    return model, {"seconds": seconds, "bytes": size, "unet_loss_last": result.unet_losses[-1:],
                   "decoder_loss_last": result.decoder_losses[-1:]}


def sd15_report(ranks: list[int]) -> dict:
    """At SD 1.5 size (the networks built on the meta device: shapes only): the subject folder's bytes
    (fp32 LoRA factors of the UNet and the VAE decoder, the adapter) against a full finetune's model folder,
    and the parameter, gradient and optimizer-state bytes of the UNet phase (AdamW, fp32 gradients and
    moments; frozen weights at fp32 as our finetune keeps them, and at fp16)."""
    with torch.device("meta"):
        model = DreamPoseModel.sd15_random()
    full_bytes = sum(p.numel() for p in model.parameters()) * 4
    adapter = sum(p.numel() for p in model.adapter.parameters())
    out: dict = {"full_model_folder_bytes": full_bytes, "subject_folder_bytes": {}, "unet_phase_memory": {}}
    for targets in ("attention", "attention+conv"):
        for r in ranks:
            n = (lora_parameters(model.unet, unet_targets(model.unet, targets), r) + adapter
                 + lora_parameters(model.vae.decoder, decoder_targets(model.vae.decoder), r))
            out["subject_folder_bytes"][f"r{r} {targets}"] = {"bytes": n * 4, "of_full": n * 4 / full_bytes}
    for name, settings in (("full", None), *((f"lora r{r} attention", LoraSettings(rank=r)) for r in ranks)):
        out["unet_phase_memory"][name] = {f"weights fp{b * 8}": training_memory(model, settings, param_bytes=b)
                                          for b in (4, 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=4, help="held-out test videos (default: 4)")
    parser.add_argument("--seed", type=int, default=None,
                        help="SynthFashion seed of the subjects (default: the test set's; 2: the validation set)")
    parser.add_argument("--no-full", action="store_true", help="skip full finetuning (sweeps of the LoRA settings)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--skip", type=int, default=1,
                        help="test videos skipped first (default: 1: video 0 chose the steps and learning rates)")
    parser.add_argument("--ranks", type=int, nargs="*", default=[4], help="LoRA ranks, attention and convolutions (default: 4)")
    parser.add_argument("--attention-ranks", type=int, nargs="*", default=[4],
                        help="LoRA ranks also measured with attention layers only (default: 4)")
    parser.add_argument("--unet-steps", type=int, default=200)
    parser.add_argument("--decoder-steps", type=int, default=600)
    parser.add_argument("--full-lr", type=float, nargs=2, default=[1.5e-6, 1e-3], metavar=("UNET", "DECODER"))
    parser.add_argument("--lora-lr", type=float, nargs=2, default=[3e-5, 1e-2], metavar=("UNET", "DECODER"))
    parser.add_argument("--steps", type=int, default=100, help="PNDM steps of the renders (default: 100)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON record (default: benchmarks/results/subject_finetune_cpu_<date>.json)")
    parser.add_argument("--sd15-only", action="store_true",
                        help="only the SD 1.5-size sizes and training memory (seconds), added to --out if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)

    if args.sd15_only:
        out = Path(args.out) if args.out else RESULTS / f"subject_finetune_cpu_{datetime.date.today()}.json"
        record = json.loads(out.read_text()) if out.is_file() else {"benchmark": "scripts/subject_finetune.py"}
        if record.get("benchmark") != "scripts/subject_finetune.py":
            raise DreamPoseError(f"{out}: not a record of scripts/subject_finetune.py; give another --out")
        record["sd15"] = sd15_report(args.ranks)
        with atomic_file(out) as tmp_file:
            tmp_file.write_text(json.dumps(record, indent=2) + "\n")
        sys.stdout.write(json.dumps(record["sd15"], indent=1) + "\n")
        return 0
    base = DEMO_MODEL_DIR
    config = DreamPoseModel.from_pretrained(base).config
    protocol = EvalProtocol(videos=args.skip + args.videos, **({} if args.seed is None else {"seed": args.seed}))
    sampling = SamplingSettings.for_model(config, steps=args.steps)
    run = RunConfig(checkpoint_every=0, keep_checkpoints=1, progress=False, seed=0)
    common = dict(base_model=str(base), batch_size=args.batch_size, unet_steps=args.unet_steps, decoder_steps=args.decoder_steps, run=run)
    variants: dict[str, dict | None] = {"none": None}
    if not args.no_full:
        variants["full"] = dict(unet_lr=args.full_lr[0], decoder_lr=args.full_lr[1])
    for targets, ranks, label in (("attention+conv", args.ranks, ""), ("attention", args.attention_ranks, " attention")):
        for r in ranks:
            variants[f"lora r{r}{label}"] = dict(unet_lr=args.lora_lr[0], decoder_lr=args.lora_lr[1], lora_rank=r,
                                                 lora_targets=targets, lora_decoder=True)
    rows: dict[str, dict] = {name: {"videos": [], "seconds": [], "bytes": 0} for name in variants}
    with tempfile.TemporaryDirectory(prefix="subject_finetune.") as tmp:
        for video in test_videos(protocol, config.height, config.width)[args.skip:]:
            targets = protocol.targets(len(video.images))
            k = protocol.subject_frame
            image, pose = Path(tmp) / f"{video.name}.png", Path(tmp) / f"{video.name}_densepose.npy"
            write_png(video.images[k], image)
            np.save(pose, video.uv[k])
            for name, values in variants.items():
                cfg = None if values is None else FinetuneConfig(
                    images=(str(image),), output_dir=str(Path(tmp) / f"{video.name}_{name.replace(' ', '_')}"),
                    **common, **values)
                model, cost = run_variant(f"{video.name} {name}", cfg, base)
                frames = DreamPosePipeline(model)(video.images[k], video.uv, settings=sampling, frames=targets,
                                                  frames_per_batch=len(targets), progress=False)
                scores = {m: float(np.mean(v)) for m, v in score_frames(frames, video, targets).items()}
                logger.info("%s %s: %s", video.name, name, ", ".join(f"{m} {scores[m]:.4f}" for m in REPORTED))
                rows[name]["videos"].append({"name": video.name, **scores})
                rows[name]["seconds"].append(cost["seconds"])
                rows[name]["bytes"] = cost["bytes"]
                if cfg is not None:
                    rows[name]["config"] = config_to_dict(cfg) | {"images": ["<the video's subject frame>"],
                                                                  "output_dir": "<temporary>"}
    for row in rows.values():
        row["mean"] = {m: float(np.mean([v[m] for v in row["videos"]])) for m in REPORTED}
        row["seconds_mean"] = float(np.mean(row["seconds"]))
    full = rows.get("full")
    gap = rows["none"]["mean"]["fg_l1"] - full["mean"]["fg_l1"] if full else 0.0
    for row in rows.values():
        row["gap_closed"] = (rows["none"]["mean"]["fg_l1"] - row["mean"]["fg_l1"]) / gap if gap else None
        row["size_vs_full"] = row["bytes"] / full["bytes"] if full and full["bytes"] else None
    record = {
        "benchmark": "scripts/subject_finetune.py", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_info(torch.device("cpu")), "versions": versions(), "threads": args.threads,
        "argv": sys.argv[1:] if argv is None else argv, "protocol": protocol.to_dict(),
        "sampling": sampling.to_dict(), "variants": rows, "sd15": sd15_report(args.ranks),
    }
    out = Path(args.out) if args.out else RESULTS / f"subject_finetune_cpu_{record['date'][:10]}.json"
    with atomic_file(out) as tmp_file:
        tmp_file.write_text(json.dumps(record, indent=2) + "\n")
    sys.stdout.write(table(rows) + "\n")
    logger.info("wrote %s", out)
    return 0


def table(rows: dict[str, dict]) -> str:
    """The markdown table of docs/quality.md."""
    lines = ["| finetuning | figure L1 | figure PSNR | figure colour error | IoU | L1 | SSIM | foreground-L1 gap closed | "
             "CPU s per subject | written |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        m = r["mean"]
        gap = "-" if r["gap_closed"] is None or name == "none" else f"{r['gap_closed']:.0%}"
        size = "-" if not r["bytes"] else f"{r['bytes'] / 1e6:.2f} MB" + (
            f" ({r['size_vs_full']:.3f} of full)" if name != "full" and r["size_vs_full"] is not None else "")
        lines.append(f"| {name} | {m['fg_l1']:.4f} | {m['fg_psnr']:.2f} dB | {m['colour_error']:.4f} | {m['iou']:.3f} | "
                     f"{m['l1']:.4f} | {m['ssim']:.3f} | {gap} | {r['seconds_mean']:.0f} | {size} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
