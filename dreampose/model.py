"""The DreamPose model: a 14-channel SD 1.x UNet, the SD VAE, a CLIP vision tower and the split CLIP-VAE adapter.

Shapes at the paper's resolution (H x W = 640 x 512, VAE factor 8): latents (B, 4, 80, 64); pose window
(B, 10, 80, 64); CLIP tokens (B, 50, 768); adapter output = encoder_hidden_states (B, 50, 768).

A model folder (``save_pretrained`` / ``from_pretrained``) is in diffusers layout, weights as safetensors::

    dreampose.json            DreamPoseConfig: resolution, n_poses, guidance and step defaults
    unet/                     UNet2DConditionModel (in_channels = 4 + 2 * n_poses)
    vae/                      AutoencoderKL
    image_encoder/            transformers CLIPVisionModel
    adapter/                  config.json + model.safetensors (SplitCLIPVAEAdapter)
    scheduler/                scheduler_config.json (SD 1.x PNDM by default)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.resources
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .outputs import atomic_dir

if TYPE_CHECKING:  # pragma: no cover
    from .deep_cache import DeepFeatures
from .utils import DreamPoseError, PathLike, dataclass_from_dict, first_line, read_json, write_json

logger = logging.getLogger(__name__)

CONFIG_NAME = "dreampose.json"
ADAPTER_WEIGHTS = "model.safetensors"
SUBFOLDERS = ("unet", "vae", "image_encoder", "adapter", "scheduler")

# CLIP's own pixel normalisation (OpenAI CLIP).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DreamPoseConfig:
    """The model folder's top-level configuration (``dreampose.json``).

    Attributes:
        height, width: image resolution in pixels (the paper: 640 x 512). Must be multiples of the VAE
            factor times 2 (the adapter's max-pool).
        n_poses: frames in the pose window (5: i-2 .. i+2).
        pose_channels: channels per pose frame (2: DensePose U and V).
        s_image, s_pose: default guidance scales (the release's demo: 8 and 3).
        num_inference_steps: default number of denoising steps (the paper: 100 PNDM steps).
    """

    height: int = 640
    width: int = 512
    n_poses: int = 5
    pose_channels: int = 2
    s_image: float = 8.0
    s_pose: float = 3.0
    num_inference_steps: int = 100
    format_version: int = 1

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise DreamPoseError(f"resolution must be positive, got {self.height} x {self.width}")
        if self.n_poses < 1 or self.n_poses % 2 == 0:
            raise DreamPoseError(f"n_poses must be odd and >= 1 (a window centred on the frame), got {self.n_poses}")

    @property
    def pose_window_channels(self) -> int:
        """Channels of the pose window fed to the UNet: n_poses * pose_channels (10)."""
        return self.n_poses * self.pose_channels

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = CONFIG_NAME) -> "DreamPoseConfig":
        return dataclass_from_dict(cls, data, source)


@dataclass(frozen=True)
class AdapterConfig:
    """Sizes of the split CLIP-VAE adapter, derived from the encoders' configs and the resolution.

    Attributes:
        clip_tokens: N, tokens of CLIP's last_hidden_state (50 for ViT-B/32 at 224: 7*7 + 1).
        clip_dim: D, CLIP's hidden size (768), which is also the UNet's cross_attention_dim.
        latent_channels: C, VAE latent channels (4).
        latent_height, latent_width: the latent's size (80 x 64 at 640 x 512).
        pool: max-pool kernel and stride on the latents (2).
    """

    clip_tokens: int
    clip_dim: int
    latent_channels: int
    latent_height: int
    latent_width: int
    pool: int = 2

    @property
    def pooled_features(self) -> int:
        """Features per latent channel after pooling: (h // pool) * (w // pool) (1280 at 80 x 64)."""
        return (self.latent_height // self.pool) * (self.latent_width // self.pool)


# --------------------------------------------------------------------------------------------------
# The split CLIP-VAE adapter
# --------------------------------------------------------------------------------------------------
class SplitCLIPVAEAdapter(nn.Module):
    """Mixes CLIP image tokens with the VAE latents of the same image into the UNet's cross-attention input.

    latents (B, C, h, w) -> MaxPool(pool) -> (B, C, h/p * w/p) -> ``vae2clip`` Linear -> (B, C, D);
    concat with CLIP tokens (B, N, D) -> (B, N + C, D) -> ``linear1`` Linear(N + C, N) along the token axis
    -> (B, N, D). Parameter names match the original release (``linear1.*``, ``vae2clip.*``).

    ``linear1`` starts as the identity over the N CLIP tokens and zero for the C VAE tokens, with zero
    bias, so that a fresh adapter returns the CLIP tokens exactly.
    """

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.pool = nn.MaxPool2d(config.pool)
        self.vae2clip = nn.Linear(config.pooled_features, config.clip_dim)
        self.linear1 = nn.Linear(config.clip_tokens + config.latent_channels, config.clip_tokens)
        self.reset_token_mixer()

    @torch.no_grad()
    def reset_token_mixer(self) -> None:
        """Set ``linear1`` to [identity | 0] with zero bias: the output equals the CLIP tokens."""
        n = self.config.clip_tokens
        self.linear1.weight.zero_()
        self.linear1.weight[:, :n].copy_(torch.eye(n))
        self.linear1.bias.zero_()

    def forward(self, clip_tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """clip_tokens (B, N, D), latents (B, C, h, w) -> encoder_hidden_states (B, N, D)."""
        c = self.config
        if clip_tokens.ndim != 3 or tuple(clip_tokens.shape[1:]) != (c.clip_tokens, c.clip_dim):
            raise ValueError(
                f"adapter: clip_tokens must be (B, {c.clip_tokens}, {c.clip_dim}), got {tuple(clip_tokens.shape)}"
            )
        expected = (c.latent_channels, c.latent_height, c.latent_width)
        if latents.ndim != 4 or tuple(latents.shape[1:]) != expected:
            raise ValueError(f"adapter: latents must be (B, {', '.join(map(str, expected))}), got {tuple(latents.shape)}")
        vae_tokens = self.vae2clip(self.pool(latents).flatten(2))  # (B, C, D)
        tokens = torch.cat([clip_tokens, vae_tokens.to(clip_tokens.dtype)], dim=1)  # (B, N + C, D)
        return self.linear1(tokens.transpose(1, 2)).transpose(1, 2)  # (B, N, D)

    def save_pretrained(self, folder: PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "config.json", dataclasses.asdict(self.config))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / ADAPTER_WEIGHTS))

    @classmethod
    def from_pretrained(cls, folder: PathLike) -> "SplitCLIPVAEAdapter":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = dataclass_from_dict(AdapterConfig, read_json(folder / "config.json"), str(folder / "config.json"))
        adapter = cls(config)
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise DreamPoseError(f"{weights}: adapter weights not found")
        load_state_dict_checked(adapter, load_file(str(weights)), str(weights))
        return adapter


# --------------------------------------------------------------------------------------------------
# The widened UNet
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def widen_conv_in(unet: nn.Module, extra_channels: int) -> nn.Module:
    """Widen ``unet.conv_in`` by ``extra_channels`` zero-initialised input channels, in place.

    The original weights go to ``[:, :in]`` and the original bias is copied (the release forgot the
    bias, and one revision zeroed a latent channel; both were bugs). With all-zero extra channels the
    widened UNet computes exactly what the original did. Returns ``unet``.
    """
    old = unet.conv_in
    new = nn.Conv2d(
        old.in_channels + extra_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    ).to(device=old.weight.device, dtype=old.weight.dtype)
    new.weight.zero_()
    new.weight[:, : old.in_channels].copy_(old.weight)
    if old.bias is not None:
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=old.in_channels + extra_channels)
    return unet


# --------------------------------------------------------------------------------------------------
# Helpers shared by loaders
# --------------------------------------------------------------------------------------------------
def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Raise DreamPoseError naming the first tensor of ``state`` with a NaN or an infinity."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DreamPoseError(f"{source}: tensor {name} holds non-finite values (NaN or infinity); the weights "
                                 "are broken: use another copy of the model")


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                            assign: bool = False) -> None:
    """Load ``state`` into ``module`` strictly; on any mismatch raise an error listing the keys.

    The error names ``source`` and lists missing keys, unexpected keys and shape mismatches (the first
    ten of each, with counts); a tensor with NaN or infinity is an error too. ``assign``: the module's
    parameters become the given tensors (for a module built on the meta device).
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... ({len(keys) - 10} more)" if len(keys) > 10 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        raise DreamPoseError(f"{source}: state dict does not fit {type(module).__name__}: " + "; ".join(parts))
    check_finite(state, source)
    module.load_state_dict(state, strict=True, assign=assign)


def read_safetensors(folder: Path, name: str, what: str) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a network folder: ``<name>`` or the shards listed in ``<name>.index.json``.
    Returns (tensors, the file or index named in errors). Errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = folder / name, folder / f"{name}.index.json"
    if single.is_file():
        files, source = [single], single
    elif index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise DreamPoseError(f"{index}: no weight_map; the {what} weights are incomplete")
        files, source = [folder / f for f in sorted(set(weight_map.values()))], index
    else:
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise DreamPoseError(f"{folder}: {what} weights not found (expected {name}; the folder holds "
                             f"{', '.join(found) or 'nothing'})")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise DreamPoseError(f"{f}: {what} weights file not found (listed in {source})")
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise DreamPoseError(f"{f}: not a readable safetensors file ({first_line(e)}); the file is truncated "
                                 "or not a weights file") from None
    return state, str(source)


def load_network(folder: Path, kind: str) -> nn.Module:
    """One network of a model folder, built from its config.json on the meta device and given the weights
    of its safetensors file, every tensor checked (present, the right shape, finite).

    ``kind``: 'unet' (diffusers UNet2DConditionModel), 'vae' (AutoencoderKL) or 'image_encoder'
    (transformers CLIPVisionModel). Errors (a missing or malformed config, a config field of the wrong
    type, a truncated or incomplete weights file, a tensor that does not fit) are DreamPoseErrors that
    name the file, the field or the tensor.
    """
    from accelerate import init_empty_weights

    what = {"unet": "UNet", "vae": "VAE", "image_encoder": "image encoder"}[kind]
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DreamPoseError(f"{folder}: no config.json (an empty or incomplete {what} folder)")
    config = read_json(config_path)
    try:
        with init_empty_weights(include_buffers=False):
            if kind == "image_encoder":
                from transformers import CLIPVisionConfig, CLIPVisionModel

                clean = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
                net = CLIPVisionModel(CLIPVisionConfig(**clean))
                weights = "model.safetensors"
            else:
                from diffusers import AutoencoderKL, UNet2DConditionModel

                cls = UNet2DConditionModel if kind == "unet" else AutoencoderKL
                net = cls.from_config(_clean_diffusers_config(config))
                weights = "diffusion_pytorch_model.safetensors"
    except Exception as e:  # a config the network cannot be built from: the user's file, whatever the error
        raise DreamPoseError(f"{config_path}: not a valid {what} config ({type(e).__name__}: {first_line(e)})") from None
    state, source = read_safetensors(folder, weights, what)
    load_state_dict_checked(net, state, source, assign=True)
    return net.eval()


def bundled_config(name: str, which: str = "sd15") -> dict:
    """One of the architecture configs kept in the package (``dreampose/configs/<which>/<name>.json``)."""
    path = importlib.resources.files("dreampose") / "configs" / which / f"{name}.json"
    return json.loads(path.read_text())


def _clean_diffusers_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@contextlib.contextmanager
def _no_transformers_progress_bar() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _from_pretrained(cls: Any, folder: Path, what: str) -> nn.Module:
    """``cls.from_pretrained(folder)`` offline (diffusers or transformers: their layouts, .bin or
    safetensors, sharded or not), refusing a network with a missing tensor or non-finite weights, and
    turning the libraries' errors about the folder into a DreamPoseError that names it."""
    try:
        net, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise DreamPoseError(f"{folder}: cannot load the {what} ({type(e).__name__}: {first_line(e)})") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        raise DreamPoseError(f"{folder}: the {what}'s weights are incomplete: {len(missing)} missing tensor(s)"
                             f"{': ' + shown if missing else ''}{f', {len(mismatched)} of the wrong shape' if mismatched else ''}")
    check_finite(net.state_dict(), f"{folder} ({what})")
    return net


