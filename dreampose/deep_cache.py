"""Deep-feature caching (DeepCache, Ma et al., arXiv 2312.00858) over diffusers' UNet2DConditionModel.

Between adjacent denoising steps the UNet's deep features change little. A *full* call runs the whole
UNet and keeps the input of its last up block (the output of ``up_blocks[-2]``, at the first level's
resolution); a *shallow* call runs only ``conv_in``, the first down block, the last up block on the kept
feature (with the first level's fresh skip connections) and the output layers::

    full:     conv_in -> down[0] -> down[1:] -> mid -> up[:-1] -> | keep | -> up[-1] -> conv_out
    shallow:  conv_in -> down[0] ----------------------------------> kept -> up[-1] -> conv_out

:func:`unet_forward` is the one implementation of both (a full call computes exactly what
``unet(...)`` does: the tests hold it to equality); :func:`supports` says whether a UNet has the block
structure it relies on (diffusers' SD 1.x layout, with no class or added embeddings), and why not.

The kept feature is per sample of the UNet batch; :class:`DeepFeatures` holds it for the three guidance
branches of F frames (3F rows, branch-major as in dreampose.guidance), so that a call on the
image-and-pose branch alone (F rows) reads and writes rows [F, 2F).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .guidance import BRANCH_IMAGE_POSE, NUM_BRANCHES

#: the UNet attributes this module uses, by name (a diffusers update that renames one shows up in supports())
_REQUIRED = ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block", "up_blocks", "conv_out",
             "get_time_embed")


def supports(unet: nn.Module) -> str | None:
    """None if :func:`unet_forward` can run ``unet``, else why not (one line)."""
    missing = [name for name in _REQUIRED if not hasattr(unet, name)]
    if missing:
        return f"the UNet has no {', '.join(missing)} (not diffusers' UNet2DConditionModel layout)"
    c = unet.config
    for key, neutral in (("class_embed_type", None), ("addition_embed_type", None), ("time_embedding_act_fn", None),
                         ("encoder_hid_dim_type", None), ("center_input_sample", False),
                         ("num_class_embeds", None)):
        if getattr(c, key, neutral) != neutral:
            return f"deep-feature caching does not support a UNet with {key}={getattr(c, key)!r}"
    if len(unet.down_blocks) < 2 or len(unet.up_blocks) != len(unet.down_blocks):
        return f"the UNet has {len(unet.down_blocks)} down and {len(unet.up_blocks)} up blocks (need >= 2, equal)"
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    if len(last.resnets) != len(first.resnets) + 1:
        return (f"the last up block has {len(last.resnets)} resnets, the first down block {len(first.resnets)}: "
                "its skips would not come from the first level alone")
    return None


@dataclass
class DeepFeatures:
    """The kept deep feature of the last full call for the UNet batches of F frames: ``buffer`` (3F, C, h, w)
    in the UNet's dtype (the input of the last up block), allocated by the first full call. Rows are
    branch-major (dreampose.guidance): a call of 3F samples uses all of them, a call of F samples (the
    image-and-pose branch alone) rows [F, 2F)."""

    frames: int
    buffer: torch.Tensor | None = None

    def rows(self, batch: int) -> slice:
        """The rows a call of ``batch`` samples reads and writes."""
        f = self.frames
        if batch == NUM_BRANCHES * f:
            return slice(None)
        if batch == f:
            return slice(BRANCH_IMAGE_POSE * f, (BRANCH_IMAGE_POSE + 1) * f)
        raise ValueError(f"a UNet call of {batch} samples is neither 3F nor F for F = {f} frames")


def _down(block: nn.Module, sample: torch.Tensor, emb: torch.Tensor, ehs: torch.Tensor):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs)
    return block(hidden_states=sample, temb=emb)


def _up(block: nn.Module, sample: torch.Tensor, emb: torch.Tensor, res: tuple, ehs: torch.Tensor,
        upsample_size) -> torch.Tensor:
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=ehs,
                     upsample_size=upsample_size)
    return block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)


def unet_forward(
    unet: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor | int | float,
    encoder_hidden_states: torch.Tensor,
    features: DeepFeatures | None = None,
    full: bool = True,
) -> torch.Tensor:
    """One UNet call, full or shallow. sample (B, C_in, h, w), timestep scalar or (B,), encoder_hidden_states
    (B, N, D) -> noise prediction (B, C_out, h, w).

    ``full``: run every block, and keep the input of the last up block in ``features`` (when given; B rows,
    or rows [F, 2F) of its 3F). Not ``full``: run the outermost blocks on the feature kept in ``features``.
    """
    if full:
        eps, deep = unet_full(unet, sample, timestep, encoder_hidden_states)
        if features is not None:
            keep(features, deep)
        return eps
    if features is None or features.buffer is None:
        raise ValueError("a shallow UNet call needs the deep features of an earlier full call")
    return unet_shallow(unet, sample, timestep, encoder_hidden_states, features.buffer[features.rows(sample.shape[0])])


def unet_full(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor | int | float,
              encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole UNet: (noise prediction (B, C_out, h, w), the input of its last up block (B, C_0, h, w)).
    The same operations, in the same order, as UNet2DConditionModel.forward for an SD 1.x UNet."""
    emb, sample, res_samples = _stem(unet, sample, timestep)
    up_factor = 2 ** unet.num_upsamplers
    forward_upsample_size = any(dim % up_factor != 0 for dim in sample.shape[-2:])
    upsample_size = None
    for block in unet.down_blocks:
        sample, res = _down(block, sample, emb, encoder_hidden_states)
        res_samples += res
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample = unet.mid_block(sample, emb)
    deep = sample
    for i, block in enumerate(unet.up_blocks):
        res = res_samples[-len(block.resnets):]
        res_samples = res_samples[: -len(block.resnets)]
        if i < len(unet.up_blocks) - 1 and forward_upsample_size:
            upsample_size = res_samples[-1].shape[2:]
        deep = sample
        sample = _up(block, sample, emb, res, encoder_hidden_states, upsample_size)
    return _head(unet, sample), deep


