"""Train a small VAE (diffusers AutoencoderKL) from scratch on frames: what the demo model needs, since a
small model cannot borrow Stable Diffusion's VAE.

    z = mu(x)                                  (``sample_posterior=False``, the default: a plain autoencoder)
    z ~ q(z | x) = N(mu(x), sigma(x)^2)       (``sample_posterior=True``: the reparameterised posterior draw)
    loss = |decode(z) - x|_1 (mean) + kl_weight * KL(q || N(0, I)) (mean over latent elements)

DreamPose only ever uses the posterior MEAN (conditioning latents, and the demo trains stage 1 with
``target_latents="mean"``), so the default trains the mean path alone (the KL term then reduces to its
mean part, 0.5 mu^2, which keeps the latents' scale in check): a from-scratch VAE whose posterior starts
with unit variance learns several times faster this way than through posterior draws.

After training, ``scaling_factor`` is set to 1 / std of the posterior means over the training frames
(what Stable Diffusion's 0.18215 is for its VAE), so that the scaled latents the diffusion model sees
have unit variance (measured on SCALE_FRAMES evenly spaced frames). Deterministic for a given seed (torch CPU).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import DreamPoseError

logger = logging.getLogger(__name__)

SCALE_FRAMES = 512  # frames (evenly spaced) over which the latent scaling factor is measured


@dataclass(frozen=True)
class AutoencoderConfig:
    """steps of AdamW at ``lr`` (cosine decay to 10 %), ``batch_size`` frames per step, KL weight, whether
the decoder sees posterior draws (True) or the mean (False), ``crop`` (h, w): train on random crops of
that size (one offset per batch; the networks are convolutional, so a crop costs its share of the pixels
and the trained VAE still runs at full size), seed."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-4
    sample_posterior: bool = False
    crop: tuple[int, int] | None = None
    seed: int = 0
    log_every: int = 50


@dataclass
class AutoencoderResult:
    """losses: per-step total loss; l1: per-step reconstruction L1 (pixels in [-1, 1]); scaling_factor; seconds."""

    losses: list[float] = field(default_factory=list)
    l1: list[float] = field(default_factory=list)
    scaling_factor: float = 1.0
    seconds: float = 0.0


def train_autoencoder(vae: nn.Module, frames: torch.Tensor, config: AutoencoderConfig = AutoencoderConfig()) -> AutoencoderResult:
    """Train ``vae`` in place on ``frames`` (N, 3, H, W) float32 in [-1, 1]; set its scaling_factor.

    Batches are drawn uniformly with replacement from a generator seeded by ``config.seed``.
    Returns the loss history and the scaling factor. The VAE is left in eval mode.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise DreamPoseError(f"frames must be (N, 3, H, W) in [-1, 1], got {tuple(frames.shape)}")
    if config.steps < 1 or config.batch_size < 1:
        raise DreamPoseError("autoencoder training needs steps >= 1 and batch_size >= 1")
    if config.crop is not None and not (0 < config.crop[0] <= frames.shape[2] and 0 < config.crop[1] <= frames.shape[3]):
        raise DreamPoseError(f"crop {config.crop} does not fit frames of {tuple(frames.shape[2:])}")
    gen = torch.Generator().manual_seed(config.seed)
    params = [p for p in vae.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / config.steps)).item())
    )
    result = AutoencoderResult()
    t0 = time.perf_counter()
    vae.train()
    for step in range(1, config.steps + 1):
        idx = torch.randint(0, frames.shape[0], (config.batch_size,), generator=gen)
        x = frames[idx]
        if config.crop is not None:
            ch, cw = config.crop
            top = int(torch.randint(0, x.shape[2] - ch + 1, (1,), generator=gen))
            left = int(torch.randint(0, x.shape[3] - cw + 1, (1,), generator=gen))
            x = x[:, :, top : top + ch, left : left + cw]
        dist = vae.encode(x).latent_dist
        if config.sample_posterior:
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
            kl = 0.5 * (dist.mean.square() + dist.var - 1.0 - dist.logvar).mean()
        else:
            z = dist.mean
            kl = 0.5 * dist.mean.square().mean()
        rec = vae.decode(z, return_dict=False)[0]
        l1 = F.l1_loss(rec, x)
        loss = l1 + config.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        result.losses.append(loss.item())
        result.l1.append(l1.item())
        if step % config.log_every == 0 or step == config.steps:
            window = result.l1[-config.log_every:]
            logger.info("autoencoder step %d/%d: L1 %.4f (%.1f s)", step, config.steps, sum(window) / len(window),
                        time.perf_counter() - t0)
    vae.eval()
    vae.requires_grad_(False)
    result.scaling_factor = latent_scaling_factor(vae, frames[:: max(1, frames.shape[0] // SCALE_FRAMES)])
    vae.register_to_config(scaling_factor=result.scaling_factor)
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def latent_scaling_factor(vae: nn.Module, frames: torch.Tensor, batch: int = 64) -> float:
    """1 / std of the posterior means of ``frames`` (N, 3, H, W): scaled latents then have unit variance."""
    means = torch.cat([vae.encode(frames[i : i + batch]).latent_dist.mean for i in range(0, frames.shape[0], batch)])
    return float(1.0 / means.float().std().clamp_min(1e-6))
