"""SynthFashion: deterministic by seed, any resolution, exact U, V maps, smooth motion, the UBC layout on disk."""

import numpy as np
import pytest

from dreampose.data.dataset import UBCFolder
from dreampose.data.figure import PATTERNS, Appearance, Pose, render_figure
from dreampose.data.synth import SynthFashion, SynthFashionConfig, synth_video, write_synth_fashion
from dreampose.utils import DreamPoseError


def test_deterministic_by_seed_and_independent_of_dataset_size():
    a = synth_video(seed=3, index=2, n_frames=4, height=32, width=24)
    b = synth_video(seed=3, index=2, n_frames=4, height=32, width=24)
    c = synth_video(seed=4, index=2, n_frames=4, height=32, width=24)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.uv, b.uv)
    assert not np.array_equal(a.images, c.images)
    small = SynthFashion(SynthFashionConfig(seed=3, n_videos=3, n_frames=4, height=32, width=24))
    large = SynthFashion(SynthFashionConfig(seed=3, n_videos=9, n_frames=4, height=32, width=24))
    assert np.array_equal(small.frame(2, 1), large.frame(2, 1)) and np.array_equal(small.pose(2, 3), a.uv[3])


@pytest.mark.parametrize("size", [(20, 16), (64, 48), (90, 70)])
def test_any_resolution_and_exact_uv_inside_the_silhouette(size):
    v = synth_video(0, 1, 3, *size)
    assert v.images.shape == (3, *size, 3) and v.images.dtype == np.uint8
    assert v.uv.shape == (3, 2, *size) and v.uv.dtype == np.float32
    assert v.uv.min() >= 0 and v.uv.max() <= 1
    inside = v.silhouette
    assert inside.any() and (~inside).any()
    assert np.all(v.uv[:, :, ~inside[0]][0] == 0)  # background: U = V = 0
    assert np.all(v.uv[:, 0][inside] > 0) and np.all(v.uv[:, 1][inside] > 0)


def test_motion_is_smooth_and_moves():
    v = synth_video(0, 0, 24, 64, 48)
    sil = v.silhouette.astype(np.float32)
    step = np.abs(np.diff(sil, axis=0)).mean(axis=(1, 2))  # silhouette change between consecutive frames
    far = np.abs(sil[12:] - sil[:-12]).mean(axis=(1, 2))
    assert step.max() < 0.1  # small changes frame to frame
    assert far.mean() > step.mean()  # but it goes somewhere


def test_patterns_and_a_turn_render_distinctly():
    base = dict(top=(0.8, 0.2, 0.2), stripes=4)
    images = [render_figure(Pose(), 64, 48, Appearance(pattern=p, **base))[0] for p in PATTERNS]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j])
    side = render_figure(Pose(facing=1.0), 64, 48)[2] > 0
    front = render_figure(Pose(facing=0.0), 64, 48)[2] > 0
    assert np.abs(side.astype(int) - front.astype(int)).sum() > 20  # front-on: shoulders and hips spread


def test_written_layout_loads_through_the_folder_loader(tmp_path):
    cfg = SynthFashionConfig(seed=1, n_videos=2, n_frames=3, height=32, width=24)
    root = write_synth_fashion(tmp_path / "synth", cfg, iuv=True)
    folder = UBCFolder(root)
    live = SynthFashion(cfg)
    assert folder.names == ["synth_00000", "synth_00001"] and folder.frame_counts == [3, 3]
    assert np.array_equal(folder.frame(1, 2), live.frame(1, 2))
    assert np.array_equal(folder.pose(1, 2), live.pose(1, 2))
    assert (root / "synth_00000" / "frame_0_iuv.png").is_file() and (root / "synthfashion.json").is_file()


def test_bad_sizes_are_refused():
    with pytest.raises(DreamPoseError, match="videos must be >= 1"):
        SynthFashionConfig(n_videos=0)
