"""Dual classifier-free guidance: the branch layout of the UNet batch and the combine formula.

One UNet call evaluates three branches for each of F frames, batched BRANCH-MAJOR (3F samples)::

    rows [0F, 1F)  branch 0  null image, null pose   -> e(0,0)
    rows [1F, 2F)  branch 1  image,      pose        -> e(I,P)
    rows [2F, 3F)  branch 2  image,      null pose   -> e(I,0)

    eps = e(0,0) + s_I * (e(I,0) - e(0,0)) + s_p * (e(I,P) - e(I,0))

Guidance caching (fewer UNet evaluations): a *refresh* step evaluates all three branches and keeps the
two guidance differences of every frame,

    d_I = e(I,0) - e(0,0)        d_P = e(I,P) - e(I,0)          (guidance_differences)

and a *cached* step evaluates only the image-and-pose branch (F samples instead of 3F) and reuses them:

    eps = e(I,P) + (s_I - 1) * d_I + (s_p - 1) * d_P             (combine_cached)

which is the formula above rewritten (e(0,0) = e(I,P) - d_P - d_I); refresh steps combine with the
formula above itself, so a run that refreshes every step is the exact run. Which steps refresh is a
:class:`dreampose.settings.GuidanceCache` policy. The cache is one fp32 buffer ``(2, F, C, h, w)``:
``[0]`` = d_I, ``[1]`` = d_P.

This module is the single definition of the layout and of both formulas; the fused kernels (C++, Triton)
and the exported graphs follow it.
"""

from __future__ import annotations

import torch

NUM_BRANCHES = 3
BRANCH_NULL = 0  # null image, null pose
BRANCH_IMAGE_POSE = 1  # image, pose
BRANCH_IMAGE = 2  # image, null pose


def _per_frame(scale: float | torch.Tensor, n_frames: int, ref: torch.Tensor, name: str) -> torch.Tensor | float:
    if isinstance(scale, torch.Tensor):
        if scale.numel() == 1 and scale.ndim <= 1:
            return scale.to(device=ref.device, dtype=torch.float32).reshape(())
        if scale.shape != (n_frames,):
            raise ValueError(f"{name} must be a float or a tensor of shape ({n_frames},), got {tuple(scale.shape)}")
        return scale.to(device=ref.device, dtype=torch.float32).view(n_frames, *([1] * (ref.ndim - 1)))
    return float(scale)


def combine_guidance(
    model_output: torch.Tensor,
    n_frames: int,
    s_image: float | torch.Tensor,
    s_pose: float | torch.Tensor,
) -> torch.Tensor:
    """Combine the three branches into one noise prediction, computed in fp32.

    Args:
        model_output: (3F, C, h, w) UNet output in branch-major order (see the module docstring).
        n_frames: F.
        s_image, s_pose: guidance scales, a float (or 1-element tensor) for all frames, or a tensor (F,).

    Returns:
        (F, C, h, w) float32 guided noise prediction.
    """
    if model_output.shape[0] != NUM_BRANCHES * n_frames:
        raise ValueError(
            f"model_output has batch {model_output.shape[0]}, expected {NUM_BRANCHES} x {n_frames} frames"
        )
    e = model_output.float().unflatten(0, (NUM_BRANCHES, n_frames))
    e00, e_ip, e_i0 = e[BRANCH_NULL], e[BRANCH_IMAGE_POSE], e[BRANCH_IMAGE]
    s_i = _per_frame(s_image, n_frames, e00, "s_image")
    s_p = _per_frame(s_pose, n_frames, e00, "s_pose")
    return e00 + s_i * (e_i0 - e00) + s_p * (e_ip - e_i0)


def branch_batch(
    latents: torch.Tensor,
    pose_window: torch.Tensor,
    cond: torch.Tensor,
    null_cond: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build the UNet inputs of one guided step for F frames.

    Args:
        latents: (F, C, h, w) current latents.
        pose_window: (F, 2 * n_poses, h, w) pose windows in [-1, 1].
        cond: (1, N, D) or (F, N, D) image conditioning.
        null_cond: (1, N, D) or (F, N, D) null-image conditioning.

    Returns:
        latents (3F, C, h, w), pose (3F, 2 * n_poses, h, w) with zeros for null-pose branches, and
        encoder_hidden_states (3F, N, D), all branch-major.
    """
    f = latents.shape[0]
    null_pose = torch.zeros_like(pose_window)
    x = latents.repeat(NUM_BRANCHES, 1, 1, 1)
    p = torch.cat([null_pose, pose_window, null_pose], dim=0)
    ehs = torch.cat([null_cond.expand(f, -1, -1), cond.expand(f, -1, -1), cond.expand(f, -1, -1)], dim=0)
    return x, p, ehs


def guidance_differences(model_output: torch.Tensor, n_frames: int) -> torch.Tensor:
    """The guidance cache of a refresh step: ``(2, F, C, h, w)`` float32, ``[0]`` = e(I,0) - e(0,0),
    ``[1]`` = e(I,P) - e(I,0), from ``model_output`` (3F, C, h, w) branch-major."""
    if model_output.shape[0] != NUM_BRANCHES * n_frames:
        raise ValueError(
            f"model_output has batch {model_output.shape[0]}, expected {NUM_BRANCHES} x {n_frames} frames"
        )
    e = model_output.float().unflatten(0, (NUM_BRANCHES, n_frames))
    return torch.stack([e[BRANCH_IMAGE] - e[BRANCH_NULL], e[BRANCH_IMAGE_POSE] - e[BRANCH_IMAGE]])


def combine_cached(
    e_image_pose: torch.Tensor,
    cache: torch.Tensor,
    s_image: float | torch.Tensor,
    s_pose: float | torch.Tensor,
) -> torch.Tensor:
    """The guided noise prediction of a cached step, computed in fp32.

    Args:
        e_image_pose: (F, C, h, w) the image-and-pose branch e(I,P), the only one evaluated.
        cache: (2, F, C, h, w) float32 from the last refresh (:func:`guidance_differences`).
        s_image, s_pose: guidance scales, a float (or 1-element tensor) for all frames, or a tensor (F,).

    Returns:
        (F, C, h, w) float32: ``e(I,P) + (s_I - 1) * d_I + (s_p - 1) * d_P``.
    """
    f = e_image_pose.shape[0]
    if tuple(cache.shape) != (2, *e_image_pose.shape):
        raise ValueError(f"cache has shape {tuple(cache.shape)}, expected (2, {', '.join(map(str, e_image_pose.shape))})")
    e = e_image_pose.float()
    s_i = _per_frame(s_image, f, e, "s_image")
    s_p = _per_frame(s_pose, f, e, "s_pose")
    return e + (s_i - 1.0) * cache[0] + (s_p - 1.0) * cache[1]


def image_pose_batch(
    latents: torch.Tensor, pose_window: torch.Tensor, cond: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The UNet inputs of a cached step: the image-and-pose branch alone, (F, ...) each (latents,
    pose window, encoder_hidden_states), as rows [F, 2F) of :func:`branch_batch`."""
    f = latents.shape[0]
    return latents, pose_window, cond.expand(f, -1, -1)