def unet_shallow(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor | int | float,
                 encoder_hidden_states: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
    """The outermost blocks on a kept deep feature (B, C_0, h, w) -> noise prediction (B, C_out, h, w)."""
    emb, sample, res_samples = _stem(unet, sample, timestep)
    last = unet.up_blocks[-1]
    _, res = _down(unet.down_blocks[0], sample, emb, encoder_hidden_states)
    skips = (res_samples + res)[: len(last.resnets)]  # conv_in's output and the first level's resnets
    return _head(unet, _up(last, deep, emb, skips, encoder_hidden_states, None))


def _stem(unet: nn.Module, sample: torch.Tensor, timestep) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """The time embedding and conv_in: (emb, conv_in's output, the skip list starting with it)."""
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    sample = unet.conv_in(sample)
    return emb, sample, (sample,)


def _head(unet: nn.Module, sample: torch.Tensor) -> torch.Tensor:
    if unet.conv_norm_out is not None:
        sample = unet.conv_norm_out(sample)
        sample = unet.conv_act(sample)
    return unet.conv_out(sample)


def keep(features: DeepFeatures, deep: torch.Tensor) -> None:
    """Store a full call's deep feature (3F rows, or the image-and-pose branch's F)."""
    rows = features.rows(deep.shape[0])
    shape = (NUM_BRANCHES * features.frames, *deep.shape[1:])
    b = features.buffer
    if b is None or tuple(b.shape) != shape or b.dtype != deep.dtype or b.device != deep.device:
        features.buffer = torch.empty(shape, dtype=deep.dtype, device=deep.device)
    features.buffer[rows].copy_(deep)


__all__ = ["DeepFeatures", "keep", "supports", "unet_forward", "unet_full", "unet_shallow"]
