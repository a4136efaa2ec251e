"""Training data: video sources (a UBC-layout folder, or SynthFashion on the fly) and training pairs.

The UBC layout (the original release's)::

    root/<video>/frame_<n>.png               the frames, n = 0, 1, 2, ... (any start, no gaps)
    root/<video>/frame_<n>_densepose.npy     float32 (2, H, W): DensePose U, V in [0, 1], 0 = background

:class:`UBCFolder` checks the whole folder when it is opened (missing or orphan pose files, gaps in the
numbering, sizes that differ, unreadable headers) and raises a DreamPoseError that names the file, so a
broken dataset fails before any training starts.

A training pair (:class:`TrainingPairs`) is a conditioning frame i and a target frame j of the same
video, with the REAL pose window around j (frames j-2 .. j+2, clamped at the ends; the release fed five
copies of frame j's pose, reproduced by ``window="copies"``), and the per-sample dropout flags of stage 1.
Every random choice of a sample is a pure function of (seed, key), so runs are reproducible and resume
exactly, whatever the number of loader workers.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..images import load_image
from ..poses import check_poses, resize_poses, window_indices
from ..utils import DreamPoseError, PathLike

logger = logging.getLogger(__name__)

FRAME_RE = re.compile(r"^frame_(\d+)\.png$")
POSE_RE = re.compile(r"^frame_(\d+)_densepose\.npy$")
WINDOW_MODES = ("real", "copies")


# --------------------------------------------------------------------------------------------------
# Video sources
# --------------------------------------------------------------------------------------------------
class VideoSource:
    """Videos of frames with one pose per frame. Subclasses fill ``names``, ``frame_counts`` and
    ``frame_size`` and implement ``frame`` and ``pose``."""

    names: list[str]
    frame_counts: list[int]
    frame_size: tuple[int, int]  # (H, W) of frames and poses

    def __len__(self) -> int:
        return len(self.names)

    def frame(self, v: int, k: int) -> np.ndarray:
        """Frame k of video v: uint8 (H, W, 3)."""
        raise NotImplementedError

    def pose(self, v: int, k: int) -> np.ndarray:
        """Pose of frame k of video v: float32 (2, H, W), U and V in [0, 1]."""
        raise NotImplementedError


def _numbered(folder: Path, pattern: re.Pattern) -> dict[int, Path]:
    return {int(m.group(1)): p for p in folder.iterdir() if (m := pattern.match(p.name))}


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # maps the file: reads the header only
        shape, dtype = arr.shape, arr.dtype
        del arr
    except (ValueError, OSError) as e:
        raise DreamPoseError(f"{path}: cannot read as a .npy array ({e})") from None
    return tuple(shape), dtype


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only
            return im.height, im.width
    except OSError as e:
        raise DreamPoseError(f"{path}: cannot read the image ({e})") from None


class UBCFolder(VideoSource):
    """A dataset folder in the UBC layout, checked completely when opened.

    Args:
        root: the folder of video folders (or one video folder itself).
        check_all_frames: read the header of every frame and pose file (default) rather than only the
            first of each video; a few seconds for the whole UBC Fashion training set.

    Raises DreamPoseError, naming the file or folder, for: a missing or empty root, a video without
    frames, a frame without its pose file or a pose file without its frame, a gap in the numbering, a
    pose that is not float (2, H, W), and a frame or pose whose size differs from the dataset's.
    """

    def __init__(self, root: PathLike, check_all_frames: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DreamPoseError(f"{self.root}: dataset folder not found")
        if _numbered(self.root, FRAME_RE):
            folders = [self.root]
        else:
            folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DreamPoseError(f"{self.root}: empty dataset (no video folders of frame_<n>.png + frame_<n>_densepose.npy)")
        self.names, self.frame_counts, self._frames, self._poses = [], [], [], []
        size: tuple[int, int] | None = None
        size_source = ""
        for folder in folders:
            frames, poses = _numbered(folder, FRAME_RE), _numbered(folder, POSE_RE)
            if not frames:
                raise DreamPoseError(f"{folder}: no frame_<n>.png frames in this video folder")
            for n in sorted(frames):
                if n not in poses:
                    raise DreamPoseError(f"{folder / f'frame_{n}_densepose.npy'}: missing pose file for {frames[n].name}")
            for n in sorted(poses):
                if n not in frames:
                    raise DreamPoseError(f"{folder / f'frame_{n}.png'}: missing frame for pose file {poses[n].name}")
            numbers = sorted(frames)
            if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
                gap = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
                raise DreamPoseError(f"{folder}: gap in the frame numbering, missing frame(s) {gap[:10]}")
            to_check = numbers if check_all_frames else numbers[:1]
            for n in to_check:
                fsize = _png_size(frames[n])
                if size is None:
                    size, size_source = fsize, str(frames[n])
                elif fsize != size:
                    raise DreamPoseError(f"{frames[n]}: size {fsize[0]} x {fsize[1]} differs from {size[0]} x {size[1]} of {size_source}")
                shape, dtype = _npy_header(poses[n])
                if len(shape) != 3 or shape[0] != 2:
                    raise DreamPoseError(f"{poses[n]}: a pose must have shape (2, H, W), got {shape}")
                if not np.issubdtype(dtype, np.floating):
                    raise DreamPoseError(f"{poses[n]}: a pose must be float U, V in [0, 1], got dtype {dtype}")
                if tuple(shape[1:]) != fsize:
                    raise DreamPoseError(
                        f"{poses[n]}: pose size {shape[1]} x {shape[2]} does not match its frame's {fsize[0]} x {fsize[1]}"
                    )
            self.names.append(folder.name)
            self.frame_counts.append(len(numbers))
            self._frames.append([frames[n] for n in numbers])
            self._poses.append([poses[n] for n in numbers])
        assert size is not None
        self.frame_size = size
        logger.info("dataset %s: %d videos, %d frames of %d x %d", self.root, len(self.names),
                    sum(self.frame_counts), size[0], size[1])

    def frame(self, v: int, k: int) -> np.ndarray:
        from PIL import Image

        path = self._frames[v][k]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise DreamPoseError(f"{path}: cannot read the image ({e})") from None
        if arr.shape[:2] != self.frame_size:
            raise DreamPoseError(f"{path}: size {arr.shape[0]} x {arr.shape[1]} differs from the dataset's {self.frame_size}")
        return arr

    def pose(self, v: int, k: int) -> np.ndarray:
        path = self._poses[v][k]
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DreamPoseError(f"{path}: cannot read as a .npy array ({e})") from None
        if arr.shape != (2, *self.frame_size):
            raise DreamPoseError(f"{path}: pose shape {arr.shape}, expected (2, {self.frame_size[0]}, {self.frame_size[1]})")
        return check_poses(arr[None], str(path))[0]


# --------------------------------------------------------------------------------------------------
# Per-sample dropout (stage 1)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DropoutConfig:
    """Per-sample conditioning dropout: probabilities of null pose only, null image only, and both.

    The paper: 5% each (so the pose is null in 10% of samples, the image in 10%, both in 5%).
    """

    p_pose: float = 0.05
    p_image: float = 0.05
    p_both: float = 0.05

    def __post_init__(self) -> None:
        ps = (self.p_pose, self.p_image, self.p_both)
        if min(ps) < 0 or sum(ps) > 1:
            raise DreamPoseError(f"dropout probabilities must be >= 0 and sum to <= 1, got {ps}")


NO_DROPOUT = DropoutConfig(0.0, 0.0, 0.0)


def draw_dropout(u: float, config: DropoutConfig) -> tuple[bool, bool]:
    """One uniform number u in [0, 1) -> (drop_image, drop_pose): [0, p_both) both, then image only,
    then pose only, else neither."""
    if u < config.p_both:
        return True, True
    if u < config.p_both + config.p_image:
        return True, False
    if u < config.p_both + config.p_image + config.p_pose:
        return False, True
    return False, False


# --------------------------------------------------------------------------------------------------
# Training pairs
# --------------------------------------------------------------------------------------------------
def to_pixels(frame: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (H', W', 3) -> float32 (3, H, W) in [-1, 1] at ``size``: the subject-image convention."""
    return load_image(frame, size)[0]


