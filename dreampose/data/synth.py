"""SynthFashion: a procedural fashion-video dataset, so that everything trains and checks without downloads.

Each video is one articulated figure (dreampose.data.figure) with a random garment (colours and a
pattern: plain, stripes, checks, dots; short or long sleeves), skin tone and backdrop, moving smoothly
(steps, arm swings, a turn through front-on, drift). For every frame the exact DensePose-like U, V map
and the silhouette come with the image.

Deterministic by seed: video ``k`` of seed ``s`` depends only on (s, k, n_frames, resolution, fps), not
on how many videos are made or in which order. Any resolution; a 64 x 48 frame renders in about 1.5 ms
and a 640 x 512 one in about 0.1 s on one CPU core, fast enough to generate on the fly
(:class:`SynthFashion`) or to write once in the UBC layout (:func:`write_synth_fashion`), which the
folder loader (dreampose.data.dataset.UBCFolder) then reads like the real dataset.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..outputs import atomic_dir
from ..settings import check_float, check_int
from ..utils import DreamPoseError, PathLike, write_json
from .dataset import VideoSource
from .figure import Appearance, random_motion, render_sequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthFashionConfig:
    """Size of a SynthFashion dataset: ``n_videos`` videos of ``n_frames`` frames at height x width."""

    seed: int = 0
    n_videos: int = 8
    n_frames: int = 16
    height: int = 64
    width: int = 48
    fps: float = 8.0

    def __post_init__(self) -> None:
        check_int("seed", self.seed, 0)
        check_int("videos", self.n_videos, 1)
        check_int("frames", self.n_frames, 1)
        check_int("height", self.height, 8)
        check_int("width", self.width, 8)
        check_float("fps", self.fps, 0.0, low_open=True)
        if self.n_videos < 1 or self.n_frames < 1:
            raise DreamPoseError(f"SynthFashion needs at least one video of one frame, got {self.n_videos} x {self.n_frames}")
        if self.height < 8 or self.width < 8:
            raise DreamPoseError(f"SynthFashion frames must be at least 8 x 8, got {self.height} x {self.width}")


@dataclass
class SynthVideo:
    """One rendered video: images uint8 (T, H, W, 3), uv float32 (T, 2, H, W) in [0, 1], silhouette bool (T, H, W)."""

    images: np.ndarray
    uv: np.ndarray
    silhouette: np.ndarray
    appearance: Appearance


def synth_video(seed: int, index: int, n_frames: int, height: int, width: int, fps: float = 8.0) -> SynthVideo:
    """Render video ``index`` of the SynthFashion dataset with this ``seed``."""
    rng = np.random.default_rng([int(seed), int(index)])
    appearance = Appearance.random(rng)
    poses = random_motion(rng, n_frames, fps=fps)
    images, uv, parts = render_sequence(poses, height, width, appearance)
    return SynthVideo(images=images, uv=uv, silhouette=parts > 0, appearance=appearance)


def video_name(index: int) -> str:
    return f"synth_{index:05d}"


class SynthFashion(VideoSource):
    """SynthFashion generated on the fly, as a VideoSource (frames and poses at the configured size).

    Rendered videos are kept in a small LRU cache (``cache_videos``), so that the frames of a training
    pair and their pose window cost one render per video.
    """

    def __init__(self, config: SynthFashionConfig, cache_videos: int = 8) -> None:
        self.config = config
        self.cache_videos = max(1, cache_videos)
        self._cache: OrderedDict[int, SynthVideo] = OrderedDict()
        self.names = [video_name(k) for k in range(config.n_videos)]
        self.frame_counts = [config.n_frames] * config.n_videos
        self.frame_size = (config.height, config.width)

    def video(self, v: int) -> SynthVideo:
        if v in self._cache:
            self._cache.move_to_end(v)
            return self._cache[v]
        c = self.config
        vid = synth_video(c.seed, v, c.n_frames, c.height, c.width, c.fps)
        self._cache[v] = vid
        while len(self._cache) > self.cache_videos:
            self._cache.popitem(last=False)
        return vid

    def frame(self, v: int, k: int) -> np.ndarray:
        return self.video(v).images[k]

    def pose(self, v: int, k: int) -> np.ndarray:
        return self.video(v).uv[k]

    def __getstate__(self) -> dict:  # DataLoader workers start with an empty cache
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state


def write_synth_fashion(root: PathLike, config: SynthFashionConfig, iuv: bool = False) -> Path:
    """Write SynthFashion in the UBC layout, atomically: ``root/synth_<k>/frame_<n>.png`` beside
    ``frame_<n>_densepose.npy`` (float32 (2, H, W)), plus ``frame_<n>_silhouette.png`` and
    ``synthfashion.json`` (the config). With ``iuv`` the poses are also written as IUV images
    (``frame_<n>_iuv.png``), the other pose format the preparation command accepts. Returns ``root``.
    """
    from PIL import Image

    from ..poses import uv_to_iuv_image

    root = Path(root)
    with atomic_dir(root, "synth-data") as tmp:
        for v in range(config.n_videos):
            vid = synth_video(config.seed, v, config.n_frames, config.height, config.width, config.fps)
            folder = tmp / video_name(v)
            folder.mkdir()
            for n in range(config.n_frames):
                Image.fromarray(vid.images[n]).save(folder / f"frame_{n}.png")
                np.save(folder / f"frame_{n}_densepose.npy", vid.uv[n])
                Image.fromarray(vid.silhouette[n].astype(np.uint8) * 255).save(folder / f"frame_{n}_silhouette.png")
                if iuv:
                    Image.fromarray(uv_to_iuv_image(vid.uv[n], vid.silhouette[n].astype(np.uint8))).save(
                        folder / f"frame_{n}_iuv.png"
                    )
        write_json(tmp / "synthfashion.json", {k: getattr(config, k) for k in config.__dataclass_fields__})
    logger.info("wrote SynthFashion (%d videos x %d frames, %d x %d) to %s",
                config.n_videos, config.n_frames, config.height, config.width, root)
    return root
