"""Writing frames: mp4 (H.264), gif, or a folder of PNGs, chosen by the output's extension.

Every writer renders to a temporary name beside the target and renames it when complete, so a crash
never leaves a half-written video behind.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .outputs import atomic_dir, check_output_file
from .utils import DreamPoseError, PathLike, atomic_file

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".gif")
#: the frame rates a video plays at: a GIF frame lasts 10 ms to 655.35 s (in 10 ms steps); H.264 in mp4
#: from one frame a minute to 1000 a second (what ffmpeg's encoder takes here)
FPS_RANGE = {"gif": (1 / 655.35, 100.0), "mp4": (1 / 60, 1000.0)}


def output_kind(out: PathLike) -> str:
    """'mp4', 'gif' or 'png' (a folder: any path without one of the video extensions)."""
    suffix = Path(out).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return suffix[1:]
    if suffix in (".mov", ".avi", ".mkv", ".webm", ".png", ".jpg"):
        raise DreamPoseError(f"{out}: unsupported output type {suffix!r} (use .mp4, .gif or a folder for PNGs)")
    return "png"


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise DreamPoseError(f"frames must be a non-empty uint8 array (T, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


def check_fps(fps: float, out: PathLike) -> float:
    """``fps`` if a video at ``out`` can play at it (a PNG folder takes any), else a DreamPoseError."""
    kind = output_kind(out)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not np.isfinite(fps) or fps <= 0:
        raise DreamPoseError(f"fps must be a positive number, got {fps!r}")
    low, high = FPS_RANGE.get(kind, (0.0, float("inf")))
    if not low <= fps <= high:
        raise DreamPoseError(f"fps {fps:g} is outside what a .{kind} can play ({low:g} to {high:g})")
    return float(fps)


def write_frames(frames: np.ndarray, out: PathLike, fps: float = 8.0, quality: int = 18,
                 command: str = "write_frames") -> Path:
    """Write uint8 frames (T, H, W, 3) to ``out`` by its extension. Returns the path written.

    mp4: H.264 (libx264, yuv420p, constant quality ``quality`` as CRF); odd sizes are padded by one
    black pixel since 4:2:0 needs even sizes. gif: looping, ``fps`` (Pillow merges identical consecutive
    frames into one longer frame: the timing is kept). Folder: frame_00000.png, ... (a folder that exists
    must be empty or an earlier output of ``command``, see dreampose.outputs; a file at ``out`` is replaced).
    """
    frames = _check_frames(frames)
    check_fps(fps, out)
    out = Path(out)
    kind = output_kind(out)
    if kind == "mp4":
        check_output_file(out)
        _write_mp4(frames, out, fps, quality)
    elif kind == "gif":
        check_output_file(out)
        _write_gif(frames, out, fps)
    else:
        with atomic_dir(out, command) as tmp:
            for i, f in enumerate(frames):
                write_png(f, tmp / frame_name(i))
    logger.info("wrote %d frames to %s", len(frames), out)
    return out


def frame_name(index: int) -> str:
    """File name of frame ``index`` in a PNG folder: frame_00000.png."""
    return f"frame_{index:05d}.png"


def write_png(frame: np.ndarray, path: PathLike) -> None:
    """Write one uint8 (H, W, 3) frame as PNG, atomically."""
    from PIL import Image

    with atomic_file(path) as tmp:
        Image.fromarray(frame).save(tmp, format="PNG")


def read_png(path: PathLike) -> np.ndarray:
    """Read a PNG frame as uint8 (H, W, 3)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def _write_mp4(frames: np.ndarray, out: Path, fps: float, quality: int) -> None:
    import imageio.v2 as imageio

    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    with atomic_file(out) as tmp:
        writer = imageio.get_writer(
            str(tmp),
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            macro_block_size=1,
            ffmpeg_log_level="error",
            output_params=["-crf", str(quality), "-movflags", "+faststart"],
        )
        try:
            for f in frames:
                writer.append_data(f)
        finally:
            writer.close()


def _write_gif(frames: np.ndarray, out: Path, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    with atomic_file(out) as tmp:
        images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
        )
