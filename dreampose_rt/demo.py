"""The embedded demo: a trained model, a subject image and a pose sequence that ship with the package.

The model (``assets/demo_model/``) is a small DreamPose trained on SynthFashion by
``scripts/train_demo_model.py`` (seed 0; the folder's ``training.json`` records every config, the losses
and the time). The subject (``assets/demo_subject.png``) and the poses (``assets/demo_poses.npz``, U, V
of DEMO_FRAMES frames) are a held-out SynthFashion video (seed DEMO_VIDEO_SEED, video 0), a subject and
motion the model never saw; the same script writes them.

The demo subject's LoRA (``assets/demo_subject_lora/``, a subject folder of dreampose.lora) is the demo
model finetuned on the demo subject image alone, by ``scripts/train_demo_subject.py`` (seeded; its
subject.json records how). The runtime merges it whenever the embedded demo renders (the demo model with
the demo subject): it keeps the subject's colours, which the model alone gets wrong (docs/quality.md).

If the assets are missing (a source checkout without them), ``demo_model()`` raises a DreamPoseError that
says how to make them; ``random_demo_model()`` is the untrained tiny model of the same architecture.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dreampose.model import DreamPoseModel
from dreampose.utils import DreamPoseError

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL_DIR = ASSETS / "demo_model"
DEMO_SUBJECT = ASSETS / "demo_subject.png"
DEMO_POSES = ASSETS / "demo_poses.npz"
DEMO_SUBJECT_LORA = ASSETS / "demo_subject_lora"
DEMO_SEED = 0  # the training seed of the shipped model
DEMO_VIDEO_SEED = 3  # SynthFashion seed of the demo subject and poses (not the training seed 0)
DEMO_HEIGHT = 64
DEMO_WIDTH = 48
DEMO_FRAMES = 16


def _missing(path: Path) -> DreamPoseError:
    return DreamPoseError(
        f"{path}: the demo assets are missing; make them with `python scripts/train_demo_model.py` "
        "(about 20 minutes on one CPU core), or pass a model folder"
    )


def demo_model() -> DreamPoseModel:
    """The shipped demo DreamPose (64 x 48, trained on SynthFashion), on the CPU in float32."""
    if not (DEMO_MODEL_DIR / "dreampose.json").is_file():
        raise _missing(DEMO_MODEL_DIR)
    return DreamPoseModel.from_pretrained(DEMO_MODEL_DIR)


def demo_subject_lora() -> Path | None:
    """The shipped demo subject's LoRA folder, or None where it is missing (a checkout without it: the demo
    then renders with the demo model alone, and says so)."""
    from dreampose.lora import SUBJECT_CONFIG

    if (DEMO_SUBJECT_LORA / SUBJECT_CONFIG).is_file():
        return DEMO_SUBJECT_LORA
    logger.warning("%s: the demo subject's LoRA is missing; rendering with the demo model alone (make it with "
                   "`python scripts/train_demo_subject.py`)", DEMO_SUBJECT_LORA)
    return None


def runtime_subject(model: str | None, image: str | None, subject: str | None) -> str | bool | None:
    """What a render asks of ``Runtime.from_pretrained(subject=...)`` (animate, a render job): the subject
    folder given; else, for the demo model with a user's image, False (the demo subject's LoRA suits the
    demo subject only); else None (the default: the demo subject's LoRA for the demo model)."""
    if subject is None and model is None and image is not None:
        return False
    return subject


def random_demo_model(seed: int = DEMO_SEED) -> DreamPoseModel:
    """The demo's architecture with random weights (DreamPoseModel.tiny at the demo resolution)."""
    return DreamPoseModel.tiny(seed=seed, height=DEMO_HEIGHT, width=DEMO_WIDTH)


def demo_subject(height: int = DEMO_HEIGHT, width: int = DEMO_WIDTH) -> np.ndarray:
    """The demo subject: uint8 (H, W, 3) (resized, bicubic, if another size is asked for)."""
    from dreampose.images import load_image, to_uint8

    if not DEMO_SUBJECT.is_file():
        raise _missing(DEMO_SUBJECT)
    return to_uint8(load_image(DEMO_SUBJECT, (height, width)))[0]


def demo_poses(n_frames: int = DEMO_FRAMES, height: int = DEMO_HEIGHT, width: int = DEMO_WIDTH) -> np.ndarray:
    """The demo pose sequence: float32 (n_frames, 2, H, W), U, V in [0, 1]. Longer sequences than the
    shipped one play it forth and back; another size is resized bilinearly."""
    if not DEMO_POSES.is_file():
        raise _missing(DEMO_POSES)
    with np.load(DEMO_POSES) as data:
        uv = data["uv"].astype(np.float32)
    if n_frames < 1:
        raise DreamPoseError(f"n_frames must be >= 1, got {n_frames}")
    cycle = list(range(len(uv))) + list(range(len(uv) - 2, 0, -1))
    uv = uv[[cycle[k % len(cycle)] for k in range(n_frames)]]
    if uv.shape[-2:] != (height, width):
        uv = F.interpolate(torch.from_numpy(uv), size=(height, width), mode="bilinear", align_corners=False).numpy()
    return np.ascontiguousarray(uv)


def write_demo_inputs(assets: Path = ASSETS) -> tuple[Path, Path]:
    """Render the demo subject (frame 0) and poses of SynthFashion video 0 of seed DEMO_VIDEO_SEED into
    ``assets`` (demo_subject.png, demo_poses.npz). Returns their paths."""
    from dreampose.data.synth import synth_video
    from dreampose.video import write_png

    video = synth_video(DEMO_VIDEO_SEED, 0, DEMO_FRAMES, DEMO_HEIGHT, DEMO_WIDTH)
    assets.mkdir(parents=True, exist_ok=True)
    write_png(video.images[0], assets / DEMO_SUBJECT.name)
    np.savez_compressed(assets / DEMO_POSES.name, uv=video.uv.astype(np.float16))
    return assets / DEMO_SUBJECT.name, assets / DEMO_POSES.name
