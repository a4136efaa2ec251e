"""One small wrapper per exported network: what goes in, what comes out, which axes move, and how far.

Each wrapper is an ``nn.Module`` around the PyTorch network (so ``torch.onnx.export`` can trace it) plus
the facts an engine builder needs and nothing else:

* ``input_names`` / ``output_names``: the ONNX graph's I/O names, in order;
* ``dynamic_axes``: the axes that may change between calls (batch always; height and width when the
  profile is dynamic);
* ``shape_profile(...)``: min / opt / max shape per input (a TensorRT optimisation profile);
* ``sample_inputs(...)``: deterministic inputs of a given shape for tracing and for checks;
* ``input_dtypes``: the dtype each input takes at a given precision.

The three networks (shapes for the paper's 640 x 512; F = frames per call):

=================  ===============================================  ===========================================
network            inputs                                           outputs
=================  ===============================================  ===========================================
``unet``           latents (3F, 4, 80, 64), pose_window              eps (3F, 4, 80, 64)
                   (3F, 10, 80, 64), timestep (3F,) fp32,
                   encoder_hidden_states (3F, 50, 768)
``vae_decoder``    latents (F, 4, 80, 64) (scaled)                   image (F, 3, 640, 512) in [-1, 1], or
                                                                     image_u8 (F, 640, 512, 3) uint8
``cond_encoder``   image (B, 3, 640, 512) in [-1, 1]                 cond (B, 50, 768), null (B, 50, 768)
=================  ===============================================  ===========================================

The UNet batch is branch-major (null image & null pose, image & pose, image & null pose), which the
graph does not need to know: it sees 3F independent samples.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dreampose.settings import torch_dtype
from dreampose.utils import DreamPoseError

from .manifest import ENGINE_PRECISIONS, ShapeSpec

if TYPE_CHECKING:  # pragma: no cover
    from dreampose.model import DreamPoseModel

logger = logging.getLogger(__name__)

BRANCHES = 3  # classifier-free guidance branches in a UNet batch

Shape = tuple[int, ...]


def engine_dtype(precision: str) -> torch.dtype:
    """The torch dtype of an engine precision ('fp32' or 'fp16'); anything else is a DreamPoseError."""
    if precision not in ENGINE_PRECISIONS:
        raise DreamPoseError(f"unsupported precision {precision!r}: choose one of {', '.join(ENGINE_PRECISIONS)}")
    return torch_dtype(precision)


class ExportWrapper(nn.Module):
    """Base class: an exportable network with its I/O description. Subclasses set the class attributes."""

    name: str = ""
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()

    def __init__(self, model: "DreamPoseModel", precision: str = "fp32") -> None:
        super().__init__()
        self.precision = precision
        self.dtype = engine_dtype(precision)
        self.config = model.config
        self.vae_scale_factor = model.vae_scale_factor
        self.latent_channels = model.latent_channels

    # ---- per-network facts (overridden) ---------------------------------------------------------
    def batch_range(self, spec: ShapeSpec) -> tuple[int, int, int]:
        """(min, opt, max) of the batch axis."""
        return spec.min_frames, spec.opt_frames, spec.max_frames

    def input_shapes(self, batch: int, height: int, width: int) -> dict[str, Shape]:
        """Input name -> shape for one call at image resolution height x width."""
        raise NotImplementedError

    def input_dtypes(self) -> dict[str, torch.dtype]:
        """Input name -> dtype at this wrapper's precision (timestep stays fp32)."""
        return {n: self.dtype for n in self.input_names}

    def spatial_axes(self) -> dict[str, dict[int, str]]:
        """Input/output name -> {axis: label} of the axes that follow the resolution."""
        return {}

    # ---- derived --------------------------------------------------------------------------------
    def dynamic_axes(self, dynamic_resolution: bool = False) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s dynamic_axes: batch on every I/O, plus the spatial axes if asked."""
        axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in (*self.input_names, *self.output_names)}
        if dynamic_resolution:
            for name, extra in self.spatial_axes().items():
                axes[name].update(extra)
        return axes

    def shape_profile(self, spec: ShapeSpec) -> dict[str, tuple[Shape, Shape, Shape]]:
        """Input name -> (min, opt, max) shape: one TensorRT optimisation profile."""
        b_min, b_opt, b_max = self.batch_range(spec)
        if spec.dynamic_resolution:
            lo, hi = spec.min_resolution, spec.max_resolution
            res = ((lo, lo), (spec.height, spec.width), (hi, hi))
        else:
            res = ((spec.height, spec.width),) * 3
        mins = self.input_shapes(b_min, *res[0])
        opts = self.input_shapes(b_opt, *res[1])
        maxs = self.input_shapes(b_max, *res[2])
        return {n: (mins[n], opts[n], maxs[n]) for n in self.input_names}

    def sample_inputs(self, batch: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """Deterministic inputs for tracing and checks, at the model's resolution.

        ``batch`` counts samples on the batch axis (for the UNet: 3 x frames); default: the smallest
        batch of two frames.
        """
        if batch is None:
            batch = self.batch_range(ShapeSpec(min_frames=2, opt_frames=2, max_frames=2))[0]
        shapes = self.input_shapes(batch, self.config.height, self.config.width)
        dtypes = self.input_dtypes()
        g = torch.Generator().manual_seed(seed)
        return {n: self._sample(n, shapes[n], g).to(dtypes[n]) for n in self.input_names}

    def _sample(self, name: str, shape: Shape, g: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    def reference(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The same computation in eager PyTorch (no tracing), outputs in ``output_names`` order."""
        with torch.no_grad():
            out = self(*(inputs[n] for n in self.input_names))
        return out if isinstance(out, tuple) else (out,)


