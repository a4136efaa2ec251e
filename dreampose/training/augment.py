"""Stage 2's augmentation: ONE random geometric transform applied to image, pose and target together.

The release cropped the pose but not the target, so the model learnt misaligned pairs; here the same
affine map (a zoom = crop, and a small shift) resamples all three. Images are resampled bilinearly with
border padding; poses with nearest neighbour (U, V values stay exact) and zero padding (background).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .config import AugmentConfig


def random_affine(rng: np.random.Generator, config: AugmentConfig) -> torch.Tensor:
    """One transform as a (2, 3) float32 matrix for ``F.affine_grid`` (output -> input normalised coords).

    A zoom by s in [min_scale, max_scale] about a centre shifted by up to (1 - 1/s) (the crop stays
    inside the image) plus max_shift of the image size (small shifts that may leave the frame).
    """
    s = float(rng.uniform(config.min_scale, config.max_scale))
    reach = (1.0 - 1.0 / s) + 2.0 * config.max_shift  # normalised coordinates span 2
    tx, ty = (float(v) for v in rng.uniform(-reach, reach, 2))
    return torch.tensor([[1.0 / s, 0.0, tx], [0.0, 1.0 / s, ty]], dtype=torch.float32)


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear", padding: str = "border") -> torch.Tensor:
    """Resample x (B, C, H, W) by theta (B, 2, 3) (or (2, 3) for all) -> (B, C, H, W)."""
    theta = theta.to(device=x.device, dtype=torch.float32)
    if theta.ndim == 2:
        theta = theta.expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode=mode, padding_mode=padding, align_corners=False).to(x.dtype)


def transform_together(
    image: torch.Tensor, poses: torch.Tensor, target: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply the same transforms to a batch of triplets.

    Args:
        image, target: (B, 3, H, W) in [-1, 1]. poses: (B, n, 2, H, W) in [0, 1] (at the image size).
        theta: (B, 2, 3) one transform per sample (from random_affine).

    Returns the transformed (image, poses, target), same shapes.
    """
    b, n = poses.shape[:2]
    image = warp(image, theta)
    target = warp(target, theta)
    pose_theta = theta.repeat_interleave(n, dim=0)
    poses = warp(poses.flatten(0, 1), pose_theta, mode="nearest", padding="zeros").view_as(poses)
    return image, poses, target
