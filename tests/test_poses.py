"""Pose sequences: readers, checks, resizing and the 5-frame window."""

import numpy as np
import pytest
import torch
from PIL import Image

from dreampose.poses import load_poses, pose_window, prepare_poses, uv_to_iuv_image, window_indices
from dreampose.utils import DreamPoseError


@pytest.mark.parametrize(
    "i, expected",
    [(0, [0, 0, 0, 1, 2]), (1, [0, 0, 1, 2, 3]), (5, [3, 4, 5, 6, 7]), (8, [6, 7, 8, 9, 9]), (9, [7, 8, 9, 9, 9])],
)
def test_window_indices_clamp_at_both_ends(i, expected):
    assert window_indices(i, 10) == expected


def test_window_of_a_single_frame_and_out_of_range():
    assert window_indices(0, 1) == [0] * 5
    with pytest.raises(IndexError):
        window_indices(3, 3)


def test_pose_window_channel_order():
    t = 4
    poses = torch.arange(t, dtype=torch.float32).view(t, 1, 1, 1).repeat(1, 2, 3, 2)
    poses[:, 1] += 0.5  # V = U + 0.5
    w = pose_window(poses, [0, 3])
    assert w.shape == (2, 10, 3, 2)
    assert w[0, :, 0, 0].tolist() == [0, 0.5, 0, 0.5, 0, 0.5, 1, 1.5, 2, 2.5]
    assert w[1, :, 0, 0].tolist() == [1, 1.5, 2, 2.5, 3, 3.5, 3, 3.5, 3, 3.5]


def test_folder_of_release_npy_files_ordered_numerically(tmp_path, rng):
    frames = {n: rng.random((2, 8, 6), dtype=np.float32) for n in (8, 9, 10, 11)}
    for n, a in frames.items():
        np.save(tmp_path / f"frame_{n}_densepose.npy", a)
        Image.new("RGB", (6, 8)).save(tmp_path / f"frame_{n}.png")  # images beside the poses are ignored
    poses = load_poses(tmp_path)
    assert poses.shape == (4, 2, 8, 6) and poses.dtype == np.float32
    for k, n in enumerate((8, 9, 10, 11)):  # 10 after 9, not after 1
        assert np.array_equal(poses[k], frames[n])


def test_numbering_gap_is_an_error(tmp_path, rng):
    for n in (0, 1, 3):
        np.save(tmp_path / f"frame_{n}_densepose.npy", rng.random((2, 4, 4), dtype=np.float32))
    with pytest.raises(DreamPoseError, match=r"missing frame\(s\) \[2\]"):
        load_poses(tmp_path)


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(DreamPoseError, match="no poses found"):
        load_poses(tmp_path)
    with pytest.raises(DreamPoseError, match="poses not found"):
        load_poses(tmp_path / "nope")


def test_npy_and_npz(tmp_path, rng):
    arr = rng.random((3, 2, 8, 6), dtype=np.float32)
    np.save(tmp_path / "p.npy", arr)
    np.savez(tmp_path / "p.npz", poses=arr)
    np.savez(tmp_path / "one.npz", arr)
    for name in ("p.npy", "p.npz", "one.npz"):
        assert np.array_equal(load_poses(tmp_path / name), arr)


@pytest.mark.parametrize(
    "arr, message",
    [
        (np.zeros((2, 8, 6), np.float32), "rank 3"),
        (np.zeros((3, 3, 8, 6), np.float32), "2 channels"),
        (np.full((3, 2, 8, 6), 1.5, np.float32), r"must lie in \[0, 1\]"),
        (np.full((3, 2, 8, 6), np.nan, np.float32), "NaN"),
        (np.zeros((0, 2, 8, 6), np.float32), "empty"),
        (np.zeros((3, 2, 8, 6), np.uint8), "floating point"),
    ],
)
def test_bad_arrays(tmp_path, arr, message):
    np.save(tmp_path / "bad.npy", arr)
    with pytest.raises(DreamPoseError, match=message) as e:
        load_poses(tmp_path / "bad.npy")
    assert "bad.npy" in str(e.value)


def test_bad_frame_in_folder_names_the_file(tmp_path, rng):
    np.save(tmp_path / "frame_0_densepose.npy", rng.random((2, 4, 4), dtype=np.float32))
    np.save(tmp_path / "frame_1_densepose.npy", rng.random((3, 4, 4), dtype=np.float32))
    with pytest.raises(DreamPoseError, match="frame_1_densepose.npy"):
        load_poses(tmp_path)


def test_iuv_image_folder(tmp_path, pose_seq):
    for i, uv in enumerate(pose_seq):
        Image.fromarray(uv_to_iuv_image(uv)).save(tmp_path / f"iuv_{i:03d}.png")
    poses = load_poses(tmp_path)
    assert poses.shape == pose_seq.shape
    assert np.abs(poses - pose_seq).max() <= 0.5 / 255 + 1e-6
    background = np.repeat((pose_seq == 0).all(axis=1, keepdims=True), 2, axis=1)
    assert background.any() and np.all(poses[background] == 0)  # background stays background


def test_prepare_poses_resizes_and_maps_to_minus_one_one(pose_seq):
    x = prepare_poses(pose_seq, (64, 48), (16, 12))
    assert x.shape == (6, 2, 16, 12)
    assert x.min() >= -1 and x.max() <= 1
    assert (x == -1).any()  # background -> -1
    big = prepare_poses(np.zeros((2, 2, 128, 96), np.float32), (64, 48), (16, 12))
    assert big.shape == (2, 2, 16, 12) and torch.all(big == -1)


def test_prepared_window_equals_the_window_of_the_whole_prepared_sequence(pose_seq):
    from dreampose.poses import prepared_window

    whole = prepare_poses(pose_seq, (64, 48), (16, 12))
    for frames in ([0], [2, 3], [4, 5], [0, 5, 1]):
        assert torch.equal(prepared_window(pose_seq, frames, (64, 48), (16, 12)), pose_window(whole, frames))
