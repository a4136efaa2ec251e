"""The shipped demo model: it loads by default, and it visibly works on held-out SynthFashion.

The quality check renders 2 held-out videos (SynthFashion seed 1000: subjects and motions not seen in
training) x 3 target frames with DPM-Solver++ at 15 steps (the 100-step PNDM reference is ~7x slower;
docs/quality.md shows the two agree), and requires the rendered figure to follow the target pose:
foreground IoU >= 0.6 and at least 0.1 above the IoU of repeating the subject image.
"""

import numpy as np
import pytest

from dreampose.utils import DreamPoseError
from dreampose_rt import demo
from dreampose.evaluation import evaluate
from dreampose.settings import EvalProtocol, SamplingSettings


@pytest.fixture(scope="module")
def model():
    return demo.demo_model()


def test_demo_assets_load(model):
    c = model.config
    assert (c.height, c.width) == (demo.DEMO_HEIGHT, demo.DEMO_WIDTH)
    assert (demo.DEMO_MODEL_DIR / "training.json").is_file()
    size = sum(p.stat().st_size for p in demo.ASSETS.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    subject = demo.demo_subject()
    assert subject.shape == (64, 48, 3) and subject.dtype == np.uint8
    poses = demo.demo_poses()
    assert poses.shape == (demo.DEMO_FRAMES, 2, 64, 48) and poses.dtype == np.float32
    assert 0 <= poses.min() and poses.max() <= 1 and (poses > 0).any()
    longer = demo.demo_poses(2 * demo.DEMO_FRAMES)  # plays forth and back
    np.testing.assert_array_equal(longer[demo.DEMO_FRAMES], poses[demo.DEMO_FRAMES - 2])
    assert demo.demo_poses(3, 32, 24).shape == (3, 2, 32, 24)


def test_missing_assets_say_how_to_make_them(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "DEMO_MODEL_DIR", tmp_path / "none")
    with pytest.raises(DreamPoseError, match="train_demo_model.py"):
        demo.demo_model()


def test_runtime_defaults_to_the_trained_demo_model(model):
    from dreampose_rt.runtime import Runtime

    rt = Runtime.from_pretrained(backend="torch", device="cpu")
    assert rt.is_demo and (rt.config.height, rt.config.width) == (64, 48)
    w = dict(rt.model.unet.named_parameters())["conv_in.weight"]
    assert w.detach().equal(dict(model.unet.named_parameters())["conv_in.weight"].detach())


def test_demo_model_follows_held_out_poses(model):
    protocol = EvalProtocol(videos=2, n_frames=16, first_target=4, stride=4, max_targets=3)
    sampling = SamplingSettings.for_model(model.config, scheduler="dpmpp", steps=15)
    o = evaluate(model, protocol, sampling=sampling, model_name="demo").overall()
    iou, repeat = o["model"]["iou"], o["repeat"]["iou"]
    print(f"IoU {iou:.3f} vs repeat-subject {repeat:.3f} (ceiling {o['gt_iou']:.3f})")
    assert iou >= 0.6, o
    assert iou >= repeat + 0.1, o


def test_the_demo_subject_lora_keeps_the_subjects_colours():
    """The shipped demo subject LoRA loads by default with the demo model, and on the demo's held-out frames
    (the demo video's ground truth; the LoRA saw only the subject image) the figure's mean colour error is
    well below the demo model's alone, while the figure still follows the pose."""
    from dreampose.data.figure import render_backdrop
    from dreampose.data.synth import synth_video
    from dreampose.evaluation import TestVideo, score_frames
    from dreampose_rt.runtime import Runtime

    with_lora = Runtime.from_pretrained(backend="torch", device="cpu")
    assert with_lora.subject == demo.DEMO_SUBJECT_LORA
    without = Runtime.from_pretrained(backend="torch", device="cpu", subject=False)
    assert without.subject is None and with_lora.identity()["model"] != without.identity()["model"]
    v = synth_video(demo.DEMO_VIDEO_SEED, 0, demo.DEMO_FRAMES, demo.DEMO_HEIGHT, demo.DEMO_WIDTH)
    video = TestVideo("demo", v.images, v.uv, v.silhouette, render_backdrop(v.appearance, 64, 48))
    targets = [3, 7, 11, 15]
    settings = SamplingSettings.for_model(with_lora.config, scheduler="dpmpp", steps=15)
    scores = {}
    for name, rt in (("lora", with_lora), ("none", without)):
        frames = rt.render(v.uv, settings=settings, frames=targets, frames_per_batch=4)
        scores[name] = {m: float(np.mean(x)) for m, x in score_frames(frames, video, targets).items()}
    print({k: {m: round(s[m], 4) for m in ("colour_error", "fg_l1", "iou")} for k, s in scores.items()})
    assert scores["lora"]["colour_error"] <= 0.75 * scores["none"]["colour_error"], scores
    assert scores["lora"]["fg_l1"] < scores["none"]["fg_l1"], scores
    assert scores["lora"]["iou"] >= 0.6, scores