def _require_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise DreamPoseError(f"{folder}: {what} not found (is this a DreamPose model folder?)")


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
class DreamPoseModel(nn.Module):
    """All networks of DreamPose plus the configs that tie them together.

    Args:
        unet: diffusers UNet2DConditionModel with in_channels = latent_channels + pose window channels.
        vae: diffusers AutoencoderKL.
        image_encoder: transformers CLIPVisionModel.
        adapter: SplitCLIPVAEAdapter sized for this resolution.
        scheduler_config: a diffusers scheduler config dict (SD 1.x PNDM by default).
        config: DreamPoseConfig.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        image_encoder: nn.Module,
        adapter: SplitCLIPVAEAdapter,
        scheduler_config: dict,
        config: DreamPoseConfig,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.image_encoder = image_encoder
        self.adapter = adapter
        self.scheduler_config = dict(scheduler_config)
        self.config = config
        self._check_consistency()

    # ---- derived sizes --------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: 2 ** (number of VAE blocks - 1) (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the latents: the resolution divided by the VAE factor."""
        f = self.vae_scale_factor
        return self.config.height // f, self.config.width // f

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def clip_image_size(self) -> int:
        return int(self.image_encoder.config.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @staticmethod
    def adapter_config_for(vae_config: Any, clip_config: Any, height: int, width: int) -> AdapterConfig:
        """Derive the adapter's sizes from the encoders' configs and the resolution."""
        factor = 2 ** (len(vae_config.block_out_channels) - 1)
        patches = (clip_config.image_size // clip_config.patch_size) ** 2
        return AdapterConfig(
            clip_tokens=patches + 1,
            clip_dim=clip_config.hidden_size,
            latent_channels=vae_config.latent_channels,
            latent_height=height // factor,
            latent_width=width // factor,
        )

    def _check_consistency(self) -> None:
        c = self.config
        f = self.vae_scale_factor
        if c.height % (2 * f) or c.width % (2 * f):
            raise DreamPoseError(
                f"resolution {c.height} x {c.width} must be a multiple of {2 * f} (VAE factor {f} x adapter pool 2)"
            )
        want_in = self.latent_channels + c.pose_window_channels
        if self.unet.config.in_channels != want_in:
            raise DreamPoseError(
                f"unet has in_channels={self.unet.config.in_channels}, expected {want_in} "
                f"({self.latent_channels} latent + {c.n_poses} poses x {c.pose_channels})"
            )
        want_adapter = self.adapter_config_for(self.vae.config, self.image_encoder.config, c.height, c.width)
        if self.adapter.config != want_adapter:
            raise DreamPoseError(f"adapter config {self.adapter.config} does not match the model: expected {want_adapter}")
        if self.unet.config.cross_attention_dim != self.adapter.config.clip_dim:
            raise DreamPoseError(
                f"unet cross_attention_dim={self.unet.config.cross_attention_dim} but the image encoder gives "
                f"{self.adapter.config.clip_dim}-dim tokens"
            )

    # ---- conditioning ---------------------------------------------------------------------------
    def clip_preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> CLIP input (B, 3, S, S), S = CLIP image size.

        CLIP's own convention: resize the shorter side to S (bicubic, antialiased), centre crop to S x S,
        normalise with CLIP's mean and std.
        """
        x = (pixels.float() + 1.0) / 2.0
        s = self.clip_image_size
        h, w = x.shape[-2:]
        scale = s / min(h, w)
        nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[..., top : top + s, left : left + s]
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode_clip(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        """CLIP input (B, 3, S, S) -> last_hidden_state tokens (B, N, D)."""
        enc_dtype = next(self.image_encoder.parameters()).dtype
        return self.image_encoder(pixel_values=clip_pixels.to(enc_dtype)).last_hidden_state

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> scaled VAE latents (B, C, h, w), by the distribution's MEAN.

        The release sampled the posterior here, which made conditioning random; the mean is deterministic.
        """
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.encode(pixels.to(vae_dtype)).latent_dist.mean * self.scaling_factor

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Subject image (B, 3, H, W) in [-1, 1] -> encoder_hidden_states (B, N, D)."""
        self._check_pixels(pixels)
        clip_tokens = self.encode_clip(self.clip_preprocess(pixels))
        latents = self.encode_latents(pixels)
        return self.adapter(clip_tokens.to(self.adapter.linear1.weight.dtype), latents.to(self.adapter.linear1.weight.dtype))

    def null_image_inputs(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's inputs for the null image: an all-zero input through CLIP and through the VAE.

        Returns CLIP tokens (B, N, D) and scaled latents (B, C, h, w). The one definition of the null image:
        inference (:meth:`encode_null_image`) and training's conditioning dropout both use it.
        """
        c = self.config
        s = self.clip_image_size
        dev = self.device
        clip_tokens = self.encode_clip(torch.zeros(batch, 3, s, s, device=dev))
        latents = self.encode_latents(torch.zeros(batch, 3, c.height, c.width, device=dev))
        return clip_tokens, latents

    def encode_null_image(self, batch: int = 1) -> torch.Tensor:
        """The null-image conditioning (B, N, D): :meth:`null_image_inputs` through the adapter."""
        clip_tokens, latents = self.null_image_inputs(batch)
        dt = self.adapter.linear1.weight.dtype
        return self.adapter(clip_tokens.to(dt), latents.to(dt))

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        c = self.config
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != (c.height, c.width):
            raise DreamPoseError(f"image must be (B, 3, {c.height}, {c.width}) in [-1, 1], got {tuple(pixels.shape)}")

    # ---- denoising network ----------------------------------------------------------------------
    def predict_noise(
        self,
        latents: torch.Tensor,
        pose_window: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        channels_last: bool = False,
        features: "DeepFeatures | None" = None,
        full: bool = True,
    ) -> torch.Tensor:
        """One UNet call. latents (B, 4, h, w), pose_window (B, 2 * n_poses, h, w) in [-1, 1] (zeros = null
        pose), timestep scalar or (B,), encoder_hidden_states (B, N, D) -> predicted noise (B, 4, h, w).
        ``channels_last``: give the UNet its input in channels_last memory format (for a UNet whose weights
        are channels_last; the output then is channels_last too). ``features``: deep-feature caching
        (dreampose.deep_cache): a ``full`` call keeps its deep feature there, a shallow one (``full``
        False) runs only the outermost blocks on it; None: the plain UNet."""
        x = self.unet_input(latents, pose_window, channels_last)
        if features is None:
            return self.unet(x, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        from .deep_cache import unet_forward

        return unet_forward(self.unet, x, timestep, encoder_hidden_states, features, full)

    @staticmethod
    def unet_input(latents: torch.Tensor, pose_window: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """latents (B, 4, h, w) + pose window (B, 2 * n_poses, h, w) -> the UNet's input (B, 4 + 2 * n_poses,
        h, w) in the latents' dtype; channels_last memory format if asked."""
        x = torch.cat([latents, pose_window.to(latents.dtype)], dim=1)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, H, W) in [-1, 1] (not clamped)."""
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(latents.to(vae_dtype) / self.scaling_factor, return_dict=False)[0]

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_configs(
        cls,
        unet_config: dict,
        vae_config: dict,
        clip_config: dict,
        scheduler_config: dict,
        config: DreamPoseConfig,
        seed: int | None = 0,
        widen: bool = True,
    ) -> "DreamPoseModel":
        """A randomly initialised DreamPose from architecture configs (deterministic for a given seed).

        ``unet_config`` is an SD 1.x config (in_channels 4) when ``widen`` is True: conv_in is then widened
        exactly as from a pretrained SD UNet, so the zero-init property holds here too.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPVisionConfig, CLIPVisionModel

        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            unet = UNet2DConditionModel.from_config(_clean_diffusers_config(unet_config))
            if widen:
                widen_conv_in(unet, config.pose_window_channels)
            vae = AutoencoderKL.from_config(_clean_diffusers_config(vae_config))
            clip_cfg = CLIPVisionConfig(**{k: v for k, v in clip_config.items() if k not in ("architectures", "model_type")})
            image_encoder = CLIPVisionModel(clip_cfg)
            adapter = SplitCLIPVAEAdapter(cls.adapter_config_for(vae.config, clip_cfg, config.height, config.width))
        model = cls(unet, vae, image_encoder, adapter, scheduler_config, config)
        return model.eval()

    @classmethod
    def tiny(cls, seed: int = 0, height: int = 64, width: int = 48, **config_overrides: Any) -> "DreamPoseModel":
        """A tiny random DreamPose for tests and the CPU demo (about 1 M parameters, deterministic by seed).

        UNet: blocks (32, 64), one layer each, cross-attention dim 32. VAE: 3 blocks (factor 4),
        latents 4 x h/4 x w/4. CLIP: 2 layers, hidden 32, 32 px images in 8 px patches (17 tokens).
        """
        unet_config = dict(
            sample_size=max(height, width) // 4,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae_config = dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=max(height, width),
            scaling_factor=0.18215,
        )
        clip_config = dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
            num_channels=3,
            hidden_act="quick_gelu",
            projection_dim=32,
        )
        config = DreamPoseConfig(height=height, width=width, **config_overrides)
        return cls.from_configs(unet_config, vae_config, clip_config, bundled_config("scheduler_config"), config, seed)

    @classmethod
    def sd15_random(cls, seed: int = 0, height: int = 640, width: int = 512, **config_overrides: Any) -> "DreamPoseModel":
        """SD 1.5-size networks (UNet 859 M, VAE 84 M, CLIP ViT-B/32 88 M parameters) with random weights.

        Same shapes and FLOPs as the real model: what timing and export need. Built from the configs in
        ``dreampose/configs/sd15``.
        """
        config = DreamPoseConfig(height=height, width=width, **config_overrides)
        return cls.from_configs(
            bundled_config("unet_config"),
            bundled_config("vae_config"),
            bundled_config("image_encoder_config"),
            bundled_config("scheduler_config"),
            config,
            seed,
        )

    @classmethod
    def from_stable_diffusion(
        cls,
        sd_dir: PathLike,
        clip_dir: PathLike,
        height: int = 640,
        width: int = 512,
        **config_overrides: Any,
    ) -> "DreamPoseModel":
        """A fresh DreamPose from a local SD 1.x diffusers folder and a local CLIP vision folder, offline.

        ``sd_dir`` holds unet/, vae/ and scheduler/ (text_encoder/ and tokenizer/ are ignored);
        ``clip_dir`` is a transformers CLIP or CLIPVision folder (e.g. openai/clip-vit-base-patch32).
        The UNet's conv_in is widened to 14 channels with zero pose weights; the adapter starts at identity.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPVisionModel

        sd_dir, clip_dir = Path(sd_dir), Path(clip_dir)
        for sub in ("unet", "vae"):
            _require_folder(sd_dir / sub, f"Stable Diffusion {sub}/ folder")
        _require_folder(clip_dir, "CLIP folder")
        config = DreamPoseConfig(height=height, width=width, **config_overrides)
        unet = _from_pretrained(UNet2DConditionModel, sd_dir / "unet", "Stable Diffusion UNet")
        if unet.config.in_channels != 4:
            raise DreamPoseError(f"{sd_dir / 'unet'}: expected an SD 1.x UNet with 4 input channels, got {unet.config.in_channels}")
        widen_conv_in(unet, config.pose_window_channels)
        vae = _from_pretrained(AutoencoderKL, sd_dir / "vae", "Stable Diffusion VAE")
        image_encoder = _from_pretrained(CLIPVisionModel, clip_dir, "CLIP vision model")
        sched_path = sd_dir / "scheduler" / "scheduler_config.json"
        scheduler_config = read_json(sched_path) if sched_path.is_file() else bundled_config("scheduler_config")
        adapter = SplitCLIPVAEAdapter(cls.adapter_config_for(vae.config, image_encoder.config, height, width))
        return cls(unet, vae, image_encoder, adapter, scheduler_config, config).eval()

    # ---- persistence --------------------------------------------------------------------------
    def save_pretrained(self, folder: PathLike, command: str = "save_pretrained") -> None:
        """Write the model folder atomically (a reader sees the old folder or the complete new one).

        ``folder`` must not exist, be empty, or be an earlier output of ``command`` (the name recorded in
        its marker, see dreampose.outputs): anything else is refused, never replaced."""
        folder = Path(folder)
        with atomic_dir(folder, command) as tmp:
            write_json(tmp / CONFIG_NAME, self.config.to_dict())
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            with _no_transformers_progress_bar():  # its "Writing model shards" bar for one small file
                self.image_encoder.save_pretrained(tmp / "image_encoder", safe_serialization=True)
            self.adapter.save_pretrained(tmp / "adapter")
            write_json(tmp / "scheduler" / "scheduler_config.json", self.scheduler_config)
        logger.info("saved DreamPose model to %s", folder)

    @classmethod
    def from_pretrained(
        cls,
        folder: PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "DreamPoseModel":
        """Load a model folder written by ``save_pretrained`` (or by ``import_release``), offline.

        Every network is built from its config and given its weights checked tensor by tensor (see
        :func:`load_network`): a folder with a missing, truncated, misshapen or non-finite tensor, or a
        config that does not fit its weights, is refused with a DreamPoseError naming the file and tensor.
        """
        folder = Path(folder)
        if not isinstance(folder, Path) or not folder.is_dir():
            raise DreamPoseError(f"{folder}: model folder not found")
        if not (folder / CONFIG_NAME).is_file():
            raise DreamPoseError(f"{folder}: not a DreamPose model folder (no {CONFIG_NAME})")
        for sub in SUBFOLDERS:
            _require_folder(folder / sub, f"{sub}/")
        config = DreamPoseConfig.from_dict(read_json(folder / CONFIG_NAME), str(folder / CONFIG_NAME))
        unet = load_network(folder / "unet", "unet")
        vae = load_network(folder / "vae", "vae")
        image_encoder = load_network(folder / "image_encoder", "image_encoder")
        adapter = SplitCLIPVAEAdapter.from_pretrained(folder / "adapter")
        scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
        model = cls(unet, vae, image_encoder, adapter, scheduler_config, config)
        return model.to(device=device, dtype=dtype).eval()

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per network, e.g. {'unet': 859_535_364, ...}."""
        return {
            name: sum(p.numel() for p in getattr(self, name).parameters())
            for name in ("unet", "vae", "image_encoder", "adapter")
        }

    def copy(self) -> "DreamPoseModel":
        return copy.deepcopy(self)


def latent_size_for(height: int, width: int, vae_scale_factor: int = 8) -> tuple[int, int]:
    """(h, w) of the latents for an image of height x width."""
    return math.floor(height / vae_scale_factor), math.floor(width / vae_scale_factor)
