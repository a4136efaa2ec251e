"""Subject images: one pixel convention for the whole project.

Images enter the networks as float tensors (B, 3, H, W) in [-1, 1] (the VAE's range); CLIP's own
normalisation is applied inside :meth:`DreamPoseModel.clip_preprocess`. Frames leave as uint8 (H, W, 3),
mapped linearly from [-1, 1] with clamping: no per-frame min-max rescaling (the release's rescaling made
videos flicker).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from .utils import DreamPoseError, PathLike, first_line

ImageLike = Union[PathLike, "PIL.Image.Image", np.ndarray, torch.Tensor]  # noqa: F821


def load_image(image: ImageLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a subject image into (1, 3, H, W) float32 in [-1, 1], resized to ``size`` = (H, W) if given.

    Accepts a path, a PIL image (any mode; alpha is dropped), a uint8 array (H, W, 3) in [0, 255], a float
    array (H, W, 3) in [0, 1], or a float tensor (3, H, W) / (1, 3, H, W) in [0, 1]. Resizing is bicubic
    with antialiasing. ``load_image(image_unit(image), size)`` is ``load_image(image, size)``, bit for bit.
    """
    x = image_unit(image).unsqueeze(0)
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return x * 2.0 - 1.0


def image_unit(image: ImageLike) -> torch.Tensor:
    """An image (any form :func:`load_image` takes) as float32 (3, H, W) in [0, 1] at its own size: the
    image read and checked, before resizing (what a renderer on another machine is sent)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise DreamPoseError(f"{path}: is a folder, not an image file")
        if not path.is_file():
            raise DreamPoseError(f"{path}: image not found")
        try:
            with Image.open(path) as im:
                x = pil_to_unit(im, str(path))
        except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for a corrupt or unknown file
            raise DreamPoseError(f"{path}: cannot read the image ({first_line(e)})") from None
    elif isinstance(image, Image.Image):
        x = pil_to_unit(image, "image")
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise DreamPoseError(f"image array must be (H, W, 3), got shape {image.shape}")
        arr = image[..., :3]
        if arr.dtype == np.uint8:
            x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
        elif np.issubdtype(arr.dtype, np.floating):
            x = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)
        else:
            raise DreamPoseError(f"image array must be uint8 or float, got dtype {arr.dtype}")
    elif isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 3 or x.shape[0] != 3:
            raise DreamPoseError(f"image tensor must be (3, H, W) or (1, 3, H, W) in [0, 1], got {tuple(image.shape)}")
    else:
        raise DreamPoseError(f"unsupported image type {type(image).__name__}")

    if not torch.isfinite(x).all():
        raise DreamPoseError("image contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise DreamPoseError(f"image values must lie in [0, 1] (or [0, 255] for uint8), found [{lo:.4g}, {hi:.4g}]")
    return x.clamp(0, 1)


def pil_to_unit(im: "PIL.Image.Image", source: str) -> torch.Tensor:  # noqa: F821
    """A PIL image of any mode -> float32 (3, H, W) in [0, 1], at its own bit depth.

    8-bit modes (L, LA, P, RGB, RGBA, CMYK, ...) through RGB (alpha dropped); 16-bit and 32-bit integer
    greyscale (I;16*, I: a 16-bit PNG) scaled by 65535 (converting them to RGB would clip every value above
    255 to white); float greyscale (F) must already lie in [0, 1]. Greyscale becomes three equal channels.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(im).astype(np.float32)
        if grey.min() < 0 or grey.max() > 65535:
            raise DreamPoseError(f"{source}: {mode} image values outside 0..65535")
        x = torch.from_numpy(grey / 65535.0)[None].expand(3, -1, -1).contiguous()
    elif mode == "F":
        x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy())[None].expand(3, -1, -1).contiguous()
    else:
        x = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0
    return x


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] -> uint8 frames (B, H, W, 3), clamped, no per-frame rescaling."""
    x = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
