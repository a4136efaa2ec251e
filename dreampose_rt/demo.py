"""The embedded demo: a model, a subject image and a pose sequence that need no downloads.

Until a trained demo model ships (see the issue tracker), the demo model is the tiny random-initialised
DreamPose (deterministic from its seed): the video shows the whole pipeline running, not the method's
quality. The subject and the poses are a procedural figure (dreampose.data.figure) walking in place.
"""

from __future__ import annotations

import numpy as np

from dreampose.data.figure import Appearance, render_figure, render_sequence, walk_cycle
from dreampose.model import DreamPoseModel

DEMO_SEED = 0
DEMO_HEIGHT = 96
DEMO_WIDTH = 72
DEMO_FRAMES = 12


def demo_model(seed: int = DEMO_SEED) -> DreamPoseModel:
    """The demo DreamPose: the tiny configuration at 96 x 72, random weights from ``seed``."""
    return DreamPoseModel.tiny(seed=seed, height=DEMO_HEIGHT, width=DEMO_WIDTH)


def demo_subject(height: int = DEMO_HEIGHT, width: int = DEMO_WIDTH) -> np.ndarray:
    """The demo subject: uint8 (H, W, 3), the figure standing, front-on."""
    image, _, _ = render_figure(walk_cycle(1)[0], height, width, Appearance())
    return image


def demo_poses(n_frames: int = DEMO_FRAMES, height: int = DEMO_HEIGHT, width: int = DEMO_WIDTH) -> np.ndarray:
    """The demo pose sequence: float32 (T, 2, H, W) U, V in [0, 1] of one walking cycle."""
    _, uv, _ = render_sequence(walk_cycle(n_frames, steps_per_cycle=n_frames), height, width, Appearance())
    return uv
