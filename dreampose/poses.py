"""Pose sequences: reading DensePose U, V maps, checking them, resizing them, and the 5-frame window.

A pose sequence is a float32 array (T, 2, H, W): DensePose U and V in [0, 1], background 0 (the part
index I is not used). Sources read by :func:`load_poses`:

* a folder of ``frame_<n>_densepose.npy`` files, each (2, H, W), ordered by n numerically (the original
  release's layout; frame images ``frame_<n>.png`` may sit beside them);
* an ``.npy`` file holding (T, 2, H, W), or an ``.npz`` holding it under ``poses`` (or as its only array);
* a folder of DensePose IUV images (channels I, U x 255, V x 255; pixels with I = 0 are background),
  ordered by the number in their names.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .utils import DreamPoseError, PathLike, first_line

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_NPY_FRAME = re.compile(r"^frame_(\d+)_densepose\.npy$")
_NUMBER = re.compile(r"(\d+)")
_RANGE_TOL = 1e-3


def load_poses(source: PathLike | np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
    """Read a pose sequence. Returns float32 (T, 2, H, W) with values in [0, 1].

    ``source``: a path (see the module docstring), an array or tensor (T, 2, H, W), or a list of per-frame
    arrays or tensors (2, H, W). Raises DreamPoseError naming the file or argument for: a missing path, an
    empty folder or list, a gap in the frame numbering, a wrong rank or channel count, values outside
    [0, 1], non-finite values, or frames of different sizes.
    """
    if isinstance(source, torch.Tensor):
        return check_poses(source.detach().cpu().numpy(), "poses tensor")
    if isinstance(source, np.ndarray):
        return check_poses(source, "poses array")
    if isinstance(source, (list, tuple)):
        return check_poses(_stack_frames(source), "poses list")
    if source is None or not isinstance(source, (str, os.PathLike)):
        raise DreamPoseError(f"poses must be a path, an array (T, 2, H, W) or a list of (2, H, W) arrays, "
                             f"got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise DreamPoseError(f"{path}: poses not found")
    if path.is_dir():
        return _load_folder(path)
    if path.suffix == ".npy":
        return check_poses(_np_load(path), str(path))
    if path.suffix == ".npz":
        with np.load(path) as data:
            keys = list(data.keys())
            if "poses" in data:
                arr = data["poses"]
            elif len(keys) == 1:
                arr = data[keys[0]]
            else:
                raise DreamPoseError(f"{path}: .npz holds {keys}; expected one array or one named 'poses'")
        return check_poses(arr, str(path))
    raise DreamPoseError(f"{path}: unsupported pose file (expected a folder, .npy or .npz)")


def _stack_frames(frames: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
    """A list of per-frame (2, H, W) arrays or tensors -> (T, 2, H, W); errors name the frame."""
    if len(frames) == 0:
        raise DreamPoseError("poses list is empty: give at least one (2, H, W) pose")
    arrays = []
    for i, f in enumerate(frames):
        a = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else f
        if not isinstance(a, np.ndarray):
            raise DreamPoseError(f"poses[{i}] must be an array or tensor (2, H, W), got {type(f).__name__}")
        if a.ndim != 3 or a.shape[0] != 2:
            raise DreamPoseError(f"poses[{i}] must have shape (2, H, W), got {a.shape}")
        if arrays and a.shape != arrays[0].shape:
            raise DreamPoseError(f"poses[{i}] has shape {a.shape} but poses[0] has {arrays[0].shape}")
        arrays.append(a)
    return np.stack(arrays)


def check_poses(arr: np.ndarray, source: str) -> np.ndarray:
    """Validate a (T, 2, H, W) U, V array in [0, 1]; return it as contiguous float32 (clipped to [0, 1])."""
    arr = np.asarray(arr)
    if arr.ndim != 4:
        raise DreamPoseError(f"{source}: poses must have shape (T, 2, H, W), got rank {arr.ndim} shape {arr.shape}")
    if arr.shape[1] != 2:
        raise DreamPoseError(f"{source}: poses must have 2 channels (U, V), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise DreamPoseError(f"{source}: the pose sequence is empty")
    if arr.shape[2] < 2 or arr.shape[3] < 2:
        raise DreamPoseError(f"{source}: poses of size {arr.shape[2]} x {arr.shape[3]} are too small")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DreamPoseError(f"{source}: poses must be floating point U, V in [0, 1], got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise DreamPoseError(f"{source}: poses contain NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise DreamPoseError(f"{source}: pose values must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]")
    return np.ascontiguousarray(np.clip(arr, 0.0, 1.0))


def _np_load(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DreamPoseError(f"{path}: cannot read as a .npy array ({e})") from None


def _check_numbering(numbers: list[int], folder: Path, what: str) -> None:
    if len(set(numbers)) != len(numbers):
        dup = sorted({n for n in numbers if numbers.count(n) > 1})
        raise DreamPoseError(f"{folder}: duplicate frame numbers {dup[:5]} among {what}")
    expected = range(numbers[0], numbers[0] + len(numbers))
    if list(numbers) != list(expected):
        missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
        raise DreamPoseError(f"{folder}: gap in the frame numbering of {what}: missing frame(s) {missing[:10]}")


def _load_folder(folder: Path) -> np.ndarray:
    npy = sorted(
        ((int(m.group(1)), p) for p in folder.iterdir() if (m := _NPY_FRAME.match(p.name))), key=lambda x: x[0]
    )
    if npy:
        _check_numbering([n for n, _ in npy], folder, "frame_<n>_densepose.npy files")
        frames = []
        for n, p in npy:
            a = _np_load(p)
            if a.ndim != 3 or a.shape[0] != 2:
                raise DreamPoseError(f"{p}: a pose frame must have shape (2, H, W), got {a.shape}")
            if frames and a.shape != frames[0].shape:
                raise DreamPoseError(f"{p}: size {a.shape} differs from the first frame's {frames[0].shape}")
            frames.append(a)
        return check_poses(np.stack(frames), str(folder))

    images = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    if not images:
        raise DreamPoseError(f"{folder}: no poses found (expected frame_<n>_densepose.npy files or IUV images)")
    numbered = []
    for p in images:
        nums = _NUMBER.findall(p.stem)
        if not nums:
            raise DreamPoseError(f"{p}: an IUV image name must contain its frame number")
        numbered.append((int(nums[-1]), p))
    numbered.sort(key=lambda x: x[0])
    _check_numbering([n for n, _ in numbered], folder, "IUV images")
    frames = [read_iuv_image(p) for _, p in numbered]
    for (_, p), f in zip(numbered, frames):
        if f.shape != frames[0].shape:
            raise DreamPoseError(f"{p}: size {f.shape[1:]} differs from the first frame's {frames[0].shape[1:]}")
    return check_poses(np.stack(frames), str(folder))


def read_iuv_image(path: PathLike) -> np.ndarray:
    """A DensePose IUV image (channels I, U x 255, V x 255) -> U, V float32 (2, H, W); 0 where I = 0."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA", "P"):
                raise DreamPoseError(f"{path}: an IUV image is 8-bit RGB (I, U x 255, V x 255), this one is {im.mode}")
            arr = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DreamPoseError):
            raise
        raise DreamPoseError(f"{path}: cannot read the IUV image ({first_line(e)})") from None
    part = arr[..., 0]
    uv = arr[..., 1:3].astype(np.float32) / 255.0
    uv[part == 0] = 0.0
    return np.ascontiguousarray(uv.transpose(2, 0, 1))


