"""Import of the original release's checkpoints (.pth state dicts, optionally with DDP's module. prefix)."""

import pytest
import torch

from dreampose.convert import import_release, load_release_unet, load_release_vae_decoder, load_state_dict_file
from dreampose.model import DreamPoseModel
from dreampose.utils import DreamPoseError


def _release_files(model, folder, prefix):
    folder.mkdir(parents=True, exist_ok=True)
    unet = {prefix + k: v.clone() for k, v in model.unet.state_dict().items()}
    adapter = {prefix + k: v.clone() for k, v in model.adapter.state_dict().items()}
    assert {k[len(prefix):] for k in adapter} == {"linear1.weight", "linear1.bias", "vae2clip.weight", "vae2clip.bias"}
    assert unet[prefix + "conv_in.weight"].shape[1] == 14
    torch.save(unet, folder / "unet.pth")
    torch.save(adapter, folder / "adapter.pth")
    return folder / "unet.pth", folder / "adapter.pth"


@pytest.mark.parametrize("prefix", ["", "module."])
def test_import_release_round_trip(tmp_path, prefix):
    trained = DreamPoseModel.tiny(seed=1)
    with torch.no_grad():
        trained.adapter.linear1.weight.normal_()
    unet_pth, adapter_pth = _release_files(trained, tmp_path / "release", prefix)
    base = DreamPoseModel.tiny(seed=2)  # different weights: everything must come from the files
    import_release(base, unet_pth, adapter_pth, tmp_path / "model")
    loaded = DreamPoseModel.from_pretrained(tmp_path / "model")
    for name in ("unet", "adapter"):
        a, b = getattr(trained, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_partial_or_wrong_state_dict_lists_the_keys(tmp_path):
    model = DreamPoseModel.tiny(seed=0)
    state = model.unet.state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("conv_out")}
    with pytest.raises(DreamPoseError, match=r"2 missing keys: conv_out.bias, conv_out.weight"):
        load_release_unet(model, partial, "unet.pth")
    extra = dict(state, **{"module.extra.weight": torch.zeros(1)})
    with pytest.raises(DreamPoseError, match=r"unexpected keys: extra.weight"):
        load_release_unet(model, extra, "unet.pth")
    four = dict(state, **{"conv_in.weight": state["conv_in.weight"][:, :4].clone()})
    with pytest.raises(DreamPoseError, match=r"conv_in.weight: checkpoint \(32, 4, 3, 3\) vs model \(32, 14, 3, 3\)"):
        load_release_unet(model, four, "unet.pth")


def test_vae_decoder_only_state_dict(tmp_path):
    model, other = DreamPoseModel.tiny(seed=0), DreamPoseModel.tiny(seed=5)
    decoder = {k: v for k, v in other.vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    encoder_before = model.vae.encoder.conv_in.weight.clone()
    load_release_vae_decoder(model, {"module." + k: v for k, v in decoder.items()})
    assert torch.equal(model.vae.decoder.conv_in.weight, other.vae.decoder.conv_in.weight)
    assert torch.equal(model.vae.encoder.conv_in.weight, encoder_before)
    del decoder["decoder.conv_out.weight"]
    with pytest.raises(DreamPoseError, match="decoder.conv_out.weight"):
        load_release_vae_decoder(model, decoder)


def test_load_state_dict_file_errors(tmp_path):
    with pytest.raises(DreamPoseError, match="checkpoint not found"):
        load_state_dict_file(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DreamPoseError, match="bad.pth: cannot read"):
        load_state_dict_file(bad)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"a": torch.ones(2)}}, wrapped)
    assert list(load_state_dict_file(wrapped)) == ["a"]
