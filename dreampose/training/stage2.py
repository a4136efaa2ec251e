"""Stage 2: specialise a DreamPose model to one subject, then finetune its VAE decoder.

Phase "unet":    UNet + adapter on the subject's image(s), epsilon-MSE, no dropout (paper: 500 steps, lr 1e-5).
                 Pairs (conditioning image a, target image b) over all ordered pairs of the subject's
                 images (front, back, ...), the pose window = n_poses copies of image b's pose (a single
                 frame has no neighbours). ONE random geometric transform per sample moves image, pose
                 and target together (dreampose.training.augment).
Phase "decoder": the VAE decoder alone (post_quant_conv + decoder; paper: 1500 steps, lr 5e-5): frozen
                 encoder latents (the mean) of the augmented image, a random crop of them decoded and
                 compared with the same crop of the pixels (L1 or MSE, plus LPIPS when local weights
                 are given).

The result is a complete model folder (the base model with the finetuned UNet, adapter and decoder),
loaded as is by the pipeline and the runtime. With ``lora_rank`` R (dreampose.lora) the UNet's chosen
layers learn a rank-R update instead (the adapter still trains fully; the decoder phase, with
``lora_decoder``, a LoRA of its convolutions), and the result is a subject folder of megabytes that the
runtime merges into the base model at load (``--subject``). Checkpoints of both phases go to ``work_dir``
(a LoRA run's hold only the trained weights) and a run resumes where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..images import load_image
from ..lora import mark_trainable
from ..model import DreamPoseModel
from ..outputs import check_output_dir, claim_output_dir
from ..poses import check_poses, read_iuv_image, resize_poses
from ..utils import DreamPoseError, PathLike, load_frozen_module, write_json
from .augment import random_affine, transform_together, warp
from .config import FinetuneConfig, config_to_dict, save_config
from .diffusion import FrozenEncoders, NoisePredictor, diffusion_loss, noise_schedule
from .loop import Trainer, list_checkpoints, make_accelerator

logger = logging.getLogger(__name__)

_PHASE_UNET, _PHASE_DECODER = "unet", "decoder"


@dataclass
class FinetuneResult:
    """model_dir: the finetuned model folder (a LoRA finetune: the subject folder); per-step losses of each
    phase run now."""

    model_dir: Path
    unet_losses: list[float]
    decoder_losses: list[float]


class VAEDecoder(nn.Module):
    """The trained half of the VAE: scaled latents (B, 4, h, w) -> pixels (B, 3, H, W), as model.decode."""

    def __init__(self, vae: nn.Module, scaling_factor: float) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.scaling_factor = float(scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


# --------------------------------------------------------------------------------------------------
# The subject
# --------------------------------------------------------------------------------------------------
def read_pose_file(path: PathLike) -> np.ndarray:
    """One frame's pose: a (2, H, W) or (1, 2, H, W) .npy, or an IUV image -> float32 (2, H, W) in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise DreamPoseError(f"{path}: pose file not found")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DreamPoseError(f"{path}: cannot read as a .npy array ({e})") from None
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[0] != 1:
            raise DreamPoseError(f"{path}: one pose must be (2, H, W) or (1, 2, H, W), got {arr.shape}")
        return check_poses(arr, str(path))[0]
    return read_iuv_image(path)


def subject_pose_path(image: PathLike) -> Path:
    """Where a subject image's pose is looked for by default: ``<stem>_densepose.npy`` beside it (the UBC layout)."""
    image = Path(image)
    return image.with_name(f"{image.stem}_densepose.npy")


