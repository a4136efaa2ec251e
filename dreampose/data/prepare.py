"""Turn a folder of videos (UBC Fashion's mp4 files) into the UBC training layout.

    videos/<name>.mp4  ->  out/<name>/frame_<n>.png  (+ frame_<n>_densepose.npy when poses are given)

Poses are produced elsewhere by DensePose (docs/training.md says how) and accepted per video as
``poses/<name>/`` (a folder of ``frame_<n>_densepose.npy`` files or of IUV images) or ``poses/<name>.npy``
/ ``.npz`` holding (T, 2, H, W). Without poses, only the frames are written (run DensePose on them, then
add the .npy files beside the frames).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..outputs import atomic_dir, output_dir
from ..poses import load_poses, resize_poses
from ..utils import DreamPoseError, PathLike, first_line

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm")


def read_video_frames(path: Path, every: int = 1, max_frames: int | None = None) -> list[np.ndarray]:
    """Frames of a video file as uint8 (H, W, 3) arrays (every ``every``-th frame, at most ``max_frames``)."""
    import imageio.v2 as imageio

    frames: list[np.ndarray] = []
    try:
        reader = imageio.get_reader(str(path), format="FFMPEG")
    except Exception as e:  # imageio raises several types (with ffmpeg's whole banner) for unreadable files
        raise DreamPoseError(f"{path}: cannot open the video ({_ffmpeg_reason(e)})") from None
    try:
        for k, frame in enumerate(reader):
            if k % every:
                continue
            frames.append(np.asarray(frame)[..., :3])
            if max_frames is not None and len(frames) >= max_frames:
                break
    except Exception as e:  # a video that opens but breaks while decoding
        raise DreamPoseError(f"{path}: cannot decode the video ({_ffmpeg_reason(e)})") from None
    finally:
        reader.close()
    if not frames:
        raise DreamPoseError(f"{path}: the video has no frames")
    return frames


def _ffmpeg_reason(e: BaseException) -> str:
    """The line of an imageio / ffmpeg error that says what is wrong (not ffmpeg's banner)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if any(w in ln.lower() for w in ("invalid", "error", "moov", "no such", "not found", "could not", "failed")):
            return ln
    return first_line(e)


def _find_poses(poses_root: Path, stem: str) -> Path:
    for cand in (poses_root / stem, poses_root / f"{stem}.npy", poses_root / f"{stem}.npz"):
        if cand.exists():
            return cand
    raise DreamPoseError(f"{poses_root / stem}: no poses for video {stem!r} (expected a folder, {stem}.npy or {stem}.npz)")


def _resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def prepare_videos(
    videos: PathLike,
    out: PathLike,
    poses: PathLike | None = None,
    size: tuple[int, int] | None = None,
    every: int = 1,
    max_frames: int | None = None,
) -> list[Path]:
    """Write each video of ``videos`` (a folder of video files, or one file) as a UBC-layout folder under ``out``.

    Args:
        videos: a folder of .mp4 (.mov, .avi, .mkv, .webm) files or a single video file.
        out: the dataset folder; each video becomes ``out/<stem>/`` (written atomically).
        poses: a folder with one pose source per video (see the module docstring); poses must cover
            the video's frames one for one, before ``every`` and ``max_frames`` are applied.
        size: (H, W) to resize frames (and poses, bilinear) to; None keeps the video's size.
        every: keep every ``every``-th frame. max_frames: stop after this many kept frames.

    Returns the video folders written. Raises DreamPoseError naming the file for an unreadable video,
    missing poses, or a pose count or size that does not match the video.
    """
    videos, out = Path(videos), Path(out)
    if every < 1:
        raise DreamPoseError(f"every must be >= 1, got {every}")
    if videos.is_file():
        files = [videos]
    elif videos.is_dir():
        files = sorted(p for p in videos.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        if not files:
            raise DreamPoseError(f"{videos}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    else:
        raise DreamPoseError(f"{videos}: videos not found")
    poses_root = Path(poses) if poses is not None else None
    if poses_root is not None and not poses_root.is_dir():
        raise DreamPoseError(f"{poses_root}: poses folder not found")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise DreamPoseError(f"max_frames must be an integer >= 1 (or None for all), got {max_frames!r}")
    if size is not None and (len(size) != 2 or min(size) < 8):
        raise DreamPoseError(f"size must be (H, W) of at least 8 x 8 pixels, got {size}")
    written: list[Path] = []
    with output_dir(out, "prepare-data", inputs=[videos, poses_root]):
        for path in files:
            written.append(_prepare_one(path, out, poses_root, size, every, max_frames))
    return written


def _prepare_one(path: Path, out: Path, poses_root: Path | None, size: tuple[int, int] | None, every: int,
                 max_frames: int | None) -> Path:
    """One video of :func:`prepare_videos` -> ``out/<stem>/`` (written atomically). Returns the folder."""
    pose_seq = None
    if poses_root is not None:  # check the poses before the (slow) decoding
        pose_path = _find_poses(poses_root, path.stem)
        pose_seq = load_poses(pose_path)
    frames = read_video_frames(path, every=1)
    if pose_seq is not None and len(pose_seq) != len(frames):
        raise DreamPoseError(f"{pose_path}: {len(pose_seq)} poses for the {len(frames)} frames of {path}")
    keep = list(range(0, len(frames), every))[: max_frames]
    frame_size = frames[0].shape[:2]
    target = tuple(size) if size is not None else frame_size
    if pose_seq is not None and pose_seq.shape[2:] != frame_size and size is None:
        raise DreamPoseError(
            f"{pose_path}: poses are {pose_seq.shape[2]} x {pose_seq.shape[3]} but the frames of {path} are "
            f"{frame_size[0]} x {frame_size[1]} (give a size to resize both)"
        )
    folder = out / path.stem
    with atomic_dir(folder, "prepare-data") as tmp:
        from PIL import Image

        for n, k in enumerate(keep):
            frame = frames[k] if tuple(frames[k].shape[:2]) == target else _resize_frame(frames[k], target)
            Image.fromarray(frame).save(tmp / f"frame_{n}.png")
            if pose_seq is not None:
                uv = resize_poses(pose_seq[k : k + 1], target)
                np.save(tmp / f"frame_{n}_densepose.npy", uv[0].numpy().astype(np.float32))
    logger.info("%s: %d frames -> %s%s", path.name, len(keep), folder, "" if pose_seq is not None else " (frames only)")
    return folder