class TrainingPairs(torch.utils.data.Dataset):
    """Pairs (conditioning frame i, target frame j) of the same video, one per target frame and epoch.

    ``dataset[key]`` accepts any key >= 0: ``epoch, index = divmod(key, len(dataset))``; ``index`` picks
    the target (video v, frame j), and a generator seeded by (seed, key) picks the conditioning frame i
    (a different frame of the same video when it has more than one) and the dropout flags.

    Each sample is a dict:
        image:      float32 (3, H, W) in [-1, 1], frame i (the subject)
        target:     float32 (3, H, W) in [-1, 1], frame j
        poses:      float32 (n_poses, 2, H, W) in [0, 1], poses of frames window_indices(j) at image size
                    (``window="copies"``: n_poses copies of frame j's pose, as the release did)
        drop_image: bool, drop_pose: bool (per-sample dropout), key: int64, video: int64, i: int64, j: int64
    """

    def __init__(
        self,
        source: VideoSource,
        size: tuple[int, int],
        seed: int = 0,
        n_poses: int = 5,
        window: str = "real",
        dropout: DropoutConfig = NO_DROPOUT,
    ) -> None:
        if window not in WINDOW_MODES:
            raise DreamPoseError(f"window must be one of {WINDOW_MODES}, got {window!r}")
        if len(source) == 0 or sum(source.frame_counts) == 0:
            raise DreamPoseError("the dataset has no frames")
        self.source, self.size, self.seed = source, (int(size[0]), int(size[1])), int(seed)
        self.n_poses, self.window, self.dropout = n_poses, window, dropout
        self.targets = [(v, j) for v, t in enumerate(source.frame_counts) for j in range(t)]
        fh, fw = source.frame_size
        if abs(fh / fw - size[0] / size[1]) > 0.02 * size[0] / size[1]:
            logger.warning("frames are %d x %d but the model trains at %d x %d: frames and poses are stretched",
                           fh, fw, size[0], size[1])

    def __len__(self) -> int:
        return len(self.targets)

    def sample_choices(self, key: int) -> tuple[int, int, int, bool, bool]:
        """(video, i, j, drop_image, drop_pose) of sample ``key``, without loading anything."""
        _, index = divmod(int(key), len(self.targets))
        v, j = self.targets[index]
        rng = np.random.default_rng([self.seed, int(key)])
        t = self.source.frame_counts[v]
        i = int(rng.integers(t - 1)) if t > 1 else 0
        i = i + 1 if t > 1 and i >= j else i  # uniform over the other frames
        drop_image, drop_pose = draw_dropout(float(rng.random()), self.dropout)
        return v, i, j, drop_image, drop_pose

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        if key < 0:
            raise IndexError(f"negative key {key}")
        v, i, j, drop_image, drop_pose = self.sample_choices(key)
        t = self.source.frame_counts[v]
        frames = window_indices(j, t, self.n_poses) if self.window == "real" else [j] * self.n_poses
        poses = np.stack([self.source.pose(v, k) for k in frames])
        return {
            "image": to_pixels(self.source.frame(v, i), self.size),
            "target": to_pixels(self.source.frame(v, j), self.size),
            "poses": resize_poses(poses, self.size),
            "drop_image": torch.tensor(drop_image),
            "drop_pose": torch.tensor(drop_pose),
            "key": torch.tensor(int(key)),
            "video": torch.tensor(v),
            "i": torch.tensor(i),
            "j": torch.tensor(j),
        }


class PairSampler(torch.utils.data.Sampler):
    """An endless stream of sample keys for one process, reshuffled every epoch, resumable exactly.

    The global stream visits positions p = 0, 1, 2, ...: epoch e = p // n, and the key is
    ``e * n + perm_e[p % n]`` with perm_e a permutation seeded by (seed, e). Process ``rank`` of
    ``world`` takes positions p = q * world + rank for q = start, start + 1, ... So the data a run sees
    depends only on (seed, position), and resuming at q = samples already consumed per process
    continues the stream exactly.
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world: int = 1, start: int = 0) -> None:
        self.n, self.seed, self.rank, self.world, self.start = int(n), int(seed), int(rank), int(world), int(start)
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _key(self, p: int) -> int:
        epoch, k = divmod(p, self.n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch, 0x5A]).permutation(self.n)
            self._perm_epoch = epoch
        return epoch * self.n + int(self._perm[k])

    def __iter__(self) -> Iterator[int]:
        q = self.start
        while True:
            yield self._key(q * self.world + self.rank)
            q += 1
