"""Peak GPU memory of the subject finetune's UNet phase: full finetuning against LoRA (issue 17's 12 GB).

    python -m benchmarks.bench_lora_memory [--model sd15] [--device cuda] [--modes full lora] [--rank 4]
        [--frozen-dtype fp32|fp16] [--mixed-precision bf16|fp16|no] [--steps 3] [--results DIR]

Per mode, a fresh model (random weights: memory depends on shapes only) at the paper's 640 x 512, batch 1,
gradient checkpointing on, AdamW over the trained parameters, ``--steps`` optimizer steps of the stage-2
loss (dreampose.training.diffusion.diffusion_loss, the same code as ``finetune``); the peak of
``torch.cuda.max_memory_allocated`` over the steps, beside dreampose.lora.training_memory's count of the
parameter, gradient and optimizer-state bytes (activations are the difference). On the CPU (``--model
tiny``) it runs the same steps and reports the counts only: what the tests check.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from dreampose.lora import LoraSettings, add_lora, mark_trainable, training_memory, unet_targets
from dreampose.model import DreamPoseModel
from dreampose.utils import atomic_file
from dreampose.training.diffusion import FrozenEncoders, NoisePredictor, diffusion_loss, noise_schedule

from .measure import device_info, versions

logger = logging.getLogger(__name__)
RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def measure(mode: str, model_name: str, device: torch.device, rank: int, frozen_dtype: str, mixed: str,
            steps: int) -> dict:
    """One mode ("full" or "lora"): the counted bytes, and on CUDA the peak allocated memory."""
    torch.manual_seed(0)
    model = DreamPoseModel.sd15_random() if model_name == "sd15" else DreamPoseModel.tiny(seed=0)
    settings = LoraSettings(rank=rank) if mode == "lora" else None
    counted = training_memory(model, settings, param_bytes=4 if frozen_dtype == "fp32" else 2)
    model.requires_grad_(False)
    if settings is not None:
        add_lora(model.unet, unet_targets(model.unet, settings.targets), settings)
    mark_trainable(model.unet, settings is not None)  # as dreampose.training.stage2's UNet phase
    model.adapter.requires_grad_(True)
    if frozen_dtype != "fp32":  # frozen weights at half precision; the trained ones stay fp32
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(DTYPES[frozen_dtype])
    model.to(device)
    model.unet.enable_gradient_checkpointing()
    predictor = NoisePredictor(model.unet, model.adapter).train()
    params = [p for p in predictor.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == counted["trained_parameters"], "training_memory counts another set"
    optim = torch.optim.AdamW(params, lr=1e-5)
    encoders, schedule = FrozenEncoders(model), noise_schedule(model)
    c = model.config
    g = torch.Generator(device=device).manual_seed(0)
    image = torch.rand(1, 3, c.height, c.width, device=device) * 2 - 1
    poses = torch.rand(1, c.n_poses, 2, c.height, c.width, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=DTYPES.get(mixed, torch.float32), enabled=mixed != "no"):
            loss = diffusion_loss(predictor, encoders, schedule, image, image, poses, g)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
    out = {"mode": mode, "rank": rank if settings else None, "targets": settings.targets if settings else None,
           "counted": counted, "loss": float(loss.detach())}
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        out["seconds_per_step"] = (time.perf_counter() - t0) / steps
    del model, predictor, optim, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--frozen-dtype", choices=("fp32", "fp16", "bf16"), default="fp16")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="fp16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    device = torch.device(args.device)
    rows = []
    for mode in args.modes:
        try:
            rows.append(measure(mode, args.model, device, args.rank, args.frozen_dtype, args.mixed_precision,
                                args.steps))
        except torch.OutOfMemoryError as e:  # full finetuning may not fit: that is a result too
            rows.append({"mode": mode, "error": f"out of memory: {str(e).splitlines()[0]}"})
        r = rows[-1]
        gb = {k: round(v / 2**30, 2) for k, v in r.get("counted", {}).items() if k != "trained_parameters"}
        logger.info("%s: counted %s GiB; peak allocated %s GiB", mode, gb,
                    round(r["peak_allocated_bytes"] / 2**30, 2) if "peak_allocated_bytes" in r else "-")
    info = device_info(device)
    record = {"benchmark": "bench_lora_memory", "device": info, "versions": versions(), "args": vars(args),
              "rows": rows}
    name = str(info.get("name", args.device)).lower().replace(" ", "-")
    out = Path(args.results) / f"lora_memory_{name}_{args.model}_{time.strftime('%Y-%m-%d')}.json"
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
