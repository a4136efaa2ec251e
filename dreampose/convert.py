"""Import the original release's checkpoints into a model folder.

The release ships PyTorch state dicts: the modified UNet (diffusers key names, conv_in with 14 input
channels) and the adapter (keys ``linear1.weight/bias``, ``vae2clip.weight/bias``), each possibly carrying
the ``module.`` prefix that DistributedDataParallel adds. The VAE and the CLIP vision tower are the stock
ones (a finetuned VAE-decoder state dict may be given too).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

import torch

from .model import DreamPoseModel, load_state_dict_checked
from .utils import DreamPoseError, PathLike, first_line

logger = logging.getLogger(__name__)


def load_state_dict_file(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from .pth / .pt / .bin (torch.load, weights only) or .safetensors.

    A dict wrapping the weights under 'state_dict' or 'model' is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise DreamPoseError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise DreamPoseError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or non-torch files
        raise DreamPoseError(f"{path}: cannot read as a PyTorch state dict ({type(e).__name__}: {first_line(e)})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DreamPoseError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return obj


def strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key that carries it (DDP's ``module.``)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_release_unet(model: DreamPoseModel, state: dict[str, torch.Tensor], source: str = "unet state dict") -> None:
    """Load the release's UNet state dict into ``model.unet`` (strict; mismatches listed in the error)."""
    load_state_dict_checked(model.unet, strip_prefix(state), source)


def load_release_adapter(
    model: DreamPoseModel, state: dict[str, torch.Tensor], source: str = "adapter state dict"
) -> None:
    """Load the release's adapter state dict (linear1.*, vae2clip.*) into ``model.adapter``."""
    load_state_dict_checked(model.adapter, strip_prefix(state), source)


def load_release_vae_decoder(
    model: DreamPoseModel, state: dict[str, torch.Tensor], source: str = "VAE state dict"
) -> None:
    """Load a finetuned VAE state dict: the whole AutoencoderKL, or only its decoder (keys decoder.* / post_quant_conv.*)."""
    state = strip_prefix(state)
    full = model.vae.state_dict()
    decoder_keys = {k for k in full if k.startswith(("decoder.", "post_quant_conv."))}
    if state and set(state) <= decoder_keys:
        # decoder only: keep the model's encoder; missing decoder keys are still reported below
        state = {**{k: v for k, v in full.items() if k not in decoder_keys}, **state}
    load_state_dict_checked(model.vae, state, source)


StateSource = Union[PathLike, tuple[dict[str, torch.Tensor], str]]


def _state(source: StateSource) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(source, tuple):
        return source
    return load_state_dict_file(source), str(source)


def import_release(
    base: DreamPoseModel,
    unet: StateSource,
    adapter: StateSource,
    out: PathLike,
    vae: StateSource | None = None,
) -> DreamPoseModel:
    """Load the release's .pth checkpoints into ``base`` (a DreamPose built from the same SD and CLIP) and
    save the result as a model folder at ``out``. Returns the loaded model.

    Each checkpoint is a path, or ``(state dict, name for errors)`` when it was read already (the command
    line reads them before the slow SD import, so that a bad file fails first)."""
    load_release_unet(base, *_state(unet))
    load_release_adapter(base, *_state(adapter))
    if vae is not None:
        load_release_vae_decoder(base, *_state(vae))
    base.save_pretrained(out, command="import-release")
    logger.info("imported the release's checkpoints into %s", out)
    return base