class UNetExport(ExportWrapper):
    """The widened UNet. Latents and the pose window are separate inputs, concatenated inside the graph.

    Inputs: latents (B, 4, h, w), pose_window (B, 2 * n_poses, h, w) in [-1, 1] (zeros = null pose),
    timestep (B,) fp32, encoder_hidden_states (B, N, D). Output: eps (B, 4, h, w). B = 3 x frames.
    """

    name = "unet"
    input_names = ("latents", "pose_window", "timestep", "encoder_hidden_states")
    output_names = ("eps",)

    def __init__(self, model: "DreamPoseModel", precision: str = "fp32") -> None:
        super().__init__(model, precision)
        self.unet = model.unet
        self.pose_window_channels = model.config.pose_window_channels
        self.clip_tokens = model.adapter.config.clip_tokens
        self.clip_dim = model.adapter.config.clip_dim

    def forward(
        self, latents: torch.Tensor, pose_window: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        x = torch.cat([latents, pose_window], dim=1)
        return self.unet(x, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    def batch_range(self, spec: ShapeSpec) -> tuple[int, int, int]:
        return BRANCHES * spec.min_frames, BRANCHES * spec.opt_frames, BRANCHES * spec.max_frames

    def input_shapes(self, batch: int, height: int, width: int) -> dict[str, Shape]:
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        return {
            "latents": (batch, self.latent_channels, h, w),
            "pose_window": (batch, self.pose_window_channels, h, w),
            "timestep": (batch,),
            "encoder_hidden_states": (batch, self.clip_tokens, self.clip_dim),
        }

    def input_dtypes(self) -> dict[str, torch.dtype]:
        return {**super().input_dtypes(), "timestep": torch.float32}

    def spatial_axes(self) -> dict[str, dict[int, str]]:
        return {n: {2: "latent_height", 3: "latent_width"} for n in ("latents", "pose_window", "eps")}

    def _sample(self, name: str, shape: Shape, g: torch.Generator) -> torch.Tensor:
        if name == "timestep":
            return torch.randint(0, 1000, shape, generator=g).float()
        if name == "pose_window":
            return torch.rand(shape, generator=g) * 2 - 1
        return torch.randn(shape, generator=g)


class VAEDecoderExport(ExportWrapper):
    """The VAE decoder: scaled latents (B, 4, h, w) -> image.

    ``output="float"`` (default): ``image`` (B, 3, H, W) in [-1, 1], not clamped (``DreamPoseModel.decode``).
    ``output="uint8"``: ``image_u8`` (B, H, W, 3) uint8, clamped and rounded inside the graph, ready for a
    video writer (saves the device-to-host copy of 4-byte floats and a host-side conversion).
    """

    name = "vae_decoder"
    input_names = ("latents",)

    def __init__(self, model: "DreamPoseModel", precision: str = "fp32", output: str = "float") -> None:
        super().__init__(model, precision)
        if output not in ("float", "uint8"):
            raise DreamPoseError(f"vae_decoder output must be 'float' or 'uint8', got {output!r}")
        self.output = output
        self.output_names = ("image",) if output == "float" else ("image_u8",)
        if output == "uint8":
            self.name = "vae_decoder_u8"
        self.post_quant_conv = model.vae.post_quant_conv
        self.decoder = model.vae.decoder
        self.scaling_factor = float(model.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        image = self.decoder(z)
        if self.output == "float":
            return image
        image = ((image.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
        return image.to(torch.uint8).permute(0, 2, 3, 1)

    def input_shapes(self, batch: int, height: int, width: int) -> dict[str, Shape]:
        f = self.vae_scale_factor
        return {"latents": (batch, self.latent_channels, height // f, width // f)}

    def spatial_axes(self) -> dict[str, dict[int, str]]:
        out = {2: "height", 3: "width"} if self.output == "float" else {1: "height", 2: "width"}
        return {"latents": {2: "latent_height", 3: "latent_width"}, self.output_names[0]: out}


def resize_matrix(size: int, new_size: int, start: int, length: int) -> torch.Tensor:
    """The linear map of PyTorch's antialiased bicubic resize along one axis, cropped to [start, start+length).

    Returns (length, size) fp64 rows such that ``M @ x`` along that axis equals
    ``F.interpolate(x, new_size, mode='bicubic', antialias=True, align_corners=False)[start:start+length]``.
    Built by resizing the identity, so it is exact by construction; the resize is separable, so the 2-D
    resize is ``M_h @ X @ M_w.T``.
    """
    # Each basis vector as a one-row image, resized along its width. (Resizing (size, 1) columns along the
    # height instead gives wrong weights in PyTorch's antialiased kernel: keep the degenerate axis first.)
    eye = torch.eye(size, dtype=torch.float64).reshape(size, 1, 1, size)
    rows = F.interpolate(eye, size=(1, new_size), mode="bicubic", align_corners=False, antialias=True)
    return rows.reshape(size, new_size).T[start : start + length].contiguous()


class CLIPPreprocess(nn.Module):
    """Exportable twin of ``DreamPoseModel.clip_preprocess`` for a fixed input resolution.

    pixels (B, 3, H, W) in [-1, 1] -> CLIP input (B, 3, S, S): antialiased bicubic resize of the short side
    to S, centre crop, CLIP mean/std. The resize + crop is two small matrix products (``resize_matrix``):
    ONNX's Resize has no antialiased bicubic that matches PyTorch, and the static resolution makes the
    matrices constants. The matrices are (S, H) and (S, W): tiny even at 640 x 512.
    """

    def __init__(self, height: int, width: int, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        scale = size / min(height, width)
        nh, nw = max(size, round(height * scale)), max(size, round(width * scale))
        top, left = (nh - size) // 2, (nw - size) // 2
        self.register_buffer("resize_h", resize_matrix(height, nh, top, size).float(), persistent=False)
        self.register_buffer("resize_w_t", resize_matrix(width, nw, left, size).T.contiguous().float(), persistent=False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float() + 1.0) / 2.0
        x = torch.matmul(torch.matmul(self.resize_h, x), self.resize_w_t)  # (B, 3, S, S)
        return (x - self.mean) / self.std


class CondEncoderExport(ExportWrapper):
    """The conditioning encoder, run once per video: CLIP vision + VAE encoder + adapter in one graph.

    Input: image (B, 3, H, W) in [-1, 1]. Outputs: cond (B, N, D) = ``DreamPoseModel.encode_image(image)``
    and null (B, N, D) = ``DreamPoseModel.encode_null_image(B)`` (all-zero inputs through CLIP and the VAE).
    Both branches run as one batch of 2B. The resolution is static (the CLIP resize is baked in).
    """

    name = "cond_encoder"
    input_names = ("image",)
    output_names = ("cond", "null")

    def __init__(self, model: "DreamPoseModel", precision: str = "fp32") -> None:
        super().__init__(model, precision)
        from dreampose.model import CLIP_MEAN, CLIP_STD

        self.image_encoder = model.image_encoder
        self.quant_conv = model.vae.quant_conv
        self.encoder = model.vae.encoder
        self.adapter = model.adapter
        self.scaling_factor = float(model.scaling_factor)
        self.clip_size = model.clip_image_size
        self.preprocess = CLIPPreprocess(model.config.height, model.config.width, self.clip_size, CLIP_MEAN, CLIP_STD)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = image.shape[0]
        clip_image = self.preprocess(image).to(self.dtype)
        clip_in = torch.cat([clip_image, torch.zeros_like(clip_image)], dim=0)  # (2B, 3, S, S)
        vae_in = torch.cat([image, torch.zeros_like(image)], dim=0)  # (2B, 3, H, W)
        tokens = self.image_encoder(pixel_values=clip_in).last_hidden_state  # (2B, N, D)
        moments = self.encoder(vae_in)  # (2B, 2C, h, w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        latents = moments[:, : self.latent_channels] * self.scaling_factor  # posterior mean, scaled
        hidden = self.adapter(tokens, latents)  # (2B, N, D)
        return hidden[:b], hidden[b:]

    def batch_range(self, spec: ShapeSpec) -> tuple[int, int, int]:
        return 1, 1, 1

    def input_shapes(self, batch: int, height: int, width: int) -> dict[str, Shape]:
        return {"image": (batch, 3, height, width)}

    def dynamic_axes(self, dynamic_resolution: bool = False) -> dict[str, dict[int, str]]:
        return super().dynamic_axes(False)  # the CLIP resize matrices fix the resolution

    def shape_profile(self, spec: ShapeSpec) -> dict[str, tuple[Shape, Shape, Shape]]:
        c = self.config
        shape = (1, 3, c.height, c.width)
        return {"image": (shape, shape, shape)}

    def _sample(self, name: str, shape: Shape, g: torch.Generator) -> torch.Tensor:
        return torch.rand(shape, generator=g) * 2 - 1


WRAPPERS: dict[str, type[ExportWrapper]] = {
    "unet": UNetExport,
    "vae_decoder": VAEDecoderExport,
    "cond_encoder": CondEncoderExport,
}


def make_wrapper(name: str, model: "DreamPoseModel", precision: str = "fp32", **kwargs) -> ExportWrapper:
    """The export wrapper ``name`` (one of ``WRAPPERS``, or 'vae_decoder_u8') around ``model``, in eval mode.

    The wrapper shares the model's modules; at fp16 the wrapped modules are cast to half in place, so pass
    a copy (``model.copy()``) if the fp32 model is still needed.
    """
    if name == "vae_decoder_u8":
        name, kwargs = "vae_decoder", {**kwargs, "output": "uint8"}
    if name not in WRAPPERS:
        raise DreamPoseError(f"unknown network {name!r}: choose one of {', '.join(WRAPPERS)}, vae_decoder_u8")
    wrapper = WRAPPERS[name](model, precision, **kwargs)
    for child in wrapper.children():
        if not isinstance(child, CLIPPreprocess):  # the CLIP resize runs in fp32 at every precision
            # nn.Module.to, not diffusers' override: that one warns about "modules that should be kept in
            # float32" even when it lists none (a diffusers quirk; SD 1.x has none)
            nn.Module.to(child, wrapper.dtype)
    return wrapper.eval()
