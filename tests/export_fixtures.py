"""Session fixtures for the export tests: a 'trained-like' tiny model, a subject, and one build of its engines.

Random initialisation leaves many parameters with equal values (all-ones norm scales), which the weight
map cannot tell apart by content; trained networks have none. ``perturb`` gives every parameter its own
values, as training does.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """Add small seeded noise to every floating-point parameter of ``module`` (in place)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="session")
def export_model():
    """The tiny DreamPose with every parameter distinct (a stand-in for trained weights)."""
    from dreampose.model import DreamPoseModel

    m = DreamPoseModel.tiny(seed=0)
    perturb(m, seed=1)
    return m.eval()


@pytest.fixture(scope="session")
def export_model_dir(export_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("export_models") / "base"
    export_model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def subject_model(export_model):
    """A 'finetuned subject': the same model with different UNet and VAE-decoder weights."""
    m = export_model.copy()
    perturb(m.unet, seed=2, scale=0.05)
    perturb(m.vae.decoder, seed=3, scale=0.05)
    return m.eval()


@pytest.fixture(scope="session")
def subject_model_dir(subject_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("export_models") / "subject"
    subject_model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def built_engines(export_model_dir, tmp_path_factory):
    """(engine_dir, manifest): the fp32 ONNX Runtime build of ``export_model``, done once per session."""
    from dreampose_rt.export import build_engines

    out = tmp_path_factory.mktemp("engines") / "fp32"
    manifest = build_engines(export_model_dir, out, backend="onnxruntime", precision="fp32", max_frames=3)
    return out, manifest
