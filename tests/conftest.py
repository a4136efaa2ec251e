"""Shared test set-up: offline, Triton through its interpreter where there is no GPU, small random models."""

import os

# Before anything imports huggingface_hub or triton.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Triton kernels run through Triton's interpreter on a machine without CUDA (exact, slow, CPU tensors).
# On a CUDA machine they are compiled, as users run them: the GPU tests must test the real kernels (the
# interpreter also refuses host copies inside a CUDA graph capture), and the CPU cases of the kernel
# tests skip there with the reason. TRITON_INTERPRET set by the caller wins either way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
    """The tiny random DreamPose (64 x 48), shared read-only by the tests of a session.

    Its zero-initialised parts (the pose columns of conv_in, the VAE-token columns of the adapter) are
    randomised, as training would make them: with them at zero, the poses and the subject's latents
    would not reach the output, and no test could see a wrong pose window or a swapped branch.
    """
    from dreampose.model import DreamPoseModel

    model = DreamPoseModel.tiny(seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = model.unet.conv_in.weight
        w[:, 4:].copy_(torch.randn(w[:, 4:].shape, generator=g) * w[:, :4].std())
        n = model.adapter.config.clip_tokens
        lin = model.adapter.linear1.weight
        lin[:, n:].copy_(torch.randn(lin[:, n:].shape, generator=g) * 0.2)
    return model


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


class ReferenceFrames(dict):
    """The fp32 reference pipeline's uint8 frames (3, H, W, 3) of the first 3 poses of ``pose_seq``
    (per-frame noise, ``steps`` steps), by scheduler name, each rendered on first use."""

    steps = 4

    def __init__(self, model, image, poses) -> None:
        super().__init__()
        self._args = model, image, poses

    def __missing__(self, scheduler: str) -> np.ndarray:
        from dreampose.pipeline import DreamPosePipeline

        model, image, poses = self._args
        frames = DreamPosePipeline(model)(image, poses[:3], steps=self.steps, scheduler=scheduler, noise="per-frame",
                                          progress=False)  # fmt: skip
        self[scheduler] = frames
        return frames


@pytest.fixture(scope="session")
def reference(tiny_model, subject_image, pose_seq):
    """What the runtime's renders are compared with (tests/test_runtime.py, tests/test_runtime_cuda.py)."""
    return ReferenceFrames(tiny_model, subject_image, pose_seq)


@pytest.fixture(scope="session")
def ort_engines(tiny_model_dir, tmp_path_factory):
    """ONNX Runtime engines (fp32, up to 2 frames per call) of the tiny model folder, built once."""
    from dreampose_rt.export.build import build_engines

    out = tmp_path_factory.mktemp("engines") / "ort"
    build_engines(tiny_model_dir, out, backend="onnxruntime", precision="fp32", max_frames=2)
    return out
