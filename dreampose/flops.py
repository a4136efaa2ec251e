"""FLOPs of DreamPose's networks and of a render's UNet calls, counted, not estimated.

:func:`count_flops` runs a function under torch's FlopCounterMode (2 FLOPs per multiply-add: matmuls,
convolutions, attention); the networks run on a meta copy of the model (:func:`meta_copy`), so that even
the SD 1.5-size model costs no memory and no time. :func:`unet_work` is what a render's sampling
settings cost per frame in UNet work: sample-evaluations and FLOPs, and their fraction of the exact run
(the paper's: 101 calls x 3 branches = 303 full sample-evaluations per frame at 100 PNDM steps).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable

import torch
from torch import nn

from .settings import QUALITY_PRESETS, SamplingSettings


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers live on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        m = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
    return copy.deepcopy(module, memo)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (2 per multiply-add: matmuls, convolutions, attention) of ``fn()``, run under FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def dreampose_flops(model) -> dict[str, int]:
    """FLOPs of a DreamPose model's networks at its resolution, counted on a meta copy.

    Returns:
        ``unet_per_sample``: one UNet sample (latents (1, 4, h, w) + pose window; a frame costs 3 samples
        per call), ``vae_decode_per_frame`` and ``encode_per_subject`` (image + null-image conditioning).
    """
    meta = meta_copy(model)
    c = model.config
    h, w = model.latent_size
    tokens, dim = model.adapter.config.clip_tokens, model.adapter.config.clip_dim
    dev = torch.device("meta")
    n = 3  # the batch the UNet really sees at one frame; FLOPs are linear in the batch
    x = torch.empty(n, model.latent_channels, h, w, device=dev)
    pose = torch.empty(n, c.pose_window_channels, h, w, device=dev)
    ehs = torch.empty(n, tokens, dim, device=dev)
    t = torch.tensor(500, device=dev)
    unet = count_flops(lambda: meta.predict_noise(x, pose, t, ehs)) // n
    decode = count_flops(lambda: meta.decode(torch.empty(1, model.latent_channels, h, w, device=dev)))
    pixels = torch.empty(1, 3, c.height, c.width, device=dev)
    encode = count_flops(lambda: (meta.encode_image(pixels), meta.encode_null_image(1)))
    return {"unet_per_sample": unet, "vae_decode_per_frame": decode, "encode_per_subject": encode}




def unet_flops_per_sample(model) -> dict[str, int]:
    """FLOPs of one UNet sample at the model's resolution: ``full`` (the whole UNet) and ``shallow`` (the
    outermost blocks of deep-feature caching, dreampose.deep_cache), counted on a meta copy."""
    from .deep_cache import DeepFeatures, supports, unet_forward

    meta = meta_copy(model)
    c = model.config
    h, w = model.latent_size
    dev = torch.device("meta")
    n = 3  # one frame's three branches; FLOPs are linear in the batch
    x = torch.empty(n, model.latent_channels + c.pose_window_channels, h, w, device=dev)
    ehs = torch.empty(n, model.adapter.config.clip_tokens, model.adapter.config.clip_dim, device=dev)
    t = torch.tensor(500, device=dev)
    out = {"full": count_flops(lambda: meta.unet(x, t, encoder_hidden_states=ehs, return_dict=False)) // n}
    if supports(meta.unet) is None:
        features = DeepFeatures(frames=1)
        unet_forward(meta.unet, x, t, ehs, features, full=True)
        out["shallow"] = count_flops(lambda: unet_forward(meta.unet, x, t, ehs, features, full=False)) // n
    return out


def num_unet_calls(model, settings: SamplingSettings) -> int:
    """UNet calls of one run of ``settings`` with the model's scheduler config (PNDM 100 steps: 101)."""
    from .diffusers_schedulers import make_diffusers_scheduler

    sched = make_diffusers_scheduler(settings.scheduler, model.scheduler_config)
    sched.set_timesteps(settings.steps)
    return len(sched.timesteps)


def unet_work(model, settings: SamplingSettings, per_sample: dict[str, int] | None = None) -> dict[str, Any]:
    """UNet work per frame of a render with ``settings``: calls, sample-evaluations (full and shallow),
    FLOPs, and both as a fraction of the exact run (the "exact" preset of the same model).

    ``per_sample``: :func:`unet_flops_per_sample` of the model (counted here if not given).
    """
    per_sample = per_sample or unet_flops_per_sample(model)

    def count(s: SamplingSettings) -> dict[str, Any]:
        plan = s.call_plan(num_unet_calls(model, s))
        full = sum((3 if refresh else 1) for refresh, is_full in plan if is_full)
        shallow = sum((3 if refresh else 1) for refresh, is_full in plan if not is_full)
        flops = full * per_sample["full"] + shallow * per_sample.get("shallow", per_sample["full"])
        return {"calls": len(plan), "samples": full + shallow, "full_samples": full, "shallow_samples": shallow,
                "flops": flops}

    work = count(settings)
    exact = count(SamplingSettings.for_model(model.config, quality="exact"))
    work["fraction_of_exact"] = {"samples": work["samples"] / exact["samples"], "flops": work["flops"] / exact["flops"]}
    work["exact"] = exact
    return work


__all__ = ["QUALITY_PRESETS", "count_flops", "dreampose_flops", "meta_copy", "num_unet_calls",
           "unet_flops_per_sample", "unet_work"]
