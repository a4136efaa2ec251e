"""The from-scratch VAE training used by the demo model (dreampose.training.autoencoder)."""

import pytest
import torch

from dreampose.data.dataset import to_pixels
from dreampose.data.synth import synth_video
from dreampose.model import DreamPoseModel
from dreampose.training.autoencoder import AutoencoderConfig, latent_scaling_factor, train_autoencoder
from dreampose.utils import DreamPoseError


def frames(n_videos=2):
    return torch.stack([to_pixels(f, (32, 24)) for v in range(n_videos) for f in synth_video(0, v, 8, 32, 24).images])


@pytest.mark.parametrize("sample_posterior", [False, True])
def test_autoencoder_learns_and_sets_the_scaling_factor(sample_posterior):
    vae = DreamPoseModel.tiny(seed=0, height=32, width=24).vae
    x = frames()
    cfg = AutoencoderConfig(steps=40, batch_size=8, lr=2e-3, sample_posterior=sample_posterior, log_every=20)
    res = train_autoencoder(vae, x, cfg)
    assert len(res.l1) == 40
    assert sum(res.l1[-5:]) / 5 < 0.8 * sum(res.l1[:5]) / 5, (res.l1[:5], res.l1[-5:])
    assert vae.config.scaling_factor == pytest.approx(res.scaling_factor)
    with torch.no_grad():  # scaled latents have unit variance
        z = vae.encode(x).latent_dist.mean * res.scaling_factor
    assert z.std().item() == pytest.approx(1.0, rel=1e-3)
    assert not any(p.requires_grad for p in vae.parameters())


def test_autoencoder_is_deterministic():
    x = frames(1)
    out = []
    for _ in range(2):
        vae = DreamPoseModel.tiny(seed=0, height=32, width=24).vae
        out.append(train_autoencoder(vae, x, AutoencoderConfig(steps=3, batch_size=4)).losses)
    assert out[0] == out[1]


def test_autoencoder_trains_on_crops_and_runs_at_full_size():
    vae = DreamPoseModel.tiny(seed=0, height=32, width=24).vae
    x = frames(1)
    res = train_autoencoder(vae, x, AutoencoderConfig(steps=30, batch_size=8, lr=2e-3, crop=(16, 12)))
    assert sum(res.l1[-5:]) < sum(res.l1[:5])
    with torch.no_grad():
        assert vae.decode(vae.encode(x[:2]).latent_dist.mean).sample.shape == (2, 3, 32, 24)
    with pytest.raises(DreamPoseError, match="crop"):
        train_autoencoder(vae, x, AutoencoderConfig(steps=1, crop=(64, 12)))


def test_autoencoder_checks_its_inputs():
    vae = DreamPoseModel.tiny(seed=0, height=32, width=24).vae
    with pytest.raises(DreamPoseError, match="frames must be"):
        train_autoencoder(vae, torch.zeros(4, 32, 24))
    with pytest.raises(DreamPoseError, match="steps"):
        train_autoencoder(vae, torch.zeros(4, 3, 32, 24), AutoencoderConfig(steps=0))
    assert latent_scaling_factor(vae, frames(1)) > 0
