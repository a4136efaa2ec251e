"""Shared test set-up: offline, CPU-only, Triton through its interpreter, small random models."""

import os

# Before anything imports huggingface_hub or triton.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """GPU tests skip with the reason on a machine without CUDA (they are still collected)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny random DreamPose (64 x 48), shared read-only by the tests of a session."""
    from dreampose.model import DreamPoseModel

    return DreamPoseModel.tiny(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory):
    """The tiny model saved as a model folder."""
    path = tmp_path_factory.mktemp("models") / "tiny"
    tiny_model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def subject_image():
    """A uint8 (64, 48, 3) subject image: the procedural figure."""
    from dreampose.data.figure import Appearance, render_figure, walk_cycle

    image, _, _ = render_figure(walk_cycle(1)[0], 64, 48, Appearance())
    return image


@pytest.fixture(scope="session")
def pose_seq():
    """float32 (6, 2, 64, 48) U, V poses of a short walk."""
    from dreampose.data.figure import render_sequence, walk_cycle

    _, uv, _ = render_sequence(walk_cycle(6, steps_per_cycle=6), 64, 48)
    return uv


@pytest.fixture
def rng():
    return np.random.default_rng(0)
