"""LoRA subject finetuning (dreampose.lora): a zero update is the base model; merged equals un-merged; the
subject folder holds only the LoRA weights and loads only on its own base; a resumed finetune equals an
uninterrupted one; the runtime, animate and build-engine take --subject."""

import importlib.util
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dreampose.data.synth import synth_video
from dreampose.lora import (DECODER_LORA, SUBJECT_CONFIG, UNET_LORA, LoraSettings, SubjectInfo, add_lora,
                            apply_subject, decoder_targets, lora_weights, merge_lora, model_fingerprint, remove_lora,
                            subject_bytes, training_memory, unet_targets)
from dreampose.model import DreamPoseModel
from dreampose.outputs import MARKER
from dreampose.pipeline import DreamPosePipeline
from dreampose.training import FinetuneConfig, finetune
from dreampose.training.config import RunConfig
from dreampose.utils import DreamPoseError, read_json, write_json
from dreampose_rt.runtime import Runtime

H, W = 32, 24
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="LoRA training needs peft (pip install -e '.[lora]'); make test installs it")


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """A base model folder (tiny, 32 x 24, its zero-initialised inputs randomised as training would) and two
    subject images with their poses beside them."""
    root = tmp_path_factory.mktemp("lora")
    model = DreamPoseModel.tiny(seed=0, height=H, width=W)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in (model.unet.conv_in.weight, model.adapter.linear1.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(root / "base")
    v = synth_video(seed=0, index=5, n_frames=6, height=H, width=W)
    images = []
    for k in (0, 5):
        Image.fromarray(v.images[k]).save(root / f"frame_{k}.png")
        np.save(root / f"frame_{k}_densepose.npy", v.uv[k])
        images.append(str(root / f"frame_{k}.png"))
    return root, tuple(images), v


def _cfg(root: Path, images, out: str, **kw) -> FinetuneConfig:
    values = dict(images=images, base_model=str(root / "base"), output_dir=str(root / out), batch_size=2,
                  unet_steps=6, unet_lr=1e-2, decoder_steps=4, decoder_lr=1e-2, lora_rank=4,
                  lora_targets="attention+conv", lora_decoder=True,
                  run=RunConfig(checkpoint_every=3, keep_checkpoints=0, progress=False))
    values.update(kw)
    return FinetuneConfig(**values)


@pytest.fixture(scope="module")
def lora_run(subject):
    if importlib.util.find_spec("peft") is None:
        pytest.skip("LoRA training needs peft (pip install -e '.[lora]'); make test installs it")
    root, images, _ = subject
    cfg = _cfg(root, images, "subject_r4")
    return cfg, finetune(cfg)


def _render(model: DreamPoseModel, v, image) -> np.ndarray:
    return DreamPosePipeline(model)(image, v.uv[:2], steps=3, progress=False)


def test_targets_cover_attention_and_resnet_convolutions():
    unet = DreamPoseModel.tiny(seed=0, height=H, width=W).unet
    attention = unet_targets(unet, "attention")
    both = unet_targets(unet, "attention+conv")
    assert attention and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for n in attention)
    assert set(attention) < set(both)
    assert all(".resnets." in n and n.endswith(("conv1", "conv2")) for n in set(both) - set(attention))
    assert not any("conv_in" in n for n in both)  # the widened input layer stays as it is
    with pytest.raises(DreamPoseError, match="lora targets"):
        unet_targets(unet, "everything")


@needs_peft
def test_a_zero_update_is_the_base_model(subject):
    """peft starts B at zero: the injected model renders the base model's frames, bit for bit."""
    root, images, v = subject
    base = DreamPoseModel.from_pretrained(root / "base")
    reference = _render(base, v, images[0])
    add_lora(base.unet, unet_targets(base.unet, "attention+conv"), LoraSettings(rank=4))
    add_lora(base.vae.decoder, decoder_targets(base.vae.decoder), LoraSettings(rank=4))
    weights = lora_weights(base.unet)
    assert weights and all(not w.any() for k, w in weights.items() if k.endswith("lora_B"))
    assert np.array_equal(_render(base, v, images[0]), reference)


