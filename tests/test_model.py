"""The DreamPose model: widened UNet, adapter, model folders, construction from SD and CLIP folders."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from dreampose.model import (
    AdapterConfig,
    DreamPoseConfig,
    DreamPoseModel,
    SplitCLIPVAEAdapter,
    bundled_config,
    widen_conv_in,
)
from dreampose.utils import DreamPoseError

TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)


def _sd_unet(seed=0):
    """A 4-channel SD-style UNet with non-trivial weights everywhere (zero-init layers randomised too)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(TINY_UNET).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.1)
    return unet


def test_widened_unet_equals_original_with_zero_poses():
    unet = _sd_unet()
    assert unet.conv_in.bias.abs().sum() > 0  # the bias must matter for this test to mean anything
    wide = widen_conv_in(copy.deepcopy(unet), 10)
    assert wide.conv_in.weight.shape == (32, 14, 3, 3)
    assert wide.config.in_channels == 14
    assert torch.count_nonzero(wide.conv_in.weight[:, 4:]) == 0
    x = torch.randn(3, 4, 16, 12)
    ehs = torch.randn(3, 17, 32)
    with torch.no_grad():
        ref = unet(x, 421, encoder_hidden_states=ehs).sample
        out = wide(torch.cat([x, torch.zeros(3, 10, 16, 12)], 1), 421, encoder_hidden_states=ehs).sample
    assert torch.equal(ref, out), f"max diff {(ref - out).abs().max()}"


def test_widened_unet_sees_the_pose_channels_once_trained():
    wide = widen_conv_in(_sd_unet(), 10)
    with torch.no_grad():
        wide.conv_in.weight[:, 4:].normal_(0, 0.1)
        x = torch.randn(1, 4, 16, 12)
        a = wide(torch.cat([x, torch.zeros(1, 10, 16, 12)], 1), 10, encoder_hidden_states=torch.randn(1, 5, 32)).sample
        b = wide(torch.cat([x, torch.ones(1, 10, 16, 12)], 1), 10, encoder_hidden_states=torch.randn(1, 5, 32)).sample
    assert not torch.allclose(a, b)


def test_adapter_init_returns_clip_tokens_exactly():
    cfg = AdapterConfig(clip_tokens=17, clip_dim=32, latent_channels=4, latent_height=16, latent_width=12)
    torch.manual_seed(0)
    adapter = SplitCLIPVAEAdapter(cfg)
    tokens = torch.randn(2, 17, 32)
    latents = torch.randn(2, 4, 16, 12) * 5
    out = adapter(tokens, latents)
    assert out.shape == (2, 17, 32)
    assert torch.equal(out, tokens)
    # once the VAE columns are trained, the latents change the output
    with torch.no_grad():
        adapter.linear1.weight[:, 17:].fill_(0.1)
    assert not torch.allclose(adapter(tokens, latents), tokens)


def test_adapter_sizes_follow_the_configs_and_resolution():
    vae = SimpleNamespace(**bundled_config("vae_config"))
    clip = SimpleNamespace(**bundled_config("image_encoder_config"))
    cfg = DreamPoseModel.adapter_config_for(vae, clip, 640, 512)
    assert (cfg.clip_tokens, cfg.clip_dim, cfg.latent_channels) == (50, 768, 4)
    assert (cfg.latent_height, cfg.latent_width, cfg.pooled_features) == (80, 64, 1280)
    cfg = DreamPoseModel.adapter_config_for(vae, clip, 512, 512)
    assert cfg.pooled_features == 32 * 32
    adapter = SplitCLIPVAEAdapter(DreamPoseModel.adapter_config_for(vae, clip, 640, 512))
    assert adapter.vae2clip.weight.shape == (768, 1280)
    assert adapter.linear1.weight.shape == (50, 54)


def test_adapter_rejects_wrong_shapes():
    adapter = SplitCLIPVAEAdapter(AdapterConfig(17, 32, 4, 16, 12))
    with pytest.raises(ValueError, match="latents must be"):
        adapter(torch.zeros(1, 17, 32), torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="clip_tokens must be"):
        adapter(torch.zeros(1, 50, 32), torch.zeros(1, 4, 16, 12))


