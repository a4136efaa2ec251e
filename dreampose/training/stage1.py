"""Stage 1: train the base DreamPose (UNet + adapter) on a video dataset. VAE and CLIP stay frozen.

One script for one device or many: run it directly, or under ``accelerate launch`` for DDP, e.g.::

    accelerate launch --multi_gpu --num_processes 2 -m dreampose_rt.cli train \\
        --data data/ubc/train --sd sd15/ --clip clip-vit-base-patch32/ --out runs/stage1 \\
        --micro-batch-size 4 --mixed-precision bf16

The global batch (``batch_size``, 16) is micro_batch_size x gradient accumulation x processes; the
accumulation is derived. Per optimizer step: the mean epsilon-MSE over the global batch (per-sample
dropout of pose and image as in the paper), clipped gradients, AdamW. See dreampose.training.loop for
checkpoints and exact resume.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.dataset import DropoutConfig, PairSampler, TrainingPairs, UBCFolder, VideoSource
from ..data.synth import SynthFashion, SynthFashionConfig
from ..model import DreamPoseModel
from ..outputs import check_output_dir, claim_output_dir
from ..utils import DreamPoseError
from .config import Stage1Config, config_to_dict, save_config
from .diffusion import FrozenEncoders, NoisePredictor, diffusion_loss, noise_schedule
from .loop import LoopResult, Trainer, list_checkpoints, make_accelerator

logger = logging.getLogger(__name__)

SYNTH_CACHE_BYTES = 512 * 2**20  # rendered SynthFashion videos kept in memory (per loader process)

_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Stage1Result:
    """model_dir: the final model folder; losses: per-step mean losses of this run; steps: (start, end)."""

    model_dir: Path
    losses: list[float]
    start_step: int
    end_step: int


def base_model(cfg: Stage1Config) -> DreamPoseModel:
    """The model stage 1 starts from: a model folder, local SD + CLIP folders, or the tiny random model."""
    if cfg.sd_dir or cfg.clip_dir:
        if not (cfg.sd_dir and cfg.clip_dir):
            raise DreamPoseError("a fresh model needs both sd_dir and clip_dir")
        return DreamPoseModel.from_stable_diffusion(cfg.sd_dir, cfg.clip_dir, height=cfg.height or 640, width=cfg.width or 512)
    if cfg.base_model == "tiny":
        return DreamPoseModel.tiny(seed=cfg.run.seed, height=cfg.height or 64, width=cfg.width or 48)
    model = DreamPoseModel.from_pretrained(cfg.base_model)
    c = model.config
    if (cfg.height and cfg.height != c.height) or (cfg.width and cfg.width != c.width):
        raise DreamPoseError(f"{cfg.base_model}: the model is {c.height} x {c.width}; it cannot train at {cfg.height} x {cfg.width}")
    return model


def video_source(cfg: Stage1Config, size: tuple[int, int]) -> VideoSource:
    """The dataset: a UBC-layout folder (checked completely now), or SynthFashion on the fly."""
    if cfg.data == "synth":
        # keep every rendered video when they fit in SYNTH_CACHE_BYTES: random pairs then cost no re-render
        video_bytes = cfg.synth_frames * size[0] * size[1] * (3 + 2 * 4 + 1)  # uint8 RGB, float32 U V, bool mask
        cache = max(8, min(cfg.synth_videos, SYNTH_CACHE_BYTES // max(1, video_bytes)))
        return SynthFashion(SynthFashionConfig(seed=cfg.run.seed, n_videos=cfg.synth_videos, n_frames=cfg.synth_frames,
                                               height=size[0], width=size[1]), cache_videos=cache)
    return UBCFolder(cfg.data)


def steps_and_accumulation(cfg: Stage1Config, n_samples: int, world: int) -> tuple[int, int]:
    """(max optimizer steps, gradient accumulation) for a global batch of cfg.batch_size."""
    per_step = cfg.micro_batch_size * world
    if cfg.batch_size % per_step:
        raise DreamPoseError(
            f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size {cfg.micro_batch_size} x {world} processes"
        )
    max_steps = cfg.max_steps or max(1, math.floor(cfg.epochs * n_samples / cfg.batch_size))
    return max_steps, cfg.batch_size // per_step


def train_stage1(cfg: Stage1Config, resume: str | None = None, accelerator=None) -> Stage1Result:
    """Run stage 1. ``resume``: None (start fresh), "latest" (the newest checkpoint of the run, if any) or a
    checkpoint folder. Writes ``output_dir/{config.json, metrics.jsonl, checkpoints/, model/}``."""
    acc = accelerator if accelerator is not None else make_accelerator(cfg.run)
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"

    # 1. data and model, all checks before any training
    if cfg.batch_size % (cfg.micro_batch_size * acc.num_processes):
        steps_and_accumulation(cfg, 1, acc.num_processes)  # raises the error
    resume_path = _resume_path(ckpt_dir, resume)
    inputs = [cfg.data if cfg.data != "synth" else None, cfg.base_model if cfg.base_model != "tiny" else None,
              cfg.sd_dir or None, cfg.clip_dir or None]
    check_output_dir(out, "train", inputs=inputs, legacy=_is_run_folder)  # new, empty, or this command's own
    if cfg.data != "synth":
        source: VideoSource | None = video_source(cfg, (0, 0))  # a broken dataset fails before the model loads
    else:
        source = None
    model = base_model(cfg)
    c = model.config
    size = (c.height, c.width)
    source = source or video_source(cfg, size)
    dropout = DropoutConfig(cfg.p_drop_pose, cfg.p_drop_image, cfg.p_drop_both)
    dataset = TrainingPairs(source, size, seed=cfg.run.seed, n_poses=c.n_poses, window=cfg.window, dropout=dropout)
    max_steps, grad_accum = steps_and_accumulation(cfg, len(dataset), acc.num_processes)
    logger.info("stage 1: %d pairs, %d steps of %d samples (%d x %d accumulation x %d processes), lr %.1e",
                len(dataset), max_steps, cfg.batch_size, cfg.micro_batch_size, grad_accum, acc.num_processes, cfg.optim.lr)

    # 2. what trains, what is frozen
    model.requires_grad_(False)
    model.unet.requires_grad_(True)
    model.adapter.requires_grad_(True)
    frozen_dtype = _DTYPES[cfg.run.mixed_precision]
    model.to(acc.device)
    frozen_fp32: dict[str, dict[str, torch.Tensor]] = {}
    if frozen_dtype != torch.float32:  # the frozen networks run in the training precision...
        for name in ("vae", "image_encoder"):  # ...but the model folder gets their untouched fp32 weights
            frozen_fp32[name] = {k: v.detach().to("cpu", copy=True) for k, v in getattr(model, name).state_dict().items()}
            getattr(model, name).to(dtype=frozen_dtype)
    if cfg.run.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.eval()
    predictor = NoisePredictor(model.unet, model.adapter)
    trainer = Trainer(acc, predictor, cfg.optim, cfg.run, ckpt_dir, max_steps, grad_accum, cfg.micro_batch_size,
                      configs={"stage1": config_to_dict(cfg), "model": c.to_dict()}, ema_decay=cfg.ema_decay, name="stage1")
    if resume_path is not None:
        trainer.load_checkpoint(resume_path)
    if acc.is_main_process:
        claim_output_dir(out, "train", inputs=inputs, legacy=_is_run_folder)
        save_config(cfg, out / "config.json")

    # 3. train
    encoders, schedule = FrozenEncoders(model), noise_schedule(model)

    def batches(start: int):
        sampler = PairSampler(len(dataset), seed=cfg.run.seed, rank=acc.process_index, world=acc.num_processes, start=start)
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.micro_batch_size, sampler=sampler,
                                             num_workers=cfg.num_workers, pin_memory=acc.device.type == "cuda")
        return iter(loader)

    def loss_fn(module, batch, generator):
        return diffusion_loss(module, encoders, schedule, batch["image"], batch["target"], batch["poses"], generator,
                              batch["drop_image"], batch["drop_pose"], sample_latents=cfg.target_latents == "sample")

    result: LoopResult = trainer.fit(batches, loss_fn, metrics_file=out / "metrics.jsonl" if acc.is_main_process else None)

    # 4. the model folder (EMA weights when EMA is on), fp32 like every model folder
    trainer.trained_module(use_ema=True)
    model_dir = out / "model"
    model.to(torch.float32)
    for name, state in frozen_fp32.items():
        getattr(model, name).load_state_dict(state)
    if acc.is_main_process:
        model.save_pretrained(model_dir, command="train")
    acc.wait_for_everyone()
    return Stage1Result(model_dir=model_dir, losses=result.losses, start_step=result.start_step, end_step=result.end_step)


def _is_run_folder(path: Path) -> bool:
    """A stage-1 run folder written before output markers: its config says Stage1Config."""
    try:
        return json.loads((path / "config.json").read_text()).get("kind") == "Stage1Config"
    except (OSError, ValueError, AttributeError):
        return False


def _resume_path(ckpt_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(ckpt_dir)
        if not found:
            logger.info("no checkpoint in %s: starting from step 0", ckpt_dir)
            return None
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise DreamPoseError(f"{path}: not a checkpoint folder (no state.json)")
    return path
