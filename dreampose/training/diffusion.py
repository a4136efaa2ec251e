"""The denoising objective of DreamPose, shared by stage 1 and the subject finetune.

    target latents z0 = VAE(target) * scaling_factor      (frozen VAE encoder)
    conditioning      = adapter(CLIP(image), VAE(image))  (frozen CLIP and VAE; the adapter trains)
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps,   t ~ U{0 .. 999},  eps ~ N(0, I)
    loss = || UNet(concat(z_t, pose window), t, conditioning) - eps ||^2   (DDPM epsilon prediction)

Dropped conditioning is exactly what the pipeline feeds its null branches (dreampose.guidance): the null
image is an all-zero input through CLIP and the VAE, then the adapter (``DreamPoseModel.encode_null_image``),
and the null pose is an all-zero window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import DreamPoseModel
from ..poses import prepare_poses
from ..utils import DreamPoseError


class NoisePredictor(nn.Module):
    """The trained part of DreamPose: the adapter and the 14-channel UNet, as one module (one DDP wrapper).

    forward(noisy (B, 4, h, w), pose_window (B, 2 * n_poses, h, w) in [-1, 1], timesteps (B,),
    clip_tokens (B, N, D), image_latents (B, 4, h, w)) -> predicted noise (B, 4, h, w). Computes what
    ``model.predict_noise(noisy, pose_window, t, model.encode_image(image))`` computes.
    """

    def __init__(self, unet: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.adapter = adapter

    def forward(
        self,
        noisy: torch.Tensor,
        pose_window: torch.Tensor,
        timesteps: torch.Tensor,
        clip_tokens: torch.Tensor,
        image_latents: torch.Tensor,
    ) -> torch.Tensor:
        dt = self.adapter.linear1.weight.dtype
        ehs = self.adapter(clip_tokens.to(dt), image_latents.to(dt))
        x = torch.cat([noisy, pose_window.to(noisy.dtype)], dim=1)
        return self.unet(x, timesteps, encoder_hidden_states=ehs, return_dict=False)[0]


def noise_schedule(model: DreamPoseModel):
    """The DDPM training schedule of the model's scheduler config (SD 1.x: scaled_linear 0.00085..0.012, 1000 steps)."""
    from diffusers import DDPMScheduler

    cfg = model.scheduler_config
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise DreamPoseError(f"training predicts epsilon; the model's scheduler says {cfg.get('prediction_type')!r}")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    return DDPMScheduler(**{k: cfg[k] for k in keys if k in cfg and cfg[k] is not None}, prediction_type="epsilon")


class FrozenEncoders:
    """The frozen half of the conditioning (CLIP, the VAE encoder) and the pose preprocessing, no grad.

    All outputs are float32; the networks may run in a lower precision (their own dtype).
    """

    def __init__(self, model: DreamPoseModel) -> None:
        self.model = model
        self._null: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def null_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP tokens (1, N, D) and latents (1, 4, h, w) of the null image, as encode_null_image computes them."""
        if self._null is None:
            clip, lat = self.model.null_image_inputs(1)
            self._null = (clip.float(), lat.float())
        return self._null

    @torch.no_grad()
    def image_inputs(self, pixels: torch.Tensor, drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Subject pixels (B, 3, H, W) in [-1, 1] -> adapter inputs: CLIP tokens (B, N, D), latents (B, 4, h, w).
        Rows where ``drop`` (B,) bool is True get the null image's inputs."""
        m = self.model
        clip = m.encode_clip(m.clip_preprocess(pixels)).float()
        lat = m.encode_latents(pixels).float()
        if drop is not None and bool(drop.any()):
            null_clip, null_lat = self.null_inputs()
            d = drop.to(clip.device).view(-1, 1, 1)
            clip = torch.where(d, null_clip, clip)
            lat = torch.where(d.view(-1, 1, 1, 1), null_lat, lat)
        return clip, lat

    @torch.no_grad()
    def target_latents(self, pixels: torch.Tensor, generator: torch.Generator, sample: bool = True) -> torch.Tensor:
        """Target pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, h, w): a posterior draw or its mean."""
        m = self.model
        dist = m.vae.encode(pixels.to(next(m.vae.parameters()).dtype)).latent_dist
        z = dist.mean.float()
        if sample:
            z = z + dist.std.float() * torch.randn(z.shape, generator=generator, device=z.device)
        return z * m.scaling_factor

    @torch.no_grad()
    def pose_window(self, poses: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Poses (B, n, 2, H', W') in [0, 1] -> the UNet's pose window (B, 2n, h, w) in [-1, 1], as the
        pipeline prepares it (bilinear to the image size, nearest to the latent size). Rows where ``drop``
        is True are zero (the null pose)."""
        m, c = self.model, self.model.config
        b, n = poses.shape[:2]
        if n != c.n_poses or poses.shape[2] != c.pose_channels:
            raise DreamPoseError(f"poses must be (B, {c.n_poses}, {c.pose_channels}, H, W), got {tuple(poses.shape)}")
        x = prepare_poses(poses.flatten(0, 1), (c.height, c.width), m.latent_size, m.device)
        x = x.view(b, n * c.pose_channels, *m.latent_size)
        if drop is not None:
            x = x.masked_fill(drop.to(x.device).view(-1, 1, 1, 1), 0.0)
        return x


def diffusion_loss(
    predictor: nn.Module,
    encoders: FrozenEncoders,
    schedule,
    image: torch.Tensor,
    target: torch.Tensor,
    poses: torch.Tensor,
    generator: torch.Generator,
    drop_image: torch.Tensor | None = None,
    drop_pose: torch.Tensor | None = None,
    sample_latents: bool = True,
) -> torch.Tensor:
    """The epsilon-MSE loss of one batch (a scalar, mean over the batch).

    Args:
        predictor: a NoisePredictor (possibly DDP-wrapped).
        image, target: (B, 3, H, W) in [-1, 1]. poses: (B, n_poses, 2, H, W) in [0, 1].
        generator: source of the target-latent draw, the noise and the timesteps.
        drop_image, drop_pose: (B,) bool per-sample dropout (None: none).
    """
    dev = encoders.model.device
    image, target, poses = image.to(dev), target.to(dev), poses.to(dev)
    clip, lat = encoders.image_inputs(image, drop_image)
    window = encoders.pose_window(poses, drop_pose)
    z0 = encoders.target_latents(target, generator, sample=sample_latents)
    noise = torch.randn(z0.shape, generator=generator, device=dev)
    t = torch.randint(0, schedule.config.num_train_timesteps, (z0.shape[0],), generator=generator, device=dev)
    noisy = schedule.add_noise(z0, noise, t)
    eps = predictor(noisy, window, t, clip, lat)
    return F.mse_loss(eps.float(), noise)