def uv_to_iuv_image(uv: np.ndarray, part: np.ndarray | None = None) -> np.ndarray:
    """U, V (2, H, W) in [0, 1] -> an IUV uint8 image (H, W, 3); I is ``part`` or 1 wherever U or V > 0."""
    if part is None:
        part = ((uv[0] > 0) | (uv[1] > 0)).astype(np.uint8)
    iuv = np.zeros((*uv.shape[1:], 3), dtype=np.uint8)
    iuv[..., 0] = part
    iuv[..., 1:] = np.round(np.clip(uv.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
    iuv[part == 0, 1:] = 0
    return iuv


def resize_poses(poses: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """U, V maps (n, 2, H', W') in [0, 1] -> float32 (n, 2, H, W) at ``size`` = (H, W), bilinear.

    The one resize of poses to an image size: the model's input (:func:`prepare_poses`), training data and
    dataset preparation all use it, so a pose means the same pixels everywhere.
    """
    x = poses if isinstance(poses, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(poses))
    x = x.float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x


def check_pose_aspect(pose_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """Warn when poses of ``pose_size`` (H', W') will be stretched to the model's ``image_size`` (H, W)."""
    src_h, src_w = pose_size
    if abs(src_h / src_w - image_size[0] / image_size[1]) > 0.02 * image_size[0] / image_size[1]:
        logger.warning(
            "poses are %d x %d but the model renders %d x %d: the aspect ratio differs, poses are stretched",
            src_h, src_w, image_size[0], image_size[1],
        )


def prepare_poses(
    poses: np.ndarray | torch.Tensor,
    image_size: tuple[int, int],
    latent_size: tuple[int, int],
    device: torch.device | str = "cpu",
    warn: bool = True,
) -> torch.Tensor:
    """Poses (T, 2, H', W') in [0, 1] -> model input (T, 2, h, w) in [-1, 1] (background -> -1).

    Resized to the image size (bilinear) and then to the latent size (nearest), as DreamPose was trained.
    A pose sequence whose aspect ratio differs from the model's is stretched, with a warning (``warn``;
    see :func:`check_pose_aspect`).
    """
    x = torch.as_tensor(np.asarray(poses) if not isinstance(poses, torch.Tensor) else poses, dtype=torch.float32)
    x = x.to(device)
    if warn:
        check_pose_aspect(tuple(x.shape[-2:]), image_size)
    x = resize_poses(x, image_size)
    if tuple(image_size) != tuple(latent_size):
        x = F.interpolate(x, size=latent_size, mode="nearest")
    return x * 2.0 - 1.0


def window_indices(i: int, n_frames: int, n_poses: int = 5) -> list[int]:
    """Frame indices of the pose window centred on frame i, clamped to [0, T - 1].

    E.g. i = 0, T = 10 -> [0, 0, 0, 1, 2]; i = 9 -> [7, 8, 9, 9, 9]. (The release replaced missing
    neighbours by the centre frame; clamping to the nearest existing frame keeps the motion's direction.)
    """
    if not 0 <= i < n_frames:
        raise IndexError(f"frame {i} out of range for {n_frames} frames")
    half = n_poses // 2
    return [min(max(j, 0), n_frames - 1) for j in range(i - half, i + half + 1)]


def pose_window(poses: torch.Tensor, frames: list[int] | range, n_poses: int = 5) -> torch.Tensor:
    """Pose windows for the given frames: poses (T, 2, h, w) -> (len(frames), 2 * n_poses, h, w).

    Channels are ordered [U, V of i-2, U, V of i-1, U, V of i, U, V of i+1, U, V of i+2].
    """
    t = poses.shape[0]
    idx = torch.tensor([window_indices(i, t, n_poses) for i in frames], device=poses.device)  # (F, n)
    return poses[idx].flatten(1, 2)


def prepared_window(
    poses: np.ndarray,
    frames: list[int] | range,
    image_size: tuple[int, int],
    latent_size: tuple[int, int],
    device: torch.device | str = "cpu",
    n_poses: int = 5,
) -> torch.Tensor:
    """:func:`pose_window` of :func:`prepare_poses`, preparing only the poses the windows use: raw poses
    (T, 2, H', W') in [0, 1] -> (len(frames), 2 * n_poses, h, w) in [-1, 1]. Equal to preparing the whole
    sequence (poses are resized one by one), at a cost that does not grow with T. Does not warn about the
    aspect ratio (the caller does, once per sequence: :func:`check_pose_aspect`)."""
    t = len(poses)
    windows = [window_indices(i, t, n_poses) for i in frames]
    needed = sorted({j for w in windows for j in w})
    at = {j: k for k, j in enumerate(needed)}
    prepared = prepare_poses(np.asarray(poses)[needed], image_size, latent_size, device, warn=False)
    idx = torch.tensor([[at[j] for j in w] for w in windows], device=prepared.device)
    return prepared[idx].flatten(1, 2)
