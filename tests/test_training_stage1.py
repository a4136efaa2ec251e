"""Stage 1 on SynthFashion: the loss goes down, resume equals an uninterrupted run, dropped conditioning is
exactly the pipeline's null conditioning, bad datasets fail before training, the CLI writes a model folder."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreampose.data.synth import SynthFashionConfig, write_synth_fashion
from dreampose.guidance import branch_batch
from dreampose.outputs import MARKER
from dreampose.pipeline import DreamPosePipeline
from dreampose.poses import pose_window, prepare_poses
from dreampose.training import Stage1Config, train_stage1
from dreampose.training.config import OptimConfig, RunConfig, load_config, save_config
from dreampose.training.diffusion import FrozenEncoders
from dreampose.utils import DreamPoseError
from dreampose_rt.cli import main


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return write_synth_fashion(tmp_path_factory.mktemp("data") / "synth",
                               SynthFashionConfig(seed=0, n_videos=2, n_frames=4, height=32, width=24))


def _cfg(data, out, **kw):
    return Stage1Config(data=str(data), output_dir=str(out), base_model="tiny", height=32, width=24,
                        batch_size=4, micro_batch_size=2, max_steps=8, ema_decay=0.9, optim=OptimConfig(lr=1e-3),
                        run=RunConfig(checkpoint_every=4, keep_checkpoints=0, progress=False), **kw)


@pytest.fixture(scope="module")
def full_run(synth_dir, tmp_path_factory):
    cfg = _cfg(synth_dir, tmp_path_factory.mktemp("runs") / "full")
    return cfg, train_stage1(cfg)


def test_a_few_steps_lower_the_loss(full_run):
    _, result = full_run
    losses = result.losses
    assert len(losses) == 8 and all(np.isfinite(losses))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    print(f"stage 1 loss: first 3 {first:.4f} -> last 3 {last:.4f}")
    assert last < 0.85 * first


def test_resume_equals_uninterrupted(full_run, tmp_path):
    cfg, full = full_run
    out = tmp_path / "resumed"
    src = Path(cfg.output_dir) / "checkpoints" / "step_0000004"
    shutil.copytree(src, out / "checkpoints" / src.name)
    shutil.copy(Path(cfg.output_dir) / "metrics.jsonl", out / "metrics.jsonl")  # as a crash would leave it
    shutil.copy(Path(cfg.output_dir) / MARKER, out / MARKER)
    resumed = train_stage1(replace(cfg, output_dir=str(out)), resume="latest")
    assert resumed.start_step == 4 and full.start_step == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps and len(steps) == len(set(steps))  # records after step 4 were not written twice
    assert resumed.losses == full.losses[4:]  # bit for bit on the CPU
    a = load_file(str(full.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = out / "checkpoints" / "step_0000008"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 8 and state["configs"]["stage1"]["optim"]["lr"] == 1e-3


def test_a_fresh_run_over_checkpoints_and_a_changed_batch_are_refused(full_run, tmp_path):
    cfg, _ = full_run
    with pytest.raises(DreamPoseError, match="holds checkpoints of an earlier run"):
        train_stage1(cfg)  # no --resume, into a folder with checkpoints
    out = tmp_path / "r"
    src = Path(cfg.output_dir) / "checkpoints" / "step_0000004"
    shutil.copytree(src, out / "checkpoints" / src.name)
    shutil.copy(Path(cfg.output_dir) / MARKER, out / MARKER)
    with pytest.raises(DreamPoseError, match="batch settings"):
        train_stage1(replace(cfg, output_dir=str(out), batch_size=8), resume="latest")


def test_mixed_precision_leaves_the_frozen_networks_untouched(synth_dir, tmp_path):
    """bf16 runs the frozen VAE and CLIP in bf16; the model folder must still hold their fp32 weights."""
    from dreampose.model import DreamPoseModel

    cfg = replace(_cfg(synth_dir, tmp_path / "bf16"), max_steps=2,
                  run=RunConfig(checkpoint_every=0, keep_checkpoints=0, progress=False, mixed_precision="bf16"))
    result = train_stage1(cfg)
    base = DreamPoseModel.tiny(seed=cfg.run.seed, height=32, width=24)
    trained = DreamPoseModel.from_pretrained(result.model_dir)
    for name in ("vae", "image_encoder"):
        a, b = getattr(base, name).state_dict(), getattr(trained, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert not torch.equal(base.unet.conv_in.weight, trained.unet.conv_in.weight)


def test_dropped_conditioning_is_the_pipelines_null_conditioning(tiny_model, pose_seq):
    enc = FrozenEncoders(tiny_model)
    pixels = torch.rand(3, 3, 64, 48) * 2 - 1
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        clip, lat = enc.image_inputs(pixels, drop)
        ehs = tiny_model.adapter(clip, lat)
        torch.testing.assert_close(ehs[1:2], tiny_model.encode_null_image(1), rtol=0, atol=1e-6)
        torch.testing.assert_close(ehs[0:1], tiny_model.encode_image(pixels[0:1]), rtol=0, atol=1e-6)
    # the pose window: what the pipeline builds from the same poses, and zeros (its null pose) when dropped
    c = tiny_model.config
    frames = [0, 3]
    windows = torch.from_numpy(np.stack([pose_seq[[max(0, min(5, k)) for k in range(j - 2, j + 3)]] for j in frames]))
    got = enc.pose_window(windows, torch.tensor([False, True]))
    want = pose_window(prepare_poses(pose_seq, (c.height, c.width), tiny_model.latent_size), frames)
    assert torch.equal(got[0], want[0])
    _, null_pose, _ = branch_batch(torch.zeros(1, 4, 16, 12), want[1:], ehs[:1], ehs[:1])
    assert torch.equal(got[1], null_pose[0])


def test_bad_dataset_and_batch_fail_before_training(tmp_path, synth_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DreamPoseError, match="empty dataset"):
        train_stage1(_cfg(tmp_path / "empty", tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(DreamPoseError, match="batch_size 3 is not a multiple of micro_batch_size 2"):
        train_stage1(replace(_cfg(synth_dir, tmp_path / "run"), batch_size=3, micro_batch_size=2))
    assert not (tmp_path / "run").exists()


def test_config_round_trips_through_json(tmp_path):
    cfg = _cfg("synth", tmp_path, window="copies")
    save_config(cfg, tmp_path / "c.json")
    assert load_config(Stage1Config, tmp_path / "c.json") == cfg


def test_cli_train_writes_a_model_folder_the_pipeline_loads(tmp_path, synth_dir, subject_image, pose_seq):
    out = tmp_path / "run"
    assert main(["train", "--data", str(synth_dir), "--out", str(out), "--base", "tiny", "--height", "32", "--width", "24", "--max-steps", "2",
                 "--batch-size", "2", "--micro-batch-size", "2", "--lr", "1e-4", "--quiet"]) == 0
    assert load_config(Stage1Config, out / "config.json").optim.lr == 1e-4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # log_every 10: the last step is logged
    frames = DreamPosePipeline.from_pretrained(out / "model")(subject_image, pose_seq[:2], steps=2, progress=False)
    assert frames.shape == (2, 32, 24, 3)