@needs_peft
def test_merged_equals_unmerged(subject):
    """Random A and B: the model with the LoRA layers computing the update on the fly, and the base with the
    update merged into its weights, give the same UNet output within fp32 rounding, and frames within one
    level."""
    root, images, v = subject
    settings = LoraSettings(rank=3, alpha=6.0, targets="attention+conv")
    live = DreamPoseModel.from_pretrained(root / "base")
    names = unet_targets(live.unet, settings.targets)
    add_lora(live.unet, names, settings)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for name, p in live.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    merged = DreamPoseModel.from_pretrained(root / "base")
    assert merge_lora(merged.unet, lora_weights(live.unet), settings.scale, "test") == len(names)
    sample = torch.randn(2, merged.unet.config.in_channels, *merged.latent_size, generator=torch.Generator().manual_seed(3))
    ehs = torch.randn(2, 4, merged.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([500, 500])
    with torch.no_grad():
        a = live.unet(sample, t, encoder_hidden_states=ehs).sample
        b = merged.unet(sample, t, encoder_hidden_states=ehs).sample
        base = DreamPoseModel.from_pretrained(root / "base").unet(sample, t, encoder_hidden_states=ehs).sample
    assert (a - base).abs().max() > 1e-2  # the update changes the output
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    remove_lora(live.unet)
    assert not lora_weights(live.unet)


def test_the_lora_finetune_writes_a_small_subject_folder(lora_run, subject):
    cfg, r = lora_run
    root, images, v = subject
    folder = r.model_dir
    assert sorted(p.name for p in folder.iterdir()) == sorted([MARKER, SUBJECT_CONFIG, UNET_LORA, DECODER_LORA,
                                                               "adapter.safetensors"])
    info = SubjectInfo.load(folder)
    assert info.lora == LoraSettings(rank=4, targets="attention+conv", decoder=True)
    assert info.base_fingerprint == model_fingerprint(root / "base")
    unet = load_file(str(folder / UNET_LORA))
    base = DreamPoseModel.from_pretrained(root / "base")
    assert {k.rsplit(".", 1)[0] for k in unet} == set(unet_targets(base.unet, "attention+conv"))
    assert any(w.any() for k, w in unet.items() if k.endswith("lora_B"))  # trained: B left zero
    full = sum(f.stat().st_size for f in (root / "base" / "unet").glob("*.safetensors"))
    assert subject_bytes(folder) < full
    assert len(r.unet_losses) == cfg.unet_steps and len(r.decoder_losses) == cfg.decoder_steps
    for name, losses in (("unet", r.unet_losses), ("decoder", r.decoder_losses)):
        assert np.mean(losses[-2:]) < np.mean(losses[:2]), name
    # the work folder's checkpoints hold only the trained weights
    ckpt = load_file(str(Path(f"{cfg.output_dir}.work") / "unet" / "step_0000003" / "model.safetensors"))
    assert ckpt and all("lora_" in k or k.startswith("adapter.") for k in ckpt)


def test_the_runtime_merges_a_subject_at_load(lora_run, subject):
    _, r = lora_run
    root, images, v = subject
    merged = DreamPoseModel.from_pretrained(root / "base")
    apply_subject(merged, r.model_dir, model_fingerprint(root / "base"))
    reference = _render(merged, v, images[0])
    assert not np.array_equal(reference, _render(DreamPoseModel.from_pretrained(root / "base"), v, images[0]))
    rt = Runtime.from_pretrained(root / "base", backend="torch", device="cpu", subject=r.model_dir)
    out = rt.render(v.uv[:2], images[0], steps=3)
    d = np.abs(out.astype(int) - reference.astype(int))
    assert d.max() <= 2 and d.mean() <= 0.05
    plain = Runtime.from_pretrained(root / "base", backend="torch", device="cpu")
    assert rt.identity()["model"] != plain.identity()["model"]  # resumable renders never mix the two


def test_a_subject_of_another_base_is_refused(lora_run, subject, tmp_path):
    _, r = lora_run
    root, _, _ = subject
    DreamPoseModel.tiny(seed=7, height=H, width=W).save_pretrained(tmp_path / "other")
    with pytest.raises(DreamPoseError, match="trained on another base model"):
        Runtime.from_pretrained(tmp_path / "other", backend="torch", device="cpu", subject=r.model_dir)
    with pytest.raises(DreamPoseError, match="not a subject folder"):
        Runtime.from_pretrained(root / "base", backend="torch", device="cpu", subject=root / "base")
    broken = tmp_path / "broken"
    shutil.copytree(r.model_dir, broken)
    (broken / UNET_LORA).unlink()
    with pytest.raises(DreamPoseError, match=f"{UNET_LORA}: not found"):
        Runtime.from_pretrained(root / "base", backend="torch", device="cpu", subject=broken)
    half = tmp_path / "half"
    shutil.copytree(r.model_dir, half)
    w = load_file(str(half / UNET_LORA))
    del w[next(k for k in w if k.endswith("lora_B"))]
    save_file(w, str(half / UNET_LORA))
    with pytest.raises(DreamPoseError, match="only one of lora_A and lora_B"):
        Runtime.from_pretrained(root / "base", backend="torch", device="cpu", subject=half)
    newer = tmp_path / "newer"
    shutil.copytree(r.model_dir, newer)
    write_json(newer / SUBJECT_CONFIG, {**read_json(newer / SUBJECT_CONFIG), "format_version": 99})
    with pytest.raises(DreamPoseError, match="subject format 99"):
        Runtime.from_pretrained(root / "base", backend="torch", device="cpu", subject=newer)


def test_a_resumed_lora_finetune_equals_an_uninterrupted_one(lora_run, subject):
    cfg, full = lora_run
    root, images, _ = subject
    resumed_cfg = replace(cfg, output_dir=str(root / "subject_resumed"))
    work, rwork = Path(f"{cfg.output_dir}.work"), Path(f"{resumed_cfg.output_dir}.work")
    shutil.copytree(work / "unet" / "step_0000003", rwork / "unet" / "step_0000003")
    shutil.copy(work / MARKER, rwork / MARKER)  # as a kill after the first checkpoint leaves the work folder
    r = finetune(resumed_cfg, resume=True)
    assert r.unet_losses == full.unet_losses[3:]
    assert r.decoder_losses == full.decoder_losses
    for name in (UNET_LORA, DECODER_LORA, "adapter.safetensors"):
        a, b = load_file(str(full.model_dir / name)), load_file(str(r.model_dir / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # a checkpoint of another LoRA shape is refused, naming the file
    for k, (change, error) in enumerate(((dict(lora_rank=8), "shape mismatches"),
                                         (dict(lora_targets="attention"), "trained parameters"))):
        other = replace(resumed_cfg, output_dir=str(root / f"subject_other{k}"), **change)
        owork = Path(f"{other.output_dir}.work")
        shutil.copytree(work / "unet" / "step_0000003", owork / "unet" / "step_0000003")
        shutil.copy(work / MARKER, owork / MARKER)
        with pytest.raises(DreamPoseError, match=f"step_0000003/model.safetensors.*{error}"):
            finetune(other, resume=True)


def test_lora_settings_are_checked_before_training(subject):
    root, images, _ = subject
    with pytest.raises(DreamPoseError, match="lora_decoder needs lora_rank"):
        _cfg(root, images, "x", lora_rank=0)
    with pytest.raises(DreamPoseError, match="lora targets"):
        _cfg(root, images, "x", lora_targets="all")
    with pytest.raises(DreamPoseError, match="lora_rank"):
        _cfg(root, images, "x", lora_rank=-1)
    assert not (root / "x").exists()


def test_training_memory_counts_what_lora_saves():
    model = DreamPoseModel.tiny(seed=0, height=H, width=W)
    full = training_memory(model, None)
    lora = training_memory(model, LoraSettings(rank=4))
    adapter = sum(p.numel() for p in model.adapter.parameters())
    n_unet = sum(p.numel() for p in model.unet.parameters())
    assert full["trained_parameters"] == n_unet + adapter
    assert adapter < lora["trained_parameters"] < full["trained_parameters"]
    assert lora["optimizer_state"] == 8 * lora["trained_parameters"] and lora["gradients"] < full["gradients"]


def test_animate_and_finetune_take_a_subject_on_the_command_line(lora_run, subject, tmp_path, capsys):
    from dreampose_rt.cli import main

    _, r = lora_run
    root, images, v = subject
    poses = tmp_path / "poses.npy"
    np.save(poses, v.uv[:2])
    args = ["animate", "--model", str(root / "base"), "--image", images[0], "--poses", str(poses), "--steps", "3",
            "--quiet", "--device", "cpu"]
    assert main(args + ["--subject", str(r.model_dir), "--out", str(tmp_path / "s")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    from dreampose.video import read_png

    with_subject, without = read_png(tmp_path / "s" / "frame_00000.png"), read_png(tmp_path / "b" / "frame_00000.png")
    assert not np.array_equal(with_subject, without)
    capsys.readouterr()
    assert main(args + ["--subject", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none: subject folder not found" in err[0]
    assert not (tmp_path / "x").exists()
    # the training CLI: --lora-rank writes a subject folder
    code = main(["finetune", "--base", str(root / "base"), "--image", images[0], "--out", str(tmp_path / "cli_subject"),
                 "--lora-rank", "2", "--lora-targets", "attention", "--unet-steps", "2", "--decoder-steps", "2",
                 "--quiet"])
    assert code == 0
    info = SubjectInfo.load(tmp_path / "cli_subject")
    assert info.lora == LoraSettings(rank=2, targets="attention") and not (tmp_path / "cli_subject" / DECODER_LORA).exists()


def test_engines_of_a_subject_are_refitted_from_the_base_engines(lora_run, subject, tmp_path):
    """build-engine --subject: the base model's engines, refitted with the merged weights; the runtime takes
    them with --subject and refuses the base engines for a subject (the weights check)."""
    pytest.importorskip("onnxruntime")
    from dreampose_rt.export.build import build_engines

    _, r = lora_run
    root, images, v = subject
    out = tmp_path / "eng"
    base = build_engines(root / "base", out, backend="onnxruntime", max_frames=1)
    assert {n.onnx_action for n in base.networks.values()} == {"built"}
    plain = Runtime.from_pretrained(root / "base", backend="torch", device="cpu")
    with pytest.raises(DreamPoseError, match="weights differ"):
        Runtime.from_pretrained(root / "base", backend="onnxruntime", engines=out, device="cpu", subject=r.model_dir)
    refit = build_engines(root / "base", out, backend="onnxruntime", max_frames=1, subject=r.model_dir)
    assert refit.networks["unet"].onnx_action == "refit" and refit.networks["vae_decoder"].onnx_action == "refit"
    assert refit.networks["cond_encoder"].onnx_action == "refit"  # the adapter's weights come with the subject
    rt = Runtime.from_pretrained(root / "base", backend="onnxruntime", engines=out, device="cpu", subject=r.model_dir)
    torch_rt = Runtime.from_pretrained(root / "base", backend="torch", device="cpu", subject=r.model_dir)
    a, b = rt.render(v.uv[:1], images[0], steps=3), torch_rt.render(v.uv[:1], images[0], steps=3)
    d = np.abs(a.astype(int) - b.astype(int))
    assert d.max() <= 2 and d.mean() <= 0.1
    assert not np.array_equal(a, plain.render(v.uv[:1], images[0], steps=3))
    with pytest.raises(DreamPoseError, match="not both"):
        build_engines(root / "base", out, backend="onnxruntime", subject=r.model_dir, refit_from=root / "base")


@needs_peft
def test_the_memory_benchmark_trains_what_training_memory_counts():
    """benchmarks.bench_lora_memory (the GPU session's 12 GB check) on the CPU: the parameters its optimizer
    trains are the ones dreampose.lora.training_memory counts (it asserts so), for LoRA and full."""
    from benchmarks.bench_lora_memory import measure

    lora = measure("lora", "tiny", torch.device("cpu"), 4, "fp32", "no", 1)
    full = measure("full", "tiny", torch.device("cpu"), 4, "fp32", "no", 1)
    assert lora["counted"]["trained_parameters"] < full["counted"]["trained_parameters"]
    assert np.isfinite(lora["loss"]) and "peak_allocated_bytes" not in lora  # measured on CUDA only
    with pytest.raises(DreamPoseError, match="already holds LoRA layers"):
        model = DreamPoseModel.tiny(seed=0, height=H, width=W)
        add_lora(model.unet, unet_targets(model.unet, "attention"), LoraSettings())
        training_memory(model, LoraSettings())


def test_a_subject_folder_merges_without_peft(lora_run, subject, monkeypatch):
    """Rendering a subject needs no peft: the merge is plain torch."""
    _, r = lora_run
    root, images, v = subject
    with_peft = Runtime.from_pretrained(root / "base", backend="torch", device="cpu", subject=r.model_dir)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now fails
    rt = Runtime.from_pretrained(root / "base", backend="torch", device="cpu", subject=r.model_dir)
    assert all(torch.equal(a, b) for a, b in zip(rt.model.unet.parameters(), with_peft.model.unet.parameters()))
    root_cfg = _cfg(root, images, "never")
    with pytest.raises(DreamPoseError, match=r"needs peft: pip install 'dreampose-rt\[lora\]'"):
        finetune(root_cfg)
    assert not (root / "never").exists() and not (root / "never.work").exists()


def test_the_base_fingerprint_is_its_content_only(subject, tmp_path):
    """A copy elsewhere, a re-save, other rendering defaults and folders kept inside (engines, subjects) leave
    the fingerprint alone; any weight changes it."""
    root, _, _ = subject
    base = root / "base"
    fp = model_fingerprint(base)
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    (copy / "engines").mkdir()
    (copy / "engines" / "unet.json").write_text("{}")
    (copy / "subject_inside").mkdir()
    save_file({"x": torch.zeros(1)}, str(copy / "subject_inside" / "unet_lora.safetensors"))
    cfg = read_json(copy / "dreampose.json")
    write_json(copy / "dreampose.json", {**cfg, "s_image": cfg["s_image"] + 1})
    unet_cfg = read_json(copy / "unet" / "config.json")
    write_json(copy / "unet" / "config.json", {**unet_cfg, "_name_or_path": "/somewhere/else"})
    assert model_fingerprint(copy) == fp
    model = DreamPoseModel.from_pretrained(copy)
    with torch.no_grad():
        model.unet.conv_out.bias.add_(1e-3)
    model.save_pretrained(tmp_path / "changed")
    assert model_fingerprint(tmp_path / "changed") != fp
    with pytest.raises(DreamPoseError, match="not found"):
        model_fingerprint(tmp_path)


def test_broken_factors_are_refused_naming_the_file_and_layer(lora_run, subject, tmp_path):
    _, r = lora_run
    root, _, _ = subject

    def broken(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(r.model_dir, folder)
        w = load_file(str(folder / UNET_LORA))
        change(w)
        save_file({k: v.contiguous() for k, v in w.items()}, str(folder / UNET_LORA))
        return folder

    def load(folder: Path) -> None:
        Runtime.from_pretrained(root / "base", backend="torch", device="cpu", subject=folder)

    first_a = next(k for k in load_file(str(r.model_dir / UNET_LORA)) if k.endswith("lora_A"))
    first_b = first_a[:-1] + "B"
    cases = {
        "rank": (lambda w: w.update({first_a: w[first_a][:2], first_b: w[first_b][:, :2]}), "not a rank-4 pair"),
        "pair": (lambda w: w.update({first_a: w[first_a][:3]}), "not a rank-4 pair"),
        "odd": (lambda w: w.update({"something.else": torch.zeros(1)}), "not a LoRA factor"),
        "dims": (lambda w: w.update({first_a: w[first_a][..., None, None], first_b: w[first_b][..., None, None]}),
                 "factors are 4-D"),
        "nan": (lambda w: w.update({first_b: torch.full_like(w[first_b], float("nan"))}), "non-finite"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(DreamPoseError, match=message):
            load(broken(name, change))
    garbage = tmp_path / "garbage"
    shutil.copytree(r.model_dir, garbage)
    (garbage / UNET_LORA).write_bytes(b"not safetensors")
    with pytest.raises(DreamPoseError, match=f"{UNET_LORA}: not a readable safetensors file"):
        load(garbage)


def test_subject_values_and_the_demo_default(tmp_path):
    from dreampose_rt import demo
    from dreampose_rt.demo import runtime_subject as _subject

    for bad in (True, ""):
        with pytest.raises(DreamPoseError, match="subject must be a subject folder"):
            Runtime.from_pretrained(backend="torch", device="cpu", subject=bad)
    # the CLI: the demo model with a user's image renders without the demo subject's LoRA
    assert _subject(None, "me.png", None) is False
    assert _subject(None, None, None) is None and _subject("m", "me.png", None) is None
    assert _subject(None, "me.png", "subjects/me") == "subjects/me"
    plain = Runtime.from_pretrained(backend="torch", device="cpu", subject=False)
    assert plain.subject is None and Runtime.from_pretrained(backend="torch", device="cpu").subject == demo.DEMO_SUBJECT_LORA
