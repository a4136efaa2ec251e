"""Deep-feature caching (dreampose.deep_cache) over diffusers' UNet2DConditionModel: a full call is the UNet,
a shallow call runs the outermost blocks on the kept feature, and the block structure it relies on holds."""

from __future__ import annotations

import pytest
import torch

from dreampose.deep_cache import DeepFeatures, supports, unet_forward, unet_full, unet_shallow
from dreampose.model import DreamPoseModel, bundled_config


def _inputs(unet, batch: int, h: int, w: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet.config.in_channels, h, w, generator=g)
    ehs = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=g)
    return x, ehs


def _three_level_unet():
    """A small UNet with SD 1.x's layout features the tiny one lacks: 3 levels, 2 layers per block, cross
    attention in every down block but the last, an odd latent size (upsample sizes are forwarded)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=14, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=8,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("which", ["tiny", "three_level"])
def test_a_full_call_is_the_unet_exactly(tiny_model, which):
    unet = tiny_model.unet if which == "tiny" else _three_level_unet()
    h, w = (16, 12) if which == "tiny" else (10, 14)  # 10 x 14: not a multiple of 4, upsample sizes forwarded
    x, ehs = _inputs(unet, 6, h, w, 5)
    t = torch.tensor(321)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ehs, return_dict=False)[0]
        eps, deep = unet_full(unet, x, t, ehs)
        features = DeepFeatures(frames=2)
        kept = unet_forward(unet, x, t, ehs, features, full=True)
    assert torch.equal(eps, ref) and torch.equal(kept, ref)
    assert torch.equal(features.buffer, deep) and deep.shape[1] == unet.up_blocks[-2].resnets[-1].out_channels
    # the same input once more, shallow: the kept deep feature is the one it would compute, so the result is too
    with torch.no_grad():
        assert torch.allclose(unet_forward(unet, x, t, ehs, features, full=False), ref, atol=1e-6)


def test_predict_noise_with_caching_off_is_the_plain_unet(tiny_model):
    h, w = tiny_model.latent_size
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(3, 4, h, w, generator=g)
    pose = torch.rand(3, 10, h, w, generator=g) * 2 - 1
    ehs = torch.randn(3, 17, 32, generator=g)
    with torch.no_grad():
        plain = tiny_model.predict_noise(lat, pose, 500, ehs)
        cached = tiny_model.predict_noise(lat, pose, 500, ehs, features=DeepFeatures(frames=1), full=True)
    assert torch.equal(plain, cached)


def test_a_shallow_call_reuses_the_kept_feature_row_for_row(tiny_model):
    """F = 2 frames: a full call on 3F keeps all rows; a shallow call on the image-and-pose branch (F rows)
    reads rows [F, 2F) (branch-major, dreampose.guidance)."""
    unet = tiny_model.unet
    x, ehs = _inputs(unet, 6, 16, 12, 17)
    features = DeepFeatures(frames=2)
    with torch.no_grad():
        unet_forward(unet, x, torch.tensor(700), ehs, features, full=True)
        kept = features.buffer.clone()
        shallow_f = unet_forward(unet, x[2:4], torch.tensor(650), ehs[2:4], features, full=False)
        direct = unet_shallow(unet, x[2:4], torch.tensor(650), ehs[2:4], kept[2:4])
        full_f = unet_forward(unet, x[2:4], torch.tensor(650), ehs[2:4], None, full=True)
    assert torch.equal(shallow_f, direct)
    assert not torch.equal(shallow_f, full_f)  # an approximation: the deep feature is from another timestep
    assert ((shallow_f - full_f).norm() / full_f.norm()).item() < 0.5
    with torch.no_grad():
        unet_forward(unet, x[2:4], torch.tensor(600), ehs[2:4], features, full=True)  # F rows: only [F, 2F) change
    assert torch.equal(features.buffer[:2], kept[:2]) and not torch.equal(features.buffer[2:4], kept[2:4])
    with pytest.raises(ValueError, match="neither 3F nor F"):
        features.rows(5)
    with pytest.raises(ValueError, match="needs the deep features"):
        unet_forward(unet, x, torch.tensor(1), ehs, DeepFeatures(frames=2), full=False)


def test_the_block_structure_it_relies_on():
    """Fails when a diffusers update changes what deep-feature caching relies on: the SD 1.5 UNet's blocks,
    their names, and the skips of its last up block coming from conv_in and the first level alone."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config({k: v for k, v in bundled_config("unet_config").items()
                                                 if not k.startswith("_")})
    assert supports(unet) is None
    assert len(unet.down_blocks) == len(unet.up_blocks) == 4
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    assert len(first.resnets) == 2 and len(last.resnets) == 3 and first.downsamplers is not None
    assert last.upsamplers is None and unet.up_blocks[-2].upsamplers is not None
    assert first.has_cross_attention and last.has_cross_attention
    assert unet.up_blocks[-2].resnets[-1].out_channels == last.resnets[0].in_channels - first.resnets[-1].out_channels
    for name in ("conv_in", "time_proj", "time_embedding", "conv_norm_out", "conv_act", "conv_out", "num_upsamplers"):
        assert hasattr(unet, name), name


def test_unsupported_unets_say_why(tiny_model):
    import copy

    unet = copy.deepcopy(tiny_model.unet)
    unet.register_to_config(class_embed_type="timestep")
    assert "class_embed_type" in supports(unet)
    del unet.time_embedding
    assert "no time_embedding" in supports(unet)


def test_sd15_work_of_the_shallow_path():
    """On the SD 1.5 UNet at 80 x 64 the outermost level is the most expensive one (full-resolution
    attention): a shallow call costs ~40% of a full one."""
    from dreampose.flops import unet_flops_per_sample

    per = unet_flops_per_sample(DreamPoseModel.sd15_random())
    assert 1.0e12 < per["full"] < 1.1e12  # docs/performance.md: ~1.05 TFLOP per sample
    assert 0.35 < per["shallow"] / per["full"] < 0.45
