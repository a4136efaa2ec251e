"""The UBC-layout loader's upfront checks (errors name the file) and the video preparation command."""

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from dreampose.data.dataset import UBCFolder
from dreampose.data.prepare import prepare_videos
from dreampose.data.synth import SynthFashionConfig, synth_video, write_synth_fashion
from dreampose.poses import uv_to_iuv_image
from dreampose.utils import DreamPoseError


@pytest.fixture
def dataset(tmp_path):
    return write_synth_fashion(tmp_path / "ds", SynthFashionConfig(n_videos=2, n_frames=3, height=24, width=16))


def test_missing_pose_names_the_file(dataset):
    (dataset / "synth_00001" / "frame_2_densepose.npy").unlink()
    with pytest.raises(DreamPoseError, match=r"synth_00001/frame_2_densepose\.npy: missing pose file"):
        UBCFolder(dataset)


def test_orphan_pose_names_the_missing_frame(dataset):
    (dataset / "synth_00000" / "frame_0.png").unlink()
    with pytest.raises(DreamPoseError, match=r"synth_00000/frame_0\.png: missing frame"):
        UBCFolder(dataset)


def test_pose_size_mismatch_names_the_file(dataset):
    np.save(dataset / "synth_00000" / "frame_1_densepose.npy", np.zeros((2, 20, 16), np.float32))
    with pytest.raises(DreamPoseError, match=r"frame_1_densepose\.npy: pose size 20 x 16 does not match"):
        UBCFolder(dataset)


def test_frame_size_mismatch_names_the_file(dataset):
    Image.new("RGB", (10, 10)).save(dataset / "synth_00001" / "frame_0.png")
    with pytest.raises(DreamPoseError, match=r"synth_00001/frame_0\.png: size 10 x 10 differs"):
        UBCFolder(dataset)


def test_gap_wrong_dtype_empty_and_missing(dataset, tmp_path):
    for name in ("frame_2.png", "frame_2_densepose.npy"):
        (dataset / "synth_00000" / name).rename(dataset / "synth_00000" / name.replace("2", "5"))
    with pytest.raises(DreamPoseError, match=r"gap in the frame numbering, missing frame\(s\) \[2, 3, 4\]"):
        UBCFolder(dataset)
    np.save(dataset / "synth_00001" / "frame_0_densepose.npy", np.zeros((2, 24, 16), np.uint8))
    with pytest.raises(DreamPoseError):
        UBCFolder(dataset)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DreamPoseError, match="empty dataset"):
        UBCFolder(tmp_path / "empty")
    (tmp_path / "empty" / "video").mkdir()
    with pytest.raises(DreamPoseError, match="no frame_<n>.png"):
        UBCFolder(tmp_path / "empty")
    with pytest.raises(DreamPoseError, match="dataset folder not found"):
        UBCFolder(tmp_path / "nothing")


def test_prepare_videos_with_npy_and_iuv_poses(tmp_path):
    v = synth_video(0, 0, 4, 32, 32)
    (tmp_path / "videos").mkdir()
    for name in ("a", "b"):
        imageio.mimwrite(tmp_path / "videos" / f"{name}.mp4", list(v.images), fps=8, macro_block_size=1)
    poses = tmp_path / "poses"
    (poses / "b").mkdir(parents=True)
    np.save(poses / "a.npy", v.uv)  # (T, 2, H, W)
    for n in range(4):  # IUV images, as DensePose's IUV output
        Image.fromarray(uv_to_iuv_image(v.uv[n], v.silhouette[n].astype(np.uint8))).save(poses / "b" / f"frame_{n}.png")
    written = prepare_videos(tmp_path / "videos", tmp_path / "out", poses=poses, size=(16, 16), every=2)
    assert [p.name for p in written] == ["a", "b"]
    folder = UBCFolder(tmp_path / "out")
    assert folder.frame_counts == [2, 2] and folder.frame_size == (16, 16)
    # IUV quantises to 1/255; both sources give the same (resized) poses
    assert np.abs(folder.pose(0, 1) - folder.pose(1, 1)).max() < 0.02

    np.save(poses / "a.npy", v.uv[:3])
    with pytest.raises(DreamPoseError, match=r"a\.npy: 3 poses for the 4 frames"):
        prepare_videos(tmp_path / "videos", tmp_path / "out2", poses=poses)
    (poses / "a.npy").unlink()
    with pytest.raises(DreamPoseError, match="no poses for video 'a'"):
        prepare_videos(tmp_path / "videos", tmp_path / "out2", poses=poses)