def test_tiny_model_is_deterministic_by_seed():
    a, b, c = DreamPoseModel.tiny(seed=3), DreamPoseModel.tiny(seed=3), DreamPoseModel.tiny(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.unet.config.in_channels == 14
    assert a.latent_size == (16, 12)


def test_conditioning_shapes(tiny_model):
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        cond = tiny_model.encode_image(x)
        null = tiny_model.encode_null_image(1)
    assert cond.shape == (2, 17, 32) and null.shape == (1, 17, 32)
    assert not torch.allclose(cond[0], null[0])
    with pytest.raises(DreamPoseError, match=r"\(B, 3, 64, 48\)"):
        tiny_model.encode_image(torch.zeros(1, 3, 32, 32))


def test_save_load_round_trip_gives_identical_outputs(tiny_model, tmp_path):
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():  # non-default adapter weights, so the round trip must carry them
        model.adapter.linear1.weight.add_(0.01)
    model.save_pretrained(tmp_path / "m")
    for sub in ("unet", "vae", "image_encoder", "adapter", "scheduler"):
        assert (tmp_path / "m" / sub).is_dir()
    assert list((tmp_path / "m").rglob("*.safetensors"))
    assert json.loads((tmp_path / "m" / "dreampose.json").read_text())["n_poses"] == 5
    loaded = DreamPoseModel.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    assert loaded.scheduler_config == model.scheduler_config
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    lat, pose = torch.randn(3, 4, 16, 12), torch.rand(3, 10, 16, 12) * 2 - 1
    with torch.no_grad():
        e1, e2 = model.encode_image(x), loaded.encode_image(x)
        assert torch.equal(e1, e2)
        assert torch.equal(model.predict_noise(lat, pose, 500, e1.repeat(3, 1, 1)), loaded.predict_noise(lat, pose, 500, e2.repeat(3, 1, 1)))
        assert torch.equal(model.decode(lat), loaded.decode(lat))


def test_save_replaces_an_existing_folder_atomically(tiny_model, tmp_path):
    target = tmp_path / "m"
    tiny_model.save_pretrained(target)
    (target / "stale.txt").write_text("old")
    tiny_model.save_pretrained(target)
    assert not (target / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "m"]  # no temporary folders left behind


def test_from_pretrained_errors(tmp_path, tiny_model_dir):
    with pytest.raises(DreamPoseError, match="model folder not found"):
        DreamPoseModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DreamPoseError, match="not a DreamPose model folder"):
        DreamPoseModel.from_pretrained(tmp_path / "empty")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "adapter")
    with pytest.raises(DreamPoseError, match="adapter/ not found"):
        DreamPoseModel.from_pretrained(broken)


def test_config_rejects_unknown_fields_and_bad_values():
    with pytest.raises(DreamPoseError, match="unknown field"):
        DreamPoseConfig.from_dict({"height": 64, "colour": 1})
    with pytest.raises(DreamPoseError, match="n_poses"):
        DreamPoseConfig(n_poses=4)


@pytest.fixture(scope="module")
def sd_and_clip_dirs(tmp_path_factory):
    """A tiny SD 1.x folder (unet/ with 4 channels, vae/, scheduler/) and a CLIP vision folder."""
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("sd")
    _sd_unet(1).save_pretrained(root / "sd" / "unet")
    torch.manual_seed(2)
    AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
                  latent_channels=4).save_pretrained(root / "sd" / "vae")
    (root / "sd" / "scheduler").mkdir()
    (root / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps(bundled_config("scheduler_config")))
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                                     image_size=32, patch_size=8)).save_pretrained(root / "clip")
    return root / "sd", root / "clip"


def test_from_stable_diffusion(sd_and_clip_dirs):
    sd, clip = sd_and_clip_dirs
    model = DreamPoseModel.from_stable_diffusion(sd, clip, height=64, width=48)
    assert model.unet.config.in_channels == 14
    assert model.adapter.config.clip_tokens == 17 and model.adapter.config.pooled_features == 8 * 6
    source = _sd_unet(1)
    x, ehs = torch.randn(1, 4, 16, 12), torch.randn(1, 17, 32)
    with torch.no_grad():  # a reloaded UNet differs from its source in the last bit (fp32 kernels), not more
        torch.testing.assert_close(model.predict_noise(x, torch.zeros(1, 10, 16, 12), 7, ehs),
                                   source(x, 7, encoder_hidden_states=ehs).sample, rtol=1e-5, atol=1e-6)
    with pytest.raises(DreamPoseError, match="unet/ folder not found"):
        DreamPoseModel.from_stable_diffusion(clip, clip)
    with pytest.raises(DreamPoseError, match="multiple of 8"):
        DreamPoseModel.from_stable_diffusion(sd, clip, height=60, width=48)