def load_subject(cfg: FinetuneConfig, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The subject's images (K, 3, H, W) in [-1, 1] and poses (K, 2, H, W) in [0, 1] at the model's size."""
    images, poses = [], []
    for k, image in enumerate(cfg.images):
        pose_path = Path(cfg.poses[k]) if cfg.poses else subject_pose_path(image)
        if not cfg.poses and not pose_path.is_file():
            raise DreamPoseError(f"{pose_path}: no pose for subject image {image} (give --poses, one per image)")
        images.append(load_image(image, size)[0])
        poses.append(resize_poses(read_pose_file(pose_path)[None], size)[0])
    return torch.stack(images), torch.stack(poses)


# --------------------------------------------------------------------------------------------------
# Batches: pure functions of (seed, phase, position), so a resumed run sees the same data
# --------------------------------------------------------------------------------------------------
def unet_batches(
    images: torch.Tensor, poses: torch.Tensor, cfg: FinetuneConfig, n_poses: int, rank: int, world: int
) -> Callable[[int], Iterator[dict]]:
    """Micro-batches of augmented pairs: image (B, 3, H, W), target (B, 3, H, W), poses (B, n_poses, 2, H, W)."""
    k = images.shape[0]
    pairs = [(a, b) for a in range(k) for b in range(k)]

    def gen(start: int) -> Iterator[dict]:
        q = start // cfg.batch_size
        while True:
            picks, thetas = [], []
            for s in range(cfg.batch_size):
                rng = np.random.default_rng([cfg.run.seed, 1, (q * world + rank) * cfg.batch_size + s])
                picks.append(pairs[int(rng.integers(len(pairs)))])
                thetas.append(random_affine(rng, cfg.augment))
            a = torch.tensor([p[0] for p in picks])
            b = torch.tensor([p[1] for p in picks])
            window = poses[b].unsqueeze(1).expand(-1, n_poses, -1, -1, -1)
            image, window, target = transform_together(images[a], window, images[b], torch.stack(thetas))
            yield {"image": image, "target": target, "poses": window}
            q += 1

    return gen


def decoder_batches(images: torch.Tensor, cfg: FinetuneConfig, rank: int, world: int) -> Callable[[int], Iterator[dict]]:
    """Micro-batches of augmented subject images (B, 3, H, W) and the crop origin as fractions (B, 2)."""
    k = images.shape[0]

    def gen(start: int) -> Iterator[dict]:
        q = start // cfg.batch_size
        while True:
            idx, thetas, origins = [], [], []
            for s in range(cfg.batch_size):
                rng = np.random.default_rng([cfg.run.seed, 2, (q * world + rank) * cfg.batch_size + s])
                idx.append(int(rng.integers(k)))
                thetas.append(random_affine(rng, cfg.augment))
                origins.append(rng.random(2))
            yield {"image": warp(images[idx], torch.stack(thetas)), "origin": torch.tensor(np.stack(origins))}
            q += 1

    return gen


def load_perceptual_loss(path: PathLike, device: torch.device) -> nn.Module:
    """A local perceptual loss (LPIPS exported elsewhere, see docs/training.md): (x, y) (B, 3, H, W) in
    [-1, 1] -> distance (B,) or (B, 1, 1, 1). A ``torch.export`` program (.pt2) or a TorchScript file,
    frozen: gradients flow through it to the decoder only."""
    return load_frozen_module(path, device, "LPIPS weights")


# --------------------------------------------------------------------------------------------------
# The finetune
# --------------------------------------------------------------------------------------------------
def _inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def finetune(cfg: FinetuneConfig, resume: bool = False, accelerator=None) -> FinetuneResult:
    """Finetune ``cfg.base_model`` on the subject; write the model folder ``cfg.output_dir`` (with
    ``cfg.lora_rank``: the subject folder of the LoRA weights, see dreampose.lora).

    ``resume``: continue from the newest checkpoints in the work folder (each phase resumes separately).
    """
    if not cfg.base_model or not cfg.output_dir:
        raise DreamPoseError("finetune needs a base model folder and an output folder")
    lora = cfg.lora_settings()
    if lora is not None:
        from ..lora import require_peft

        require_peft()  # before minutes of loading
    acc = accelerator if accelerator is not None else make_accelerator(cfg.run)
    work = Path(cfg.work_dir or f"{cfg.output_dir}.work")
    inputs = [cfg.base_model, *cfg.images, *cfg.poses, cfg.lpips or None]
    check_output_dir(cfg.output_dir, "finetune", inputs=inputs)  # new, empty, or an earlier finetune's output
    check_output_dir(work, "finetune", inputs=inputs)
    if _inside(Path(cfg.output_dir), work) or _inside(work, Path(cfg.output_dir)):
        raise DreamPoseError(f"{work}: the work folder and the output folder {cfg.output_dir} must not contain "
                             "each other")

    # 1. inputs first
    model = DreamPoseModel.from_pretrained(cfg.base_model)
    c = model.config
    images, poses = load_subject(cfg, (c.height, c.width))
    lpips = load_perceptual_loss(cfg.lpips, acc.device) if cfg.lpips else None
    if lora is not None:
        from ..lora import add_lora, decoder_targets, model_fingerprint, unet_targets

        base_fingerprint = model_fingerprint(cfg.base_model)
        add_lora(model.unet, unet_targets(model.unet, lora.targets), lora, seed=cfg.run.seed)
        if lora.decoder:
            add_lora(model.vae.decoder, decoder_targets(model.vae.decoder), lora, seed=cfg.run.seed + 1)
        elif cfg.decoder_steps > 0:
            logger.info("finetune: a LoRA finetune without --lora-decoder has no decoder phase "
                        "(%d decoder steps skipped)", cfg.decoder_steps)
    if acc.is_main_process:
        claim_output_dir(work, "finetune", inputs=inputs)
        save_config(cfg, work / "config.json")
    logger.info("finetune: %d subject image(s) at %d x %d, %d UNet steps then %d decoder steps",
                len(images), c.height, c.width, cfg.unet_steps, cfg.decoder_steps)
    model.requires_grad_(False)
    model.to(acc.device).eval()
    if cfg.run.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    configs = {"finetune": config_to_dict(cfg), "model": c.to_dict()}
    metrics = work / "metrics.jsonl" if acc.is_main_process else None

    # 2. UNet + adapter, no dropout
    unet_losses: list[float] = []
    if cfg.unet_steps > 0:
        mark_trainable(model.unet, lora is not None)
        model.adapter.requires_grad_(True)
        optim = type(cfg.optim)(**{**config_to_dict(cfg.optim), "lr": cfg.unet_lr, "betas": tuple(cfg.optim.betas)})
        trainer = Trainer(acc, NoisePredictor(model.unet, model.adapter), optim, cfg.run, work / _PHASE_UNET,
                          cfg.unet_steps, 1, cfg.batch_size, configs, name=_PHASE_UNET,
                          trained_only=lora is not None)
        if resume and (found := list_checkpoints(work / _PHASE_UNET)):
            trainer.load_checkpoint(found[-1])
        encoders, schedule = FrozenEncoders(model), noise_schedule(model)

        def unet_loss(module, batch, generator):
            return diffusion_loss(module, encoders, schedule, batch["image"], batch["target"], batch["poses"], generator)

        unet_losses = trainer.fit(unet_batches(images, poses, cfg, c.n_poses, acc.process_index, acc.num_processes),
                                  unet_loss, metrics).losses
        trainer.trained_module()
        model.requires_grad_(False)

    # 3. the VAE decoder alone
    decoder_losses: list[float] = []
    if cfg.decoder_steps > 0 and (lora is None or lora.decoder):
        decoder = VAEDecoder(model.vae, model.scaling_factor)
        mark_trainable(decoder, lora is not None)
        optim = type(cfg.optim)(**{**config_to_dict(cfg.optim), "lr": cfg.decoder_lr, "betas": tuple(cfg.optim.betas)})
        trainer = Trainer(acc, decoder, optim, cfg.run, work / _PHASE_DECODER, cfg.decoder_steps, 1, cfg.batch_size,
                          configs, name=_PHASE_DECODER, trained_only=lora is not None)
        if resume and (found := list_checkpoints(work / _PHASE_DECODER)):
            trainer.load_checkpoint(found[-1])
        f = model.vae_scale_factor
        h, w = model.latent_size
        ch, cw = max(1, round(h * cfg.decoder_crop)), max(1, round(w * cfg.decoder_crop))

        def decoder_loss(module, batch, generator):
            pixels = batch["image"].to(acc.device)
            with torch.no_grad():
                z = model.encode_latents(pixels).float()
            oy = (batch["origin"][:, 0] * (h - ch + 1)).long().clamp(max=h - ch)
            ox = (batch["origin"][:, 1] * (w - cw + 1)).long().clamp(max=w - cw)
            zc = torch.stack([z[i, :, y : y + ch, x : x + cw] for i, (y, x) in enumerate(zip(oy.tolist(), ox.tolist()))])
            pc = torch.stack([pixels[i, :, y * f : (y + ch) * f, x * f : (x + cw) * f]
                              for i, (y, x) in enumerate(zip(oy.tolist(), ox.tolist()))])
            out = module(zc).float()
            loss = F.l1_loss(out, pc) if cfg.pixel_loss == "l1" else F.mse_loss(out, pc)
            if lpips is not None:
                loss = loss + cfg.lpips_weight * lpips(out, pc).mean()
            return loss

        decoder_losses = trainer.fit(decoder_batches(images, cfg, acc.process_index, acc.num_processes),
                                     decoder_loss, metrics).losses
        trainer.trained_module()
        model.requires_grad_(False)

    # 4. the model folder (or the subject folder)
    out = Path(cfg.output_dir)
    if acc.is_main_process:
        if lora is not None:
            from ..lora import SubjectInfo, save_subject

            info = SubjectInfo(lora=lora, base_fingerprint=base_fingerprint, base_model=str(cfg.base_model),
                               trained={"finetune": config_to_dict(cfg), "unet_losses": unet_losses[-1:],
                                        "decoder_losses": decoder_losses[-1:]})
            save_subject(out, model, info, inputs=inputs)
        else:
            model.to(torch.float32).save_pretrained(out, command="finetune")
            write_json(out / "finetune.json", config_to_dict(cfg))
    acc.wait_for_everyone()
    return FinetuneResult(model_dir=out, unet_losses=unet_losses, decoder_losses=decoder_losses)
