"""The reference pipeline end to end on the tiny model."""

import copy

import numpy as np
import pytest
import torch

from dreampose.pipeline import DreamPosePipeline, frame_noise
from dreampose.diffusers_schedulers import make_diffusers_scheduler
from dreampose.utils import DreamPoseError

STEPS = 4


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return DreamPosePipeline(tiny_model)


def test_render_shape_and_determinism(pipe, subject_image, pose_seq):
    a = pipe(subject_image, pose_seq[:3], steps=STEPS, seed=7, progress=False)
    assert a.shape == (3, 64, 48, 3) and a.dtype == np.uint8
    b = pipe(subject_image, pose_seq[:3], steps=STEPS, seed=7, progress=False)
    assert np.array_equal(a, b)  # byte for byte
    c = pipe(subject_image, pose_seq[:3], steps=STEPS, seed=8, progress=False)
    assert not np.array_equal(a, c)


def test_poses_change_the_output(tiny_model, subject_image, pose_seq):
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.unet.conv_in.weight[:, 4:].normal_(0, 0.5)  # a "trained" pose input
    p = DreamPosePipeline(model)
    a = p(subject_image, pose_seq[:1], steps=STEPS, progress=False)
    b = p(subject_image, np.zeros_like(pose_seq[:1]), steps=STEPS, progress=False)
    assert not np.array_equal(a, b)


def test_partial_render_reproduces_the_full_render(pipe, subject_image, pose_seq):
    for noise in ("shared", "per-frame"):
        full = pipe(subject_image, pose_seq, steps=STEPS, seed=3, noise=noise, progress=False)
        part = pipe(subject_image, pose_seq, steps=STEPS, seed=3, noise=noise, frames=[4, 5], progress=False)
        assert np.array_equal(part, full[4:6]), noise


def test_frame_batching_matches_one_frame_at_a_time(pipe, subject_image, pose_seq):
    one = pipe(subject_image, pose_seq[:4], steps=STEPS, progress=False)
    batched = pipe(subject_image, pose_seq[:4], steps=STEPS, frames_per_batch=3, progress=False)
    # fp32: a batch of 9 runs other GEMM blockings than a batch of 3, so a rounding step can flip
    assert np.abs(one.astype(int) - batched).max() <= 2


def test_shared_and_per_frame_noise():
    shared = [frame_noise(5, None, (4, 2, 2)) for _ in range(2)]
    assert torch.equal(shared[0], shared[1])
    f0, f1 = frame_noise(5, 0, (4, 2, 2)), frame_noise(5, 1, (4, 2, 2))
    assert not torch.equal(f0, f1) and torch.equal(f0, frame_noise(5, 0, (4, 2, 2)))
    assert not torch.equal(f0, shared[0])


def test_conditioning_is_encoded_once_per_video(tiny_model, subject_image, pose_seq, monkeypatch):
    model = copy.deepcopy(tiny_model)
    calls = {"image": 0, "null": 0}
    enc, null = model.encode_image, model.encode_null_image

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    model.encode_image = count("image", enc)
    model.encode_null_image = count("null", null)
    DreamPosePipeline(model)(subject_image, pose_seq[:4], steps=2, progress=False)
    assert calls == {"image": 1, "null": 1}


class _RecordingScheduler:
    """Wraps a diffusers scheduler and records the guided noise passed to step()."""

    def __init__(self, inner, log):
        self._inner, self._log = inner, log

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def step(self, model_output, t, sample, return_dict=True):
        self._log.append(model_output.clone())
        return self._inner.step(model_output, t, sample, return_dict=return_dict)


def test_pipeline_routes_branches_and_combines(tiny_model, subject_image, pose_seq):
    """A UNet stub answers 1 for (null image, null pose), 7 for (image, pose), 3 for (image, null pose)."""
    model = copy.deepcopy(tiny_model)
    seen = []

    def stub(latents, pose_window, t, ehs):
        null_pose = pose_window.flatten(1).abs().sum(1) == 0
        null_image = torch.isclose(ehs, null_cond).flatten(1).all(1)
        assert not (null_image & ~null_pose).any(), "no branch has a null image with a pose"
        seen.append((null_image.tolist(), null_pose.tolist()))
        value = torch.where(null_image, 1.0, torch.where(null_pose, 3.0, 7.0))
        return value.view(-1, 1, 1, 1).expand_as(latents).clone()

    with torch.no_grad():
        null_cond = model.encode_null_image(1)
    model.predict_noise = stub
    log = []
    p = DreamPosePipeline(model, scheduler_factory=lambda n, c: _RecordingScheduler(make_diffusers_scheduler(n, c), log))
    p(subject_image, pose_seq[:2], steps=3, s_image=2.0, s_pose=0.5, frames_per_batch=2, progress=False)
    assert seen[0] == ([True, True, False, False, False, False], [True, True, False, False, True, True])
    assert len(log) == 4  # PLMS: 3 steps = 4 UNet calls
    for eps in log:
        assert eps.shape == (2, 4, 16, 12)
        assert torch.all(eps == 1 + 2.0 * (3 - 1) + 0.5 * (7 - 3))


def test_unet_calls_per_frame(tiny_model, subject_image, pose_seq):
    model = copy.deepcopy(tiny_model)
    batches = []
    inner = model.predict_noise
    model.predict_noise = lambda x, p, t, e: (batches.append(x.shape[0]), inner(x, p, t, e))[1]
    DreamPosePipeline(model)(subject_image, pose_seq[:1], steps=10, progress=False)
    assert batches == [3] * 11  # PNDM (PLMS) takes steps + 1 UNet calls, each at batch 3


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp"])
def test_other_schedulers(pipe, subject_image, pose_seq, scheduler):
    out = pipe(subject_image, pose_seq[:1], steps=3, scheduler=scheduler, progress=False)
    assert out.shape == (1, 64, 48, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be"),
        (dict(scheduler="euler"), "unknown scheduler"),
        (dict(noise="fresh"), "unknown noise 'fresh'"),
        (dict(steps=1001), "steps must be between 1 and 1000"),
        (dict(frames=[]), "frames is empty"),
        (dict(frames=[0.5]), "integer frame indices"),
        (dict(guidance=2.0), "unknown sampling setting"),
        (dict(frames=[0, 9]), r"out of range for 6 poses"),
        (dict(frames_per_batch=0), "frames_per_batch"),
        (dict(s_image=float("nan")), "s_image must be finite"),
    ],
)
def test_bad_settings(pipe, subject_image, pose_seq, kwargs, message):
    with pytest.raises(DreamPoseError, match=message):
        pipe(subject_image, pose_seq, progress=False, **kwargs)


def test_bad_inputs(pipe, subject_image, pose_seq):
    with pytest.raises(DreamPoseError, match="2 channels"):
        pipe(subject_image, pose_seq[:, :1], progress=False)
    with pytest.raises(DreamPoseError, match="image not found"):
        pipe("/nonexistent/subject.png", pose_seq, progress=False)
