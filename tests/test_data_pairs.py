"""Training pairs: the real, clamped pose window (or the release's copies), per-sample dropout rates,
and a sample stream that resumes exactly and splits across processes."""

import itertools

import numpy as np
import pytest
import torch

from dreampose.data.dataset import DropoutConfig, PairSampler, TrainingPairs
from dreampose.data.synth import SynthFashion, SynthFashionConfig
from dreampose.poses import window_indices


@pytest.fixture(scope="module")
def source():
    return SynthFashion(SynthFashionConfig(seed=0, n_videos=2, n_frames=6, height=32, width=24))


def test_real_window_is_the_clamped_neighbourhood_of_the_target(source):
    pairs = TrainingPairs(source, (32, 24), seed=0)
    for key in (0, 3, 5, 7, 11):  # ends and middle of both videos
        s = pairs[key]
        v, j = int(s["video"]), int(s["j"])
        want = np.stack([source.pose(v, k) for k in window_indices(j, 6)])
        assert torch.equal(s["poses"], torch.from_numpy(want))
        assert int(s["i"]) != j  # the conditioning frame is another frame of the same video
        assert torch.equal(s["target"], torch.from_numpy(source.frame(v, j)).permute(2, 0, 1).float() / 127.5 - 1)
    first = pairs[0]
    assert int(first["j"]) == 0 and torch.equal(first["poses"][0], first["poses"][2])  # clamped at the start
    assert not torch.equal(first["poses"][2], first["poses"][4])  # real neighbours, not copies


def test_copies_reproduce_the_release(source):
    s = TrainingPairs(source, (32, 24), window="copies")[4]
    assert all(torch.equal(s["poses"][k], s["poses"][2]) for k in range(5))


def test_poses_and_frames_are_resized_to_the_model(source):
    s = TrainingPairs(source, (16, 12))[1]
    assert s["image"].shape == (3, 16, 12) and s["poses"].shape == (5, 2, 16, 12)


def test_dropout_rates_per_sample(source):
    cfg = DropoutConfig(p_pose=0.05, p_image=0.05, p_both=0.05)
    pairs = TrainingPairs(source, (32, 24), seed=1, dropout=cfg)
    n = 20000
    flags = np.array([pairs.sample_choices(k)[3:] for k in range(n)])  # (n, 2): drop_image, drop_pose
    both = flags[:, 0] & flags[:, 1]
    image_only = flags[:, 0] & ~flags[:, 1]
    pose_only = ~flags[:, 0] & flags[:, 1]
    for count, p in ((both.sum(), 0.05), (image_only.sum(), 0.05), (pose_only.sum(), 0.05), (flags[:, 0].sum(), 0.10)):
        std = np.sqrt(n * p * (1 - p))
        assert abs(count - n * p) < 4 * std, (count, n * p, std)
    # (that a batch mixes dropped and kept rows is checked through the loss in test_training_stage1)


def test_sampler_resumes_exactly_and_splits_across_processes():
    full = list(itertools.islice(iter(PairSampler(10, seed=3)), 35))
    assert sorted(k % 10 for k in full[:10]) == list(range(10))  # one epoch visits every target once
    assert full[10:20] != full[:10]  # reshuffled per epoch
    assert list(itertools.islice(iter(PairSampler(10, seed=3, start=17)), 18)) == full[17:]
    r0 = list(itertools.islice(iter(PairSampler(10, seed=3, rank=0, world=2)), 10))
    r1 = list(itertools.islice(iter(PairSampler(10, seed=3, rank=1, world=2)), 10))
    assert sorted(r0 + r1) == sorted(full[:20]) and not set(r0[:5]) & set(r1[:5])
