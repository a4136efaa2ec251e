"""Stage 2: one transform moves image, pose and target alike; both phases lower their loss; the result is
a model folder the pipeline loads; resume equals an uninterrupted run; inputs are checked first."""

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreampose.data.synth import synth_video
from dreampose.model import DreamPoseModel
from dreampose.outputs import MARKER
from dreampose.pipeline import DreamPosePipeline
from dreampose.training import FinetuneConfig, finetune
from dreampose.training.augment import random_affine, transform_together
from dreampose.training.config import AugmentConfig, RunConfig
from dreampose.utils import DreamPoseError


def _centroid(mask: torch.Tensor) -> np.ndarray:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return np.array([ys.float().mean().item(), xs.float().mean().item()])


def test_one_transform_moves_image_pose_and_target_alike():
    h, w = 64, 48
    image = -torch.ones(1, 3, h, w)
    target = -torch.ones(1, 3, h, w)
    poses = torch.zeros(1, 5, 2, h, w)
    image[..., 20:24, 30:34] = 1.0  # the same marker in all three
    target[..., 20:24, 30:34] = 1.0
    poses[..., 20:24, 30:34] = 0.9
    rng = np.random.default_rng(0)
    moved = 0
    for _ in range(5):
        theta = random_affine(rng, AugmentConfig(min_scale=1.1, max_scale=1.4, max_shift=0.05))[None]
        im, po, ta = transform_together(image, poses, target, theta)
        c_im, c_ta = _centroid(im[0, 0] > 0), _centroid(ta[0, 0] > 0)
        c_po = [_centroid(po[0, k, c] > 0.5) for k in range(5) for c in range(2)]
        assert np.abs(c_im - c_ta).max() < 1e-4
        assert all(np.abs(c - c_im).max() <= 0.75 for c in c_po)  # nearest vs bilinear: under a pixel
        moved += np.abs(c_im - np.array([21.5, 31.5])).max() > 1.0
    assert moved >= 4  # the transforms do move things


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """A base model folder (tiny, 32 x 24) and two subject images (front, later frame) with their poses beside them."""
    root = tmp_path_factory.mktemp("subject")
    DreamPoseModel.tiny(seed=0, height=32, width=24).save_pretrained(root / "base")
    v = synth_video(seed=0, index=5, n_frames=6, height=32, width=24)
    images = []
    for k in (0, 5):
        Image.fromarray(v.images[k]).save(root / f"frame_{k}.png")
        np.save(root / f"frame_{k}_densepose.npy", v.uv[k])
        images.append(str(root / f"frame_{k}.png"))
    return root, tuple(images), v


def _cfg(root: Path, images, out: str, **kw) -> FinetuneConfig:
    return FinetuneConfig(images=images, base_model=str(root / "base"), output_dir=str(root / out), batch_size=2,
                          unet_steps=6, unet_lr=1e-3, decoder_steps=6, decoder_lr=1e-3,
                          run=RunConfig(checkpoint_every=3, keep_checkpoints=0, progress=False), **kw)


@pytest.fixture(scope="module")
def finetuned(subject):
    root, images, _ = subject
    cfg = _cfg(root, images, "ft")
    return cfg, finetune(cfg)


def test_both_phases_lower_the_loss(finetuned):
    _, r = finetuned
    for name, losses in (("unet", r.unet_losses), ("decoder", r.decoder_losses)):
        assert len(losses) == 6
        first, last = np.mean(losses[:2]), np.mean(losses[-2:])
        print(f"finetune {name} loss: first 2 {first:.4f} -> last 2 {last:.4f}")
        assert last < 0.9 * first, name


def test_the_finetuned_folder_loads_in_the_pipeline(finetuned, subject):
    cfg, r = finetuned
    root, images, v = subject
    frames = DreamPosePipeline.from_pretrained(r.model_dir)(images[0], v.uv[:2], steps=2, progress=False)
    assert frames.shape == (2, 32, 24, 3)
    base, ft = DreamPoseModel.from_pretrained(root / "base"), DreamPoseModel.from_pretrained(r.model_dir)
    changed = lambda a, b: any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))  # noqa: E731
    assert changed(base.unet, ft.unet) and changed(base.adapter, ft.adapter) and changed(base.vae.decoder, ft.vae.decoder)
    assert not changed(base.vae.encoder, ft.vae.encoder) and not changed(base.image_encoder, ft.image_encoder)
    assert (r.model_dir / "finetune.json").is_file()


def test_resume_equals_uninterrupted(finetuned, subject):
    cfg, full = finetuned
    root, images, _ = subject
    work = Path(f"{cfg.output_dir}.work")
    resumed_cfg = replace(cfg, output_dir=str(root / "ft_resumed"))
    rwork = Path(f"{resumed_cfg.output_dir}.work")
    shutil.copytree(work / "unet" / "step_0000003", rwork / "unet" / "step_0000003")
    shutil.copy(work / MARKER, rwork / MARKER)  # as a crash of this run would leave its work folder
    r = finetune(resumed_cfg, resume=True)
    assert r.unet_losses == full.unet_losses[3:]
    assert r.decoder_losses == full.decoder_losses  # the decoder phase starts from identical weights
    a = load_file(str(full.model_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(r.model_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lpips_from_a_local_export_is_added(subject, tmp_path):
    root, images, _ = subject

    class Offset(torch.nn.Module):  # stands in for a traced LPIPS: a distance per sample
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (x - y).abs().mean(dim=(1, 2, 3)) * 0 + 10.0

    x = torch.zeros(2, 3, 16, 12)
    torch.export.save(torch.export.export(Offset(), (x, x)), str(tmp_path / "lpips.pt2"))
    cfg = replace(_cfg(root, images, "ft_lpips"), unet_steps=0, decoder_steps=1, lpips=str(tmp_path / "lpips.pt2"),
                  work_dir=str(tmp_path / "work"))
    assert finetune(cfg).decoder_losses[0] > 10.0
    with pytest.raises(DreamPoseError, match="LPIPS weights not found"):
        finetune(replace(cfg, lpips=str(tmp_path / "none.pt2")))


def test_missing_subject_pose_names_the_file(subject, tmp_path):
    root, _, v = subject
    Image.fromarray(v.images[1]).save(tmp_path / "solo.png")
    with pytest.raises(DreamPoseError, match=r"solo_densepose\.npy: no pose for subject image"):
        finetune(_cfg(root, (str(tmp_path / "solo.png"),), "never"))
    with pytest.raises(DreamPoseError, match="one pose per image"):
        FinetuneConfig(images=("a.png", "b.png"), poses=("a.npy",))
